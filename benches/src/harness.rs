//! The A/B comparison: our `clone-standby` against `pg_basebackup` and `pg_receivewal`,
//! alternating which goes first, with the machine's limits measured in the same run.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cluster::{Result, SourceCluster};
use crate::limits::{self, DiskMode, Transfer};
use crate::machine::Machine;
use crate::measure::{self, Usage};
use crate::stats::{pair_ratios, summarize, Summary};

/// One comparison case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Case {
    /// Plain-format clone, WAL streamed, fsync on.
    Plain,
    /// The same without fsync.
    NoSync,
    /// Tar format.
    Tar,
    /// Server-side zstd compression, plain format.
    Zstd,
    /// WAL catch-up from a slot to an end position, fsync on.
    Wal,
    /// Object storage: backup into a local Garage S3 store (ours against pgBackRest
    /// and barman-cloud; not in the default set; see `crate::repo`).
    RepoBackup,
    /// Object storage: restore from that store into a fresh directory.
    RepoRestore,
    /// WAL archive: at least 1 GB of WAL caught up into Garage, ours streaming against
    /// pgBackRest and barman-cloud driven as archive_command (see `crate::walbench`).
    WalArchive,
    /// Commit latency with a synchronous standby: ours into Garage against
    /// pg_receivewal --synchronous and no synchronous standby.
    SyncCommit,
    /// Incremental backup on PostgreSQL 18 (full, then incremental after changing about
    /// 5 % of the blocks) into Garage, and the chain restored in one pass, against
    /// pg_basebackup --incremental and pg_combinebackup + a copy (see
    /// `crate::incremental`).
    Incremental,
}

impl Case {
    /// Every local case, in report order: the default set (the object-storage cases
    /// need peers and a store, and run only when asked for).
    pub const ALL: [Case; 5] = [Case::Plain, Case::NoSync, Case::Tar, Case::Zstd, Case::Wal];

    /// True for the object-storage cases.
    pub fn is_repo(self) -> bool {
        matches!(self, Case::RepoBackup | Case::RepoRestore)
    }

    /// True for the WAL-archive cases (`crate::walbench`).
    pub fn is_wal_store(self) -> bool {
        matches!(self, Case::WalArchive | Case::SyncCommit)
    }

    /// True for the cases that run on the source cluster of `--pg-bin` (every case but
    /// the incremental one, which has a PostgreSQL 18 cluster of its own).
    pub fn uses_main_cluster(self) -> bool {
        self != Case::Incremental
    }

    /// A short identifier (file names, JSON).
    pub fn id(self) -> &'static str {
        match self {
            Case::Plain => "plain",
            Case::NoSync => "no-sync",
            Case::Tar => "tar",
            Case::Zstd => "zstd",
            Case::Wal => "wal",
            Case::RepoBackup => "repo-backup",
            Case::RepoRestore => "repo-restore",
            Case::WalArchive => "wal-archive",
            Case::SyncCommit => "sync-commit",
            Case::Incremental => "incremental",
        }
    }

    /// The row title in the report.
    pub fn title(self) -> &'static str {
        match self {
            Case::Plain => "plain clone, WAL streamed, durable",
            Case::NoSync => "plain clone, WAL streamed, no sync",
            Case::Tar => "tar format, WAL streamed, durable",
            Case::Zstd => "server-side zstd, plain, durable",
            Case::Wal => "WAL catch-up to an end LSN, durable",
            Case::RepoBackup => "backup into S3 object storage",
            Case::RepoRestore => "restore from S3 object storage",
            Case::WalArchive => "WAL catch-up into S3 object storage",
            Case::SyncCommit => "commit latency with a synchronous WAL receiver",
            Case::Incremental => "incremental backup and chain restore (PostgreSQL 18)",
        }
    }

    fn ours_subcommand(self) -> &'static str {
        match self {
            Case::Wal | Case::WalArchive | Case::SyncCommit => "receive-wal",
            Case::RepoBackup | Case::Incremental => "backup",
            Case::RepoRestore => "restore",
            _ => "clone",
        }
    }
}

/// Which side of a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tool {
    /// clone-standby.
    Ours,
    /// pg_basebackup or pg_receivewal.
    Reference,
}

impl Tool {
    /// `ours` or `reference` (file names, JSON).
    pub fn id(self) -> &'static str {
        match self {
            Tool::Ours => "ours",
            Tool::Reference => "reference",
        }
    }
}

/// Which sides to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Sides {
    /// Both, alternating.
    Both,
    /// Only clone-standby.
    Ours,
    /// Only the PostgreSQL tools.
    Reference,
}

/// Our binary and what it can do.
#[derive(Debug, Clone, Serialize)]
pub struct OursTool {
    /// Path of the clone-standby binary.
    pub path: PathBuf,
    /// Subcommands found in its `--help`.
    pub subcommands: Vec<String>,
    /// Why it cannot run at all (not built, build failed), if so.
    pub unavailable: Option<String>,
}

impl OursTool {
    /// Looks at `path --help` for the subcommands it offers.
    pub fn probe(path: &Path, unavailable: Option<String>) -> OursTool {
        let mut tool = OursTool {
            path: path.to_path_buf(),
            subcommands: Vec::new(),
            unavailable,
        };
        if tool.unavailable.is_some() {
            return tool;
        }
        match Command::new(path).arg("--help").output() {
            Ok(output) if output.status.success() => {
                let text = String::from_utf8_lossy(&output.stdout);
                let mut in_commands = false;
                for line in text.lines() {
                    if line.starts_with("Commands:") {
                        in_commands = true;
                        continue;
                    }
                    if in_commands {
                        if !line.starts_with(' ') {
                            in_commands = false;
                            continue;
                        }
                        if let Some(name) = line.split_whitespace().next() {
                            tool.subcommands.push(name.to_string());
                        }
                    }
                }
            }
            Ok(output) => {
                tool.unavailable = Some(format!(
                    "{} --help failed ({})",
                    path.display(),
                    output.status
                ))
            }
            Err(e) => {
                tool.unavailable = Some(format!(
                    "{} cannot run ({e}); build it with cargo build --release -p clone-standby",
                    path.display()
                ))
            }
        }
        tool
    }

    /// Why `subcommand option` cannot run with this binary (not built, or the option is
    /// not in the subcommand's `--help`), if it cannot.
    pub fn missing_option(&self, subcommand: &str, option: &str) -> Option<String> {
        if let Some(why) = &self.unavailable {
            return Some(why.clone());
        }
        let help = Command::new(&self.path)
            .args([subcommand, "--help"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        if help.contains(option) {
            None
        } else {
            Some(format!("clone-standby has no {subcommand} {option} yet"))
        }
    }

    /// Why `case` cannot run with this binary, if it cannot.
    pub fn missing_for(&self, case: Case) -> Option<String> {
        if let Some(why) = &self.unavailable {
            return Some(why.clone());
        }
        let sub = case.ours_subcommand();
        if self.subcommands.iter().any(|s| s == sub) {
            None
        } else {
            Some(format!("clone-standby has no {sub} command yet"))
        }
    }
}

/// The settings of one harness run.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// pgbench scale of the source cluster.
    pub scale: u32,
    /// Rounds (each runs both tools once per case).
    pub rounds: u32,
    /// Cases to run.
    pub cases: Vec<Case>,
    /// Which sides run.
    pub sides: Sides,
    /// WAL the catch-up case streams, in MB.
    pub wal_mb: u64,
    /// Size of the disk write test, in MB.
    pub disk_test_mb: u64,
    /// Work directory (clusters, targets, logs).
    pub work_dir: PathBuf,
    /// Per-run time limit in seconds.
    pub timeout_s: u64,
    /// Run pg_verifybackup on both tools' plain clones in the first round (untimed).
    pub verify: bool,
    /// What the harness did about its scheduling priority.
    pub priority: String,
}

/// One run of one tool.
#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    /// Round number, from 0.
    pub round: u32,
    /// Which tool.
    pub tool: Tool,
    /// True when the tool went first in its pair.
    pub first: bool,
    /// Exit status 0 within the time limit.
    pub ok: bool,
    /// The failure, in one line.
    pub error: Option<String>,
    /// Wall, CPU and memory.
    pub usage: Usage,
    /// Bytes the run left in its target directory.
    pub output_bytes: u64,
    /// The full log of the run.
    pub log: PathBuf,
}

/// Summaries of one tool's successful runs of a case.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ToolSummary {
    /// The command line of the runs.
    pub command: String,
    /// Successful runs.
    pub ok_runs: usize,
    /// All runs.
    pub runs: usize,
    /// The first failure, if any.
    pub first_error: Option<String>,
    /// Wall time, s.
    pub wall_s: Option<Summary>,
    /// User + sys CPU, s.
    pub cpu_s: Option<Summary>,
    /// Peak RSS, MiB.
    pub rss_mib: Option<Summary>,
    /// Payload MB per second of wall time.
    pub mb_per_s: Option<Summary>,
    /// Output size, MB.
    pub output_mb: Option<Summary>,
}

/// The result of one case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseReport {
    /// Which case.
    pub case: Case,
    /// Its title.
    pub title: String,
    /// Bytes the case moves, the same for both tools (the base backup stream, or the
    /// WAL between the start and end positions); MB/s is this over wall time.
    pub payload_bytes: u64,
    /// Our side.
    pub ours: ToolSummary,
    /// The reference side.
    pub reference: ToolSummary,
    /// ours / reference wall time, pair by pair.
    pub ratio_wall: Option<Summary>,
    /// ours / reference CPU, pair by pair.
    pub ratio_cpu: Option<Summary>,
    /// ours / reference peak RSS, pair by pair.
    pub ratio_rss: Option<Summary>,
    /// The fastest this case could go on this machine, in seconds, and why.
    pub limit_s: Option<f64>,
    /// What bounds `limit_s`.
    pub limit_basis: String,
    /// Checks made outside the timing (pg_verifybackup, same WAL files).
    pub checks: Vec<String>,
    /// Every run.
    pub runs: Vec<RunRecord>,
}

/// The limits measured in this run, one sample per round.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LimitsReport {
    /// BASE_BACKUP read and thrown away (fast checkpoint, manifest, no WAL).
    pub raw_send: Vec<Transfer>,
    /// The same with server-side zstd (only when the zstd case runs).
    pub raw_send_zstd: Vec<Transfer>,
    /// The WAL range of the catch-up case streamed from a slot and thrown away (only
    /// when the WAL case runs).
    pub raw_wal_send: Vec<Transfer>,
    /// Sequential buffered writes in 1 MiB blocks, then fsync.
    pub disk_buffered: Vec<Transfer>,
    /// The same, starting writeback every 8 MiB.
    pub disk_early_writeback: Vec<Transfer>,
    /// The same with O_DIRECT.
    pub disk_direct: Vec<Transfer>,
    /// Failures while measuring limits.
    pub errors: Vec<String>,
}

/// Median wall time and MB/s of a set of transfers.
pub fn transfer_summary(samples: &[Transfer]) -> (Option<Summary>, Option<Summary>) {
    let walls: Vec<f64> = samples.iter().map(|t| t.wall_s).collect();
    let rates: Vec<f64> = samples.iter().map(Transfer::mb_per_s).collect();
    (summarize(&walls), summarize(&rates))
}

/// The whole result.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The command that produced this.
    pub command_line: String,
    /// When the run started (UTC).
    pub started_utc: String,
    /// Total run time, s.
    pub total_s: f64,
    /// Where it ran.
    pub machine: Machine,
    /// The run's settings.
    pub settings: Settings,
    /// Our binary.
    pub ours: OursTool,
    /// The source cluster's data directory.
    pub source_data_dir: PathBuf,
    /// Setup time (cluster build or reuse, WAL generation), s.
    pub setup_s: f64,
    /// The machine's limits.
    pub limits: LimitsReport,
    /// Per case (the local cases).
    pub cases: Vec<CaseReport>,
    /// The object-storage cases, when they ran.
    pub repo: Option<crate::repo::RepoReport>,
    /// Why the object-storage cases could not run at all.
    pub repo_error: Option<String>,
    /// The WAL-archive cases, when they ran.
    pub wal_store: Option<crate::walbench::WalBenchReport>,
    /// Why the WAL-archive cases could not run at all.
    pub wal_store_error: Option<String>,
    /// The incremental case, when it ran.
    pub incremental: Option<crate::incremental::IncrementalReport>,
    /// Why the incremental case could not run at all.
    pub incremental_error: Option<String>,
    /// Number of failed runs.
    pub failed_runs: usize,
    /// /proc/loadavg after the rounds.
    pub load_after: String,
}

/// The WAL range the catch-up case streams, kept in `<cluster>/wal-origin.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WalOrigin {
    /// The origin slot, made with RESERVE_WAL before the WAL was generated.
    pub slot: String,
    /// The slot's restart LSN.
    pub start: String,
    /// The end position both tools stream to.
    pub end: String,
    /// Bytes between them.
    pub bytes: u64,
    /// The size asked for, in MB.
    pub target_mb: u64,
}

const ORIGIN_SLOT: &str = "pgrepl_bench_origin";

/// Makes (or reuses) a slot retaining about `mb` MB of WAL produced by pgbench.
pub fn prepare_wal(cluster: &SourceCluster, mb: u64, log: &dyn Fn(&str)) -> Result<WalOrigin> {
    let state = cluster.base.join("wal-origin.json");
    if let Ok(text) = std::fs::read_to_string(&state) {
        if let Ok(origin) = serde_json::from_str::<WalOrigin>(&text) {
            let restart = cluster.sql_value(&format!(
                "SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = '{ORIGIN_SLOT}'"
            ))?;
            if origin.target_mb == mb && restart.as_deref() == Some(origin.start.as_str()) {
                log(&format!(
                    "reusing the WAL origin slot: {} to {} ({:.0} MB)",
                    origin.start,
                    origin.end,
                    origin.bytes as f64 / 1e6
                ));
                return Ok(origin);
            }
        }
    }
    let _ = std::fs::remove_file(&state);
    cluster.sql(&format!(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
         WHERE slot_name = '{ORIGIN_SLOT}' OR slot_name LIKE 'pgrepl_bench_run%'"
    ))?;
    let start = cluster
        .sql_value(&format!(
            "SELECT lsn FROM pg_create_physical_replication_slot('{ORIGIN_SLOT}', true)"
        ))?
        .ok_or("creating the origin slot returned no LSN")?;
    log(&format!(
        "generating about {mb} MB of WAL with pgbench from {start}"
    ));
    let started = Instant::now();
    let target = mb * 1_000_000;
    let chunk_s = if mb >= 200 { 10 } else { 1 };
    loop {
        let done: u64 = cluster
            .sql_value(&format!(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '{start}')::bigint"
            ))?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if done >= target {
            break;
        }
        if started.elapsed() > Duration::from_secs(1800) {
            return Err(format!(
                "pgbench made only {done} bytes of WAL in 30 minutes"
            ));
        }
        let output = Command::new(cluster.bin_dir.join("pgbench"))
            .args(["-n", "-c", "4", "-j", "2", "-T", &chunk_s.to_string()])
            .args(cluster.client_args())
            .arg("postgres")
            .env("PGOPTIONS", "-c synchronous_commit=off")
            .output()
            .map_err(|e| format!("pgbench: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "pgbench failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
    }
    // Flush everything, so the end position is on disk and can be sent.
    cluster.sql("CHECKPOINT")?;
    let end = cluster
        .sql_value("SELECT pg_current_wal_flush_lsn()")?
        .ok_or("no flush LSN")?;
    let bytes: u64 = cluster
        .sql_value(&format!(
            "SELECT pg_wal_lsn_diff('{end}', '{start}')::bigint"
        ))?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let origin = WalOrigin {
        slot: ORIGIN_SLOT.into(),
        start,
        end,
        bytes,
        target_mb: mb,
    };
    log(&format!(
        "WAL ready: {} to {} ({:.0} MB) in {:.0} s",
        origin.start,
        origin.end,
        bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    ));
    std::fs::write(
        &state,
        serde_json::to_string_pretty(&origin).expect("serializable"),
    )
    .map_err(|e| format!("writing {}: {e}", state.display()))?;
    Ok(origin)
}

/// Everything a run needs.
pub struct Harness<'a> {
    /// The source cluster.
    pub cluster: &'a SourceCluster,
    /// The settings.
    pub settings: Settings,
    /// Our binary.
    pub ours: OursTool,
    /// The WAL range, when the WAL case runs.
    pub wal: Option<WalOrigin>,
    /// Progress lines.
    pub log: &'a dyn Fn(&str),
}

fn quote_arg(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=./:,+@".contains(c))
    {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// A command line as a shell would take it.
pub fn display_command(program: &Path, args: &[String]) -> String {
    std::iter::once(program.to_string_lossy().into_owned())
        .chain(args.iter().map(|a| quote_arg(a)))
        .collect::<Vec<_>>()
        .join(" ")
}

impl Harness<'_> {
    fn target_dir(&self, case: Case, tool: Tool) -> PathBuf {
        self.settings
            .work_dir
            .join("targets")
            .join(format!("{}-{}", case.id(), tool.id()))
    }

    fn slot_for(&self, round: u32, tool: Tool) -> String {
        format!("pgrepl_bench_run_{round}_{}", tool.id())
    }

    /// The program and arguments for one run.
    pub fn command(&self, case: Case, tool: Tool, round: u32) -> (PathBuf, Vec<String>) {
        let dir = self.target_dir(case, tool).to_string_lossy().into_owned();
        let conninfo = self.cluster.conninfo();
        let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<String>>();
        match (tool, case) {
            (Tool::Ours, Case::Wal) => {
                let wal = self.wal.as_ref();
                let mut args = s(&["receive-wal", "--source", &conninfo, "--directory", &dir]);
                args.extend(s(&[
                    "--slot",
                    &self.slot_for(round, tool),
                    "--endpos",
                    wal.map(|w| w.end.as_str()).unwrap_or("0/0"),
                    "--no-loop",
                ]));
                (self.ours.path.clone(), args)
            }
            (Tool::Ours, _) => {
                let mut args = s(&[
                    "clone",
                    "--source",
                    &conninfo,
                    "--pgdata",
                    &dir,
                    "--wal",
                    "stream",
                    "--checkpoint",
                    "fast",
                    "--no-recovery-conf",
                ]);
                match case {
                    Case::NoSync => args.push("--no-sync".into()),
                    Case::Tar => args.extend(s(&["--format", "tar"])),
                    Case::Zstd => args.extend(s(&["--compress", "server-zstd"])),
                    _ => {}
                }
                (self.ours.path.clone(), args)
            }
            (Tool::Reference, Case::Wal) => {
                let wal = self.wal.as_ref();
                let mut args = self.cluster.client_args();
                args.extend(s(&[
                    "-w",
                    "-D",
                    &dir,
                    "-S",
                    &self.slot_for(round, tool),
                    &format!("--endpos={}", wal.map(|w| w.end.as_str()).unwrap_or("0/0")),
                    "--no-loop",
                ]));
                (self.cluster.bin_dir.join("pg_receivewal"), args)
            }
            (Tool::Reference, _) => {
                let mut args = self.cluster.client_args();
                args.extend(s(&["-w", "-D", &dir]));
                args.push(if case == Case::Tar { "-Ft" } else { "-Fp" }.into());
                args.extend(s(&["-Xstream", "-c", "fast"]));
                match case {
                    Case::NoSync => args.push("--no-sync".into()),
                    Case::Zstd => args.push("--compress=server-zstd".into()),
                    _ => {}
                }
                (self.cluster.bin_dir.join("pg_basebackup"), args)
            }
        }
    }

    fn drop_slot(&self, slot: &str) {
        for _ in 0..100 {
            match self.cluster.sql(&format!(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE slot_name = '{slot}'"
            )) {
                Ok(_) => return,
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        (self.log)(&format!("warning: could not drop slot {slot}"));
    }

    /// Runs one tool once on one case.
    fn run_one(&self, case: Case, tool: Tool, round: u32, first: bool) -> (RunRecord, Vec<String>) {
        let logs = self.settings.work_dir.join("logs");
        let log = logs.join(format!("{}-{}-r{round}.log", case.id(), tool.id()));
        let _ = std::fs::remove_file(&log);
        let mut record = RunRecord {
            round,
            tool,
            first,
            ok: false,
            error: None,
            usage: Usage::default(),
            output_bytes: 0,
            log: log.clone(),
        };
        let mut checks = Vec::new();
        if tool == Tool::Ours {
            if let Some(why) = self.ours.missing_for(case) {
                record.error = Some(why);
                return (record, checks);
            }
        }
        let target = self.target_dir(case, tool);
        if target.exists() {
            if let Err(e) = std::fs::remove_dir_all(&target) {
                record.error = Some(format!("removing {}: {e}", target.display()));
                return (record, checks);
            }
        }
        let slot = self.slot_for(round, tool);
        if case == Case::Wal {
            let Some(wal) = &self.wal else {
                record.error = Some("no WAL origin".into());
                return (record, checks);
            };
            if let Err(e) = std::fs::create_dir_all(&target) {
                record.error = Some(format!("creating {}: {e}", target.display()));
                return (record, checks);
            }
            self.drop_slot(&slot);
            if let Err(e) = self.cluster.sql(&format!(
                "SELECT pg_copy_physical_replication_slot('{}', '{slot}')",
                wal.slot
            )) {
                record.error = Some(e);
                return (record, checks);
            }
        }
        // Keep earlier runs' dirty pages out of this run's timing.
        // SAFETY: sync has no preconditions.
        unsafe { libc::sync() };
        let (program, args) = self.command(case, tool, round);
        let mut cmd = Command::new(&program);
        cmd.args(&args)
            .env_remove("PGDATA")
            .env_remove("PGPASSWORD")
            .env("LC_ALL", "C");
        let _ = std::fs::write(&log, format!("$ {}\n", display_command(&program, &args)));
        let (usage, error) =
            measure::run_logged(&mut cmd, &log, Duration::from_secs(self.settings.timeout_s));
        record.ok = error.is_none();
        record.error = error;
        record.usage = usage;
        record.output_bytes = measure::tree_size(&target);
        if record.ok && round == 0 {
            if case == Case::Plain && self.settings.verify {
                checks.push(self.verify_backup(&target, tool));
            }
            if case == Case::Wal {
                checks.push(format!(
                    "{}: WAL files {}",
                    tool.id(),
                    wal_files(&target).into_iter().collect::<Vec<_>>().join(" ")
                ));
            }
        }
        if case == Case::Wal {
            self.drop_slot(&slot);
        }
        let _ = std::fs::remove_dir_all(&target);
        (record, checks)
    }

    fn verify_backup(&self, target: &Path, tool: Tool) -> String {
        let output = Command::new(self.cluster.bin_dir.join("pg_verifybackup"))
            .arg("-q")
            .arg(target)
            .output();
        match output {
            Ok(o) if o.status.success() => {
                format!("{}: pg_verifybackup accepts the plain clone", tool.id())
            }
            Ok(o) => format!(
                "{}: pg_verifybackup REJECTS the plain clone: {}",
                tool.id(),
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => format!("{}: pg_verifybackup could not run: {e}", tool.id()),
        }
    }

    fn measure_limits(&self, limits: &mut LimitsReport, with_zstd: bool) {
        let config = match self.cluster.config() {
            Ok(c) => c,
            Err(e) => {
                limits.errors.push(e);
                return;
            }
        };
        match self
            .cluster
            .runtime()
            .block_on(limits::raw_send(&config, None))
        {
            Ok(t) => {
                (self.log)(&format!(
                    "  limit: raw send {:.0} MB in {:.2} s ({:.0} MB/s)",
                    t.bytes as f64 / 1e6,
                    t.wall_s,
                    t.mb_per_s()
                ));
                limits.raw_send.push(t);
            }
            Err(e) => limits.errors.push(e),
        }
        if with_zstd {
            match self
                .cluster
                .runtime()
                .block_on(limits::raw_send(&config, Some("zstd")))
            {
                Ok(t) => {
                    (self.log)(&format!(
                        "  limit: raw send with server zstd {:.0} MB in {:.2} s",
                        t.bytes as f64 / 1e6,
                        t.wall_s
                    ));
                    limits.raw_send_zstd.push(t);
                }
                Err(e) => limits.errors.push(e),
            }
        }
        if let Some(wal) = &self.wal {
            match self.raw_wal_send(wal, &config) {
                Ok(t) => {
                    (self.log)(&format!(
                        "  limit: raw WAL send {:.0} MB in {:.2} s ({:.0} MB/s)",
                        t.bytes as f64 / 1e6,
                        t.wall_s,
                        t.mb_per_s()
                    ));
                    limits.raw_wal_send.push(t);
                }
                Err(e) => limits.errors.push(e),
            }
        }
        let dir = self.settings.work_dir.join("targets");
        let bytes = self.settings.disk_test_mb * 1_000_000;
        for mode in DiskMode::ALL {
            match limits::disk_write(&dir, bytes, mode) {
                Ok(t) => {
                    (self.log)(&format!(
                        "  limit: disk {}: {:.0} MB in {:.2} s ({:.0} MB/s)",
                        mode.describe(),
                        t.bytes as f64 / 1e6,
                        t.wall_s,
                        t.mb_per_s()
                    ));
                    match mode {
                        DiskMode::Buffered => limits.disk_buffered.push(t),
                        DiskMode::EarlyWriteback => limits.disk_early_writeback.push(t),
                        DiskMode::Direct => limits.disk_direct.push(t),
                    }
                }
                Err(e) => limits
                    .errors
                    .push(format!("disk write test ({}): {e}", mode.describe())),
            }
        }
    }

    fn raw_wal_send(&self, wal: &WalOrigin, config: &pgwire_repl::Config) -> Result<Transfer> {
        let slot = "pgrepl_bench_run_raw";
        let parse = |lsn: &str| {
            lsn.parse::<pgwire_repl::Lsn>()
                .map_err(|e| format!("LSN {lsn}: {e}"))
        };
        let (start, end) = (parse(&wal.start)?, parse(&wal.end)?);
        self.drop_slot(slot);
        self.cluster.sql(&format!(
            "SELECT pg_copy_physical_replication_slot('{}', '{slot}')",
            wal.slot
        ))?;
        let result = self
            .cluster
            .runtime()
            .block_on(limits::raw_wal_send(config, slot, start, end));
        self.drop_slot(slot);
        result
    }

    /// Runs every round and case; returns the limits and per-case reports.
    pub fn run(&self) -> (LimitsReport, Vec<CaseReport>) {
        let targets = self.settings.work_dir.join("targets");
        let _ = std::fs::create_dir_all(&targets);
        match spread_new_directories(&targets) {
            Ok(()) => (self.log)(&format!(
                "{}: new directories spread over the file system (ext4 top-directory flag)",
                targets.display()
            )),
            Err(e) => (self.log)(&format!(
                "{}: could not set the top-directory flag ({e}); on ext4 without a journal, file creation slows down with every earlier run's deleted files",
                targets.display()
            )),
        }
        let _ = std::fs::create_dir_all(self.settings.work_dir.join("logs"));
        let mut limits = LimitsReport::default();
        let cases = &self.settings.cases;
        let mut runs: Vec<Vec<RunRecord>> = vec![Vec::new(); cases.len()];
        let mut checks: Vec<Vec<String>> = vec![Vec::new(); cases.len()];
        for round in 0..self.settings.rounds {
            (self.log)(&format!("round {}/{}", round + 1, self.settings.rounds));
            self.measure_limits(&mut limits, cases.contains(&Case::Zstd));
            for (index, &case) in cases.iter().enumerate() {
                let ours_first = (round as usize + index) % 2 == 0;
                let order: Vec<Tool> = match self.settings.sides {
                    Sides::Both if ours_first => vec![Tool::Ours, Tool::Reference],
                    Sides::Both => vec![Tool::Reference, Tool::Ours],
                    Sides::Ours => vec![Tool::Ours],
                    Sides::Reference => vec![Tool::Reference],
                };
                for (position, tool) in order.into_iter().enumerate() {
                    let (record, mut found) = self.run_one(case, tool, round, position == 0);
                    match &record.error {
                        None => (self.log)(&format!(
                            "  {:<8} {:<9} {:7.2} s wall, {:6.2} s CPU, {:5.0} MiB RSS",
                            case.id(),
                            tool.id(),
                            record.usage.wall_s,
                            record.usage.cpu_s(),
                            record.usage.max_rss_kib as f64 / 1024.0
                        )),
                        Some(e) => {
                            (self.log)(&format!("  {:<8} {:<9} FAILED: {e}", case.id(), tool.id()))
                        }
                    }
                    checks[index].append(&mut found);
                    runs[index].push(record);
                }
            }
        }
        let reports = cases
            .iter()
            .zip(runs)
            .zip(checks)
            .map(|((&case, runs), checks)| self.case_report(case, runs, checks, &limits))
            .collect();
        (limits, reports)
    }

    fn payload_bytes(&self, case: Case, limits: &LimitsReport) -> u64 {
        if case == Case::Wal {
            return self.wal.as_ref().map(|w| w.bytes).unwrap_or(0);
        }
        if let Some(t) = limits.raw_send.first() {
            return t.bytes;
        }
        measure::tree_size(&self.cluster.data)
            .saturating_sub(measure::tree_size(&self.cluster.data.join("pg_wal")))
    }

    fn case_report(
        &self,
        case: Case,
        runs: Vec<RunRecord>,
        mut checks: Vec<String>,
        limits: &LimitsReport,
    ) -> CaseReport {
        let payload = self.payload_bytes(case, limits);
        let side = |tool: Tool| -> ToolSummary {
            let mine: Vec<&RunRecord> = runs.iter().filter(|r| r.tool == tool).collect();
            let ok: Vec<&RunRecord> = mine.iter().copied().filter(|r| r.ok).collect();
            let (program, args) = self.command(case, tool, 0);
            let of = |f: &dyn Fn(&RunRecord) -> f64| {
                summarize(&ok.iter().map(|r| f(r)).collect::<Vec<_>>())
            };
            ToolSummary {
                command: display_command(&program, &args),
                ok_runs: ok.len(),
                runs: mine.len(),
                first_error: mine.iter().find_map(|r| r.error.clone()),
                wall_s: of(&|r| r.usage.wall_s),
                cpu_s: of(&|r| r.usage.cpu_s()),
                rss_mib: of(&|r| r.usage.max_rss_kib as f64 / 1024.0),
                mb_per_s: of(&|r| payload as f64 / 1e6 / r.usage.wall_s),
                output_mb: of(&|r| r.output_bytes as f64 / 1e6),
            }
        };
        let per_round = |tool: Tool, f: &dyn Fn(&RunRecord) -> f64| -> Vec<Option<f64>> {
            (0..self.settings.rounds)
                .map(|round| {
                    runs.iter()
                        .find(|r| r.tool == tool && r.round == round && r.ok)
                        .map(f)
                })
                .collect()
        };
        let ratio = |f: &dyn Fn(&RunRecord) -> f64| {
            pair_ratios(&per_round(Tool::Ours, f), &per_round(Tool::Reference, f))
        };
        let (raw_wall, _) = transfer_summary(&limits.raw_send);
        let (raw_zstd_wall, _) = transfer_summary(&limits.raw_send_zstd);
        // The disk limit is the best of the three ways of writing.
        let best_disk = [
            &limits.disk_buffered,
            &limits.disk_early_writeback,
            &limits.disk_direct,
        ]
        .into_iter()
        .filter_map(|samples| transfer_summary(samples).1)
        .map(|s| s.median)
        .fold(0.0f64, f64::max);
        let disk_s = (best_disk > 0.0).then(|| payload as f64 / 1e6 / best_disk);
        let (limit_s, limit_basis) = match case {
            Case::NoSync => (raw_wall.map(|s| s.median), "server raw send".to_string()),
            Case::Plain | Case::Tar => match (raw_wall, disk_s) {
                (Some(r), Some(d)) => (
                    Some(r.median.max(d)),
                    if r.median >= d {
                        "server raw send (> fastest disk write + fsync)".into()
                    } else {
                        "fastest disk write + fsync (> server raw send)".into()
                    },
                ),
                (Some(r), None) => (Some(r.median), "server raw send".into()),
                _ => (None, "not measured".into()),
            },
            Case::Zstd => (
                raw_zstd_wall.map(|s| s.median),
                "server raw send with server-side zstd".into(),
            ),
            Case::Wal => {
                let (raw_wal, _) = transfer_summary(&limits.raw_wal_send);
                match (raw_wal, disk_s) {
                    (Some(r), Some(d)) if r.median >= d => (
                        Some(r.median),
                        "server raw WAL send (> fastest disk write + fsync)".into(),
                    ),
                    (_, Some(d)) => (
                        Some(d),
                        "fastest disk write + fsync of the WAL bytes".into(),
                    ),
                    (Some(r), None) => (Some(r.median), "server raw WAL send".into()),
                    (None, None) => (None, "not measured".into()),
                }
            }
            Case::RepoBackup
            | Case::RepoRestore
            | Case::WalArchive
            | Case::SyncCommit
            | Case::Incremental => (None, "not measured".into()),
        };
        if case == Case::Wal {
            checks = compare_wal_checks(checks);
        }
        CaseReport {
            case,
            title: case.title().into(),
            payload_bytes: payload,
            ours: side(Tool::Ours),
            reference: side(Tool::Reference),
            ratio_wall: ratio(&|r| r.usage.wall_s),
            ratio_cpu: ratio(&|r| r.usage.cpu_s()),
            ratio_rss: ratio(&|r| r.usage.max_rss_kib as f64),
            limit_s,
            limit_basis,
            checks,
            runs,
        }
    }
}

/// Complete segment names (and `.partial` ones) in a WAL directory, sorted.
fn wal_files(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.len() >= 24 && n[..24].chars().all(|c| c.is_ascii_hexdigit()))
                .collect()
        })
        .unwrap_or_default()
}

/// Turns the two tools' WAL file lists into one line saying whether they match.
fn compare_wal_checks(checks: Vec<String>) -> Vec<String> {
    let list = |who: &str| {
        checks
            .iter()
            .find_map(|c| c.strip_prefix(&format!("{who}: WAL files ")))
            .map(|rest| rest.split(' ').map(str::to_string).collect::<Vec<_>>())
    };
    match (list("ours"), list("reference")) {
        (Some(a), Some(b)) if a == b => vec![format!(
            "both tools wrote the same {} WAL files ({} … {})",
            a.len(),
            a.first().cloned().unwrap_or_default(),
            a.last().cloned().unwrap_or_default()
        )],
        (Some(a), Some(b)) => vec![format!(
            "the WAL files DIFFER: ours {} files ({} … {}), reference {} files ({} … {})",
            a.len(),
            a.first().cloned().unwrap_or_default(),
            a.last().cloned().unwrap_or_default(),
            b.len(),
            b.first().cloned().unwrap_or_default(),
            b.last().cloned().unwrap_or_default()
        )],
        (Some(a), None) | (None, Some(a)) => vec![format!(
            "{} WAL files ({} … {})",
            a.len(),
            a.first().cloned().unwrap_or_default(),
            a.last().cloned().unwrap_or_default()
        )],
        (None, None) => Vec::new(),
    }
}

/// Sets ext4's top-directory flag (`chattr +T`) on `dir`, so that each target directory
/// created in it gets a block group of its own.
///
/// Every run deletes the previous target; on ext4 without a journal (this machine's) the
/// inode allocator then skips the inodes deleted in the last 5–10 minutes one by one, and
/// a clone's file creations in the same block group cost 0.5 ms each instead of 20 µs —
/// a cost of the benchmark's own deletions, paid by both tools, growing with every run.
fn spread_new_directories(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    const FS_TOPDIR_FL: libc::c_long = 0x0002_0000;
    let handle = std::fs::File::open(dir)?;
    let mut flags: libc::c_long = 0;
    // SAFETY: FS_IOC_GETFLAGS/SETFLAGS read and write one long through a valid pointer,
    // on a descriptor that `handle` keeps open.
    unsafe {
        if libc::ioctl(handle.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        flags |= FS_TOPDIR_FL;
        if libc::ioctl(handle.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
