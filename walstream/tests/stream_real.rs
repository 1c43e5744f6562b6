//! WalStream against real servers: keepalive replies, stop with CopyDone, server
//! shutdown, errors before and inside the copy.

use std::time::{Duration, Instant};

use futures::StreamExt;
use pgwire_repl::{Lsn, ReplicationClient, TimelineId};
use testkit::{Cluster, ClusterOptions};
use walstream::{ErrorKind, StreamEvent, StreamOptions, WalStream};

async fn connect(cluster: &Cluster) -> (ReplicationClient, Lsn) {
    let mut client = ReplicationClient::connect(&cluster.config(cluster.superuser()))
        .await
        .unwrap();
    let id = client.identify_system().await.unwrap();
    (
        client,
        id.xlog_pos
            .segment_start(pgwire_repl::WalSegmentSize::DEFAULT),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalives_are_answered_and_stop_sends_copy_done() {
    let cluster = Cluster::start(ClusterOptions::new().setting("wal_sender_timeout", "2s"));
    let (client, start) = connect(&cluster).await;
    // No periodic updates: only the answers to the server's requests keep it alive.
    let options = StreamOptions::new(start)
        .timeline(TimelineId(1))
        .status_interval(None)
        .idle_timeout(Some(Duration::from_secs(10)));
    let mut stream = WalStream::start(client, options).await.unwrap();
    let began = Instant::now();
    let mut requested = 0;
    let mut received = start;
    while began.elapsed() < Duration::from_secs(5) {
        let event = tokio::time::timeout(Duration::from_secs(3), stream.next_event())
            .await
            .expect("the server sends a keepalive at least every second")
            .unwrap()
            .expect("the stream goes on");
        match event {
            StreamEvent::XLogData(x) => {
                assert_eq!(x.wal_start, received);
                received = Lsn(x.wal_start.0 + x.data.len() as u64);
                stream.feedback().set_write(received);
            }
            StreamEvent::Keepalive(k) => requested += usize::from(k.reply_requested),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(requested >= 2, "only {requested} reply requests in 5 s");
    // Stop: CopyDone, drain to ReadyForQuery; the session is usable again.
    assert_eq!(stream.stop().await.unwrap(), None);
    let mut conn = stream.into_connection();
    pgwire_repl::proto::frontend::query("IDENTIFY_SYSTEM", conn.write_buf()).unwrap();
    conn.flush().await.unwrap();
    loop {
        match conn.read_message().await.unwrap() {
            pgwire_repl::proto::backend::BackendMessage::ReadyForQuery { .. } => break,
            pgwire_repl::proto::backend::BackendMessage::ErrorResponse(db) => panic!("{db}"),
            _ => {}
        }
    }
    assert!(!cluster.log().contains("invalid standby message type"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_shutdown_is_a_distinct_end_event() {
    let cluster = Cluster::start(ClusterOptions::new());
    let (client, start) = connect(&cluster).await;
    let stream = WalStream::start(
        client,
        StreamOptions::new(start).status_interval(Some(Duration::from_millis(200))),
    )
    .await
    .unwrap();
    let feedback = stream.feedback().clone();
    let mut events = stream.into_stream();
    // Fast shutdown from another thread while the stream is read here.
    let stopper = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_millis(300));
        let mut cluster = cluster;
        cluster.stop();
        cluster
    });
    let mut saw_shutdown = false;
    while let Some(event) = tokio::time::timeout(Duration::from_secs(30), events.next())
        .await
        .expect("the stream ends")
    {
        match event.unwrap() {
            StreamEvent::XLogData(x) => {
                // The walsender waits for write == sent before it ends with COPY 0.
                feedback.set_write(Lsn(x.wal_start.0 + x.data.len() as u64));
            }
            StreamEvent::ServerShutdown => saw_shutdown = true,
            StreamEvent::Keepalive(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(saw_shutdown, "the stream ended without the shutdown event");
    let _cluster = stopper.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_typed() {
    let cluster = Cluster::start(ClusterOptions::new());
    // A missing slot: refused before the copy starts.
    let (client, start) = connect(&cluster).await;
    let err = WalStream::start(client, StreamOptions::new(start).slot("nope"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Server);
    assert_eq!(err.sqlstate(), Some("42704"));
    // A start beyond the server's flush position: the error comes after CopyBothResponse.
    let (client, _) = connect(&cluster).await;
    let far = Lsn(0x10_0000_0000);
    let result = match WalStream::start(client, StreamOptions::new(far)).await {
        Err(err) => Err(err),
        Ok(mut stream) => stream.next_event().await,
    };
    let err = result.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Server, "{err}");
    assert!(
        err.to_string().contains("ahead of the WAL flush position"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_reads_under_load_lose_no_wal_and_a_stop_handle_ends_the_stream() {
    let cluster = Cluster::start(ClusterOptions::new());
    cluster
        .execute("CREATE TABLE churn (id serial PRIMARY KEY, pad text)")
        .await;
    let (client, start) = connect(&cluster).await;
    let mut stream = WalStream::start(
        client,
        StreamOptions::new(start).status_interval(Some(Duration::from_millis(100))),
    )
    .await
    .unwrap();
    // WAL keeps coming while the reader gives up every 2 ms.
    let writer = {
        let mut sql = cluster.sql().await;
        tokio::spawn(async move {
            for _ in 0..200 {
                sql.batch(
                    "INSERT INTO churn (pad) SELECT repeat('x', 500) FROM generate_series(1, 20)",
                )
                .await
                .unwrap();
            }
        })
    };
    let stop = stream.stop_handle();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let stopper = tokio::spawn(async move {
        tokio::time::sleep_until(deadline).await;
        stop.stop();
    });
    let mut received = start;
    let mut cancelled = 0u32;
    let mut bytes = 0u64;
    loop {
        match tokio::time::timeout(Duration::from_millis(2), stream.next_event()).await {
            Err(_) => cancelled += 1,
            Ok(Ok(None)) => break,
            Ok(Ok(Some(StreamEvent::XLogData(x)))) => {
                assert_eq!(x.wal_start, received, "a gap or an overlap in the WAL");
                received = Lsn(x.wal_start.0 + x.data.len() as u64);
                bytes += x.data.len() as u64;
                stream.feedback().set_write(received);
            }
            Ok(Ok(Some(StreamEvent::Keepalive(_)))) => {}
            Ok(other) => panic!("unexpected {other:?}"),
        }
    }
    stopper.await.unwrap();
    writer.abort();
    assert!(cancelled > 10, "only {cancelled} reads were cancelled");
    assert!(bytes > 100_000, "only {bytes} bytes of WAL streamed");
    // Stopped for good, cleanly: the session is idle and usable.
    assert_eq!(stream.next_event().await.unwrap(), None);
    let mut conn = stream.into_connection();
    pgwire_repl::proto::frontend::query("IDENTIFY_SYSTEM", conn.write_buf()).unwrap();
    conn.flush().await.unwrap();
    loop {
        match conn.read_message().await.unwrap() {
            pgwire_repl::proto::backend::BackendMessage::ReadyForQuery { .. } => break,
            pgwire_repl::proto::backend::BackendMessage::ErrorResponse(db) => panic!("{db}"),
            _ => {}
        }
    }
    assert!(!cluster.log().contains("invalid standby message type"));
}
