//! The reconnect policy and its events against a server that never answers (a port with
//! nothing listening): the first retry at once, then the interval; the library gives up
//! when its policy says so and keeps retrying when asked to, saying so through events.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use walstream::{receive_wal_into, MemoryWal, ReceiveOptions, ReceiverEvent, ReconnectPolicy};

/// A local port nobody listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Disconnected,
    Retrying { attempt: u32, delay: Duration },
    GaveUp,
}

fn recording(options: &mut ReceiveOptions) -> Arc<Mutex<Vec<(Instant, Seen)>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    options.on_event(move |event| {
        let entry = match event {
            ReceiverEvent::Disconnected { error } => {
                assert!(error.is_some(), "a refused connection carries its error");
                Seen::Disconnected
            }
            ReceiverEvent::Retrying { attempt, delay, .. } => Seen::Retrying {
                attempt: *attempt,
                delay: *delay,
            },
            ReceiverEvent::GaveUp { .. } => Seen::GaveUp,
            other => panic!("unexpected event {other:?}"),
        };
        log.lock().unwrap().push((Instant::now(), entry));
    });
    seen
}

#[tokio::test]
async fn a_server_that_never_answers_is_retried_at_once_then_every_interval_until_the_limit() {
    let config =
        pgwire_repl::Config::parse(&format!("host=127.0.0.1 port={} user=x", closed_port()))
            .unwrap();
    let mut options = ReceiveOptions::new("");
    options.reconnect = ReconnectPolicy::default()
        .interval(Duration::from_millis(300))
        .give_up_after(Some(Duration::from_secs(1)));
    let seen = recording(&mut options);
    let began = Instant::now();
    let err = receive_wal_into(&config, &options, MemoryWal::new(), std::future::pending())
        .await
        .expect_err("nothing listens there");
    let took = began.elapsed();
    assert!(
        err.is_retryable(),
        "the last connection error is returned: {err}"
    );
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let seen: Vec<Seen> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|(_, s)| s.clone())
        .collect();
    assert_eq!(seen[0], Seen::Disconnected);
    assert_eq!(
        seen[1],
        Seen::Retrying {
            attempt: 1,
            delay: Duration::ZERO
        },
        "the first retry is at once: {seen:?}"
    );
    assert_eq!(
        seen[3],
        Seen::Retrying {
            attempt: 2,
            delay: Duration::from_millis(300)
        },
        "{seen:?}"
    );
    assert_eq!(seen.last(), Some(&Seen::GaveUp), "{seen:?}");
    let retries = seen
        .iter()
        .filter(|s| matches!(s, Seen::Retrying { .. }))
        .count();
    assert!(
        (3..=6).contains(&retries),
        "{retries} retries in 1 s at 0.3 s: {seen:?}"
    );
}

#[tokio::test]
async fn retry_forever_keeps_trying_until_stopped() {
    let config =
        pgwire_repl::Config::parse(&format!("host=127.0.0.1 port={} user=x", closed_port()))
            .unwrap();
    let mut options = ReceiveOptions::new("");
    options.reconnect = ReconnectPolicy::default()
        .interval(Duration::from_millis(200))
        .give_up_after(Some(Duration::from_millis(300)))
        .retry_forever();
    let seen = recording(&mut options);
    let summary = receive_wal_into(
        &config,
        &options,
        MemoryWal::new(),
        tokio::time::sleep(Duration::from_millis(1500)),
    )
    .await
    .expect("stopped on request, not given up");
    assert_eq!(summary.end_reason, walstream::EndReason::Shutdown);
    let seen = seen.lock().unwrap();
    assert!(!seen.iter().any(|(_, s)| *s == Seen::GaveUp), "{seen:?}");
    assert!(summary.reconnects >= 5, "{summary:?}");
}
