//! Helpers shared by the real-server tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pgwire_repl::Lsn;
use testkit::{Cluster, ClusterOptions};

/// Settings that keep every segment on the server for the comparisons.
pub fn primary_options() -> ClusterOptions {
    ClusterOptions::new()
        .setting("wal_keep_size", "1GB")
        .setting("max_wal_size", "1GB")
        .setting("checkpoint_timeout", "1h")
}

pub fn start_primary() -> Cluster {
    Cluster::start(primary_options())
}

pub async fn lsn(cluster: &Cluster, sql: &str) -> Lsn {
    let text = cluster.query_value(sql).await.expect("an LSN");
    text.parse().expect("a valid LSN")
}

/// Generates about `rows` × 600 bytes of WAL (records of ~550 bytes, so some cross
/// page and segment boundaries).
pub async fn generate_wal(cluster: &Cluster, rows: u32) {
    cluster
        .execute(&format!(
            "CREATE TABLE IF NOT EXISTS load (id int, pad text);
             INSERT INTO load SELECT g, repeat(md5(g::text), 16) FROM generate_series(1, {rows}) g;"
        ))
        .await;
}

/// `pg_switch_wal()` after making sure there is something to switch away from.
pub async fn switch_wal(cluster: &Cluster) -> Lsn {
    cluster
        .execute("CREATE TABLE IF NOT EXISTS tick (x int); INSERT INTO tick VALUES (1);")
        .await;
    lsn(cluster, "SELECT pg_switch_wal()").await
}

/// Complete segment files (24 hex digits, no suffix) in a directory, by name.
pub fn complete_segments(dir: &Path) -> BTreeMap<String, PathBuf> {
    files(dir)
        .into_iter()
        .filter(|(name, _)| name.len() == 24 && name.bytes().all(|b| b.is_ascii_hexdigit()))
        .collect()
}

pub fn files(dir: &Path) -> BTreeMap<String, PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
                .collect()
        })
        .unwrap_or_default()
}

/// Asserts that each of our complete segments equals the server's file of that name.
/// Returns how many were compared.
pub fn assert_same_as_server(ours: &Path, server_pg_wal: &Path) -> usize {
    let mut compared = 0;
    for (name, path) in complete_segments(ours) {
        let theirs = server_pg_wal.join(&name);
        let a = std::fs::read(&path).unwrap();
        let b = std::fs::read(&theirs)
            .unwrap_or_else(|e| panic!("server segment {} missing: {e}", theirs.display()));
        assert!(a == b, "segment {name} differs from the server's");
        compared += 1;
    }
    compared
}

/// Asserts that the complete segments have consecutive numbers (no gap).
pub fn assert_no_gap(dir: &Path) {
    let numbers: Vec<u64> = complete_segments(dir)
        .keys()
        .map(|n| u64::from_str_radix(&n[8..], 16).unwrap())
        .collect();
    for pair in numbers.windows(2) {
        let low = pair[0] & 0xFFFF_FFFF;
        let next = if low == 0xFF {
            (pair[0] & !0xFF) + 0x1_0000_0000
        } else {
            pair[0] + 1
        };
        assert_eq!(
            pair[1], next,
            "gap between segments {:X} and {:X}",
            pair[0], pair[1]
        );
    }
}

/// Polls `check` every 50 ms for up to `limit`.
pub async fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The segment file name holding `lsn` on timeline 1 (16 MiB segments).
pub fn segment_name(tli: u32, lsn: Lsn) -> String {
    lsn.wal_file_name(
        pgwire_repl::TimelineId(tli),
        pgwire_repl::WalSegmentSize::DEFAULT,
    )
}

/// A shutdown trigger for `receive_wal`.
pub fn shutdown_pair() -> (
    tokio::sync::watch::Sender<bool>,
    impl std::future::Future<Output = ()>,
) {
    let (tx, mut rx) = tokio::sync::watch::channel(false);
    let fut = async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    (tx, fut)
}

/// The end of the segment holding the byte before `lsn` (where a switched segment ends).
pub fn segment_end(lsn: Lsn) -> Lsn {
    let size = pgwire_repl::WalSegmentSize::DEFAULT.bytes();
    Lsn((lsn.0 - 1) / size * size + size)
}
