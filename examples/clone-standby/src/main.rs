//! `clone-standby`: make a machine a streaming PostgreSQL standby over the replication
//! protocol alone.
//!
//! Commands: `clone`, `receive-wal`, `verify`, `status`, `check` and `identify`, and for
//! object storage `backup`, `list`, `verify --repo`, `restore`, `wal-fetch` and `delete`.

mod repo;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use pgwire_repl::connection::AuthMethod;
use pgwire_repl::{Config, ReplicationClient};
use standby::clone::{self as cloning, CloneEvent, CloneOptions, Format, WalMethod};
use standby::start::{StartOptions, DEFAULT_START_WAIT};
use standby::{check, status};
use std::io::IsTerminal;
use std::path::PathBuf;

/// `--wal`.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum WalArg {
    /// A second connection streams WAL while the backup runs.
    Stream,
    /// The server includes WAL at the end of the backup.
    Fetch,
    /// No WAL (the clone needs an archive or a streaming source to start).
    None,
}

/// `--checkpoint`.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum CheckpointArg {
    /// Checkpoint at once (I/O burst on the source).
    Fast,
    /// Wait for a spread checkpoint.
    Spread,
}

/// `--format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum FormatArg {
    /// A data directory, ready to start.
    Plain,
    /// base.tar, <oid>.tar, pg_wal.tar and backup_manifest.
    Tar,
}

#[derive(Parser)]
#[command(
    version,
    about = "Clone and stream PostgreSQL standbys over the replication protocol"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Clone a primary into a new data directory and set it up as a streaming standby.
    /// Exits 0 only when the clone is complete and verified.
    Clone(CloneArgs),
    /// Stream WAL into a directory, like pg_receivewal, checking every record's CRC.
    ReceiveWal(ReceiveWalArgs),
    /// Take a base backup into an object-storage repository (s3://BUCKET/PREFIX),
    /// streamed into multipart uploads and verified on the way. Exits 0 only for a
    /// committed, verified backup.
    Backup(repo::BackupArgs),
    /// List the committed backups of a repository.
    List(repo::ListArgs),
    /// Restore a backup from a repository into a new data directory, verifying every
    /// file; with --standby --source, a streaming standby (and --start to start it).
    /// When the repository holds a WAL archive, restore_command fetches from it
    /// (wal-fetch); --target-lsn/--target-time recover to a point in time.
    Restore(repo::RestoreArgs),
    /// Fetch one WAL file from a repository's WAL archive, verified, for
    /// restore_command = '… wal-fetch --store-config FILE %f %p'. Exits 1 when the
    /// repository does not have it, 2 on any other failure (126 with --partial, which
    /// stops recovery); nothing is written then.
    WalFetch(repo::WalFetchArgs),
    /// Delete old backups (--retain N, --before TIME), then the WAL that no remaining
    /// backup needs.
    Delete(repo::DeleteArgs),
    /// Check a plain backup (--pgdata) or a backup in a repository (--repo) against its
    /// backup_manifest, as pg_verifybackup does, including the WAL range it names.
    Verify {
        /// The data directory to check.
        #[arg(
            long,
            required_unless_present_any = ["repo", "store_config"],
            conflicts_with_all = ["repo", "store_config"]
        )]
        pgdata: Option<PathBuf>,
        /// The repository holding the backup (s3://BUCKET/PREFIX), instead of --pgdata.
        #[command(flatten)]
        store: Option<repo::StoreArgs>,
        #[command(flatten)]
        repo_args: repo::VerifyRepoArgs,
        /// Skip the per-file checksums (sizes and presence are still checked).
        #[arg(long)]
        skip_checksums: bool,
        /// Do not check the WAL range.
        #[arg(long)]
        no_wal: bool,
    },
    /// Print IDENTIFY_SYSTEM, the server version and how the connection is secured.
    Identify {
        /// libpq connection string or URI of the server (PG* variables and ~/.pgpass apply;
        /// they alone decide when this is omitted).
        #[arg(long, default_value = "")]
        source: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Report whether a server (a primary, or a standby for a cascading standby) can
    /// serve a standby, with the fix for each problem and the GRANT for each missing
    /// privilege. Exits non-zero when a clone would fail.
    Check {
        /// libpq connection string or URI of the server to clone from.
        #[arg(long)]
        source: String,
    },
    /// Compare the upstream's WAL position with the standby's receive and replay
    /// positions. Works with a role that has only LOGIN and REPLICATION (streaming is
    /// then inferred; pg_monitor shows the exact state). Exits non-zero when the
    /// standby is not streaming.
    Status {
        /// The upstream the standby streams from (libpq connection string or URI): the
        /// primary, or a standby when the standby cascades from it. Its position is read
        /// over a replication connection (SQL as the fallback).
        #[arg(long, visible_alias = "upstream")]
        primary: String,
        /// The standby (libpq connection string or URI); needs a SQL login to a database.
        #[arg(long)]
        standby: String,
        /// Wait until the standby streams and has replayed what the upstream had when
        /// waiting began.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct CloneArgs {
    /// libpq connection string or URI of the source: the primary, or a standby for a
    /// cascading clone (PG* variables and ~/.pgpass apply; without it, PGHOST, PGPORT,
    /// PGUSER… alone decide, as with pg_basebackup).
    #[arg(long, default_value = "")]
    source: String,
    /// The new data directory (absent or empty).
    #[arg(long)]
    pgdata: PathBuf,
    /// Stream WAL through this replication slot and name it in primary_slot_name.
    #[arg(long)]
    slot: Option<String>,
    /// Create the slot (with RESERVE_WAL) before the backup starts.
    #[arg(long, requires = "slot")]
    create_slot: bool,
    /// How WAL is included: stream (a second connection), fetch (at the end) or none.
    #[arg(long, value_enum, default_value_t = WalArg::Stream)]
    wal: WalArg,
    /// Checkpoint at the start: fast or spread.
    #[arg(long, value_enum, default_value_t = CheckpointArg::Fast)]
    checkpoint: CheckpointArg,
    /// Server-side transfer rate limit, kB/s or with a k/M suffix (32k to 1024M).
    #[arg(long)]
    max_rate: Option<String>,
    /// Server-side compression: server-zstd[:LEVEL], server-lz4[:LEVEL], server-gzip[:LEVEL] (PostgreSQL 15+).
    #[arg(long)]
    compress: Option<String>,
    /// Relocate a tablespace: OLDDIR=NEWDIR (repeatable; \= for a literal =).
    #[arg(long = "tablespace-mapping")]
    tablespace_mapping: Vec<String>,
    /// plain (a data directory) or tar (base.tar, <oid>.tar, backup_manifest).
    #[arg(long, value_enum, default_value_t = FormatArg::Plain)]
    format: FormatArg,
    /// Manifest checksum algorithm: CRC32C, SHA224, SHA256, SHA384, SHA512 or NONE.
    #[arg(long, default_value = "CRC32C")]
    manifest_checksums: String,
    /// Do not write standby.signal and primary_conninfo.
    #[arg(long)]
    no_recovery_conf: bool,
    /// Skip every fsync (faster, not crash-safe).
    #[arg(long)]
    no_sync: bool,
    /// Keep the target directory when the clone fails.
    #[arg(long)]
    no_clean: bool,
    /// Show progress (a bar on a terminal, log lines otherwise).
    #[arg(long)]
    progress: bool,
    /// End with a JSON summary on standard output.
    #[arg(long)]
    json: bool,
    /// Start the standby with pg_ctl and wait until it streams and has caught up with
    /// the source.
    #[arg(long, conflicts_with = "no_recovery_conf")]
    start: bool,
    /// With --start: how long to wait for the standby to catch up, in seconds.
    #[arg(long, default_value_t = DEFAULT_START_WAIT.as_secs(), requires = "start")]
    start_timeout: u64,
    /// pg_ctl to use with --start (default: the server version's pg_ctl, then PATH).
    #[arg(long)]
    pg_ctl: Option<PathBuf>,
    /// With --start: the port the standby listens on (written to postgresql.auto.conf).
    #[arg(long)]
    standby_port: Option<u16>,
    /// With --start as root: the OS user that owns and runs the standby (default postgres).
    #[arg(long)]
    owner: Option<String>,
    /// The backup label.
    #[arg(long, default_value = "clone-standby")]
    label: String,
}

#[derive(clap::Args)]
struct ReceiveWalArgs {
    /// libpq connection string or URI of the server (PG* variables alone when omitted).
    #[arg(long, default_value = "")]
    source: String,
    /// The WAL directory (created if missing).
    #[arg(
        long,
        required_unless_present_any = ["repo", "store_config"],
        conflicts_with_all = ["repo", "store_config"]
    )]
    directory: Option<PathBuf>,
    /// Stream into an object-storage repository's WAL archive instead (s3://BUCKET/PREFIX);
    /// the flush position reported to the server is what the store has acknowledged.
    #[command(flatten)]
    store: Option<repo::StoreArgs>,
    /// With --repo: store the verified WAL that arrived since the last upload at least
    /// this often, in seconds (the loss window if this host and the server are lost
    /// together).
    #[arg(long, default_value_t = 1.0, requires = "repo")]
    flush_interval: f64,
    /// With --repo: store it as soon as this many bytes wait (default: only the interval
    /// decides).
    #[arg(long, requires = "repo")]
    flush_bytes: Option<u64>,
    /// Stream through this replication slot.
    #[arg(long)]
    slot: Option<String>,
    /// Create the slot if it does not exist.
    #[arg(long, requires = "slot")]
    create_slot: bool,
    /// Stop once WAL up to this LSN is on disk.
    #[arg(long)]
    endpos: Option<String>,
    /// Where to start when the directory is empty (default: the slot's restart_lsn on
    /// PostgreSQL 15+, else the server's current position, as pg_receivewal does).
    #[arg(long)]
    start_lsn: Option<String>,
    /// fsync after every write and report the flush position at once.
    #[arg(long)]
    synchronous: bool,
    /// Compress completed segments: zstd (level 3; files and objects end in .zst),
    /// zstd:LEVEL, or none. With --repo the default is zstd:1.
    #[arg(long)]
    compress: Option<String>,
    /// Exit when the connection is lost instead of reconnecting.
    #[arg(long)]
    no_loop: bool,
    #[command(flatten)]
    connection: ReceiverConnectionArgs,
    /// Skip every fsync.
    #[arg(long)]
    no_sync: bool,
    /// Only check WAL positions, not record CRCs.
    #[arg(long)]
    no_verify: bool,
}

/// Keeps freed receive buffers in the heap for reuse. With glibc's defaults every
/// 256 KiB receive buffer is a fresh mmap, and filling it costs a page fault per 4 KiB
/// (82% of this tool's page faults in a profile of a 1.5 GB clone).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts glibc malloc parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

/// For the object-storage commands, whose peak memory is a promise: buffers of 1 MiB and
/// more (upload parts, download chunks) are mapped and unmapped, so memory goes back to
/// the system as soon as they are freed. Without a fixed threshold glibc raises it to the
/// size of the first freed part and keeps such buffers in its heaps, one per thread.
fn bound_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts glibc malloc parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Prints the libraries' warnings (a password file with group or world access, …) on
/// standard error, as libpq does; they would be lost without a subscriber.
fn show_warnings() {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::WARN)
        .with_target(false)
        .without_time()
        .try_init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let repository_command = matches!(
        cli.command,
        Command::Backup(_)
            | Command::List(_)
            | Command::Restore(_)
            | Command::WalFetch(_)
            | Command::Delete(_)
    ) || matches!(&cli.command, Command::Verify { store: Some(_), .. })
        || matches!(&cli.command, Command::ReceiveWal(args) if args.store.is_some());
    show_warnings();
    if repository_command {
        return run_repository_command(cli.command);
    }
    tune_allocator();
    // One thread drives the sockets and the futures (no cross-thread wake-up per socket
    // read); file writes and fsyncs run on tokio's blocking threads.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("clone-standby: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Clone(args) => run_clone(args).await,
            Command::ReceiveWal(args) => run_receive_wal(args).await,
            Command::Verify {
                pgdata: Some(pgdata),
                skip_checksums,
                no_wal,
                ..
            } => run_verify(&pgdata, skip_checksums, no_wal),
            Command::Verify { .. }
            | Command::Backup(_)
            | Command::List(_)
            | Command::Restore(_)
            | Command::WalFetch(_)
            | Command::Delete(_) => {
                unreachable!("repository commands run on their own runtime")
            }
            Command::Identify { source, json } => {
                identify(&source, json).await.map(|()| ExitCode::SUCCESS)
            }
            Command::Check { source } => run_check(&source).await,
            Command::Status {
                primary,
                standby,
                wait,
                timeout,
                json,
            } => run_status(&primary, &standby, wait, Duration::from_secs(timeout), json).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("clone-standby: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The object-storage commands: a multi-threaded runtime, so that uploads, downloads and
/// client-side compression proceed side by side.
fn run_repository_command(command: Command) -> ExitCode {
    bound_allocator();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("clone-standby: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Command::ReceiveWal(args) = command {
        // Its own shutdown: Ctrl-C or SIGTERM stop streaming after a final upload.
        return match runtime.block_on(repo::run_receive_wal_repo(args.into_repo_args())) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("clone-standby: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let (interrupted, advice) = match &command {
        Command::WalFetch(_) => (
            "interrupted: nothing was written to the destination",
            "run the command again",
        ),
        Command::Delete(_) => (
            "interrupted: the deletion stopped part way (each deleted backup lost its commit \
             record first, so none is half-listed)",
            "run the same delete again to finish",
        ),
        _ => (
            "interrupted: no backup was committed and no restore completed",
            "run the command again; objects an interrupted backup left behind have no \
             commit record, so they are not a backup, and a partial restore directory \
             must be removed before restoring into it",
        ),
    };
    let result = runtime.block_on(async {
        let work = async {
            match command {
                Command::Backup(args) => repo::run_backup(args).await,
                Command::List(args) => repo::run_list(args).await,
                Command::Restore(args) => repo::run_restore(args).await,
                Command::WalFetch(args) => repo::run_wal_fetch(args).await,
                Command::Delete(args) => repo::run_delete(args).await,
                Command::Verify {
                    store: Some(store),
                    repo_args,
                    ..
                } => repo::run_verify_repo(store, repo_args).await,
                _ => unreachable!("not a repository command"),
            }
        };
        tokio::select! {
            result = work => result,
            _ = tokio::signal::ctrl_c() => Err(pgrepo::Error::usage(interrupted, advice)),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("clone-standby: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn identify(source: &str, json: bool) -> pgwire_repl::Result<()> {
    let config = source_config(source)?;
    let mut client = ReplicationClient::connect(&config).await?;
    let id = client.identify_system().await?;
    let segment_size = client.wal_segment_size().await?;
    let connection = client.connection();
    let version = connection.server_version().to_string();
    let tls = connection.tls().cloned();
    let auth = match connection.auth_method() {
        AuthMethod::None => "none (trust, peer or certificate)",
        AuthMethod::Cleartext => "cleartext password",
        AuthMethod::Md5 => "md5",
        AuthMethod::ScramSha256 => "SCRAM-SHA-256",
        AuthMethod::ScramSha256Plus => "SCRAM-SHA-256-PLUS (channel binding)",
        _ => "other",
    };
    let target = connection.target().to_string();
    client.close().await?;
    if json {
        let value = serde_json::json!({
            "server": target,
            "server_version": version,
            "system_id": id.system_id.to_string(),
            "timeline": id.timeline.0,
            "xlogpos": id.xlog_pos.to_string(),
            "wal_segment_size": segment_size.bytes(),
            "tls": tls.as_ref().map(|t| serde_json::json!({"version": t.version, "cipher": t.cipher, "direct": t.direct})),
            "authentication": auth,
        });
        println!("{value:#}");
    } else {
        println!("server:           {target}");
        println!("server version:   {version}");
        println!("system id:        {}", id.system_id);
        println!("timeline:         {}", id.timeline);
        println!("WAL flush LSN:    {}", id.xlog_pos);
        println!("WAL segment size: {} MB", segment_size.bytes() >> 20);
        match tls {
            Some(t) => println!(
                "TLS:              {} {}{}",
                t.version,
                t.cipher,
                if t.direct { " (direct)" } else { "" }
            ),
            None => println!("TLS:              not in use"),
        }
        println!("authentication:   {auth}");
    }
    Ok(())
}

fn source_config(conninfo: &str) -> pgwire_repl::Result<Config> {
    let mut config = Config::parse_with_env(conninfo)?;
    if config.application_name.is_none() {
        config.fallback_application_name = Some("clone-standby".into());
    }
    Ok(config)
}

async fn run_check(source: &str) -> pgwire_repl::Result<ExitCode> {
    let config = source_config(source)?;
    let report = check::report(&config).await;
    for finding in &report.findings {
        let label = match finding.level {
            check::Level::Ok => "ok     ",
            check::Level::Note => "note   ",
            check::Level::Warning => "WARNING",
            check::Level::Problem => "PROBLEM",
        };
        println!("{label} {}", finding.what);
        if let Some(fix) = &finding.fix {
            println!("        fix: {fix}");
        }
    }
    let (server, standby) = match report.source_in_recovery {
        Some(true) => ("this standby", "a cascading standby"),
        Some(false) => ("this primary", "a standby"),
        None => ("this server", "a standby"),
    };
    if report.worst() == check::Level::Problem {
        println!("\n{server} cannot serve {standby} until the problems above are fixed");
        Ok(ExitCode::FAILURE)
    } else {
        println!("\n{server} can serve {standby}");
        Ok(ExitCode::SUCCESS)
    }
}

async fn run_status(
    upstream: &str,
    standby: &str,
    wait: bool,
    timeout: Duration,
    json: bool,
) -> pgwire_repl::Result<ExitCode> {
    let upstream = source_config(upstream)?;
    let standby = source_config(standby)?;
    let status = if wait {
        status::wait_caught_up(&upstream, &standby, timeout, "--timeout").await?
    } else {
        status::observe(&upstream, &standby).await?
    };
    let role = standby.effective_user().unwrap_or_else(|_| "<role>".into());
    let hint = status
        .streaming_inferred
        .then(|| format!("{} shows the exact state", status::exact_state_grant(&role)));
    let show = |lsn: Option<pgwire_repl::Lsn>| lsn.map_or("none".to_string(), |l| l.to_string());
    if json {
        let value = serde_json::json!({
            "upstream_lsn": status.upstream_lsn.to_string(),
            "upstream_read_over": status.upstream_source.as_str(),
            "upstream_in_recovery": status.upstream_in_recovery,
            "streaming": status.streaming,
            "streaming_inferred": status.streaming_inferred,
            "wal_receiver_running": status.wal_receiver_running,
            "wal_receiver_status": status.wal_receiver_status,
            "receive_lsn": status.receive_lsn.map(|l| l.to_string()),
            "replay_lsn": status.replay_lsn.map(|l| l.to_string()),
            "receive_lag_bytes": status.receive_lag(),
            "replay_lag_bytes": status.replay_lag(),
            "hint": hint,
        });
        println!("{value:#}");
    } else {
        let upstream_role = match status.upstream_in_recovery {
            Some(true) => "upstream is a standby (cascading)",
            Some(false) => "upstream is a primary",
            None => "upstream's role unknown",
        };
        println!(
            "upstream WAL position: {} (read over {}; {upstream_role})",
            status.upstream_lsn,
            status.upstream_source.as_str()
        );
        println!("standby received LSN:  {}", show(status.receive_lsn));
        println!("standby replayed LSN:  {}", show(status.replay_lsn));
        println!(
            "receive lag:           {} bytes",
            status
                .receive_lag()
                .map_or("unknown".into(), |b| b.to_string())
        );
        println!(
            "replay lag:            {} bytes",
            status
                .replay_lag()
                .map_or("unknown".into(), |b| b.to_string())
        );
        let receiver = match (&status.wal_receiver_status, status.wal_receiver_running) {
            (Some(state), _) => format!("WAL receiver {state}"),
            (None, true) => format!("inferred: a WAL receiver runs and has received WAL, but its state is hidden from role {role}"),
            (None, false) => "no WAL receiver runs".to_string(),
        };
        println!(
            "streaming:             {} ({receiver})",
            if status.streaming { "yes" } else { "NO" }
        );
        if let Some(hint) = &hint {
            println!("hint:                  {hint}");
        }
    }
    if status.streaming {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("clone-standby: the standby is not streaming from its upstream; check its log, primary_conninfo and the upstream's pg_hba.conf");
        Ok(ExitCode::FAILURE)
    }
}

fn fail(message: impl std::fmt::Display) -> pgwire_repl::Result<ExitCode> {
    eprintln!("clone-standby: {message}");
    Ok(ExitCode::FAILURE)
}

async fn run_clone(args: CloneArgs) -> pgwire_repl::Result<ExitCode> {
    let source = source_config(&args.source)?;
    let mut mapping = basebackup::TablespaceMapping::default();
    for arg in &args.tablespace_mapping {
        if let Err(e) = mapping.parse_arg(arg) {
            return fail(e);
        }
    }
    let compression = match args
        .compress
        .as_deref()
        .map(cloning::parse_compression)
        .transpose()
    {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let max_rate = match args
        .max_rate
        .as_deref()
        .map(cloning::parse_max_rate)
        .transpose()
    {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let Some(manifest_checksums) = basebackup::ChecksumAlgorithm::parse(&args.manifest_checksums)
    else {
        return fail(format!(
            "unknown --manifest-checksums {:?}: use CRC32C, SHA224, SHA256, SHA384, SHA512 or NONE",
            args.manifest_checksums
        ));
    };
    if let Some(slot) = &args.slot {
        if let Err(e) = pgwire_repl::proto::frontend::validate_slot_name(slot) {
            return fail(e);
        }
    }
    if args.start && args.format == FormatArg::Tar {
        return fail("--start needs --format plain: tar archives are not a data directory a server can start on");
    }
    let options = CloneOptions {
        source: source.clone(),
        target: args.pgdata.clone(),
        slot: args.slot.clone(),
        create_slot: args.create_slot,
        wal: match args.wal {
            WalArg::Stream => WalMethod::Stream,
            WalArg::Fetch => WalMethod::Fetch,
            WalArg::None => WalMethod::None,
        },
        checkpoint: match args.checkpoint {
            CheckpointArg::Fast => basebackup::Checkpoint::Fast,
            CheckpointArg::Spread => basebackup::Checkpoint::Spread,
        },
        max_rate,
        compression,
        tablespace_mapping: mapping,
        format: match args.format {
            FormatArg::Plain => Format::Plain,
            FormatArg::Tar => Format::Tar,
        },
        manifest_checksums,
        write_recovery_conf: !args.no_recovery_conf,
        no_sync: args.no_sync,
        keep_on_failure: args.no_clean,
        label: args.label.clone(),
    };
    let show_progress = args.progress;
    let bar = (show_progress && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bytes}/{total_bytes} {wide_bar} {binary_bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let bar_for_events = bar.clone();
    let mut last_log = std::time::Instant::now();
    let events = Box::new(move |event: CloneEvent| match event {
        CloneEvent::Started {
            start_lsn,
            timeline,
        } => {
            if show_progress {
                eprintln!("clone-standby: backup started at {start_lsn} on timeline {timeline}; streaming WAL from there");
            }
        }
        CloneEvent::Progress { done, total } => match &bar_for_events {
            Some(bar) => {
                if let Some(total) = total {
                    bar.set_length(total.max(done));
                }
                bar.set_position(done);
            }
            None if show_progress && last_log.elapsed() >= std::time::Duration::from_secs(2) => {
                last_log = std::time::Instant::now();
                match total {
                    Some(total) => {
                        eprintln!("clone-standby: {} of ~{} MB", done >> 20, total >> 20)
                    }
                    None => eprintln!("clone-standby: {} MB", done >> 20),
                }
            }
            None => {}
        },
        CloneEvent::WaitingForWal { end_lsn } => {
            if show_progress {
                eprintln!(
                    "clone-standby: archive complete and verified; waiting for WAL up to {end_lsn}"
                );
            }
        }
    });
    // Ctrl-C stops the clone; it then removes what it created and says what it did.
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let outcome = cloning::clone(options, events, interrupt).await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let summary = match outcome {
        Ok(summary) => summary,
        Err(failure) if failure.interrupted => return fail(format!("clone {failure}")),
        Err(failure) => return fail(format!("clone failed: {failure}")),
    };
    let megabytes_per_second = summary.bytes as f64 / 1e6 / summary.seconds.max(1e-9);
    let mut standby_status = None;
    if args.start {
        // The clone is complete: nothing is removed from here on, whatever happens.
        let kept = match &args.slot {
            Some(slot) => format!("{} and the slot {slot:?} are kept", args.pgdata.display()),
            None => format!("{} is kept", args.pgdata.display()),
        };
        let start = StartOptions {
            pgdata: args.pgdata.clone(),
            pg_ctl: args.pg_ctl.clone(),
            port: args.standby_port,
            owner: args.owner.clone(),
            timeout: Duration::from_secs(args.start_timeout),
            timeout_option: "--start-timeout".into(),
        };
        let started = tokio::select! {
            result = standby::start::start_standby(&start, &source, summary.server_major) => result,
            _ = tokio::signal::ctrl_c() => Err(standby::Error::interrupted(format!(
                "interrupted while waiting; if the standby was started it is still running (pg_ctl stop -D {})",
                args.pgdata.display()
            ))),
        };
        match started {
            Ok(status) => standby_status = Some(status),
            Err(e) => {
                return fail(format!(
                    "the clone is complete and verified ({kept}), but the standby did not start streaming: {e}"
                ))
            }
        }
    }
    if args.json {
        let value = serde_json::json!({
            "bytes": summary.bytes,
            "seconds": summary.seconds,
            "mb_per_s": megabytes_per_second,
            "start_lsn": summary.start_lsn.to_string(),
            "end_lsn": summary.end_lsn.to_string(),
            "timeline": summary.timeline.0,
            "verified_files": summary.verified_files,
            "wal_bytes": summary.wal_bytes,
            "standby_replay_lag_bytes": standby_status.as_ref().and_then(|s: &status::Status| s.replay_lag()),
        });
        println!("{value:#}");
    } else {
        println!(
            "clone-standby: cloned {:.0} MB in {:.1} s ({:.0} MB/s), {} files verified, WAL {} to {} on timeline {}",
            summary.bytes as f64 / 1e6,
            summary.seconds,
            megabytes_per_second,
            summary.verified_files,
            summary.start_lsn,
            summary.end_lsn,
            summary.timeline
        );
        if let Some(s) = &standby_status {
            println!(
                "clone-standby: the standby is streaming; receive lag {} bytes, replay lag {} bytes",
                s.receive_lag().unwrap_or(0),
                s.replay_lag().unwrap_or(0)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// How `receive-wal` keeps its connection: reconnects and dead-peer detection.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct ReceiverConnectionArgs {
    /// Seconds between reconnection attempts after the first, which is made at once
    /// (pg_receivewal waits 5 s). The receiver retries until stopped.
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    reconnect_interval: f64,
    /// Seconds of silence from the server after which the connection is taken as dead,
    /// as PostgreSQL's wal_receiver_timeout: halfway through, the receiver asks the
    /// server for a reply, which a live server sends at once. 0 waits forever.
    #[arg(long, default_value_t = 60.0, value_name = "SECS")]
    wal_receiver_timeout: f64,
}

impl ReceiverConnectionArgs {
    /// Sets the reconnect policy, the dead-peer bound and a printer of connection
    /// events on stderr.
    pub fn apply(&self, options: &mut walstream::ReceiveOptions) -> Result<(), String> {
        let seconds = |value: f64, option: &str, zero_ok: bool| {
            if value.is_finite() && (value > 0.0 || (zero_ok && value == 0.0)) {
                Ok(Duration::from_secs_f64(value))
            } else {
                Err(format!(
                    "{option} {value} is not a {} number of seconds",
                    if zero_ok { "non-negative" } else { "positive" }
                ))
            }
        };
        let interval = seconds(self.reconnect_interval, "--reconnect-interval", false)?;
        let timeout = seconds(self.wal_receiver_timeout, "--wal-receiver-timeout", true)?;
        options.reconnect = walstream::ReconnectPolicy::default()
            .interval(interval)
            .retry_forever();
        options.idle_timeout = (!timeout.is_zero()).then_some(timeout);
        options.on_event(|event| eprintln!("clone-standby: {event}"));
        Ok(())
    }
}

/// Completes on Ctrl-C or SIGTERM (what systemd sends to stop a service).
pub async fn interrupted() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        Some(()) = async { match term.as_mut() { Some(t) => t.recv().await, None => None } } => {}
    }
}

impl ReceiveWalArgs {
    fn into_repo_args(self) -> repo::ReceiveWalRepoArgs {
        repo::ReceiveWalRepoArgs {
            source: self.source,
            store: self.store.expect("a repository command has --repo"),
            slot: self.slot,
            create_slot: self.create_slot,
            endpos: self.endpos,
            start_lsn: self.start_lsn,
            synchronous: self.synchronous,
            compress: self.compress,
            no_loop: self.no_loop,
            connection: self.connection,
            no_verify: self.no_verify,
            flush_interval: self.flush_interval,
            flush_bytes: self.flush_bytes,
        }
    }
}

async fn run_receive_wal(args: ReceiveWalArgs) -> pgwire_repl::Result<ExitCode> {
    let source = source_config(&args.source)?;
    let Some(directory) = args.directory.clone() else {
        return fail("receive-wal needs --directory or --repo".to_string());
    };
    let args = ReceiveWalArgs {
        directory: Some(directory.clone()),
        ..args
    };
    let directory = &directory;
    // A WAL directory may hold earlier segments (it is resumed), but it must never be a
    // server's own pg_wal or lie inside any data directory or tablespace on this host.
    if let Err(e) = basebackup::plain_target_dirs(
        directory,
        &[],
        &basebackup::TablespaceMapping::default(),
        &[],
        true,
    ) {
        return fail(format!(
            "refusing --directory {}: {}\n  what to do: give a directory outside every data directory and tablespace (a server's pg_wal belongs to that server)",
            directory.display(),
            e.message()
        ));
    }
    let mut options = walstream::ReceiveOptions::new(directory);
    options.slot = args.slot.clone();
    options.create_slot = args.create_slot;
    options.synchronous = args.synchronous;
    options.no_loop = args.no_loop;
    options.verify_records = !args.no_verify;
    options.dir_options.sync = !args.no_sync;
    match args.compress.as_deref() {
        None | Some("none") => {}
        Some(method) => match repo::parse_wal_compression(method) {
            Ok(pgrepo::WalCompression::Zstd { level }) => {
                options.dir_options.compression = walstream::Compression::Zstd { level };
            }
            Ok(pgrepo::WalCompression::None) => {}
            Err(e) => return fail(e.to_string()),
        },
    }
    if let Some(endpos) = &args.endpos {
        options.endpos = Some(endpos.parse()?);
    }
    if let Some(start) = &args.start_lsn {
        options.start_position = Some(start.parse()?);
    }
    if let Err(e) = args.connection.apply(&mut options) {
        return fail(e);
    }
    match walstream::receive_wal(&source, &options, interrupted()).await {
        Ok(summary) => {
            eprintln!(
                "clone-standby: stopped ({:?}) at {} on timeline {}: {} bytes received, {} segments completed, {} reconnects",
                summary.end_reason, summary.flushed, summary.timeline, summary.bytes_received, summary.segments_completed, summary.reconnects
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => fail(format!("receive-wal failed: {e}")),
    }
}

fn run_verify(
    pgdata: &std::path::Path,
    skip_checksums: bool,
    no_wal: bool,
) -> pgwire_repl::Result<ExitCode> {
    let options = basebackup::VerifyOptions {
        skip_checksums,
        skip_wal: no_wal,
        ..basebackup::VerifyOptions::default()
    };
    match basebackup::verify_backup_with(pgdata, &options) {
        Ok(manifest) => {
            println!(
                "clone-standby: {} files verified in {}{}",
                manifest.files.len(),
                pgdata.display(),
                if no_wal { "" } else { ", WAL range present" }
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => match started_since_backup(pgdata) {
            Some(why) => fail(format!(
                "{} has changed since the backup: {why}. That is expected once a server has run on it, so the manifest no longer describes it (first difference: {}).\n  what to do: nothing, if this is a standby that has been started on purpose; verify a clone before its first start (clone-standby clone checks every file while writing it)",
                pgdata.display(),
                e.message()
            )),
            None => fail(format!("verification failed: {e}")),
        },
    }
}

/// Why `pgdata` looks like a server has run on it since the backup, if it does: the
/// startup process renames `backup_label` to `backup_label.old` once it has read it, and
/// a running server holds `postmaster.pid`.
fn started_since_backup(pgdata: &std::path::Path) -> Option<&'static str> {
    if pgdata.join("postmaster.pid").exists() {
        Some("a server is running on it (postmaster.pid exists)")
    } else if pgdata.join("backup_label.old").exists() && !pgdata.join("backup_label").exists() {
        Some("a server has started on it (backup_label was renamed backup_label.old)")
    } else {
        None
    }
}
