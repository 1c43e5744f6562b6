//! `clone-standby clone` end to end against real primaries (version from PGREPL_TEST_PG):
//! a standby cloned under write load starts, streams, catches up and holds the same data.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgwire_repl::{Config, SqlClient};
use testkit::{Cluster, ClusterOptions};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_clone-standby")
}

fn run(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("run clone-standby")
}

fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

/// A scratch directory the server's OS user can traverse.
fn scratch() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("pgrepl-clone-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Tables with data, then a background writer until the returned flag is cleared.
async fn start_load(primary: &Cluster) -> (Arc<AtomicBool>, tokio::task::JoinHandle<u64>) {
    primary
        .execute(
            "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint, note text);
             INSERT INTO accounts SELECT g, 0, repeat('n', 200) FROM generate_series(1, 20000) g;
             CREATE TABLE history (id bigserial PRIMARY KEY, account int, delta bigint, at timestamptz DEFAULT now());",
        )
        .await;
    let running = Arc::new(AtomicBool::new(true));
    let flag = running.clone();
    let config = primary.config(primary.superuser());
    let task = tokio::spawn(async move {
        let mut sql = SqlClient::connect(&config).await.expect("load connection");
        let mut transactions = 0u64;
        while flag.load(Ordering::Relaxed) {
            let id = (transactions * 7919) % 20000 + 1;
            sql.batch(&format!(
                "BEGIN; UPDATE accounts SET balance = balance + 1 WHERE id = {id};
                 INSERT INTO history (account, delta) VALUES ({id}, 1); COMMIT;"
            ))
            .await
            .expect("load transaction");
            transactions += 1;
        }
        transactions
    });
    (running, task)
}

async fn table_digest(config: &Config, table: &str) -> String {
    let mut sql = SqlClient::connect(config).await.expect("digest connection");
    let value = sql
        .query_value(&format!(
            "SELECT count(*) || ':' || coalesce(sum(hashtext(t::text)::bigint), 0) FROM {table} t"
        ))
        .await
        .expect("digest query");
    value.unwrap_or_default()
}

/// Stops a standby started by `clone --start` when the test ends, pass or fail.
struct StandbyGuard {
    pg_ctl: PathBuf,
    pgdata: PathBuf,
}

impl Drop for StandbyGuard {
    fn drop(&mut self) {
        let mut command = Command::new(&self.pg_ctl);
        command
            .args(["stop", "-m", "immediate", "-D"])
            .arg(&self.pgdata);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            command.env_clear();
            let status = Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&self.pg_ctl)
                .args(["stop", "-m", "immediate", "-D"])
                .arg(&self.pgdata)
                .output();
            let _ = status;
        } else {
            let _ = command.output();
        }
    }
}

fn standby_config(pgdata: &Path) -> Config {
    let pid = std::fs::read_to_string(pgdata.join("postmaster.pid")).expect("postmaster.pid");
    let lines: Vec<&str> = pid.lines().collect();
    Config::parse(&format!(
        "host={} port={} user=postgres dbname=postgres sslmode=disable",
        lines[4].trim(),
        lines[3].trim()
    ))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_cloned_under_load_streams_and_holds_the_same_data() {
    let primary = Cluster::start(ClusterOptions::new());
    let (running, load) = start_load(&primary).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let work = scratch();
    let pgdata = work.path().join("standby");
    let pgdata_text = pgdata.to_str().unwrap().to_string();
    let port = free_port().to_string();
    let source = primary.unix_conninfo(primary.superuser());
    let _guard = StandbyGuard {
        pg_ctl: primary.bin("pg_ctl"),
        pgdata: pgdata.clone(),
    };
    let output = {
        let args: Vec<String> = [
            "clone",
            "--source",
            &source,
            "--pgdata",
            &pgdata_text,
            "--start",
            "--standby-port",
            &port,
            "--pg-ctl",
            primary.bin("pg_ctl").to_str().unwrap(),
            "--progress",
            "--json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        tokio::task::spawn_blocking(move || Command::new(bin()).args(&args).output().unwrap())
            .await
            .unwrap()
    };
    assert!(output.status.success(), "clone failed:\n{}", text(&output));
    let summary: serde_json::Value =
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&output)));
    assert!(
        summary["verified_files"].as_u64().unwrap() > 500,
        "{summary}"
    );
    assert!(summary["bytes"].as_u64().unwrap() > 10 << 20, "{summary}");
    assert!(
        summary["wal_bytes"].as_u64().unwrap() > 0,
        "WAL was streamed: {summary}"
    );
    assert!(
        summary["standby_replay_lag_bytes"].is_u64(),
        "--start waited for streaming: {summary}"
    );

    // The standby configuration follows pg_basebackup -R.
    assert!(pgdata.join("standby.signal").exists());
    let auto_conf = std::fs::read_to_string(pgdata.join("postgresql.auto.conf")).unwrap();
    assert!(auto_conf.contains("primary_conninfo = '"), "{auto_conf}");
    let mode = std::fs::metadata(pgdata.join("postgresql.auto.conf"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    // Keep writing for a while, then stop and wait for the standby to catch up.
    tokio::time::sleep(Duration::from_secs(1)).await;
    running.store(false, Ordering::Relaxed);
    let transactions = load.await.unwrap();
    assert!(
        transactions > 10,
        "the load ran ({transactions} transactions)"
    );
    let standby = standby_config(&pgdata);
    let primary_config = primary.config(primary.superuser());
    let status = Command::new(bin())
        .args(["status", "--wait", "--timeout", "60", "--primary"])
        .arg(primary.unix_conninfo(primary.superuser()))
        .arg("--standby")
        .arg(standby.to_conninfo_string())
        .output()
        .unwrap();
    assert!(status.status.success(), "status --wait:\n{}", text(&status));
    assert!(
        text(&status).contains("streaming:             yes"),
        "{}",
        text(&status)
    );
    for table in ["accounts", "history"] {
        assert_eq!(
            table_digest(&primary_config, table).await,
            table_digest(&standby, table).await,
            "table {table} differs between primary and standby"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_slot_clone_verifies_and_its_slot_follows_the_standby() {
    let primary = Cluster::start(ClusterOptions::new());
    primary
        .execute(
            "CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 50000) g",
        )
        .await;
    let work = scratch();
    let pgdata = work.path().join("standby");
    let output = run(&[
        "clone",
        "--source",
        &primary.unix_conninfo(primary.superuser()),
        "--pgdata",
        pgdata.to_str().unwrap(),
        "--slot",
        "standby_one",
        "--create-slot",
        "--no-sync",
    ]);
    assert!(output.status.success(), "{}", text(&output));
    let auto_conf = std::fs::read_to_string(pgdata.join("postgresql.auto.conf")).unwrap();
    assert!(
        auto_conf.contains("primary_slot_name = 'standby_one'"),
        "{auto_conf}"
    );
    // The slot exists, holds WAL from the backup's start, and is not in use now.
    let restart = primary
        .query_value(
            "SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = 'standby_one'",
        )
        .await;
    assert!(restart.is_some(), "the named slot must exist");

    // verify agrees with the in-transfer check, and sees a changed file.
    let verify = run(&["verify", "--pgdata", pgdata.to_str().unwrap()]);
    assert!(verify.status.success(), "{}", text(&verify));
    if primary.major() == 15 {
        let verifybackup = Command::new("/usr/lib/postgresql/15/bin/pg_verifybackup")
            .arg(&pgdata)
            .output()
            .unwrap();
        assert!(
            verifybackup.status.success(),
            "pg_verifybackup: {}",
            text(&verifybackup)
        );
    }

    // Started as a standby, it streams through the slot and holds the same data.
    let mut standby = Cluster::start_on_data_dir(&pgdata, ClusterOptions::new());
    let standby_config = standby.config(standby.superuser());
    let mut streaming = false;
    for _ in 0..100 {
        let active = primary
            .query_value(
                "SELECT active::text FROM pg_replication_slots WHERE slot_name = 'standby_one'",
            )
            .await;
        if active.as_deref() == Some("true") {
            streaming = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        streaming,
        "the standby must stream through its slot:\n{}",
        standby.log()
    );
    primary
        .execute("INSERT INTO t SELECT g, 'late' FROM generate_series(50001, 50100) g")
        .await;
    let target = primary
        .query_value("SELECT pg_current_wal_lsn()::text")
        .await
        .unwrap();
    let mut caught_up = false;
    for _ in 0..100 {
        let mut sql = SqlClient::connect(&standby_config).await.unwrap();
        let replayed = sql
            .query_value(&format!(
                "SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn"
            ))
            .await
            .unwrap();
        if replayed.as_deref() == Some("t") {
            caught_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        caught_up,
        "the standby must replay up to {target}:\n{}",
        standby.log()
    );
    let primary_config = primary.config(primary.superuser());
    assert_eq!(
        table_digest(&primary_config, "t").await,
        table_digest(&standby_config, "t").await
    );
    // pg_checksums only reads a cleanly shut-down cluster (a fresh clone's pg_control says
    // "in production", as pg_basebackup's do): check every page we wrote after a stop.
    standby.stop();
    if primary.major() == 15 {
        let checksums = Command::new("/usr/lib/postgresql/15/bin/pg_checksums")
            .arg("--check")
            .arg("-D")
            .arg(&pgdata)
            .output()
            .unwrap();
        assert!(
            checksums.status.success(),
            "pg_checksums: {}",
            text(&checksums)
        );
        assert!(
            text(&checksums).contains("Bad checksums:  0"),
            "{}",
            text(&checksums)
        );
    }
    drop(standby);
    primary
        .execute("SELECT pg_drop_replication_slot('standby_one')")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_that_fails_midway_exits_non_zero_and_leaves_nothing() {
    let mut primary = Cluster::start(ClusterOptions::new());
    primary.execute("CREATE TABLE big AS SELECT g, repeat('x', 1000) AS pad FROM generate_series(1, 20000) g").await;
    let work = scratch();
    let pgdata = work.path().join("standby");
    let args: Vec<String> = [
        "clone",
        "--source",
        &primary.tcp_conninfo(primary.superuser()),
        "--pgdata",
        pgdata.to_str().unwrap(),
        "--max-rate",
        "1M",
        "--no-sync",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let child = std::thread::spawn(move || Command::new(bin()).args(&args).output().unwrap());
    // Stop the primary while the throttled transfer is running.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(pgdata.exists(), "the clone should be under way");
    primary.stop();
    let output = child.join().unwrap();
    assert!(
        !output.status.success(),
        "a clone whose primary stopped must fail:\n{}",
        text(&output)
    );
    assert!(text(&output).contains("clone failed"), "{}", text(&output));
    assert!(!pgdata.exists(), "the partial clone must be removed");

    // A non-empty target is refused and left alone.
    primary.start_again();
    std::fs::create_dir_all(&pgdata).unwrap();
    std::fs::write(pgdata.join("keep.txt"), b"mine").unwrap();
    let output = run(&[
        "clone",
        "--source",
        &primary.unix_conninfo(primary.superuser()),
        "--pgdata",
        pgdata.to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    assert!(text(&output).contains("not empty"), "{}", text(&output));
    assert_eq!(std::fs::read(pgdata.join("keep.txt")).unwrap(), b"mine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_clone_with_verify_full_writes_a_conninfo_the_standby_can_use() {
    let primary = Cluster::start(
        ClusterOptions::new()
            .tls(true)
            .hba("hostssl replication,all repl 127.0.0.1/32 scram-sha-256"),
    );
    primary.execute("SET password_encryption = 'scram-sha-256'; CREATE ROLE repl LOGIN REPLICATION PASSWORD 'p4ss word'").await;
    let ca = primary.tls_files().unwrap().ca_cert.clone();
    std::fs::set_permissions(&ca, std::fs::Permissions::from_mode(0o644)).unwrap();
    let source = format!(
        "host=localhost hostaddr=127.0.0.1 port={} user=repl password='p4ss word' sslmode=verify-full sslrootcert={} channel_binding=require",
        primary.port(),
        ca.display()
    );
    let work = scratch();
    let pgdata = work.path().join("standby");
    let output = run(&[
        "clone",
        "--source",
        &source,
        "--pgdata",
        pgdata.to_str().unwrap(),
        "--no-sync",
    ]);
    assert!(output.status.success(), "{}", text(&output));
    let auto_conf = std::fs::read_to_string(pgdata.join("postgresql.auto.conf")).unwrap();
    assert!(
        auto_conf.contains("sslmode=''verify-full''") || auto_conf.contains("sslmode=verify-full"),
        "{auto_conf}"
    );
    assert!(auto_conf.contains("channel_binding"), "{auto_conf}");
    assert!(!auto_conf.contains("replication="), "{auto_conf}");
    // The standby's own server version understands every option written: it streams.
    let standby = Cluster::start_on_data_dir(&pgdata, ClusterOptions::new());
    let standby_config = standby.config(standby.superuser());
    let mut status = None;
    for _ in 0..100 {
        let mut sql = SqlClient::connect(&standby_config).await.unwrap();
        // No row until the WAL receiver has started.
        let result = sql
            .query("SELECT status FROM pg_stat_wal_receiver")
            .await
            .unwrap();
        status = result.rows.first().and_then(|row| row[0].clone());
        if status.as_deref() == Some("streaming") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        status.as_deref(),
        Some("streaming"),
        "standby log:\n{}",
        standby.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tar_format_clone_writes_archives_manifest_and_streamed_wal() {
    let primary = Cluster::start(ClusterOptions::new());
    primary
        .execute("CREATE TABLE t AS SELECT g FROM generate_series(1, 10000) g")
        .await;
    let work = scratch();
    let target = work.path().join("archives");
    let output = run(&[
        "clone",
        "--source",
        &primary.unix_conninfo(primary.superuser()),
        "--pgdata",
        target.to_str().unwrap(),
        "--format",
        "tar",
        "--no-sync",
        "--json",
    ]);
    assert!(output.status.success(), "{}", text(&output));
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(target.join("base.tar").metadata().unwrap().len() > 1 << 20);
    assert!(target.join("backup_manifest").exists());
    let segments: Vec<_> = std::fs::read_dir(target.join("pg_wal"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    assert!(
        !segments.is_empty() && segments.iter().all(|n| n.len() == 24),
        "{segments:?}"
    );
    // The WAL from the backup's start to its end is there under final names.
    let start: pgwire_repl::Lsn = summary["start_lsn"].as_str().unwrap().parse().unwrap();
    let first = start.wal_file_name(
        pgwire_repl::TimelineId(1),
        pgwire_repl::WalSegmentSize::DEFAULT,
    );
    assert!(
        segments.contains(&first),
        "{first} missing from {segments:?}"
    );
    assert!(
        !target.join("standby.signal").exists(),
        "tar format writes no standby configuration"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_a_clone_and_removes_the_target() {
    let primary = Cluster::start(ClusterOptions::new());
    primary.execute("CREATE TABLE big AS SELECT g, repeat('x', 1000) AS pad FROM generate_series(1, 20000) g").await;
    let work = scratch();
    let pgdata = work.path().join("standby");
    let mut child = Command::new(bin())
        .args([
            "clone",
            "--source",
            &primary.unix_conninfo(primary.superuser()),
            "--pgdata",
        ])
        .arg(&pgdata)
        .args(["--max-rate", "1M", "--no-sync"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    assert!(pgdata.exists(), "the clone should be under way");
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let started = std::time::Instant::now();
    let output = loop {
        if child.try_wait().unwrap().is_some() {
            break child.wait_with_output().unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "clone did not stop after Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!output.status.success());
    assert!(text(&output).contains("interrupted"), "{}", text(&output));
    assert!(!pgdata.exists(), "Ctrl-C must remove the partial target");
    // The temporary slot went away with the interrupted session.
    let mut slots = None;
    for _ in 0..50 {
        slots = primary
            .query_value("SELECT count(*)::text FROM pg_replication_slots")
            .await;
        if slots.as_deref() == Some("0") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(slots.as_deref(), Some("0"));
}
