//! `clone-standby status` and `check` with the least privilege and with a standby as the
//! upstream, against real primaries and standbys.

use std::process::Command;
use std::time::{Duration, Instant};

use pgwire_repl::Lsn;
use serde_json::Value;
use testkit::{Cluster, ClusterOptions, Standby};

/// `repl` may log in for replication and to every database; `watcher` only to
/// databases (so its replication connections fail and `status` falls back to SQL).
fn options() -> ClusterOptions {
    ClusterOptions::new()
        .hba("local replication,all repl trust")
        .hba("host replication,all repl 127.0.0.1/32 trust")
        .hba("local all watcher trust")
}

async fn primary_and_standby() -> (Cluster, Standby) {
    let primary = Cluster::start(options().setting("wal_keep_size", "256MB"));
    primary
        .execute("CREATE ROLE repl LOGIN REPLICATION; CREATE ROLE watcher LOGIN")
        .await;
    let standby = Standby::start(&primary, options()).await;
    (primary, standby)
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn run(args: &[&str]) -> Run {
    let output = Command::new(env!("CARGO_BIN_EXE_clone-standby"))
        .args(args)
        .output()
        .expect("run clone-standby");
    Run {
        ok: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `status --wait --json`, which must exit 0; returns the parsed JSON.
fn status_json(upstream_flag: &str, upstream: &str, standby: &str) -> Value {
    let out = run(&[
        "status",
        "--wait",
        "--timeout",
        "60",
        upstream_flag,
        upstream,
        "--standby",
        standby,
        "--json",
    ]);
    assert!(
        out.ok,
        "status must exit 0:\n{}\n{}",
        out.stdout, out.stderr
    );
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json printed no JSON ({e}):\n{}", out.stdout))
}

fn lsn(value: &Value, key: &str) -> Lsn {
    value[key]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{key} is not an LSN in {value:#}"))
}

/// On 14+ a replication connection tells a standby by `in_hot_standby`; on 13 it cannot.
fn expected_in_recovery(major: u32, in_recovery: bool) -> Value {
    if major >= 14 {
        Value::Bool(in_recovery)
    } else {
        Value::Null
    }
}

#[tokio::test]
async fn a_plain_replication_role_sees_the_standby_streaming() {
    let (primary, standby) = primary_and_standby().await;
    primary
        .execute("CREATE TABLE t AS SELECT generate_series(1, 50000) AS i")
        .await;
    let before: Lsn = primary
        .query_value("SELECT pg_current_wal_flush_lsn()::text")
        .await
        .and_then(|v| v.parse().ok())
        .expect("the primary's flush LSN");

    let upstream = primary.unix_conninfo("repl");
    let downstream = standby.unix_conninfo("repl");
    let value = status_json("--primary", &upstream, &downstream);
    assert_eq!(value["streaming"], Value::Bool(true), "{value:#}");
    assert_eq!(value["streaming_inferred"], Value::Bool(true), "{value:#}");
    assert_eq!(
        value["wal_receiver_running"],
        Value::Bool(true),
        "{value:#}"
    );
    assert_eq!(value["wal_receiver_status"], Value::Null, "{value:#}");
    assert_eq!(value["upstream_read_over"], "replication", "{value:#}");
    assert_eq!(
        value["upstream_in_recovery"],
        expected_in_recovery(primary.major(), false),
        "{value:#}"
    );
    assert!(
        value["hint"]
            .as_str()
            .is_some_and(|h| h.contains("GRANT pg_monitor TO repl;")),
        "{value:#}"
    );
    // --wait returned only once the standby had replayed what the primary had flushed.
    assert!(lsn(&value, "replay_lsn") >= before, "{value:#}");
    assert!(lsn(&value, "upstream_lsn") >= before, "{value:#}");
    for key in ["receive_lag_bytes", "replay_lag_bytes"] {
        assert!(value[key].as_u64().is_some(), "{key}: {value:#}");
    }

    // The text form says that streaming was inferred, and how to see the exact state.
    let out = run(&[
        "status",
        "--wait",
        "--timeout",
        "60",
        "--primary",
        &upstream,
        "--standby",
        &downstream,
    ]);
    assert!(out.ok, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("streaming:             yes (inferred"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("GRANT pg_monitor TO repl;"),
        "{}",
        out.stdout
    );

    // With pg_monitor the WAL receiver's own state is read, not inferred.
    primary.execute("GRANT pg_monitor TO repl").await;
    let value = status_json("--primary", &upstream, &downstream);
    assert_eq!(value["streaming"], Value::Bool(true), "{value:#}");
    assert_eq!(value["streaming_inferred"], Value::Bool(false), "{value:#}");
    assert_eq!(value["wal_receiver_status"], "streaming", "{value:#}");
    assert_eq!(value["hint"], Value::Null, "{value:#}");
}

#[tokio::test]
async fn a_standby_as_upstream_is_read_over_replication_or_sql() {
    let (primary, standby) = primary_and_standby().await;
    primary.execute("CREATE TABLE t AS SELECT 1 AS i").await;
    let major = primary.major();
    let downstream = standby.unix_conninfo("repl");

    // A standby as the upstream (cascading): its position is max(receive, replay),
    // which IDENTIFY_SYSTEM reports; pg_current_wal_lsn() would fail there. The
    // standby itself stands in for the cascading standby that would stream from it.
    let value = status_json("--upstream", &standby.unix_conninfo("repl"), &downstream);
    assert_eq!(value["upstream_read_over"], "replication", "{value:#}");
    assert_eq!(
        value["upstream_in_recovery"],
        expected_in_recovery(major, true),
        "{value:#}"
    );
    assert_eq!(value["streaming"], Value::Bool(true), "{value:#}");
    lsn(&value, "upstream_lsn");

    // A role without replication access: the position comes from SQL, which knows
    // whether the upstream is in recovery on every version.
    let watcher_standby = standby.unix_conninfo("watcher");
    let value = status_json("--primary", &watcher_standby, &watcher_standby);
    assert_eq!(value["upstream_read_over"], "sql", "{value:#}");
    assert_eq!(
        value["upstream_in_recovery"],
        Value::Bool(true),
        "{value:#}"
    );
    assert_eq!(value["streaming"], Value::Bool(true), "{value:#}");
    let value = status_json(
        "--primary",
        &primary.unix_conninfo("watcher"),
        &watcher_standby,
    );
    assert_eq!(value["upstream_read_over"], "sql", "{value:#}");
    assert_eq!(
        value["upstream_in_recovery"],
        Value::Bool(false),
        "{value:#}"
    );
    let out = run(&[
        "status",
        "--primary",
        &primary.unix_conninfo("watcher"),
        "--standby",
        &watcher_standby,
    ]);
    assert!(out.ok, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("read over sql; upstream is a primary"),
        "{}",
        out.stdout
    );

    // A --standby that is a primary fails at once, not after the timeout.
    let started = Instant::now();
    let out = run(&[
        "status",
        "--wait",
        "--timeout",
        "60",
        "--primary",
        &primary.unix_conninfo("repl"),
        "--standby",
        &primary.unix_conninfo("repl"),
    ]);
    assert!(!out.ok, "{}", out.stdout);
    assert!(out.stderr.contains("not in recovery"), "{}", out.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn check_against_a_standby_says_it_is_one() {
    let (_primary, standby) = primary_and_standby().await;
    let out = run(&["check", "--source", &standby.unix_conninfo("repl")]);
    assert!(out.ok, "check must exit 0:\n{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout
            .contains("note    this server is a standby (in recovery): cascading works"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("fall behind"), "{}", out.stdout);
    assert!(
        out.stdout
            .contains("this standby can serve a cascading standby"),
        "{}",
        out.stdout
    );
    assert!(
        !out.stdout.contains("this primary can serve"),
        "{}",
        out.stdout
    );
}
