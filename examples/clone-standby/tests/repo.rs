//! `clone-standby backup`, `list`, `verify --repo` and `restore` end to end against real
//! primaries (version from PGREPL_TEST_PG), on a `file://` repository: what needs no
//! object store. The same on a real S3 store (Garage) is in `repo_garage.rs`.

mod common;

use common::repo::{round_trip_under_load, run_with, Store};
use common::{scratch, text};
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
