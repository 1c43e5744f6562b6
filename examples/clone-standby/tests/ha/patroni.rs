//! Inside a real HA stack (issue 22): Patroni 3.0.2 and etcd 3.4 (Debian's packages) with
//! three PostgreSQL 15 nodes on loopback, in synchronous mode, so that no acknowledged
//! commit may be lost.
//!
//! - Replicas are made by our drop-in `pg_basebackup` in Patroni's `bin_dir` (node 2) and
//!   by `clone-standby clone` through `scripts/patroni-clone-standby` as a custom replica
//!   method (node 3); the servers' and Patroni's logs show which tool made each.
//! - `receive-wal --repo` (Garage) and `receive-wal --directory` follow the leader over a
//!   three-host conninfo with `target_session_attrs=read-write`, each on a slot declared
//!   permanent in Patroni's configuration; PostgreSQL 15's `pg_receivewal` does the same as
//!   the control.
//! - Under write load: a switchover, then a hard failover (the leader's Patroni, postmaster
//!   and backends SIGKILLed), then checks: every acknowledged row on every node, both
//!   archives gap-free across the timelines with history files byte-identical to the
//!   servers' and the control's, each receiver streaming from the new leader within 6 s of
//!   it accepting writes, each receiver's slot within one segment of what it holds within
//!   15 s while connected, no receiver exited, and a restore from the repository equal to
//!   the cluster.
//!
//! Every check is evaluated and reported (the numbers on standard output) before the test
//! fails, so one run shows every broken promise. Only on PostgreSQL 15 (Debian's build, the
//! server the Patroni packages go with); other versions print one line and pass.
//!
//! Needs `scripts/install-test-tools.sh` (Patroni, etcd) and `scripts/install-garage.sh`,
//! and the `pg_basebackup` of package `pg-frontends` built next to `clone-standby`
//! (`cargo test --workspace` builds it; alone: `cargo build -p pg-frontends --bin
//! pg_basebackup`).

use super::common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{scratch, text};
use pgrepo::walarchive::{wal_inventory, WalInventory};
use pgwire_repl::{Lsn, SqlClient, TimelineId, WalSegmentSize};
use testkit::patroni::{PatroniCluster, PatroniOptions, ReplicaMethod, SUPERUSER};
use testkit::{Cluster, ClusterOptions, Garage};

const SEGMENT: WalSegmentSize = WalSegmentSize::DEFAULT;
/// The receivers: (slot and application_name, what it is).
const REPO: &str = "walrepo";
const DIR: &str = "waldir";
const CONTROL: &str = "walcontrol";
/// How soon after the new leader accepts writes a receiver must stream from it.
const FOLLOW_BOUND_S: f64 = 6.0;
/// How soon a connected receiver's slot must be within one segment of what it holds.
const SLOT_BOUND: Duration = Duration::from_secs(15);

/// Our `pg_basebackup`, built by cargo next to `clone-standby`.
fn our_pg_basebackup() -> PathBuf {
    let path = Path::new(common::bin())
        .parent()
        .expect("the binary's directory")
        .join("pg_basebackup");
    assert!(
        path.is_file(),
        "{} is missing: build it with `cargo build -p pg-frontends --bin pg_basebackup` \
         (cargo test --workspace builds it)",
        path.display()
    );
    path
}

fn wrapper_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../scripts/patroni-clone-standby")
        .canonicalize()
        .expect("scripts/patroni-clone-standby")
}

/// A receiver process with its log.
struct Receiver {
    name: &'static str,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Child,
    /// Exits seen (the receiver is restarted 1 s later, as a supervisor would, so that
    /// the rest of the run is still measured).
    exits: Vec<String>,
    exited_at: Option<Instant>,
}

impl Receiver {
    fn spawn(
        name: &'static str,
        program: PathBuf,
        args: Vec<String>,
        env: Vec<(String, String)>,
        log: PathBuf,
    ) -> Receiver {
        let child = Self::start(&program, &args, &env, &log);
        Receiver {
            name,
            program,
            args,
            env,
            log,
            child,
            exits: Vec::new(),
            exited_at: None,
        }
    }

    fn start(program: &Path, args: &[String], env: &[(String, String)], log: &Path) -> Child {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        Command::new(program)
            .args(args)
            .envs(env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("could not run {}: {e}", program.display()))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Notices an exit and records it with the error line; starts the receiver again a
    /// second later.
    fn supervise(&mut self, when: &str) {
        if let Some(exited) = self.exited_at {
            if exited.elapsed() >= Duration::from_secs(1) {
                self.exited_at = None;
                self.child = Self::start(&self.program, &self.args, &self.env, &self.log);
            }
            return;
        }
        if let Some(status) = self.child.try_wait().unwrap() {
            let log = self.log();
            let error = log
                .lines()
                .rev()
                .find(|l| l.contains("failed") || l.contains("error"))
                .or_else(|| log.lines().last())
                .unwrap_or("")
                .to_string();
            self.exits.push(format!("{when}: {status}: {error}"));
            self.exited_at = Some(Instant::now());
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An acknowledged commit: row id, the port of the server that acknowledged it, and the
/// server's clock when the INSERT ran (seconds since the epoch).
#[derive(Debug, Clone, Copy)]
struct Ack {
    id: i64,
    port: u16,
    at: f64,
}

/// Inserts numbered rows one by one, reconnecting through the multi-host conninfo (every
/// 50 ms) when the server goes away; records every acknowledged commit.
fn start_writer(
    conninfo: String,
) -> (
    Arc<AtomicBool>,
    Arc<Mutex<Vec<Ack>>>,
    tokio::task::JoinHandle<()>,
) {
    let running = Arc::new(AtomicBool::new(true));
    let acks = Arc::new(Mutex::new(Vec::new()));
    let (flag, log) = (running.clone(), acks.clone());
    let handle = tokio::spawn(async move {
        let config = pgwire_repl::Config::parse(&conninfo).unwrap();
        let mut client: Option<(SqlClient, u16)> = None;
        let mut next_id = 1i64;
        while flag.load(Ordering::Relaxed) {
            let Some((sql, port)) = client.as_mut() else {
                match SqlClient::connect(&config).await {
                    Ok(mut sql) => match sql.query_value("SELECT inet_server_port()::text").await {
                        Ok(Some(port)) => client = Some((sql, port.parse().unwrap())),
                        _ => tokio::time::sleep(Duration::from_millis(50)).await,
                    },
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
                continue;
            };
            let id = next_id;
            // An id whose COMMIT was not acknowledged is never reused: its outcome is
            // unknown.
            next_id += 1;
            let insert = format!(
                "INSERT INTO acked (id, port, pad) VALUES ({id}, {port}, repeat('x', 400)) \
                 RETURNING extract(epoch FROM clock_timestamp())::text"
            );
            match tokio::time::timeout(Duration::from_secs(20), sql.query_value(&insert)).await {
                Ok(Ok(Some(at))) => log.lock().unwrap().push(Ack {
                    id,
                    port: *port,
                    at: at.parse().unwrap(),
                }),
                _ => client = None,
            }
        }
    });
    (running, acks, handle)
}

/// One row of a query whose rows were aggregated into one text value, lines of
/// `|`-separated fields.
async fn rows(node: &testkit::patroni::PatroniNode, sql: &str) -> Option<Vec<Vec<String>>> {
    let value = node.try_query(sql).await?;
    Some(
        value
            .unwrap_or_default()
            .lines()
            .map(|l| l.split('|').map(String::from).collect())
            .collect(),
    )
}

/// `application_name → (backend_start epoch, pid)` of the walsenders streaming on `node`.
async fn streaming(node: &testkit::patroni::PatroniNode) -> BTreeMap<String, (f64, i64)> {
    let sql = "SELECT string_agg(application_name || '|' || extract(epoch FROM backend_start) \
               || '|' || pid, E'\\n') FROM pg_stat_replication WHERE state = 'streaming'";
    rows(node, sql)
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.len() == 3)
        .map(|r| (r[0].clone(), (r[1].parse().unwrap(), r[2].parse().unwrap())))
        .collect()
}

/// A slot's `restart_lsn` and `active_pid` on `node`.
async fn slot(
    node: &testkit::patroni::PatroniNode,
    name: &str,
) -> Option<(Option<Lsn>, Option<i64>)> {
    let sql = format!(
        "SELECT coalesce(restart_lsn::text, '') || '|' || coalesce(active_pid::text, '') \
         FROM pg_replication_slots WHERE slot_name = '{name}'"
    );
    let row = node.try_query(&sql).await??;
    let (lsn, pid) = row.split_once('|')?;
    Some((lsn.parse().ok(), pid.parse().ok()))
}

/// The timelines of a history file: `(timeline, switch point)` lines.
fn parse_history(bytes: &[u8]) -> Vec<(u32, Lsn)> {
    String::from_utf8_lossy(bytes)
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let mut fields = l.split_whitespace();
            let tli: u32 = fields.next().unwrap().parse().unwrap();
            let lsn: Lsn = fields.next().unwrap().parse().unwrap();
            (tli, lsn)
        })
        .collect()
}

/// The timeline whose WAL file holds segment `segment` (the one its last byte is on).
fn owner(history: &[(u32, Lsn)], newest: u32, segment: u64) -> u32 {
    let last_byte = (segment + 1) * SEGMENT.bytes() - 1;
    history
        .iter()
        .find(|(_, switch)| last_byte < switch.0)
        .map(|(tli, _)| *tli)
        .unwrap_or(newest)
}

/// Complete segments of a pg_receivewal-style directory: (timeline, segment) → path.
fn dir_segments(dir: &Path) -> BTreeMap<(u32, u64), PathBuf> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        if entry.metadata().unwrap().len() != SEGMENT.bytes() {
            continue;
        }
        let tli = u32::from_str_radix(&name[..8], 16).unwrap();
        let hi = u64::from_str_radix(&name[8..16], 16).unwrap();
        let lo = u64::from_str_radix(&name[16..], 16).unwrap();
        let per_xlogid = 0x1_0000_0000 / SEGMENT.bytes();
        out.insert((tli, hi * per_xlogid + lo), entry.path());
    }
    out
}

/// What a directory receiver holds durably on `timeline`: the end of its newest
/// complete segment there.
fn dir_held(dir: &Path, timeline: u32) -> Option<Lsn> {
    dir_segments(dir)
        .keys()
        .filter(|(t, _)| *t == timeline)
        .map(|(_, s)| Lsn((s + 1) * SEGMENT.bytes()))
        .max()
}

/// What the repository holds on `timeline`: the end of the contiguous WAL from its first
/// segment there (complete segments, then the pieces of the next one).
fn repo_held(inventory: &WalInventory, timeline: u32) -> Option<Lsn> {
    let mut segments = inventory
        .segments
        .iter()
        .filter(|((t, _), _)| t.0 == timeline)
        .peekable();
    let ((_, first), _) = segments.peek()?;
    let mut next = *first;
    let mut end = None;
    for ((_, segment), objects) in segments {
        if *segment != next {
            break;
        }
        if objects.complete.is_some() {
            next += 1;
            end = Some(Lsn(next * SEGMENT.bytes()));
        } else {
            end = Some(Lsn(segment * SEGMENT.bytes() + objects.contiguous_end()));
            break;
        }
    }
    end
}

use common::repo::garage_repository as repository;

/// How one failover was followed.
#[derive(Debug, Default)]
struct Follow {
    /// The server time the new leader first acknowledged one of our INSERTs.
    first_write: Option<f64>,
    /// Per receiver: backend_start of its first streaming walsender on the new leader.
    connected: BTreeMap<&'static str, f64>,
}

impl Follow {
    fn delay(&self, name: &str) -> Option<f64> {
        Some(self.connected.get(name)? - self.first_write?)
    }
}

/// Watches the new leader until every receiver streams from it (or `timeout`), keeping
/// the receivers supervised, and finds when it first acknowledged one of `acks`.
async fn follow(
    ha: &PatroniCluster,
    leader: usize,
    receivers: &mut [Receiver],
    acks: Option<&Mutex<Vec<Ack>>>,
    what: &str,
    since: f64,
    timeout: Duration,
) -> Follow {
    let node = ha.node(leader);
    let mut result = Follow::default();
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        for receiver in receivers.iter_mut() {
            receiver.supervise(what);
        }
        for (name, (start, _)) in streaming(node).await {
            if start < since {
                continue;
            }
            if let Some(receiver) = receivers.iter().find(|r| r.name == name) {
                result.connected.entry(receiver.name).or_insert(start);
            }
        }
        if let Some(acks) = acks {
            result.first_write = acks
                .lock()
                .unwrap()
                .iter()
                .filter(|a| a.port == node.pg_port() && a.at >= since)
                .map(|a| a.at)
                .reduce(f64::min);
        }
        if (acks.is_none() || result.first_write.is_some())
            && result.connected.len() == receivers.len()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    result
}

/// A time of day (UTC) as the servers' logs print it, for reading the excerpts.
fn clock(epoch: f64) -> String {
    let day = epoch.rem_euclid(86400.0);
    format!(
        "{:02}:{:02}:{:06.3}",
        (day / 3600.0) as u32,
        (day % 3600.0 / 60.0) as u32,
        day % 60.0
    )
}

/// The lines of a new leader's log since `offset` that tell when it was promoted and
/// when each receiver tried it, and with what result.
fn leader_excerpt(log: &str, offset: usize) -> Vec<String> {
    log.get(offset..)
        .unwrap_or("")
        .lines()
        .filter(|l| {
            let receiver = [REPO, DIR, CONTROL].iter().any(|r| {
                l.contains(&format!("application_name={r}")) || l.contains(&format!(" {r} "))
            });
            l.contains("promoted self to leader")
                || l.contains("selected new timeline ID")
                || l.contains("database system is ready to accept connections")
                || (receiver
                    && (l.contains("connection authorized")
                        || l.contains("ERROR:")
                        || l.contains("LOG:  received replication command: START_REPLICATION")))
        })
        .take(40)
        .map(String::from)
        .collect()
}

/// The wall clock in seconds since the epoch (the servers run on this host: their
/// `clock_timestamp()` is the same clock).
fn epoch() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Waits until a leader other than `old` accepts writes.
async fn wait_new_leader(ha: &PatroniCluster, old: usize, timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let leader = ha.wait_for_leader(timeout).await;
        if leader != old {
            return leader;
        }
        assert!(
            Instant::now() < deadline,
            "no new leader within {} s:\n{}",
            timeout.as_secs(),
            ha.logs_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn sync_standby(ha: &PatroniCluster) -> Option<usize> {
    ha.members()
        .iter()
        .find(|m| m.role == "sync_standby" && m.state == "running")
        .and_then(|m| ha.index_of(&m.name))
}

async fn wait_sync_standby(ha: &PatroniCluster, timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(index) = sync_standby(ha) {
            return index;
        }
        assert!(
            Instant::now() < deadline,
            "no synchronous standby within {} s: {:?}\n{}",
            timeout.as_secs(),
            ha.members(),
            ha.logs_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patroni_replicas_receivers_switchover_and_failover() {
    let major = testkit::pg_major_from_env();
    if major != 15 {
        eprintln!(
            "PostgreSQL {major}: the Patroni scenario runs only on PostgreSQL 15 (Debian's \
             patroni 3.0.2 goes with Debian's postgresql-15)"
        );
        return;
    }
    let started = Instant::now();
    let mut report: Vec<String> = Vec::new();
    let mut failures: Vec<String> = Vec::new();

    // ---------------------------------------------------------------- the cluster
    let mut ha = PatroniCluster::start(
        PatroniOptions::new(testkit::bin_dir_from_env())
            .replace_tool("pg_basebackup", our_pg_basebackup())
            .permanent_slot(REPO)
            .permanent_slot(DIR)
            .permanent_slot(CONTROL)
            .synchronous_mode(true)
            // ttl 20 s (Patroni's default is 30): a crashed leader's lock expires 19-20 s
            // after the crash, so the receivers have been retrying for a while when the
            // new leader appears, as in production; with 10 s a backoff that doubles
            // happens to retry just after the promotion.
            .timing(20, 1, 4),
    );
    let first = ha.add_node(&[ReplicaMethod::Basebackup]);
    assert_eq!(ha.wait_for_leader(Duration::from_secs(90)).await, first);
    let n2 = ha.add_node(&[ReplicaMethod::Basebackup]);
    let n3 = ha.add_node(&[ReplicaMethod::Custom {
        name: "clone_standby".into(),
        command: wrapper_script(),
        options: vec![("clone_standby".into(), common::bin().to_string())],
    }]);
    ha.wait_streaming(n2, Duration::from_secs(120)).await;
    ha.wait_streaming(n3, Duration::from_secs(120)).await;
    say(
        &mut report,
        format!(
            "cluster of 3 up, both replicas streaming: {:.1} s",
            started.elapsed().as_secs_f64()
        ),
    );

    // Which tool made each replica. Node 2: Patroni's basebackup method ran
    // <bin_dir>/pg_basebackup, and the temporary slot its WAL stream used is named after
    // our client's pid, where PostgreSQL's pg_basebackup names it after the walsender's
    // (the pid in the log line that created it).
    let log2 = ha.node(n2).log();
    assert!(
        log2.contains("replica has been created using basebackup"),
        "node 2 was not made by the basebackup method:\n{log2}"
    );
    let leader_log = ha.node(first).log();
    // PostgreSQL 15's tool quotes the name, ours does not: accept both.
    let temp_slots: Vec<(String, String)> = leader_log
        .lines()
        .filter(|l| l.contains("LOG:  received replication command: CREATE_REPLICATION_SLOT"))
        .filter_map(|l| {
            let pid = l.split_once(" [")?.1.split_once(']')?.0.to_string();
            let rest = l
                .split_once("CREATE_REPLICATION_SLOT ")?
                .1
                .trim_start_matches('"');
            let number = rest.strip_prefix("pg_basebackup_")?;
            let slot: String = number.chars().take_while(|c| c.is_ascii_digit()).collect();
            Some((pid, slot))
        })
        .collect();
    let basebackup_lines: Vec<&str> = leader_log
        .lines()
        .filter(|l| l.contains("pg_basebackup"))
        .collect();
    // Patroni's basebackup method tries twice: one slot per attempt, all by our tool.
    assert!(
        !temp_slots.is_empty(),
        "no pg_basebackup temporary slot on the leader (node 2's clone):\n{}",
        basebackup_lines.join("\n")
    );
    for (walsender, number) in &temp_slots {
        assert_ne!(
            walsender, number,
            "the temporary slot is named after the walsender's pid: PostgreSQL's pg_basebackup made node 2"
        );
    }
    let label2 = std::fs::read_to_string(ha.node(n2).data_dir().join("backup_label.old"))
        .unwrap_or_default();
    assert!(
        label2.contains("LABEL: pg_basebackup base backup"),
        "node 2's backup_label: {label2}"
    );
    // Node 3: the custom method, through the wrapper, with clone-standby's label.
    let log3 = ha.node(n3).log();
    assert!(
        log3.contains("patroni-clone-standby: cloning")
            && log3.contains("replica has been created using clone_standby"),
        "node 3 was not made by the clone_standby method:\n{log3}"
    );
    assert!(
        !log3.contains("patroni-clone-standby: ignoring"),
        "the wrapper ignored some of Patroni's arguments:\n{log3}"
    );
    let label3 = std::fs::read_to_string(ha.node(n3).data_dir().join("backup_label.old"))
        .unwrap_or_default();
    assert!(
        label3.contains("LABEL: clone-standby"),
        "node 3's backup_label: {label3}"
    );
    assert!(
        !ha.node(n3).data_dir().join("standby.signal").exists()
            || !std::fs::read_to_string(ha.node(n3).data_dir().join("postgresql.auto.conf"))
                .unwrap_or_default()
                .contains("primary_conninfo"),
        "the wrapper must leave primary_conninfo to Patroni"
    );
    say(&mut report, format!(
        "replicas: n2 by our pg_basebackup (temporary slot pg_basebackup_{} created by walsender {}), n3 by clone-standby clone via the wrapper",
        temp_slots[0].1, temp_slots[0].0
    ));

    // ---------------------------------------------------------------- receivers
    let garage = Garage::start();
    let url = garage.url("ha/");
    let work = scratch();
    let dir_archive = work.path().join("waldir");
    let control_archive = work.path().join("walcontrol");
    std::fs::create_dir(&dir_archive).unwrap();
    std::fs::create_dir(&control_archive).unwrap();
    let pgpass = ha.client_pgpass().display().to_string();
    let hosts = ha.multi_host_conninfo(testkit::patroni::REPLICATION_USER.0);
    let source = |app: &str| {
        format!("{hosts} target_session_attrs=read-write connect_timeout=2 application_name={app}")
    };
    let mut env = garage.env();
    env.push(("PGPASSFILE".into(), pgpass.clone()));
    let ours = PathBuf::from(common::bin());
    let mut receivers = vec![
        Receiver::spawn(
            REPO,
            ours.clone(),
            vec![
                "receive-wal".into(),
                "--source".into(),
                source(REPO),
                "--repo".into(),
                url.clone(),
                "--slot".into(),
                REPO.into(),
                // What the README recommends in an HA stack: an attempt is cheap, and
                // the loss bound does not hold while the receiver is disconnected. With
                // pg_receivewal's 5 s (the default) the new leader was followed after
                // 4.9–5.8 s; the 6 s bound would then depend on the phase of the retries.
                "--reconnect-interval".into(),
                "2".into(),
            ],
            env.clone(),
            work.path().join("walrepo.log"),
        ),
        Receiver::spawn(
            DIR,
            ours.clone(),
            vec![
                "receive-wal".into(),
                "--source".into(),
                source(DIR),
                "--directory".into(),
                dir_archive.display().to_string(),
                "--slot".into(),
                DIR.into(),
                "--reconnect-interval".into(),
                "2".into(),
            ],
            env.clone(),
            work.path().join("waldir.log"),
        ),
        Receiver::spawn(
            CONTROL,
            testkit::bin_dir_from_env().join("pg_receivewal"),
            vec![
                "-D".into(),
                control_archive.display().to_string(),
                "-S".into(),
                CONTROL.into(),
                "-d".into(),
                source(CONTROL),
                "--no-password".into(),
                "-v".into(),
            ],
            env.clone(),
            work.path().join("walcontrol.log"),
        ),
    ];
    let leader1 = first;
    let connected = follow(
        &ha,
        leader1,
        &mut receivers,
        None,
        "start",
        0.0,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        connected.connected.len(),
        3,
        "every receiver streams from the leader: {connected:?}\n{}\n{}\n{}",
        receivers[0].log(),
        receivers[1].log(),
        receivers[2].log()
    );

    // ---------------------------------------------------------------- load and a backup
    let mut sql = ha.node(leader1).sql().await.unwrap();
    sql.batch("CREATE TABLE acked (id bigint PRIMARY KEY, port int, at timestamptz DEFAULT clock_timestamp(), pad text)")
        .await
        .unwrap();
    sql.close().await.unwrap();
    let writer_conninfo = format!(
        "{} password={} target_session_attrs=read-write connect_timeout=2",
        ha.multi_host_conninfo(SUPERUSER.0),
        SUPERUSER.1
    );
    let (running, acks, writer) = start_writer(writer_conninfo);
    let backup = common::repo::run_with(
        &common::repo::Store {
            url: url.clone(),
            env: env.clone(),
        },
        &[
            "backup",
            "--source",
            &format!("{hosts} target_session_attrs=read-write"),
            "--repo",
            &url,
            "--json",
        ],
    )
    .await;
    assert!(
        backup.status.success(),
        "backup into the repository:\n{}",
        text(&backup)
    );
    say(
        &mut report,
        format!(
            "backup into the repository done at {:.1} s",
            started.elapsed().as_secs_f64()
        ),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    // ---------------------------------------------------------------- switchover
    let candidate = wait_sync_standby(&ha, Duration::from_secs(30)).await;
    let switch_epoch = epoch();
    let offsets: Vec<usize> = ha.nodes().iter().map(|n| n.log().len()).collect();
    let out = ha.switchover(candidate);
    say(
        &mut report,
        format!(
            "switchover {} -> {}: {}",
            ha.node(leader1).name(),
            ha.node(candidate).name(),
            out.lines()
                .find(|l| l.contains("witched over"))
                .unwrap_or("")
                .trim()
        ),
    );
    let leader2 = wait_new_leader(&ha, leader1, Duration::from_secs(60)).await;
    let switch_follow = follow(
        &ha,
        leader2,
        &mut receivers,
        Some(&acks),
        "switchover",
        switch_epoch,
        Duration::from_secs(40),
    )
    .await;
    let switch_excerpt = leader_excerpt(&ha.node(leader2).log(), offsets[leader2]);
    ha.wait_streaming(leader1, Duration::from_secs(90)).await;

    // ---------------------------------------------------------------- hard failover
    let candidate = wait_sync_standby(&ha, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed_at = Instant::now();
    let kill_epoch = epoch();
    let offsets: Vec<usize> = ha.nodes().iter().map(|n| n.log().len()).collect();
    ha.kill_hard(leader2);
    let leader3 = wait_new_leader(&ha, leader2, Duration::from_secs(90)).await;
    let promoted_after = killed_at.elapsed().as_secs_f64();
    let fail_follow = follow(
        &ha,
        leader3,
        &mut receivers,
        Some(&acks),
        "failover",
        kill_epoch,
        Duration::from_secs(40),
    )
    .await;
    say(
        &mut report,
        format!(
            "hard failover: {} killed, {} (sync standby was {}) leader after {promoted_after:.1} s",
            ha.node(leader2).name(),
            ha.node(leader3).name(),
            ha.node(candidate).name()
        ),
    );
    let fail_excerpt = leader_excerpt(&ha.node(leader3).log(), offsets[leader3]);
    ha.restart_node(leader2);
    ha.wait_streaming(leader2, Duration::from_secs(120)).await;

    for (what, phase, f, excerpt) in [
        ("switchover", "switchover", &switch_follow, &switch_excerpt),
        ("hard failover", "failover", &fail_follow, &fail_excerpt),
    ] {
        say(
            &mut report,
            format!(
                "{what}: the new leader's first write at {}; its log:\n    {}",
                f.first_write.map_or("never".to_string(), clock),
                excerpt.join("\n    ")
            ),
        );
        for receiver in [REPO, DIR, CONTROL] {
            let delay = f.delay(receiver);
            let restarts = receivers
                .iter()
                .find(|r| r.name == receiver)
                .map_or(0, |r| {
                    r.exits.iter().filter(|e| e.starts_with(phase)).count()
                });
            say(&mut report, format!(
                "{what}: {receiver} streaming from the new leader {} after it first accepted a write{}",
                delay.map_or("NEVER (within 40 s)".to_string(), |d| format!("{d:+.2} s")),
                if restarts > 0 { format!(" (only after {restarts} exits and restarts by the test)") } else { String::new() }
            ));
            if receiver != CONTROL && !delay.is_some_and(|d| d <= FOLLOW_BOUND_S) {
                failures.push(format!(
                    "{what}: {receiver} did not stream from the new leader within {FOLLOW_BOUND_S} s of its first write ({delay:?})"
                ));
            }
        }
    }

    // ---------------------------------------------------------------- the slot rule
    let leader = ha.node(leader3);
    let repo = repository(&garage, &url);
    // Complete a few segments while everybody stays connected.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        leader.try_query("SELECT pg_switch_wal()::text").await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let timeline_now: u32 = leader
        .try_query("SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)")
        .await
        .flatten()
        .and_then(|t| u32::from_str_radix(&t, 16).ok())
        .expect("the leader's timeline");
    let held: BTreeMap<&str, Option<Lsn>> = [
        (
            REPO,
            repo_held(&wal_inventory(&repo, SEGMENT).await.unwrap(), timeline_now),
        ),
        (DIR, dir_held(&dir_archive, timeline_now)),
        (CONTROL, dir_held(&control_archive, timeline_now)),
    ]
    .into_iter()
    .collect();
    let mut pids = BTreeMap::new();
    for name in [REPO, DIR, CONTROL] {
        pids.insert(name, slot(leader, name).await.and_then(|(_, pid)| pid));
    }
    let t0 = Instant::now();
    let mut lag: BTreeMap<&str, (Option<i64>, f64)> = BTreeMap::new();
    loop {
        for name in [REPO, DIR, CONTROL] {
            if lag
                .get(name)
                .is_some_and(|(l, _)| l.is_some_and(|l| l <= SEGMENT.bytes() as i64))
            {
                continue;
            }
            let now = slot(leader, name).await;
            let restart = now.as_ref().and_then(|(lsn, _)| *lsn);
            let still =
                now.as_ref().and_then(|(_, pid)| *pid) == pids[name] && pids[name].is_some();
            let value = match (held[name], restart, still) {
                (Some(h), Some(r), true) => Some(h.0 as i64 - r.0 as i64),
                _ => None,
            };
            lag.insert(name, (value, t0.elapsed().as_secs_f64()));
        }
        let done = lag
            .values()
            .all(|(l, _)| l.is_some_and(|l| l <= SEGMENT.bytes() as i64));
        if done || t0.elapsed() > SLOT_BOUND {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for name in [REPO, DIR, CONTROL] {
        let (value, at) = lag[name];
        say(&mut report, format!(
            "slot {name} on the leader: holds {:?}, slot {} behind after {at:.1} s (walsender {:?})",
            held[name].map(|l| l.to_string()),
            value.map_or("unknown (not connected, or nothing held)".to_string(), |v| format!("{:.2} MiB", v as f64 / 1048576.0)),
            pids[name]
        ));
        if name != CONTROL && value.is_none_or(|v| v > SEGMENT.bytes() as i64) {
            failures.push(format!(
                "slot {name}: not within one segment of what the receiver holds within {} s while connected (lag {value:?} bytes, holds {:?})",
                SLOT_BOUND.as_secs(),
                held[name]
            ));
        }
    }

    // ---------------------------------------------------------------- stop, complete the segment
    running.store(false, Ordering::Relaxed);
    writer.await.unwrap();
    let acked: Vec<Ack> = acks.lock().unwrap().clone();
    let end: Lsn = leader
        .try_query("SELECT pg_switch_wal()::text")
        .await
        .flatten()
        .unwrap()
        .parse()
        .unwrap();
    let last_segment = (end.0 - 1) / SEGMENT.bytes();
    let in_phase = |from: f64, to: f64| acked.iter().filter(|a| a.at >= from && a.at < to).count();
    say(
        &mut report,
        format!(
            "{} acknowledged commits: {} before the switchover ({}), {} before the failover ({}), {} after ({}); last segment {last_segment:X}",
            acked.len(),
            in_phase(0.0, switch_epoch),
            ha.node(leader1).name(),
            in_phase(switch_epoch, kill_epoch),
            ha.node(leader2).name(),
            in_phase(kill_epoch, f64::MAX),
            ha.node(leader3).name(),
        ),
    );
    assert!(
        in_phase(switch_epoch, kill_epoch) > 0 && in_phase(kill_epoch, f64::MAX) > 0,
        "the load ran on every leader"
    );

    // Every acknowledged row on every node.
    let wanted: BTreeSet<i64> = acked.iter().map(|a| a.id).collect();
    for index in 0..3 {
        let node = ha.node(index);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let replayed = node
                .try_query(&format!(
                    "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END >= '{end}')::text"
                ))
                .await
                .flatten();
            if replayed.as_deref() == Some("true") || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let ids = node
            .try_query("SELECT string_agg(id::text, ',') FROM acked")
            .await
            .flatten()
            .unwrap_or_default();
        let present: BTreeSet<i64> = ids.split(',').filter_map(|s| s.parse().ok()).collect();
        let missing: Vec<&i64> = wanted.difference(&present).take(10).collect();
        if !missing.is_empty() {
            failures.push(format!(
                "{}: {} acknowledged rows missing (first: {missing:?})",
                node.name(),
                wanted.difference(&present).count()
            ));
        }
    }

    // Wait for every archive to complete the last segment.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let inventory = wal_inventory(&repo, SEGMENT).await.unwrap();
        let have =
            |segments: &BTreeSet<(u32, u64)>| segments.contains(&(timeline_now, last_segment));
        let repo_set: BTreeSet<(u32, u64)> = inventory
            .segments
            .iter()
            .filter(|(_, o)| o.complete.is_some())
            .map(|((t, s), _)| (t.0, *s))
            .collect();
        let dir_set: BTreeSet<(u32, u64)> = dir_segments(&dir_archive).into_keys().collect();
        let control_set: BTreeSet<(u32, u64)> =
            dir_segments(&control_archive).into_keys().collect();
        if (have(&repo_set) && have(&dir_set) && have(&control_set)) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // ---------------------------------------------------------------- archives
    let pg_wal = leader.data_dir().join("pg_wal");
    let mut history: Vec<(u32, Lsn)> = Vec::new();
    let mut histories: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
    for tli in 2..=timeline_now {
        let name = format!("{tli:08X}.history");
        let server = std::fs::read(pg_wal.join(&name))
            .unwrap_or_else(|e| panic!("{name} on the leader: {e}"));
        if tli == timeline_now {
            history = parse_history(&server);
        }
        histories.insert(tli, server);
    }
    say(
        &mut report,
        format!("timelines: {history:?} then {timeline_now}"),
    );
    for (tli, server) in &histories {
        let name = format!("{tli:08X}.history");
        for (who, bytes) in [
            (DIR, std::fs::read(dir_archive.join(&name)).ok()),
            (CONTROL, std::fs::read(control_archive.join(&name)).ok()),
            (
                REPO,
                repo.get_optional(
                    &repo.path(&pgrepo::walnames::history_object(TimelineId(*tli))),
                    1 << 20,
                )
                .await
                .unwrap()
                .map(|b| b.to_vec()),
            ),
        ] {
            if bytes.as_deref() != Some(server.as_slice()) {
                failures.push(format!(
                    "{who}: {name} {} the server's",
                    if bytes.is_some() {
                        "differs from"
                    } else {
                        "is missing, unlike"
                    }
                ));
            }
        }
    }
    let inventory = wal_inventory(&repo, SEGMENT).await.unwrap();
    let repo_complete: BTreeMap<(u32, u64), _> = inventory
        .segments
        .iter()
        .filter_map(|((t, s), o)| o.complete.clone().map(|p| ((t.0, *s), p)))
        .collect();
    let dir_complete = dir_segments(&dir_archive);
    let control_complete = dir_segments(&control_archive);
    let backup_start_segment = {
        let list = common::repo::run_with(
            &common::repo::Store {
                url: url.clone(),
                env: env.clone(),
            },
            &["list", "--repo", &url, "--json"],
        )
        .await;
        let listed: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap_or_default();
        listed[0]["start_lsn"]
            .as_str()
            .and_then(|l| l.parse::<Lsn>().ok())
            .map(|l| l.0 / SEGMENT.bytes())
    };
    for (who, have) in [
        (REPO, repo_complete.keys().copied().collect::<BTreeSet<_>>()),
        (DIR, dir_complete.keys().copied().collect()),
        (CONTROL, control_complete.keys().copied().collect()),
    ] {
        let first = have.iter().map(|(_, s)| *s).min().unwrap_or(u64::MAX);
        let missing: Vec<String> = (first..=last_segment)
            .filter(|s| !have.contains(&(owner(&history, timeline_now, *s), *s)))
            .map(|s| {
                pgwire_repl::types::wal_file_name(
                    TimelineId(owner(&history, timeline_now, s)),
                    s,
                    SEGMENT,
                )
            })
            .collect();
        say(
            &mut report,
            format!(
            "archive {who}: segments {first:X}..={last_segment:X}, {} complete files, {} missing",
            have.len(),
            missing.len()
        ),
        );
        if !missing.is_empty() {
            failures.push(format!("archive {who}: missing {missing:?}"));
        }
        if backup_start_segment.is_some_and(|b| first > b) {
            failures.push(format!("archive {who} starts at {first:X}, after the backup's start segment {backup_start_segment:?}"));
        }
    }
    // Complete segments are the same bytes in all three.
    let mut compared = 0;
    for (key, path) in &dir_complete {
        let ours = std::fs::read(path).unwrap();
        if let Some(control) = control_complete.get(key) {
            compared += 1;
            if std::fs::read(control).unwrap() != ours {
                failures.push(format!(
                    "{}: differs between {DIR} and {CONTROL}",
                    path.display()
                ));
            }
        }
        if let Some(object) = repo_complete.get(key) {
            let stored = repo.get_bytes(object, 64 << 20).await.unwrap();
            let plain = if object.as_ref().ends_with(".zst") {
                zstd::bulk::decompress(&stored, SEGMENT.bytes() as usize).unwrap()
            } else {
                stored.to_vec()
            };
            if plain != ours {
                failures.push(format!("{object}: differs between {REPO} and {DIR}"));
            }
        }
    }
    say(
        &mut report,
        format!("{compared} complete segments compared byte for byte"),
    );

    // No receiver gave up.
    for receiver in receivers.iter_mut() {
        receiver.supervise("end");
        if !receiver.exits.is_empty() {
            say(
                &mut report,
                format!("{}: exits {:?}", receiver.name, receiver.exits),
            );
            if receiver.name != CONTROL {
                failures.push(format!(
                    "{} exited (restarted by the test): {:?}",
                    receiver.name, receiver.exits
                ));
            }
        }
    }

    // ---------------------------------------------------------------- restore from the repository
    let restored_dir = work.path().join("restored");
    let restore = common::repo::run_with(
        &common::repo::Store {
            url: url.clone(),
            env: env.clone(),
        },
        &[
            "restore",
            "--repo",
            &url,
            "--pgdata",
            restored_dir.to_str().unwrap(),
            "--json",
        ],
    )
    .await;
    assert!(restore.status.success(), "restore:\n{}", text(&restore));
    let restored = Cluster::start_on_data_dir(
        &restored_dir,
        ClusterOptions::new()
            .setting(
                "hba_file",
                restored_dir.join("pg_hba.conf").display().to_string(),
            )
            .setting(
                "ident_file",
                restored_dir.join("pg_ident.conf").display().to_string(),
            )
            .setting("synchronous_standby_names", "")
            // Patroni passes these on the command line, and recovery needs at least the
            // primary's values.
            .setting("max_connections", "40")
            .setting("max_wal_senders", "16")
            .setting("max_replication_slots", "16")
            .setting("max_worker_processes", "8")
            .setting("max_locks_per_transaction", "64")
            .setting("max_prepared_transactions", "0"),
    );
    common::wait_promoted(&restored).await;
    let digest =
        "SELECT count(*) || ':' || coalesce(sum(hashtext(t::text)::bigint), 0) FROM acked t";
    let cluster_digest = leader.try_query(digest).await.flatten();
    let restored_digest = restored.query_value(digest).await;
    say(
        &mut report,
        format!("restore from the repository: {restored_digest:?}, cluster {cluster_digest:?}"),
    );
    if restored_digest != cluster_digest || restored_digest.is_none() {
        failures.push(format!(
            "the restore from the repository differs from the cluster: {restored_digest:?} vs {cluster_digest:?}"
        ));
    }

    say(
        &mut report,
        format!("total {:.1} s", started.elapsed().as_secs_f64()),
    );
    assert!(
        failures.is_empty(),
        "{} checks failed:\n  {}\n---- report ----\n{}\n---- {REPO} log (tail) ----\n{}\n---- {DIR} log (tail) ----\n{}\n---- {CONTROL} log (tail) ----\n{}",
        failures.len(),
        failures.join("\n  "),
        report.join("\n"),
        tail(&receivers[0].log(), 40),
        tail(&receivers[1].log(), 40),
        tail(&receivers[2].log(), 40),
    );
}

/// Prints a line of the report at once (so that a later panic does not hide it) and
/// keeps it for the final message.
fn say(report: &mut Vec<String>, line: String) {
    println!("patroni: {line}");
    report.push(line);
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
