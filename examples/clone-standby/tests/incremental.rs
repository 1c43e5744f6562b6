//! `clone-standby backup --incremental` on a real Garage store, against real servers
//! (version from PGREPL_TEST_PG): PostgreSQL 17+ sends only what changed, stored as the
//! server's INCREMENTAL files and verified against their manifest; older servers and
//! servers without WAL summaries get a clear error. A chain of two incremental backups,
//! with a truncated table, a dropped and a created database and a table shrunk by
//! VACUUM in between, restores in one pass into a server holding the primary's data;
//! on PostgreSQL 18 its relation files equal pg_combinebackup's, byte for byte. A
//! missing parent is a clear error that leaves nothing behind.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::repo::{run_with, Store};
use common::{free_port, scratch, standby_config, table_digest, text, StandbyGuard};
use pgrepo::Repository;
use testkit::{Cluster, ClusterOptions, Garage};

/// The tables compared between the primary and the restored chain.
const TABLES: [&str; 6] = ["big", "small", "trunc", "shrink", "later", "spaced"];

/// The repository through the library, with the store's credentials.
fn repository(garage: &Garage, prefix: &str) -> Repository {
    common::repo::garage_repository(garage, &garage.url(prefix))
}

/// Every regular file below `dir` (relative path → bytes), links followed.
fn files_below(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).unwrap().to_path_buf();
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Extracts stored backup `label` into `dir` as pg_basebackup's plain format would hold
/// it: its archives untarred (each tablespace beside `dir`, linked from `pg_tblspc/`)
/// and its backup_manifest. Returns the tablespace directories.
async fn extract(repo: &Repository, label: &str, dir: &Path) -> Vec<(u32, PathBuf)> {
    let record = repo.backup(label).await.unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let mut tablespaces = Vec::new();
    for archive in &record.archives {
        let into = match archive.tablespace_oid {
            Some(oid) => {
                let ts = dir.with_extension(format!("ts{oid}"));
                std::fs::create_dir_all(&ts).unwrap();
                tablespaces.push((oid, ts.clone()));
                ts
            }
            None => dir.to_path_buf(),
        };
        let bytes = repo
            .get_bytes(&repo.backup_path(label, &archive.object), 1 << 34)
            .await
            .unwrap();
        let file = dir.with_extension(&archive.object);
        std::fs::write(&file, &bytes).unwrap();
        let untar = std::process::Command::new("tar")
            .arg("-xf")
            .arg(&file)
            .arg("-C")
            .arg(&into)
            .output()
            .unwrap();
        assert!(untar.status.success(), "{}", text(&untar));
        std::fs::remove_file(&file).unwrap();
    }
    // The base archive links to the source's tablespace: relinked to the copy.
    for (oid, ts) in &tablespaces {
        let link = dir.join(format!("pg_tblspc/{oid}"));
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(ts, &link).unwrap();
    }
    let manifest = repo
        .get_bytes(&repo.backup_path(label, "backup_manifest"), 1 << 30)
        .await
        .unwrap();
    std::fs::write(dir.join("backup_manifest"), &manifest).unwrap();
    tablespaces
}

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
             CREATE TABLE small (id int);
             CREATE TABLE trunc AS SELECT generate_series(1, 2000) AS t;
             CREATE TABLE shrink AS SELECT g, repeat('s', 200) AS pad FROM generate_series(1, 20000) g",
        )
        .await;
    primary.execute("CREATE DATABASE dropped").await;
    // A tablespace, with a table that changes and shrinks between the backups.
    let work = scratch();
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
        .execute("CREATE TABLE spaced TABLESPACE ts2 AS SELECT g, md5(g::text) AS m FROM generate_series(1, 30000) g")
        .await;
    let mapping = |name: &str| {
        format!(
            "{}={}",
            location.display(),
            work.path().join(name).display()
        )
    };
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
    sql.batch("UPDATE spaced SET m = 'changed' WHERE g <= 100")
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

    // More changes: a truncated table (a new file), a dropped database, a created one
    // with data, a table shrunk by VACUUM (a shorter file), more updated rows.
    sql.batch("TRUNCATE trunc").await.unwrap();
    sql.batch("INSERT INTO trunc SELECT generate_series(1, 10)")
        .await
        .unwrap();
    sql.batch("DROP DATABASE dropped").await.unwrap();
    sql.batch("CREATE DATABASE created").await.unwrap();
    let mut created_config = primary.config(primary.superuser());
    created_config.dbname = Some("created".into());
    let mut created = pgwire_repl::SqlClient::connect(&created_config)
        .await
        .unwrap();
    created
        .batch("CREATE TABLE fresh AS SELECT g, md5(g::text) AS h FROM generate_series(1, 5000) g")
        .await
        .unwrap();
    sql.batch("DELETE FROM shrink WHERE g > 500").await.unwrap();
    sql.batch("VACUUM shrink").await.unwrap();
    sql.batch("DELETE FROM spaced WHERE g > 20000")
        .await
        .unwrap();
    sql.batch("VACUUM spaced").await.unwrap();
    sql.batch("UPDATE big SET pad = 'again' WHERE g BETWEEN 30000 AND 30100")
        .await
        .unwrap();
    sql.batch("CREATE TABLE later AS SELECT generate_series(1, 3000) AS x")
        .await
        .unwrap();
    let inc2 = backup("inc2", vec!["--incremental", "--from", "inc"]).await;
    assert!(inc2.status.success(), "{}", text(&inc2));
    let inc2_record: serde_json::Value = serde_json::from_slice(&inc2.stdout).unwrap();
    assert_eq!(inc2_record["parent"], "inc", "{inc2_record:#}");
    // Nothing changes after the last backup: the restored server must hold this.
    let primary_config = primary.config(primary.superuser());
    let mut expected = Vec::new();
    for table in TABLES {
        expected.push(table_digest(&primary_config, table).await);
    }
    let expected_fresh = table_digest(&created_config, "fresh").await;

    // verify --chain: the parents exist and link.
    let verify = run_with(
        &repo,
        &["verify", "--repo", &repo.url, "--backup", "inc2", "--chain"],
    )
    .await;
    assert!(verify.status.success(), "{}", text(&verify));
    assert!(
        text(&verify).contains("inc2 <- inc <- full"),
        "{}",
        text(&verify)
    );

    // The chain restored in one pass, not started: compared with pg_combinebackup on 18.
    let target = scratch();
    let combined = target.path().join("combined");
    let restore = run_with(
        &repo,
        &[
            "restore",
            "--repo",
            &repo.url,
            "--backup",
            "inc2",
            "--pgdata",
            combined.to_str().unwrap(),
            "--no-sync",
            "--tablespace-mapping",
            &mapping("combined_ts"),
        ],
    )
    .await;
    assert!(restore.status.success(), "{}", text(&restore));
    let label = std::fs::read_to_string(combined.join("backup_label")).unwrap();
    assert!(!label.contains("INCREMENTAL"), "{label}");
    let ours = files_below(&combined);
    assert!(
        !ours
            .keys()
            .any(|p| p.to_string_lossy().contains("INCREMENTAL.")),
        "an incremental file was restored as it is"
    );
    let library = repository(&garage, "incremental");
    if major >= 18 {
        let oracle = testkit::oracle::pg_combinebackup18();
        let inputs = target.path().join("inputs");
        let mut newest_tablespaces = Vec::new();
        for label in ["full", "inc", "inc2"] {
            newest_tablespaces = extract(&library, label, &inputs.join(label)).await;
        }
        assert_eq!(
            newest_tablespaces.len(),
            1,
            "the tablespace is in the backups"
        );
        let theirs_dir = target.path().join("pg_combinebackup");
        let theirs_ts = target.path().join("pg_combinebackup_ts");
        let run = std::process::Command::new(&oracle)
            .arg("--no-sync")
            .arg(format!(
                "--tablespace-mapping={}={}",
                newest_tablespaces[0].1.display(),
                theirs_ts.display()
            ))
            .arg("-o")
            .arg(&theirs_dir)
            .args(["full", "inc", "inc2"].map(|l| inputs.join(l)))
            .output()
            .unwrap();
        assert!(run.status.success(), "pg_combinebackup: {}", text(&run));
        let theirs = files_below(&theirs_dir);
        let relations = |files: &BTreeMap<PathBuf, Vec<u8>>| -> BTreeMap<PathBuf, Vec<u8>> {
            files
                .iter()
                .filter(|(p, _)| {
                    p.starts_with("base") || p.starts_with("global") || p.starts_with("pg_tblspc")
                })
                .map(|(p, b)| (p.clone(), b.clone()))
                .collect()
        };
        let (ours_rel, theirs_rel) = (relations(&ours), relations(&theirs));
        let ours_names: Vec<_> = ours_rel.keys().collect();
        let theirs_names: Vec<_> = theirs_rel.keys().collect();
        assert_eq!(
            ours_names, theirs_names,
            "the chain restore and pg_combinebackup hold different files"
        );
        for (path, bytes) in &ours_rel {
            assert!(
                theirs_rel[path] == *bytes,
                "{} differs from pg_combinebackup's",
                path.display()
            );
        }
        eprintln!(
            "PostgreSQL {major}: {} relation files equal pg_combinebackup's, byte for byte",
            ours_rel.len()
        );
    }

    // --delta of the same chain into that copy, with a relation file of the tablespace
    // and one of the base directory removed and a stray file added: the directory comes
    // back exactly as the one-pass restore wrote it, without reading the whole chain.
    for table in ["spaced", "big"] {
        let relation: String = sql
            .query_value(&format!("SELECT pg_relation_filepath('{table}')"))
            .await
            .unwrap()
            .unwrap();
        std::fs::remove_file(combined.join(&relation)).unwrap();
    }
    std::fs::write(combined.join("base/stray_file"), b"stray").unwrap();
    let delta = run_with(
        &repo,
        &[
            "restore",
            "--repo",
            &repo.url,
            "--backup",
            "inc2",
            "--pgdata",
            combined.to_str().unwrap(),
            "--no-sync",
            "--delta",
            "--json",
            "--tablespace-mapping",
            &mapping("combined_ts"),
        ],
    )
    .await;
    assert!(delta.status.success(), "restore --delta:\n{}", text(&delta));
    let summary: serde_json::Value = serde_json::from_slice(&delta.stdout).unwrap();
    eprintln!("PostgreSQL {major}: delta of the chain into its own restore: {summary}");
    let again = files_below(&combined);
    assert_eq!(
        again.keys().collect::<Vec<_>>(),
        ours.keys().collect::<Vec<_>>(),
        "the delta restore holds other files than the one-pass restore"
    );
    for (path, bytes) in &ours {
        assert!(
            again[path] == *bytes,
            "{} differs after the delta restore",
            path.display()
        );
    }

    // Restored again as a standby and started: the data of the last backup.
    let pgdata = target.path().join("restored");
    let _guard = StandbyGuard {
        pg_ctl: primary.bin("pg_ctl"),
        pgdata: pgdata.clone(),
    };
    let port = free_port().to_string();
    let restore = run_with(
        &repo,
        &[
            "restore",
            "--repo",
            &repo.url,
            "--backup",
            "inc2",
            "--pgdata",
            pgdata.to_str().unwrap(),
            "--standby",
            "--source",
            &source,
            "--start",
            "--standby-port",
            &port,
            "--pg-ctl",
            primary.bin("pg_ctl").to_str().unwrap(),
            "--tablespace-mapping",
            &mapping("restored_ts"),
            "--json",
        ],
    )
    .await;
    assert!(restore.status.success(), "{}", text(&restore));
    let standby = standby_config(&pgdata, primary.superuser());
    for (table, digest) in TABLES.iter().zip(&expected) {
        assert_eq!(
            &table_digest(&standby, table).await,
            digest,
            "table {table} differs between the primary and the restored chain"
        );
    }
    let mut standby_created = standby.clone();
    standby_created.dbname = Some("created".into());
    assert_eq!(
        table_digest(&standby_created, "fresh").await,
        expected_fresh
    );
    let mut standby_sql = pgwire_repl::SqlClient::connect(&standby).await.unwrap();
    let dropped: String = standby_sql
        .query_value("SELECT count(*) FROM pg_database WHERE datname = 'dropped'")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(dropped, "0", "the dropped database came back");
    eprintln!("PostgreSQL {major}: the chain full <- inc <- inc2 restored and started with the primary's data");

    // A newest backup compressed by the server (no frame index) is read whole; as a
    // parent it cannot be entered by frames: refused, saying what to do.
    let inc3 = backup(
        "inc3",
        vec![
            "--incremental",
            "--from",
            "inc2",
            "--compress",
            "server-gzip",
        ],
    )
    .await;
    assert!(inc3.status.success(), "{}", text(&inc3));
    let server_compressed = target.path().join("server_compressed");
    let restore = run_with(
        &repo,
        &[
            "restore",
            "--repo",
            &repo.url,
            "--backup",
            "inc3",
            "--pgdata",
            server_compressed.to_str().unwrap(),
            "--no-sync",
            "--tablespace-mapping",
            &mapping("server_compressed_ts"),
        ],
    )
    .await;
    assert!(restore.status.success(), "{}", text(&restore));
    let inc4 = backup("inc4", vec!["--incremental", "--from", "inc3"]).await;
    assert!(inc4.status.success(), "{}", text(&inc4));
    let refused_dir = target.path().join("refused");
    let restore = run_with(
        &repo,
        &[
            "restore",
            "--repo",
            &repo.url,
            "--backup",
            "inc4",
            "--pgdata",
            refused_dir.to_str().unwrap(),
            "--tablespace-mapping",
            &mapping("refused_ts"),
        ],
    )
    .await;
    assert!(!restore.status.success());
    assert!(
        text(&restore).contains("no frame index")
            && text(&restore).contains("client-side compression"),
        "{}",
        text(&restore)
    );
    assert!(!refused_dir.exists() || std::fs::read_dir(&refused_dir).unwrap().next().is_none());

    // A commit record naming the wrong parent: its backup_label says otherwise.
    let record_path = library.backup_path("inc2", "backup.json");
    let record_bytes = library.get_bytes(&record_path, 1 << 20).await.unwrap();
    let wrong = String::from_utf8(record_bytes.to_vec())
        .unwrap()
        .replace("\"parent\": \"inc\"", "\"parent\": \"full\"");
    assert!(wrong.contains("\"parent\": \"full\""), "{wrong}");
    library
        .put_bytes(&record_path, wrong.into_bytes().into())
        .await
        .unwrap();
    let verify = run_with(
        &repo,
        &["verify", "--repo", &repo.url, "--backup", "inc2", "--chain"],
    )
    .await;
    assert!(!verify.status.success());
    assert!(
        text(&verify).contains("says it is incremental from"),
        "{}",
        text(&verify)
    );
    library.put_bytes(&record_path, record_bytes).await.unwrap();

    // A damaged byte in the middle of the full backup's base archive (a frame the chain
    // reads): found while reading, nothing left behind.
    let full_object = library.backup("full").await.unwrap().archives[0]
        .object
        .clone();
    let full_path = library.backup_path("full", &full_object);
    let original = library.get_bytes(&full_path, 1 << 34).await.unwrap();
    let mut damaged = original.to_vec();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x55;
    library.put_bytes(&full_path, damaged.into()).await.unwrap();
    let pgdata = target.path().join("damaged");
    let restore = run_with(
        &repo,
        &[
            "restore",
            "--repo",
            &repo.url,
            "--backup",
            "inc2",
            "--pgdata",
            pgdata.to_str().unwrap(),
            "--tablespace-mapping",
            &mapping("damaged_ts"),
        ],
    )
    .await;
    assert!(!restore.status.success(), "{}", text(&restore));
    // Named as the damaged file's checksum, or as the frame that cannot be decompressed.
    assert!(
        text(&restore).contains("of backup full:")
            || text(&restore).contains(&format!("full/{full_object}")),
        "{}",
        text(&restore)
    );
    eprintln!("damage: {}", text(&restore).lines().next().unwrap_or(""));
    assert!(!pgdata.exists() || std::fs::read_dir(&pgdata).unwrap().next().is_none());
    library.put_bytes(&full_path, original).await.unwrap();

    // A missing parent: a clear error, and nothing written.
    assert!(library.delete_backup_objects("inc").await.unwrap() > 0);
    let pgdata = target.path().join("orphan");
    let restore = run_with(
        &repo,
        &[
            "restore",
            "--repo",
            &repo.url,
            "--backup",
            "inc2",
            "--pgdata",
            pgdata.to_str().unwrap(),
            "--tablespace-mapping",
            &mapping("orphan_ts"),
        ],
    )
    .await;
    assert!(!restore.status.success());
    assert!(
        text(&restore).contains("on top of inc, which is missing"),
        "{}",
        text(&restore)
    );
    assert!(!pgdata.exists() || std::fs::read_dir(&pgdata).unwrap().next().is_none());
    let verify = run_with(
        &repo,
        &["verify", "--repo", &repo.url, "--backup", "inc2", "--chain"],
    )
    .await;
    assert!(!verify.status.success());
    assert!(text(&verify).contains("missing"), "{}", text(&verify));

    // Without WAL summaries the server cannot do it: the setting to change is named.
    sql.batch("ALTER SYSTEM SET summarize_wal = off")
        .await
        .unwrap();
    sql.batch("SELECT pg_reload_conf()").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let refused = backup("inc5", vec!["--incremental"]).await;
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("summarize_wal"),
        "{}",
        text(&refused)
    );
}

/// `restore --delta` of a chain into a stopped, earlier restore of the same cluster:
/// files whose final content the manifests already tell (whole files of the newest
/// backup, and incremental files with no changed block down to a whole older file) are
/// kept when the local copy matches and are not downloaded; a changed table is rebuilt
/// from the chain, a deliberately damaged local file is rewritten, a stray file is
/// removed, and the result verifies against the combined manifest and starts with the
/// primary's data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_restore_of_a_chain_fetches_only_what_changed() {
    let primary = Cluster::start(
        ClusterOptions::new()
            .setting("autovacuum", "off")
            .setting("wal_recycle", "off"),
    );
    let major = primary.major();
    if major < 17 {
        eprintln!("PostgreSQL {major}: no incremental backups (checked by the test above)");
        return;
    }
    primary.execute("ALTER SYSTEM SET summarize_wal = on").await;
    primary.execute("SELECT pg_reload_conf()").await;
    // About 100 MB in twelve tables, frozen so that later reads change no page. Three
    // must be fetched again (two changed, one damaged locally): a quarter of the data.
    for i in 0..12 {
        primary
            .execute(&format!(
                "CREATE TABLE t{i} AS SELECT g, md5(g::text) || md5((g + {i})::text) AS m \
                 FROM generate_series(1, 80000) g"
            ))
            .await;
    }
    primary.execute("VACUUM (FREEZE, ANALYZE)").await;
    primary.execute("CHECKPOINT").await;
    let garage = Garage::start();
    let repo = store(&garage, "chain-delta");
    let source = primary.unix_conninfo(primary.superuser());
    let backup = |label: &'static str, from: Option<&'static str>| {
        let (repo, source) = (&repo, source.clone());
        async move {
            let mut args = vec![
                "backup", "--source", &source, "--repo", &repo.url, "--label", label, "--json",
            ];
            if let Some(from) = from {
                args.extend(["--incremental", "--from", from]);
            }
            let out = run_with(repo, &args).await;
            assert!(out.status.success(), "backup {label}:\n{}", text(&out));
            let record: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            record["stored_bytes"].as_u64().unwrap()
        }
    };
    let mut chain_bytes = backup("full", None).await;
    primary
        .execute("UPDATE t0 SET m = upper(m) WHERE g <= 2000")
        .await;
    chain_bytes += backup("inc", Some("full")).await;

    // The chain restored and run as a standby for a while, then stopped: its files are
    // no longer exactly the backup's.
    let work = scratch();
    let pgdata = work.path().join("restored");
    let pgdata_text = pgdata.to_str().unwrap().to_string();
    let guard = StandbyGuard {
        pg_ctl: primary.bin("pg_ctl"),
        pgdata: pgdata.clone(),
    };
    let standby_restore = |label: &'static str, delta: bool| {
        let (repo, source, pgdata_text) = (&repo, source.clone(), pgdata_text.clone());
        let pg_ctl = primary.bin("pg_ctl");
        async move {
            let port = free_port().to_string();
            let mut args = vec![
                "restore",
                "--repo",
                &repo.url,
                "--backup",
                label,
                "--pgdata",
                &pgdata_text,
                "--standby",
                "--source",
                &source,
                "--start",
                "--standby-port",
                &port,
                "--pg-ctl",
                pg_ctl.to_str().unwrap(),
                "--json",
            ];
            if delta {
                args.push("--delta");
            }
            let out = run_with(repo, &args).await;
            assert!(out.status.success(), "restore {label}:\n{}", text(&out));
            let summary: serde_json::Value = serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
            assert_eq!(summary["started"], true, "{summary}");
            summary
        }
    };
    standby_restore("inc", false).await;
    drop(guard);
    assert!(!pgdata.join("postmaster.pid").exists());

    // The primary changes again: one table updated, one created; a third incremental.
    primary
        .execute("UPDATE t1 SET m = upper(m) WHERE g <= 2000")
        .await;
    primary
        .execute("CREATE TABLE later AS SELECT generate_series(1, 3000) AS x")
        .await;
    chain_bytes += backup("inc2", Some("inc")).await;

    // A table untouched since the full backup, damaged locally; a stray file.
    let mut sql = primary.sql().await;
    let relation: String = sql
        .query_value("SELECT pg_relation_filepath('t5')")
        .await
        .unwrap()
        .unwrap();
    let damaged = pgdata.join(&relation);
    let mut bytes = std::fs::read(&damaged).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&damaged, &bytes).unwrap();
    std::fs::write(pgdata.join("base/stray_file"), b"stray").unwrap();

    // The delta restore of the new chain, not started: checked file by file against
    // the combined manifest it writes.
    let delta = run_with(
        &repo,
        &[
            "restore",
            "--repo",
            &repo.url,
            "--backup",
            "inc2",
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
    eprintln!(
        "PostgreSQL {major}: delta restore of the chain full <- inc <- inc2 ({chain_bytes} bytes \
         stored): {read} bytes downloaded; {summary}"
    );
    assert!(reused * 10 > files * 9, "most files reused: {summary}");
    assert!(summary["files_written"].as_u64().unwrap() > 0, "{summary}");
    assert!(
        read * 100 < chain_bytes * 35,
        "downloaded {read} of the chain's {chain_bytes} bytes: {summary}"
    );
    assert!(!pgdata.join("base/stray_file").exists());
    assert!(
        !pgdata.join("standby.signal").exists(),
        "the earlier standby's signal file is not in the backup"
    );
    assert_ne!(
        std::fs::read(&damaged).unwrap()[middle],
        bytes[middle],
        "the damaged file was not rewritten"
    );
    let label = std::fs::read_to_string(pgdata.join("backup_label")).unwrap();
    assert!(!label.contains("INCREMENTAL"), "{label}");
    let verify = common::run(&["verify", "--pgdata", &pgdata_text]);
    assert!(
        verify.status.success(),
        "verify --pgdata after the delta restore:\n{}",
        text(&verify)
    );

    // Into a new directory, a delta restore of the chain is a full one.
    let fresh = work.path().join("fresh");
    let fresh_text = fresh.to_str().unwrap();
    let full = run_with(
        &repo,
        &[
            "restore",
            "--repo",
            &repo.url,
            "--backup",
            "inc2",
            "--pgdata",
            fresh_text,
            "--delta",
            "--no-sync",
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
    eprintln!("PostgreSQL {major}: delta restore of the chain into a new directory: {summary}");
    assert_eq!(summary["files_reused"], 0, "{summary}");
    assert!(summary["bytes_read"].as_u64().unwrap() > read, "{summary}");
    let verify = common::run(&["verify", "--pgdata", fresh_text]);
    assert!(
        verify.status.success(),
        "verify --pgdata (fresh):\n{}",
        text(&verify)
    );

    // A damaged frame of the full backup, holding a table that must be rebuilt: the
    // delta restore fails, says the directory must be restored again, and leaves it
    // without global/pg_control and without temporary files.
    let library = repository(&garage, "chain-delta");
    let full_record = library.backup("full").await.unwrap();
    let base = &full_record.archives[0];
    let index = library
        .get_bytes(
            &library.backup_path("full", base.index.as_deref().unwrap()),
            1 << 30,
        )
        .await
        .unwrap();
    let index: serde_json::Value = serde_json::from_slice(&index).unwrap();
    let changed: String = sql
        .query_value("SELECT pg_relation_filepath('t1')")
        .await
        .unwrap()
        .unwrap();
    let frame =
        index["frames"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| {
                f["entries"].as_array().unwrap().iter().any(|e| {
                    e["path"].as_str().unwrap().trim_start_matches("./") == changed.as_str()
                })
            })
            .expect("the frame of t1");
    let object = library.backup_path("full", &base.object);
    let original = library.get_bytes(&object, 1 << 34).await.unwrap();
    let mut damaged_object = original.to_vec();
    let at = frame["stored_offset"].as_u64().unwrap() + frame["stored_len"].as_u64().unwrap() / 2;
    damaged_object[at as usize] ^= 0x55;
    library
        .put_bytes(&object, damaged_object.into())
        .await
        .unwrap();
    let failed = run_with(
        &repo,
        &[
            "restore",
            "--repo",
            &repo.url,
            "--backup",
            "inc2",
            "--pgdata",
            fresh_text,
            "--delta",
            "--no-sync",
        ],
    )
    .await;
    library.put_bytes(&object, original).await.unwrap();
    assert!(!failed.status.success(), "{}", text(&failed));
    eprintln!("PostgreSQL {major}: damaged: {}", text(&failed).trim());
    assert!(text(&failed).contains("inconsistent"), "{}", text(&failed));
    assert!(!fresh.join("global/pg_control").exists());
    let temporary: Vec<_> = files_below(&fresh)
        .into_keys()
        .filter(|p| p.to_string_lossy().ends_with(".pgrepo-delta"))
        .collect();
    assert!(temporary.is_empty(), "left behind: {temporary:?}");

    // Again, as a standby, started: almost nothing left to fetch, and the primary's data.
    let _guard = StandbyGuard {
        pg_ctl: primary.bin("pg_ctl"),
        pgdata: pgdata.clone(),
    };
    let again = standby_restore("inc2", true).await;
    eprintln!("PostgreSQL {major}: the same delta again: {again}");
    assert!(
        again["bytes_read"].as_u64().unwrap() < read,
        "the second delta fetched less: {again}"
    );
    let standby = standby_config(&pgdata, primary.superuser());
    let primary_config = primary.config(primary.superuser());
    for table in ["t0", "t1", "t2", "t5", "t11", "later"] {
        assert_eq!(
            table_digest(&primary_config, table).await,
            table_digest(&standby, table).await,
            "table {table} differs between the primary and the delta-restored chain"
        );
    }
}
