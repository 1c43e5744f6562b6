//! The WAL-archive benchmarks of issue 15 (`compare --cases wal-archive,sync-commit`).
//!
//! - **wal-archive**: the same range of at least 1 GB of WAL (random text, so it does
//!   not compress to nothing) caught up into a local Garage store: ours streams it
//!   (`clone-standby receive-wal --repo … --start-lsn X --endpos Y --no-loop`) while the
//!   peers get the identical segment files, copied out of the server's `pg_wal` before
//!   the timing, and are driven as PostgreSQL's archiver drives `archive_command`: one
//!   call per segment, serially, in order, each waited for, the `.ready` file renamed to
//!   `.done` after each success. pgBackRest runs `archive-push` with `archive-async=y`
//!   and `process-max=2` (its asynchronous process pushes ahead from the `.ready`
//!   files; each call returns once its own segment is stored); barman-cloud runs
//!   `barman-cloud-wal-archive` per segment.
//! - **sync-commit**: commit latency of single-row INSERTs (pgbench, 1 and 4 clients,
//!   fixed duration) with `synchronous_standby_names` naming our receiver in
//!   `--synchronous` mode into Garage, against `pg_receivewal --synchronous` into a
//!   local directory, and against no synchronous standby.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cluster::{server_user, OsUser, Result, SourceCluster};
use crate::harness::{display_command, OursTool, Sides};
use crate::measure::{self, Usage};
use crate::repo::{
    chown, nodelay_shim, run_ok, write_private, Garage, Owned, Peers, TlsProxy, BUCKET, REGION,
    S3TOOL_PY,
};
use crate::stats::{pair_ratios, summarize, Summary};

/// The slot that keeps the archive case's WAL range on the server.
pub const ARCHIVE_SLOT: &str = "pgrepl_bench_walarch";
/// The application name the synchronous receivers connect with, and that
/// `synchronous_standby_names` lists.
pub const SYNC_APP: &str = "pgrepl_bench_sync";
/// pgBackRest's stanza and barman-cloud's server name.
const SERVER_NAME: &str = "bench";

/// Parses `X/Y` into a 64-bit position.
pub fn parse_lsn(text: &str) -> Result<u64> {
    let (hi, lo) = text
        .trim()
        .split_once('/')
        .ok_or_else(|| format!("not an LSN: {text:?}"))?;
    let hi = u64::from_str_radix(hi, 16).map_err(|e| format!("LSN {text:?}: {e}"))?;
    let lo = u64::from_str_radix(lo, 16).map_err(|e| format!("LSN {text:?}: {e}"))?;
    if hi > u64::from(u32::MAX) || lo > u64::from(u32::MAX) {
        return Err(format!("LSN out of range: {text:?}"));
    }
    Ok(hi << 32 | lo)
}

/// Formats a position as PostgreSQL does (`16/B374D848`).
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// The file name of segment `segno` of timeline `tli`.
pub fn segment_name(tli: u32, segno: u64, segment_size: u64) -> String {
    let per_id = 0x1_0000_0000 / segment_size;
    format!("{tli:08X}{:08X}{:08X}", segno / per_id, segno % per_id)
}

/// The WAL range of the archive case, kept in `<cluster>/walarchive-origin.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ArchiveWal {
    /// The slot holding it on the server.
    pub slot: String,
    /// First byte (a segment boundary).
    pub start: String,
    /// End (a segment boundary: the last segment was switched out).
    pub end: String,
    /// Timeline.
    pub timeline: u32,
    /// Segment size in bytes.
    pub segment_size: u64,
    /// The segment files of the range, in order.
    pub segments: Vec<String>,
    /// Bytes in the range.
    pub bytes: u64,
    /// The size asked for, MB.
    pub target_mb: u64,
}

fn number(cluster: &SourceCluster, sql: &str) -> Result<u64> {
    cluster
        .sql_value(sql)?
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("{sql}: no number"))
}

/// Makes (or reuses) a slot retaining at least `mb` MB of WAL made of random text,
/// whole segments from a segment boundary to a switched-out end.
pub fn prepare_archive_wal(
    cluster: &SourceCluster,
    mb: u64,
    log: &dyn Fn(&str),
) -> Result<ArchiveWal> {
    let state = cluster.base.join("walarchive-origin.json");
    let pg_wal = cluster.data.join("pg_wal");
    if let Some(origin) = std::fs::read_to_string(&state)
        .ok()
        .and_then(|t| serde_json::from_str::<ArchiveWal>(&t).ok())
    {
        let restart = cluster.sql_value(&format!(
            "SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = '{ARCHIVE_SLOT}'"
        ))?;
        let held = match (restart.as_deref().map(parse_lsn), parse_lsn(&origin.start)) {
            // The slot holds the whole segment its restart_lsn is in.
            (Some(Ok(restart)), Ok(start)) => {
                restart / origin.segment_size.max(1) * origin.segment_size <= start
            }
            _ => false,
        };
        if origin.target_mb == mb
            && held
            && origin.segments.iter().all(|s| pg_wal.join(s).is_file())
        {
            log(&format!(
                "reusing the archive case's WAL: {} to {} ({} segments)",
                origin.start,
                origin.end,
                origin.segments.len()
            ));
            return Ok(origin);
        }
    }
    let _ = std::fs::remove_file(&state);
    cluster.sql(&format!(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
         WHERE slot_name = '{ARCHIVE_SLOT}'"
    ))?;
    let segment_size = number(
        cluster,
        "SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'",
    )?;
    cluster.sql("CREATE TABLE IF NOT EXISTS bench_wal_text (id bigint, body text NOT NULL)")?;
    cluster.sql("TRUNCATE bench_wal_text")?;
    cluster.sql("SELECT pg_switch_wal()")?;
    let reserved = cluster
        .sql_value(&format!(
            "SELECT lsn FROM pg_create_physical_replication_slot('{ARCHIVE_SLOT}', true)"
        ))?
        .ok_or("creating the archive case's slot returned no LSN")?;
    let start = parse_lsn(&reserved)? / segment_size * segment_size;
    log(&format!(
        "generating at least {mb} MB of random-text WAL from {}",
        format_lsn(start)
    ));
    let started = Instant::now();
    let mut next = 0u64;
    loop {
        let done = number(
            cluster,
            &format!(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '{}')::bigint",
                format_lsn(start)
            ),
        )?;
        if done >= mb * 1_000_000 {
            break;
        }
        if started.elapsed() > Duration::from_secs(1800) {
            return Err(format!("only {done} bytes of WAL in 30 minutes"));
        }
        // Rows of 1 KiB of base64 text of random bytes: about 1.1 kB of WAL each, which
        // gzip gets to about 3/4 and lz4 hardly at all.
        let rows = 20_000;
        cluster.sql(&format!(
            "INSERT INTO bench_wal_text \
             SELECT g, encode(decode((SELECT string_agg(md5(random()::text || i::text || g::text), '') \
             FROM generate_series(1, 48) AS i), 'hex'), 'base64') \
             FROM generate_series({}, {}) AS g",
            next + 1,
            next + rows
        ))?;
        next += rows;
    }
    let switched = cluster
        .sql_value("SELECT pg_switch_wal()")?
        .ok_or("pg_switch_wal returned nothing")?;
    let switched = parse_lsn(&switched)?;
    let end = switched.div_ceil(segment_size) * segment_size;
    let timeline: u32 = number(cluster, "SELECT timeline_id FROM pg_control_checkpoint()")?
        .try_into()
        .map_err(|_| "timeline out of range".to_string())?;
    let segments: Vec<String> = (start / segment_size..end / segment_size)
        .map(|n| segment_name(timeline, n, segment_size))
        .collect();
    // The switch is flushed when pg_switch_wal returns; wait for the file to be there.
    for s in &segments {
        if !pg_wal.join(s).is_file() {
            return Err(format!("segment {s} is not in {}", pg_wal.display()));
        }
    }
    let origin = ArchiveWal {
        slot: ARCHIVE_SLOT.into(),
        start: format_lsn(start),
        end: format_lsn(end),
        timeline,
        segment_size,
        bytes: end - start,
        segments,
        target_mb: mb,
    };
    log(&format!(
        "archive WAL ready: {} to {} ({} segments, {:.0} MB) in {:.0} s",
        origin.start,
        origin.end,
        origin.segments.len(),
        origin.bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    ));
    std::fs::write(
        &state,
        serde_json::to_string_pretty(&origin).expect("serializable"),
    )
    .map_err(|e| format!("writing {}: {e}", state.display()))?;
    Ok(origin)
}

/// Who archives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ArchiveTool {
    /// `clone-standby receive-wal --repo`.
    Ours,
    /// `pgbackrest archive-push`, asynchronous, two processes.
    #[serde(rename = "pgbackrest")]
    PgBackRest,
    /// `barman-cloud-wal-archive`.
    Barman,
}

impl ArchiveTool {
    fn id(self) -> &'static str {
        match self {
            ArchiveTool::Ours => "ours",
            ArchiveTool::PgBackRest => "pgbackrest",
            ArchiveTool::Barman => "barman",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            ArchiveTool::Ours => "clone-standby receive-wal --repo (zstd, its default), streamed",
            ArchiveTool::PgBackRest => {
                "pgBackRest archive-push, archive-async=y, process-max=2, compress-type=lz4, per segment"
            }
            ArchiveTool::Barman => "barman-cloud-wal-archive --lz4, per segment",
        }
    }
}

/// One measured catch-up.
#[derive(Debug, Clone, Serialize)]
pub struct ArchiveRun {
    /// Round, from 0.
    pub round: u32,
    /// Who.
    pub tool: ArchiveTool,
    /// Exit 0 and every segment in the store.
    pub ok: bool,
    /// Why not.
    pub error: Option<String>,
    /// Wall, CPU, RSS of the driven process tree (pgBackRest's detached async process
    /// is not in the CPU).
    pub usage: Usage,
    /// Bytes stored under the run's prefix.
    pub bytes: u64,
    /// Objects under the prefix.
    pub objects: u64,
    /// The run's log.
    pub log: PathBuf,
}

/// Summary of one tool.
#[derive(Debug, Clone, Serialize)]
pub struct ArchiveRow {
    /// Who.
    pub tool: ArchiveTool,
    /// The command (round 0, placeholders for run paths).
    pub command: String,
    /// Successful runs.
    pub ok_runs: usize,
    /// All runs.
    pub runs: usize,
    /// First failure.
    pub first_error: Option<String>,
    /// Wall s.
    pub wall_s: Option<Summary>,
    /// CPU s.
    pub cpu_s: Option<Summary>,
    /// Peak RSS MiB.
    pub rss_mib: Option<Summary>,
    /// WAL MB per second of wall time.
    pub mb_per_s: Option<Summary>,
    /// MB stored.
    pub mb_stored: Option<Summary>,
    /// Objects stored.
    pub objects: Option<Summary>,
}

/// Ours ÷ a peer (or the best peer of each round), pair by pair.
#[derive(Debug, Clone, Serialize)]
pub struct ArchiveRatio {
    /// The peer, or "best peer".
    pub peer: String,
    /// Wall.
    pub wall: Option<Summary>,
    /// Bytes stored.
    pub bytes: Option<Summary>,
}

/// The wal-archive case.
#[derive(Debug, Clone, Serialize)]
pub struct ArchiveReport {
    /// The range.
    pub wal: ArchiveWal,
    /// Per tool.
    pub rows: Vec<ArchiveRow>,
    /// Ours ÷ peers.
    pub ratios: Vec<ArchiveRatio>,
    /// Every run.
    pub runs: Vec<ArchiveRun>,
}

/// How commits are made durable in the sync-commit case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SyncMode {
    /// No synchronous standby.
    Baseline,
    /// `pg_receivewal --synchronous` into a local directory.
    #[serde(rename = "pg_receivewal")]
    PgReceivewal,
    /// `clone-standby receive-wal --repo … --synchronous` into Garage.
    Ours,
}

impl SyncMode {
    fn id(self) -> &'static str {
        match self {
            SyncMode::Baseline => "no-sync-standby",
            SyncMode::PgReceivewal => "pg_receivewal",
            SyncMode::Ours => "ours",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            SyncMode::Baseline => "no synchronous standby (baseline)",
            SyncMode::PgReceivewal => "pg_receivewal --synchronous into a local directory",
            SyncMode::Ours => "clone-standby receive-wal --repo --synchronous into Garage",
        }
    }
}

/// One pgbench run.
#[derive(Debug, Clone, Serialize)]
pub struct SyncRun {
    /// Round, from 0.
    pub round: u32,
    /// Mode.
    pub mode: SyncMode,
    /// pgbench clients.
    pub clients: u32,
    /// pgbench exited 0 and logged transactions.
    pub ok: bool,
    /// Why not.
    pub error: Option<String>,
    /// Transactions per second (transactions logged ÷ duration).
    pub tps: f64,
    /// Mean commit latency, ms.
    pub mean_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Transactions logged.
    pub transactions: u64,
    /// The run's log.
    pub log: PathBuf,
}

/// Summary of one mode and client count.
#[derive(Debug, Clone, Serialize)]
pub struct SyncRow {
    /// Mode.
    pub mode: SyncMode,
    /// Clients.
    pub clients: u32,
    /// The receiver's command, if any.
    pub command: String,
    /// Successful runs.
    pub ok_runs: usize,
    /// All runs.
    pub runs: usize,
    /// First failure.
    pub first_error: Option<String>,
    /// TPS.
    pub tps: Option<Summary>,
    /// Mean latency ms.
    pub mean_ms: Option<Summary>,
    /// p99 latency ms.
    pub p99_ms: Option<Summary>,
}

/// A mode ÷ pg_receivewal, pair by pair.
#[derive(Debug, Clone, Serialize)]
pub struct SyncRatio {
    /// The mode compared.
    pub mode: SyncMode,
    /// Clients.
    pub clients: u32,
    /// TPS ratio.
    pub tps: Option<Summary>,
    /// Mean latency ratio.
    pub mean: Option<Summary>,
    /// p99 ratio.
    pub p99: Option<Summary>,
}

/// The sync-commit case.
#[derive(Debug, Clone, Serialize)]
pub struct SyncReport {
    /// Seconds per pgbench run.
    pub seconds: u32,
    /// The pgbench script.
    pub script: String,
    /// Per mode and client count.
    pub rows: Vec<SyncRow>,
    /// Ratios to pg_receivewal.
    pub ratios: Vec<SyncRatio>,
    /// Every run.
    pub runs: Vec<SyncRun>,
}

/// Both cases' report.
#[derive(Debug, Clone, Serialize)]
pub struct WalBenchReport {
    /// Store and peer versions.
    pub versions: Vec<String>,
    /// TCP_NODELAY shim in Garage.
    pub nodelay: bool,
    /// Garage fsyncs before acknowledging a write.
    pub garage_fsync: bool,
    /// Rounds.
    pub rounds: u32,
    /// wal-archive, when it ran.
    pub archive: Option<ArchiveReport>,
    /// Why wal-archive could not run at all.
    pub archive_error: Option<String>,
    /// sync-commit, when it ran.
    pub sync: Option<SyncReport>,
    /// Why sync-commit could not run at all.
    pub sync_error: Option<String>,
    /// Notes and checks.
    pub checks: Vec<String>,
}

impl WalBenchReport {
    /// Failed runs, counting a case that could not run as one.
    pub fn failures(&self) -> usize {
        self.archive
            .iter()
            .flat_map(|a| &a.runs)
            .filter(|r| !r.ok)
            .count()
            + self
                .sync
                .iter()
                .flat_map(|s| &s.runs)
                .filter(|r| !r.ok)
                .count()
            + usize::from(self.archive_error.is_some())
            + usize::from(self.sync_error.is_some())
    }
}

/// What the runs need.
pub struct WalBench<'a> {
    /// The source cluster.
    pub cluster: &'a SourceCluster,
    /// Our binary.
    pub ours: &'a OursTool,
    /// Garage and the peers.
    pub peers: &'a Peers,
    /// Which sides run.
    pub sides: Sides,
    /// Rounds.
    pub rounds: u32,
    /// Run wal-archive with this many MB of WAL.
    pub archive_mb: Option<u64>,
    /// Run sync-commit with pgbench runs of this many seconds.
    pub sync_seconds: Option<u32>,
    /// Work directory.
    pub work_dir: PathBuf,
    /// Garage S3 port (+1 RPC, +3 admin, +4 TLS proxy).
    pub base_port: u16,
    /// Preload the TCP_NODELAY shim.
    pub nodelay: bool,
    /// Garage fsyncs data and metadata before acknowledging a write.
    pub garage_fsync: bool,
    /// Per-run time limit, s.
    pub timeout_s: u64,
    /// Progress.
    pub log: &'a dyn Fn(&str),
}

struct Store {
    garage: Garage,
    tls: Option<TlsProxy>,
    s3tool: PathBuf,
    run_dir: PathBuf,
    user: Option<OsUser>,
}

/// Why our binary cannot stream into a repository, if it cannot.
pub fn ours_missing_repo_receiver(ours: &OursTool) -> Option<String> {
    ours.missing_option("receive-wal", "--repo")
}

fn s3_env(store: &Store, cmd: &mut Command) {
    store.garage.s3_env(cmd);
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Reads pgbench's per-transaction logs (`-l`) under `dir` with prefix `prefix`:
/// latencies in microseconds (the third field).
fn pgbench_latencies(dir: &Path, prefix: &str) -> Vec<f64> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        if !entry.file_name().to_string_lossy().starts_with(prefix) {
            continue;
        }
        let mut text = String::new();
        if std::fs::File::open(entry.path())
            .and_then(|mut f| f.read_to_string(&mut text))
            .is_err()
        {
            continue;
        }
        out.extend(
            text.lines()
                .filter_map(|l| l.split_whitespace().nth(2))
                .filter_map(|v| v.parse::<f64>().ok()),
        );
    }
    out
}

impl WalBench<'_> {
    fn as_server_user(&self, store: &Store, cmd: &mut Command) {
        use std::os::unix::process::CommandExt;
        if let Some(user) = store.user {
            cmd.uid(user.uid).gid(user.gid);
        }
        cmd.current_dir(&store.run_dir).env("HOME", &store.run_dir);
    }

    fn s3tool(&self, store: &Store, command: &str, prefix: &str) -> Result<(u64, u64)> {
        let mut cmd = Command::new(self.peers.barman_venv.join("bin/python"));
        cmd.arg(&store.s3tool)
            .args([command, BUCKET, &format!("{prefix}/")])
            .env("S3_ENDPOINT", &store.garage.endpoint);
        s3_env(store, &mut cmd);
        let text = run_ok(&mut cmd, &format!("listing s3://{BUCKET}/{prefix}/"))?;
        let value: serde_json::Value =
            serde_json::from_str(text.trim().lines().last().unwrap_or(""))
                .map_err(|e| format!("s3tool output {text:?}: {e}"))?;
        Ok((
            value["bytes"].as_u64().unwrap_or(0),
            value["objects"].as_u64().unwrap_or(0),
        ))
    }

    fn set_sync_names(&self, names: &str) -> Result<()> {
        self.cluster.sql(&format!(
            "ALTER SYSTEM SET synchronous_standby_names = '{}'",
            names.replace('\'', "''")
        ))?;
        self.cluster.sql("SELECT pg_reload_conf()")?;
        Ok(())
    }

    /// Starts Garage (and the TLS proxy when pgBackRest runs), runs the cases, stops it.
    pub fn run(&self) -> Result<WalBenchReport> {
        let log = self.log;
        let user = server_user()?;
        let root = self.work_dir.join("walrepo");
        let run_dir = root.join("run");
        let _ = std::fs::remove_dir_all(&run_dir);
        std::fs::create_dir_all(&run_dir).map_err(|e| format!("{}: {e}", run_dir.display()))?;
        chown(&run_dir, user)?;
        let _ = std::fs::create_dir_all(self.work_dir.join("logs"));
        let _ = std::fs::create_dir_all(self.work_dir.join("targets"));
        let shim = if self.nodelay {
            Some(nodelay_shim(&root)?)
        } else {
            None
        };
        let garage = Garage::start_with(
            &self.peers.garage,
            &root.join("garage"),
            self.base_port,
            shim.as_deref(),
            self.garage_fsync,
            log,
        )?;
        let archive_tools = self.archive_tools();
        let tls = if self.archive_mb.is_some() && archive_tools.contains(&ArchiveTool::PgBackRest) {
            Some(TlsProxy::start(
                &self.peers.haproxy,
                &root.join("tls"),
                self.base_port + 4,
                garage.s3_port,
            )?)
        } else {
            None
        };
        let s3tool = root.join("s3tool.py");
        std::fs::write(&s3tool, S3TOOL_PY).map_err(|e| format!("{}: {e}", s3tool.display()))?;
        let store = Store {
            garage,
            tls,
            s3tool,
            run_dir,
            user,
        };
        let mut report = WalBenchReport {
            versions: self.peers.versions.clone(),
            nodelay: store.garage.nodelay,
            garage_fsync: store.garage.fsync,
            rounds: self.rounds,
            archive: None,
            archive_error: None,
            sync: None,
            sync_error: None,
            checks: Vec::new(),
        };
        if let Some(mb) = self.archive_mb {
            match self.archive_case(&store, mb, &archive_tools, &mut report.checks) {
                Ok(a) => report.archive = Some(a),
                Err(e) => {
                    log(&format!("wal-archive: {e}"));
                    report.archive_error = Some(e);
                }
            }
        }
        if let Some(seconds) = self.sync_seconds {
            match self.sync_case(&store, seconds, &mut report.checks) {
                Ok(s) => report.sync = Some(s),
                Err(e) => {
                    log(&format!("sync-commit: {e}"));
                    report.sync_error = Some(e);
                }
            }
            if let Err(e) = self.set_sync_names("") {
                report
                    .checks
                    .push(format!("resetting synchronous_standby_names: {e}"));
            }
        }
        // The store's log outlives the store: a slow or failed upload is explained there.
        let kept = self.work_dir.join("logs").join("walrepo-garage.log");
        match store.garage.keep_log(&kept) {
            Ok(()) => log(&format!("Garage's log kept in {}", kept.display())),
            Err(e) => report.checks.push(e),
        }
        drop(store.tls);
        store.garage.stop();
        Ok(report)
    }

    fn archive_tools(&self) -> Vec<ArchiveTool> {
        match self.sides {
            Sides::Both => vec![
                ArchiveTool::Ours,
                ArchiveTool::PgBackRest,
                ArchiveTool::Barman,
            ],
            Sides::Ours => vec![ArchiveTool::Ours],
            Sides::Reference => vec![ArchiveTool::PgBackRest, ArchiveTool::Barman],
        }
    }

    /// Copies the range's segments into `<work>/walrepo/stage/pg_wal` (once; kept), owned
    /// by the server user: what the peers archive. The stage is laid out as a data
    /// directory (with a copy of `global/pg_control`), because pgBackRest's
    /// `archive-push` accepts only WAL inside its `pg1-path` and reads the control file
    /// there.
    fn stage_segments(&self, store: &Store, wal: &ArchiveWal) -> Result<PathBuf> {
        let base = self.work_dir.join("walrepo/stage");
        let stage = base.join("pg_wal");
        let global = base.join("global");
        for dir in [&base, &stage, &global] {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            chown(dir, store.user)?;
        }
        let control = global.join("pg_control");
        std::fs::copy(self.cluster.data.join("global/pg_control"), &control)
            .map_err(|e| format!("copying pg_control: {e}"))?;
        chown(&control, store.user)?;
        let wanted: std::collections::BTreeSet<&str> =
            wal.segments.iter().map(String::as_str).collect();
        for entry in std::fs::read_dir(&stage)
            .map_err(|e| e.to_string())?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name != "archive_status" && !wanted.contains(name.as_str()) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        for s in &wal.segments {
            let to = stage.join(s);
            let have = std::fs::metadata(&to).map(|m| m.len()).unwrap_or(0);
            if have != wal.segment_size {
                std::fs::copy(self.cluster.data.join("pg_wal").join(s), &to)
                    .map_err(|e| format!("copying {s}: {e}"))?;
            }
            chown(&to, store.user)?;
        }
        Ok(stage)
    }

    /// A fresh `archive_status` with a `.ready` file per segment, as the server has them
    /// when its archiver has a backlog to catch up.
    fn reset_ready(&self, store: &Store, stage: &Path, wal: &ArchiveWal) -> Result<()> {
        let status = stage.join("archive_status");
        let _ = std::fs::remove_dir_all(&status);
        std::fs::create_dir_all(&status).map_err(|e| format!("{}: {e}", status.display()))?;
        chown(&status, store.user)?;
        for s in &wal.segments {
            let f = status.join(format!("{s}.ready"));
            std::fs::write(&f, b"").map_err(|e| format!("{}: {e}", f.display()))?;
            chown(&f, store.user)?;
        }
        Ok(())
    }

    fn pgbackrest_conf(&self, store: &Store, prefix: &str) -> Result<PathBuf> {
        let tls = store.tls.as_ref().ok_or("no TLS proxy for pgBackRest")?;
        let path = store.run_dir.join(format!("pgbackrest-{prefix}.conf"));
        let spool = store.run_dir.join(format!("spool-{prefix}"));
        let _ = std::fs::remove_dir_all(&spool);
        std::fs::create_dir_all(&spool).map_err(|e| format!("{}: {e}", spool.display()))?;
        chown(&spool, store.user)?;
        let text = format!(
            "[global]\nrepo1-type=s3\nrepo1-s3-endpoint=localhost\nrepo1-storage-host=127.0.0.1\n\
             repo1-storage-port={port}\nrepo1-storage-ca-file={ca}\nrepo1-s3-uri-style=path\n\
             repo1-s3-bucket={BUCKET}\nrepo1-s3-region={REGION}\nrepo1-s3-key={key}\n\
             repo1-s3-key-secret={secret}\nrepo1-path=/{prefix}\nrepo1-retention-full=9999\n\
             archive-async=y\nprocess-max=2\ncompress-type=lz4\nspool-path={spool}\n\
             log-level-console=warn\nlog-level-file=off\nlock-path={run}/pgbackrest-lock\n\n\
             [{SERVER_NAME}]\npg1-path={data}\npg1-port={pgport}\npg1-socket-path={socket}\npg1-user=postgres\n",
            port = tls.port,
            ca = tls.ca_file.display(),
            key = store.garage.key_id,
            secret = store.garage.secret,
            spool = spool.display(),
            run = store.run_dir.display(),
            data = self.cluster.data.display(),
            pgport = self.cluster.port,
            socket = self.cluster.base.display(),
        );
        write_private(&path, &text, store.user)?;
        Ok(path)
    }

    /// The archiver's loop as a script: one call per segment, in order, each waited for,
    /// `.ready` renamed to `.done` after a success; stops at the first failure.
    fn driver_script(
        &self,
        store: &Store,
        prefix: &str,
        stage: &Path,
        wal: &ArchiveWal,
        call: &str,
        env: &str,
    ) -> Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let list = store.run_dir.join(format!("segments-{prefix}.txt"));
        std::fs::write(&list, wal.segments.join("\n") + "\n").map_err(|e| e.to_string())?;
        chown(&list, store.user)?;
        let path = store.run_dir.join(format!("archiver-{prefix}.sh"));
        let text = format!(
            "#!/bin/sh\n# PostgreSQL's archiver, as a loop: one archive_command per segment, in order.\n\
             {env}cd '{stage}' || exit 1\n\
             while read -r seg; do\n\
             \x20 {call} \"$PWD/$seg\" || {{ echo \"archive_command failed for $seg\" >&2; exit 1; }}\n\
             \x20 mv \"archive_status/$seg.ready\" \"archive_status/$seg.done\" || exit 1\n\
             done < '{list}'\n",
            stage = stage.display(),
            list = list.display(),
        );
        write_private(&path, &text, store.user)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| e.to_string())?;
        Ok(path)
    }

    /// The command of one tool's run: (program, args, as the server user).
    fn archive_command(
        &self,
        store: &Store,
        tool: ArchiveTool,
        prefix: &str,
        stage: &Path,
        wal: &ArchiveWal,
    ) -> Result<(PathBuf, Vec<String>, bool)> {
        match tool {
            ArchiveTool::Ours => Ok((
                self.ours.path.clone(),
                vec![
                    "receive-wal".into(),
                    "--source".into(),
                    self.cluster.conninfo(),
                    "--repo".into(),
                    format!("s3://{BUCKET}/{prefix}"),
                    "--start-lsn".into(),
                    wal.start.clone(),
                    "--endpos".into(),
                    wal.end.clone(),
                    "--no-loop".into(),
                ],
                false,
            )),
            ArchiveTool::PgBackRest => {
                let conf = self.pgbackrest_conf(store, prefix)?;
                let mut create = Command::new(&self.peers.pgbackrest);
                create
                    .arg(format!("--config={}", conf.display()))
                    .arg(format!("--stanza={SERVER_NAME}"))
                    .arg("stanza-create");
                self.as_server_user(store, &mut create);
                run_ok(&mut create, "pgbackrest stanza-create")?;
                let call = format!(
                    "'{}' --config='{}' --stanza={SERVER_NAME} --pg1-path='{}' archive-push",
                    self.peers.pgbackrest.display(),
                    conf.display(),
                    stage.parent().unwrap_or(stage).display()
                );
                let script = self.driver_script(store, prefix, stage, wal, &call, "")?;
                Ok((script, Vec::new(), true))
            }
            ArchiveTool::Barman => {
                let env = format!(
                    "export AWS_ACCESS_KEY_ID='{}' AWS_SECRET_ACCESS_KEY='{}' AWS_DEFAULT_REGION={REGION}\n",
                    store.garage.key_id, store.garage.secret
                );
                let call = format!(
                    "'{}/bin/barman-cloud-wal-archive' --endpoint-url {} --lz4 s3://{BUCKET}/{prefix} {SERVER_NAME}",
                    self.peers.barman_venv.display(),
                    store.garage.endpoint
                );
                let script = self.driver_script(store, prefix, stage, wal, &call, &env)?;
                Ok((script, Vec::new(), true))
            }
        }
    }

    /// Waits (up to 60 s) until no process runs with `needle` in its command line: the
    /// pgBackRest asynchronous archiver of the run that just ended.
    fn wait_gone(needle: &str) {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            let busy = std::fs::read_dir("/proc")
                .map(|d| {
                    d.flatten().any(|e| {
                        std::fs::read(e.path().join("cmdline"))
                            .map(|c| String::from_utf8_lossy(&c).contains(needle))
                            .unwrap_or(false)
                    })
                })
                .unwrap_or(false);
            if !busy {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn archive_case(
        &self,
        store: &Store,
        mb: u64,
        tools: &[ArchiveTool],
        checks: &mut Vec<String>,
    ) -> Result<ArchiveReport> {
        let log = self.log;
        let wal = prepare_archive_wal(self.cluster, mb, log)?;
        let stage = if tools.iter().any(|&t| t != ArchiveTool::Ours) {
            log("copying the segments for the peers (untimed)");
            self.stage_segments(store, &wal)?
        } else {
            PathBuf::new()
        };
        let ours_missing = ours_missing_repo_receiver(self.ours);
        let mut runs = Vec::new();
        for round in 0..self.rounds {
            log(&format!("wal-archive round {}/{}", round + 1, self.rounds));
            let mut order = tools.to_vec();
            let shift = round as usize % order.len().max(1);
            order.rotate_left(shift);
            for tool in order {
                let prefix = format!("wal-r{round}-{}", tool.id());
                let logf = self
                    .work_dir
                    .join("logs")
                    .join(format!("wal-archive-{}-r{round}.log", tool.id()));
                let mut run = ArchiveRun {
                    round,
                    tool,
                    ok: false,
                    error: None,
                    usage: Usage::default(),
                    bytes: 0,
                    objects: 0,
                    log: logf.clone(),
                };
                if tool == ArchiveTool::Ours {
                    if let Some(why) = &ours_missing {
                        run.error = Some(why.clone());
                        log(&format!("  wal-archive {:<11} FAILED: {why}", tool.id()));
                        runs.push(run);
                        continue;
                    }
                } else if let Err(e) = self.reset_ready(store, &stage, &wal) {
                    run.error = Some(e);
                    runs.push(run);
                    continue;
                }
                let (program, args, as_user) =
                    match self.archive_command(store, tool, &prefix, &stage, &wal) {
                        Ok(c) => c,
                        Err(e) => {
                            run.error = Some(format!("preparing: {e}"));
                            runs.push(run);
                            continue;
                        }
                    };
                let mut cmd = Command::new(&program);
                cmd.args(&args).env_remove("PGDATA").env("LC_ALL", "C");
                if tool == ArchiveTool::Ours {
                    s3_env(store, &mut cmd);
                }
                if as_user {
                    self.as_server_user(store, &mut cmd);
                }
                let _ = std::fs::write(&logf, format!("$ {}\n", display_command(&program, &args)));
                // SAFETY: sync has no preconditions.
                unsafe { libc::sync() };
                let (usage, error) =
                    measure::run_logged(&mut cmd, &logf, Duration::from_secs(self.timeout_s));
                run.ok = error.is_none();
                run.error = error;
                run.usage = usage;
                if tool == ArchiveTool::PgBackRest {
                    Self::wait_gone(&format!("pgbackrest-{prefix}.conf"));
                }
                match self.s3tool(store, "list", &prefix) {
                    Ok((bytes, objects)) => {
                        run.bytes = bytes;
                        run.objects = objects;
                        if run.ok && (objects as usize) < wal.segments.len() {
                            run.ok = false;
                            run.error = Some(format!(
                                "exit 0 but only {objects} objects stored for {} segments",
                                wal.segments.len()
                            ));
                        }
                    }
                    Err(e) => checks.push(format!("{prefix}: {e}")),
                }
                match &run.error {
                    None => log(&format!(
                        "  wal-archive {:<11} {:7.2} s wall, {:6.2} s CPU, {:5.0} MiB RSS, {:6.0} MB in {} objects",
                        tool.id(),
                        run.usage.wall_s,
                        run.usage.cpu_s(),
                        run.usage.max_rss_kib as f64 / 1024.0,
                        run.bytes as f64 / 1e6,
                        run.objects
                    )),
                    Some(e) => log(&format!("  wal-archive {:<11} FAILED: {e}", tool.id())),
                }
                runs.push(run);
            }
        }
        // The report's command lines, with placeholders for the run's own paths.
        let mut rows = Vec::new();
        for &tool in tools {
            let mine: Vec<&ArchiveRun> = runs.iter().filter(|r| r.tool == tool).collect();
            let ok: Vec<&ArchiveRun> = mine.iter().copied().filter(|r| r.ok).collect();
            let of = |f: &dyn Fn(&ArchiveRun) -> f64| {
                summarize(&ok.iter().map(|r| f(r)).collect::<Vec<_>>())
            };
            let command = match tool {
                ArchiveTool::Ours => format!(
                    "clone-standby receive-wal --source \"{}\" --repo s3://{BUCKET}/wal-rN-ours --start-lsn {} --endpos {} --no-loop",
                    self.cluster.conninfo(),
                    wal.start,
                    wal.end
                ),
                ArchiveTool::PgBackRest => format!(
                    "for each segment, in order: pgbackrest --config=RUN/pgbackrest-wal-rN-pgbackrest.conf --stanza={SERVER_NAME} --pg1-path=STAGE archive-push STAGE/pg_wal/SEGMENT (archive-async=y, process-max=2, compress-type=lz4), then .ready → .done"
                ),
                ArchiveTool::Barman => format!(
                    "for each segment, in order: barman-cloud-wal-archive --endpoint-url {} --lz4 s3://{BUCKET}/wal-rN-barman {SERVER_NAME} STAGE/pg_wal/SEGMENT, then .ready → .done",
                    store.garage.endpoint
                ),
            };
            rows.push(ArchiveRow {
                tool,
                command,
                ok_runs: ok.len(),
                runs: mine.len(),
                first_error: mine.iter().find_map(|r| r.error.clone()),
                wall_s: of(&|r| r.usage.wall_s),
                cpu_s: of(&|r| r.usage.cpu_s()),
                rss_mib: of(&|r| r.usage.max_rss_kib as f64 / 1024.0),
                mb_per_s: of(&|r| wal.bytes as f64 / 1e6 / r.usage.wall_s),
                mb_stored: of(&|r| r.bytes as f64 / 1e6),
                objects: of(&|r| r.objects as f64),
            });
        }
        let per_round = |tool: ArchiveTool, f: &dyn Fn(&ArchiveRun) -> f64| {
            (0..self.rounds)
                .map(|round| {
                    runs.iter()
                        .find(|r| r.tool == tool && r.round == round && r.ok)
                        .map(f)
                })
                .collect::<Vec<_>>()
        };
        let mut ratios = Vec::new();
        if tools.contains(&ArchiveTool::Ours) {
            let peers: Vec<ArchiveTool> = tools
                .iter()
                .copied()
                .filter(|&t| t != ArchiveTool::Ours)
                .collect();
            let wall = |r: &ArchiveRun| r.usage.wall_s;
            let bytes = |r: &ArchiveRun| r.bytes as f64;
            for &peer in &peers {
                ratios.push(ArchiveRatio {
                    peer: peer.id().into(),
                    wall: pair_ratios(
                        &per_round(ArchiveTool::Ours, &wall),
                        &per_round(peer, &wall),
                    ),
                    bytes: pair_ratios(
                        &per_round(ArchiveTool::Ours, &bytes),
                        &per_round(peer, &bytes),
                    ),
                });
            }
            if peers.len() > 1 {
                // Per round, the faster peer of that round.
                let best: Vec<Option<f64>> = (0..self.rounds as usize)
                    .map(|i| {
                        peers
                            .iter()
                            .filter_map(|&p| per_round(p, &wall)[i])
                            .min_by(f64::total_cmp)
                    })
                    .collect();
                ratios.push(ArchiveRatio {
                    peer: "best peer of the round".into(),
                    wall: pair_ratios(&per_round(ArchiveTool::Ours, &wall), &best),
                    bytes: None,
                });
            }
        }
        Ok(ArchiveReport {
            wal,
            rows,
            ratios,
            runs,
        })
    }

    fn sync_modes(&self) -> Vec<SyncMode> {
        match self.sides {
            Sides::Both => vec![SyncMode::Ours, SyncMode::PgReceivewal, SyncMode::Baseline],
            Sides::Ours => vec![SyncMode::Ours],
            Sides::Reference => vec![SyncMode::PgReceivewal, SyncMode::Baseline],
        }
    }

    fn receiver_conninfo(&self) -> String {
        format!("{} application_name={SYNC_APP}", self.cluster.conninfo())
    }

    fn receiver_command(&self, mode: SyncMode, target: &str) -> Option<(PathBuf, Vec<String>)> {
        match mode {
            SyncMode::Baseline => None,
            SyncMode::PgReceivewal => Some((
                self.cluster.bin_dir.join("pg_receivewal"),
                vec![
                    "-d".into(),
                    self.receiver_conninfo(),
                    "-D".into(),
                    target.into(),
                    "--synchronous".into(),
                    "-n".into(),
                ],
            )),
            SyncMode::Ours => Some((
                self.ours.path.clone(),
                vec![
                    "receive-wal".into(),
                    "--source".into(),
                    self.receiver_conninfo(),
                    "--repo".into(),
                    format!("s3://{BUCKET}/{target}"),
                    "--synchronous".into(),
                ],
            )),
        }
    }

    /// Waits until the receiver is the server's synchronous standby and streaming.
    fn wait_sync(&self, receiver: &mut Owned, log: &Path) -> Result<()> {
        let started = Instant::now();
        loop {
            receiver.check_alive(log)?;
            let state = self.cluster.sql_value(&format!(
                "SELECT state || '/' || sync_state FROM pg_stat_replication \
                 WHERE application_name = '{SYNC_APP}'"
            ))?;
            if state.as_deref() == Some("streaming/sync") {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(60) {
                return Err(format!(
                    "the receiver was not the synchronous standby within 60 s (state {state:?})"
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop_receiver(mut receiver: Owned) {
        let pid = receiver.child.id() as libc::pid_t;
        // SAFETY: kill on our own child's pid (not yet reaped).
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = receiver.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Dropping kills (SIGKILL) and reaps.
        drop(receiver);
    }

    #[allow(clippy::too_many_arguments)]
    fn sync_run(
        &self,
        store: &Store,
        script: &Path,
        mode: SyncMode,
        clients: u32,
        seconds: u32,
        round: u32,
        ours_missing: &Option<String>,
    ) -> SyncRun {
        let name = format!("sync-{}-c{clients}-r{round}", mode.id());
        let logf = self.work_dir.join("logs").join(format!("{name}.log"));
        let mut run = SyncRun {
            round,
            mode,
            clients,
            ok: false,
            error: None,
            tps: 0.0,
            mean_ms: 0.0,
            p99_ms: 0.0,
            transactions: 0,
            log: logf.clone(),
        };
        if mode == SyncMode::Ours {
            if let Some(why) = ours_missing {
                run.error = Some(why.clone());
                return run;
            }
        }
        let target_dir = self.work_dir.join("targets").join(&name);
        let _ = std::fs::remove_dir_all(&target_dir);
        if mode == SyncMode::PgReceivewal {
            if let Err(e) = std::fs::create_dir_all(&target_dir) {
                run.error = Some(format!("{}: {e}", target_dir.display()));
                return run;
            }
        }
        let target = match mode {
            SyncMode::Ours => name.clone(),
            _ => target_dir.to_string_lossy().into_owned(),
        };
        let receiver_log = self
            .work_dir
            .join("logs")
            .join(format!("{name}-receiver.log"));
        let mut receiver = None;
        if let Some((program, args)) = self.receiver_command(mode, &target) {
            let mut cmd = Command::new(&program);
            cmd.args(&args).env("LC_ALL", "C");
            s3_env(store, &mut cmd);
            match Owned::spawn(&mut cmd, &receiver_log, "the synchronous receiver") {
                Ok(r) => receiver = Some(r),
                Err(e) => {
                    run.error = Some(e);
                    return run;
                }
            }
        }
        let prepared = match receiver.as_mut() {
            None => self.set_sync_names(""),
            Some(r) => self
                .set_sync_names(SYNC_APP)
                .and_then(|()| self.wait_sync(r, &receiver_log)),
        };
        if let Err(e) = prepared {
            run.error = Some(e);
            let _ = self.set_sync_names("");
            if let Some(r) = receiver {
                Self::stop_receiver(r);
            }
            return run;
        }
        let pgbench_dir = self.work_dir.join("logs").join(format!("{name}-pgbench"));
        let _ = std::fs::remove_dir_all(&pgbench_dir);
        let _ = std::fs::create_dir_all(&pgbench_dir);
        let pgbench = self.cluster.bin_dir.join("pgbench");
        let mut args: Vec<String> = vec![
            "-n".into(),
            "-f".into(),
            script.to_string_lossy().into_owned(),
            "-c".into(),
            clients.to_string(),
            "-j".into(),
            clients.min(2).to_string(),
            "-T".into(),
            seconds.to_string(),
            "-l".into(),
            "--log-prefix=tx".into(),
        ];
        args.extend(self.cluster.client_args());
        args.push("postgres".into());
        let mut cmd = Command::new(&pgbench);
        cmd.args(&args).current_dir(&pgbench_dir).env("LC_ALL", "C");
        let _ = std::fs::write(&logf, format!("$ {}\n", display_command(&pgbench, &args)));
        let measured = measure::run_measured(
            &mut cmd,
            &logf,
            Duration::from_secs(u64::from(seconds) + 60),
        );
        // Release any commit still waiting before the receiver goes.
        let _ = self.set_sync_names("");
        let alive = match receiver.as_mut() {
            Some(r) => r.check_alive(&receiver_log),
            None => Ok(()),
        };
        if let Some(r) = receiver {
            Self::stop_receiver(r);
        }
        let mut latencies = pgbench_latencies(&pgbench_dir, "tx");
        let _ = std::fs::remove_dir_all(&pgbench_dir);
        let _ = std::fs::remove_dir_all(&target_dir);
        match measured {
            Ok(usage) if usage.success() && !latencies.is_empty() => {
                if let Err(e) = alive {
                    run.error = Some(format!("the receiver died during the run: {e}"));
                    return run;
                }
                latencies.sort_by(f64::total_cmp);
                run.transactions = latencies.len() as u64;
                run.tps = latencies.len() as f64 / f64::from(seconds);
                run.mean_ms = latencies.iter().sum::<f64>() / latencies.len() as f64 / 1000.0;
                run.p99_ms = percentile(&latencies, 99.0) / 1000.0;
                run.ok = true;
            }
            Ok(usage) => {
                run.error = Some(if usage.timed_out {
                    "pgbench timed out (commits hung?)".into()
                } else if usage.success() {
                    "pgbench logged no transaction".into()
                } else {
                    measure::last_line(&logf)
                })
            }
            Err(e) => run.error = Some(format!("could not run pgbench: {e}")),
        }
        run
    }

    fn sync_case(
        &self,
        store: &Store,
        seconds: u32,
        checks: &mut Vec<String>,
    ) -> Result<SyncReport> {
        let log = self.log;
        let ours_missing = ours_missing_repo_receiver(self.ours);
        self.cluster.sql(
            "CREATE TABLE IF NOT EXISTS bench_commit (id bigserial PRIMARY KEY, client int NOT NULL)",
        )?;
        self.cluster.sql("TRUNCATE bench_commit")?;
        let script_text = "INSERT INTO bench_commit (client) VALUES (:client_id);\n";
        let script = store.run_dir.join("commit.sql");
        std::fs::write(&script, script_text).map_err(|e| e.to_string())?;
        let modes = self.sync_modes();
        let client_counts = [1u32, 4];
        let mut runs = Vec::new();
        for round in 0..self.rounds {
            log(&format!("sync-commit round {}/{}", round + 1, self.rounds));
            for &clients in &client_counts {
                let mut order = modes.clone();
                let shift = (round as usize + clients as usize) % order.len().max(1);
                order.rotate_left(shift);
                for mode in order {
                    let run =
                        self.sync_run(store, &script, mode, clients, seconds, round, &ours_missing);
                    match &run.error {
                        None => log(&format!(
                            "  sync-commit {:<16} {clients} client(s): {:8.0} tps, mean {:6.2} ms, p99 {:6.2} ms",
                            mode.id(),
                            run.tps,
                            run.mean_ms,
                            run.p99_ms
                        )),
                        Some(e) => log(&format!(
                            "  sync-commit {:<16} {clients} client(s): FAILED: {e}",
                            mode.id()
                        )),
                    }
                    runs.push(run);
                }
            }
        }
        self.cluster.sql("TRUNCATE bench_commit")?;
        let mut rows = Vec::new();
        let mut ratios = Vec::new();
        for &clients in &client_counts {
            for &mode in &modes {
                let mine: Vec<&SyncRun> = runs
                    .iter()
                    .filter(|r| r.mode == mode && r.clients == clients)
                    .collect();
                let ok: Vec<&SyncRun> = mine.iter().copied().filter(|r| r.ok).collect();
                let of = |f: &dyn Fn(&SyncRun) -> f64| {
                    summarize(&ok.iter().map(|r| f(r)).collect::<Vec<_>>())
                };
                rows.push(SyncRow {
                    mode,
                    clients,
                    command: self
                        .receiver_command(
                            mode,
                            if mode == SyncMode::Ours {
                                "sync-ours-cN-rN"
                            } else {
                                "TARGET"
                            },
                        )
                        .map(|(p, a)| display_command(&p, &a))
                        .unwrap_or_default(),
                    ok_runs: ok.len(),
                    runs: mine.len(),
                    first_error: mine.iter().find_map(|r| r.error.clone()),
                    tps: of(&|r| r.tps),
                    mean_ms: of(&|r| r.mean_ms),
                    p99_ms: of(&|r| r.p99_ms),
                });
            }
            let per_round = |mode: SyncMode, f: &dyn Fn(&SyncRun) -> f64| {
                (0..self.rounds)
                    .map(|round| {
                        runs.iter()
                            .find(|r| {
                                r.mode == mode && r.clients == clients && r.round == round && r.ok
                            })
                            .map(f)
                    })
                    .collect::<Vec<_>>()
            };
            if modes.contains(&SyncMode::PgReceivewal) {
                for &mode in modes.iter().filter(|&&m| m != SyncMode::PgReceivewal) {
                    let ratio = |f: &dyn Fn(&SyncRun) -> f64| {
                        pair_ratios(&per_round(mode, f), &per_round(SyncMode::PgReceivewal, f))
                    };
                    ratios.push(SyncRatio {
                        mode,
                        clients,
                        tps: ratio(&|r| r.tps),
                        mean: ratio(&|r| r.mean_ms),
                        p99: ratio(&|r| r.p99_ms),
                    });
                }
            }
        }
        let rows_with_runs = rows.iter().filter(|r| r.ok_runs > 0).count();
        if rows_with_runs == 0 {
            checks.push("sync-commit: no successful run".into());
        }
        Ok(SyncReport {
            seconds,
            script: script_text.trim().into(),
            rows,
            ratios,
            runs,
        })
    }
}

/// The markdown section of both cases.
pub fn markdown(report: &WalBenchReport) -> String {
    use std::fmt::Write;
    let mr = |s: Option<Summary>, d: usize| match s {
        Some(s) if s.n > 1 => format!("{:.d$} ({:.d$}–{:.d$})", s.median, s.min, s.max),
        Some(s) => format!("{:.d$}", s.median),
        None => "–".into(),
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "### WAL archive in object storage (Garage)\n\nStore: {}; single node on loopback, \
         TCP_NODELAY shim {}, {}; {} round(s), order rotated per round.\n",
        report.versions.join("; "),
        if report.nodelay {
            "on"
        } else {
            "off (stock Garage)"
        },
        if report.garage_fsync {
            "data_fsync and metadata_fsync on (a write is acknowledged once on disk)"
        } else {
            "Garage's default data_fsync = metadata_fsync = false (a write is acknowledged before it is on disk)"
        },
        report.rounds
    );
    if let Some(a) = &report.archive {
        let _ = writeln!(
            out,
            "#### wal-archive: catching up {} segments ({:.0} MB of random-text WAL, {} to {})\n",
            a.wal.segments.len(),
            a.wal.bytes as f64 / 1e6,
            a.wal.start,
            a.wal.end
        );
        let _ = writeln!(
            out,
            "| tool | settings | ok | wall s | CPU s (user+sys) | peak RSS MiB | WAL MB/s | MB stored | objects |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
        for row in &a.rows {
            let _ = writeln!(
                out,
                "| {} | {} | {}/{} | {} | {} | {} | {} | {} | {} |",
                row.tool.id(),
                row.tool.describe(),
                row.ok_runs,
                row.runs,
                mr(row.wall_s, 2),
                mr(row.cpu_s, 2),
                mr(row.rss_mib, 0),
                mr(row.mb_per_s, 0),
                mr(row.mb_stored, 0),
                mr(row.objects, 0)
            );
        }
        if !a.ratios.is_empty() {
            let _ = writeln!(out, "\n| ours ÷ | wall | bytes stored | pairs |");
            let _ = writeln!(out, "|---|---|---|---|");
            for r in &a.ratios {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} |",
                    r.peer,
                    mr(r.wall, 2),
                    mr(r.bytes, 2),
                    r.wall.map(|s| s.n).unwrap_or(0)
                );
            }
        }
        let _ = writeln!(out);
        for row in &a.rows {
            let _ = writeln!(out, "- {}: `{}`", row.tool.id(), row.command);
            if let Some(e) = &row.first_error {
                let _ = writeln!(out, "  - failure: {e}");
            }
        }
    }
    if let Some(e) = &report.archive_error {
        let _ = writeln!(out, "\nwal-archive could not run: {e}\n");
    }
    if let Some(s) = &report.sync {
        let _ = writeln!(
            out,
            "\n#### sync-commit: pgbench `{}`, {} s per run\n",
            s.script, s.seconds
        );
        let _ = writeln!(
            out,
            "| clients | synchronous standby | ok | TPS | mean latency ms | p99 latency ms |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|");
        for row in &s.rows {
            let _ = writeln!(
                out,
                "| {} | {} | {}/{} | {} | {} | {} |",
                row.clients,
                row.mode.describe(),
                row.ok_runs,
                row.runs,
                mr(row.tps, 0),
                mr(row.mean_ms, 2),
                mr(row.p99_ms, 2)
            );
        }
        if !s.ratios.is_empty() {
            let _ = writeln!(
                out,
                "\n| ÷ pg_receivewal --synchronous | clients | TPS | mean latency | p99 latency | pairs |"
            );
            let _ = writeln!(out, "|---|---|---|---|---|---|");
            for r in &s.ratios {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} |",
                    r.mode.describe(),
                    r.clients,
                    mr(r.tps, 2),
                    mr(r.mean, 2),
                    mr(r.p99, 2),
                    r.tps.map(|x| x.n).unwrap_or(0)
                );
            }
        }
        let _ = writeln!(out);
        for row in s.rows.iter().filter(|r| r.clients == 1) {
            if !row.command.is_empty() {
                let _ = writeln!(out, "- {}: `{}`", row.mode.id(), row.command);
            }
        }
        for row in &s.rows {
            if let Some(e) = &row.first_error {
                let _ = writeln!(
                    out,
                    "- failure, {} with {} client(s): {e}",
                    row.mode.id(),
                    row.clients
                );
            }
        }
    }
    if let Some(e) = &report.sync_error {
        let _ = writeln!(out, "\nsync-commit could not run: {e}\n");
    }
    for check in &report.checks {
        let _ = writeln!(out, "- check: {check}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_and_segment_names() {
        assert_eq!(parse_lsn("16/B374D848").unwrap(), 0x16_B374_D848);
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert!(parse_lsn("nonsense").is_err());
        let seg = 16 * 1024 * 1024;
        assert_eq!(segment_name(1, 0x1ff, seg), "0000000100000001000000FF");
        assert_eq!(segment_name(2, 3, seg), "000000020000000000000003");
    }

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
    }
}
