//! `clone-standby backup`, `list`, `verify --repo` and `restore` end to end against real
//! primaries (version from PGREPL_TEST_PG), on a `file://` repository: what needs no
//! object store. The same on a real S3 store (Garage) is in `repo_garage.rs`.

mod common;

use common::repo::{round_trip_under_load, run_with, Store};
use common::{free_port, scratch, standby_config, table_digest, text, StandbyGuard};
use testkit::{Cluster, ClusterOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_in_a_file_repository_restores_into_a_standby_with_equal_data() {
    let dir = scratch();
    let store = Store {
        url: format!("file://{}/repo", dir.path().display()),
        env: vec![],
    };
    round_trip_under_load(store).await;
}

/// Flips one byte in the middle of a file.
fn flip_byte(path: &std::path::Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_missing_and_foreign_backups_are_refused_by_name() {
    let primary = Cluster::start(ClusterOptions::new());
    primary
        .execute("CREATE TABLE t AS SELECT g, md5(g::text) AS m FROM generate_series(1, 50000) g")
        .await;
    let source = primary.unix_conninfo(primary.superuser());
    let dir = scratch();
    let root = dir.path().join("repo");
    let store = Store {
        url: format!("file://{}", root.display()),
        env: vec![],
    };
    for label in ["good", "damaged"] {
        let out = run_with(
            &store,
            &[
                "backup", "--source", &source, "--repo", &store.url, "--label", label,
            ],
        )
        .await;
        assert!(out.status.success(), "{}", text(&out));
    }

    // A flipped byte in a stored archive: verify and restore name it and fail.
    flip_byte(&root.join("backups/damaged/base.tar.zst"));
    let verify = run_with(
        &store,
        &["verify", "--repo", &store.url, "--backup", "damaged"],
    )
    .await;
    assert!(!verify.status.success(), "{}", text(&verify));
    let work = scratch();
    let target = work.path().join("restored");
    let restore = run_with(
        &store,
        &[
            "restore",
            "--repo",
            &store.url,
            "--backup",
            "damaged",
            "--pgdata",
            target.to_str().unwrap(),
        ],
    )
    .await;
    assert!(!restore.status.success(), "{}", text(&restore));
    assert!(!target.exists(), "a failed restore left {target:?} behind");
    // The good backup is unaffected.
    let verify = run_with(
        &store,
        &["verify", "--repo", &store.url, "--backup", "good"],
    )
    .await;
    assert!(verify.status.success(), "{}", text(&verify));

    // A truncated archive is named before anything is decompressed.
    let archive = root.join("backups/good/base.tar.zst");
    let len = std::fs::metadata(&archive).unwrap().len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&archive)
        .unwrap();
    file.set_len(len - 100).unwrap();
    let verify = run_with(
        &store,
        &["verify", "--repo", &store.url, "--backup", "good"],
    )
    .await;
    assert!(!verify.status.success());
    assert!(
        text(&verify).contains("backups/good/base.tar.zst"),
        "{}",
        text(&verify)
    );

    // Without its commit record a backup does not exist.
    std::fs::remove_file(root.join("backups/good/backup.json")).unwrap();
    let list = run_with(&store, &["list", "--repo", &store.url, "--json"]).await;
    let listed: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let labels: Vec<_> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["label"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(labels, vec!["damaged".to_string()]);
    let restore = run_with(
        &store,
        &[
            "restore",
            "--repo",
            &store.url,
            "--backup",
            "good",
            "--pgdata",
            target.to_str().unwrap(),
        ],
    )
    .await;
    assert!(!restore.status.success());
    assert!(
        text(&restore).contains("no committed backup"),
        "{}",
        text(&restore)
    );

    // Another cluster may not write into this repository. (Clusters of one initdb
    // template share a system identifier; one without data checksums has its own.)
    let other = Cluster::start(ClusterOptions::new().data_checksums(false));
    let system_id = "SELECT system_identifier::text FROM pg_control_system()";
    assert_ne!(
        other.query_value(system_id).await,
        primary.query_value(system_id).await
    );
    let foreign = run_with(
        &store,
        &[
            "backup",
            "--source",
            &other.unix_conninfo(other.superuser()),
            "--repo",
            &store.url,
        ],
    )
    .await;
    assert!(!foreign.status.success());
    assert!(
        text(&foreign).contains("belongs to the cluster with system identifier"),
        "{}",
        text(&foreign)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tablespace_is_stored_and_restored_only_where_it_is_mapped() {
    let work = scratch();
    let primary = Cluster::start(ClusterOptions::new());
    let location = work.path().join("ts");
    std::fs::create_dir(&location).unwrap();
    common::give_like(&location, primary.data_dir());
    primary
        .execute(&format!(
            "CREATE TABLESPACE ts2 LOCATION '{}'",
            location.display()
        ))
        .await;
    primary
        .execute("CREATE TABLE in_ts TABLESPACE ts2 AS SELECT g, md5(g::text) AS m FROM generate_series(1, 30000) g")
        .await;
    let oid = primary
        .query_value("SELECT oid FROM pg_tablespace WHERE spcname = 'ts2'")
        .await
        .unwrap();
    let source = primary.unix_conninfo(primary.superuser());
    let store = Store {
        url: format!("file://{}/repo", work.path().display()),
        env: vec![],
    };
    let out = run_with(
        &store,
        &[
            "backup", "--source", &source, "--repo", &store.url, "--json",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let record: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let objects: Vec<_> = record["archives"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["object"].as_str().unwrap().to_string())
        .collect();
    assert!(objects.contains(&format!("{oid}.tar.zst")), "{objects:?}");

    // Unmapped, the tablespace would go to the source's live directory: refused, and the
    // source's tablespace is untouched.
    let before = common::snapshot(&location);
    let target = work.path().join("restored");
    let refused = run_with(
        &store,
        &[
            "restore",
            "--repo",
            &store.url,
            "--pgdata",
            target.to_str().unwrap(),
        ],
    )
    .await;
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(!target.exists(), "{}", text(&refused));
    assert_eq!(
        before,
        common::snapshot(&location),
        "the source's tablespace changed"
    );

    let mapped = work.path().join("ts-restored");
    let mapping = format!("{}={}", location.display(), mapped.display());
    let out = run_with(
        &store,
        &[
            "restore",
            "--repo",
            &store.url,
            "--pgdata",
            target.to_str().unwrap(),
            "--tablespace-mapping",
            &mapping,
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        std::fs::read_link(target.join(format!("pg_tblspc/{oid}"))).unwrap(),
        mapped
    );
    let verify = run_with(&store, &["verify", "--pgdata", target.to_str().unwrap()]).await;
    assert!(verify.status.success(), "{}", text(&verify));
    assert_eq!(
        before,
        common::snapshot(&location),
        "the source's tablespace changed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_restore_fetches_only_what_changed() {
    let primary = Cluster::start(ClusterOptions::new());
    // New WAL segments zero-filled rather than recycled: the backups carry their WAL
    // segment whole, and a recycled one is full of old (compressible, but not nothing)
    // table data that would drown the measurement.
    primary.execute("ALTER SYSTEM SET wal_recycle = off").await;
    primary.execute("SELECT pg_reload_conf()").await;
    // About 100 MB in eight tables, frozen so that later reads change no page.
    for i in 0..8 {
        primary
            .execute(&format!(
                "CREATE TABLE t{i} AS SELECT g, md5(g::text) || md5((g + {i})::text) AS m \
                 FROM generate_series(1, 120000) g"
            ))
            .await;
    }
    primary.execute("VACUUM (FREEZE, ANALYZE)").await;
    primary.execute("CHECKPOINT").await;
    let source = primary.unix_conninfo(primary.superuser());
    let dir = scratch();
    let store = Store {
        url: format!("file://{}/repo", dir.path().display()),
        env: vec![],
    };
    // The first backup zstd, the second lz4: both cut into frames.
    let backup = |label: &'static str, compress: &'static str| {
        let (store, source) = (&store, &source);
        async move {
            let out = run_with(
                store,
                &[
                    "backup",
                    "--source",
                    source,
                    "--repo",
                    &store.url,
                    "--compress",
                    compress,
                    "--label",
                    label,
                    "--json",
                ],
            )
            .await;
            assert!(out.status.success(), "backup {label}:\n{}", text(&out));
        }
    };
    backup("one", "client-zstd").await;
    assert!(dir
        .path()
        .join("repo/backups/one/base.tar.zst.index.json")
        .exists());

    let work = scratch();
    let pgdata = work.path().join("restored");
    let pgdata_text = pgdata.to_str().unwrap().to_string();
    let restore = run_with(
        &store,
        &[
            "restore",
            "--repo",
            &store.url,
            "--backup",
            "one",
            "--pgdata",
            &pgdata_text,
        ],
    )
    .await;
    assert!(restore.status.success(), "restore:\n{}", text(&restore));
    // A file the backup does not hold goes away.
    std::fs::write(pgdata.join("base/stray_file"), b"stray").unwrap();

    primary
        .execute("UPDATE t3 SET m = upper(m) WHERE g <= 20000")
        .await;
    primary.execute("CHECKPOINT").await;
    backup("two", "client-lz4").await;
    let verify = run_with(&store, &["verify", "--repo", &store.url, "--backup", "two"]).await;
    assert!(verify.status.success(), "verify two:\n{}", text(&verify));

    let delta = run_with(
        &store,
        &[
            "restore",
            "--repo",
            &store.url,
            "--backup",
            "two",
            "--pgdata",
            &pgdata_text,
            "--delta",
            "--json",
        ],
    )
    .await;
    assert!(delta.status.success(), "restore --delta:\n{}", text(&delta));
    let summary: serde_json::Value =
        serde_json::from_slice(&delta.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&delta)));
    let files = summary["files"].as_u64().unwrap();
    let reused = summary["files_reused"].as_u64().unwrap();
    let read = summary["bytes_read"].as_u64().unwrap();
    let archives = summary["archive_bytes"].as_u64().unwrap();
    eprintln!("delta: {summary}");
    assert!(reused * 10 > files * 9, "most files reused: {summary}");
    assert!(summary["files_written"].as_u64().unwrap() > 0, "{summary}");
    assert!(
        read * 100 < archives * 40,
        "downloaded {read} of {archives}: {summary}"
    );
    assert!(!pgdata.join("base/stray_file").exists());

    let verify = common::run(&["verify", "--pgdata", &pgdata_text]);
    assert!(
        verify.status.success(),
        "verify --pgdata:\n{}",
        text(&verify)
    );

    // Into a new directory, a delta restore is a full one.
    let fresh = work.path().join("fresh");
    let fresh_text = fresh.to_str().unwrap();
    let full = run_with(
        &store,
        &[
            "restore", "--repo", &store.url, "--backup", "two", "--pgdata", fresh_text, "--delta",
            "--json",
        ],
    )
    .await;
    assert!(
        full.status.success(),
        "restore --delta into a new directory:\n{}",
        text(&full)
    );
    let summary: serde_json::Value = serde_json::from_slice(&full.stdout).unwrap();
    assert_eq!(summary["files_reused"], 0, "{summary}");
    assert_eq!(summary["bytes_read"], summary["archive_bytes"], "{summary}");
    let verify = common::run(&["verify", "--pgdata", fresh_text]);
    assert!(
        verify.status.success(),
        "verify --pgdata (fresh):\n{}",
        text(&verify)
    );

    // A delta of the same backup again, this time started as a standby: it fetches
    // almost nothing and starts with the changed data.
    let guard = StandbyGuard {
        pg_ctl: primary.bin("pg_ctl"),
        pgdata: pgdata.clone(),
    };
    let port = free_port().to_string();
    let again = run_with(
        &store,
        &[
            "restore",
            "--repo",
            &store.url,
            "--backup",
            "two",
            "--pgdata",
            &pgdata_text,
            "--delta",
            "--json",
            "--standby",
            "--source",
            &source,
            "--start",
            "--standby-port",
            &port,
            "--pg-ctl",
            primary.bin("pg_ctl").to_str().unwrap(),
        ],
    )
    .await;
    assert!(
        again.status.success(),
        "second restore --delta:\n{}",
        text(&again)
    );
    let summary: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(summary["started"], true, "{summary}");
    assert!(
        summary["bytes_read"].as_u64().unwrap() < read,
        "the second delta fetched less: {summary}"
    );
    let standby = standby_config(&pgdata, "postgres");
    let primary_config = primary.config(primary.superuser());
    for table in ["t3", "t5"] {
        assert_eq!(
            table_digest(&primary_config, table).await,
            table_digest(&standby, table).await,
            "table {table} differs"
        );
    }

    // Refused: a running server's directory, and another cluster's.
    let running = run_with(
        &store,
        &[
            "restore",
            "--repo",
            &store.url,
            "--pgdata",
            &pgdata_text,
            "--delta",
        ],
    )
    .await;
    assert!(!running.status.success());
    assert!(
        text(&running).contains("postmaster.pid"),
        "{}",
        text(&running)
    );
    let other = work.path().join("other");
    std::fs::create_dir_all(other.join("global")).unwrap();
    std::fs::write(other.join("global/pg_control"), [1u8; 64]).unwrap();
    let foreign = run_with(
        &store,
        &[
            "restore",
            "--repo",
            &store.url,
            "--pgdata",
            other.to_str().unwrap(),
            "--delta",
        ],
    )
    .await;
    assert!(!foreign.status.success());
    assert!(
        text(&foreign).contains("system identifier"),
        "{}",
        text(&foreign)
    );
    assert!(
        other.join("global/pg_control").exists(),
        "a refused directory is untouched"
    );

    // A damaged frame: the delta restore fails, says the directory must be restored
    // again, and leaves it without global/pg_control (never looking complete).
    drop(guard);
    let index: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("repo/backups/one/base.tar.zst.index.json")).unwrap(),
    )
    .unwrap();
    let wal_frame = index["frames"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| {
            f["entries"].as_array().unwrap().iter().any(|e| {
                e["path"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("./")
                    .starts_with("pg_wal/0")
            })
        })
        .expect("a frame with WAL");
    let archive = dir.path().join("repo/backups/one/base.tar.zst");
    let mut bytes = std::fs::read(&archive).unwrap();
    let at = wal_frame["stored_offset"].as_u64().unwrap()
        + wal_frame["stored_len"].as_u64().unwrap() / 2;
    bytes[at as usize] ^= 0x55;
    std::fs::write(&archive, bytes).unwrap();
    let damaged = run_with(
        &store,
        &[
            "restore",
            "--repo",
            &store.url,
            "--backup",
            "one",
            "--pgdata",
            &pgdata_text,
            "--delta",
        ],
    )
    .await;
    assert!(!damaged.status.success(), "{}", text(&damaged));
    assert!(
        text(&damaged).contains("inconsistent"),
        "{}",
        text(&damaged)
    );
    assert!(pgdata.exists(), "the user's directory is kept");
    assert!(!pgdata.join("global/pg_control").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_restore_brings_a_mapped_tablespace_up_to_date() {
    let dir = scratch();
    let primary = Cluster::start(ClusterOptions::new());
    let location = dir.path().join("ts");
    std::fs::create_dir(&location).unwrap();
    common::give_like(&location, primary.data_dir());
    primary
        .execute(&format!(
            "CREATE TABLESPACE ts2 LOCATION '{}'",
            location.display()
        ))
        .await;
    primary
        .execute(
            "CREATE TABLE in_ts TABLESPACE ts2 AS SELECT g AS id, md5(g::text) AS m \
             FROM generate_series(1, 100000) g",
        )
        .await;
    primary.execute("VACUUM (FREEZE, ANALYZE)").await;
    primary.execute("CHECKPOINT").await;
    let source = primary.unix_conninfo(primary.superuser());
    let store = Store {
        url: format!("file://{}/repo", dir.path().display()),
        env: vec![],
    };
    let work = scratch();
    let pgdata = work.path().join("data");
    let mapped = work.path().join("ts_mapped");
    let mapping = format!("{}={}", location.display(), mapped.display());
    let restore = |label: &'static str, delta: bool| {
        let (store, pgdata, mapping) = (&store, &pgdata, &mapping);
        async move {
            let mut args = vec![
                "restore",
                "--repo",
                &store.url,
                "--backup",
                label,
                "--pgdata",
                pgdata.to_str().unwrap(),
                "--tablespace-mapping",
                mapping,
                "--json",
            ];
            if delta {
                args.push("--delta");
            }
            let out = run_with(store, &args).await;
            assert!(out.status.success(), "restore {label}:\n{}", text(&out));
            serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
        }
    };
    for label in ["one", "two"] {
        if label == "two" {
            primary
                .execute("UPDATE in_ts SET m = upper(m) WHERE id <= 1000")
                .await;
            primary.execute("CHECKPOINT").await;
        }
        let out = run_with(
            &store,
            &[
                "backup",
                "--source",
                &source,
                "--repo",
                &store.url,
                "--compress",
                if label == "one" {
                    "client-gzip"
                } else {
                    "none"
                },
                "--label",
                label,
            ],
        )
        .await;
        assert!(out.status.success(), "backup {label}:\n{}", text(&out));
    }
    restore("one", false).await;
    let version_dir = std::fs::read_dir(&mapped)
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    std::fs::write(version_dir.join("stray"), b"x").unwrap();
    std::fs::create_dir(mapped.join("PG_99_other_cluster")).unwrap();

    let summary = restore("two", true).await;
    assert!(summary["files_reused"].as_u64().unwrap() > 900, "{summary}");
    assert!(!version_dir.join("stray").exists(), "extra files go");
    assert!(
        mapped.join("PG_99_other_cluster").exists(),
        "another version's directory in the tablespace location stays"
    );
    let oid_link = std::fs::read_dir(pgdata.join("pg_tblspc"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    assert_eq!(std::fs::read_link(&oid_link).unwrap(), mapped);
    std::fs::remove_dir(mapped.join("PG_99_other_cluster")).unwrap();
    let verify = common::run(&["verify", "--pgdata", pgdata.to_str().unwrap()]);
    assert!(
        verify.status.success(),
        "verify --pgdata:\n{}",
        text(&verify)
    );
}
