//! `clone-standby wal-fetch`, `restore`'s restore_command and point-in-time recovery,
//! and `delete` (retention), against real servers (PGREPL_TEST_PG) and a real Garage
//! store. The WAL archive is filled here from a server's own pg_wal, under the names of
//! `pgrepo::walnames`, so these tests do not depend on the receiver.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::repo::{run_with, Store};
use common::{scratch, text};
use pgrepo::walnames;
use pgrepo::{Repository, StoreOptions};
use pgwire_repl::types::{parse_wal_file_name, wal_file_name};
use pgwire_repl::{Lsn, TimelineId, WalSegmentSize};
use testkit::{Cluster, ClusterOptions, Garage};

fn garage_repo(garage: &Garage, prefix: &str) -> Repository {
    Repository::open(
        &garage.url(prefix),
        &StoreOptions {
            access_key_id: Some(garage.access_key_id().into()),
            secret_access_key: Some(pgrepo::Secret::new(garage.secret_access_key())),
            region: Some(garage.region().into()),
            endpoint: Some(garage.endpoint()),
            allow_http: Some(true),
            ..StoreOptions::default()
        },
    )
    .unwrap()
}

/// A store-config file (0600) for `prefix`, so that wal-fetch runs without AWS_*.
fn store_config(garage: &Garage, prefix: &str, dir: &Path) -> PathBuf {
    let path = dir.join(format!("{}-store.json", prefix.replace('/', "-")));
    let json = serde_json::json!({
        "repo": garage.url(prefix),
        "endpoint": garage.endpoint(),
        "region": garage.region(),
        "access_key_id": garage.access_key_id(),
        "secret_access_key": garage.secret_access_key(),
        "allow_http": true,
    });
    std::fs::write(&path, json.to_string()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// Runs the binary with no AWS_* variables at all (as a server's restore_command).
fn run_bare(args: &[&str]) -> Output {
    std::process::Command::new(common::bin())
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .unwrap()
}

struct Wal {
    system_id: String,
    segment_size: WalSegmentSize,
    /// Complete segments of timeline 1, by number: their bytes.
    segments: Vec<(u64, Vec<u8>)>,
}

/// Fills a server with WAL (a table of several segments, then switches) and returns
/// the complete segments of its pg_wal.
async fn make_wal(primary: &Cluster) -> Wal {
    primary
        .execute(
            "CREATE TABLE filler AS SELECT g, md5(g::text) || md5((g * 3)::text) AS m FROM generate_series(1, 250000) g;",
        )
        .await;
    for i in 0..5 {
        primary
            .execute(&format!(
                "INSERT INTO filler VALUES ({i}, 'x'); SELECT pg_switch_wal();"
            ))
            .await;
    }
    wal_of(primary).await
}

async fn wal_of(primary: &Cluster) -> Wal {
    let system_id = primary
        .query_value("SELECT system_identifier::text FROM pg_control_system()")
        .await
        .unwrap();
    let size: u64 = primary
        .query_value("SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'")
        .await
        .unwrap()
        .parse()
        .unwrap();
    let segment_size = WalSegmentSize::new(size).unwrap();
    let current = primary
        .query_value("SELECT pg_walfile_name(pg_current_wal_lsn())")
        .await
        .unwrap();
    let (_, current) = parse_wal_file_name(&current, segment_size).unwrap();
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(primary.data_dir().join("pg_wal")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if let Some((tli, n)) = parse_wal_file_name(&name, segment_size) {
            if tli == TimelineId(1) && n < current && !name.ends_with(".partial") {
                let bytes = std::fs::read(primary.data_dir().join("pg_wal").join(&name)).unwrap();
                segments.push((n, bytes));
            }
        }
    }
    segments.sort_by_key(|(n, _)| *n);
    Wal {
        system_id,
        segment_size,
        segments,
    }
}

async fn put(repo: &Repository, relative: &str, bytes: Vec<u8>) {
    repo.put_bytes(&repo.path(relative), bytes.into())
        .await
        .unwrap();
}

async fn put_archive_record(repo: &Repository, wal: &Wal) {
    let record = serde_json::json!({
        "format": 1,
        "system_identifier": wal.system_id,
        "segment_size": wal.segment_size.bytes(),
    });
    put(
        repo,
        walnames::ARCHIVE_RECORD,
        record.to_string().into_bytes(),
    )
    .await;
}

async fn put_segment(repo: &Repository, wal: &Wal, number: u64, bytes: &[u8], compressed: bool) {
    let name = wal_file_name(TimelineId(1), number, wal.segment_size);
    let object = walnames::segment_object(TimelineId(1), &name, compressed);
    let stored = if compressed {
        zstd::bulk::compress(bytes, 3).unwrap()
    } else {
        bytes.to_vec()
    };
    put(repo, &object, stored).await;
}

fn name(wal: &Wal, number: u64) -> String {
    wal_file_name(TimelineId(1), number, wal.segment_size)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_fetch_serves_verified_segments_pieces_and_history_and_prefetches() {
    let primary = Cluster::start(ClusterOptions::new().setting("wal_keep_size", "1GB"));
    let wal = make_wal(&primary).await;
    assert!(
        wal.segments.len() >= 6,
        "enough complete segments: {}",
        wal.segments.len()
    );
    let garage = Garage::start();
    let repo = garage_repo(&garage, "fetch");
    let work = scratch();
    let config = store_config(&garage, "fetch", work.path());
    let config_text = config.to_str().unwrap();
    put_archive_record(&repo, &wal).await;

    // The first segments complete (one stored uncompressed); the next one only as two
    // pieces; one more damaged; the rest absent.
    let complete = &wal.segments[..wal.segments.len() - 2];
    for (i, (n, bytes)) in complete.iter().enumerate() {
        put_segment(&repo, &wal, *n, bytes, i != 1).await;
    }
    let (pieces_n, pieces_bytes) = &wal.segments[wal.segments.len() - 2];
    let cut = 3 * 8192 + 1234;
    let end = 5 * 8192 + 77;
    for (from, to) in [(0, cut), (cut, end)] {
        let object = walnames::partial_object(
            TimelineId(1),
            &name(&wal, *pieces_n),
            from as u64,
            to as u64,
        );
        put(&repo, &object, pieces_bytes[from..to].to_vec()).await;
    }
    let (damaged_n, damaged_bytes) = &wal.segments[wal.segments.len() - 1];
    let mut damaged = damaged_bytes.clone();
    let middle = damaged.len() / 2 + 4096;
    for b in &mut damaged[middle..middle + 8] {
        *b ^= 0xff;
    }
    put_segment(&repo, &wal, *damaged_n, &damaged, true).await;
    let history = b"1\t0/3000000\tno recovery target specified\n".to_vec();
    put(
        &repo,
        &walnames::history_object(TimelineId(2)),
        history.clone(),
    )
    .await;

    let pg_wal = work.path().join("pg_wal");
    std::fs::create_dir(&pg_wal).unwrap();
    let dest = pg_wal.join("RECOVERYXLOG");
    let dest_text = dest.to_str().unwrap();
    let cache = pg_wal.join("pgrepo-prefetch");
    let fetch = |file: &str, extra: &[&str]| {
        let mut args = vec!["wal-fetch", "--store-config", config_text];
        args.extend_from_slice(extra);
        args.push(file);
        args.push(dest_text);
        run_bare(&args)
    };

    // The first complete segment: byte-identical, and the next ones prefetched.
    let (first_n, first_bytes) = &complete[0];
    let out = fetch(&name(&wal, *first_n), &["--prefetch", "3"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        std::fs::read(&dest).unwrap() == *first_bytes,
        "first segment differs"
    );
    let cached: Vec<String> = {
        let mut names: Vec<String> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let expected: Vec<String> = complete[1..4].iter().map(|(n, _)| name(&wal, *n)).collect();
    assert_eq!(cached, expected, "the next three segments were prefetched");

    // Served from the cache: it is used even once the object in the store is garbage
    // (a fetch from the store would fail), and the entry moves out of the cache.
    let (second_n, second_bytes) = &complete[1];
    let second_object = walnames::segment_object(TimelineId(1), &name(&wal, *second_n), false);
    put(&repo, &second_object, b"garbage".to_vec()).await;
    std::fs::remove_file(&dest).unwrap();
    let out = fetch(&name(&wal, *second_n), &["--prefetch", "3"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        std::fs::read(&dest).unwrap() == *second_bytes,
        "cached segment differs"
    );
    assert!(!cache.join(name(&wal, *second_n)).exists());
    // Older entries are removed when a later segment is asked for.
    let (fourth_n, fourth_bytes) = &complete[3];
    let out = fetch(&name(&wal, *fourth_n), &["--prefetch", "0"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(std::fs::read(&dest).unwrap() == *fourth_bytes);
    assert!(
        !cache.join(name(&wal, complete[2].0)).exists(),
        "old entry removed"
    );

    // Every complete segment, straight from the store.
    for (n, bytes) in complete.iter().skip(2) {
        let out = fetch(&name(&wal, *n), &["--prefetch", "0"]);
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            std::fs::read(&dest).unwrap() == *bytes,
            "segment {n} differs"
        );
    }

    // Only pieces: missing (exit 1, nothing written) unless --partial, which serves
    // them zero-padded.
    std::fs::remove_file(&dest).unwrap();
    let out = fetch(&name(&wal, *pieces_n), &["--prefetch", "0"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(!dest.exists());
    let out = fetch(&name(&wal, *pieces_n), &["--partial"]);
    assert!(out.status.success(), "{}", text(&out));
    let served = std::fs::read(&dest).unwrap();
    assert_eq!(served.len() as u64, wal.segment_size.bytes());
    assert!(served[..end] == pieces_bytes[..end], "pieces differ");
    assert!(served[end..].iter().all(|b| *b == 0), "padding is zeros");

    // Damaged: an error (exit 2), and nothing at DEST.
    std::fs::remove_file(&dest).unwrap();
    let out = fetch(&name(&wal, *damaged_n), &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("invalid WAL"), "{}", text(&out));
    assert!(!dest.exists());
    // With --partial (recovery from the archive alone) the failure is fatal for the server.
    let out = fetch(&name(&wal, *damaged_n), &["--partial"]);
    assert_eq!(out.status.code(), Some(126), "{}", text(&out));
    assert!(!dest.exists());
    // A damaged compressed frame too.
    let mut frame = zstd::bulk::compress(damaged_bytes, 3).unwrap();
    let at = frame.len() / 2;
    frame[at] ^= 0x55;
    let object = walnames::segment_object(TimelineId(1), &name(&wal, *damaged_n), true);
    put(&repo, &object, frame).await;
    let out = fetch(&name(&wal, *damaged_n), &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(!dest.exists());
    assert_eq!(
        std::fs::read_dir(&pg_wal)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name() != "pgrepo-prefetch")
            .count(),
        0,
        "no temporary file left"
    );

    // Beyond the archive: missing.
    let beyond = name(&wal, damaged_n + 1);
    let out = fetch(&beyond, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(!dest.exists());

    // History files, byte for byte; a missing one is missing.
    let out = fetch("00000002.history", &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read(&dest).unwrap(), history);
    std::fs::remove_file(&dest).unwrap();
    let out = fetch("00000003.history", &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(!dest.exists());

    // A store configuration others can read is refused.
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = fetch("00000002.history", &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("chmod 0600"), "{}", text(&out));
    assert!(!dest.exists());
}

/// Segments `from..=to` of the primary's pg_wal into the archive (timeline 1).
async fn archive_segments(repo: &Repository, wal: &Wal, from: u64) {
    for (n, bytes) in wal.segments.iter().filter(|(n, _)| *n >= from) {
        put_segment(repo, wal, *n, bytes, true).await;
    }
}

/// Stops a server at once (`pg_ctl stop -m immediate`: SIGQUIT to the postmaster).
fn stop_immediately(cluster: &Cluster) {
    let pid = cluster.pid().expect("running") as i32;
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid, libc::SIGQUIT) };
    let started = Instant::now();
    // SAFETY: as above; signal 0 only checks that the process exists.
    while unsafe { libc::kill(pid, 0) } == 0 && started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until a restored server has finished recovery (promoted).
async fn wait_promoted(cluster: &Cluster) {
    let started = Instant::now();
    loop {
        if cluster
            .query_value("SELECT pg_is_in_recovery()::text")
            .await
            .as_deref()
            == Some("false")
        {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "recovery did not end:\n{}",
            cluster.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Point-in-time recovery from the repository alone, the WAL archive filled from the
/// primary's pg_wal: restore --target-lsn writes restore_command (this binary's
/// wal-fetch with a 0600 store configuration) and the target, and the restored server
/// holds exactly the rows committed before the mark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_to_a_target_lsn_from_the_repository_alone() {
    let primary = Cluster::start(ClusterOptions::new().setting("wal_keep_size", "1GB"));
    let garage = Garage::start();
    let store = Store {
        url: garage.url("pitr"),
        env: garage.env(),
    };
    let source = primary.unix_conninfo(primary.superuser());
    primary
        .execute("CREATE TABLE marks (id int PRIMARY KEY, phase text)")
        .await;
    let backup = run_with(
        &store,
        &[
            "backup", "--source", &source, "--repo", &store.url, "--label", "base",
        ],
    )
    .await;
    assert!(backup.status.success(), "backup:\n{}", text(&backup));

    primary
        .execute("INSERT INTO marks SELECT g, 'before' FROM generate_series(1, 1000) g")
        .await;
    primary
        .execute(
            "CREATE TABLE bulk AS SELECT g, md5(g::text) AS m FROM generate_series(1, 100000) g",
        )
        .await;
    let mark: Lsn = primary
        .query_value("SELECT pg_current_wal_lsn()::text")
        .await
        .unwrap()
        .parse()
        .unwrap();
    primary
        .execute("INSERT INTO marks SELECT g, 'after' FROM generate_series(1001, 2000) g")
        .await;
    primary
        .execute("INSERT INTO bulk SELECT g, 'later' FROM generate_series(1, 50000) g; SELECT pg_switch_wal();")
        .await;
    let wal = wal_of(&primary).await;
    stop_immediately(&primary);

    let repo = garage_repo(&garage, "pitr");
    put_archive_record(&repo, &wal).await;
    let first = wal.segments.first().unwrap().0;
    archive_segments(&repo, &wal, first).await;

    let work = scratch();
    let pgdata = work.path().join("pitr");
    let mark_text = mark.to_string();
    let restore = run_with(
        &store,
        &[
            "restore",
            "--repo",
            &store.url,
            "--pgdata",
            pgdata.to_str().unwrap(),
            "--target-lsn",
            &mark_text,
        ],
    )
    .await;
    assert!(restore.status.success(), "restore:\n{}", text(&restore));
    assert!(text(&restore).contains("mode 0600"), "{}", text(&restore));
    let auto_conf = std::fs::read_to_string(pgdata.join("postgresql.auto.conf")).unwrap();
    assert!(
        auto_conf.contains(&format!("recovery_target_lsn = '{mark_text}'")),
        "{auto_conf}"
    );
    assert!(
        auto_conf.contains("recovery_target_action = 'promote'"),
        "{auto_conf}"
    );
    assert!(
        auto_conf.contains("wal-fetch --store-config"),
        "{auto_conf}"
    );
    assert!(auto_conf.contains("--partial %f %p"), "{auto_conf}");
    assert!(pgdata.join("recovery.signal").exists());
    let config = pgdata.join("pgrepo-store.json");
    let mode = std::fs::metadata(&config).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let restored = Cluster::start_on_data_dir(&pgdata, ClusterOptions::new());
    wait_promoted(&restored).await;
    let counts = restored
        .query_value("SELECT count(*) FILTER (WHERE phase = 'before') || '/' || count(*) FILTER (WHERE phase = 'after') FROM marks")
        .await
        .unwrap();
    assert_eq!(
        counts,
        "1000/0",
        "rows before the mark only:\n{}",
        restored.log()
    );
    assert!(
        restored.log().contains("from archive"),
        "WAL came through restore_command:\n{}",
        restored.log()
    );
    let bulk = restored
        .query_value("SELECT count(*) FROM bulk")
        .await
        .unwrap();
    assert_eq!(bulk, "100000");

    // A standby restored from the same repository fetches complete segments only (it
    // streams the rest), and has no recovery target.
    let standby_dir = work.path().join("standby");
    let restore = run_with(
        &store,
        &[
            "restore",
            "--repo",
            &store.url,
            "--pgdata",
            standby_dir.to_str().unwrap(),
            "--standby",
            "--source",
            &source,
        ],
    )
    .await;
    assert!(restore.status.success(), "restore:\n{}", text(&restore));
    let auto_conf = std::fs::read_to_string(standby_dir.join("postgresql.auto.conf")).unwrap();
    assert!(auto_conf.contains("primary_conninfo = "), "{auto_conf}");
    assert!(
        auto_conf.contains("wal-fetch --store-config"),
        "{auto_conf}"
    );
    assert!(!auto_conf.contains("--partial"), "{auto_conf}");
    assert!(!auto_conf.contains("recovery_target"), "{auto_conf}");
    assert!(standby_dir.join("standby.signal").exists());
    assert!(!standby_dir.join("recovery.signal").exists());
    // The store configuration carries what the environment held.
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(standby_dir.join("pgrepo-store.json")).unwrap())
            .unwrap();
    assert_eq!(config["repo"], store.url.as_str());
    assert_eq!(config["endpoint"], garage.endpoint().as_str());
    assert_eq!(config["secret_access_key"], garage.secret_access_key());
    assert_eq!(config["allow_http"], true);

    // Opting out: no store configuration, no recovery settings.
    let plain = work.path().join("plain");
    let restore = run_with(
        &store,
        &[
            "restore",
            "--repo",
            &store.url,
            "--pgdata",
            plain.to_str().unwrap(),
            "--no-restore-command",
        ],
    )
    .await;
    assert!(restore.status.success(), "restore:\n{}", text(&restore));
    assert!(!plain.join("pgrepo-store.json").exists());
    assert!(!plain.join("recovery.signal").exists());
    let auto_conf = std::fs::read_to_string(plain.join("postgresql.auto.conf")).unwrap_or_default();
    assert!(!auto_conf.contains("restore_command"), "{auto_conf}");

    // A target needs a point; a standby takes none.
    let other = work.path().join("other");
    for args in [
        vec!["--target-action", "pause"],
        vec![
            "--standby",
            "--source",
            source.as_str(),
            "--target-lsn",
            "0/1",
        ],
    ] {
        let mut all = vec![
            "restore",
            "--repo",
            &store.url,
            "--pgdata",
            other.to_str().unwrap(),
        ];
        all.extend(args);
        let out = run_with(&store, &all).await;
        assert!(!out.status.success(), "{all:?}: {}", text(&out));
        assert!(!other.exists(), "nothing restored for {all:?}");
    }
}

/// The end of the contiguous WAL the archive holds on timeline 1, from its first
/// segment: complete segments, then the pieces of the next one.
async fn stored_end(repo: &Repository, size: WalSegmentSize) -> Option<Lsn> {
    let inventory = pgrepo::walarchive::wal_inventory(repo, size).await.ok()?;
    let mut segments = inventory
        .segments
        .iter()
        .filter(|((t, _), _)| *t == TimelineId(1));
    let ((_, first), _) = segments.next()?;
    let mut end = Lsn(first * size.bytes());
    for ((_, segment), objects) in inventory
        .segments
        .iter()
        .filter(|((t, _), _)| *t == TimelineId(1))
    {
        if Lsn(segment * size.bytes()) != end {
            break;
        }
        if objects.complete.is_some() {
            end = Lsn((segment + 1) * size.bytes());
        } else {
            end = Lsn(segment * size.bytes() + objects.contiguous_end());
            break;
        }
    }
    Some(end)
}

/// The end-to-end point-in-time recovery: a backup and the WAL streamed by
/// `receive-wal --repo`, the primary stopped with `-m immediate`, then `restore
/// --target-lsn` from the repository alone (the last segment served from its pieces).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pitr_from_a_backup_and_the_streamed_wal_archive() {
    let primary = Cluster::start(ClusterOptions::new().setting("wal_keep_size", "1GB"));
    let garage = Garage::start();
    let store = Store {
        url: garage.url("streamed"),
        env: garage.env(),
    };
    let repo = garage_repo(&garage, "streamed");
    let work = scratch();
    let source = primary.unix_conninfo(primary.superuser());
    primary
        .execute("CREATE TABLE marks (id int PRIMARY KEY, phase text)")
        .await;

    // The receiver first, so that the archive holds everything from before the backup.
    let receiver_log = work.path().join("receiver.log");
    let mut receiver = std::process::Command::new(common::bin())
        .args([
            "receive-wal",
            "--source",
            &source,
            "--repo",
            &store.url,
            "--flush-interval",
            "0.2",
        ])
        .envs(store.env.clone())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&receiver_log).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let size = loop {
        if let Some(size) = pgrepo::walfetch::archive_segment_size(&repo).await.unwrap() {
            break size;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60) && receiver.try_wait().unwrap().is_none(),
            "the receiver did not open the archive:\n{}",
            std::fs::read_to_string(&receiver_log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Some WAL below the backup's start, for retention to delete at the end.
    for _ in 0..2 {
        primary
            .execute("INSERT INTO marks VALUES (0, 'filler'); DELETE FROM marks; SELECT pg_switch_wal();")
            .await;
    }
    let backup = run_with(
        &store,
        &[
            "backup", "--source", &source, "--repo", &store.url, "--label", "base",
        ],
    )
    .await;
    assert!(backup.status.success(), "backup:\n{}", text(&backup));

    primary
        .execute("INSERT INTO marks SELECT g, 'before' FROM generate_series(1, 1000) g")
        .await;
    primary
        .execute(
            "CREATE TABLE bulk AS SELECT g, md5(g::text) AS m FROM generate_series(1, 100000) g",
        )
        .await;
    let mark: Lsn = primary
        .query_value("SELECT pg_current_wal_lsn()::text")
        .await
        .unwrap()
        .parse()
        .unwrap();
    // A time between the last commit before the mark and the first after it.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mark_time = primary
        .query_value("SELECT clock_timestamp()::text")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    primary
        .execute("INSERT INTO marks SELECT g, 'after' FROM generate_series(1001, 2000) g")
        .await;
    let after: Lsn = primary
        .query_value("SELECT pg_current_wal_lsn()::text")
        .await
        .unwrap()
        .parse()
        .unwrap();
    let started = Instant::now();
    loop {
        let end = stored_end(&repo, size).await;
        if end.is_some_and(|end| end >= after) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the archive reached only {end:?}, not {after}:\n{}",
            std::fs::read_to_string(&receiver_log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_immediately(&primary);
    let _ = receiver.kill();
    let _ = receiver.wait();
    assert!(mark < after);
    // The target lies in the segment still being written: only its pieces are stored,
    // so recovery reaches it through wal-fetch --partial.
    let inventory = pgrepo::walarchive::wal_inventory(&repo, size)
        .await
        .unwrap();
    let current = inventory
        .segments
        .get(&(TimelineId(1), mark.segment_number(size)))
        .expect("the mark's segment is stored");
    assert!(
        current.complete.is_none() && current.contiguous_end() > mark.segment_offset(size),
        "the mark's segment is stored as pieces only: {current:?}"
    );

    let pgdata = work.path().join("pitr");
    let mark_text = mark.to_string();
    let restore = run_with(
        &store,
        &[
            "restore",
            "--repo",
            &store.url,
            "--pgdata",
            pgdata.to_str().unwrap(),
            "--target-lsn",
            &mark_text,
        ],
    )
    .await;
    assert!(restore.status.success(), "restore:\n{}", text(&restore));
    let restored = Cluster::start_on_data_dir(&pgdata, ClusterOptions::new());
    wait_promoted(&restored).await;
    let counts = restored
        .query_value("SELECT count(*) FILTER (WHERE phase = 'before') || '/' || count(*) FILTER (WHERE phase = 'after') FROM marks")
        .await
        .unwrap();
    assert_eq!(
        counts,
        "1000/0",
        "rows before the mark only:\n{}",
        restored.log()
    );
    assert_eq!(
        restored
            .query_value("SELECT count(*) FROM bulk")
            .await
            .as_deref(),
        Some("100000")
    );
    assert!(
        restored.log().contains("from archive"),
        "WAL came through restore_command:\n{}",
        restored.log()
    );
    drop(restored);

    // The same point by time.
    let by_time = work.path().join("pitr-time");
    let restore = run_with(
        &store,
        &[
            "restore",
            "--repo",
            &store.url,
            "--pgdata",
            by_time.to_str().unwrap(),
            "--target-time",
            &mark_time,
        ],
    )
    .await;
    assert!(restore.status.success(), "restore:\n{}", text(&restore));
    let auto_conf = std::fs::read_to_string(by_time.join("postgresql.auto.conf")).unwrap();
    assert!(
        auto_conf.contains(&format!("recovery_target_time = '{mark_time}'")),
        "{auto_conf}"
    );
    let restored = Cluster::start_on_data_dir(&by_time, ClusterOptions::new());
    wait_promoted(&restored).await;
    let counts = restored
        .query_value("SELECT count(*) FILTER (WHERE phase = 'before') || '/' || count(*) FILTER (WHERE phase = 'after') FROM marks")
        .await
        .unwrap();
    assert_eq!(
        counts,
        "1000/0",
        "rows before the time only:\n{}",
        restored.log()
    );

    // Retention on Garage: the WAL below the only backup's start goes (a dry run first).
    let base_start: Lsn = {
        let list = run_with(&store, &["list", "--repo", &store.url, "--json"]).await;
        let listed: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
        listed[0]["start_lsn"].as_str().unwrap().parse().unwrap()
    };
    let bound = base_start.segment_number(size);
    let below = |inventory: &pgrepo::walarchive::WalInventory| {
        inventory
            .segments
            .keys()
            .filter(|(_, n)| *n < bound)
            .count()
    };
    let before = pgrepo::walarchive::wal_inventory(&repo, size)
        .await
        .unwrap();
    assert!(
        below(&before) >= 2,
        "WAL below the backup's start is stored"
    );
    let dry = run_with(
        &store,
        &[
            "delete",
            "--repo",
            &store.url,
            "--retain",
            "1",
            "--dry-run",
            "--json",
        ],
    )
    .await;
    assert!(dry.status.success(), "{}", text(&dry));
    let again = pgrepo::walarchive::wal_inventory(&repo, size)
        .await
        .unwrap();
    assert_eq!(below(&again), below(&before), "a dry run deletes nothing");
    let done = run_with(
        &store,
        &["delete", "--repo", &store.url, "--retain", "1", "--json"],
    )
    .await;
    assert!(done.status.success(), "{}", text(&done));
    let summary: serde_json::Value = serde_json::from_slice(&done.stdout).unwrap();
    assert_eq!(summary["kept"], serde_json::json!(["base"]), "{summary}");
    let after = pgrepo::walarchive::wal_inventory(&repo, size)
        .await
        .unwrap();
    assert_eq!(below(&after), 0, "{summary}");
    assert_eq!(
        after.segments.len(),
        before.segments.len() - below(&before),
        "only WAL below the backup's start was deleted"
    );
}
