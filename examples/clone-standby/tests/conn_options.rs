//! `clone-standby clone` with the connection options operators rely on, on real servers
//! (version from PGREPL_TEST_PG): a `service=` name resolved through PGSERVICEFILE (and
//! resolved the same way by libpq 15's psql), and a host list whose first host is a
//! standby with `target_session_attrs=primary`, before and after a failover.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{bin, scratch, text};
use testkit::oracle::Psql;
use testkit::{Cluster, ClusterOptions, Standby};

/// pg_hba lines for the plain replication role `repl` over the socket.
fn with_repl(options: ClusterOptions) -> ClusterOptions {
    options.hba("local replication,all repl trust")
}

async fn run_with_env(args: Vec<String>, env: Vec<(String, String)>) -> Output {
    tokio::task::spawn_blocking(move || {
        let mut command = Command::new(bin());
        command.args(&args);
        for (name, _) in std::env::vars() {
            if name.starts_with("PG") && !name.starts_with("PGREPL") {
                command.env_remove(name);
            }
        }
        command.envs(env).output().unwrap()
    })
    .await
    .unwrap()
}

fn clone_args(source: &str, pgdata: &Path, slot: &str) -> Vec<String> {
    [
        "clone",
        "--source",
        source,
        "--pgdata",
        pgdata.to_str().unwrap(),
        "--slot",
        slot,
        "--create-slot",
        "--no-sync",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

async fn has_slot(server: &Cluster, slot: &str) -> bool {
    server
        .query_value(&format!(
            "SELECT count(*)::text FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ))
        .await
        .as_deref()
        == Some("1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_is_cloned_through_a_service_name() {
    let primary = Cluster::start(with_repl(ClusterOptions::new()));
    primary.execute("CREATE ROLE repl LOGIN REPLICATION").await;
    let work = scratch();
    let service_file = work.path().join("pg_service.conf");
    std::fs::write(
        &service_file,
        format!(
            "# clone-standby test\n[other]\nhost=/nonexistent\n\n[mysvc]\nhost={}\nport={}\nuser=repl\ndbname=postgres\nsslmode=disable\n",
            primary.socket_dir().display(),
            primary.port()
        ),
    )
    .unwrap();
    let env = vec![(
        "PGSERVICEFILE".to_string(),
        service_file.display().to_string(),
    )];

    // libpq resolves the same file to the same server.
    let libpq = Psql::libpq15().run(
        "service=mysvc",
        "select current_setting('port')",
        &[("PGSERVICEFILE", service_file.to_str().unwrap())],
    );
    assert!(libpq.ok, "psql: {}", libpq.stderr);
    assert_eq!(libpq.stdout, primary.port().to_string());

    let pgdata = work.path().join("standby");
    let output = run_with_env(
        clone_args("service=mysvc", &pgdata, "via_service"),
        env.clone(),
    )
    .await;
    assert!(
        output.status.success(),
        "clone through service=mysvc failed:\n{}",
        text(&output)
    );
    assert!(has_slot(&primary, "via_service").await);
    // primary_conninfo holds the service's options, not its name: the standby's server
    // has no such service file.
    let auto_conf = std::fs::read_to_string(pgdata.join("postgresql.auto.conf")).unwrap();
    let conninfo_line = auto_conf
        .lines()
        .rfind(|l| l.starts_with("primary_conninfo"))
        .unwrap_or_default();
    assert!(!conninfo_line.contains("service"), "{conninfo_line}");
    assert!(
        conninfo_line.contains(&format!("port={}", primary.port())),
        "{conninfo_line}"
    );
    assert!(conninfo_line.contains("user=repl"), "{conninfo_line}");
    let verify = Command::new(bin())
        .args(["verify", "--pgdata", pgdata.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", text(&verify));

    // A service that is not in the file fails before anything is written, as libpq says.
    let missing = work.path().join("missing");
    let output = run_with_env(clone_args("service=nosuch", &missing, "never"), env).await;
    assert!(!output.status.success());
    assert!(
        text(&output).contains("definition of service \"nosuch\" not found"),
        "{}",
        text(&output)
    );
    assert!(!missing.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_session_attrs_primary_finds_the_primary_before_and_after_a_failover() {
    let mut primary =
        Cluster::start(with_repl(ClusterOptions::new()).setting("wal_keep_size", "256MB"));
    primary.execute("CREATE ROLE repl LOGIN REPLICATION").await;
    primary
        .execute("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 1000) g")
        .await;
    let standby = Standby::start(&primary, with_repl(ClusterOptions::new())).await;
    // On PostgreSQL 13 a physical replication connection cannot tell a primary from a
    // standby (no in_hot_standby, no SQL): libpq fails there, and so do we; read-write
    // (checked with SHOW) does the job.
    let attrs = if primary.major() >= 14 {
        "primary"
    } else {
        "read-write"
    };
    let source = format!(
        "host={},{} port={},{} user=repl dbname=postgres sslmode=disable target_session_attrs={attrs}",
        standby.socket_dir().display(),
        primary.socket_dir().display(),
        standby.port(),
        primary.port()
    );
    let work = scratch();

    if primary.major() < 14 {
        let refused = work.path().join("refused");
        let strict = source.replace(
            "target_session_attrs=read-write",
            "target_session_attrs=primary",
        );
        let output = run_with_env(clone_args(&strict, &refused, "never"), vec![]).await;
        assert!(!output.status.success(), "{}", text(&output));
        let message = text(&output);
        assert!(message.contains("pg_is_in_recovery()"), "{message}");
        assert!(
            message.contains("target_session_attrs=read-write"),
            "{message}"
        );
    }

    // The first host is a standby: the clone comes from the primary, all of it.
    let first = work.path().join("first");
    let output = run_with_env(clone_args(&source, &first, "first_clone"), vec![]).await;
    assert!(
        output.status.success(),
        "clone from [standby, primary] failed:\n{}",
        text(&output)
    );
    assert!(
        has_slot(&primary, "first_clone").await,
        "the slot must be on the primary"
    );
    assert!(
        !has_slot(&standby, "first_clone").await,
        "the slot must not be on the standby"
    );
    let auto_conf = std::fs::read_to_string(first.join("postgresql.auto.conf")).unwrap();
    assert!(
        auto_conf.contains(&format!("target_session_attrs={attrs}"))
            || auto_conf.contains(&format!("target_session_attrs=''{attrs}''")),
        "primary_conninfo must keep the host list's target_session_attrs: {auto_conf}"
    );

    // Failover: the primary goes away and the standby is promoted. The same --source
    // now finds the new primary (the old one is unreachable and skipped).
    primary.stop();
    standby.promote();
    let second = work.path().join("second");
    let output = run_with_env(clone_args(&source, &second, "after_failover"), vec![]).await;
    assert!(
        output.status.success(),
        "clone after the failover failed:\n{}",
        text(&output)
    );
    assert!(
        has_slot(&standby, "after_failover").await,
        "the slot must be on the new primary"
    );
    let verify = Command::new(bin())
        .args(["verify", "--pgdata", second.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", text(&verify));
}
