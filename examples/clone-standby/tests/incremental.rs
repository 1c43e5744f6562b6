//! `clone-standby backup --incremental` on a real Garage store, against real servers
//! (version from PGREPL_TEST_PG): PostgreSQL 17+ sends only what changed, stored as the
//! server's INCREMENTAL files and verified against their manifest; older servers and
//! servers without WAL summaries get a clear error. Restoring a chain is not built yet,
//! so restoring an incremental backup is refused and leaves nothing behind.

mod common;

use std::time::Duration;

use common::repo::{run_with, Store};
use common::{scratch, text};
use testkit::{Cluster, ClusterOptions, Garage};

fn store(garage: &Garage, prefix: &str) -> Store {
    Store {
        url: garage.url(prefix),
        env: garage.env(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_backups_store_only_changes_or_explain_why_not() {
    // No autovacuum, and the table frozen before the full backup: the incremental backup
    // should then hold only what the test changes.
    let primary = Cluster::start(ClusterOptions::new().setting("autovacuum", "off"));
    let major = primary.major();
    if major >= 17 {
        primary.execute("ALTER SYSTEM SET summarize_wal = on").await;
        primary.execute("SELECT pg_reload_conf()").await;
    }
    primary
        .execute(
            "CREATE TABLE big AS SELECT g, md5(g::text) || repeat('z', 400) AS pad FROM generate_series(1, 60000) g;
             CREATE TABLE small (id int)",
        )
        .await;
    primary.execute("VACUUM (FREEZE, ANALYZE)").await;
    primary.execute("CHECKPOINT").await;
    let garage = Garage::start();
    let repo = store(&garage, "incremental");
    let source = primary.unix_conninfo(primary.superuser());
    let backup = |label: &'static str, extra: Vec<&'static str>| {
        let repo = &repo;
        let source = source.clone();
        async move {
            let mut args = vec![
                "backup", "--source", &source, "--repo", &repo.url, "--label", label, "--json",
            ];
            args.extend(extra);
            run_with(repo, &args).await
        }
    };

    if major < 17 {
        let full = backup("full", vec![]).await;
        assert!(full.status.success(), "{}", text(&full));
        let refused = backup("inc", vec!["--incremental"]).await;
        assert!(!refused.status.success());
        assert!(
            text(&refused).contains("need PostgreSQL 17"),
            "{}",
            text(&refused)
        );
        return;
    }

    let mut sql = primary.sql().await;
    let available: String = sql
        .query_value("SELECT count(*) FROM pg_available_wal_summaries()")
        .await
        .unwrap()
        .unwrap();
    // The npm builds run the WAL summarizer: it has summarized what initdb wrote.
    assert_ne!(
        available, "0",
        "no WAL summary: is the summarizer running in this build?"
    );
    eprintln!("WAL summaries available on PostgreSQL {major}: {available}");
    let full = backup("full", vec![]).await;
    assert!(full.status.success(), "{}", text(&full));
    let full_record: serde_json::Value = serde_json::from_slice(&full.stdout).unwrap();

    // Change a small part: one page's worth of rows and a new table.
    sql.batch("UPDATE big SET pad = 'changed' WHERE g <= 50")
        .await
        .unwrap();
    sql.batch("INSERT INTO small SELECT generate_series(1, 1000)")
        .await
        .unwrap();
    let inc = backup("inc", vec!["--incremental", "--from", "full"]).await;
    assert!(inc.status.success(), "{}", text(&inc));
    let inc_record: serde_json::Value = serde_json::from_slice(&inc.stdout).unwrap();
    assert_eq!(inc_record["parent"], "full", "{inc_record:#}");
    // database_bytes is the size of the files the server sent (incremental files count
    // with their own, small size); stored bytes also carry the compressed WAL.
    let full_bytes = full_record["database_bytes"].as_u64().unwrap();
    let inc_bytes = inc_record["database_bytes"].as_u64().unwrap();
    eprintln!(
        "full: {full_bytes} bytes of files, {} stored; incremental: {inc_bytes} bytes of files, {} stored",
        full_record["stored_bytes"], inc_record["stored_bytes"]
    );
    assert!(
        inc_bytes * 4 < full_bytes,
        "the incremental backup sent {inc_bytes} bytes of files, the full one {full_bytes}"
    );

    // `list` shows the chain; `verify` checks the incremental backup's own manifest.
    let list = run_with(&repo, &["list", "--repo", &repo.url]).await;
    assert!(list.status.success(), "{}", text(&list));
    let line = text(&list)
        .lines()
        .find(|l| l.starts_with("inc "))
        .map(str::to_string)
        .unwrap_or_default();
    assert!(
        line.contains(" full "),
        "list does not show the parent:\n{}",
        text(&list)
    );
    let verify = run_with(&repo, &["verify", "--repo", &repo.url, "--backup", "inc"]).await;
    assert!(verify.status.success(), "{}", text(&verify));

    // Restoring a chain is not built yet: refused, nothing written.
    let target = scratch();
    let pgdata = target.path().join("restored");
    let restore = run_with(
        &repo,
        &[
            "restore",
            "--repo",
            &repo.url,
            "--backup",
            "inc",
            "--pgdata",
            pgdata.to_str().unwrap(),
        ],
    )
    .await;
    assert!(!restore.status.success());
    assert!(text(&restore).contains("incremental"), "{}", text(&restore));
    assert!(!pgdata.exists() || std::fs::read_dir(&pgdata).unwrap().next().is_none());

    // Without WAL summaries the server cannot do it: the setting to change is named.
    sql.batch("ALTER SYSTEM SET summarize_wal = off")
        .await
        .unwrap();
    sql.batch("SELECT pg_reload_conf()").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let refused = backup("inc2", vec!["--incremental"]).await;
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("summarize_wal"),
        "{}",
        text(&refused)
    );
}
