//! `clone-standby clone` end to end against real primaries (version from PGREPL_TEST_PG):
//! a standby cloned under write load starts, streams, catches up and holds the same data.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::repo::start_load;
use common::{bin, free_port, run, scratch, standby_config, table_digest, text, StandbyGuard};
use pgwire_repl::SqlClient;
use testkit::{Cluster, ClusterOptions};

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
    let standby = standby_config(&pgdata, "postgres");
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
    // Once a server has run on it, verify says the directory changed since the backup
    // (as expected), not that the backup is damaged.
    let verify = run(&["verify", "--pgdata", pgdata.to_str().unwrap()]);
    assert!(!verify.status.success(), "{}", text(&verify));
    assert!(
        text(&verify).contains("has changed since the backup"),
        "{}",
        text(&verify)
    );
    assert!(!text(&verify).contains("damaged"), "{}", text(&verify));
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

/// Runs a shell command line as the test's user, failing the test with its output.
fn shell(line: &str) {
    let output = Command::new("sh").arg("-c").arg(line).output().unwrap();
    assert!(output.status.success(), "{line}:\n{}", text(&output));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tar_format_clone_restores_with_tar_and_zstd_or_gzip_into_a_server_that_starts() {
    let primary = Cluster::start(ClusterOptions::new());
    primary
        .execute(
            "CREATE TABLE t AS SELECT g, repeat('z', 300) AS pad FROM generate_series(1, 30000) g",
        )
        .await;
    let work = scratch();
    let target = work.path().join("archives");
    // Server compression exists from 15 on; there the archives are stored as they arrive.
    // The 16-18 servers installed here (npm builds) lack zstd and lz4: gzip there.
    let compression = match primary.major() {
        13 | 14 => None,
        15 => Some(("server-zstd", "base.tar.zst", "zstd -dc")),
        _ => Some(("server-gzip", "base.tar.gz", "gzip -dc")),
    };
    let compressed = compression.is_some();
    let mut args = vec![
        "clone",
        "--source",
        &primary.unix_conninfo(primary.superuser()),
        "--pgdata",
        target.to_str().unwrap(),
        "--format",
        "tar",
        "--no-sync",
        "--json",
    ]
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>();
    if let Some((method, _, _)) = compression {
        args.extend(["--compress".into(), method.into()]);
    }
    let output = common::run_async(args).await;
    assert!(output.status.success(), "{}", text(&output));
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let base = target.join(compression.map_or("base.tar", |(_, name, _)| name));
    let base_size = base.metadata().unwrap().len();
    if compressed {
        assert!(!target.join("base.tar").exists());
        assert!(
            base_size * 4 < summary["bytes"].as_u64().unwrap(),
            "stored compressed: {base_size} bytes for {summary}"
        );
    } else {
        assert!(base_size > 1 << 20);
    }
    assert!(target.join("backup_manifest").exists());
    // Streamed WAL is packed into pg_wal.tar, as pg_basebackup -Ft -X stream does.
    assert!(
        !target.join("pg_wal").exists(),
        "no loose WAL directory is left"
    );
    let mut wal_tar = tar::Archive::new(std::fs::File::open(target.join("pg_wal.tar")).unwrap());
    let segments: Vec<String> = wal_tar
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .filter(|n| !n.starts_with("archive_status/"))
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

    // Restored with the ordinary tools, the data directory starts and holds the data.
    let data = work.path().join("restored");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    if let Some((_, _, decompress)) = compression {
        shell(&format!(
            "{decompress} {} | tar -xf - -C {}",
            base.display(),
            data.display()
        ));
    } else {
        shell(&format!("tar -xf {} -C {}", base.display(), data.display()));
    }
    shell(&format!(
        "tar -xf {} -C {}",
        target.join("pg_wal.tar").display(),
        data.join("pg_wal").display()
    ));
    let restored = Cluster::start_on_data_dir(&data, ClusterOptions::new());
    assert_eq!(
        table_digest(&restored.config(restored.superuser()), "t").await,
        table_digest(&primary.config(primary.superuser()), "t").await
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
