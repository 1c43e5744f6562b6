//! `receive_wal_into` with a destination other than a directory, against a real server
//! (version from PGREPL_TEST_PG): WAL in memory, cut mid-stream several times by a
//! proxy, resumes each time with no gap and ends byte-identical to the server's pg_wal;
//! the flush position reported to the server is what the destination holds durably.

mod common;

#[allow(dead_code)]
#[path = "../examples/custom_destination.rs"]
mod custom_destination;

use std::time::Duration;

use common::*;
use pgwire_repl::{Config, Lsn};
use testkit::proxy::{Fault, FaultPlan, Proxy};
use walstream::{receive_wal_into, EndReason, MemoryWal, ReceiveOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_destination_resumes_after_cuts_without_gap() {
    let primary = start_primary();
    primary
        .execute("SELECT pg_create_physical_replication_slot('memory', true)")
        .await;
    // The first three streaming attempts are cut after 3, 5 and 7 MB from the server;
    // every connection before them (IDENTIFY_SYSTEM shares the streaming connection)
    // counts too, so plan several and let the rest pass.
    let cut = |mb: u64| FaultPlan::server_to_client(Fault::Cut { at: mb << 20 });
    let proxy = Proxy::start(primary.port(), vec![cut(3), cut(5), cut(7)]).await;
    let config = Config::parse(&format!(
        "host=127.0.0.1 port={} user={} sslmode=disable",
        proxy.port(),
        primary.superuser()
    ))
    .unwrap();

    // 13 and 14 cannot read a slot's position: name the start for every version.
    let start = lsn(&primary, "SELECT pg_current_wal_lsn()").await;
    generate_wal(&primary, 80_000).await;
    let end = segment_end(switch_wal(&primary).await);
    let mut options = ReceiveOptions::new("");
    options.slot = Some("memory".into());
    options.start_position = Some(start);
    options.endpos = Some(end);
    options.reconnect = walstream::ReconnectPolicy::default().interval(Duration::from_millis(100));
    let wal = MemoryWal::new();
    let summary = tokio::time::timeout(
        Duration::from_secs(120),
        receive_wal_into(&config, &options, wal.clone(), std::future::pending()),
    )
    .await
    .expect("the receiver finished")
    .expect("the receiver succeeded");
    assert_eq!(summary.end_reason, EndReason::EndPos);
    assert!(
        summary.reconnects >= 3,
        "three cuts, three reconnects: {summary:?}"
    );
    assert!(summary.flushed >= end, "{summary:?}");

    // Every complete segment equals the server's file; there is no gap from the first.
    let complete = wal.complete_segments();
    assert!(complete.len() >= 3, "{complete:?}");
    let pg_wal = primary.data_dir().join("pg_wal");
    for pair in complete.windows(2) {
        let (a, b) = (
            u64::from_str_radix(&pair[0][8..], 16).unwrap(),
            u64::from_str_radix(&pair[1][8..], 16).unwrap(),
        );
        assert_eq!(a + 1, b, "a gap between {} and {}", pair[0], pair[1]);
    }
    for name in &complete {
        let ours = wal.segment(name).unwrap();
        let theirs = std::fs::read(pg_wal.join(name)).unwrap();
        assert!(
            ours[..] == theirs[..],
            "segment {name} differs from the server's"
        );
    }
    let last = segment_name(1, Lsn(end.0 - 1));
    assert!(complete.contains(&last), "{last} is complete: {complete:?}");

    // The slot moved to what the destination holds, not further.
    let restart: Lsn = primary
        .query_value(
            "SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = 'memory'",
        )
        .await
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        restart > Lsn(0) && restart <= summary.flushed,
        "restart_lsn {restart}, flushed {}",
        summary.flushed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_custom_destination_example_streams_and_counts() {
    let primary = start_primary();
    let start = lsn(&primary, "SELECT pg_current_wal_lsn()").await;
    generate_wal(&primary, 20_000).await;
    let end = segment_end(switch_wal(&primary).await);
    let wal =
        custom_destination::stream_range(&primary.unix_conninfo(primary.superuser()), start, end)
            .await
            .unwrap_or_else(|e| panic!("the example failed: {e}"));
    let counted = wal.bytes.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        counted >= end.0 - start.0,
        "{counted} bytes counted, {start}..{end} streamed"
    );
    let last = segment_name(1, Lsn(end.0 - 1));
    assert!(wal.store.complete_segments().contains(&last));
    let ours = wal.store.segment(&last).unwrap();
    let theirs = std::fs::read(primary.data_dir().join("pg_wal").join(&last)).unwrap();
    assert!(ours[..] == theirs[..], "{last} differs from the server's");
}
