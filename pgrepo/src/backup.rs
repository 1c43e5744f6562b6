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
}

impl Default for RepoBackupOptions {
    fn default() -> RepoBackupOptions {
        RepoBackupOptions {
            label: None,
            compression: Compression::Client(StoredCompression::Zstd, None),
            checkpoint: basebackup::Checkpoint::Fast,
            max_rate: None,
            upload: UploadOptions::default(),
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
        ..BackupOptions::default()
    };
    let backup = BaseBackup::start(client, backup_options).await?;
    let sink = RepoSink::new(
        repo.clone(),
        label,
        system.system_id.0,
        client_compression,
        options.upload,
        uploaded,
    );
    let (_, sink) = backup.receive_async(sink, progress).await?;
    let record = sink.committed.ok_or_else(|| {
        Error::usage(
            "the backup ended without a commit record",
            "report this as a bug",
        )
    })?;
    Ok(RepoBackupSummary { record })
}
