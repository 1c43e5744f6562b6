//! A cascading clone on real servers (version from PGREPL_TEST_PG): `clone --start` from
//! a standby, as a plain REPLICATION role without pg_monitor, catches up with that
//! standby, does not inherit the standby's own `primary_slot_name`, and `status` sees it
//! streaming.

mod common;

use std::time::Duration;

use common::{free_port, run_async, scratch, standby_config, table_digest, text, StandbyGuard};
use testkit::{Cluster, ClusterOptions, Standby};

/// pg_hba lines that let the plain role `repl` in, over the socket and TCP, for SQL and
/// replication.
fn with_repl(options: ClusterOptions) -> ClusterOptions {
    options
        .hba("local replication,all repl trust")
        .hba("host replication,all repl 127.0.0.1/32 trust")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cascading_clone_started_as_a_plain_replication_role_catches_up() {
    let primary =
        Cluster::start(with_repl(ClusterOptions::new()).setting("wal_keep_size", "512MB"));
    primary.execute("CREATE ROLE repl LOGIN REPLICATION").await;
    primary
        .execute(
            "CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 20000) g",
        )
        .await;
    let upstream = Standby::start(&primary, with_repl(ClusterOptions::new())).await;
    // The upstream standby's postgresql.auto.conf names a slot on *its* upstream (not
    // reloaded, so the upstream itself goes on as before). A clone copies the file and
    // must not try to use that slot on the standby it streams from.
    upstream
        .execute("ALTER SYSTEM SET primary_slot_name = 'slot_of_the_upstream'")
        .await;

    let work = scratch();
    let pgdata = work.path().join("cascaded");
    let _guard = StandbyGuard {
        pg_ctl: primary.bin("pg_ctl"),
        pgdata: pgdata.clone(),
    };
    let source = format!("{} dbname=postgres", upstream.unix_conninfo("repl"));
    let output = run_async(
        [
            "clone",
            "--source",
            &source,
            "--pgdata",
            pgdata.to_str().unwrap(),
            "--start",
            "--start-timeout",
            "90",
            "--standby-port",
            &free_port().to_string(),
            "--pg-ctl",
            primary.bin("pg_ctl").to_str().unwrap(),
            "--json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    )
    .await;
    assert!(
        output.status.success(),
        "cascading clone --start failed:\n{}",
        text(&output)
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&output)));
    assert!(summary["standby_replay_lag_bytes"].is_u64(), "{summary}");
    let auto_conf = std::fs::read_to_string(pgdata.join("postgresql.auto.conf")).unwrap();
    let last_slot_line = auto_conf
        .lines()
        .rfind(|l| l.starts_with("primary_slot_name"))
        .unwrap_or_default()
        .to_string();
    assert_eq!(last_slot_line, "primary_slot_name = ''", "{auto_conf}");

    // New writes on the primary reach the cascaded standby through the upstream.
    primary
        .execute("INSERT INTO t SELECT g, 'late' FROM generate_series(20001, 20500) g")
        .await;
    let cascaded = standby_config(&pgdata, "repl");
    let status = run_async(
        [
            "status",
            "--wait",
            "--timeout",
            "60",
            "--json",
            "--primary",
            &upstream.unix_conninfo("repl"),
            "--standby",
            &cascaded.to_conninfo_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    )
    .await;
    assert!(status.status.success(), "status --wait:\n{}", text(&status));
    let observed: serde_json::Value =
        serde_json::from_slice(&status.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&status)));
    assert_eq!(
        observed["streaming"],
        serde_json::Value::Bool(true),
        "{observed}"
    );
    let primary_config = primary.config(primary.superuser());
    let cascaded_superuser = standby_config(&pgdata, primary.superuser());
    let mut same = false;
    for _ in 0..150 {
        if table_digest(&primary_config, "t").await == table_digest(&cascaded_superuser, "t").await
        {
            same = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        same,
        "the cascaded standby must replay the primary's new rows"
    );
}
