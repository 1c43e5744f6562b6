//! The object-storage commands: `backup`, `list`, `verify --repo` and `restore`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgrepo::{
    Compression, DownloadOptions, RepoBackupOptions, Repository, RestoreOptions, Secret,
    StoreOptions, UploadOptions,
};
use standby::start::{StartOptions, DEFAULT_START_WAIT};

/// How to reach the object store. Unset options come from AWS_ACCESS_KEY_ID,
/// AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION, AWS_ENDPOINT_URL and
/// AWS_ALLOW_HTTP, as the AWS CLI reads them.
#[derive(clap::Args, Debug)]
pub struct StoreArgs {
    /// The repository: s3://BUCKET/PREFIX (or file:///PATH).
    #[arg(long)]
    pub repo: String,
    /// S3-compatible endpoint, e.g. http://127.0.0.1:3900 (overrides AWS_ENDPOINT_URL).
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Region (overrides AWS_REGION).
    #[arg(long)]
    pub region: Option<String>,
    /// Access key id (overrides AWS_ACCESS_KEY_ID).
    #[arg(long)]
    pub access_key_id: Option<String>,
    /// A file holding the secret access key (overrides AWS_SECRET_ACCESS_KEY; a file, so
    /// that the secret never shows in process listings).
    #[arg(long)]
    pub secret_access_key_file: Option<PathBuf>,
    /// A file holding a session token (overrides AWS_SESSION_TOKEN).
    #[arg(long)]
    pub session_token_file: Option<PathBuf>,
    /// Allow a plain http:// endpoint (overrides AWS_ALLOW_HTTP).
    #[arg(long)]
    pub allow_http: bool,
}

impl StoreArgs {
    fn open(&self) -> pgrepo::Result<Repository> {
        let read_secret = |path: &PathBuf| -> pgrepo::Result<Secret> {
            let text = std::fs::read_to_string(path)
                .map_err(|e| pgrepo::Error::io("reading the secret in", path, e))?;
            Ok(Secret::new(text.trim_end_matches(['\n', '\r'])))
        };
        let options = StoreOptions {
            access_key_id: self.access_key_id.clone(),
            secret_access_key: self
                .secret_access_key_file
                .as_ref()
                .map(read_secret)
                .transpose()?,
            session_token: self
                .session_token_file
                .as_ref()
                .map(read_secret)
                .transpose()?,
            region: self.region.clone(),
            endpoint: self.endpoint.clone(),
            allow_http: self.allow_http.then_some(true),
            ..StoreOptions::default()
        };
        Repository::open(&self.repo, &options)
    }
}

/// `backup`.
#[derive(clap::Args, Debug)]
pub struct BackupArgs {
    /// libpq connection string or URI of the server to back up (PG* variables apply).
    #[arg(long, default_value = "")]
    pub source: String,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Compression: none, or [server-|client-]zstd|lz4|gzip[:LEVEL]. A bare method means
    /// the server compresses on PostgreSQL 15+ (archives are stored as sent), this
    /// process on older servers.
    #[arg(long, default_value = "client-zstd")]
    pub compress: String,
    /// The backup's label (default: the UTC start time, 20261130T101500Z).
    #[arg(long)]
    pub label: Option<String>,
    /// Checkpoint at the start: fast or spread.
    #[arg(long, default_value = "fast", value_parser = ["fast", "spread"])]
    pub checkpoint: String,
    /// Server-side transfer rate limit, kB/s or with a k/M suffix.
    #[arg(long)]
    pub max_rate: Option<String>,
    /// Size of the first upload parts in MiB (at least 5; doubles every 1000 parts).
    #[arg(long, default_value_t = 5)]
    pub part_size_mib: usize,
    /// Parts uploaded at the same time.
    #[arg(long, default_value_t = 3)]
    pub upload_concurrency: usize,
    /// Show progress on standard error.
    #[arg(long)]
    pub progress: bool,
    /// End with a JSON summary on standard output.
    #[arg(long)]
    pub json: bool,
    /// An incremental backup (PostgreSQL 17+, summarize_wal = on): only what changed
    /// since the backup named by --from is sent and stored.
    #[arg(long)]
    pub incremental: bool,
    /// The parent of an incremental backup: a label, or latest.
    #[arg(long, default_value = "latest", requires = "incremental")]
    pub from: String,
}

/// `list`.
#[derive(clap::Args, Debug)]
pub struct ListArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `verify --repo`.
#[derive(clap::Args, Debug)]
pub struct VerifyRepoArgs {
    /// The backup's label, or latest.
    #[arg(long, default_value = "latest")]
    pub backup: String,
    /// Parallel downloads.
    #[arg(long, default_value_t = 6)]
    pub download_concurrency: usize,
    /// For an incremental backup, also check its chain: every parent down to the full
    /// backup exists and is committed, and the LSNs and timelines link.
    #[arg(long)]
    pub chain: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `restore`.
#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// The new data directory (absent or empty).
    #[arg(long)]
    pub pgdata: PathBuf,
    /// The backup's label, or latest.
    #[arg(long, default_value = "latest")]
    pub backup: String,
    /// Make it a streaming standby of --source: standby.signal and primary_conninfo.
    #[arg(long, requires = "source")]
    pub standby: bool,
    /// The server the standby streams from (libpq connection string or URI).
    #[arg(long)]
    pub source: Option<String>,
    /// The replication slot the standby streams through (primary_slot_name).
    #[arg(long, requires = "standby")]
    pub slot: Option<String>,
    /// Start the standby with pg_ctl and wait until it streams and has caught up.
    #[arg(long, requires = "standby")]
    pub start: bool,
    /// With --start: how long to wait for the standby to catch up, in seconds.
    #[arg(long, default_value_t = DEFAULT_START_WAIT.as_secs())]
    pub start_timeout: u64,
    /// pg_ctl to use with --start.
    #[arg(long)]
    pub pg_ctl: Option<PathBuf>,
    /// With --start: the port the standby listens on.
    #[arg(long)]
    pub standby_port: Option<u16>,
    /// With --start as root: the OS user that owns and runs the standby (default postgres).
    #[arg(long)]
    pub owner: Option<String>,
    /// Relocate a tablespace: OLDDIR=NEWDIR (repeatable).
    #[arg(long = "tablespace-mapping")]
    pub tablespace_mapping: Vec<String>,
    /// Parallel downloads.
    #[arg(long, default_value_t = 6)]
    pub download_concurrency: usize,
    /// Skip every fsync (faster, not crash-safe).
    #[arg(long)]
    pub no_sync: bool,
    /// Show progress on standard error.
    #[arg(long)]
    pub progress: bool,
    /// End with a JSON summary on standard output.
    #[arg(long)]
    pub json: bool,
    /// Bring an existing, stopped data directory of the same cluster up to the backup,
    /// downloading only what differs (files whose size and checksum match the manifest
    /// are kept). On failure the directory is left inconsistent: restore it again.
    #[arg(long)]
    pub delta: bool,
}

fn chrono_now() -> pgrepo::layout::Timestamp {
    pgrepo::layout::now()
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// Prints progress lines every two seconds while `work` runs.
async fn with_progress<T>(
    enabled: bool,
    what: &str,
    counter: Arc<AtomicU64>,
    work: impl std::future::Future<Output = T>,
) -> T {
    if !enabled {
        return work.await;
    }
    let started = Instant::now();
    let mut work = std::pin::pin!(work);
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.tick().await;
    let terminal = std::io::stderr().is_terminal();
    loop {
        tokio::select! {
            result = &mut work => {
                if terminal { eprintln!(); }
                return result;
            }
            _ = tick.tick() => {
                let done = counter.load(Ordering::Relaxed);
                let rate = done as f64 / started.elapsed().as_secs_f64().max(0.001) / (1 << 20) as f64;
                let line = format!("clone-standby: {what} {} ({rate:.0} MiB/s)", mib(done));
                if terminal { eprint!("\r{line}   "); } else { eprintln!("{line}"); }
            }
        }
    }
}

pub async fn run_backup(args: BackupArgs) -> pgrepo::Result<ExitCode> {
    let repo = args.store.open()?;
    let config = crate::source_config(&args.source)?;
    let max_rate = args
        .max_rate
        .as_deref()
        .map(standby::clone::parse_max_rate)
        .transpose()?;
    // The label is fixed here, so that an interrupted backup's objects can be found.
    let label = match &args.label {
        Some(label) => label.clone(),
        None => pgrepo::layout::default_label(chrono_now()),
    };
    let options = RepoBackupOptions {
        label: Some(label.clone()),
        compression: Compression::parse(&args.compress)?,
        checkpoint: if args.checkpoint == "spread" {
            basebackup::Checkpoint::Spread
        } else {
            basebackup::Checkpoint::Fast
        },
        max_rate,
        upload: UploadOptions {
            part_size: args.part_size_mib.max(5) << 20,
            concurrency: args.upload_concurrency.max(1),
        },
        incremental_from: args.incremental.then(|| args.from.clone()),
    };
    // Only objects this run stored may be removed after an interruption: a label that is
    // taken already (the backup then refuses it) is never cleaned up here.
    let label_was_free = !repo.label_taken(&label).await?;
    let uploaded = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let work = with_progress(
        args.progress,
        "uploaded",
        uploaded.clone(),
        pgrepo::backup_with_counter(&config, &repo, options, None, uploaded.clone()),
    );
    let done = tokio::select! {
        result = work => result?,
        _ = tokio::signal::ctrl_c() => {
            // The upload task aborts its multipart uploads on its own; give it a moment,
            // then remove what was stored under the label (it has no commit record).
            tokio::time::sleep(Duration::from_secs(2)).await;
            let removed = if !label_was_free {
                Ok(format!("nothing under backups/{label} was touched (the label was taken before this run)"))
            } else if repo.backup(&label).await.is_ok() {
                // The commit won the race with the interruption: the backup is complete.
                return Err(pgrepo::Error::usage(
                    format!("interrupted after backup {label} was committed; it is complete and was kept"),
                    "check it with `clone-standby list`",
                ));
            } else {
                match repo.label_taken(&label).await {
                    Ok(true) => repo.delete_backup_objects(&label).await.map(|n| format!("removed {n} objects under backups/{label}")),
                    Ok(false) => Ok("nothing was stored".into()),
                    Err(e) => Err(e),
                }
            };
            let what = match removed {
                Ok(what) => what,
                Err(e) => format!("could not remove its objects ({e}); they have no commit record, so they are not a backup"),
            };
            return Err(pgrepo::Error::usage(
                format!("interrupted: backup {label} was not committed; {what}"),
                "run the backup again (with a new label)",
            ));
        }
    };
    let record = &done.record;
    if args.json {
        let mut value = serde_json::to_value(record).unwrap_or_default();
        value["repository"] = repo.url().to_string().into();
        value["seconds"] = started.elapsed().as_secs_f64().into();
        println!("{value:#}");
    } else {
        println!(
            "clone-standby: backup {} committed to {} in {:.1} s: {} files, {} of database stored as {} ({} WAL segments, {} records verified), consistent at {}",
            record.label,
            repo.url(),
            started.elapsed().as_secs_f64(),
            record.files,
            mib(record.database_bytes),
            mib(record.stored_bytes),
            record.wal.segments,
            record.wal.records_verified,
            record.end_lsn
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn run_list(args: ListArgs) -> pgrepo::Result<ExitCode> {
    let repo = args.store.open()?;
    let backups = repo.backups().await?;
    if args.json {
        let list: Vec<_> = backups
            .iter()
            .map(|b| {
                let mut value = serde_json::to_value(b).unwrap_or_default();
                value["wal_complete"] = true.into();
                value
            })
            .collect();
        println!("{:#}", serde_json::Value::Array(list));
        return Ok(ExitCode::SUCCESS);
    }
    if backups.is_empty() {
        println!("no committed backup in {}", repo.url());
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<22} {:<20} {:>12} {:>12} {:>3} {:>10} {:>10} {:<12} {:<22} WAL",
        "label",
        "finished (UTC)",
        "start",
        "end",
        "tli",
        "database",
        "stored",
        "compression",
        "parent"
    );
    for b in &backups {
        let compression = b
            .archives
            .first()
            .map(|a| format!("{}/{}", a.compression.name(), a.compressed_by))
            .unwrap_or_default();
        println!(
            "{:<22} {:<20} {:>12} {:>12} {:>3} {:>10} {:>10} {:<12} {:<22} complete (in backup, {} segments)",
            b.label,
            b.finished_at.trim_end_matches('Z').replace('T', " "),
            b.start_lsn,
            b.end_lsn,
            b.start_timeline,
            mib(b.database_bytes),
            mib(b.stored_bytes),
            compression,
            b.parent.as_deref().unwrap_or("-"),
            b.wal.segments
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn run_verify_repo(store: StoreArgs, args: VerifyRepoArgs) -> pgrepo::Result<ExitCode> {
    let repo = store.open()?;
    let download = DownloadOptions {
        concurrency: args.download_concurrency.max(1),
        ..DownloadOptions::default()
    };
    let started = Instant::now();
    let (checked, chain) = if args.chain {
        let (checked, chain) = pgrepo::verify_chain(&repo, &args.backup, download).await?;
        let labels: Vec<String> = chain.into_iter().map(|r| r.label).collect();
        (checked, Some(labels))
    } else {
        (
            pgrepo::verify_backup(&repo, &args.backup, download).await?,
            None,
        )
    };
    if args.json {
        println!(
            "{:#}",
            serde_json::json!({
                "label": checked.record.label,
                "chain": chain,
                "repository": repo.url().to_string(),
                "files": checked.files,
                "wal_records_verified": checked.wal_records,
                "bytes_read": checked.downloaded,
                "seconds": started.elapsed().as_secs_f64(),
                "ok": true,
            })
        );
    } else {
        println!(
            "clone-standby: backup {} in {} verified: {} files match the manifest, {} WAL records from {} to {} verified ({} read in {:.1} s)",
            checked.record.label,
            repo.url(),
            checked.files,
            checked.wal_records,
            checked.record.start_lsn,
            checked.record.end_lsn,
            mib(checked.downloaded),
            started.elapsed().as_secs_f64()
        );
        if let Some(chain) = chain {
            println!(
                "clone-standby: chain {} checked: every parent is committed and the LSNs and timelines link",
                chain.join(" <- ")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn run_restore(args: RestoreArgs) -> pgrepo::Result<ExitCode> {
    let repo = args.store.open()?;
    let source = args
        .source
        .as_deref()
        .map(crate::source_config)
        .transpose()?;
    let mut mapping = basebackup::TablespaceMapping::default();
    for m in &args.tablespace_mapping {
        mapping.parse_arg(m)?;
    }
    let options = RestoreOptions {
        tablespace_mapping: mapping,
        no_sync: args.no_sync,
        delta: args.delta,
        download: DownloadOptions {
            concurrency: args.download_concurrency.max(1),
            ..DownloadOptions::default()
        },
    };
    let downloaded = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let restored = with_progress(
        args.progress,
        "downloaded",
        downloaded.clone(),
        pgrepo::restore_backup(
            &repo,
            &args.backup,
            &args.pgdata,
            options,
            Some(downloaded.clone()),
        ),
    )
    .await
    .map_err(|e| {
        if args.delta {
            return e; // the delta error already says the directory must be restored again
        }
        // Said from what is on disk now, not from what should have happened.
        let left = match std::fs::read_dir(&args.pgdata).map(|mut e| e.next().is_none()) {
            Err(_) => format!("nothing was left at {}", args.pgdata.display()),
            Ok(true) => format!("{} was left empty", args.pgdata.display()),
            Ok(false) => format!(
                "{} still holds files from this restore: remove them before restoring again",
                args.pgdata.display()
            ),
        };
        e.context(format!("restore failed ({left})"))
    })?;
    let record = &restored.record;
    if let (true, Some(source)) = (args.standby, source.as_ref()) {
        let conninfo = standby::recovery::primary_conninfo(source, record.server_major);
        if let Err(e) =
            standby::recovery::write_standby_config(&args.pgdata, &conninfo, args.slot.as_deref())
        {
            let left = if args.delta {
                "the data directory was left as restored, without a standby configuration"
                    .to_string()
            } else {
                match std::fs::remove_dir_all(&args.pgdata) {
                    Ok(()) => "the restored data directory was removed".to_string(),
                    Err(r) => format!("the restored data directory could not be removed ({r}): remove it before using it"),
                }
            };
            return Err(pgrepo::Error::io(
                "writing the standby configuration into",
                &args.pgdata,
                e,
            )
            .context(left));
        }
    }
    if !args.json {
        println!(
            "clone-standby: backup {} restored into {} in {:.1} s: {} files verified ({} reused, {} written), {} WAL records verified, {} downloaded{}",
            record.label,
            args.pgdata.display(),
            started.elapsed().as_secs_f64(),
            restored.files,
            restored.files_reused,
            restored.files_written,
            restored.wal_records,
            mib(restored.downloaded),
            if args.standby { "; configured as a standby" } else { "" }
        );
    }
    let mut started_standby = false;
    if args.start {
        let source = source.as_ref().ok_or_else(|| {
            pgrepo::Error::usage("--start needs --source", "name the primary with --source")
        })?;
        let start = StartOptions {
            pgdata: args.pgdata.clone(),
            pg_ctl: args.pg_ctl.clone(),
            port: args.standby_port,
            owner: args.owner.clone(),
            timeout: Duration::from_secs(args.start_timeout),
            timeout_option: "--start-timeout".into(),
        };
        standby::start::start_standby(&start, source, record.server_major).await?;
        started_standby = true;
        if !args.json {
            println!("clone-standby: the standby is streaming and has caught up");
        }
    }
    if args.json {
        println!(
            "{:#}",
            serde_json::json!({
                "label": record.label,
                "pgdata": args.pgdata,
                "files": restored.files,
                "files_reused": restored.files_reused,
                "files_written": restored.files_written,
                "delta": args.delta,
                "archive_bytes": record.archives.iter().map(|a| a.stored_bytes).sum::<u64>(),
                "wal_records_verified": restored.wal_records,
                "bytes_read": restored.downloaded,
                "seconds": started.elapsed().as_secs_f64(),
                "standby": args.standby,
                "started": started_standby,
            })
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `receive-wal --repo`: the options that apply to a repository.
#[derive(Debug)]
pub struct ReceiveWalRepoArgs {
    pub source: String,
    pub store: StoreArgs,
    pub slot: Option<String>,
    pub create_slot: bool,
    pub endpos: Option<String>,
    pub start_lsn: Option<String>,
    pub synchronous: bool,
    pub compress: Option<String>,
    pub no_loop: bool,
    pub no_verify: bool,
    pub flush_interval: f64,
    pub flush_bytes: Option<u64>,
}

/// `none`, `zstd` or `zstd:LEVEL`.
pub fn parse_wal_compression(value: &str) -> pgrepo::Result<pgrepo::WalCompression> {
    let bad = || {
        pgrepo::Error::usage(
            format!("--compress {value:?} is not a WAL compression"),
            "use none, zstd or zstd:LEVEL (1 to 22)",
        )
    };
    match value.split_once(':') {
        None if value == "none" => Ok(pgrepo::WalCompression::None),
        None if value == "zstd" => Ok(pgrepo::WalCompression::Zstd { level: 3 }),
        Some(("zstd", level)) => match level.parse::<i32>() {
            Ok(level @ 1..=22) => Ok(pgrepo::WalCompression::Zstd { level }),
            _ => Err(bad()),
        },
        _ => Err(bad()),
    }
}

/// Streams WAL into the repository until Ctrl-C, SIGTERM, `--endpos` or (with
/// `--no-loop`) the end of the connection.
pub async fn run_receive_wal_repo(args: ReceiveWalRepoArgs) -> pgrepo::Result<ExitCode> {
    let repo = args.store.open()?;
    let config = crate::source_config(&args.source)?;
    if !args.flush_interval.is_finite() || args.flush_interval <= 0.0 {
        return Err(pgrepo::Error::usage(
            format!(
                "--flush-interval {} is not a positive number of seconds",
                args.flush_interval
            ),
            "give the longest time verified WAL may wait before it is stored, e.g. 1 or 0.2",
        ));
    }
    let mut archive_options = pgrepo::WalArchiveOptions::default();
    archive_options.compression =
        parse_wal_compression(args.compress.as_deref().unwrap_or("zstd"))?;
    archive_options.flush_interval = Duration::from_secs_f64(args.flush_interval);
    if let Some(bytes) = args.flush_bytes {
        if bytes == 0 {
            return Err(pgrepo::Error::usage(
                "--flush-bytes 0 would store an empty piece",
                "give a number of bytes above 0",
            ));
        }
        archive_options.flush_bytes = bytes;
    }
    archive_options.synchronous = args.synchronous;
    let archive = pgrepo::RepoWal::new(repo.clone(), archive_options);

    let mut options = walstream::ReceiveOptions::new("");
    options.slot = args.slot.clone();
    options.create_slot = args.create_slot;
    options.synchronous = args.synchronous;
    options.no_loop = args.no_loop;
    options.verify_records = !args.no_verify;
    let parse_lsn = |text: &str, option: &str| {
        text.parse::<pgwire_repl::Lsn>().map_err(|e| {
            pgrepo::Error::usage(
                format!("{option} {text:?} is not an LSN: {e}"),
                "write it as PostgreSQL does, e.g. 0/3000000",
            )
        })
    };
    if let Some(endpos) = &args.endpos {
        options.endpos = Some(parse_lsn(endpos, "--endpos")?);
    }
    if let Some(start) = &args.start_lsn {
        options.start_position = Some(parse_lsn(start, "--start-lsn")?);
    }
    let shutdown = async {
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                Some(()) = async { match term.as_mut() { Some(t) => t.recv().await, None => None } } => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    };
    let result = walstream::receive_wal_into(&config, &options, archive.clone(), shutdown).await;
    if let Err(e) = archive.release().await {
        eprintln!("clone-standby: could not release the receiver lease (it expires on its own in 30 s): {e}");
    }
    match result {
        Ok(summary) => {
            eprintln!(
                "clone-standby: stopped ({}) at {} on timeline {}: stored up to {} in {}, {} bytes received, {} segments completed, {} reconnects",
                summary.end_reason,
                summary.written,
                summary.timeline,
                summary.flushed,
                repo.url(),
                summary.bytes_received,
                archive.segments_completed(),
                summary.reconnects
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!(
                "clone-standby: receive-wal failed: {e}\n  the archive in {} holds every WAL byte acknowledged to the server; starting the receiver again resumes from it",
                repo.url()
            );
            Ok(ExitCode::FAILURE)
        }
    }
}
