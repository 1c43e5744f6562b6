//! Streams `BASE_BACKUP` from PostgreSQL 13–18 into a data directory or tar archives,
//! verifying the backup manifest while writing.
//!
//! Layers, bottom to top:
//! - [`command`]: the `BASE_BACKUP` text for each server version (pure);
//! - [`demux`]: the 15+ CopyData sub-messages (pure);
//! - [`protocol`]: the state machine of the `BASE_BACKUP` response, both framings (pure);
//! - [`tar`]: an incremental tar parser with the safety checks (pure);
//! - [`manifest`]: `backup_manifest` parsing, its SHA-256, per-file checksums (pure);
//! - [`sink`]: the [`BackupSink`] trait, [`PlainDirSink`] and [`TarSink`];
//! - [`async_sink`]: the [`AsyncBackupSink`] trait for asynchronous destinations;
//! - [`BaseBackup`]: the async driver, a thin loop over [`protocol::BackupResponse`]; a
//!   writer thread does decompression, parsing, checksums and disk writes, fed through a
//!   bounded channel;
//! - [`verify_backup`] and [`verify_backup_async`]: pg_verifybackup's checks on an
//!   existing backup.
//!
//! Errors are one opaque [`Error`] with a [`kind`](Error::kind),
//! [`db_error`](Error::db_error) (the server's SQLSTATE, detail and hint) and
//! [`is_retryable`](Error::is_retryable).
//!
//! ```no_run
//! # async fn demo() -> basebackup::Result<()> {
//! use basebackup::{BackupOptions, BaseBackup, PlainDirSink};
//! let config = pgwire_repl::Config::parse_with_env("host=primary user=replicator")?;
//! let client = pgwire_repl::ReplicationClient::connect(&config).await?;
//! let backup = BaseBackup::start(client, BackupOptions::default().wal(true)).await?;
//! println!("start {} timeline {}", backup.start_lsn(), backup.timeline());
//! let progress = Box::new(|p: &basebackup::Progress| {
//!     eprintln!("{} / {:?} bytes", p.bytes_done, p.total_estimate)
//! });
//! let (result, _sink) = backup.receive(PlainDirSink::new("/srv/standby"), Some(progress)).await?;
//! println!("end {} ({} files verified)", result.end_lsn, result.files);
//! # Ok(()) }
//! ```

pub mod async_sink;
mod backup;
pub mod command;
pub mod demux;
mod direct;
mod error;
pub mod incremental;
pub mod manifest;
mod pipeline;
pub mod protocol;
pub mod replay;
pub mod sink;
pub mod tar;
mod targets;
mod verify;

pub use async_sink::AsyncBackupSink;
pub use backup::{backup, BackupResult, BaseBackup, Progress, ProgressFn};
/// The byte buffers sinks are handed (zero-copy slices of the receive buffer).
pub use bytes::Bytes;
pub use command::{
    build_command, BackupOptions, Checkpoint, ChecksumAlgorithm, CompressionMethod, ManifestMode,
    ServerCompression, DEFAULT_IDLE_TIMEOUT,
};
pub use error::{Error, ErrorKind, Result};
pub use manifest::Manifest;
pub use protocol::{BackupEvent, BackupResponse};
pub use sink::{
    ArchiveInfo, BackupInfo, BackupSink, ClientCompression, PlainDirSink, SinkOptions, Tablespace,
    TablespaceMapping, TarSink, TarStreamSink,
};
pub use tar::TarEvent;
pub use targets::{plain_target_dirs, TargetDir};
pub use verify::{
    check_wal, verify_backup, verify_backup_async, verify_backup_with, VerifyOptions,
};
