//! receive_wal against real servers: byte-for-byte equality with the server's pg_wal
//! (and, on 15, with pg_receivewal), pg_waldump on our files, resume after a kill,
//! end position with synchronous mode, compression, reconnection.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use pgwire_repl::{Lsn, ReplicationClient};
use walstream::{receive_wal, Compression, EndReason, ReceiveOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_stream_under_load_equals_server_segments() {
    let primary = start_primary();
    let config = primary.config(primary.superuser());
    let mut client = ReplicationClient::connect(&config).await.unwrap();
    assert!(
        walstream::slot::create_physical_slot_if_not_exists(&mut client, "ours")
            .await
            .unwrap()
    );
    // if-not-exists: a second creation is tolerated.
    assert!(
        !walstream::slot::create_physical_slot_if_not_exists(&mut client, "ours")
            .await
            .unwrap()
    );
    walstream::slot::create_physical_slot_if_not_exists(&mut client, "theirs")
        .await
        .unwrap();
    // Create and drop.
    walstream::slot::create_physical_slot_if_not_exists(&mut client, "short_lived")
        .await
        .unwrap();
    walstream::slot::drop_slot(&mut client, "short_lived", false)
        .await
        .unwrap();
    client.close().await.unwrap();
    assert_eq!(
        primary
            .query_value(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'short_lived'"
            )
            .await
            .as_deref(),
        Some("0")
    );
    // RESERVE_WAL: the slot holds WAL from its creation on.
    let reserved = lsn(
        &primary,
        "SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = 'ours'",
    )
    .await;

    let dir = tempfile::tempdir().unwrap();
    let wal = dir.path().join("wal");
    let mut options = ReceiveOptions::new(&wal);
    options.slot = Some("ours".into());
    options.status_interval = Some(Duration::from_millis(500));
    let (stop, shutdown) = shutdown_pair();
    let receiver = {
        let config = config.clone();
        let options = options.clone();
        tokio::spawn(async move { receive_wal(&config, &options, shutdown).await })
    };

    // Load while streaming: about 3 segments, records crossing segment boundaries.
    for _ in 0..3 {
        generate_wal(&primary, 30_000).await;
        switch_wal(&primary).await;
    }
    let end = switch_wal(&primary).await;
    let last = segment_name(1, Lsn(end.0 - 1));
    wait_for("our last complete segment", Duration::from_secs(60), || {
        wal.join(&last).is_file()
    })
    .await;
    stop.send(true).unwrap();
    let summary = receiver.await.unwrap().unwrap();
    assert_eq!(summary.end_reason, EndReason::Shutdown);
    assert!(summary.segments_completed >= 4, "{summary:?}");
    assert!(summary.flushed >= end, "{summary:?}");

    let compared = assert_same_as_server(&wal, &primary.data_dir().join("pg_wal"));
    assert!(compared >= 4, "compared only {compared} segments");
    assert_no_gap(&wal);
    if primary.major() >= 15 {
        // An empty directory starts at the slot's restart_lsn (READ_REPLICATION_SLOT).
        let first = complete_segments(&wal).into_keys().next().unwrap();
        assert_eq!(first, segment_name(1, reserved));
    }

    // The flush feedback moved the slot.
    let restart: Lsn = lsn(
        &primary,
        "SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = 'ours'",
    )
    .await;
    assert!(restart >= Lsn(end.0 - 1), "restart_lsn {restart} < {end}");

    if primary.major() == 15 {
        let bin = std::path::Path::new("/usr/lib/postgresql/15/bin");
        // pg_receivewal from the other slot over the same range.
        let theirs = dir.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        let out = Command::new(bin.join("pg_receivewal"))
            .arg("-D")
            .arg(&theirs)
            .args(["-S", "theirs", "--no-loop", "-n"])
            .arg(format!("--endpos={end}"))
            .arg("-d")
            .arg(primary.unix_conninfo(primary.superuser()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_receivewal failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ours = complete_segments(&wal);
        let theirs_files = complete_segments(&theirs);
        assert!(!theirs_files.is_empty());
        for (name, path) in &theirs_files {
            let mine = ours
                .get(name)
                .unwrap_or_else(|| panic!("pg_receivewal completed {name}, we did not"));
            assert!(
                std::fs::read(path).unwrap() == std::fs::read(mine).unwrap(),
                "{name} differs from pg_receivewal's"
            );
        }
        // pg_waldump reads our files.
        let first = ours.keys().next().unwrap().clone();
        let out = Command::new(bin.join("pg_waldump"))
            .arg("--path")
            .arg(&wal)
            .args([&first, &last])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_waldump failed on our files: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("rmgr: Heap"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_receiver_resumes_from_the_partial_without_gap() {
    let primary = start_primary();
    let config = primary.config(primary.superuser());
    let dir = tempfile::tempdir().unwrap();
    let wal = dir.path().join("wal");
    let options = ReceiveOptions::new(&wal);

    // Kill it while it writes a segment: once a complete segment is there, more WAL
    // is in flight into the next one. A kill that lands just between completing one
    // segment and starting the next leaves no partial: then run it again and retry.
    let mut partials = Vec::new();
    for _attempt in 0..5 {
        let first = {
            let config = config.clone();
            let options = options.clone();
            tokio::spawn(
                async move { receive_wal(&config, &options, std::future::pending()).await },
            )
        };
        generate_wal(&primary, 20_000).await;
        switch_wal(&primary).await;
        wait_for("a complete segment", Duration::from_secs(60), || {
            !complete_segments(&wal).is_empty()
        })
        .await;
        generate_wal(&primary, 10_000).await;
        wait_for("a partial segment", Duration::from_secs(60), || {
            files(&wal).keys().any(|n| n.ends_with(".partial"))
        })
        .await;
        first.abort();
        let _ = first.await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        partials = files(&wal)
            .into_keys()
            .filter(|n| n.ends_with(".partial"))
            .collect();
        if !partials.is_empty() {
            break;
        }
    }
    assert!(
        !partials.is_empty(),
        "no kill left a partial segment in 5 attempts"
    );

    generate_wal(&primary, 10_000).await;
    let end = segment_end(switch_wal(&primary).await);
    let mut options = options.clone();
    options.endpos = Some(end);
    options.no_loop = true;
    let summary = receive_wal(&config, &options, std::future::pending())
        .await
        .unwrap();
    assert_eq!(summary.end_reason, EndReason::EndPos);
    // The partials were completed under their own names.
    for partial in &partials {
        let done = partial.trim_end_matches(".partial");
        assert!(wal.join(done).is_file(), "{done} was not completed");
    }
    let compared = assert_same_as_server(&wal, &primary.data_dir().join("pg_wal"));
    assert!(compared >= 2);
    assert_no_gap(&wal);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpos_synchronous_leaves_one_partial_and_moves_the_slot() {
    let primary = start_primary();
    let config = primary.config(primary.superuser());
    switch_wal(&primary).await;
    generate_wal(&primary, 2_000).await;
    let end = lsn(&primary, "SELECT pg_current_wal_flush_lsn()").await;
    let dir = tempfile::tempdir().unwrap();
    let wal = dir.path().join("wal");
    let mut options = ReceiveOptions::new(&wal);
    options.slot = Some("sync_slot".into());
    options.create_slot = true;
    options.synchronous = true;
    options.no_loop = true;
    options.endpos = Some(end);
    let summary = receive_wal(&config, &options, std::future::pending())
        .await
        .unwrap();
    assert_eq!(summary.end_reason, EndReason::EndPos);
    assert!(summary.flushed >= end, "{summary:?}");
    let names: Vec<String> = files(&wal).into_keys().collect();
    let partials = names.iter().filter(|n| n.ends_with(".partial")).count();
    assert_eq!(partials, 1, "{names:?}");
    let restart: Lsn = lsn(
        &primary,
        "SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = 'sync_slot'",
    )
    .await;
    assert!(
        restart >= end,
        "slot restart_lsn {restart} did not reach {end}"
    );

    // Contradictory options are refused up front.
    let mut bad = options.clone();
    bad.dir_options.sync = false;
    let err = receive_wal(&config, &bad, std::future::pending())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), walstream::ErrorKind::Usage);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_no_sync_segments_decompress_to_the_server_files() {
    let primary = start_primary();
    let config = primary.config(primary.superuser());
    let dir = tempfile::tempdir().unwrap();
    let wal = dir.path().join("wal");
    let start = lsn(&primary, "SELECT pg_current_wal_lsn()").await;
    let mut options = ReceiveOptions::new(&wal);
    options.dir_options.sync = false;
    options.dir_options.compression = Compression::Zstd { level: 3 };
    let (stop, shutdown) = shutdown_pair();
    let receiver = tokio::spawn(async move { receive_wal(&config, &options, shutdown).await });
    let name = segment_name(1, start);
    wait_for("the receiver to start", Duration::from_secs(30), || {
        wal.join(format!("{name}.partial")).is_file()
    })
    .await;
    generate_wal(&primary, 5_000).await;
    switch_wal(&primary).await;
    let packed_path = wal.join(format!("{name}.zst"));
    wait_for("the compressed segment", Duration::from_secs(30), || {
        packed_path.is_file()
    })
    .await;
    stop.send(true).unwrap();
    receiver.await.unwrap().unwrap();
    let packed = std::fs::read(&packed_path).unwrap();
    let server = std::fs::read(primary.data_dir().join("pg_wal").join(&name)).unwrap();
    assert!(zstd::decode_all(&packed[..]).unwrap() == server);
    assert!(!wal.join(format!("{name}.partial")).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_a_server_restart_and_continues_without_gap() {
    let mut primary = start_primary();
    let config = primary.config(primary.superuser());
    let dir = tempfile::tempdir().unwrap();
    let wal = dir.path().join("wal");
    let mut options = ReceiveOptions::new(&wal);
    options.reconnect = walstream::ReconnectPolicy::default().interval(Duration::from_millis(200));
    let (stop, shutdown) = shutdown_pair();
    let receiver = {
        let config = config.clone();
        let options = options.clone();
        tokio::spawn(async move { receive_wal(&config, &options, shutdown).await })
    };
    generate_wal(&primary, 5_000).await;
    wait_for("a partial segment", Duration::from_secs(30), || {
        files(&wal).keys().any(|n| n.ends_with(".partial"))
    })
    .await;
    // Fast shutdown: the walsender ends with COPY 0, then the server is away for a
    // moment; the receiver must come back by itself.
    primary = tokio::task::spawn_blocking(move || {
        primary.restart();
        primary
    })
    .await
    .unwrap();
    generate_wal(&primary, 5_000).await;
    let end = switch_wal(&primary).await;
    let last = segment_name(1, Lsn(end.0 - 1));
    wait_for(
        "the last segment after the restart",
        Duration::from_secs(60),
        || wal.join(&last).is_file(),
    )
    .await;
    stop.send(true).unwrap();
    let summary = receiver.await.unwrap().unwrap();
    assert!(summary.reconnects >= 1, "{summary:?}");
    assert_same_as_server(&wal, &primary.data_dir().join("pg_wal"));
    assert_no_gap(&wal);
}
