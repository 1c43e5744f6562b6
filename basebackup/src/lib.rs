//! Streams `BASE_BACKUP` from PostgreSQL 13–18 into a data directory or tar archives,
//! verifying the backup manifest while writing.
//!
//! Layers, bottom to top:
//! - [`command`]: the `BASE_BACKUP` text for each server version (pure);
//! - [`demux`]: the 15+ CopyData sub-messages (pure);
//! - [`tar`]: an incremental tar parser with the safety checks (pure);
//! - [`manifest`]: `backup_manifest` parsing, its SHA-256, per-file checksums (pure);
//! - [`sink`]: the [`BackupSink`] trait, [`PlainDirSink`] and [`TarSink`];
//! - [`BaseBackup`]: the async driver; a writer thread does decompression, parsing,
//!   checksums and disk writes, fed through a bounded channel;
//! - [`verify_backup`]: pg_verifybackup's checks on an existing backup.
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
//! let result = backup.receive(Box::new(PlainDirSink::new("/srv/standby")), Some(progress)).await?;
//! println!("end {} ({} files verified)", result.end_lsn, result.files);
//! # Ok(()) }
//! ```

mod backup;
pub mod command;
pub mod demux;
mod direct;
mod error;
pub mod manifest;
mod pipeline;
pub mod sink;
pub mod tar;
mod targets;
mod verify;

pub use backup::{backup, BackupResult, BaseBackup, Progress, ProgressFn};
pub use command::{
    build_command, BackupOptions, Checkpoint, ChecksumAlgorithm, CompressionMethod, ManifestMode,
    ServerCompression, DEFAULT_IDLE_TIMEOUT,
};
pub use error::{Error, ErrorKind, Result};
pub use manifest::Manifest;
pub use sink::{
    ArchiveInfo, BackupInfo, BackupSink, PlainDirSink, SinkOptions, Tablespace, TablespaceMapping,
    TarSink,
};
pub use targets::{plain_target_dirs, TargetDir};
pub use verify::{check_wal, verify_backup, verify_backup_with, VerifyOptions};
