//! PostgreSQL base backups in object storage: push, list, verify and restore, with every
//! byte verified on the way in and on the way out.
//!
//! A repository is a prefix in an object store, named by a URL (`s3://bucket/prefix`,
//! `file:///path`; `gs://` and `az://` with the `gcp` and `azure` features), reached
//! through the [`object_store`] crate with the standard `AWS_*` variables
//! ([`StoreOptions`]). Its layout is documented in [`layout`].
//!
//! - [`backup_to_repository`] streams `BASE_BACKUP` straight into multipart uploads
//!   (no local staging), verifies the manifest and the WAL while uploading, and writes
//!   the commit record last: a backup exists complete and verified, or not at all.
//! - [`Repository::backups`] lists the committed backups.
//! - [`verify_backup`] re-reads a backup from the store and checks it as
//!   `pg_verifybackup` would.
//! - [`restore_backup`] downloads in parallel and writes a data directory through the
//!   same verifying pipeline as a live backup; with [`RestoreOptions::delta`] it brings
//!   an existing data directory of the cluster up to the backup, fetching only the
//!   frames ([`layout::ArchiveIndex`]) that hold files whose local copy differs.
//!
//! ```no_run
//! # async fn demo() -> pgrepo::Result<()> {
//! use pgrepo::{Repository, StoreOptions};
//! let repo = Repository::open("s3://backups/db1", &StoreOptions::default())?;
//! let source = pgwire_repl::Config::parse_with_env("host=primary user=replicator")?;
//! let done = pgrepo::backup_to_repository(&source, &repo, Default::default(), None).await?;
//! let checked = pgrepo::verify_backup(&repo, &done.record.label, Default::default()).await?;
//! println!("{} files verified", checked.files);
//! # Ok(()) }
//! ```

mod backup;
mod chain;
mod delta;
mod error;
pub mod layout;
pub mod lease;
mod repository;
mod restore;
pub mod retention;
mod store;
pub mod tarindex;
mod upload;
pub mod walarchive;
pub mod walcheck;
pub mod walfetch;
pub mod walnames;

pub use backup::{
    backup_to_repository, backup_with_counter, Compression, RepoBackupOptions, RepoBackupSummary,
};
pub use chain::{check_descends, check_links, load_chain};
pub use error::{Error, ErrorKind, Result};
pub use layout::{ArchiveRecord, CommitRecord, RepositoryRecord, StoredCompression};
pub use repository::Repository;
pub use restore::{
    restore_backup, verify_backup, verify_chain, DownloadOptions, ReadSummary, RestoreOptions,
};
pub use store::{RepoUrl, Scheme, Secret, StoreOptions};
pub use upload::{UploadOptions, MIN_PART_SIZE};
pub use walarchive::{RepoWal, RepoWalWriter, WalArchiveOptions, WalCompression};
