//! `clone-standby check` against real primaries that can and cannot serve a standby.

use std::process::Command;

use pgwire_repl::Config;
use standby::check::{check, Level};
use testkit::{Cluster, ClusterOptions};

fn run_check(conninfo: &str) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_clone-standby"))
        .args(["check", "--source", conninfo])
        .output()
        .expect("run clone-standby");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

#[tokio::test]
async fn a_healthy_primary_passes_with_warnings_for_risky_settings() {
    let cluster = Cluster::start(
        ClusterOptions::new()
            .setting("fsync", "off")
            .setting("synchronous_commit", "off"),
    );
    let conninfo = cluster.tcp_conninfo(cluster.superuser()) + " sslmode=disable";
    let findings = check(&Config::parse(&conninfo).unwrap()).await;
    let problems: Vec<_> = findings
        .iter()
        .filter(|f| f.level == Level::Problem)
        .collect();
    assert!(problems.is_empty(), "unexpected problems: {problems:?}");
    let warning = |text: &str| {
        findings
            .iter()
            .any(|f| f.level == Level::Warning && f.what.contains(text))
    };
    assert!(warning("fsync = off"), "{findings:?}");
    assert!(warning("synchronous_commit = off"), "{findings:?}");
    assert!(
        warning("trust"),
        "trust over TCP must be a warning: {findings:?}"
    );
    assert!(warning("does not use TLS"), "{findings:?}");
    let (ok, text) = run_check(&conninfo);
    assert!(ok, "check must exit 0:\n{text}");
    assert!(text.contains("fix: ALTER SYSTEM SET fsync = on"), "{text}");
}

#[tokio::test]
async fn a_primary_with_minimal_wal_cannot_serve_and_gets_the_fix() {
    let cluster = Cluster::start(
        ClusterOptions::new()
            .setting("wal_level", "minimal")
            .setting("max_wal_senders", "0")
            .setting("max_replication_slots", "0"),
    );
    let conninfo = cluster.tcp_conninfo(cluster.superuser()) + " sslmode=disable";
    let findings = check(&Config::parse(&conninfo).unwrap()).await;
    let problem = |text: &str| {
        findings
            .iter()
            .find(|f| f.level == Level::Problem && f.what.contains(text))
    };
    let minimal = problem("wal_level = minimal").unwrap_or_else(|| panic!("{findings:?}"));
    assert!(minimal
        .fix
        .as_deref()
        .unwrap()
        .contains("ALTER SYSTEM SET wal_level = replica"));
    let senders = problem("max_wal_senders = 0").unwrap_or_else(|| panic!("{findings:?}"));
    assert!(senders
        .fix
        .as_deref()
        .unwrap()
        .contains("max_wal_senders = 10"));
    assert!(
        problem("replication connection fails").is_some(),
        "{findings:?}"
    );
    assert!(
        problem("max_replication_slots = 0").is_some(),
        "{findings:?}"
    );
    let (ok, text) = run_check(&conninfo);
    assert!(!ok, "check must exit non-zero:\n{text}");
    assert!(text.contains("PROBLEM wal_level = minimal"), "{text}");
    assert!(text.contains("cannot serve a standby"), "{text}");
}

#[tokio::test]
async fn a_plain_replication_role_gets_notes_with_the_grants_and_passes() {
    let cluster = Cluster::start(
        ClusterOptions::new()
            .hba("local replication,all repl trust")
            .hba("local replication norole trust"),
    );
    cluster
        .execute("CREATE ROLE repl LOGIN REPLICATION; CREATE ROLE norole LOGIN REPLICATION")
        .await;
    let conninfo = cluster.unix_conninfo("repl");
    let findings = check(&Config::parse(&conninfo).unwrap()).await;
    let note = |text: &str| {
        findings
            .iter()
            .find(|f| f.level == Level::Note && f.what.contains(text))
            .unwrap_or_else(|| panic!("no note {text:?}: {findings:?}"))
    };
    assert_eq!(
        note("lacks pg_read_all_stats").fix.as_deref(),
        Some("GRANT pg_monitor TO repl;")
    );
    assert!(note("lacks pg_read_all_settings")
        .fix
        .as_deref()
        .unwrap()
        .contains("GRANT pg_read_all_settings TO repl;"));
    assert!(
        !findings.iter().any(|f| f.level == Level::Problem),
        "a plain REPLICATION role with a SQL login can clone: {findings:?}"
    );
    let (ok, text) = run_check(&conninfo);
    assert!(ok, "check must exit 0:\n{text}");
    assert!(
        text.contains("note    role repl lacks pg_read_all_stats"),
        "{text}"
    );
    assert!(text.contains("fix: GRANT pg_monitor TO repl;"), "{text}");
    assert!(text.contains("this primary can serve a standby"), "{text}");

    // With pg_monitor the notes become ok lines.
    cluster.execute("GRANT pg_monitor TO repl").await;
    let (ok, text) = run_check(&conninfo);
    assert!(ok, "check must exit 0:\n{text}");
    assert!(!text.contains("note    role repl"), "{text}");
    assert!(
        text.contains("ok      role repl has the privileges of pg_read_all_stats"),
        "{text}"
    );

    // A role that may only replicate: the clone works, `status` would not; a warning
    // with the pg_hba.conf fix, and still exit 0.
    let (ok, text) = run_check(&cluster.unix_conninfo("norole"));
    assert!(ok, "check must exit 0:\n{text}");
    assert!(
        text.contains("WARNING a SQL login to database postgres fails"),
        "{text}"
    );
    assert!(
        text.contains("pg_hba.conf") && text.contains("local  postgres  norole  scram-sha-256"),
        "{text}"
    );
}
