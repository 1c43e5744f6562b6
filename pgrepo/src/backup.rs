//! Taking a backup into a repository.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use basebackup::{BackupOptions, BaseBackup, ManifestMode, ProgressFn, ServerCompression};
use pgwire_repl::client::SlotOptions;
use pgwire_repl::{Config, ReplicationClient};

use crate::error::{Error, Result};
use crate::layout::{check_label, default_label, CommitRecord, StoredCompression};
use crate::repository::Repository;
use crate::upload::{RepoSink, UploadOptions};
use sha2::Digest;

/// Where the archives are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Stored as plain tar.
    None,
    /// The server compresses (PostgreSQL 15+, and only the methods its build has); the
    /// archives are stored exactly as they arrive.
    Server(basebackup::CompressionMethod, Option<i32>),
    /// This process compresses what the server sends uncompressed (any version).
    Client(StoredCompression, Option<i32>),
    /// The server on PostgreSQL 15+, this process on older servers.
    Auto(StoredCompression, Option<i32>),
}

impl Compression {
    /// Parses `none`, `[server-|client-]METHOD[:LEVEL]` (METHOD: `zstd`, `lz4`, `gzip`).
    /// A bare method means the server compresses on 15+ servers, this process on older
    /// ones.
    ///
    /// ```
    /// use pgrepo::Compression;
    /// assert_eq!(Compression::parse("none").unwrap(), Compression::None);
    /// assert!(matches!(Compression::parse("client-zstd:3").unwrap(), Compression::Client(_, Some(3))));
    /// assert!(matches!(Compression::parse("lz4").unwrap(), Compression::Auto(_, None)));
    /// assert!(matches!(Compression::parse("server-lz4").unwrap(), Compression::Server(_, None)));
    /// assert!(Compression::parse("bzip2").is_err());
    /// ```
    pub fn parse(value: &str) -> Result<Compression> {
        if value == "none" {
            return Ok(Compression::None);
        }
        let (place, rest) = if let Some(rest) = value.strip_prefix("server-") {
            ("server", rest)
        } else if let Some(rest) = value.strip_prefix("client-") {
            ("client", rest)
        } else {
            ("auto", value)
        };
        let (method, level) = match rest.split_once(':') {
            Some((m, l)) => {
                let level = l
                    .strip_prefix("level=")
                    .unwrap_or(l)
                    .parse::<i32>()
                    .map_err(|_| {
                        Error::usage(
                            format!("compression level {l:?} is not a number"),
                            "write METHOD:LEVEL, for example zstd:3",
                        )
                    })?;
                (m, Some(level))
            }
            None => (rest, None),
        };
        let stored =
            match method {
                "zstd" => StoredCompression::Zstd,
                "lz4" => StoredCompression::Lz4,
                "gzip" => StoredCompression::Gzip,
                other => return Err(Error::usage(
                    format!("unknown compression method {other:?}"),
                    "use none, zstd, lz4 or gzip, optionally with server- or client- and :LEVEL",
                )),
            };
        Ok(match place {
            "client" => Compression::Client(stored, level),
            "auto" => Compression::Auto(stored, level),
            _ => Compression::Server(
                stored
                    .method()
                    .unwrap_or(basebackup::CompressionMethod::Zstd),
                level,
            ),
        })
    }
}

/// Options of [`backup_to_repository`].
#[derive(Debug, Clone)]
pub struct RepoBackupOptions {
    /// The label (default: the UTC start time, `20261130T101500Z`).
    pub label: Option<String>,
    /// Compression (default: zstd on the client, which works on every server).
    pub compression: Compression,
    /// The checkpoint before the backup (default fast).
    pub checkpoint: basebackup::Checkpoint,
    /// Throttle the server, in kB/s.
    pub max_rate: Option<u32>,
    /// Multipart upload settings.
    pub upload: UploadOptions,
    /// Take an incremental backup (PostgreSQL 17+, `summarize_wal = on`) on top of this
    /// committed backup (a label, or `latest`): only what changed since it is sent.
    pub incremental_from: Option<String>,
}

impl Default for RepoBackupOptions {
    fn default() -> RepoBackupOptions {
        RepoBackupOptions {
            label: None,
            compression: Compression::Client(StoredCompression::Zstd, None),
            checkpoint: basebackup::Checkpoint::Fast,
            max_rate: None,
            upload: UploadOptions::default(),
            incremental_from: None,
        }
    }
}

/// A finished backup.
#[derive(Debug, Clone)]
pub struct RepoBackupSummary {
    /// Its commit record, as stored.
    pub record: CommitRecord,
}

/// Takes a base backup of the server `source` into `repo`, verified while it uploads.
///
/// The archives stream from `BASE_BACKUP` straight into multipart uploads (no local
/// staging). The manifest is checked on the decompressed bytes as they pass; the WAL the
/// backup needs travels in its base archive (`pg_wal/`, as `pg_basebackup -X fetch`),
/// held on the server by a temporary slot for the duration, and every record of it is
/// CRC-checked. Only then are the manifest and, last, the commit record written. Any
/// failure aborts the uploads and deletes what was stored: a backup either exists
/// complete and verified, or not at all.
///
/// ```no_run
/// # async fn demo() -> pgrepo::Result<()> {
/// let source = pgwire_repl::Config::parse_with_env("host=primary user=replicator")?;
/// let repo = pgrepo::Repository::open("s3://backups/db1", &pgrepo::StoreOptions::default())?;
/// let done = pgrepo::backup_to_repository(&source, &repo, pgrepo::RepoBackupOptions::default(), None).await?;
/// println!("{} committed, consistent at {}", done.record.label, done.record.end_lsn);
/// # Ok(()) }
/// ```
pub async fn backup_to_repository(
    source: &Config,
    repo: &Repository,
    options: RepoBackupOptions,
    progress: Option<ProgressFn>,
) -> Result<RepoBackupSummary> {
    backup_with_counter(source, repo, options, progress, Arc::new(AtomicU64::new(0))).await
}

/// [`backup_to_repository`], with `uploaded` counting the bytes the store acknowledged.
pub async fn backup_with_counter(
    source: &Config,
    repo: &Repository,
    options: RepoBackupOptions,
    progress: Option<ProgressFn>,
    uploaded: Arc<AtomicU64>,
) -> Result<RepoBackupSummary> {
    let label = match options.label {
        Some(label) => label,
        None => default_label(chrono::Utc::now()),
    };
    check_label(&label)?;
    let mut client = ReplicationClient::connect(source).await?;
    let system = client.identify_system().await?;
    let major = client.server_major();
    repo.ensure_system(system.system_id.0).await?;
    if repo.label_taken(&label).await? {
        return Err(Error::unsafe_op(
            format!(
                "repository {} already has objects for backup {label:?}",
                repo.url()
            ),
            "choose another --label (labels are never reused)",
        ));
    }
    let parent = match &options.incremental_from {
        Some(from) => Some(upload_parent_manifest(&mut client, repo, from, major).await?),
        None => None,
    };
    // Keeps the WAL from the backup's start on the server until the backup ends; it
    // goes away with the connection.
    let slot = format!("pgrepo_{}", std::process::id());
    client
        .create_physical_slot(
            &slot,
            SlotOptions {
                temporary: true,
                reserve_wal: true,
            },
        )
        .await?;
    let compression = match options.compression {
        Compression::Auto(method, level) if major >= 15 => Compression::Server(
            method
                .method()
                .unwrap_or(basebackup::CompressionMethod::Zstd),
            level,
        ),
        Compression::Auto(method, level) => Compression::Client(method, level),
        other => other,
    };
    let (server_compression, client_compression) = match compression {
        Compression::None => (None, (StoredCompression::None, None)),
        Compression::Client(method, level) | Compression::Auto(method, level) => {
            (None, (method, level))
        }
        Compression::Server(method, level) => {
            if major < 15 {
                return Err(Error::usage(
                    format!("server-side compression needs PostgreSQL 15 or later; this server is {major}"),
                    "use --compress client-zstd (or none)",
                ));
            }
            let mut compression = ServerCompression::new(method);
            compression.level = level;
            (Some(compression), (StoredCompression::None, None))
        }
    };
    let backup_options = BackupOptions {
        label: format!("pgrepo {label}"),
        progress: true,
        checkpoint: options.checkpoint,
        wal: true,
        max_rate: options.max_rate,
        manifest: ManifestMode::Yes,
        compression: server_compression,
        incremental: parent.is_some(),
        ..BackupOptions::default()
    };
    let backup = match BaseBackup::start(client, backup_options).await {
        Ok(backup) => backup,
        Err(e) if parent.is_some() => return Err(explain_incremental_failure(e.into())),
        Err(e) => return Err(e.into()),
    };
    let sink = RepoSink::new(
        repo.clone(),
        label,
        system.system_id.0,
        client_compression,
        options.upload,
        uploaded,
    )
    .parent(parent);
    let (_, sink) = backup.receive_async(sink, progress).await?;
    let record = sink.committed.ok_or_else(|| {
        Error::usage(
            "the backup ended without a commit record",
            "report this as a bug",
        )
    })?;
    Ok(RepoBackupSummary { record })
}

/// Checks the parent backup and sends its manifest with UPLOAD_MANIFEST; returns its
/// label.
async fn upload_parent_manifest(
    client: &mut ReplicationClient,
    repo: &Repository,
    from: &str,
    major: u32,
) -> Result<String> {
    if major < 17 {
        return Err(Error::usage(
            format!("incremental backups need PostgreSQL 17 or later; this server is {major}"),
            "take a full backup (leave out --incremental)",
        ));
    }
    let summarize = client.show("summarize_wal").await?;
    if summarize != "on" {
        return Err(Error::usage(
            format!("the server has summarize_wal = {summarize}, and incremental backups need WAL summaries"),
            "set summarize_wal = on (ALTER SYSTEM SET summarize_wal = on; SELECT pg_reload_conf()), \
             then take a full backup: an incremental one needs summaries from its parent's start onwards",
        ));
    }
    let parent = repo.backup(from).await?;
    let manifest_path = repo.backup_path(&parent.label, crate::layout::MANIFEST);
    let manifest = repo
        .get_bytes(&manifest_path, parent.manifest_bytes)
        .await?;
    let digest = sha2::Sha256::digest(&manifest);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    if manifest.len() as u64 != parent.manifest_bytes || hex != parent.manifest_sha256 {
        return Err(Error::verify(
            repo.describe(&manifest_path),
            "does not match the size and SHA-256 its commit record names",
        ));
    }
    client
        .upload_manifest(&manifest)
        .await
        .map_err(|e| explain_incremental_failure(e.into()))?;
    Ok(parent.label)
}

/// Adds what to do to the server's refusals of an incremental backup.
fn explain_incremental_failure(error: Error) -> Error {
    let text = error.to_string();
    if text.contains("summar") {
        return Error::usage(
            format!("the server cannot take an incremental backup on top of this parent: {}", error.message()),
            "the WAL summaries since the parent's start are missing (expired after wal_summary_keep_time, \
             or summarize_wal was off for a while): take a full backup, then incremental ones on top of it",
        );
    }
    if text.contains("manifest") {
        return Error::usage(
            format!("the server refused the parent's manifest: {}", error.message()),
            "the parent must be a backup of this very cluster and timeline history; take a full backup",
        );
    }
    error
}
