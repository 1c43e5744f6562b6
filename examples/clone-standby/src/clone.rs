//! `clone`: a base backup with WAL streamed alongside, verified, then set up as a
//! standby: what `pg_basebackup -R -X stream` does, plus a manifest check during the
//! transfer and a CRC check of every WAL record.
//!
//! Order of events:
//! 1. refuse a non-empty target; create it and `pg_wal` (so WAL can land while the
//!    archive is extracted);
//! 2. with `--create-slot`, create the named slot before the backup, so no WAL it needs
//!    can be recycled;
//! 3. BASE_BACKUP; as soon as the start position is known, stream WAL on a second
//!    connection from there (through the named slot, or a temporary one);
//! 4. when the backup ends (manifest verified), tell the WAL stream its end position and
//!    wait until everything up to it is on disk and verified;
//! 5. give the last segment its final name, write the standby configuration.
//!
//! Any failure removes the target (unless `keep_on_failure`), so nothing that looks like
//! a finished clone is left behind.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use basebackup::{
    BackupOptions, BackupResult, BackupSink, BaseBackup, Checkpoint, ChecksumAlgorithm,
    PlainDirSink, Progress, ProgressFn, ServerCompression, SinkOptions, TablespaceMapping, TarSink,
};
use pgwire_repl::types::parse_wal_file_name;
use pgwire_repl::{Config, Lsn, ReplicationClient, TimelineId, WalSegmentSize};
use tokio::sync::watch;

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
    /// `base.tar`, `<oid>.tar` and `backup_manifest`, as `pg_basebackup -Ft` writes them
    /// (streamed WAL goes to a `pg_wal` directory beside them).
    Tar,
}

/// What to clone and how.
#[derive(Debug, Clone)]
pub struct CloneOptions {
    /// The primary.
    pub source: Config,
    /// The target data directory (or archive directory for `Format::Tar`).
    pub target: PathBuf,
    /// A named slot for WAL streaming and for the standby's `primary_slot_name`.
    pub slot: Option<String>,
    /// Create the named slot first.
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
    /// Keep the target when the clone fails.
    pub keep_on_failure: bool,
    /// Backup label.
    pub label: String,
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

/// Runs a clone. On failure the target is removed unless `keep_on_failure` is set, in
/// which case `backup_manifest` is renamed so the directory cannot pass for complete.
pub async fn clone(options: CloneOptions, mut events: EventFn) -> Result<CloneSummary, String> {
    let started = Instant::now();
    let created_target = prepare_target(&options.target)?;
    let result = run(&options, &mut events, started).await;
    if result.is_err() {
        if options.keep_on_failure {
            let manifest = options.target.join("backup_manifest");
            if manifest.exists() {
                let _ = fs::rename(&manifest, options.target.join("backup_manifest.incomplete"));
            }
        } else {
            remove_target(&options.target, created_target).await;
        }
    }
    result
}

/// Removes what the clone wrote. The base backup's writer thread may still be finishing
/// a file when a failure elsewhere (the WAL stream) ends the clone; it stops at its next
/// channel read, so keep removing until nothing is left, for a few seconds at most.
pub async fn remove_target(target: &Path, created_target: bool) {
    for _ in 0..50 {
        if created_target {
            let _ = fs::remove_dir_all(target);
            if !target.exists() {
                return;
            }
        } else {
            remove_contents(target);
            if fs::read_dir(target).map_or(true, |mut entries| entries.next().is_none()) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Checks the target is absent or empty and creates it with mode 0700. Returns whether
/// it was created.
fn prepare_target(target: &Path) -> Result<bool, String> {
    match fs::read_dir(target) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(format!(
                    "the target directory {} is not empty\n  what to do: choose a new or empty directory, or empty this one",
                    target.display()
                ));
            }
            Ok(false)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(target)
                .map_err(|e| format!("cannot create {}: {e}", target.display()))?;
            Ok(true)
        }
        Err(e) => Err(format!("cannot read {}: {e}", target.display())),
    }
}

fn remove_contents(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            let _ = match entry.file_type() {
                Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
                _ => fs::remove_file(&path),
            };
        }
    }
}

async fn run(
    options: &CloneOptions,
    events: &mut EventFn,
    started: Instant,
) -> Result<CloneSummary, String> {
    let source = &options.source;
    if options.create_slot {
        let slot = options
            .slot
            .as_deref()
            .ok_or("--create-slot needs --slot NAME")?;
        let mut client = ReplicationClient::connect(source)
            .await
            .map_err(|e| e.to_string())?;
        client
            .create_physical_slot(
                slot,
                pgwire_repl::client::SlotOptions {
                    temporary: false,
                    reserve_wal: true,
                },
            )
            .await
            .map_err(|e| format!("creating replication slot {slot:?}: {e}"))?;
        let _ = client.close().await;
    }

    let wal_dir = options.target.join("pg_wal");
    if options.wal == WalMethod::Stream {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&wal_dir)
            .map_err(|e| format!("cannot create {}: {e}", wal_dir.display()))?;
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
    let client = ReplicationClient::connect(source)
        .await
        .map_err(|e| e.to_string())?;
    let server_major = client.server_major();
    let backup = BaseBackup::start(client, backup_options)
        .await
        .map_err(|e| e.to_string())?;
    let (start_lsn, timeline) = (backup.start_lsn(), backup.timeline());
    events(CloneEvent::Started {
        start_lsn,
        timeline,
    });

    // WAL streaming on a second connection, from the backup's start.
    let (endpos_tx, endpos_rx) = watch::channel(None);
    let wal_task = if options.wal == WalMethod::Stream {
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
        Some(tokio::spawn(async move {
            walstream::receive_wal(&config, &receive, std::future::pending()).await
        }))
    } else {
        None
    };

    let sink_options = SinkOptions {
        allow_non_empty: true,
        keep_on_failure: true,
        no_sync: options.no_sync,
    };
    let sink: Box<dyn BackupSink> = match options.format {
        Format::Plain => Box::new(
            PlainDirSink::new(&options.target)
                .tablespace_mapping(options.tablespace_mapping.clone())
                .options(sink_options),
        ),
        Format::Tar => Box::new(TarSink::new(&options.target).options(sink_options)),
    };
    let (progress_tx, mut progress_rx) = watch::channel((0u64, None::<u64>));
    let progress: ProgressFn = Box::new(move |p: &Progress| {
        let _ = progress_tx.send((p.bytes_done, p.total_estimate));
    });
    // A task of its own: the archive stream yields often (tokio's cooperative budget),
    // and each yield should not re-poll this loop's other branches.
    let mut receiving = tokio::spawn(backup.receive(sink, Some(progress)));
    let _stop_backup_on_early_return = AbortOnDrop(receiving.abort_handle());
    let mut wal_task = wal_task;
    let mut progress_open = true;
    let backup_result: BackupResult = loop {
        tokio::select! {
            result = &mut receiving => break result
                .map_err(|e| format!("the backup task failed: {e}"))?
                .map_err(|e| e.to_string())?,
            // The sender goes away when the stream ends, while the writer may still be
            // finishing; a closed channel must not be polled again (it is always ready).
            changed = progress_rx.changed(), if progress_open => {
                if changed.is_ok() {
                    let (done, total) = *progress_rx.borrow_and_update();
                    events(CloneEvent::Progress { done, total });
                } else {
                    progress_open = false;
                }
            }
            // A WAL stream that fails while the backup runs fails the clone at once.
            wal = async { match wal_task.as_mut() { Some(task) => task.await, None => std::future::pending().await } } => {
                return Err(match wal {
                    Ok(Ok(summary)) => format!("the WAL stream ended before the backup did ({:?})", summary.end_reason),
                    Ok(Err(e)) => format!("WAL streaming failed: {e}"),
                    Err(e) => format!("the WAL streaming task failed: {e}"),
                });
            }
        }
    };
    let end_lsn = backup_result.end_lsn;

    let mut wal_bytes = 0;
    if let Some(task) = wal_task {
        events(CloneEvent::WaitingForWal { end_lsn });
        let _ = endpos_tx.send(Some(end_lsn));
        let summary = task
            .await
            .map_err(|e| format!("the WAL streaming task failed: {e}"))?
            .map_err(|e| format!("WAL streaming failed: {e}"))?;
        if summary.flushed < end_lsn {
            return Err(format!(
                "WAL streaming stopped at {} before the backup's end {end_lsn}; the clone would not be consistent",
                summary.flushed
            ));
        }
        wal_bytes = summary.bytes_received;
        finish_wal_dir(&wal_dir, start_lsn, end_lsn, timeline, !options.no_sync)?;
    }

    if options.write_recovery_conf && options.format == Format::Plain {
        let conninfo = recovery::primary_conninfo(source, server_major);
        recovery::write_standby_config(&options.target, &conninfo, options.slot.as_deref())
            .map_err(|e| {
                format!(
                    "writing the standby configuration in {}: {e}",
                    options.target.display()
                )
            })?;
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
/// position is there.
fn finish_wal_dir(
    dir: &Path,
    start: Lsn,
    end: Lsn,
    timeline: TimelineId,
    sync: bool,
) -> Result<(), String> {
    let segment_size = detect_segment_size(dir)?;
    let entries = fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(base) = name.strip_suffix(".partial") {
            if parse_wal_file_name(base, segment_size).is_some() {
                let final_path = dir.join(base);
                if final_path.exists() {
                    return Err(format!("both {name} and {base} exist in {}", dir.display()));
                }
                fs::rename(entry.path(), &final_path)
                    .map_err(|e| format!("renaming {name}: {e}"))?;
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
            Ok(meta) => return Err(format!("WAL segment {name} has {} bytes, expected {}", meta.len(), segment_size.bytes())),
            Err(_) => {
                return Err(format!(
                    "WAL segment {name} (between the backup's start {start} and end {end}) is missing from {}",
                    dir.display()
                ))
            }
        }
    }
    Ok(())
}

fn detect_segment_size(dir: &Path) -> Result<WalSegmentSize, String> {
    let entries = fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
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
    Err(format!(
        "no WAL segment was streamed into {}",
        dir.display()
    ))
}

fn sync_dir(dir: &Path) -> Result<(), String> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("fsync of {}: {e}", dir.display()))
}

/// Parses `--compress server-zstd[:LEVEL]` (also `server-gzip`, `server-lz4`).
pub fn parse_compression(value: &str) -> Result<ServerCompression, String> {
    let (method, level) = match value.split_once(':') {
        Some((method, level)) => {
            let level = level.strip_prefix("level=").unwrap_or(level);
            (
                method,
                Some(
                    level
                        .parse::<i32>()
                        .map_err(|_| format!("invalid compression level {level:?}"))?,
                ),
            )
        }
        None => (value, None),
    };
    let method = match method {
        "server-zstd" => basebackup::CompressionMethod::Zstd,
        "server-lz4" => basebackup::CompressionMethod::Lz4,
        "server-gzip" => basebackup::CompressionMethod::Gzip,
        other => {
            return Err(format!(
                "unknown compression {other:?}: use server-zstd[:LEVEL], server-lz4[:LEVEL] or server-gzip[:LEVEL]"
            ))
        }
    };
    let mut compression = ServerCompression::new(method);
    if let Some(level) = level {
        compression = compression.level(level);
    }
    Ok(compression)
}

/// Parses `--max-rate` like pg_basebackup: kB/s, or with a `k` or `M` suffix.
pub fn parse_max_rate(value: &str) -> Result<u32, String> {
    let value = value.trim();
    let (number, factor) = if let Some(n) = value.strip_suffix(['M', 'm']) {
        (n, 1024)
    } else if let Some(n) = value.strip_suffix(['k', 'K']) {
        (n, 1)
    } else {
        (value, 1)
    };
    let rate = number
        .trim()
        .parse::<u32>()
        .ok()
        .and_then(|n| n.checked_mul(factor))
        .ok_or_else(|| format!("invalid --max-rate {value:?}: give kB/s, e.g. 32M or 500k"))?;
    if !(32..=1_048_576).contains(&rate) {
        return Err(format!(
            "--max-rate {value} is outside 32 kB/s .. 1024 MB/s"
        ));
    }
    Ok(rate)
}

/// Changes the owner of `dir` and everything below it (used before starting the
/// standby as its OS user when running as root).
pub fn chown_tree(dir: &Path, uid: u32, gid: u32) -> Result<(), String> {
    fn walk(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
        let meta = fs::symlink_metadata(path)?;
        if meta.is_dir() {
            for entry in fs::read_dir(path)? {
                walk(&entry?.path(), uid, gid)?;
            }
        } else if meta.file_type().is_symlink() {
            // Tablespace links: chown their targets too.
            if let Ok(target) = fs::canonicalize(path) {
                if fs::metadata(&target).is_ok_and(|m| m.is_dir()) {
                    walk(&target, uid, gid)?;
                }
            }
        }
        Ok(())
    }
    walk(dir, uid, gid).map_err(|e| format!("changing the owner of {}: {e}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("setting the mode of {}: {e}", dir.display()))
}

/// How long `--start` waits for the standby by default.
pub const DEFAULT_START_WAIT: Duration = Duration::from_secs(120);

/// Cancels a spawned task when dropped, as dropping a future in place would.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
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
