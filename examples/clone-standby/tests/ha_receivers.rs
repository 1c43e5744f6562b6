//! The WAL receivers over time, as an HA stack needs them (issue 22), against real
//! servers: `clone-standby receive-wal --directory`, `--repo` (Garage) and our
//! `pg_receivewal`, each on its own slot.
//!
//! - Under load, every receiver's slot stays within one segment of what it holds
//!   (within 15 s), on one connection: the directory writers report each completed
//!   segment as flushed, as PostgreSQL's pg_receivewal does.
//! - An idle primary (150 s without writes) keeps one connection per receiver: a
//!   receiver asks a silent server for a reply instead of timing out.
//! - A server frozen with SIGSTOP is noticed within the dead-peer bound, and the
//!   receiver streams again once it is back.
//! - A missing slot is waited for, not fatal; `--endpos` on a segment boundary
//!   completes that segment and writes nothing after it.
//!
//! The slow scenarios run on one server version (15, the one Patroni's test uses);
//! the slot scenario on 15 and 18. The Patroni scenario (`ha/patroni.rs`) is part of
//! this test binary.

mod common;
/// The Patroni scenario, in this binary so that it runs beside the idle-primary scenario
/// (both mostly wait) instead of after it.
#[path = "ha/patroni.rs"]
mod patroni;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::scratch;
use pgrepo::walarchive::wal_inventory;
use pgrepo::Repository;
use pgwire_repl::{Lsn, TimelineId, WalSegmentSize};
use testkit::{Cluster, ClusterOptions, Garage};

const SEGMENT: u64 = 16 << 20;

/// Whether this scenario runs on the server version under test; says so when not.
fn runs_on(versions: &[u32], scenario: &str) -> bool {
    let major = testkit::pg_major_from_env();
    let runs = versions.contains(&major);
    if !runs {
        println!(
            "{scenario}: runs on PostgreSQL {versions:?} only (to keep the suite short); this run is {major}"
        );
    }
    runs
}

fn primary() -> Cluster {
    Cluster::start(
        ClusterOptions::new()
            .setting("wal_keep_size", "1GB")
            .setting("max_wal_size", "1GB")
            .setting("max_replication_slots", "10")
            .setting("max_wal_senders", "10"),
    )
}

/// Our pg_receivewal, built beside clone-standby by `cargo test --workspace`.
fn pg_receivewal() -> PathBuf {
    let path = Path::new(common::bin()).with_file_name("pg_receivewal");
    assert!(
        path.is_file(),
        "{} is missing: build the workspace's binaries (cargo test --workspace builds pg-frontends' pg_receivewal)",
        path.display()
    );
    path
}

/// A receiver process whose standard error is read line by line, with the time each
/// line arrived.
struct Receiver {
    name: String,
    child: Child,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Receiver {
    fn spawn(name: &str, program: &Path, args: &[String], env: &[(String, String)]) -> Receiver {
        let mut child = Command::new(program)
            .args(args)
            .envs(env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push((Instant::now(), line));
            }
        });
        Receiver {
            name: name.to_string(),
            child,
            lines,
        }
    }

    fn log(&self) -> String {
        let lines = self.lines.lock().unwrap();
        let text: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
        format!("--- {} ---\n{}", self.name, text.join("\n"))
    }

    /// When the first line containing `needle` arrived at or after `since`.
    fn line_since(&self, needle: &str, since: Instant) -> Option<Instant> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .find(|(at, line)| *at >= since && line.contains(needle))
            .map(|(at, _)| *at)
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn strings(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

fn conninfo(primary: &Cluster, app: &str) -> String {
    format!(
        "{} application_name={app}",
        primary.tcp_conninfo(primary.superuser())
    )
}

async fn create_slot(primary: &Cluster, slot: &str) {
    primary
        .execute(&format!(
            "SELECT pg_create_physical_replication_slot('{slot}', true)"
        ))
        .await;
}

async fn current_lsn(primary: &Cluster) -> Lsn {
    primary
        .query_value("SELECT pg_current_wal_lsn()")
        .await
        .unwrap()
        .parse()
        .unwrap()
}

/// The walsender serving `app`: its pid and start time.
async fn walsender(primary: &Cluster, app: &str) -> Option<(String, String)> {
    let result = primary
        .sql()
        .await
        .query(&format!(
            "SELECT pid || ' ' || backend_start FROM pg_stat_replication WHERE application_name = '{app}' AND state = 'streaming'"
        ))
        .await
        .unwrap();
    let value = result.rows.first()?.first()?.clone()?;
    let (pid, start) = value.split_once(' ')?;
    Some((pid.to_string(), start.to_string()))
}

async fn slot_restart(primary: &Cluster, slot: &str) -> Lsn {
    primary
        .query_value(&format!(
            "SELECT coalesce(restart_lsn, '0/0') FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ))
        .await
        .unwrap_or_else(|| panic!("slot {slot} is gone"))
        .parse()
        .unwrap()
}

/// The end of the newest complete segment in a pg_receivewal-style directory.
fn directory_holds(dir: &Path) -> Lsn {
    let mut end = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let stem = name.split('.').next().unwrap_or("");
        let complete = name.len() == 24 || name.ends_with(".gz") || name.ends_with(".zst");
        if stem.len() == 24 && complete && stem.bytes().all(|b| b.is_ascii_hexdigit()) {
            let log = u64::from_str_radix(&stem[8..16], 16).unwrap();
            let seg = u64::from_str_radix(&stem[16..24], 16).unwrap();
            end = end.max((log * 0x1_0000_0000 / SEGMENT + seg + 1) * SEGMENT);
        }
    }
    Lsn(end)
}

/// The end of what the repository's WAL archive holds on timeline 1 (complete segments
/// and stored pieces).
async fn repository_holds(repo: &Repository) -> Lsn {
    let inventory = wal_inventory(repo, WalSegmentSize::DEFAULT).await.unwrap();
    let mut end = 0;
    for ((timeline, segment), objects) in &inventory.segments {
        if *timeline != TimelineId(1) {
            continue;
        }
        let this = if objects.complete.is_some() {
            (segment + 1) * SEGMENT
        } else {
            segment * SEGMENT + objects.contiguous_end()
        };
        end = end.max(this);
    }
    Lsn(end)
}

fn repository(garage: &Garage, prefix: &str) -> Repository {
    common::repo::garage_repository(garage, &garage.url(prefix))
}

/// The three receivers on slots `dir_slot`, `pgrw_slot`, `repo_slot` (application
/// names alike), plus what each one holds.
struct Receivers {
    directory: (Receiver, PathBuf),
    pg_receivewal: (Receiver, PathBuf),
    repo: (Receiver, Repository),
}

const RECEIVERS: [&str; 3] = ["dir_slot", "pgrw_slot", "repo_slot"];

async fn start_receivers(
    primary: &Cluster,
    garage: &Garage,
    scratch: &Path,
    extra: &[&str],
) -> Receivers {
    for slot in RECEIVERS {
        create_slot(primary, slot).await;
    }
    let start = current_lsn(primary).await.to_string();
    // clone-standby receive-wal into `mode` (--directory or --repo) `target`.
    let receive_wal = |slot: &str, mode: &str, target: &str| {
        let mut args = strings(&[
            "receive-wal",
            "--source",
            &conninfo(primary, slot),
            mode,
            target,
            "--slot",
            slot,
            "--start-lsn",
            &start,
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let dir = scratch.join("directory");
    let directory = Receiver::spawn(
        "receive-wal --directory",
        Path::new(common::bin()),
        &receive_wal("dir_slot", "--directory", dir.to_str().unwrap()),
        &[],
    );

    let pgrw_dir = scratch.join("pg_receivewal");
    std::fs::create_dir_all(&pgrw_dir).unwrap();
    let args: Vec<String> = strings(&[
        "-d",
        &conninfo(primary, "pgrw_slot"),
        "-D",
        pgrw_dir.to_str().unwrap(),
        "-S",
        "pgrw_slot",
        "-v",
    ]);
    let pg_receivewal = Receiver::spawn("pg_receivewal", &pg_receivewal(), &args, &[]);

    let repo = Receiver::spawn(
        "receive-wal --repo",
        Path::new(common::bin()),
        &receive_wal("repo_slot", "--repo", &garage.url("ha")),
        &garage.env(),
    );
    Receivers {
        directory: (directory, dir),
        pg_receivewal: (pg_receivewal, pgrw_dir),
        repo: (repo, repository(garage, "ha")),
    }
}

impl Receivers {
    fn logs(&self) -> String {
        [
            self.directory.0.log(),
            self.pg_receivewal.0.log(),
            self.repo.0.log(),
        ]
        .join("\n")
    }

    async fn wait_streaming(&self, primary: &Cluster) -> Vec<(String, String)> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut found = Vec::new();
        for app in RECEIVERS {
            loop {
                if let Some(sender) = walsender(primary, app).await {
                    found.push(sender);
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{app} is not streaming after 30 s:\n{}",
                    self.logs()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        found
    }

    async fn holds(&self) -> [Lsn; 3] {
        [
            directory_holds(&self.directory.1),
            directory_holds(&self.pg_receivewal.1),
            repository_holds(&self.repo.1).await,
        ]
    }
}

/// Writes about `bytes` of WAL with ordinary transactions.
async fn write_wal(primary: &Cluster, bytes: u64) {
    let rows = bytes / 1100 + 1;
    primary
        .execute(&format!(
            "INSERT INTO load SELECT g, repeat(md5(g::text), 32) FROM generate_series(1, {rows}) g"
        ))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_receivers_slot_follows_what_it_holds_under_load_on_one_connection() {
    if !runs_on(&[15, 18], "slots under load") {
        return;
    }
    let primary = primary();
    let garage = Garage::start();
    let dir = scratch();
    primary
        .execute("CREATE TABLE load (id int, payload text)")
        .await;
    let receivers = start_receivers(&primary, &garage, dir.path(), &[]).await;
    let senders = receivers.wait_streaming(&primary).await;

    // Six rounds of about 1.5 segments each: after each, what every receiver holds
    // must be matched by its slot (within one segment) within 15 s.
    let mut checked = 0;
    for round in 0..6 {
        write_wal(&primary, SEGMENT * 3 / 2).await;
        let target = current_lsn(&primary).await;
        // Wait until each receiver holds the WAL written (as complete segments or
        // stored pieces), then give its slot 15 s to follow.
        let deadline = Instant::now() + Duration::from_secs(30);
        let holds = loop {
            let holds = receivers.holds().await;
            if holds
                .iter()
                .all(|held| held.0 + SEGMENT > target.0 && held.0 >= SEGMENT)
            {
                break holds;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: the receivers hold {holds:?}, the server is at {target}:\n{}",
                receivers.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let since = Instant::now();
        for (slot, held) in RECEIVERS.iter().zip(holds) {
            loop {
                let restart = slot_restart(&primary, slot).await;
                if restart.0 + SEGMENT >= held.0 {
                    checked += 1;
                    break;
                }
                assert!(
                    since.elapsed() < Duration::from_secs(15),
                    "round {round}: slot {slot} stays at {restart} while its receiver holds WAL up to {held}, for 15 s:\n{}",
                    receivers.logs()
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    assert_eq!(checked, 18);
    // All of it on the first connection of each receiver.
    for (app, first) in RECEIVERS.iter().zip(&senders) {
        assert_eq!(
            walsender(&primary, app).await.as_ref(),
            Some(first),
            "{app} reconnected while streaming under load:\n{}",
            receivers.logs()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_primary_keeps_one_connection_per_receiver_for_150_s() {
    if !runs_on(&[15], "idle primary") {
        return;
    }
    // PostgreSQL's defaults: wal_sender_timeout 60 s; the receivers report every 10 s,
    // so the walsender never sends a keepalive of its own.
    let primary = primary();
    let garage = Garage::start();
    let dir = scratch();
    primary
        .execute("CREATE TABLE load (id int, payload text)")
        .await;
    let mut receivers = start_receivers(&primary, &garage, dir.path(), &[]).await;
    let senders = receivers.wait_streaming(&primary).await;
    let since = Instant::now();
    tokio::time::sleep(Duration::from_secs(150)).await;
    for (app, first) in RECEIVERS.iter().zip(&senders) {
        assert_eq!(
            walsender(&primary, app).await.as_ref(),
            Some(first),
            "{app} did not keep its connection through 150 idle seconds:\n{}",
            receivers.logs()
        );
    }
    for receiver in [
        &mut receivers.directory.0,
        &mut receivers.pg_receivewal.0,
        &mut receivers.repo.0,
    ] {
        assert!(
            receiver.running(),
            "{} exited:\n{}",
            receiver.name,
            receiver.log()
        );
        for word in ["disconnected", "reconnect"] {
            assert!(
                receiver.line_since(word, since).is_none(),
                "{} said {word:?} on an idle primary:\n{}",
                receiver.name,
                receiver.log()
            );
        }
    }
}

/// Every process of the server: the postmaster and its children.
fn server_processes(cluster: &Cluster) -> Vec<i32> {
    let postmaster = cluster.pid().expect("the server runs") as i32;
    let mut pids = vec![postmaster];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The parent pid is the second field after the parenthesised command name.
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if parent == Some(postmaster) {
            pids.push(pid);
        }
    }
    pids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_server_is_noticed_within_the_bound_and_streaming_resumes_when_it_thaws() {
    if !runs_on(&[15], "frozen server") {
        return;
    }
    let primary = primary();
    let dir = scratch();
    primary
        .execute("CREATE TABLE load (id int, payload text)")
        .await;
    create_slot(&primary, "frozen").await;
    let start = current_lsn(&primary).await.to_string();
    let wal = dir.path().join("wal");
    let args: Vec<String> = strings(&[
        "receive-wal",
        "--source",
        &conninfo(&primary, "frozen"),
        "--directory",
        wal.to_str().unwrap(),
        "--slot",
        "frozen",
        "--start-lsn",
        &start,
        "--wal-receiver-timeout",
        "6",
    ]);
    let mut receiver = Receiver::spawn("receive-wal", Path::new(common::bin()), &args, &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let (first_pid, _) = loop {
        if let Some(sender) = walsender(&primary, "frozen").await {
            break sender;
        }
        assert!(
            Instant::now() < deadline,
            "not streaming:\n{}",
            receiver.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    tokio::time::sleep(Duration::from_secs(2)).await;

    let frozen = server_processes(&primary);
    let frozen_at = Instant::now();
    for pid in &frozen {
        unsafe { libc::kill(*pid, libc::SIGSTOP) };
    }
    // A silent server is asked for a reply after 3 s and taken as dead 3 s later; the
    // last message before the freeze came at most 3 s earlier (the previous reply), so
    // the freeze is noticed 3 to 6 s after it (allow for a loaded machine).
    let noticed = loop {
        if let Some(at) = receiver.line_since("did not answer a request for a reply", frozen_at) {
            break at;
        }
        if frozen_at.elapsed() > Duration::from_secs(20) {
            for pid in &frozen {
                unsafe { libc::kill(*pid, libc::SIGCONT) };
            }
            panic!(
                "the frozen server was not noticed within 20 s:\n{}",
                receiver.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let took = noticed.duration_since(frozen_at);
    println!(
        "frozen server noticed after {:.1} s (bound 6 s)",
        took.as_secs_f64()
    );
    assert!(
        took <= Duration::from_secs(9),
        "noticed after {took:?}, the bound is 6 s:\n{}",
        receiver.log()
    );
    assert!(
        receiver.running(),
        "the receiver exited:\n{}",
        receiver.log()
    );
    for pid in &frozen {
        unsafe { libc::kill(*pid, libc::SIGCONT) };
    }
    // Back: the receiver streams on a new connection and keeps archiving.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((pid, _)) = walsender(&primary, "frozen").await {
            if pid != first_pid {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no new connection after the server thawed:\n{}",
            receiver.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let before = directory_holds(&wal);
    write_wal(&primary, SEGMENT * 2).await;
    let target = current_lsn(&primary).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while directory_holds(&wal).0 + SEGMENT <= target.0 {
        assert!(
            Instant::now() < deadline,
            "nothing archived after the thaw (held {before}, server at {target}):\n{}",
            receiver.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_slot_is_waited_for_and_streamed_from_once_it_exists() {
    let primary = primary();
    let dir = scratch();
    let wal = dir.path().join("wal");
    let start = current_lsn(&primary).await.to_string();
    let args: Vec<String> = strings(&[
        "receive-wal",
        "--source",
        &conninfo(&primary, "late"),
        "--directory",
        wal.to_str().unwrap(),
        "--slot",
        "late_slot",
        "--start-lsn",
        &start,
        "--reconnect-interval",
        "1",
    ]);
    let mut receiver = Receiver::spawn("receive-wal", Path::new(common::bin()), &args, &[]);
    let since = Instant::now() - Duration::from_secs(1);
    let deadline = Instant::now() + Duration::from_secs(20);
    while receiver
        .line_since("waiting for replication slot \"late_slot\"", since)
        .is_none()
    {
        assert!(
            receiver.running() && Instant::now() < deadline,
            "the receiver did not say it waits for the slot:\n{}",
            receiver.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        receiver.running(),
        "the receiver gave up:\n{}",
        receiver.log()
    );
    create_slot(&primary, "late_slot").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while walsender(&primary, "late").await.is_none() {
        assert!(
            Instant::now() < deadline,
            "not streaming once the slot exists:\n{}",
            receiver.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        receiver.log().contains("streaming from"),
        "{}",
        receiver.log()
    );
}

/// The first page header of a segment says whether a record continues into it.
fn continues_a_record(segment: &[u8]) -> bool {
    let info = u16::from_le_bytes([segment[2], segment[3]]);
    let remaining = u32::from_le_bytes([segment[16], segment[17], segment[18], segment[19]]);
    info & 0x0001 != 0 && remaining > 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpos_on_a_segment_boundary_completes_that_segment_and_writes_nothing_after() {
    let primary = primary();
    let dir = scratch();
    primary
        .execute("CREATE TABLE load (id int, payload text)")
        .await;
    create_slot(&primary, "endpos_slot").await;
    let start = current_lsn(&primary).await;
    // WAL past a boundary that a record crosses (the usual case; try a few boundaries).
    let pg_wal = primary.data_dir().join("pg_wal");
    let boundary = loop {
        write_wal(&primary, SEGMENT + SEGMENT / 4).await;
        let now = current_lsn(&primary).await;
        let boundary = Lsn(now.0 / SEGMENT * SEGMENT);
        let name = pgwire_repl::types::wal_file_name(
            TimelineId(1),
            boundary.0 / SEGMENT,
            WalSegmentSize::DEFAULT,
        );
        // Let the page holding the boundary reach the disk.
        primary.execute("SELECT pg_current_wal_flush_lsn()").await;
        let next = std::fs::read(pg_wal.join(&name)).unwrap();
        if continues_a_record(&next) && boundary.0 > start.0 {
            break boundary;
        }
    };
    let endpos = boundary.to_string();
    let last = pgwire_repl::types::wal_file_name(
        TimelineId(1),
        boundary.0 / SEGMENT - 1,
        WalSegmentSize::DEFAULT,
    );

    // clone-standby receive-wal --directory (LocalDir).
    let wal = dir.path().join("wal");
    let out = common::run(&[
        "receive-wal",
        "--source",
        &conninfo(&primary, "endpos"),
        "--directory",
        wal.to_str().unwrap(),
        "--start-lsn",
        &start.to_string(),
        "--endpos",
        &endpos,
        "--no-loop",
    ]);
    assert!(out.status.success(), "{}", common::text(&out));
    let names: Vec<String> = std::fs::read_dir(&wal)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.contains(&last),
        "{last} should be complete at --endpos {endpos}: {names:?}"
    );
    assert!(
        !names.iter().any(|n| n.ends_with(".partial")),
        "nothing after --endpos {endpos} on a boundary is written: {names:?}"
    );
    assert!(
        std::fs::read(wal.join(&last)).unwrap() == std::fs::read(pg_wal.join(&last)).unwrap(),
        "{last} differs from the server's"
    );

    // Our pg_receivewal, from the slot, says it finished that segment.
    let pgrw = dir.path().join("pgrw");
    std::fs::create_dir_all(&pgrw).unwrap();
    let mut command = Command::new(pg_receivewal());
    command.args([
        "-d",
        &conninfo(&primary, "endpos"),
        "-D",
        pgrw.to_str().unwrap(),
        "-S",
        "endpos_slot",
        "--endpos",
        &endpos,
        "-n",
        "-v",
    ]);
    if testkit::pg_major_from_env() < 15 {
        // 13 and 14 cannot report a slot's position: pg_receivewal then starts at the
        // server's position, past the boundary.
        return;
    }
    let out = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("finished segment at {endpos} (timeline 1)")),
        "{stderr}"
    );
    assert!(pgrw.join(&last).is_file(), "{stderr}");
    let partials: Vec<String> = std::fs::read_dir(&pgrw)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial"))
        .collect();
    assert!(partials.is_empty(), "{partials:?}\n{stderr}");
}
