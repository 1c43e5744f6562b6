//! Clone safety on real servers (version from PGREPL_TEST_PG): a clone never writes into
//! a directory it does not own, and after a refusal, an interruption or a failure the
//! source's tablespace is byte-identical, and nothing this run created is left (slot,
//! target, mapped tablespace directory).

mod common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{bin, give_like, run, scratch, snapshot, text};
use testkit::{Cluster, ClusterOptions};

/// A primary with a tablespace in `dir/ts` holding a frozen, checkpointed table, so its
/// files do not change unless something else writes them.
async fn primary_with_tablespace(dir: &Path) -> Cluster {
    let primary = Cluster::start(ClusterOptions::new());
    let location = dir.join("ts");
    std::fs::create_dir(&location).unwrap();
    give_like(&location, primary.data_dir());
    primary
        .execute(&format!(
            "CREATE TABLESPACE ts2 LOCATION '{}'",
            location.display()
        ))
        .await;
    primary
        .execute(
            "CREATE TABLE in_ts TABLESPACE ts2 AS SELECT g AS id, repeat('t', 200) AS pad FROM generate_series(1, 30000) g",
        )
        .await;
    primary
        .execute(
            "CREATE TABLE big AS SELECT g, repeat('x', 1000) AS pad FROM generate_series(1, 20000) g",
        )
        .await;
    primary.execute("VACUUM FREEZE").await;
    primary.execute("CHECKPOINT").await;
    primary
}

async fn slot_names(primary: &Cluster) -> String {
    primary
        .query_value("SELECT coalesce(string_agg(slot_name, ','), '') FROM pg_replication_slots")
        .await
        .unwrap_or_default()
}

/// Waits for a spawned clone to exit, within a bound.
fn wait(mut child: Child, limit: Duration) -> Output {
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("the clone did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spawn_clone(args: &[String]) -> Child {
    Command::new(bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until `path` holds at least `bytes` bytes of files (the clone is writing there).
fn wait_for_bytes(path: &Path, bytes: u64) {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        let written: u64 = snapshot_sizes(path);
        if written >= bytes {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("nothing was written into {} within 30 s", path.display());
}

fn snapshot_sizes(path: &Path) -> u64 {
    if !path.exists() {
        return 0;
    }
    snapshot(path)
        .iter()
        .filter(|(_, v)| v.as_slice() != b"<dir>")
        .map(|(_, v)| v.len() as u64)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_tablespace_is_untouched_whether_the_clone_is_refused_interrupted_or_fails() {
    let work = scratch();
    let primary = primary_with_tablespace(work.path()).await;
    let location = work.path().join("ts");
    let before = snapshot(&location);
    assert!(
        before.len() >= 3,
        "the tablespace holds the table: {before:?}"
    );
    let rows_before = primary.query_value("SELECT count(*) FROM in_ts").await;
    let source = primary.unix_conninfo(primary.superuser());
    let pgdata = work.path().join("clone");
    let mapped = work.path().join("new/ts");
    let mapping = format!("{}={}", location.display(), mapped.display());

    // 1. Refused: an unmapped tablespace would be written into the live one. Nothing is
    //    written, the slot made for the clone is dropped, the target is removed.
    let output = run(&[
        "clone",
        "--source",
        &source,
        "--pgdata",
        pgdata.to_str().unwrap(),
        "--slot",
        "refused_slot",
        "--create-slot",
        "--no-sync",
    ]);
    let out = text(&output);
    assert!(!output.status.success(), "{out}");
    assert!(out.contains("exists and is not empty"), "{out}");
    assert!(out.contains("--tablespace-mapping"), "{out}");
    assert!(
        out.contains("removed: replication slot \"refused_slot\""),
        "{out}"
    );
    assert!(!pgdata.exists(), "{out}");
    assert_eq!(slot_names(&primary).await, "");
    assert!(
        snapshot(&location) == before,
        "the source tablespace changed"
    );

    // 2. Refused: targets inside the source's data directory or its tablespace.
    for inside in [primary.data_dir().join("clone"), location.join("clone")] {
        let output = run(&[
            "clone",
            "--source",
            &source,
            "--pgdata",
            inside.to_str().unwrap(),
            "--tablespace-mapping",
            &mapping,
            "--no-sync",
        ]);
        let out = text(&output);
        assert!(!output.status.success(), "{out}");
        assert!(out.contains("lies inside"), "{out}");
        assert!(!inside.exists(), "{out}");
    }
    let output = run(&[
        "clone",
        "--source",
        &source,
        "--pgdata",
        pgdata.to_str().unwrap(),
        "--tablespace-mapping",
        &format!("{}={}", location.display(), location.join("sub").display()),
        "--no-sync",
    ]);
    assert!(!output.status.success(), "{}", text(&output));
    assert!(text(&output).contains("lies inside"), "{}", text(&output));
    assert!(!pgdata.exists() && !location.join("sub").exists());
    assert!(
        snapshot(&location) == before,
        "the source tablespace changed"
    );

    // 3. Interrupted (Ctrl-C) while the mapped tablespace is being written: the slot,
    //    the target and the mapped directory (with the parent it created) are removed.
    let args: Vec<String> = [
        "clone",
        "--source",
        &source,
        "--pgdata",
        pgdata.to_str().unwrap(),
        "--tablespace-mapping",
        &mapping,
        "--slot",
        "interrupted_slot",
        "--create-slot",
        "--max-rate",
        "1M",
        "--no-sync",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let child = spawn_clone(&args);
    wait_for_bytes(&mapped, 64 << 10);
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let output = wait(child, Duration::from_secs(30));
    let out = text(&output);
    assert!(!output.status.success(), "{out}");
    assert!(out.contains("interrupted"), "{out}");
    assert!(
        out.contains("removed: replication slot \"interrupted_slot\""),
        "{out}"
    );
    assert!(
        out.contains(&format!("removed: {}", work.path().join("new").display())),
        "{out}"
    );
    assert!(!pgdata.exists(), "{out}");
    assert!(!work.path().join("new").exists(), "{out}");
    assert_eq!(slot_names(&primary).await, "");
    assert!(
        snapshot(&location) == before,
        "the source tablespace changed"
    );

    // 4. Failed: the server ends the backup mid-transfer. The mapped directory was given
    //    empty this time: it is emptied, not removed.
    std::fs::create_dir_all(&mapped).unwrap();
    let child = spawn_clone(&[args.clone(), vec!["--progress".into()]].concat());
    wait_for_bytes(&pgdata, 64 << 10);
    primary
        .execute("SELECT pg_terminate_backend(pid) FROM pg_stat_replication WHERE state = 'backup'")
        .await;
    let output = wait(child, Duration::from_secs(60));
    let out = text(&output);
    assert!(!output.status.success(), "{out}");
    assert!(out.contains("clone failed"), "{out}");
    assert!(
        out.contains("removed: replication slot \"interrupted_slot\""),
        "{out}"
    );
    assert!(!pgdata.exists(), "{out}");
    assert!(
        mapped.exists() && std::fs::read_dir(&mapped).unwrap().next().is_none(),
        "a directory given empty is left empty: {out}"
    );
    assert_eq!(slot_names(&primary).await, "");
    assert!(
        snapshot(&location) == before,
        "the source tablespace changed"
    );
    assert_eq!(
        primary.query_value("SELECT count(*) FROM in_ts").await,
        rows_before
    );

    // 5. --no-clean keeps the partial clone and the slot, and says so.
    let child = spawn_clone(&[args.clone(), vec!["--no-clean".into()]].concat());
    wait_for_bytes(&mapped, 64 << 10);
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let output = wait(child, Duration::from_secs(30));
    let out = text(&output);
    assert!(
        out.contains("left: replication slot \"interrupted_slot\" (--no-clean)"),
        "{out}"
    );
    assert!(out.contains("(--no-clean)"), "{out}");
    assert!(pgdata.exists() && mapped.exists(), "{out}");
    assert_eq!(slot_names(&primary).await, "interrupted_slot");
    primary
        .execute("SELECT pg_drop_replication_slot('interrupted_slot')")
        .await;
    assert!(
        snapshot(&location) == before,
        "the source tablespace changed"
    );

    // 6. Mapped to a new directory, the clone succeeds: the mapped directory is private
    //    (0700, as pg_basebackup makes it) and the link points at it.
    std::fs::remove_dir_all(&pgdata).unwrap();
    std::fs::remove_dir_all(work.path().join("new")).unwrap();
    let output = run(&[
        "clone",
        "--source",
        &source,
        "--pgdata",
        pgdata.to_str().unwrap(),
        "--tablespace-mapping",
        &mapping,
        "--no-sync",
    ]);
    assert!(output.status.success(), "{}", text(&output));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&mapped).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    let oid = primary
        .query_value("SELECT oid FROM pg_tablespace WHERE spcname = 'ts2'")
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_link(pgdata.join("pg_tblspc").join(&oid)).unwrap(),
        mapped
    );
    assert!(
        snapshot(&location) == before,
        "the source tablespace changed"
    );
}
