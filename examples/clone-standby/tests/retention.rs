//! `clone-standby delete` (retention) on a file:// repository holding real backups of a
//! real server (PGREPL_TEST_PG) and a WAL archive laid out by `pgrepo::walnames`.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::repo::{run_with, Store};
use common::{scratch, snapshot, text};
use pgrepo::walnames;
use pgwire_repl::types::wal_file_name;
use pgwire_repl::{Lsn, TimelineId, WalSegmentSize};
use testkit::{Cluster, ClusterOptions};

/// Every object under the repository directory, relative to it.
fn objects(root: &Path) -> BTreeSet<String> {
    snapshot(root)
        .into_iter()
        .filter(|(_, content)| content != b"<dir>")
        .map(|(path, _)| {
            path.strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

async fn delete(store: &Store, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["delete", "--repo", &store.url, "--json"];
    args.extend_from_slice(extra);
    let out = run_with(store, &args).await;
    assert!(out.status.success(), "delete {extra:?}:\n{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
}

async fn labels(store: &Store) -> Vec<String> {
    let out = run_with(store, &["list", "--repo", &store.url, "--json"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    listed
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["label"].as_str().unwrap().to_string())
        .collect()
}

fn strings(value: &serde_json::Value) -> Vec<String> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_old_backups_then_exactly_the_wal_below_the_oldest_kept() {
    let primary = Cluster::start(ClusterOptions::new());
    let source = primary.unix_conninfo(primary.superuser());
    let work = scratch();
    let root = work.path().join("repo");
    let store = Store {
        url: format!("file://{}", root.display()),
        env: Vec::new(),
    };
    primary.execute("CREATE TABLE t (i int)").await;
    for label in ["a", "b", "c"] {
        primary
            .execute("INSERT INTO t VALUES (1); SELECT pg_switch_wal();")
            .await;
        let out = run_with(
            &store,
            &[
                "backup",
                "--source",
                &source,
                "--repo",
                &store.url,
                "--label",
                label,
                "--compress",
                "none",
            ],
        )
        .await;
        assert!(out.status.success(), "backup {label}:\n{}", text(&out));
    }
    let size: u64 = primary
        .query_value("SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'")
        .await
        .unwrap()
        .parse()
        .unwrap();
    let segment_size = WalSegmentSize::new(size).unwrap();
    let list = run_with(&store, &["list", "--repo", &store.url, "--json"]).await;
    let listed: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let start = |i: usize| -> u64 {
        let lsn: Lsn = listed[i]["start_lsn"].as_str().unwrap().parse().unwrap();
        lsn.segment_number(segment_size)
    };
    let (a, b, c) = (start(0), start(1), start(2));
    assert!(
        a < b && b < c,
        "backups start in different segments: {a} {b} {c}"
    );

    // The WAL archive: segments from 1 to past c on timeline 1, pieces below b and above
    // c, timeline 2 objects on both sides, a history file.
    let system_id = listed[0]["system_identifier"].as_str().unwrap();
    let put = |relative: &str| {
        let path = root.join(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"wal").unwrap();
    };
    std::fs::create_dir_all(root.join("wal")).unwrap();
    std::fs::write(
        root.join(walnames::ARCHIVE_RECORD),
        serde_json::json!({"format": 1, "system_identifier": system_id, "segment_size": size})
            .to_string(),
    )
    .unwrap();
    let one = TimelineId(1);
    let two = TimelineId(2);
    let segment = |tli: TimelineId, n: u64, compressed: bool| {
        walnames::segment_object(tli, &wal_file_name(tli, n, segment_size), compressed)
    };
    let piece = |tli: TimelineId, n: u64| {
        walnames::partial_object(tli, &wal_file_name(tli, n, segment_size), 0, 8192)
    };
    let mut wal = Vec::new();
    for n in 1..=c + 1 {
        wal.push(segment(one, n, n != 1));
    }
    wal.push(piece(one, b - 1));
    wal.push(piece(one, c + 2));
    wal.push(segment(two, a, true));
    wal.push(segment(two, b, true));
    wal.push(segment(two, c + 1, true));
    wal.push(walnames::history_object(two));
    for object in &wal {
        put(object);
    }
    // c is an incremental of b (its parent): b is kept with it.
    let commit = root.join("backups/c/backup.json");
    let mut record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&commit).unwrap()).unwrap();
    record["parent"] = "b".into();
    std::fs::write(&commit, record.to_string()).unwrap();

    let below = |bound: u64| -> Vec<String> {
        let mut v: Vec<String> = wal
            .iter()
            .filter(|o| {
                matches!(
                    walnames::parse_wal_object(o, segment_size).and_then(|w| w.segment()),
                    Some(n) if n < bound
                )
            })
            .cloned()
            .collect();
        v.sort();
        v
    };

    // --retain 0 is refused; a dry run changes nothing and says what it would do.
    let out = run_with(&store, &["delete", "--repo", &store.url, "--retain", "0"]).await;
    assert!(!out.status.success(), "{}", text(&out));
    let before = snapshot(&root);
    let plan = delete(&store, &["--retain", "1", "--dry-run"]).await;
    assert_eq!(snapshot(&root), before, "a dry run deletes nothing");
    assert_eq!(strings(&plan["kept"]), ["b", "c"], "{plan}");
    assert_eq!(strings(&plan["deleted_backups"]), ["a"], "{plan}");
    assert_eq!(strings(&plan["wal_objects"]), below(b), "{plan}");
    let dry_text = run_with(
        &store,
        &["delete", "--repo", &store.url, "--retain", "1", "--dry-run"],
    )
    .await;
    assert!(
        text(&dry_text).contains("would delete backup a"),
        "{}",
        text(&dry_text)
    );

    // The real run: a goes, b stays as c's parent, and the WAL below b's start goes.
    let all = objects(&root);
    let done = delete(&store, &["--retain", "1"]).await;
    assert_eq!(done["wal_objects_deleted"], below(b).len(), "{done}");
    assert_eq!(labels(&store).await, ["b", "c"]);
    let left = objects(&root);
    let gone: BTreeSet<String> = all.difference(&left).cloned().collect();
    let mut expected: BTreeSet<String> = below(b).into_iter().collect();
    expected.extend(all.iter().filter(|o| o.starts_with("backups/a/")).cloned());
    assert_eq!(gone, expected);
    assert!(left.contains(walnames::ARCHIVE_RECORD));
    assert!(left.contains(&walnames::history_object(two)));

    // Without the parent link, b goes and the WAL below c's start with it.
    record["parent"] = serde_json::Value::Null;
    std::fs::write(&commit, record.to_string()).unwrap();
    let done = delete(&store, &["--retain", "1"]).await;
    assert_eq!(strings(&done["deleted_backups"]), ["b"], "{done}");
    assert_eq!(
        strings(&done["wal_objects"]),
        below(c)
            .into_iter()
            .filter(|o| !below(b).contains(o))
            .collect::<Vec<_>>()
    );
    let left = objects(&root);
    assert!(left.iter().all(|o| !o.starts_with("backups/b/")));
    for object in &wal {
        assert_eq!(
            left.contains(object),
            !below(c).contains(object),
            "{object}"
        );
    }

    // --before a time after every backup: every backup goes, and with none left, no WAL.
    let done = delete(&store, &["--before", "2999-01-01T00:00:00Z"]).await;
    assert_eq!(strings(&done["deleted_backups"]), ["c"], "{done}");
    assert_eq!(done["wal_objects_deleted"], 0, "{done}");
    assert!(labels(&store).await.is_empty());
    let after = objects(&root);
    for object in &wal {
        assert_eq!(after.contains(object), left.contains(object), "{object}");
    }
}
