//! `clone`: a base backup with WAL streamed alongside, verified, then set up as a
//! standby: what `pg_basebackup -R -X stream` does, plus a manifest check during the
//! transfer and a CRC check of every WAL record.
//!
//! Order of events:
//! 1. check the target (new or empty, not inside any data directory or tablespace on
//!    this host) and create it;
//! 2. with `--create-slot`, create the named slot before the backup, so no WAL it needs
//!    can be recycled;
//! 3. BASE_BACKUP; read the tablespace list and check every tablespace directory the
//!    same way, before a single byte is written (pg_basebackup's order);
//! 4. stream WAL on a second connection from the backup's start (through the named
//!    slot, or a temporary one) while the archives arrive;
//! 5. when the backup ends (manifest verified), tell the WAL stream its end position and
//!    wait until everything up to it is on disk and verified;
//! 6. give the last segment its final name (tar format: pack it into `pg_wal.tar`), write
//!    the standby configuration.
//!
//! A failure or an interruption stops both streams, waits until the writer has stopped,
//! then removes exactly what this run created (directories, the slot) and reports what
//! it removed and what it left, and why.

use std::fmt;
use std::fs;
use std::future::Future;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use basebackup::{
    ArchiveInfo, BackupInfo, BackupOptions, BackupResult, BackupSink, BaseBackup, Checkpoint,
    ChecksumAlgorithm, PlainDirSink, Progress, ProgressFn, ServerCompression, SinkOptions,
    TablespaceMapping, TarSink, TargetDir,
};
use bytes::Bytes;
use pgwire_repl::types::parse_wal_file_name;
use pgwire_repl::{Config, Lsn, ReplicationClient, TimelineId, WalSegmentSize};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::recovery;

/// How WAL reaches the clone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalMethod {
    /// Stream it on a second connection while the backup runs (the default).
    Stream,
    /// Have the server include it at the end of the backup.
    Fetch,
    /// No WAL: the clone can only start with a WAL archive or a streaming source.
    None,
}

/// The output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A data directory, ready to start.
    Plain,
    /// `base.tar`, `<oid>.tar` and `backup_manifest`, as `pg_basebackup -Ft` writes them;
    /// archives the server compressed are stored as they arrived (`base.tar.zst`…), and
    /// streamed WAL goes into `pg_wal.tar`.
    Tar,
}

/// What to clone and how.
#[derive(Debug, Clone)]
pub struct CloneOptions {
    /// The source server: a primary, or a standby (a cascading clone).
    pub source: Config,
    /// The target data directory (or archive directory for `Format::Tar`).
    pub target: PathBuf,
    /// A named slot for WAL streaming and for the standby's `primary_slot_name`.
    pub slot: Option<String>,
    /// Create the named slot first (and drop it again if the clone fails).
    pub create_slot: bool,
    /// How WAL is included.
    pub wal: WalMethod,
    /// Fast or spread checkpoint.
    pub checkpoint: Checkpoint,
    /// Server-side rate limit in kB/s.
    pub max_rate: Option<u32>,
    /// Server-side compression (PostgreSQL 15+).
    pub compression: Option<ServerCompression>,
    /// Tablespace relocations.
    pub tablespace_mapping: TablespaceMapping,
    /// Output format.
    pub format: Format,
    /// Manifest checksum algorithm.
    pub manifest_checksums: ChecksumAlgorithm,
    /// Write `standby.signal` and `primary_conninfo`.
    pub write_recovery_conf: bool,
    /// Skip every fsync.
    pub no_sync: bool,
    /// Keep what was written (and the slot) when the clone fails.
    pub keep_on_failure: bool,
    /// Backup label.
    pub label: String,
}

impl CloneOptions {
    /// A clone of `source` into `target` as `pg_basebackup -R -X stream` makes it: WAL
    /// streamed through a temporary slot, a fast checkpoint, CRC32C manifest
    /// checksums, plain format, standby configuration written, durable, cleaned up on
    /// failure.
    pub fn new(source: Config, target: impl Into<PathBuf>) -> CloneOptions {
        CloneOptions {
            source,
            target: target.into(),
            slot: None,
            create_slot: false,
            wal: WalMethod::Stream,
            checkpoint: Checkpoint::Fast,
            max_rate: None,
            compression: None,
            tablespace_mapping: TablespaceMapping::default(),
            format: Format::Plain,
            manifest_checksums: ChecksumAlgorithm::Crc32c,
            write_recovery_conf: true,
            no_sync: false,
            keep_on_failure: false,
            label: "clone-standby".into(),
        }
    }
}

/// What a finished clone reports.
#[derive(Debug, Clone)]
pub struct CloneSummary {
    /// Uncompressed archive bytes received.
    pub bytes: u64,
    /// Wall time.
    pub seconds: f64,
    /// Where replay starts.
    pub start_lsn: Lsn,
    /// Where the clone becomes consistent.
    pub end_lsn: Lsn,
    /// The timeline.
    pub timeline: TimelineId,
    /// Files verified against the manifest.
    pub verified_files: usize,
    /// WAL bytes streamed (0 with fetch or none).
    pub wal_bytes: u64,
    /// The server's major version.
    pub server_major: u32,
}

/// Progress events, for a progress bar or log lines.
#[derive(Debug, Clone)]
pub enum CloneEvent {
    /// The backup started; WAL streaming starts from here.
    Started {
        /// Start LSN.
        start_lsn: Lsn,
        /// Timeline.
        timeline: TimelineId,
    },
    /// Bytes received so far, and the server's estimate of the total.
    Progress {
        /// Bytes done.
        done: u64,
        /// Estimated total.
        total: Option<u64>,
    },
    /// The archive is complete and verified; waiting for WAL up to `end_lsn`.
    WaitingForWal {
        /// End LSN.
        end_lsn: Lsn,
    },
}

type EventFn = Box<dyn FnMut(CloneEvent) + Send>;

/// What the clean-up after a failure did, line by line.
#[derive(Debug, Clone, Default)]
pub struct CleanupReport {
    /// What was removed (directories, slots), each with why it was this run's to remove.
    pub removed: Vec<String>,
    /// What was left in place, each with why.
    pub left: Vec<String>,
}

/// A clone that failed or was interrupted, and what was cleaned up after it.
#[derive(Debug)]
pub struct CloneFailure {
    /// What went wrong.
    pub error: Error,
    /// True when the clone was interrupted (Ctrl-C), not failed.
    pub interrupted: bool,
    /// What was removed and what was left.
    pub cleanup: CleanupReport,
}

impl fmt::Display for CloneFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.error)?;
        for line in &self.cleanup.removed {
            write!(f, "\n  removed: {line}")?;
        }
        for line in &self.cleanup.left {
            write!(f, "\n  left: {line}")?;
        }
        if self.cleanup.removed.is_empty() && self.cleanup.left.is_empty() {
            f.write_str("\n  nothing had been written, so nothing was removed")?;
        }
        Ok(())
    }
}

/// What woke the clone's main loop.
enum Step {
    Backup(Result<basebackup::Result<BackupResult>, tokio::task::JoinError>),
    Progress(bool),
    Wal(Result<walstream::Result<walstream::ReceiveSummary>, tokio::task::JoinError>),
}

impl std::error::Error for CloneFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// What this run owns while it runs: the clean-up after a failure works from this alone.
#[derive(Default)]
struct Owned {
    /// The directories written into, as found before anything was written.
    dirs: Vec<TargetDir>,
    /// A slot this run created.
    slot: Option<String>,
    /// The source narrowed to the server this run connected to first: every later
    /// connection (the backup, the WAL stream, dropping the slot) goes there, even when
    /// `--source` lists several hosts.
    pinned: Option<Config>,
    wal_task: Option<JoinHandle<walstream::Result<walstream::ReceiveSummary>>>,
    backup_task: Option<JoinHandle<basebackup::Result<BackupResult>>>,
    /// Resolves when the backup's writer thread has let go of its sink.
    writer_stopped: Option<oneshot::Receiver<()>>,
}

/// Runs a clone until it succeeds, fails, or `interrupt` completes (e.g. on Ctrl-C).
///
/// On failure or interruption the streams are stopped and, unless `keep_on_failure`,
/// exactly what this run created is removed: the target and tablespace directories it
/// created (or the contents of those it was given empty) and a slot made by
/// `create_slot`. With `keep_on_failure` everything stays, and `backup_manifest` is
/// renamed so the directory cannot pass for complete.
pub async fn clone(
    options: CloneOptions,
    mut events: EventFn,
    interrupt: impl Future<Output = ()>,
) -> Result<CloneSummary, CloneFailure> {
    let started = Instant::now();
    let mut owned = Owned::default();
    let outcome = {
        let work = run(&options, &mut events, started, &mut owned);
        tokio::pin!(interrupt);
        tokio::select! {
            result = work => result.map_err(|error| (error, false)),
            () = &mut interrupt => Err((Error::interrupted("interrupted"), true)),
        }
    };
    match outcome {
        Ok(summary) => Ok(summary),
        Err((error, interrupted)) => {
            let cleanup = clean_up(&options, &mut owned).await;
            Err(CloneFailure {
                error,
                interrupted,
                cleanup,
            })
        }
    }
}

/// How long the clean-up waits for the writer thread (it may be in a long fsync).
const WRITER_STOP_WAIT: Duration = Duration::from_secs(60);
/// How long dropping a slot may take.
const SLOT_DROP_WAIT: Duration = Duration::from_secs(20);

async fn clean_up(options: &CloneOptions, owned: &mut Owned) -> CleanupReport {
    let mut report = CleanupReport::default();
    // Stop everything that writes before removing anything.
    let wal_task = owned.wal_task.take();
    let backup_task = owned.backup_task.take();
    let aborts = [
        wal_task.as_ref().map(JoinHandle::abort_handle),
        backup_task.as_ref().map(JoinHandle::abort_handle),
    ];
    for abort in aborts.iter().flatten() {
        abort.abort();
    }
    if let Some(task) = wal_task {
        let _ = task.await;
    }
    if let Some(task) = backup_task {
        let _ = task.await;
    }
    if let Some(stopped) = owned.writer_stopped.take() {
        if tokio::time::timeout(WRITER_STOP_WAIT, stopped)
            .await
            .is_err()
        {
            for dir in owned.dirs.iter().rev() {
                report.left.push(format!(
                    "{}: the backup's writer did not stop within {} s, so nothing was removed; remove it once this process has exited",
                    dir.path.display(),
                    WRITER_STOP_WAIT.as_secs()
                ));
            }
            owned.dirs.clear();
        }
    }

    for dir in owned.dirs.iter().rev() {
        let exists = fs::symlink_metadata(&dir.path).is_ok();
        let what = match dir.tablespace {
            Some(oid) => format!("tablespace {oid} directory"),
            None => "target directory".to_string(),
        };
        if options.keep_on_failure {
            if exists {
                let manifest = dir.path.join("backup_manifest");
                let renamed = dir.tablespace.is_none()
                    && manifest.exists()
                    && fs::rename(&manifest, dir.path.join("backup_manifest.incomplete")).is_ok();
                report.left.push(format!(
                    "{what} {} (--no-clean){}",
                    dir.path.display(),
                    if renamed {
                        "; its backup_manifest was renamed backup_manifest.incomplete"
                    } else {
                        ""
                    }
                ));
            }
            continue;
        }
        match &dir.creates {
            Some(top) => {
                if fs::symlink_metadata(top).is_err() {
                    continue;
                }
                match fs::remove_dir_all(top) {
                    Ok(()) => report.removed.push(if top == &dir.path {
                        format!("{what} {} (created by this run)", top.display())
                    } else {
                        format!(
                            "{} with the {what} {} inside it (created by this run)",
                            top.display(),
                            dir.path.display()
                        )
                    }),
                    Err(e) => report
                        .left
                        .push(format!("{what} {}: removing it failed: {e}", top.display())),
                }
            }
            None => {
                if !exists {
                    continue;
                }
                match remove_contents(&dir.path) {
                    Ok(0) => {}
                    Ok(_) => report.removed.push(format!(
                        "everything this run wrote in the {what} {} (it was empty before and is empty again)",
                        dir.path.display()
                    )),
                    Err(e) => report.left.push(format!(
                        "files in the {what} {}: removing them failed: {e}",
                        dir.path.display()
                    )),
                }
            }
        }
    }

    if let Some(slot) = owned.slot.take() {
        if options.keep_on_failure {
            report.left.push(format!(
                "replication slot {slot:?} (--no-clean); it holds WAL on the source until it is used or dropped with SELECT pg_drop_replication_slot('{slot}')"
            ));
        } else {
            let dropped = tokio::time::timeout(SLOT_DROP_WAIT, async {
                let source = owned.pinned.as_ref().unwrap_or(&options.source);
                let mut client = ReplicationClient::connect(source).await?;
                client.drop_slot(&slot, true).await?;
                client.close().await
            })
            .await;
            match dropped {
                Ok(Ok(())) => report.removed.push(format!(
                    "replication slot {slot:?} (created by this run)"
                )),
                Ok(Err(e)) => report.left.push(format!(
                    "replication slot {slot:?}: dropping it failed ({e}); it holds WAL on the source: drop it with SELECT pg_drop_replication_slot('{slot}')"
                )),
                Err(_) => report.left.push(format!(
                    "replication slot {slot:?}: dropping it took longer than {} s; it holds WAL on the source: drop it with SELECT pg_drop_replication_slot('{slot}')",
                    SLOT_DROP_WAIT.as_secs()
                )),
            }
        }
    }
    report
}

/// Removes everything inside `dir`; returns how many entries there were.
fn remove_contents(dir: &Path) -> std::io::Result<usize> {
    let mut count = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            fs::remove_dir_all(&path)?;
        } else {
            fs::remove_file(&path)?;
        }
        count += 1;
    }
    Ok(count)
}

/// Creates `dir` (mode 0700) and its missing parents.
fn create_target(dir: &Path) -> Result<()> {
    if let Some(parent) = dir.parent() {
        fs::create_dir_all(parent).map_err(|e| Error::io("creating", parent, e))?;
    }
    fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io("creating", dir, e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io("setting the mode of", dir, e))
}

/// A sink that says when the writer thread has let go of it: the clean-up must not
/// remove files while the writer may still create them.
struct SignalWhenDropped {
    inner: Box<dyn BackupSink>,
    _stopped: oneshot::Sender<()>,
}

impl BackupSink for SignalWhenDropped {
    fn begin_backup(&mut self, info: &BackupInfo) -> basebackup::Result<()> {
        self.inner.begin_backup(info)
    }
    fn begin_archive(&mut self, archive: &ArchiveInfo) -> basebackup::Result<()> {
        self.inner.begin_archive(archive)
    }
    fn compressed_bytes(&mut self, data: &Bytes) -> basebackup::Result<()> {
        self.inner.compressed_bytes(data)
    }
    fn archive_bytes(&mut self, data: &Bytes) -> basebackup::Result<()> {
        self.inner.archive_bytes(data)
    }
    fn entry(&mut self, event: &basebackup::tar::TarEvent) -> basebackup::Result<()> {
        self.inner.entry(event)
    }
    fn end_archive(&mut self, trailer_present: bool) -> basebackup::Result<()> {
        self.inner.end_archive(trailer_present)
    }
    fn commit(&mut self, manifest: Option<&[u8]>) -> basebackup::Result<()> {
        self.inner.commit(manifest)
    }
    fn abort(&mut self, reason: &basebackup::Error) {
        self.inner.abort(reason)
    }
}

/// The source's data directory, when the role may read it (superuser,
/// pg_read_all_settings): a target inside it is then refused by identity as well.
async fn source_data_directory(client: &mut ReplicationClient) -> Option<PathBuf> {
    client
        .show("data_directory")
        .await
        .ok()
        .filter(|dir| dir.starts_with('/'))
        .map(PathBuf::from)
}

/// `source` narrowed to the host list entry `connection` reached.
fn pin(source: &Config, connection: &pgwire_repl::Connection) -> Config {
    let (host, host_addr, port) = connection.endpoint();
    if source.targets().len() > 1 {
        tracing::info!(server = %connection.target(), "the source lists several hosts; this clone uses this one for all its connections");
    }
    source.for_host(host, host_addr, port)
}

async fn run(
    options: &CloneOptions,
    events: &mut EventFn,
    started: Instant,
    owned: &mut Owned,
) -> Result<CloneSummary> {
    // The target first: nothing else happens if it cannot be used.
    let mut target_dirs = basebackup::plain_target_dirs(
        &options.target,
        &[],
        &TablespaceMapping::default(),
        &[],
        false,
    )?;
    let target = target_dirs.remove(0);
    if target.creates.is_some() {
        create_target(&options.target)?;
    }
    owned.dirs.push(target);

    if options.create_slot {
        let slot = options.slot.as_deref().ok_or_else(|| {
            Error::usage(
                "create_slot is set but no slot is named",
                "name the slot (--slot NAME)",
            )
        })?;
        let mut client = ReplicationClient::connect(&options.source).await?;
        owned.pinned = Some(pin(&options.source, client.connection()));
        client
            .create_physical_slot(
                slot,
                pgwire_repl::client::SlotOptions {
                    temporary: false,
                    reserve_wal: true,
                },
            )
            .await
            .map_err(|e| Error::from(e).context(format!("creating replication slot {slot:?}")))?;
        owned.slot = Some(slot.to_string());
        let _ = client.close().await;
    }

    let backup_options = BackupOptions {
        label: options.label.clone(),
        progress: true,
        checkpoint: options.checkpoint,
        wal: options.wal == WalMethod::Fetch,
        max_rate: options.max_rate,
        tablespace_map: options.format == Format::Tar,
        manifest_checksums: options.manifest_checksums,
        compression: options.compression,
        ..BackupOptions::default()
    };
    let mut client =
        ReplicationClient::connect(owned.pinned.as_ref().unwrap_or(&options.source)).await?;
    if owned.pinned.is_none() {
        owned.pinned = Some(pin(&options.source, client.connection()));
    }
    let source = owned
        .pinned
        .clone()
        .unwrap_or_else(|| options.source.clone());
    let source = &source;
    let server_major = client.server_major();
    let source_dirs: Vec<PathBuf> = source_data_directory(&mut client)
        .await
        .into_iter()
        .collect();
    let mut backup = BaseBackup::start(client, backup_options).await?;
    let (start_lsn, timeline) = (backup.start_lsn(), backup.timeline());

    // Every tablespace directory is checked before a byte is written anywhere.
    let tablespaces = backup.read_tablespaces().await?.to_vec();
    if options.format == Format::Plain {
        let dirs = basebackup::plain_target_dirs(
            &options.target,
            &tablespaces,
            &options.tablespace_mapping,
            &source_dirs,
            true,
        )?;
        owned
            .dirs
            .extend(dirs.into_iter().filter(|d| d.tablespace.is_some()));
    }
    events(CloneEvent::Started {
        start_lsn,
        timeline,
    });

    // WAL streaming on a second connection, from the backup's start.
    let wal_dir = options.target.join("pg_wal");
    let (endpos_tx, endpos_rx) = watch::channel(None);
    if options.wal == WalMethod::Stream {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&wal_dir)
            .map_err(|e| Error::io("creating", &wal_dir, e))?;
        let mut receive = walstream::ReceiveOptions::new(&wal_dir);
        receive.start_position = Some(start_lsn);
        receive.no_loop = true;
        receive.endpos_updates = Some(endpos_rx);
        receive.dir_options.sync = !options.no_sync;
        match &options.slot {
            Some(slot) => receive.slot = Some(slot.clone()),
            None => {
                receive.slot = Some(format!("clone_standby_{}", std::process::id()));
                receive.temporary_slot = true;
            }
        }
        // The flush position moves a named slot's restart_lsn, as the standby will.
        receive.report_flush = Some(options.slot.is_some());
        let config = source.clone();
        owned.wal_task = Some(tokio::spawn(async move {
            walstream::receive_wal(&config, &receive, std::future::pending()).await
        }));
    }

    let sink_options = SinkOptions {
        // The target holds the pg_wal made above; tablespace directories are always
        // checked to be new or empty.
        allow_non_empty: true,
        // The clean-up removes what this run created, once the writer has stopped.
        keep_on_failure: true,
        no_sync: options.no_sync,
    };
    let sink: Box<dyn BackupSink> = match options.format {
        Format::Plain => Box::new(
            PlainDirSink::new(&options.target)
                .tablespace_mapping(options.tablespace_mapping.clone())
                .source_directories(source_dirs)
                .options(sink_options),
        ),
        Format::Tar => Box::new(TarSink::new(&options.target).options(sink_options)),
    };
    let (stopped_tx, stopped_rx) = oneshot::channel();
    owned.writer_stopped = Some(stopped_rx);
    let sink = Box::new(SignalWhenDropped {
        inner: sink,
        _stopped: stopped_tx,
    });
    let (progress_tx, mut progress_rx) = watch::channel((0u64, None::<u64>));
    let progress: ProgressFn = Box::new(move |p: &Progress| {
        let _ = progress_tx.send((p.bytes_done, p.total_estimate));
    });
    // A task of its own: the archive stream yields often (tokio's cooperative budget),
    // and each yield should not re-poll this loop's other branches.
    owned.backup_task = Some(tokio::spawn(async move {
        let received = backup.receive(sink, Some(progress)).await;
        received.map(|(result, _sink)| result)
    }));
    let mut progress_open = true;
    let backup_result: BackupResult = loop {
        let step = {
            let Owned {
                wal_task,
                backup_task,
                ..
            } = &mut *owned;
            let Some(receiving) = backup_task.as_mut() else {
                return Err(Error::interrupted("the backup task is gone"));
            };
            tokio::select! {
                result = receiving => Step::Backup(result),
                // The sender goes away when the stream ends, while the writer may still
                // be finishing; a closed channel must not be polled again (always ready).
                changed = progress_rx.changed(), if progress_open => Step::Progress(changed.is_ok()),
                // A WAL stream that fails while the backup runs fails the clone at once.
                wal = async { match wal_task.as_mut() { Some(task) => task.await, None => std::future::pending().await } } => Step::Wal(wal),
            }
        };
        match step {
            Step::Backup(result) => {
                owned.backup_task = None;
                break result
                    .map_err(|e| Error::interrupted(format!("the backup task failed: {e}")))??;
            }
            Step::Progress(true) => {
                let (done, total) = *progress_rx.borrow_and_update();
                events(CloneEvent::Progress { done, total });
            }
            Step::Progress(false) => progress_open = false,
            Step::Wal(wal) => {
                owned.wal_task = None;
                return Err(match wal {
                    Ok(Ok(summary)) => Error::verify(
                        format!(
                            "the WAL stream ended before the backup did ({})",
                            summary.end_reason
                        ),
                        "check the source's log; the clone needs every WAL record from the backup's start to its end",
                    ),
                    Ok(Err(e)) => Error::from(e).context("WAL streaming failed"),
                    Err(e) => Error::interrupted(format!("the WAL streaming task failed: {e}")),
                });
            }
        }
    };
    let end_lsn = backup_result.end_lsn;

    let mut wal_bytes = 0;
    if let Some(task) = owned.wal_task.as_mut() {
        events(CloneEvent::WaitingForWal { end_lsn });
        let _ = endpos_tx.send(Some(end_lsn));
        let joined = task.await;
        owned.wal_task = None;
        let summary = joined
            .map_err(|e| Error::interrupted(format!("the WAL streaming task failed: {e}")))?
            .map_err(|e| Error::from(e).context("WAL streaming failed"))?;
        if summary.flushed < end_lsn {
            return Err(Error::verify(
                format!(
                    "WAL streaming stopped at {} before the backup's end {end_lsn}; the clone would not be consistent",
                    summary.flushed
                ),
                "run the clone again; check the source's log if it happens again",
            ));
        }
        wal_bytes = summary.bytes_received;
        finish_wal_dir(&wal_dir, start_lsn, end_lsn, timeline, !options.no_sync)?;
        if options.format == Format::Tar {
            crate::waltar::pack_wal_dir(
                &wal_dir,
                &options.target.join("pg_wal.tar"),
                !options.no_sync,
            )?;
        }
    }

    if options.write_recovery_conf && options.format == Format::Plain {
        // The whole --source, host list and target_session_attrs included, so that the
        // standby follows a failover as this run would have.
        let conninfo = recovery::primary_conninfo(&options.source, server_major);
        recovery::write_standby_config(&options.target, &conninfo, options.slot.as_deref())
            .map_err(|e| Error::io("writing the standby configuration in", &options.target, e))?;
    }
    if !options.no_sync {
        sync_dir(&options.target)?;
    }
    Ok(CloneSummary {
        bytes: backup_result.bytes,
        seconds: started.elapsed().as_secs_f64(),
        start_lsn,
        end_lsn,
        timeline: backup_result.end_timeline,
        verified_files: backup_result.files,
        wal_bytes,
        server_major,
    })
}

/// Gives `.partial` segments their final names (recovery reads only those; the rest of
/// such a file is zeros, which recovery treats as the end of WAL, as with
/// pg_basebackup's own stream), then checks every segment from the start to the end
/// position is there. Used by `clone` and by front-ends that stream WAL beside a
/// backup themselves (`pg_basebackup -X stream`).
pub fn finish_wal_dir(
    dir: &Path,
    start: Lsn,
    end: Lsn,
    timeline: TimelineId,
    sync: bool,
) -> Result<()> {
    let segment_size = detect_segment_size(dir)?;
    let entries = fs::read_dir(dir).map_err(|e| Error::io("reading", dir, e))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(base) = name.strip_suffix(".partial") {
            if parse_wal_file_name(base, segment_size).is_some() {
                let final_path = dir.join(base);
                if final_path.exists() {
                    return Err(Error::verify(
                        format!("both {name} and {base} exist in {}", dir.display()),
                        "the WAL directory was changed by something else while the clone ran; clone again",
                    ));
                }
                fs::rename(entry.path(), &final_path)
                    .map_err(|e| Error::io("renaming", &entry.path(), e))?;
            }
        }
    }
    if sync {
        sync_dir(dir)?;
    }
    let first = start.segment_number(segment_size);
    // The end position is just past the last byte needed; a position at a segment start
    // needs nothing from that segment.
    let last = Lsn(end.0.saturating_sub(1)).segment_number(segment_size);
    for segment in first..=last {
        let name = pgwire_repl::types::wal_file_name(timeline, segment, segment_size);
        let path = dir.join(&name);
        match fs::metadata(&path) {
            Ok(meta) if meta.len() == segment_size.bytes() => {}
            Ok(meta) => {
                return Err(Error::verify(
                    format!(
                        "WAL segment {name} has {} bytes, expected {}",
                        meta.len(),
                        segment_size.bytes()
                    ),
                    "clone again; the streamed WAL is incomplete",
                ))
            }
            Err(_) => {
                return Err(Error::verify(
                    format!(
                        "WAL segment {name} (between the backup's start {start} and end {end}) is missing from {}",
                        dir.display()
                    ),
                    "clone again; the streamed WAL is incomplete",
                ))
            }
        }
    }
    Ok(())
}

fn detect_segment_size(dir: &Path) -> Result<WalSegmentSize> {
    let entries = fs::read_dir(dir).map_err(|e| Error::io("reading", dir, e))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let is_segment = name.to_str().is_some_and(|n| {
            let base = n.strip_suffix(".partial").unwrap_or(n);
            base.len() == 24 && base.bytes().all(|b| b.is_ascii_hexdigit())
        });
        if is_segment {
            if let Ok(meta) = entry.metadata() {
                if let Ok(size) = WalSegmentSize::new(meta.len()) {
                    return Ok(size);
                }
            }
        }
    }
    Err(Error::verify(
        format!("no WAL segment was streamed into {}", dir.display()),
        "clone again; check the source's log",
    ))
}

fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io("fsync of", dir, e))
}

/// Parses `--compress server-zstd[:LEVEL]` (also `server-gzip`, `server-lz4`).
///
/// ```
/// assert!(standby::clone::parse_compression("server-zstd:level=3").is_ok());
/// assert!(standby::clone::parse_compression("client-zstd").is_err());
/// ```
pub fn parse_compression(value: &str) -> Result<ServerCompression> {
    let usage = |what: String| {
        Error::usage(
            what,
            "use server-zstd[:LEVEL], server-lz4[:LEVEL] or server-gzip[:LEVEL]",
        )
    };
    let (method, level) = match value.split_once(':') {
        Some((method, level)) => {
            let level = level.strip_prefix("level=").unwrap_or(level);
            (
                method,
                Some(
                    level
                        .parse::<i32>()
                        .map_err(|_| usage(format!("invalid compression level {level:?}")))?,
                ),
            )
        }
        None => (value, None),
    };
    let method = match method {
        "server-zstd" => basebackup::CompressionMethod::Zstd,
        "server-lz4" => basebackup::CompressionMethod::Lz4,
        "server-gzip" => basebackup::CompressionMethod::Gzip,
        other => return Err(usage(format!("unknown compression {other:?}"))),
    };
    let mut compression = ServerCompression::new(method);
    if let Some(level) = level {
        compression = compression.level(level);
    }
    Ok(compression)
}

/// Parses `--max-rate` like pg_basebackup: kB/s, or with a `k` or `M` suffix.
///
/// ```
/// assert_eq!(standby::clone::parse_max_rate("32M").unwrap(), 32 * 1024);
/// assert!(standby::clone::parse_max_rate("10").is_err());
/// ```
pub fn parse_max_rate(value: &str) -> Result<u32> {
    let value = value.trim();
    let (number, factor) = if let Some(n) = value.strip_suffix(['M', 'm']) {
        (n, 1024)
    } else if let Some(n) = value.strip_suffix(['k', 'K']) {
        (n, 1)
    } else {
        (value, 1)
    };
    let advice = "give kB/s from 32 kB/s to 1024 MB/s, e.g. 32M or 500k";
    let rate = number
        .trim()
        .parse::<u32>()
        .ok()
        .and_then(|n| n.checked_mul(factor))
        .ok_or_else(|| Error::usage(format!("invalid --max-rate {value:?}"), advice))?;
    if !(32..=1_048_576).contains(&rate) {
        return Err(Error::usage(
            format!("--max-rate {value} is outside 32 kB/s .. 1024 MB/s"),
            advice,
        ));
    }
    Ok(rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_and_rate_arguments() {
        assert!(parse_compression("server-zstd").is_ok());
        assert!(parse_compression("server-zstd:3").is_ok());
        assert!(parse_compression("server-zstd:level=3").is_ok());
        assert!(parse_compression("client-zstd").is_err());
        assert!(parse_compression("server-zstd:x").is_err());
        assert_eq!(parse_max_rate("32M").unwrap(), 32 * 1024);
        assert_eq!(parse_max_rate("500k").unwrap(), 500);
        assert_eq!(parse_max_rate("100").unwrap(), 100);
        assert!(parse_max_rate("10").is_err());
        assert!(parse_max_rate("2000M").is_err());
        assert!(parse_max_rate("fast").is_err());
    }
}
