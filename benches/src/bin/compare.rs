//! `compare`: clone-standby against pg_basebackup and pg_receivewal, side by side.
//!
//! ```text
//! cargo run --release -p benches --bin compare -- --scale 100 --rounds 5 \
//!     --json benches/results.json --markdown benches/results.md
//! cargo run --release -p benches --bin compare -- --smoke          # CI: tiny, one round
//! cargo run --release -p benches --bin compare -- --cases repo-backup,repo-restore \
//!     --scale 10 --rounds 3                                          # object storage
//! cargo run --release -p benches --bin compare -- --cases wal-archive,sync-commit \
//!     --scale 10 --rounds 3                                          # WAL archive
//! cargo run --release -p benches --bin compare -- --cases incremental \
//!     --scale 100 --rounds 3                                         # PostgreSQL 18
//! ```

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use benches::cluster::{ClusterOptions, SourceCluster};
use benches::harness::{self, Case, Harness, OursTool, Report, Settings, Sides};
use benches::incremental::{IncrTools, IncrementalBench};
use benches::repo::{Peers, Phase, RepoBench};
use benches::walbench::{self, WalBench};
use benches::{machine, report};
use clap::Parser;

/// Compares clone-standby with pg_basebackup and pg_receivewal on a pgbench source
/// cluster over loopback TCP, alternating the tools (A B, then B A) for N rounds.
///
/// Cases: plain clone with WAL streamed (durable), the same with no sync, tar format,
/// server-side zstd, and WAL catch-up from a slot to an end LSN (durable). Each reports
/// median and range of wall time, client CPU (user + sys of the process tree), peak RSS
/// and MB/s, and ours ÷ reference pair by pair. The server's raw send rate and the
/// disk's write + fsync bandwidth are measured in the same run, once per round.
///
/// The source cluster (PostgreSQL 15 by default, data checksums on) lives under
/// --work-dir keyed by scale and is reused by later runs. Unless --ours-cmd or
/// --no-build is given, clone-standby is built first with
/// `cargo build --release -p clone-standby`.
///
/// The full run: cargo run --release -p benches --bin compare -- --scale 100 --rounds 5
///
/// CI smoke: cargo run --release -p benches --bin compare -- --smoke
///
/// Object storage (not in the default set, not in --smoke): --cases repo-backup,repo-restore
/// backs up into and restores from a local single-node Garage S3 store: ours
/// (`clone-standby backup --source C --repo s3://B/P` / `restore --repo s3://B/P
/// --pgdata DIR --backup latest`) against pgBackRest (via an haproxy TLS terminator)
/// and barman-cloud, each with its fastest sensible settings and with its defaults;
/// wall, client CPU, peak RSS, bytes stored. Needs scripts/install-bench-peers.sh
/// (and the Garage binary); `--sides reference` runs the peers alone. These cases use
/// a separate source cluster (`pgN-scale-S-text30-objstore`: 30 % random text,
/// archive_mode on, autovacuum and wal_recycle off).
///
/// WAL archive (not in the default set): --cases wal-archive catches the same range of
/// --archive-wal-mb MB of random-text WAL up into Garage: ours (`clone-standby
/// receive-wal --repo s3://B/P --start-lsn X --endpos Y --no-loop`) against pgBackRest
/// `archive-push` (archive-async, process-max=2) and `barman-cloud-wal-archive`, both
/// driven as PostgreSQL's archiver drives archive_command, one segment at a time, on
/// copies of the same segment files. --cases sync-commit measures commit latency
/// (pgbench, single-row INSERTs, 1 and 4 clients, --sync-seconds each) with our
/// `receive-wal --repo --synchronous` as the synchronous standby, against
/// `pg_receivewal --synchronous` and no synchronous standby. --smoke adds sync-commit
/// (1 s runs) when the Garage binary is installed and clone-standby has receive-wal --repo.
///
/// Incremental backup (not in the default set): --cases incremental runs, on a
/// PostgreSQL 18 pgbench cluster of its own (`pg18-scale-S-walsum`: summarize_wal on,
/// autovacuum off, on --port + 2), a full backup into a local Garage store, an UPDATE of
/// a contiguous range of pgbench_accounts aids sized to change about --incr-change-pct %
/// of the blocks (counted from the WAL summaries), an incremental backup, and a restore
/// of the chain into an empty directory: ours (`clone-standby backup --repo s3://B/P
/// [--incremental --from full]`, `restore --backup incr`) against pg_basebackup 18
/// (`--incremental=FULL/backup_manifest`) and `pg_combinebackup FULL INCR -o STAGE`
/// followed by `cp -a STAGE TARGET`; wall, CPU, RSS, bytes stored (ours: the bucket's
/// growth in Garage's counters). The first round checks both restored directories with
/// pg_verifybackup 18 and a server started on each (--port + 3). Needs
/// scripts/install-postgres.sh, scripts/install-test-tools.sh and
/// scripts/install-garage.sh (exit status 2 without them); --smoke adds it at scale 1
/// when they are installed.
///
/// Exit status: 0 when every run succeeded (or --allow-failures), 1 when a run failed,
/// 2 when setup failed.
#[derive(Debug, Parser)]
#[command(name = "compare", verbatim_doc_comment)]
struct Args {
    /// pgbench scale of the source cluster (100 is about 1.5 GB) [default: 100, smoke: 1]
    #[arg(long)]
    scale: Option<u32>,
    /// Rounds; each runs both tools once per case [default: 3, smoke: 1]
    #[arg(long)]
    rounds: Option<u32>,
    /// Tiny and fast, for CI: scale 1, one round, 8 MB of WAL, 64 MB disk test
    #[arg(long)]
    smoke: bool,
    /// Cases to run, comma-separated [default: plain,no-sync,tar,zstd,wal; the
    /// object-storage cases repo-backup, repo-restore, wal-archive, sync-commit and
    /// incremental run only when named]
    #[arg(long, value_enum, value_delimiter = ',')]
    cases: Vec<Case>,
    /// Which tools run (reference: pg_basebackup / pg_receivewal, and for the
    /// object-storage cases pgBackRest and barman-cloud)
    #[arg(long, value_enum, default_value = "both")]
    sides: Sides,
    /// Percent of the source database that is a table of random text, so backups do not
    /// compress to nothing; a separate cached cluster per value [default: 30 with an
    /// object-storage case, else 0]
    #[arg(long)]
    random_text_pct: Option<u32>,
    /// Object storage: run Garage as shipped, without the TCP_NODELAY shim (Garage 2.5
    /// then adds about 44 ms to each small GET on loopback)
    #[arg(long)]
    stock_garage: bool,
    /// WAL archive: run Garage with data_fsync and metadata_fsync on, so the store
    /// acknowledges a write only once it is on disk (Garage's default is off)
    #[arg(long)]
    garage_fsync: bool,
    /// Object storage: first of the ports on 127.0.0.1 (Garage S3, +1 RPC, +3 admin,
    /// +4 the TLS proxy for pgBackRest)
    #[arg(long, default_value_t = 39100)]
    repo_port: u16,
    /// MB of WAL for the catch-up case [default: 1024 × scale / 100, at least 16; smoke: 8]
    #[arg(long)]
    wal_mb: Option<u64>,
    /// MB of random-text WAL for the wal-archive case [default: 1024, smoke: 32]
    #[arg(long)]
    archive_wal_mb: Option<u64>,
    /// Seconds per pgbench run of the sync-commit case [default: 10, smoke: 1]
    #[arg(long)]
    sync_seconds: Option<u32>,
    /// Incremental case: share of the database's blocks the change between the full and
    /// the incremental backup aims at, percent (the rows updated are sized from the
    /// catalog; the blocks really changed are counted from the WAL summaries)
    #[arg(long, default_value_t = 5.0)]
    incr_change_pct: f64,
    /// Incremental case: directory of the PostgreSQL 18 server (initdb, pg_ctl,
    /// postgres) [default: <cache>/postgres/18/bin from scripts/install-postgres.sh]
    #[arg(long)]
    incr_pg_bin: Option<PathBuf>,
    /// MB written by the disk bandwidth test [default: 1024, smoke: 64]
    #[arg(long)]
    disk_test_mb: Option<u64>,
    /// Work directory: source clusters, targets (same filesystem as the disk test), logs
    #[arg(long, default_value = "/var/tmp/pgrepl-bench")]
    work_dir: PathBuf,
    /// TCP port of the source cluster on 127.0.0.1
    #[arg(long, default_value_t = 54932)]
    port: u16,
    /// Directory of the PostgreSQL binaries (server, pgbench, pg_basebackup, pg_receivewal)
    #[arg(long, default_value = "/usr/lib/postgresql/15/bin")]
    pg_bin: PathBuf,
    /// The clone-standby binary to test [default: next to this binary, built first]
    #[arg(long)]
    ours_cmd: Option<PathBuf>,
    /// Do not run `cargo build --release -p clone-standby` first
    #[arg(long)]
    no_build: bool,
    /// Write the JSON report here
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the markdown report here
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Leave the source cluster running afterwards (it is stopped if this run started it)
    #[arg(long)]
    keep_running: bool,
    /// Per-run time limit, seconds
    #[arg(long, default_value_t = 1800)]
    timeout_s: u64,
    /// Skip pg_verifybackup on the first round's plain clones
    #[arg(long)]
    no_verify: bool,
    /// Exit 0 even when runs failed
    #[arg(long)]
    allow_failures: bool,
    /// Scheduling priority for the harness, both tools and a server it starts (root
    /// only, as lowering needs it), so other work on the machine disturbs less
    #[arg(long, default_value_t = -10, allow_hyphen_values = true)]
    nice: i32,
}

/// Sets this process's nice value (inherited by every child); returns what happened.
fn set_nice(nice: i32) -> String {
    // SAFETY: setpriority on the calling process has no memory-safety preconditions.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if rc == 0 {
        format!("running at nice {nice} (inherited by both tools and a server started here)")
    } else {
        format!(
            "could not set nice {nice}: {}; running at the default priority",
            std::io::Error::last_os_error()
        )
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Builds clone-standby (unless told not to) and finds it: next to this binary, else in
/// the workspace's target/release.
fn locate_ours(args: &Args, log: &dyn Fn(&str)) -> OursTool {
    if let Some(path) = &args.ours_cmd {
        return OursTool::probe(path, None);
    }
    let mut unavailable = None;
    if !args.no_build {
        log("building clone-standby: cargo build --release -p clone-standby");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        match Command::new(cargo)
            .args(["build", "--release", "-p", "clone-standby"])
            .current_dir(workspace_root())
            .output()
        {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                let stderr = String::from_utf8_lossy(&o.stderr);
                let first_error = stderr
                    .lines()
                    .find(|l| l.starts_with("error"))
                    .unwrap_or("see cargo's output")
                    .to_string();
                unavailable = Some(format!(
                    "cargo build --release -p clone-standby failed: {first_error}"
                ));
            }
            Err(e) => unavailable = Some(format!("could not run cargo: {e}")),
        }
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("clone-standby")))
        .filter(|p| p.is_file());
    let path = beside.unwrap_or_else(|| {
        std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target"))
            .join("release")
            .join("clone-standby")
    });
    OursTool::probe(&path, unavailable)
}

fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M:%S UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn main() -> ExitCode {
    let args = Args::parse();
    let started = Instant::now();
    let log = move |line: &str| {
        eprintln!("[{:7.1} s] {line}", started.elapsed().as_secs_f64());
    };
    let priority = set_nice(args.nice);
    log(&priority);
    let scale = args.scale.unwrap_or(if args.smoke { 1 } else { 100 });
    let settings = Settings {
        scale,
        rounds: args.rounds.unwrap_or(if args.smoke { 1 } else { 3 }).max(1),
        cases: if args.cases.is_empty() {
            Case::ALL.to_vec()
        } else {
            let mut cases = args.cases.clone();
            cases.sort();
            cases.dedup();
            cases
        },
        sides: args.sides,
        wal_mb: args.wal_mb.unwrap_or(if args.smoke {
            8
        } else {
            (1024 * u64::from(scale) / 100).max(16)
        }),
        disk_test_mb: args
            .disk_test_mb
            .unwrap_or(if args.smoke { 64 } else { 1024 }),
        work_dir: args.work_dir.clone(),
        timeout_s: args.timeout_s,
        verify: !args.no_verify,
        priority: priority.clone(),
    };
    let command_line = std::iter::once("compare".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let started_utc = utc_now();
    if let Err(e) = std::fs::create_dir_all(&settings.work_dir) {
        eprintln!(
            "compare: cannot create the work directory {}: {e}",
            settings.work_dir.display()
        );
        return ExitCode::from(2);
    }
    let repo_phases: Vec<Phase> = settings
        .cases
        .iter()
        .filter_map(|c| match c {
            Case::RepoBackup => Some(Phase::Backup),
            Case::RepoRestore => Some(Phase::Restore),
            _ => None,
        })
        .collect();
    let peers = if repo_phases.is_empty() {
        None
    } else {
        match Peers::locate(settings.sides != Sides::Ours) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("compare: {e}");
                return ExitCode::from(2);
            }
        }
    };
    // The incremental case: asked for (its tools are then required), or in the smoke
    // run with the default case set when PostgreSQL 18, its client tools and Garage are
    // installed (about 5 s at scale 1).
    let smoke_incremental = args.smoke && args.cases.is_empty();
    let incr_tools = if settings.cases.contains(&Case::Incremental) || smoke_incremental {
        match IncrTools::locate(args.incr_pg_bin.as_deref()) {
            Ok(t) => Some(t),
            Err(e) if smoke_incremental => {
                log(&format!("smoke: incremental skipped: {e}"));
                None
            }
            Err(e) => {
                eprintln!("compare: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    let ours = if settings.sides == Sides::Reference {
        OursTool::probe(&PathBuf::from("clone-standby"), Some("not run".into()))
    } else {
        locate_ours(&args, &log)
    };
    if let Some(why) = &ours.unavailable {
        log(&format!("clone-standby unavailable: {why}"));
    } else {
        log(&format!(
            "clone-standby at {} offers: {}",
            ours.path.display(),
            ours.subcommands.join(", ")
        ));
    }
    let incr_tools = match (incr_tools, ours.missing_option("backup", "--incremental")) {
        (Some(_), Some(why)) if smoke_incremental => {
            log(&format!("smoke: incremental skipped: {why}"));
            None
        }
        (tools, _) => tools,
    };

    let needs_main_cluster = settings.cases.iter().any(|c| c.uses_main_cluster());
    let cluster_options = ClusterOptions {
        bin_dir: args.pg_bin.clone(),
        work_dir: settings.work_dir.clone(),
        scale,
        port: args.port,
        random_text_pct: args.random_text_pct.unwrap_or(if repo_phases.is_empty() {
            0
        } else {
            30
        }),
        object_store: !repo_phases.is_empty(),
        summarize_wal: false,
        client_bin_dir: None,
    };
    let mut cluster = if needs_main_cluster {
        match SourceCluster::prepare(&cluster_options, &log) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("compare: the source cluster could not be prepared: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    if args.keep_running {
        if let Some(c) = cluster.as_mut() {
            c.keep_running();
        }
    }
    let wal = if let (true, Some(cluster)) = (settings.cases.contains(&Case::Wal), &cluster) {
        match harness::prepare_wal(cluster, settings.wal_mb, &log) {
            Ok(w) => Some(w),
            Err(e) => {
                eprintln!("compare: the WAL for the catch-up case could not be made: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    // The WAL-archive cases: asked for, or (smoke, default case set) sync-commit when
    // the store is installed and our receiver can write into it.
    let mut wal_cases: Vec<Case> = settings
        .cases
        .iter()
        .copied()
        .filter(|c| c.is_wal_store())
        .collect();
    let mut wal_peers = None;
    if wal_cases.is_empty() && args.smoke && args.cases.is_empty() {
        match (
            Peers::locate_store_only(),
            walbench::ours_missing_repo_receiver(&ours),
        ) {
            (Ok(p), None) => {
                wal_cases.push(Case::SyncCommit);
                wal_peers = Some(p);
            }
            (Err(e), _) | (_, Some(e)) => log(&format!("smoke: sync-commit skipped: {e}")),
        }
    } else if !wal_cases.is_empty() {
        let located = if wal_cases.contains(&Case::WalArchive) {
            Peers::locate(settings.sides != Sides::Ours)
        } else {
            Peers::locate_store_only()
        };
        match located {
            Ok(p) => wal_peers = Some(p),
            Err(e) => {
                eprintln!("compare: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let setup_s = started.elapsed().as_secs_f64();
    let machine_bin = match (&cluster, &incr_tools) {
        (Some(c), _) => c.bin_dir.clone(),
        (None, Some(t)) => t.server_bin.clone(),
        (None, None) => args.pg_bin.clone(),
    };
    let machine = machine::describe(&settings.work_dir, &machine_bin, &workspace_root());
    let mut local = settings.clone();
    local
        .cases
        .retain(|c| !c.is_repo() && !c.is_wal_store() && c.uses_main_cluster());
    let (limits, cases) = match &cluster {
        Some(cluster) if !local.cases.is_empty() => Harness {
            cluster,
            settings: local,
            ours: ours.clone(),
            wal,
            log: &log,
        }
        .run(),
        _ => Default::default(),
    };
    let (repo, repo_error) = match (&peers, &cluster) {
        (Some(peers), Some(cluster)) => match (RepoBench {
            cluster,
            ours: &ours,
            peers,
            sides: settings.sides,
            rounds: settings.rounds,
            phases: repo_phases.clone(),
            work_dir: settings.work_dir.clone(),
            base_port: args.repo_port,
            nodelay: !args.stock_garage,
            timeout_s: settings.timeout_s,
            log: &log,
        })
        .run()
        {
            Ok(r) => (Some(r), None),
            Err(e) => {
                log(&format!("object storage: {e}"));
                (None, Some(e))
            }
        },
        _ => (None, None),
    };
    let (wal_store, wal_store_error) = match (&wal_peers, &cluster) {
        (Some(peers), Some(cluster)) => match (WalBench {
            cluster,
            ours: &ours,
            peers,
            sides: settings.sides,
            rounds: settings.rounds,
            archive_mb: wal_cases.contains(&Case::WalArchive).then(|| {
                args.archive_wal_mb
                    .unwrap_or(if args.smoke { 32 } else { 1024 })
            }),
            sync_seconds: wal_cases
                .contains(&Case::SyncCommit)
                .then(|| args.sync_seconds.unwrap_or(if args.smoke { 1 } else { 10 })),
            work_dir: settings.work_dir.clone(),
            base_port: args.repo_port,
            nodelay: !args.stock_garage,
            garage_fsync: args.garage_fsync,
            timeout_s: settings.timeout_s,
            log: &log,
        })
        .run()
        {
            Ok(r) => (Some(r), None),
            Err(e) => {
                log(&format!("WAL archive: {e}"));
                (None, Some(e))
            }
        },
        _ => (None, None),
    };
    let (incremental, incremental_error) = match &incr_tools {
        None => (None, None),
        Some(tools) => match (IncrementalBench {
            ours: &ours,
            tools,
            sides: settings.sides,
            scale,
            random_text_pct: args.random_text_pct.unwrap_or(0),
            rounds: settings.rounds,
            change_pct: args.incr_change_pct,
            work_dir: settings.work_dir.clone(),
            port: args.port + 2,
            base_port: args.repo_port,
            nodelay: !args.stock_garage,
            garage_fsync: args.garage_fsync,
            verify: settings.verify,
            keep_running: args.keep_running,
            timeout_s: settings.timeout_s,
            log: &log,
        })
        .run()
        {
            Ok(r) => (Some(r), None),
            Err(e) => {
                log(&format!("incremental: {e}"));
                (None, Some(e))
            }
        },
    };
    let failed_runs = cases.iter().flat_map(|c| &c.runs).filter(|r| !r.ok).count()
        + repo
            .iter()
            .flat_map(|r| &r.runs)
            .filter(|r| !r.ok && repo_phases.contains(&r.phase))
            .count()
        + usize::from(repo_error.is_some())
        + wal_store.as_ref().map(|w| w.failures()).unwrap_or(0)
        + usize::from(wal_store_error.is_some())
        + incremental.as_ref().map(|r| r.failures()).unwrap_or(0)
        + usize::from(incremental_error.is_some());
    let result = Report {
        command_line,
        started_utc,
        total_s: started.elapsed().as_secs_f64(),
        machine,
        settings,
        ours,
        source_data_dir: match (&cluster, &incremental) {
            (Some(c), _) => c.data.clone(),
            (None, Some(r)) => r.source.clone(),
            (None, None) => PathBuf::new(),
        },
        setup_s,
        limits,
        cases,
        repo,
        repo_error,
        wal_store,
        wal_store_error,
        incremental,
        incremental_error,
        failed_runs,
        load_after: machine::load_average(),
    };
    let markdown = report::markdown(&result);
    let json = serde_json::to_string_pretty(&result).expect("serializable");
    let mut write_failed = false;
    for (path, text) in [(&args.json, &json), (&args.markdown, &markdown)] {
        if let Some(path) = path {
            if let Err(e) = std::fs::write(path, text) {
                eprintln!("compare: writing {}: {e}", path.display());
                write_failed = true;
            }
        }
    }
    println!("{markdown}");
    if let Some(Err(e)) = cluster.as_mut().map(SourceCluster::stop_if_started_here) {
        eprintln!("compare: {e}");
    }
    log(&format!("done: {failed_runs} failed run(s)"));
    if write_failed {
        ExitCode::from(2)
    } else if failed_runs > 0 && !args.allow_failures {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
