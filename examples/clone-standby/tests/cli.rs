//! Command-line behaviour on real servers (version from PGREPL_TEST_PG): options that
//! cannot work together are refused, PG* variables alone are enough, and a password
//! file with loose permissions is reported as libpq reports it.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::{bin, run, scratch, text};
use testkit::{Cluster, ClusterOptions};

#[test]
fn options_that_cannot_work_together_are_refused_before_connecting() {
    let work = scratch();
    let pgdata = work.path().join("standby");
    let target = pgdata.to_str().unwrap();
    // Nothing listens here: a refusal must come before any connection attempt.
    let source = "host=/nonexistent port=1";
    let output = run(&[
        "clone",
        "--source",
        source,
        "--pgdata",
        target,
        "--no-recovery-conf",
        "--start",
    ]);
    assert!(!output.status.success());
    assert!(
        text(&output).contains("--no-recovery-conf"),
        "{}",
        text(&output)
    );
    let output = run(&[
        "clone", "--source", source, "--pgdata", target, "--format", "tar", "--start",
    ]);
    assert!(!output.status.success());
    assert!(
        text(&output).contains("--start needs --format plain"),
        "{}",
        text(&output)
    );
    let output = run(&[
        "clone",
        "--source",
        source,
        "--pgdata",
        target,
        "--start-timeout",
        "5",
    ]);
    assert!(!output.status.success(), "--start-timeout needs --start");
    assert!(!pgdata.exists(), "a refused command writes nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_variables_alone_name_the_source_and_a_loose_password_file_is_reported() {
    let cluster = Cluster::start(
        ClusterOptions::new()
            .hba("local replication,all pwuser scram-sha-256")
            .hba("host replication,all pwuser 127.0.0.1/32 scram-sha-256"),
    );
    cluster
        .execute("SET password_encryption = 'scram-sha-256'; CREATE ROLE pwuser LOGIN REPLICATION PASSWORD 'secret'")
        .await;
    cluster
        .execute("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g")
        .await;
    let work = scratch();
    let passfile = work.path().join("pgpass");
    std::fs::write(&passfile, "*:*:*:pwuser:secret\n").unwrap();
    std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(0o644)).unwrap();
    let with_env = |command: &mut Command| {
        command
            .env("PGHOST", cluster.socket_dir())
            .env("PGPORT", cluster.port().to_string())
            .env("PGUSER", "pwuser")
            .env("PGPASSFILE", &passfile)
            .env_remove("PGPASSWORD")
            .env_remove("PGSERVICE");
    };

    // Group- and world-readable: ignored, with libpq's warning, so authentication fails.
    let mut identify = Command::new(bin());
    identify.arg("identify");
    with_env(&mut identify);
    let output = identify.output().unwrap();
    assert!(!output.status.success(), "{}", text(&output));
    assert!(
        text(&output).contains("has group or world access"),
        "the ignored password file must be reported:\n{}",
        text(&output)
    );

    // Private: used. No --source at all; the variables say everything.
    std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(0o600)).unwrap();
    let output = identify.output().unwrap();
    assert!(output.status.success(), "{}", text(&output));
    assert!(text(&output).contains("system id"), "{}", text(&output));
    let pgdata = work.path().join("clone");
    let mut clone = Command::new(bin());
    clone.args(["clone", "--no-sync", "--pgdata"]).arg(&pgdata);
    with_env(&mut clone);
    let output = tokio::task::spawn_blocking(move || clone.output().unwrap())
        .await
        .unwrap();
    assert!(output.status.success(), "{}", text(&output));
    assert!(pgdata.join("PG_VERSION").exists());

    // receive-wal never writes into a server's own pg_wal (nor anywhere inside a data
    // directory): refused before connecting.
    let live_wal = cluster.data_dir().join("pg_wal");
    let before: Vec<_> = std::fs::read_dir(&live_wal)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    let output = run(&[
        "receive-wal",
        "--source",
        "host=/nonexistent port=1",
        "--directory",
        live_wal.to_str().unwrap(),
        "--no-loop",
    ]);
    assert!(!output.status.success());
    assert!(
        text(&output).contains("lies inside a PostgreSQL data directory"),
        "{}",
        text(&output)
    );
    let after: Vec<_> = std::fs::read_dir(&live_wal)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(after
        .iter()
        .all(|name| before.contains(name) || !name.to_string_lossy().ends_with(".partial")));
}
