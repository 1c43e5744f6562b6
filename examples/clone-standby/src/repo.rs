//! The object-storage commands: `backup`, `list`, `verify --repo`, `restore`, `wal-fetch`
//! and `delete`.

use std::io::{IsTerminal, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgrepo::{
    Compression, DownloadOptions, RepoBackupOptions, Repository, RestoreOptions, Secret,
    StoreOptions, UploadOptions,
};
use standby::start::{StartOptions, DEFAULT_START_WAIT};

/// How to reach the object store. Unset options come from --store-config, then from
/// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION,
/// AWS_ENDPOINT_URL and AWS_ALLOW_HTTP, as the AWS CLI reads them.
#[derive(clap::Args, Debug)]
pub struct StoreArgs {
    /// The repository: s3://BUCKET/PREFIX (or file:///PATH); or "repo" in --store-config.
    #[arg(long)]
    pub repo: Option<String>,
    /// A JSON file (mode 0600, refused when group or others can read it) holding the
    /// repository and how to reach it: {"repo", "endpoint", "region", "access_key_id",
    /// "secret_access_key", "session_token", "allow_http"}. `restore` writes one for its
    /// restore_command, whose environment has no AWS_* variables.
    #[arg(long)]
    pub store_config: Option<PathBuf>,
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

/// The name of the store configuration `restore` writes into the data directory.
pub const STORE_CONFIG_NAME: &str = "pgrepo-store.json";

/// The contents of a --store-config file.
#[derive(Debug, Default)]
struct StoreConfigFile {
    repo: Option<String>,
    endpoint: Option<String>,
    region: Option<String>,
    access_key_id: Option<String>,
    secret_access_key: Option<Secret>,
    session_token: Option<Secret>,
    allow_http: Option<bool>,
}

impl StoreConfigFile {
    /// Reads `path`, refusing a file that group or others may read (as libpq refuses
    /// such a ~/.pgpass): it holds a secret.
    fn read(path: &Path) -> pgrepo::Result<StoreConfigFile> {
        let meta = std::fs::metadata(path)
            .map_err(|e| pgrepo::Error::io("reading the store configuration", path, e))?;
        if !meta.is_file() {
            return Err(pgrepo::Error::usage(
                format!("the store configuration {} is not a file", path.display()),
                "name the JSON file --store-config should read",
            ));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(pgrepo::Error::unsafe_op(
                format!(
                    "the store configuration {} has mode {mode:04o}: group or others can read the secret in it",
                    path.display()
                ),
                format!("make it readable by its owner only: chmod 0600 {}", path.display()),
            ));
        }
        let text = std::fs::read(path)
            .map_err(|e| pgrepo::Error::io("reading the store configuration", path, e))?;
        let bad = |why: String| {
            pgrepo::Error::usage(
                format!("the store configuration {} {why}", path.display()),
                "write it as {\"repo\": \"s3://BUCKET/PREFIX\", \"endpoint\": …, \"region\": …, \"access_key_id\": …, \"secret_access_key\": …, \"session_token\": …, \"allow_http\": false}",
            )
        };
        let value: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| bad(format!("is not JSON: {e}")))?;
        let object = value
            .as_object()
            .ok_or_else(|| bad("is not a JSON object".into()))?;
        let mut config = StoreConfigFile::default();
        for (key, value) in object {
            let text = || -> pgrepo::Result<Option<String>> {
                match value {
                    serde_json::Value::Null => Ok(None),
                    serde_json::Value::String(s) => Ok(Some(s.clone())),
                    _ => Err(bad(format!("has a non-string {key:?}"))),
                }
            };
            match key.as_str() {
                "repo" => config.repo = text()?,
                "endpoint" => config.endpoint = text()?,
                "region" => config.region = text()?,
                "access_key_id" => config.access_key_id = text()?,
                "secret_access_key" => config.secret_access_key = text()?.map(Secret::new),
                "session_token" => config.session_token = text()?.map(Secret::new),
                "allow_http" => {
                    config.allow_http = match value {
                        serde_json::Value::Null => None,
                        serde_json::Value::Bool(b) => Some(*b),
                        _ => return Err(bad("has a non-boolean \"allow_http\"".into())),
                    }
                }
                "format" => {}
                other => return Err(bad(format!("has an unknown key {other:?}"))),
            }
        }
        Ok(config)
    }
}

fn env_value(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl StoreArgs {
    /// The repository URL and the store options: the command line first, then the
    /// --store-config file (the standard variables fill the rest when the store opens).
    fn resolve(&self) -> pgrepo::Result<(String, StoreOptions)> {
        let read_secret = |path: &PathBuf| -> pgrepo::Result<Secret> {
            let text = std::fs::read_to_string(path)
                .map_err(|e| pgrepo::Error::io("reading the secret in", path, e))?;
            Ok(Secret::new(text.trim_end_matches(['\n', '\r'])))
        };
        let file = match &self.store_config {
            Some(path) => StoreConfigFile::read(path)?,
            None => StoreConfigFile::default(),
        };
        let repo = self.repo.clone().or(file.repo).ok_or_else(|| {
            pgrepo::Error::usage(
                "no repository: neither --repo nor a \"repo\" in --store-config",
                "name the repository with --repo s3://BUCKET/PREFIX",
            )
        })?;
        let options = StoreOptions {
            access_key_id: self.access_key_id.clone().or(file.access_key_id),
            secret_access_key: self
                .secret_access_key_file
                .as_ref()
                .map(read_secret)
                .transpose()?
                .or(file.secret_access_key),
            session_token: self
                .session_token_file
                .as_ref()
                .map(read_secret)
                .transpose()?
                .or(file.session_token),
            region: self.region.clone().or(file.region),
            endpoint: self.endpoint.clone().or(file.endpoint),
            allow_http: self.allow_http.then_some(true).or(file.allow_http),
            ..StoreOptions::default()
        };
        Ok((repo, options))
    }

    fn open(&self) -> pgrepo::Result<Repository> {
        let (repo, options) = self.resolve()?;
        Repository::open(&repo, &options)
    }

    /// Everything needed to reach the store without this process's environment, as the
    /// JSON of a --store-config file: the options, else the AWS_* variables.
    fn config_json(&self) -> pgrepo::Result<serde_json::Value> {
        let (repo, options) = self.resolve()?;
        let allow_http = options.allow_http.or_else(|| {
            env_value("AWS_ALLOW_HTTP")
                .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        });
        Ok(serde_json::json!({
            "repo": repo,
            "endpoint": options.endpoint.or_else(|| env_value("AWS_ENDPOINT_URL")),
            "region": options.region.or_else(|| env_value("AWS_REGION")).or_else(|| env_value("AWS_DEFAULT_REGION")),
            "access_key_id": options.access_key_id.or_else(|| env_value("AWS_ACCESS_KEY_ID")),
            "secret_access_key": options.secret_access_key.map(|s| s.expose().to_string()).or_else(|| env_value("AWS_SECRET_ACCESS_KEY")),
            "session_token": options.session_token.map(|s| s.expose().to_string()).or_else(|| env_value("AWS_SESSION_TOKEN")),
            "allow_http": allow_http,
        }))
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
    /// are kept; for an incremental backup, also files unchanged since an older backup of
    /// its chain). On failure the directory is left inconsistent: restore it again.
    #[arg(long)]
    pub delta: bool,
    /// Recover up to this LSN from the repository's WAL archive, then act as
    /// --target-action says (recovery_target_lsn).
    #[arg(long, conflicts_with_all = ["target_time", "standby"])]
    pub target_lsn: Option<String>,
    /// Recover up to this time (recovery_target_time, as PostgreSQL reads it, e.g.
    /// "2026-11-30 10:15:00+00").
    #[arg(long, conflicts_with = "standby")]
    pub target_time: Option<String>,
    /// What the server does at the target: promote (default), pause or shutdown.
    #[arg(long, value_parser = ["pause", "promote", "shutdown"])]
    pub target_action: Option<String>,
    /// Write no restore_command (and no store configuration with the store's
    /// credentials) even though the repository holds a WAL archive.
    #[arg(long, conflicts_with_all = ["target_lsn", "target_time"])]
    pub no_restore_command: bool,
}

/// `wal-fetch`.
#[derive(clap::Args, Debug)]
pub struct WalFetchArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Serve a segment that has only partial pieces, as far as they go, zero-padded (for
    /// recovery to the very end of the archive; not for a standby, which streams). Any
    /// failure other than a missing file then exits 126, which makes PostgreSQL stop
    /// recovery instead of ending it early at a damaged or unreachable segment.
    #[arg(long)]
    pub partial: bool,
    /// Complete segments fetched ahead into the cache.
    #[arg(long, default_value_t = pgrepo::walfetch::DEFAULT_PREFETCH)]
    pub prefetch: usize,
    /// The prefetch cache (default: pgrepo-prefetch in DEST's directory, inside pg_wal).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// The file to fetch (%f): a WAL segment name or TTTTTTTT.history.
    pub file: String,
    /// Where to write it (%p).
    pub dest: PathBuf,
}

/// `delete`.
#[derive(clap::Args, Debug)]
pub struct DeleteArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Keep the newest N backups (and their parents).
    #[arg(long, required_unless_present = "before", conflicts_with = "before")]
    pub retain: Option<usize>,
    /// Keep the backups started at or after TIME (RFC 3339, e.g. 2026-11-30T10:15:00Z,
    /// or a label-style 20261130T101500Z), and their parents.
    #[arg(long)]
    pub before: Option<String>,
    /// Say what would be deleted, delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
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
    // Checked before anything is written.
    let target = recovery_target(&args)?;
    let wal_archive = !args.no_restore_command
        && pgrepo::walfetch::archive_segment_size(&repo)
            .await?
            .is_some();
    if !target.is_empty() && !wal_archive {
        return Err(pgrepo::Error::usage(
            format!(
                "repository {} has no WAL archive (wal/archive.json), so there is no WAL to recover to a target with",
                repo.url()
            ),
            "stream WAL into the repository with `clone-standby receive-wal --repo`, or restore without a target",
        ));
    }
    let store_config = if wal_archive {
        Some(args.store.config_json()?)
    } else {
        None
    };
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
    let configured = (|| -> std::io::Result<Option<PathBuf>> {
        if let (true, Some(source)) = (args.standby, source.as_ref()) {
            let conninfo = standby::recovery::primary_conninfo(source, record.server_major);
            standby::recovery::write_standby_config(&args.pgdata, &conninfo, args.slot.as_deref())?;
        }
        match &store_config {
            Some(config) => write_wal_recovery(&args, config, &target).map(Some),
            None => Ok(None),
        }
    })();
    let store_config_path = match configured {
        Ok(path) => path,
        Err(e) => {
            let left = if args.delta {
                "the data directory was left as restored, without a complete recovery configuration"
                    .to_string()
            } else {
                match std::fs::remove_dir_all(&args.pgdata) {
                    Ok(()) => "the restored data directory was removed".to_string(),
                    Err(r) => format!("the restored data directory could not be removed ({r}): remove it before using it"),
                }
            };
            return Err(pgrepo::Error::io(
                "writing the recovery configuration into",
                &args.pgdata,
                e,
            )
            .context(left));
        }
    };
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
        match &store_config_path {
            Some(path) => println!(
                "clone-standby: restore_command fetches WAL from {} (wal-fetch{}), reaching the store with {} (mode 0600: it holds the store's credentials, as pg_basebackup -R writes a password into primary_conninfo; it is copied with the data directory){}",
                repo.url(),
                if args.standby { "" } else { " --partial, to the very end of the archive" },
                path.display(),
                if target.is_empty() {
                    String::new()
                } else {
                    format!("; recovery stops at {}", target.iter().map(|(k, v)| format!("{k} = '{v}'")).collect::<Vec<_>>().join(", "))
                }
            ),
            None if args.no_restore_command => {
                println!("clone-standby: no restore_command was written (--no-restore-command)")
            }
            None => println!(
                "clone-standby: {} has no WAL archive, so no restore_command was written",
                repo.url()
            ),
        }
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
                "store_config": store_config_path,
                "recovery_target": target.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(v.clone()))).collect::<serde_json::Map<_, _>>(),
            })
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The `recovery_target_*` settings of --target-lsn / --target-time / --target-action.
fn recovery_target(args: &RestoreArgs) -> pgrepo::Result<Vec<(&'static str, String)>> {
    let mut settings = Vec::new();
    if let Some(lsn) = &args.target_lsn {
        let parsed: pgwire_repl::Lsn = lsn.parse()?;
        settings.push(("recovery_target_lsn", parsed.to_string()));
    }
    if let Some(time) = &args.target_time {
        if time.trim().is_empty() {
            return Err(pgrepo::Error::usage(
                "--target-time is empty",
                "give a time as PostgreSQL reads it, e.g. \"2026-11-30 10:15:00+00\"",
            ));
        }
        settings.push(("recovery_target_time", time.clone()));
    }
    match (&args.target_action, settings.is_empty()) {
        (Some(_), true) => {
            return Err(pgrepo::Error::usage(
                "--target-action needs --target-lsn or --target-time",
                "name the point to recover to",
            ))
        }
        (action, false) => settings.push((
            "recovery_target_action",
            action.clone().unwrap_or_else(|| "promote".into()),
        )),
        (None, true) => {}
    }
    Ok(settings)
}

/// Quotes a word for the shell that runs restore_command (`sh -c`).
fn shell_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:,@".contains(&b))
    {
        return word.to_string();
    }
    format!("'{}'", word.replace('\'', "'\\''"))
}

/// The restore_command value: this binary's `wal-fetch`, quoted for the shell, with `%`
/// doubled where PostgreSQL would take it for a placeholder.
fn restore_command_value(bin: &Path, store_config: &Path, partial: bool) -> String {
    let escape = |p: &Path| shell_quote(&p.to_string_lossy()).replace('%', "%%");
    format!(
        "{} wal-fetch --store-config {}{} %f %p",
        escape(bin),
        escape(store_config),
        if partial { " --partial" } else { "" }
    )
}

/// Writes the store configuration (0600) into the data directory and the recovery
/// settings that use it; returns the configuration's path.
fn write_wal_recovery(
    args: &RestoreArgs,
    config: &serde_json::Value,
    target: &[(&'static str, String)],
) -> std::io::Result<PathBuf> {
    let pgdata = std::fs::canonicalize(&args.pgdata)?;
    let path = pgdata.join(STORE_CONFIG_NAME);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    file.write_all(format!("{config:#}\n").as_bytes())?;
    file.sync_all()?;
    let bin = std::env::current_exe()?;
    let command = restore_command_value(&bin, &path, !args.standby);
    let mut settings: Vec<(&str, &str)> = vec![("restore_command", command.as_str())];
    settings.extend(target.iter().map(|(k, v)| (*k, v.as_str())));
    if args.standby {
        standby::recovery::append_auto_conf(
            &args.pgdata,
            &standby::recovery::settings_lines(&settings),
        )?;
    } else {
        standby::recovery::write_recovery_config(&args.pgdata, &settings)?;
    }
    Ok(path)
}

/// `wal-fetch`: exit 0 with the file written, 1 when the repository lacks it, 2 (126
/// with --partial) on any other failure.
pub async fn run_wal_fetch(args: WalFetchArgs) -> pgrepo::Result<ExitCode> {
    let options = pgrepo::walfetch::FetchOptions {
        partial: args.partial,
        prefetch: args.prefetch,
        cache_dir: args.cache.clone(),
        ..Default::default()
    };
    let result = async {
        let repo = args.store.open()?;
        pgrepo::walfetch::fetch_wal_file(&repo, &args.file, &args.dest, &options).await
    }
    .await;
    match result {
        // Quiet on success and for a missing file: PostgreSQL asks for files that do not
        // exist yet all the time, and logs this command's output.
        Ok(pgrepo::walfetch::FetchOutcome::Missing) => Ok(ExitCode::from(1)),
        Ok(_) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            // Not 1: the file may exist but could not be fetched or did not verify. A
            // standby (no --partial) then streams and asks again later: 2. Recovery
            // from the archive alone (--partial) must not end early and promote at the
            // failure: above 125, which PostgreSQL treats as fatal, so it stops and
            // resumes from there when started again.
            eprintln!("clone-standby wal-fetch {}: {e}", args.file);
            if args.partial {
                eprintln!("clone-standby wal-fetch: exiting 126 so that recovery stops here rather than ending early; fix the cause and start the server again");
                Ok(ExitCode::from(126))
            } else {
                Ok(ExitCode::from(2))
            }
        }
    }
}

/// `delete`: retention, or with --dry-run the list of what it would delete.
pub async fn run_delete(args: DeleteArgs) -> pgrepo::Result<ExitCode> {
    use pgrepo::retention::{apply_retention, plan_retention, RetentionRule};
    let rule = match (args.retain, &args.before) {
        (Some(n), _) => RetentionRule::Retain(n),
        (None, Some(time)) => RetentionRule::Before(pgrepo::retention::parse_time(time)?),
        (None, None) => {
            return Err(pgrepo::Error::usage(
                "delete needs --retain N or --before TIME",
                "say which backups to keep",
            ))
        }
    };
    let repo = args.store.open()?;
    let plan = plan_retention(&repo, rule).await?;
    let summary = if args.dry_run {
        None
    } else {
        Some(apply_retention(&repo, &plan).await?)
    };
    if args.json {
        println!(
            "{:#}",
            serde_json::json!({
                "repository": repo.url().to_string(),
                "dry_run": args.dry_run,
                "kept": plan.keep,
                "deleted_backups": plan.delete,
                "wal_below_segment": plan.wal_below_name,
                "wal_objects": plan.wal_objects,
                "backup_objects_deleted": summary.as_ref().map(|s| s.backup_objects_deleted),
                "wal_objects_deleted": summary.as_ref().map(|s| s.wal_objects_deleted),
            })
        );
        return Ok(ExitCode::SUCCESS);
    }
    let verb = if args.dry_run {
        "would delete"
    } else {
        "deleted"
    };
    for label in &plan.delete {
        println!("clone-standby: {verb} backup {label}");
    }
    for object in &plan.wal_objects {
        println!("clone-standby: {verb} {object}");
    }
    println!(
        "clone-standby: {} {} backups and {} WAL objects{}; kept {} backups ({}){}",
        verb,
        plan.delete.len(),
        plan.wal_objects.len(),
        match &plan.wal_below_name {
            Some(name) => format!(" (every segment below {name}, on every timeline)"),
            None => " (no WAL: no committed backup is kept, or there is no WAL archive)".into(),
        },
        plan.keep.len(),
        plan.keep.join(", "),
        if args.dry_run {
            "; nothing was deleted (--dry-run)"
        } else {
            ""
        }
    );
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
    pub connection: crate::ReceiverConnectionArgs,
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
        parse_wal_compression(args.compress.as_deref().unwrap_or("zstd:1"))?;
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
    args.connection
        .apply(&mut options)
        .map_err(|e| pgrepo::Error::usage(e, "give a number of seconds, e.g. 5"))?;
    let shutdown = crate::interrupted();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_command_is_quoted_for_the_shell_and_for_placeholders() {
        assert_eq!(
            shell_quote("/usr/bin/clone-standby"),
            "/usr/bin/clone-standby"
        );
        assert_eq!(shell_quote("/srv/my data/x"), "'/srv/my data/x'");
        assert_eq!(shell_quote("/srv/it's"), r"'/srv/it'\''s'");
        let value = restore_command_value(
            Path::new("/opt/bin/clone-standby"),
            Path::new("/srv/100% pg/pgrepo-store.json"),
            true,
        );
        assert_eq!(
            value,
            "/opt/bin/clone-standby wal-fetch --store-config '/srv/100%% pg/pgrepo-store.json' --partial %f %p"
        );
        // And quoted once more for postgresql.auto.conf.
        let line = standby::recovery::settings_lines(&[("restore_command", "a 'b' %f")]);
        assert!(line.ends_with("restore_command = 'a ''b'' %f'\n"), "{line}");
    }
}
