//! Reading a backup back: verification (nothing written) and restore (into a data
//! directory), both through the same verifying pipeline a live backup goes through.

use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use basebackup::replay::Replay;
use basebackup::{
    ArchiveInfo, BackupInfo, BackupSink, Bytes, Manifest, PlainDirSink, SinkOptions, Tablespace,
    TablespaceMapping, TarEvent,
};
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use sha2::Digest;

use crate::error::{Error, Result};
use crate::layout::{CommitRecord, MANIFEST};
use crate::repository::Repository;
use crate::upload::hex;
use crate::walcheck::WalCheck;

/// Download settings.
#[derive(Debug, Clone, Copy)]
pub struct DownloadOptions {
    /// Bytes per ranged GET.
    pub chunk_size: u64,
    /// GETs in flight at once (memory: about `chunk_size × concurrency`).
    pub concurrency: usize,
}

impl Default for DownloadOptions {
    fn default() -> DownloadOptions {
        DownloadOptions {
            // Small enough that the chunks queued for the writer (which pin whole
            // chunks) stay a few MiB; enough in flight to keep the store busy.
            chunk_size: 2 << 20,
            concurrency: 6,
        }
    }
}

/// What [`verify_backup`] and [`restore_backup`] checked.
#[derive(Debug, Clone)]
pub struct ReadSummary {
    /// The backup's commit record.
    pub record: CommitRecord,
    /// Files verified against the manifest.
    pub files: usize,
    /// WAL records whose CRC was verified.
    pub wal_records: u64,
    /// Bytes downloaded.
    pub downloaded: u64,
    /// Files of the manifest whose local copy already matched (a delta restore), not
    /// downloaded again.
    pub files_reused: usize,
    /// Files of the manifest written.
    pub files_written: usize,
}

/// A sink that checks the WAL of the base archive, around an optional writer.
pub(crate) struct Checked<S> {
    inner: S,
    wal: WalCheck,
    in_base: bool,
}

impl<S> Checked<S> {
    pub(crate) fn new(inner: S, server_major: u32, system_id: u64) -> Checked<S> {
        Checked {
            inner,
            wal: WalCheck::new(server_major, Some(system_id)),
            in_base: false,
        }
    }

    pub(crate) fn records_verified(&self) -> u64 {
        self.wal.records_verified()
    }
}

impl<S: BackupSink> BackupSink for Checked<S> {
    fn begin_backup(&mut self, info: &BackupInfo) -> basebackup::Result<()> {
        self.inner.begin_backup(info)
    }
    fn begin_archive(&mut self, archive: &ArchiveInfo) -> basebackup::Result<()> {
        self.in_base = archive.is_base();
        self.inner.begin_archive(archive)
    }
    fn compressed_bytes(&mut self, data: &Bytes) -> basebackup::Result<()> {
        self.inner.compressed_bytes(data)
    }
    fn archive_bytes(&mut self, data: &Bytes) -> basebackup::Result<()> {
        self.inner.archive_bytes(data)
    }
    fn entry(&mut self, event: &TarEvent) -> basebackup::Result<()> {
        if self.in_base {
            self.wal.event(event);
        }
        self.inner.entry(event)
    }
    fn end_archive(&mut self, trailer_present: bool) -> basebackup::Result<()> {
        self.inner.end_archive(trailer_present)
    }
    fn commit(&mut self, manifest: Option<&[u8]>) -> basebackup::Result<()> {
        // The WAL is checked before anything is made final.
        if let Some(bytes) = manifest {
            let parsed = Manifest::parse(bytes)?;
            self.wal.finish(&parsed.wal_ranges).map_err(|e| {
                basebackup::Error::verify(
                    e.message().to_string(),
                    "the backup's WAL is incomplete or damaged",
                )
            })?;
        }
        self.inner.commit(manifest)
    }
    fn abort(&mut self, reason: &basebackup::Error) {
        self.inner.abort(reason)
    }
}

/// Writes nothing.
struct Nowhere;

impl BackupSink for Nowhere {
    fn begin_backup(&mut self, _: &BackupInfo) -> basebackup::Result<()> {
        Ok(())
    }
    fn begin_archive(&mut self, _: &ArchiveInfo) -> basebackup::Result<()> {
        Ok(())
    }
    fn end_archive(&mut self, _: bool) -> basebackup::Result<()> {
        Ok(())
    }
    fn commit(&mut self, _: Option<&[u8]>) -> basebackup::Result<()> {
        Ok(())
    }
    fn abort(&mut self, _: &basebackup::Error) {}
}

/// Reads and checks the manifest object against the commit record.
pub(crate) async fn read_manifest(
    repo: &Repository,
    record: &CommitRecord,
) -> Result<(Bytes, Manifest)> {
    let path = repo.backup_path(&record.label, MANIFEST);
    // The commit record says how large it is: nothing larger is read.
    let bytes = repo.get_bytes(&path, record.manifest_bytes).await?;
    let describe = repo.describe(&path);
    let sha = hex(&sha2::Sha256::digest(&bytes));
    if bytes.len() as u64 != record.manifest_bytes || sha != record.manifest_sha256 {
        return Err(Error::verify(
            describe,
            format!(
                "{} bytes with SHA-256 {sha}, but the commit record says {} bytes with {}",
                bytes.len(),
                record.manifest_bytes,
                record.manifest_sha256
            ),
        ));
    }
    let manifest = Manifest::parse(&bytes).map_err(|e| Error::verify(&describe, e.message()))?;
    if let Some(id) = manifest.system_identifier {
        if id.to_string() != record.system_identifier {
            return Err(Error::verify(
                describe,
                format!(
                    "system identifier {id} differs from the commit record's {}",
                    record.system_identifier
                ),
            ));
        }
    }
    Ok((bytes, manifest))
}

/// An archive object's path, its name for messages, and its size, checked against the
/// commit record before anything is read from it.
pub(crate) async fn stored_archive(
    repo: &Repository,
    record: &CommitRecord,
    archive: &crate::layout::ArchiveRecord,
) -> Result<(object_store::path::Path, String, u64)> {
    let path = repo.backup_path(&record.label, &archive.object);
    let describe = repo.describe(&path);
    let meta = repo
        .store()
        .head(&path)
        .await
        .map_err(|e| Error::store(format!("reading {describe}"), e))?;
    if meta.size != archive.stored_bytes {
        return Err(Error::verify(
            describe,
            format!(
                "holds {} bytes, but the commit record says {}",
                meta.size, archive.stored_bytes
            ),
        ));
    }
    Ok((path, describe, meta.size))
}

/// Feeds every archive of `record` through `replay`, downloading ranges in parallel.
async fn feed_archives<S: BackupSink + 'static>(
    repo: &Repository,
    record: &CommitRecord,
    replay: &mut Replay<S>,
    download: DownloadOptions,
    downloaded: &AtomicU64,
) -> Result<()> {
    for archive in &record.archives {
        let (path, describe, size) = stored_archive(repo, record, archive).await?;
        replay
            .begin_archive(ArchiveInfo {
                name: archive.object.clone(),
                tablespace: Tablespace {
                    oid: archive.tablespace_oid,
                    location: archive.location.clone(),
                    size_estimate: None,
                },
                compression: archive.compression.method(),
            })
            .await?;
        let chunk = download.chunk_size.max(1);
        let ranges: Vec<_> = (0..size.div_ceil(chunk))
            .map(|i| i * chunk..((i + 1) * chunk).min(size))
            .collect();
        let store = repo.store().clone();
        let mut chunks = futures::stream::iter(ranges)
            .map(|range| {
                let store = store.clone();
                let path = path.clone();
                async move { store.get_range(&path, range).await }
            })
            .buffered(download.concurrency.max(1));
        while let Some(bytes) = chunks
            .try_next()
            .await
            .map_err(|e| Error::store(format!("reading {describe}"), e))?
        {
            downloaded.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            replay.data(bytes).await?;
        }
    }
    Ok(())
}

pub(crate) fn backup_info(record: &CommitRecord) -> Result<BackupInfo> {
    Ok(BackupInfo {
        server_major: record.server_major,
        start_lsn: record.start()?,
        timeline: pgwire_repl::TimelineId(record.start_timeline),
        tablespaces: record
            .archives
            .iter()
            .map(|a| Tablespace {
                oid: a.tablespace_oid,
                location: a.location.clone(),
                size_estimate: Some(a.tar_bytes),
            })
            .collect(),
    })
}

async fn replay_backup<S: BackupSink + 'static>(
    repo: &Repository,
    record: CommitRecord,
    sink: S,
    download: DownloadOptions,
    downloaded: Arc<AtomicU64>,
) -> Result<ReadSummary> {
    let (manifest_bytes, _) = read_manifest(repo, &record).await?;
    let system_id = record.system_id()?;
    let checked = Checked {
        inner: sink,
        wal: WalCheck::new(record.server_major, Some(system_id)),
        in_base: false,
    };
    let mut replay = Replay::start(backup_info(&record)?, Some(manifest_bytes), checked)?;
    if let Err(e) = feed_archives(repo, &record, &mut replay, download, &downloaded).await {
        let reason = match e.backup_error() {
            Some(b) => b.clone(),
            None => basebackup::Error::sink(e.message().to_string(), e.advice().unwrap_or("")),
        };
        let root = replay.fail(reason).await;
        // A download failure is reported as itself; a verification failure found by the
        // pipeline first is reported instead.
        return Err(match e.kind() {
            crate::ErrorKind::Store => e,
            _ => stored_damage(repo, &record, root),
        });
    }
    let (outcome, checked) = replay
        .finish()
        .await
        .map_err(|e| stored_damage(repo, &record, e))?;
    Ok(ReadSummary {
        files: outcome.files,
        files_reused: 0,
        files_written: outcome.files,
        wal_records: checked.wal.records_verified(),
        downloaded: downloaded.load(Ordering::Relaxed),
        record,
    })
}

/// What the pipeline calls an invalid stream is, read back from the store, damage to
/// the stored backup: said so, naming it.
pub(crate) fn stored_damage(
    repo: &Repository,
    record: &CommitRecord,
    e: basebackup::Error,
) -> Error {
    if e.kind() == basebackup::ErrorKind::Protocol {
        let dir = repo.path(&format!("{}/{}", crate::layout::BACKUPS_DIR, record.label));
        Error::verify(repo.describe(&dir), e.message())
    } else {
        e.into()
    }
}

/// Re-reads backup `label` (or `latest`) from the store and checks it as
/// `pg_verifybackup` would: the manifest's own checksum, every file's size and checksum
/// against it, nothing missing or extra, and the WAL the backup needs, record by record.
/// Writes nothing.
///
/// ```no_run
/// # async fn demo(repo: pgrepo::Repository) -> pgrepo::Result<()> {
/// let checked = pgrepo::verify_backup(&repo, "latest", Default::default()).await?;
/// println!("{}: {} files verified", checked.record.label, checked.files);
/// # Ok(()) }
/// ```
pub async fn verify_backup(
    repo: &Repository,
    label: &str,
    download: DownloadOptions,
) -> Result<ReadSummary> {
    let record = repo.backup(label).await?;
    replay_backup(repo, record, Nowhere, download, Arc::new(AtomicU64::new(0))).await
}

/// Options of [`restore_backup`].
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Where tablespaces go (`OLD=NEW`); unmapped ones go to their original location,
    /// which must then be new or empty.
    pub tablespace_mapping: TablespaceMapping,
    /// Skip fsyncs.
    pub no_sync: bool,
    /// Download settings.
    pub download: DownloadOptions,
    /// Bring an existing data directory of the same cluster up to the backup, fetching
    /// only what differs (like pgBackRest's `--delta`). The directory must be stopped
    /// (no `postmaster.pid`) and hold this cluster's `global/pg_control`, or be empty.
    /// On failure it is left in place but inconsistent (without `global/pg_control`).
    /// For an incremental backup this works file by file: a file whose final content
    /// the manifests show (a whole file of the newest backup, or an incremental file
    /// with no changed block down to a whole older file) is kept when the local copy
    /// matches; every other file is rebuilt from the chain.
    pub delta: bool,
}

/// Restores backup `label` (or `latest`) into `pgdata`, which must be new or empty, as
/// must every tablespace directory. Every file is verified against the manifest as it is
/// written, and the backup's WAL record by record; on any failure, everything written is
/// removed. With [`RestoreOptions::delta`], `pgdata` may instead be a stopped data
/// directory of the same cluster: only what differs is fetched and rewritten (for an
/// incremental backup, file by file from its chain), and on failure the directory is
/// kept but left without `global/pg_control` (inconsistent).
/// The result starts as the server did at the backup's end (add recovery settings to
/// make it a standby).
///
/// ```no_run
/// # async fn demo(repo: pgrepo::Repository) -> pgrepo::Result<()> {
/// let restored = pgrepo::restore_backup(&repo, "latest", "/srv/pg/restored".as_ref(), Default::default(), None).await?;
/// println!("restored {} ({} files)", restored.record.label, restored.files);
/// # Ok(()) }
/// ```
pub async fn restore_backup(
    repo: &Repository,
    label: &str,
    pgdata: &FsPath,
    options: RestoreOptions,
    downloaded: Option<Arc<AtomicU64>>,
) -> Result<ReadSummary> {
    let record = repo.backup(label).await?;
    if record.parent.is_some() {
        // The whole chain is read and checked before anything is written.
        let chain = crate::chain::load_chain(repo, record).await?;
        if options.delta {
            return crate::delta::restore_delta(
                repo,
                chain,
                pgdata,
                options,
                downloaded.unwrap_or_default(),
            )
            .await;
        }
        let sink = PlainDirSink::new(PathBuf::from(pgdata))
            .tablespace_mapping(options.tablespace_mapping)
            .options(SinkOptions {
                no_sync: options.no_sync,
                ..SinkOptions::default()
            });
        return crate::chain::replay_chain(
            repo,
            chain,
            sink,
            options.download,
            downloaded.unwrap_or_default(),
        )
        .await;
    }
    if options.delta {
        return crate::delta::restore_delta(
            repo,
            vec![record],
            pgdata,
            options,
            downloaded.unwrap_or_default(),
        )
        .await;
    }
    let sink = PlainDirSink::new(PathBuf::from(pgdata))
        .tablespace_mapping(options.tablespace_mapping)
        .options(SinkOptions {
            no_sync: options.no_sync,
            ..SinkOptions::default()
        });
    replay_backup(
        repo,
        record,
        sink,
        options.download,
        downloaded.unwrap_or_default(),
    )
    .await
}

/// [`verify_backup`], and for an incremental backup its chain: every parent down to the
/// full backup exists and is committed, and each backup's start follows its parent's
/// end on the same timeline or a later one ([`crate::check_links`]). Returns the chain,
/// newest first, with the summary of the backup's own verification.
pub async fn verify_chain(
    repo: &Repository,
    label: &str,
    download: DownloadOptions,
) -> Result<(ReadSummary, Vec<CommitRecord>)> {
    let record = repo.backup(label).await?;
    let chain = crate::chain::load_chain(repo, record).await?;
    for parent in &chain[1..] {
        // The parent's manifest must be there and match its commit record.
        read_manifest(repo, parent).await?;
    }
    let summary = replay_backup(
        repo,
        chain[0].clone(),
        Nowhere,
        download,
        Arc::new(AtomicU64::new(0)),
    )
    .await?;
    Ok((summary, chain))
}
