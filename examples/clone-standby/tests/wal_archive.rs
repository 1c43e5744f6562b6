//! `clone-standby receive-wal --repo`: the streamed WAL archive on a real Garage store,
//! against real primaries (version from PGREPL_TEST_PG): stored segments equal the
//! server's, restarts after `kill -9` converge with no gap, the synchronous mode holds
//! COMMITs until their WAL is stored, the loss window is bounded by --flush-interval,
//! a cut connection to the store loses nothing, and a second receiver is refused.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::scratch;
use pgrepo::walarchive::{wal_inventory, WalInventory};
use pgrepo::{Repository, StoreOptions};
use pgwire_repl::{Lsn, SqlClient, TimelineId, WalSegmentSize};
use testkit::proxy::{Fault, FaultPlan, Proxy};
use testkit::{Cluster, ClusterOptions, Garage};

const APP: &str = "walarchive";

fn primary() -> Cluster {
    Cluster::start(
        ClusterOptions::new()
            .setting("wal_keep_size", "2GB")
            .setting("max_wal_size", "2GB"),
    )
}

/// The repository through the library, with the store's credentials.
fn repository(garage: &Garage, endpoint: &str, prefix: &str) -> Repository {
    let options = StoreOptions {
        access_key_id: Some(garage.access_key_id().to_string()),
        secret_access_key: Some(pgrepo::Secret::new(garage.secret_access_key())),
        region: Some(garage.region().to_string()),
        endpoint: Some(endpoint.to_string()),
        allow_http: Some(true),
        ..StoreOptions::default()
    };
    Repository::open(&garage.url(prefix), &options).unwrap()
}

struct Receiver {
    child: Child,
    log: std::path::PathBuf,
}

impl Receiver {
    fn start(
        primary: &Cluster,
        garage: &Garage,
        endpoint: &str,
        prefix: &str,
        extra: &[&str],
        log_dir: &std::path::Path,
    ) -> Receiver {
        let log = log_dir.join(format!(
            "receiver-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let source = format!(
            "{} application_name={APP}",
            primary.unix_conninfo(primary.superuser())
        );
        let mut env = garage.env();
        env.retain(|(k, _)| k != "AWS_ENDPOINT_URL");
        env.push(("AWS_ENDPOINT_URL".into(), endpoint.to_string()));
        let url = garage.url(prefix);
        let mut args = vec!["receive-wal", "--source", &source, "--repo", &url];
        args.extend_from_slice(extra);
        let child = Command::new(common::bin())
            .args(&args)
            .envs(env)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Receiver { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill9(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log()
    }

    /// SIGTERM, then the exit status and log.
    fn stop(mut self) -> (bool, String) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.success(), self.log());
            }
            assert!(
                Instant::now() < deadline,
                "receiver ignored SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn exited(&mut self) -> Option<bool> {
        self.child.try_wait().unwrap().map(|s| s.success())
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The end of the contiguous WAL the archive holds on `timeline`, from the first
/// segment stored: complete segments, then the pieces of the next one.
fn stored_end(inventory: &WalInventory, timeline: TimelineId, size: WalSegmentSize) -> Option<Lsn> {
    let mut segments = inventory
        .segments
        .iter()
        .filter(|((t, _), _)| *t == timeline);
    let ((_, first), objects) = segments.next()?;
    let mut next = *first;
    let mut end = Lsn(first * size.bytes() + objects.contiguous_end());
    for ((_, segment), objects) in inventory
        .segments
        .iter()
        .filter(|((t, _), _)| *t == timeline)
    {
        if *segment != next {
            break;
        }
        if objects.complete.is_some() {
            next += 1;
            end = Lsn(next * size.bytes());
        } else {
            end = Lsn(segment * size.bytes() + objects.contiguous_end());
            break;
        }
    }
    Some(end)
}

/// Checks that the archive has no hole on timeline 1 from its first segment, that every
/// complete segment decompresses byte for byte to the server's file, and that stored
/// pieces equal the start of the server's file; returns how many complete segments were
/// compared.
async fn check_archive_against_server(repo: &Repository, primary: &Cluster) -> usize {
    let size = WalSegmentSize::DEFAULT;
    let inventory = wal_inventory(repo, size).await.unwrap();
    let mut compared = 0;
    let mut previous: Option<(TimelineId, u64)> = None;
    for ((timeline, segment), objects) in &inventory.segments {
        if let Some((previous_timeline, previous)) = previous {
            if previous_timeline == *timeline {
                assert_eq!(
                    *segment,
                    previous + 1,
                    "a hole in the archive after segment {previous:X} of timeline {timeline}"
                );
            } else {
                // A new timeline starts with the segment holding the switch point.
                assert!(
                    *segment <= previous + 1,
                    "a hole before timeline {timeline}"
                );
            }
        }
        previous = Some((*timeline, *segment));
        let name = pgwire_repl::types::wal_file_name(*timeline, *segment, size);
        let on_server = std::fs::read(primary.data_dir().join("pg_wal").join(&name)).unwrap();
        match &objects.complete {
            Some(path) => {
                let stored = repo.get_bytes(path, 64 << 20).await.unwrap();
                let plain = if path.as_ref().ends_with(".zst") {
                    zstd::bulk::decompress(&stored, size.bytes() as usize).unwrap()
                } else {
                    stored.to_vec()
                };
                assert!(plain == on_server, "{name} differs from the server's file");
                assert!(
                    objects.pieces.is_empty(),
                    "{name}: pieces were not folded away: {:?}",
                    objects.pieces
                );
                compared += 1;
            }
            None => {
                let end = objects.contiguous_end() as usize;
                let mut assembled = Vec::new();
                for (from, to, path) in &objects.pieces {
                    if *from as usize > assembled.len() {
                        break;
                    }
                    let bytes = repo.get_bytes(path, 64 << 20).await.unwrap();
                    assert_eq!(bytes.len() as u64, to - from);
                    let skip = assembled.len() - *from as usize;
                    assembled.extend_from_slice(&bytes[skip.min(bytes.len())..]);
                }
                assert_eq!(assembled.len(), end);
                assert!(
                    assembled[..] == on_server[..end],
                    "the pieces of {name} differ from the server's file"
                );
            }
        }
    }
    compared
}

async fn current_lsn(sql: &mut SqlClient) -> Lsn {
    let value = sql
        .query_value("SELECT pg_current_wal_lsn()")
        .await
        .unwrap()
        .unwrap();
    value.parse().unwrap()
}

async fn wait_for_stored(repo: &Repository, target: Lsn, receiver: &Receiver, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let inventory = wal_inventory(repo, WalSegmentSize::DEFAULT).await.unwrap();
        if stored_end(&inventory, TimelineId(1), WalSegmentSize::DEFAULT)
            .is_some_and(|e| e >= target)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the archive did not reach {target} within {within:?}:\n{}",
            receiver.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_segments_equal_the_servers_and_restarts_after_kill_9_leave_no_gap() {
    let primary = primary();
    let garage = Garage::start();
    let logs = scratch();
    let endpoint = garage.endpoint();
    let repo = repository(&garage, &endpoint, "kill9");
    let mut sql = primary.sql().await;
    sql.batch("CREATE TABLE t (id bigserial, payload text)")
        .await
        .unwrap();
    // PostgreSQL 13 and 14 cannot report a slot's position over replication: name the
    // start, which applies while the archive is still empty (a receiver killed before
    // it stored anything).
    let start = current_lsn(&mut sql).await.to_string();
    let slot_args = ["--slot", "archive", "--create-slot", "--start-lsn", &start];
    let mut receiver = Receiver::start(
        &primary,
        &garage,
        &endpoint,
        "kill9",
        &slot_args,
        logs.path(),
    );
    let mut rounds = 0;
    let mut seed = 0x9E37_79B9u64;
    for round in 0..4 {
        // WAL in several shapes: bulk rows, many small commits, a segment switch.
        sql.batch(&format!(
            "INSERT INTO t (payload) SELECT md5(g::text || '{round}') || repeat('x', 200) FROM generate_series(1, 30000) g"
        ))
        .await
        .unwrap();
        for i in 0..50 {
            sql.batch(&format!(
                "INSERT INTO t (payload) VALUES ('small {round} {i}')"
            ))
            .await
            .unwrap();
        }
        if round % 2 == 0 {
            sql.batch("SELECT pg_switch_wal()").await.unwrap();
        }
        // kill -9 at a pseudo-random moment, then start again.
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        tokio::time::sleep(Duration::from_millis(100 + (seed >> 33) % 900)).await;
        let log = receiver.kill9();
        assert!(!log.contains("panicked"), "{log}");
        receiver = Receiver::start(
            &primary,
            &garage,
            &endpoint,
            "kill9",
            &slot_args,
            logs.path(),
        );
        rounds += 1;
    }
    let target = current_lsn(&mut sql).await;
    wait_for_stored(&repo, target, &receiver, Duration::from_secs(60)).await;
    let (ok, log) = receiver.stop();
    assert!(ok, "the receiver failed after {rounds} restarts:\n{log}");
    assert!(log.contains("stopped"), "{log}");
    let compared = check_archive_against_server(&repo, &primary).await;
    let listed = wal_inventory(&repo, WalSegmentSize::DEFAULT).await.unwrap();
    assert!(
        compared >= 3,
        "only {compared} complete segments to compare: {:?}\n{log}",
        listed.segments
    );
    // The slot never moved past what the archive holds.
    let inventory = wal_inventory(&repo, WalSegmentSize::DEFAULT).await.unwrap();
    let end = stored_end(&inventory, TimelineId(1), WalSegmentSize::DEFAULT).unwrap();
    let restart: Lsn = sql
        .query_value("SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = 'archive'")
        .await
        .unwrap()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        restart <= end,
        "the slot is at {restart}, past the archive's end {end}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_receiver_on_the_same_repository_is_refused() {
    let primary = primary();
    let garage = Garage::start();
    let logs = scratch();
    let endpoint = garage.endpoint();
    let first = Receiver::start(&primary, &garage, &endpoint, "twice", &[], logs.path());
    let repo = repository(&garage, &endpoint, "twice");
    // Wait until the first holds the lease.
    let deadline = Instant::now() + Duration::from_secs(30);
    while repo
        .get_optional(&repo.path("locks/receiver.json"), 1 << 16)
        .await
        .unwrap()
        .is_none()
    {
        assert!(Instant::now() < deadline, "no lease:\n{}", first.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut second = Receiver::start(
        &primary,
        &garage,
        &endpoint,
        "twice",
        &["--no-loop"],
        logs.path(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let ok = loop {
        if let Some(ok) = second.exited() {
            break ok;
        }
        assert!(
            Instant::now() < deadline,
            "the second receiver kept running:\n{}",
            second.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!ok, "the second receiver succeeded:\n{}", second.log());
    assert!(
        second.log().contains("another WAL receiver holds"),
        "{}",
        second.log()
    );
    // The first one stops cleanly and frees the lease: a new one starts at once.
    let (ok, log) = first.stop();
    assert!(ok, "{log}");
    assert!(repo
        .get_optional(&repo.path("locks/receiver.json"), 1 << 16)
        .await
        .unwrap()
        .is_none());
}

/// Piece objects in the archive now (pieces of completed segments are folded away).
async fn piece_count(repo: &Repository) -> usize {
    let inventory = wal_inventory(repo, WalSegmentSize::DEFAULT).await.unwrap();
    inventory.segments.values().map(|s| s.pieces.len()).sum()
}

/// Commits one row in its own connection and returns when the COMMIT returned.
fn spawn_commit(primary: &Cluster, value: &str) -> tokio::task::JoinHandle<Instant> {
    let config = primary.config(primary.superuser());
    let sql_text = format!("INSERT INTO sync_rows VALUES ('{value}')");
    tokio::spawn(async move {
        let mut sql = SqlClient::connect(&config).await.unwrap();
        sql.batch(&sql_text).await.unwrap();
        Instant::now()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronous_commits_wait_for_the_store_and_never_return_before_it_holds_them() {
    let mut primary = primary();
    let garage = Garage::start();
    let logs = scratch();
    let endpoint = garage.endpoint();
    let repo = repository(&garage, &endpoint, "sync");
    let mut sql = primary.sql().await;
    sql.batch("CREATE TABLE sync_rows (v text)").await.unwrap();
    let args = ["--synchronous", "--slot", "sync", "--create-slot"];
    let mut receiver = Receiver::start(&primary, &garage, &endpoint, "sync", &args, logs.path());
    sql.batch(&format!(
        "ALTER SYSTEM SET synchronous_standby_names = '{APP}'"
    ))
    .await
    .unwrap();
    primary.reload().await;
    // Wait until the server counts the receiver as its synchronous standby.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let state = sql
            .query_value(&format!(
                "SELECT coalesce((SELECT sync_state FROM pg_stat_replication WHERE application_name = '{APP}'), 'absent')"
            ))
            .await
            .unwrap();
        if state.as_deref() == Some("sync") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not a synchronous standby ({state:?}):\n{}",
            receiver.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Commits return while the store answers; their WAL is stored when they do.
    let start = Instant::now();
    for i in 0..20 {
        spawn_commit(&primary, &format!("fast {i}")).await.unwrap();
        let lsn = current_lsn(&mut sql).await;
        let inventory = wal_inventory(&repo, WalSegmentSize::DEFAULT).await.unwrap();
        let end = stored_end(&inventory, TimelineId(1), WalSegmentSize::DEFAULT).unwrap();
        // The commit record ends at or before the position read after it returned; the
        // store holds at least up to the commit (allowing for WAL written after it).
        assert!(
            end.0 + 8192 >= lsn.0 || end >= lsn,
            "commit {i} returned with the store at {end}, WAL at {lsn}"
        );
    }
    let per_commit = start.elapsed() / 20;
    eprintln!("synchronous commit with the store answering: {per_commit:?} each (with checks)");

    // The store stops answering: a COMMIT blocks, and returns once the store is back.
    let pieces_before = piece_count(&repo).await;
    garage.pause();
    let blocked: Vec<_> = (0..12)
        .map(|i| spawn_commit(&primary, &format!("during pause {i}")))
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        blocked.iter().all(|c| !c.is_finished()),
        "a COMMIT returned while the store was paused"
    );
    let resumed_at = Instant::now();
    garage.resume();
    for commit in blocked {
        let returned = tokio::time::timeout(Duration::from_secs(60), commit)
            .await
            .expect("a COMMIT did not return after the store came back")
            .unwrap();
        assert!(returned >= resumed_at);
    }
    // Group commit: the twelve commits that waited went into very few uploads (the one
    // in flight when the store stopped, then one for everything that arrived meanwhile).
    let pieces_during = piece_count(&repo).await - pieces_before;
    assert!(
        pieces_during <= 4,
        "{pieces_during} pieces were stored for 12 commits that waited together"
    );

    // The receiver is killed: a COMMIT blocks until a new receiver has stored it.
    let log = receiver.kill9();
    assert!(!log.contains("panicked"), "{log}");
    let blocked = spawn_commit(&primary, "while killed");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !blocked.is_finished(),
        "a COMMIT returned with no receiver running"
    );
    let before_restart = wal_inventory(&repo, WalSegmentSize::DEFAULT).await.unwrap();
    let end_before = stored_end(&before_restart, TimelineId(1), WalSegmentSize::DEFAULT).unwrap();
    receiver = Receiver::start(&primary, &garage, &endpoint, "sync", &args, logs.path());
    tokio::time::timeout(Duration::from_secs(60), blocked)
        .await
        .expect("the COMMIT did not return after the receiver restarted")
        .unwrap();
    let lsn = current_lsn(&mut sql).await;
    let after = wal_inventory(&repo, WalSegmentSize::DEFAULT).await.unwrap();
    let end_after = stored_end(&after, TimelineId(1), WalSegmentSize::DEFAULT).unwrap();
    assert!(
        end_after > end_before,
        "nothing new was stored for the blocked commit"
    );
    assert!(end_after.0 + 8192 >= lsn.0);
    let (ok, log) = receiver.stop();
    assert!(ok, "{log}");
    // Stop waiting for a standby before the cluster shuts down.
    sql.batch("ALTER SYSTEM RESET synchronous_standby_names")
        .await
        .unwrap();
    sql.batch("SELECT pg_reload_conf()").await.unwrap();
    drop(sql);
    check_archive_against_server(&repo, &primary).await;
    primary.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cuts_between_the_receiver_and_the_store_lose_nothing() {
    let primary = primary();
    let garage = Garage::start();
    let logs = scratch();
    let cut = |at| FaultPlan::client_to_server(Fault::Cut { at });
    // The first connections die after a few KiB to a few MiB; later ones pass.
    let proxy = Proxy::start(
        garage.s3_port(),
        vec![cut(4 << 10), cut(2 << 20), cut(64 << 10), cut(5 << 20)],
    )
    .await;
    let endpoint = format!("http://127.0.0.1:{}", proxy.port());
    let repo = repository(&garage, &garage.endpoint(), "cuts");
    let mut sql = primary.sql().await;
    sql.batch("CREATE TABLE t (id bigserial, payload text)")
        .await
        .unwrap();
    let receiver = Receiver::start(
        &primary,
        &garage,
        &endpoint,
        "cuts",
        &["--slot", "cuts", "--create-slot", "--flush-interval", "0.2"],
        logs.path(),
    );
    for round in 0..3 {
        sql.batch(&format!(
            "INSERT INTO t (payload) SELECT md5(g::text || '{round}') || repeat('y', 300) FROM generate_series(1, 30000) g; SELECT pg_switch_wal()"
        ))
        .await
        .unwrap();
    }
    let target = current_lsn(&mut sql).await;
    wait_for_stored(&repo, target, &receiver, Duration::from_secs(120)).await;
    let (ok, log) = receiver.stop();
    assert!(ok, "{log}");
    let compared = check_archive_against_server(&repo, &primary).await;
    assert!(compared >= 3, "only {compared} complete segments");
    assert!(proxy.connections() > 1, "the proxy saw no reconnection");
}

/// The loss bound end to end: a backup, the receiver streaming, a stream of
/// acknowledged commits, then this host and the primary lost together (the receiver
/// killed, the primary stopped with `-m immediate` at once), and a restore from the
/// repository alone (restore_command = wal-fetch --partial). Returns the restored ids
/// and, for each acknowledged commit, how long before the crash it was acknowledged.
async fn crash_and_restore(synchronous: bool) -> (Vec<i64>, Vec<(i64, Duration)>) {
    let primary = primary();
    let garage = Garage::start();
    let logs = scratch();
    let endpoint = garage.endpoint();
    let prefix = if synchronous {
        "loss-sync"
    } else {
        "loss-async"
    };
    let store = common::repo::Store {
        url: garage.url(prefix),
        env: garage.env(),
    };
    let mut sql = primary.sql().await;
    sql.batch("CREATE TABLE acked (id bigint PRIMARY KEY)")
        .await
        .unwrap();
    let mut args = vec!["--slot", "loss", "--create-slot", "--flush-interval", "1"];
    if synchronous {
        args.push("--synchronous");
    }
    let receiver = Receiver::start(&primary, &garage, &endpoint, prefix, &args, logs.path());
    if synchronous {
        sql.batch(&format!(
            "ALTER SYSTEM SET synchronous_standby_names = '{APP}'"
        ))
        .await
        .unwrap();
        sql.batch("SELECT pg_reload_conf()").await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while sql
            .query_value(&format!(
                "SELECT coalesce((SELECT sync_state FROM pg_stat_replication WHERE application_name = '{APP}'), 'absent')"
            ))
            .await
            .unwrap()
            .as_deref()
            != Some("sync")
        {
            assert!(
                Instant::now() < deadline,
                "not synchronous:\n{}",
                receiver.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let source = primary.unix_conninfo(primary.superuser());
    let backup = common::repo::run_with(
        &store,
        &[
            "backup", "--source", &source, "--repo", &store.url, "--label", "base",
        ],
    )
    .await;
    assert!(backup.status.success(), "{}", common::text(&backup));
    // Acknowledged commits for a few seconds, from two sessions.
    let mut acked: Vec<(i64, Instant)> = Vec::new();
    let mut other = primary.sql().await;
    let until = Instant::now() + Duration::from_secs(4);
    let mut id = 0i64;
    while Instant::now() < until {
        let session = if id % 2 == 0 { &mut sql } else { &mut other };
        session
            .batch(&format!("INSERT INTO acked VALUES ({id})"))
            .await
            .unwrap();
        acked.push((id, Instant::now()));
        id += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The host and the primary are lost together.
    let crash = Instant::now();
    let log = receiver.kill9();
    common::stop_immediately(&primary);
    assert!(!log.contains("panicked"), "{log}");
    drop((sql, other));

    let pgdata = logs.path().join("restored");
    let restore = common::repo::run_with(
        &store,
        &[
            "restore",
            "--repo",
            &store.url,
            "--pgdata",
            pgdata.to_str().unwrap(),
        ],
    )
    .await;
    assert!(restore.status.success(), "{}", common::text(&restore));
    let restored = Cluster::start_on_data_dir(&pgdata, ClusterOptions::new());
    common::wait_promoted(&restored).await;
    let ids = restored
        .query_value("SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM acked")
        .await
        .unwrap();
    let ids: Vec<i64> = ids
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    let ages = acked
        .into_iter()
        .map(|(id, at)| (id, crash.duration_since(at)))
        .collect();
    (ids, ages)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loses_at_most_the_flush_interval_of_acknowledged_commits() {
    let (restored, acked) = crash_and_restore(false).await;
    let restored: std::collections::BTreeSet<i64> = restored.into_iter().collect();
    let lost: Vec<&(i64, Duration)> = acked
        .iter()
        .filter(|(id, _)| !restored.contains(id))
        .collect();
    let oldest_lost = lost.iter().map(|(_, age)| *age).max();
    eprintln!(
        "loss window (--flush-interval 1): {} of {} acknowledged commits lost; the oldest lost was acknowledged {:?} before the crash",
        lost.len(),
        acked.len(),
        oldest_lost
    );
    for (id, age) in &lost {
        assert!(
            *age <= Duration::from_secs(1),
            "commit {id}, acknowledged {age:?} before the crash, is missing after the restore"
        );
    }
    // Commits ran one after the other: what survived is a prefix of them.
    let highest = restored.iter().max().copied().unwrap_or(-1);
    assert_eq!(
        restored.len() as i64,
        highest + 1,
        "the restored commits have a hole"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_synchronous_mode_a_crash_loses_no_acknowledged_commit() {
    let (restored, acked) = crash_and_restore(true).await;
    let restored: std::collections::BTreeSet<i64> = restored.into_iter().collect();
    let lost: Vec<i64> = acked
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| !restored.contains(id))
        .collect();
    eprintln!(
        "synchronous mode: {} acknowledged commits, {} restored, lost: {lost:?}",
        acked.len(),
        restored.len()
    );
    assert!(
        lost.is_empty(),
        "acknowledged commits lost in synchronous mode: {lost:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promotion_is_followed_and_the_history_file_archived() {
    let primary = primary();
    let standby = testkit::Standby::start(
        &primary,
        ClusterOptions::new().setting("wal_keep_size", "2GB"),
    )
    .await;
    let garage = Garage::start();
    let logs = scratch();
    let endpoint = garage.endpoint();
    let repo = repository(&garage, &endpoint, "timelines");
    let mut on_primary = primary.sql().await;
    on_primary
        .batch("CREATE TABLE t (id bigserial, payload text)")
        .await
        .unwrap();
    // Cascading: the receiver streams from the standby.
    let receiver = Receiver::start(&standby, &garage, &endpoint, "timelines", &[], logs.path());
    on_primary
        .batch("INSERT INTO t (payload) SELECT repeat(md5(g::text), 8) FROM generate_series(1, 20000) g")
        .await
        .unwrap();
    on_primary.batch("SELECT pg_switch_wal()").await.unwrap();
    on_primary
        .batch("INSERT INTO t (payload) SELECT md5(g::text) FROM generate_series(1, 1000) g")
        .await
        .unwrap();
    let target = current_lsn(&mut on_primary).await;
    let mut on_standby = standby.sql().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let replayed: Lsn = on_standby
            .query_value("SELECT pg_last_wal_replay_lsn()")
            .await
            .unwrap()
            .unwrap()
            .parse()
            .unwrap();
        if replayed >= target {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the standby did not replay {target}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    standby.promote();
    drop(on_standby);
    let mut on_new_primary = standby.sql().await;
    on_new_primary
        .batch("INSERT INTO t (payload) SELECT md5(g::text) FROM generate_series(1, 5000) g")
        .await
        .unwrap();
    on_new_primary
        .batch("SELECT pg_switch_wal()")
        .await
        .unwrap();
    let end = current_lsn(&mut on_new_primary).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let inventory = wal_inventory(&repo, WalSegmentSize::DEFAULT).await.unwrap();
        if stored_end(&inventory, TimelineId(2), WalSegmentSize::DEFAULT).is_some_and(|e| e >= end)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "timeline 2 was not archived up to {end}:\n{}",
            receiver.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (ok, log) = receiver.stop();
    assert!(ok, "{log}");
    let history = repo
        .get_bytes(&repo.path("wal/00000002/00000002.history"), 1 << 20)
        .await
        .unwrap();
    let on_disk = std::fs::read(standby.data_dir().join("pg_wal/00000002.history")).unwrap();
    assert_eq!(&history[..], &on_disk[..]);
    let compared = check_archive_against_server(&repo, &standby).await;
    assert!(compared >= 2, "only {compared} complete segments");
    let inventory = wal_inventory(&repo, WalSegmentSize::DEFAULT).await.unwrap();
    assert!(inventory.segments.keys().any(|(t, _)| *t == TimelineId(1)));
    assert!(inventory.segments.keys().any(|(t, _)| *t == TimelineId(2)));
}
