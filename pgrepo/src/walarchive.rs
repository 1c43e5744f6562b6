//! The streamed WAL archive: a [`walstream::WalDestination`] that stores WAL in a
//! repository ([`RepoWal`]), with a bounded loss window and a synchronous mode.
//!
//! A writer keeps the segment being filled in memory. Completed segments whose records
//! all passed their CRC checks are stored as one object each (zstd by default), several
//! at a time. Between completions the verified part of the current segment that is not
//! stored yet goes into a small *piece* object: at least every
//! [`WalArchiveOptions::flush_interval`], after [`WalArchiveOptions::flush_bytes`], on
//! every flush, and in synchronous mode as soon as the previous piece is stored, so
//! that what arrives during one upload goes into the next (group commit). Pieces are
//! deleted once their segment's complete object is stored.
//!
//! The durable position, reported to the server as flushed, is the end of the
//! contiguous verified WAL the store has acknowledged: a slot never moves past WAL that
//! is not safely stored, and a synchronous primary's COMMIT waits for its upload.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::stream::FuturesUnordered;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::ObjectStoreExt;
use pgwire_repl::types::wal_file_name;
use pgwire_repl::{Lsn, SystemId, TimelineId, WalSegmentSize};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use walstream::{Resume, WalDestination, WalWriter, WriterTotals};

use crate::error::{Error, Result};
use crate::layout::FORMAT;
use crate::lease::Lease;
use crate::repository::Repository;
use crate::walnames::{
    history_object, parse_wal_object, partial_object, segment_object, WalObject, ARCHIVE_RECORD,
    WAL_DIR,
};

/// How complete segments are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalCompression {
    /// As they are (`<SEGMENT>`).
    None,
    /// One zstd frame with its checksum (`<SEGMENT>.zst`).
    Zstd {
        /// The zstd level.
        level: i32,
    },
}

/// Options of [`RepoWal`].
///
/// ```
/// use std::time::Duration;
/// let mut options = pgrepo::WalArchiveOptions::default();
/// options.flush_interval = Duration::from_millis(500);
/// options.synchronous = true;
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WalArchiveOptions {
    /// Complete segments' compression (default zstd level 1: level 3 shrinks WAL about
    /// 8% more but costs most of the receiver's CPU when catching up).
    pub compression: WalCompression,
    /// Verified WAL is stored within about this long (default 1 s): the loss window when
    /// the server and this host are lost together. A piece is started early by three
    /// times the recent time to store one (from a quarter to half of the interval), so
    /// that it is stored, not just sent, by then.
    pub flush_interval: Duration,
    /// Store a piece as soon as this much verified WAL is waiting (default: one
    /// segment, i.e. only the interval decides).
    pub flush_bytes: u64,
    /// Store each piece as soon as the previous one is stored, and let the receiver
    /// report every stored piece at once (synchronous replication).
    pub synchronous: bool,
    /// Complete segments uploaded at the same time (default 4).
    pub upload_concurrency: usize,
    /// Take the repository's receiver lease (default true).
    pub take_lease: bool,
}

impl Default for WalArchiveOptions {
    fn default() -> WalArchiveOptions {
        WalArchiveOptions {
            compression: WalCompression::Zstd { level: 1 },
            flush_interval: Duration::from_secs(1),
            flush_bytes: u64::MAX,
            synchronous: false,
            upload_concurrency: 4,
            take_lease: true,
        }
    }
}

/// `wal/archive.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalArchiveRecord {
    /// The record's format.
    pub format: u32,
    /// The cluster's system identifier (a string: it does not fit a JSON double).
    pub system_identifier: String,
    /// The WAL segment size in bytes.
    pub segment_size: u64,
}

/// Reads `wal/archive.json`, if the repository has a WAL archive.
pub async fn read_archive_record(repo: &Repository) -> Result<Option<WalArchiveRecord>> {
    let path = repo.path(ARCHIVE_RECORD);
    let Some(bytes) = repo.get_optional(&path, 64 << 10).await? else {
        return Ok(None);
    };
    let record: WalArchiveRecord = serde_json::from_slice(&bytes).map_err(|e| {
        Error::verify(
            repo.describe(&path),
            format!("not a WAL archive record: {e}"),
        )
    })?;
    if record.format > FORMAT {
        return Err(Error::usage(
            format!(
                "{} has format {}, newer than this tool's {FORMAT}",
                repo.describe(&path),
                record.format
            ),
            "use a newer version of this tool",
        ));
    }
    Ok(Some(record))
}

/// One segment's objects in the archive.
#[derive(Debug, Clone, Default)]
pub struct SegmentObjects {
    /// The complete object, if stored.
    pub complete: Option<Path>,
    /// Pieces: (from, to, object), sorted by `from`.
    pub pieces: Vec<(u64, u64, Path)>,
}

impl SegmentObjects {
    /// The end of the run of pieces that starts at offset 0 with no hole.
    pub fn contiguous_end(&self) -> u64 {
        contiguous_run(&self.pieces)
            .last()
            .map_or(0, |&(index, _)| self.pieces[index].1)
    }
}

/// The pieces (`(from, to, _)`, in any order) that make up the run from offset 0: at
/// each point the piece reaching furthest. Each is given as its index and the offset
/// from which its bytes are new (the end of the run before it).
///
/// ```
/// let pieces = [(0, 10, 'a'), (20, 30, 'd'), (5, 25, 'c'), (0, 8, 'b')];
/// assert_eq!(pgrepo::walarchive::contiguous_run(&pieces), vec![(0, 0), (2, 10), (1, 25)]);
/// ```
pub fn contiguous_run<P>(pieces: &[(u64, u64, P)]) -> Vec<(usize, u64)> {
    let mut order: Vec<usize> = (0..pieces.len()).collect();
    order.sort_by_key(|&i| (pieces[i].0, pieces[i].1));
    let mut run = Vec::new();
    let mut end = 0;
    let mut next = 0;
    loop {
        let mut best: Option<usize> = None;
        while let Some(&i) = order.get(next).filter(|&&i| pieces[i].0 <= end) {
            if pieces[i].1 > end && best.is_none_or(|b| pieces[i].1 > pieces[b].1) {
                best = Some(i);
            }
            next += 1;
        }
        match best {
            Some(i) => {
                run.push((i, end));
                end = pieces[i].1;
            }
            None => return run,
        }
    }
}

/// Everything under `wal/`, by (timeline, segment).
#[derive(Debug, Clone, Default)]
pub struct WalInventory {
    /// Segments by (timeline, segment number).
    pub segments: BTreeMap<(TimelineId, u64), SegmentObjects>,
    /// Timelines whose history file is stored.
    pub histories: BTreeSet<TimelineId>,
}

/// Lists the WAL archive (one listing request per 1000 objects).
pub async fn wal_inventory(
    repo: &Repository,
    segment_size: WalSegmentSize,
) -> Result<WalInventory> {
    let dir = repo.path(WAL_DIR);
    let objects: Vec<_> = repo
        .store()
        .list(Some(&dir))
        .try_collect()
        .await
        .map_err(|e| Error::store(format!("listing {}", repo.describe(&dir)), e))?;
    let mut inventory = WalInventory::default();
    for object in objects {
        let Some(relative) = repo.relative(&object.location) else {
            continue;
        };
        match parse_wal_object(&relative, segment_size) {
            Some(WalObject::History { timeline }) => {
                inventory.histories.insert(timeline);
            }
            Some(WalObject::Complete {
                timeline, segment, ..
            }) => {
                inventory
                    .segments
                    .entry((timeline, segment))
                    .or_default()
                    .complete = Some(object.location);
            }
            Some(WalObject::Partial {
                timeline,
                segment,
                from,
                to,
            }) => inventory
                .segments
                .entry((timeline, segment))
                .or_default()
                .pieces
                .push((from, to, object.location)),
            None => {}
        }
    }
    for objects in inventory.segments.values_mut() {
        objects.pieces.sort_by_key(|(from, to, _)| (*from, *to));
    }
    Ok(inventory)
}

/// How far back a hole is looked for: more segments than are ever uploaded at once.
const HOLE_WINDOW: u64 = 64;

/// Where a receiver resumes: `(timeline, segment, after)`, streaming from the start of
/// `segment` (or of the next one when `after`). Normally that is after the newest
/// complete segment or at the newest segment with pieces (highest number, then
/// timeline). Complete segments are stored several at a time, so a crash can leave a
/// hole just below the newest one: the lowest such hole wins, so that it is filled.
pub fn resume_segment(inventory: &WalInventory) -> Option<(TimelineId, u64, bool)> {
    let stored = |o: &SegmentObjects| o.complete.is_some() || o.contiguous_end() > 0;
    let (&(newest_timeline, newest), objects) = inventory
        .segments
        .iter()
        .filter(|(_, o)| stored(o))
        .max_by_key(|((timeline, segment), _)| (*segment, *timeline))?;
    let complete_on = |segment: u64| {
        inventory
            .segments
            .range((TimelineId(0), segment)..=(newest_timeline, segment))
            .filter(|((_, s), o)| *s == segment && o.complete.is_some())
            .map(|((t, _), _)| *t)
            .max()
    };
    let first = inventory
        .segments
        .iter()
        .filter(|((t, _), o)| *t <= newest_timeline && stored(o))
        .map(|((_, s), _)| *s)
        .min()?;
    let lowest = first.max(newest.saturating_sub(HOLE_WINDOW));
    for segment in lowest..newest {
        if complete_on(segment).is_none() {
            let timeline = segment
                .checked_sub(1)
                .and_then(complete_on)
                .unwrap_or(newest_timeline);
            return Some((timeline, segment, false));
        }
    }
    Some((newest_timeline, newest, objects.complete.is_some()))
}

/// A repository's WAL archive as a [`WalDestination`] for
/// [`walstream::receive_wal_into`]. Clones share the receiver lease, so keep one to
/// [`release`](RepoWal::release) it after streaming.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let repo = pgrepo::Repository::open("s3://backups/main", &pgrepo::StoreOptions::default())?;
/// let archive = pgrepo::RepoWal::new(repo, pgrepo::WalArchiveOptions::default());
/// let config = pgwire_repl::Config::parse_with_env("host=primary user=repl")?;
/// let mut options = walstream::ReceiveOptions::new("");
/// options.slot = Some("archive".into());
/// let summary = walstream::receive_wal_into(&config, &options, archive.clone(), async {
///     let _ = tokio::signal::ctrl_c().await;
/// })
/// .await?;
/// archive.release().await?;
/// println!("stored up to {}", summary.flushed);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RepoWal {
    repo: Repository,
    options: WalArchiveOptions,
    shared: Arc<Mutex<Shared>>,
}

#[derive(Default)]
struct Shared {
    segment_size: Option<WalSegmentSize>,
    system_id: Option<SystemId>,
    lease: Option<Arc<Lease>>,
    /// Pieces left by an earlier receiver of segments with no complete object.
    resume_pieces: BTreeMap<(TimelineId, u64), SegmentObjects>,
    segments_completed: u64,
}

impl std::fmt::Debug for RepoWal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepoWal")
            .field("repo", &self.repo)
            .field("options", &self.options)
            .finish()
    }
}

impl RepoWal {
    /// The WAL archive of `repo`.
    pub fn new(repo: Repository, options: WalArchiveOptions) -> RepoWal {
        RepoWal {
            repo,
            options,
            shared: Arc::new(Mutex::new(Shared::default())),
        }
    }

    /// Releases the receiver lease (if held), so that another receiver may start at
    /// once.
    pub async fn release(&self) -> Result<()> {
        let lease = self.lock().lease.take();
        if let Some(lease) = lease {
            match Arc::try_unwrap(lease) {
                Ok(lease) => lease.release().await?,
                Err(shared) => drop(shared),
            }
        }
        Ok(())
    }

    /// Segments completed by this archive's writers so far.
    pub fn segments_completed(&self) -> u64 {
        self.lock().segments_completed
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn segment_size(&self) -> walstream::Result<WalSegmentSize> {
        self.lock().segment_size.ok_or_else(|| {
            walstream::Error::usage(
                "the WAL archive was used before it was opened",
                "call open() first (receive_wal_into does)",
            )
        })
    }

    async fn open_archive(&self, system_id: SystemId) -> Result<()> {
        let segment_size = self.lock().segment_size.unwrap_or_default();
        self.repo.ensure_system(system_id.0).await?;
        match read_archive_record(&self.repo).await? {
            Some(record) => {
                if record.system_identifier != system_id.0.to_string() {
                    return Err(Error::unsafe_op(
                        format!(
                            "the WAL archive in {} belongs to system {}, not to this server's {}",
                            self.repo.url(),
                            record.system_identifier,
                            system_id.0
                        ),
                        "use a repository (or prefix) of its own for each cluster",
                    ));
                }
                if record.segment_size != segment_size.bytes() {
                    return Err(Error::unsafe_op(
                        format!(
                            "the WAL archive in {} holds {}-byte segments, the server writes {}-byte ones",
                            self.repo.url(),
                            record.segment_size,
                            segment_size.bytes()
                        ),
                        "use a new repository for a cluster re-created with another wal_segment_size",
                    ));
                }
            }
            None => {
                let record = WalArchiveRecord {
                    format: FORMAT,
                    system_identifier: system_id.0.to_string(),
                    segment_size: segment_size.bytes(),
                };
                let json = serde_json::to_string_pretty(&record).unwrap_or_default() + "\n";
                self.repo
                    .put_bytes(&self.repo.path(ARCHIVE_RECORD), Bytes::from(json))
                    .await?;
            }
        }
        let need_lease = self.options.take_lease
            && match &self.lock().lease {
                Some(lease) => lease.check().is_err(),
                None => true,
            };
        if need_lease {
            let lease = Lease::acquire(&self.repo).await?;
            self.lock().lease = Some(Arc::new(lease));
        }
        Ok(())
    }

    async fn find_resume(&self) -> Result<Option<Resume>> {
        let segment_size = self.lock().segment_size.unwrap_or_default();
        let inventory = wal_inventory(&self.repo, segment_size).await?;
        // Pieces left beside complete objects (a crash between storing a segment and
        // folding its pieces) are removed in the background.
        let leftovers: Vec<Path> = inventory
            .segments
            .values()
            .filter(|s| s.complete.is_some())
            .flat_map(|s| s.pieces.iter().map(|(_, _, p)| p.clone()))
            .collect();
        if !leftovers.is_empty() {
            let repo = self.repo.clone();
            tokio::spawn(async move {
                for path in leftovers {
                    let _ = repo.store().delete(&path).await;
                }
            });
        }
        let system_id = self.lock().system_id;
        let Some((timeline, segment, resume_after)) = resume_segment(&inventory) else {
            self.lock().resume_pieces.clear();
            return Ok(None);
        };
        let from = match inventory.segments.get(&(timeline, segment)) {
            Some(objects) if resume_after => objects
                .complete
                .as_ref()
                .map(|p| self.repo.describe(p))
                .unwrap_or_default(),
            Some(objects) => format!(
                "{} ({} bytes in pieces)",
                self.repo.describe(&self.repo.path(&segment_object(
                    timeline,
                    &wal_file_name(timeline, segment, segment_size),
                    false
                ))),
                objects.contiguous_end()
            ),
            None => format!(
                "the hole at {} in {}",
                wal_file_name(timeline, segment, segment_size),
                self.repo.url()
            ),
        };
        let lsn = Lsn((segment + u64::from(resume_after)) * segment_size.bytes());
        self.lock().resume_pieces = inventory
            .segments
            .into_iter()
            .filter(|(_, o)| o.complete.is_none() && o.contiguous_end() > 0)
            .collect();
        Ok(Some(Resume {
            lsn,
            timeline,
            system_id,
            from,
        }))
    }

    /// The bytes of the contiguous pieces from offset 0 (what an earlier receiver
    /// stored), checked to tile without a hole.
    async fn read_pieces(&self, objects: &SegmentObjects) -> Result<Bytes> {
        let run = contiguous_run(&objects.pieces);
        let mut out = BytesMut::with_capacity(objects.contiguous_end() as usize);
        for (index, new_from) in run {
            let (from, to, path) = &objects.pieces[index];
            let bytes = self.repo.get_bytes(path, to - from).await?;
            if bytes.len() as u64 != to - from {
                return Err(Error::verify(
                    self.repo.describe(path),
                    format!("holds {} bytes, its name says {}", bytes.len(), to - from),
                ));
            }
            // Overlapping pieces must agree where they overlap.
            let overlap = (new_from - from) as usize;
            if out[*from as usize..] != bytes[..overlap] {
                return Err(Error::verify(
                    self.repo.describe(path),
                    "disagrees with the piece before it",
                ));
            }
            out.extend_from_slice(&bytes[overlap..]);
        }
        Ok(out.freeze())
    }
}

impl WalDestination for RepoWal {
    type Writer = RepoWalWriter;

    async fn open(&mut self, segment_size: WalSegmentSize) -> walstream::Result<()> {
        self.lock().segment_size = Some(segment_size);
        Ok(())
    }

    async fn check_system(&mut self, system_id: SystemId) -> walstream::Result<()> {
        self.lock().system_id = Some(system_id);
        self.open_archive(system_id)
            .await
            .map_err(Error::into_wal_error)
    }

    async fn resume_point(&mut self) -> walstream::Result<Option<Resume>> {
        self.find_resume().await.map_err(Error::into_wal_error)
    }

    async fn has_history(&mut self, timeline: TimelineId) -> walstream::Result<bool> {
        let path = self.repo.path(&history_object(timeline));
        match self.repo.store().head(&path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(
                Error::store(format!("reading {}", self.repo.describe(&path)), e).into_wal_error(),
            ),
        }
    }

    async fn write_history(
        &mut self,
        timeline: TimelineId,
        content: Bytes,
    ) -> walstream::Result<()> {
        self.repo
            .put_bytes(&self.repo.path(&history_object(timeline)), content)
            .await
            .map_err(Error::into_wal_error)
    }

    async fn writer(
        &mut self,
        timeline: TimelineId,
        start: Lsn,
    ) -> walstream::Result<RepoWalWriter> {
        let segment_size = self.segment_size()?;
        let segno = start.0 / segment_size.bytes();
        let stored = self.lock().resume_pieces.remove(&(timeline, segno));
        let (prefix, old_pieces) = match stored {
            Some(objects) => {
                let prefix = self
                    .read_pieces(&objects)
                    .await
                    .map_err(Error::into_wal_error)?;
                let keys = objects.pieces.into_iter().map(|(_, _, p)| p).collect();
                (prefix, keys)
            }
            None => (Bytes::new(), Vec::new()),
        };
        let lease = self.lock().lease.clone();
        Ok(RepoWalWriter::spawn(Archiver::new(
            self.repo.clone(),
            self.options.clone(),
            segment_size,
            timeline,
            start,
            prefix,
            old_pieces,
            lease,
            self.shared.clone(),
        )))
    }
}

enum Command {
    Data {
        lsn: Lsn,
        data: Bytes,
        verified: Lsn,
    },
    Flush(oneshot::Sender<Lsn>),
}

/// Messages queued for the archiver task: with XLogData of at most 128 KiB, 8 MiB.
const QUEUE: usize = 64;

/// The writer of a [`RepoWal`]: the receiver's side of a background archiver task.
pub struct RepoWalWriter {
    tx: Option<mpsc::Sender<Command>>,
    written: Arc<AtomicU64>,
    durable: watch::Receiver<u64>,
    task: Option<tokio::task::JoinHandle<Result<WriterTotals>>>,
    synchronous: bool,
}

impl std::fmt::Debug for RepoWalWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepoWalWriter")
            .field("written", &self.written())
            .field("durable", &self.durable())
            .finish()
    }
}

impl RepoWalWriter {
    fn spawn(archiver: Archiver) -> RepoWalWriter {
        let (tx, rx) = mpsc::channel(QUEUE);
        let written = archiver.written_shared.clone();
        let durable = archiver.durable_tx.subscribe();
        let synchronous = archiver.options.synchronous;
        let task = tokio::spawn(archiver.run(rx));
        RepoWalWriter {
            tx: Some(tx),
            written,
            durable,
            task: Some(task),
            synchronous,
        }
    }

    async fn join(&mut self) -> walstream::Result<WriterTotals> {
        self.tx = None;
        match self.task.take() {
            Some(task) => match task.await {
                Ok(result) => result.map_err(Error::into_wal_error),
                Err(join) => Err(walstream::Error::state(
                    format!("the WAL upload task stopped unexpectedly: {join}"),
                    "this is a bug; the archive is consistent (the receiver resumes from it), start again",
                )),
            },
            None => Err(walstream::Error::state(
                "the WAL upload task was already closed",
                "this is a bug; start again",
            )),
        }
    }

    async fn failure(&mut self) -> walstream::Error {
        match self.join().await {
            Err(err) => err,
            Ok(_) => walstream::Error::state(
                "the WAL upload task ended early",
                "this is a bug; start again",
            ),
        }
    }
}

impl WalWriter for RepoWalWriter {
    fn written(&self) -> Lsn {
        Lsn(self.written.load(Ordering::Acquire))
    }

    fn durable(&self) -> Lsn {
        Lsn(*self.durable.borrow())
    }

    async fn write(&mut self, lsn: Lsn, data: Bytes, verified: Lsn) -> walstream::Result<()> {
        let end = lsn.0 + data.len() as u64;
        let sent = match &self.tx {
            Some(tx) => tx
                .send(Command::Data {
                    lsn,
                    data,
                    verified,
                })
                .await
                .is_ok(),
            None => false,
        };
        if sent {
            self.written.fetch_max(end, Ordering::AcqRel);
            Ok(())
        } else {
            Err(self.failure().await)
        }
    }

    async fn flush(&mut self) -> walstream::Result<Lsn> {
        let (reply, answer) = oneshot::channel();
        let sent = match &self.tx {
            Some(tx) => tx.send(Command::Flush(reply)).await.is_ok(),
            None => false,
        };
        if sent {
            if let Ok(lsn) = answer.await {
                return Ok(lsn);
            }
        }
        Err(self.failure().await)
    }

    async fn close(mut self) -> walstream::Result<WriterTotals> {
        self.join().await
    }

    fn flushes_in_background(&self) -> bool {
        self.synchronous
    }

    async fn durable_advanced(&mut self) {
        if self.durable.changed().await.is_err() {
            // The task ended; the next write or flush reports why.
            std::future::pending::<()>().await;
        }
    }
}

/// What a finished upload did.
enum Done {
    Piece {
        segment_start: u64,
        from: u64,
        to: u64,
        path: Path,
    },
    Complete {
        segment_start: u64,
    },
    Folded,
}

/// The background task behind a [`RepoWalWriter`].
struct Archiver {
    repo: Repository,
    options: WalArchiveOptions,
    segment_size: WalSegmentSize,
    timeline: TimelineId,
    lease: Option<Arc<Lease>>,
    shared: Arc<Mutex<Shared>>,
    /// The start LSN of the segment being filled, and its bytes so far.
    current_start: u64,
    current: BytesMut,
    /// Filled segments not yet handed to an upload (waiting for verification or for a
    /// free upload slot), oldest first.
    full: VecDeque<(u64, Bytes)>,
    /// Segments being stored whole, kept for pieces until stored.
    completing: BTreeMap<u64, Bytes>,
    /// Bytes an earlier receiver stored as pieces of the first segment, compared with
    /// what is streamed again.
    prefix: Bytes,
    prefix_segment: u64,
    written: u64,
    written_shared: Arc<AtomicU64>,
    verified: u64,
    /// Where the next piece starts: everything before is stored or being stored.
    pieced_to: u64,
    /// When verified WAL after `pieced_to` first waited.
    waiting_since: Option<Instant>,
    /// The segment of the piece being stored, if one is.
    piece_in_flight: Option<u64>,
    /// When the piece in flight was started, and how long pieces take to store (a
    /// moving average): a piece starts early enough to be *stored* within the interval.
    piece_started: Option<Instant>,
    piece_latency: Duration,
    flush_requested: bool,
    completes_in_flight: usize,
    /// Piece objects of each segment, deleted once its complete object is stored.
    pieces: BTreeMap<u64, Vec<Path>>,
    /// Segments whose complete object is stored.
    stored_whole: BTreeSet<u64>,
    /// Stored ranges not yet joined to `stored_to`.
    stored_ranges: BTreeMap<u64, u64>,
    stored_to: u64,
    durable_tx: watch::Sender<u64>,
    flush_waiters: Vec<(u64, oneshot::Sender<Lsn>)>,
    tasks: FuturesUnordered<tokio::task::JoinHandle<Result<Done>>>,
    completed_segments: u64,
}

impl Archiver {
    #[allow(clippy::too_many_arguments)]
    fn new(
        repo: Repository,
        options: WalArchiveOptions,
        segment_size: WalSegmentSize,
        timeline: TimelineId,
        start: Lsn,
        prefix: Bytes,
        old_pieces: Vec<Path>,
        lease: Option<Arc<Lease>>,
        shared: Arc<Mutex<Shared>>,
    ) -> Archiver {
        let start = start.0;
        let already = start + prefix.len() as u64;
        let mut pieces = BTreeMap::new();
        if !old_pieces.is_empty() {
            pieces.insert(start, old_pieces);
        }
        let (durable_tx, _) = watch::channel(start);
        Archiver {
            repo,
            options,
            segment_size,
            timeline,
            lease,
            shared,
            current_start: start,
            current: BytesMut::with_capacity(segment_size.bytes() as usize),
            full: VecDeque::new(),
            completing: BTreeMap::new(),
            prefix,
            prefix_segment: start,
            written: start,
            written_shared: Arc::new(AtomicU64::new(start)),
            verified: start,
            pieced_to: already,
            waiting_since: None,
            piece_in_flight: None,
            piece_started: None,
            piece_latency: Duration::from_millis(50),
            flush_requested: false,
            completes_in_flight: 0,
            pieces,
            stored_whole: BTreeSet::new(),
            stored_ranges: BTreeMap::new(),
            stored_to: already,
            durable_tx,
            flush_waiters: Vec::new(),
            tasks: FuturesUnordered::new(),
            completed_segments: 0,
        }
    }

    fn segment_bytes(&self) -> u64 {
        self.segment_size.bytes()
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Command>) -> Result<WriterTotals> {
        let result = self.pump(&mut rx).await;
        if result.is_err() {
            // Uploads still running finish or fail on their own; nothing more is stored.
            for task in self.tasks.iter() {
                task.abort();
            }
        }
        result?;
        Ok(WriterTotals {
            written: Lsn(self.written),
            durable: Lsn(self.durable()),
            completed_segments: self.completed_segments,
        })
    }

    async fn pump(&mut self, rx: &mut mpsc::Receiver<Command>) -> Result<()> {
        let mut closing = false;
        loop {
            if let Some(lease) = &self.lease {
                lease.check()?;
            }
            self.schedule(closing)?;
            if closing && self.tasks.is_empty() {
                return Ok(());
            }
            let interval = self.options.flush_interval;
            let lead = (self.piece_latency * 3).clamp(interval / 4, interval / 2);
            let deadline = self.waiting_since.map(|since| since + (interval - lead));
            let accept = !closing && self.ready_segments() < self.options.upload_concurrency.max(1);
            tokio::select! {
                command = rx.recv(), if accept => match command {
                    Some(Command::Data { lsn, data, verified }) => self.ingest(lsn, data, verified)?,
                    Some(Command::Flush(reply)) => {
                        let target = self.verified;
                        if self.durable() >= target {
                            let _ = reply.send(Lsn(self.durable()));
                        } else {
                            self.flush_waiters.push((target, reply));
                            self.flush_requested = true;
                        }
                    }
                    None => {
                        closing = true;
                        self.flush_requested = true;
                    }
                },
                Some(done) = self.tasks.next(), if !self.tasks.is_empty() => {
                    let done = done.map_err(|e| Error::usage(
                        format!("a WAL upload task stopped unexpectedly: {e}"),
                        "this is a bug; the archive is consistent, start again",
                    ))??;
                    self.finished(done);
                }
                () = sleep_until(deadline), if deadline.is_some() => {
                    self.flush_requested = true;
                }
                // Lease checks, when nothing else happens.
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Filled segments whose records are verified and that wait for an upload slot.
    fn ready_segments(&self) -> usize {
        let size = self.segment_bytes();
        self.full
            .iter()
            .take_while(|(start, _)| start + size <= self.verified)
            .count()
    }

    fn durable(&self) -> u64 {
        self.stored_to.min(self.verified)
    }

    fn ingest(&mut self, lsn: Lsn, data: Bytes, verified: Lsn) -> Result<()> {
        if lsn.0 != self.written {
            return Err(Error::usage(
                format!(
                    "WAL at {lsn} was handed over after WAL up to {}: a gap",
                    Lsn(self.written)
                ),
                "this is a bug in the caller; the archive is consistent, start again",
            ));
        }
        let size = self.segment_bytes();
        let mut rest = &data[..];
        while !rest.is_empty() {
            let room = (size - self.current.len() as u64) as usize;
            let take = room.min(rest.len());
            let offset = self.current.len();
            if self.current_start == self.prefix_segment && offset < self.prefix.len() {
                let end = (offset + take).min(self.prefix.len());
                if self.prefix[offset..end] != rest[..end - offset] {
                    return Err(Error::unsafe_op(
                        format!(
                            "the WAL streamed again for {} differs from what the archive already holds at offset {offset}",
                            wal_file_name(self.timeline, self.current_start / size, self.segment_size)
                        ),
                        "the server's WAL diverged from the archive (a different server or a restored primary); archive it into a new repository",
                    ));
                }
            }
            self.current.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.current.len() as u64 == size {
                let filled =
                    std::mem::replace(&mut self.current, BytesMut::with_capacity(size as usize));
                self.full.push_back((self.current_start, filled.freeze()));
                self.current_start += size;
            }
        }
        self.written = lsn.0 + data.len() as u64;
        self.verified = self.verified.max(verified.0.min(self.written));
        if self.verified > self.pieced_to && self.waiting_since.is_none() {
            self.waiting_since = Some(Instant::now());
        }
        Ok(())
    }

    fn schedule(&mut self, closing: bool) -> Result<()> {
        let size = self.segment_bytes();
        // Complete segments, oldest first.
        while self.completes_in_flight < self.options.upload_concurrency.max(1) {
            match self.full.front() {
                Some((start, _)) if start + size <= self.verified => {}
                _ => break,
            }
            let Some((start, bytes)) = self.full.pop_front() else {
                break;
            };
            self.completing.insert(start, bytes.clone());
            self.completes_in_flight += 1;
            if !self.options.synchronous {
                // Asynchronous: the whole segment covers what pieces would.
                self.pieced_to = self.pieced_to.max(start + size);
                if self.pieced_to >= self.verified {
                    self.waiting_since = None;
                }
            }
            let repo = self.repo.clone();
            let name = wal_file_name(self.timeline, start / size, self.segment_size);
            let timeline = self.timeline;
            let compression = self.options.compression;
            self.tasks.push(tokio::spawn(async move {
                store_segment(&repo, timeline, &name, bytes, compression).await?;
                Ok(Done::Complete {
                    segment_start: start,
                })
            }));
        }
        // A piece of what is verified and not stored yet.
        let waiting = self.verified.saturating_sub(self.pieced_to);
        let due = self.options.synchronous
            || self.flush_requested
            || closing
            || waiting >= self.options.flush_bytes;
        if self.piece_in_flight.is_none() && waiting > 0 && due {
            let segment_start = self.pieced_to - self.pieced_to % size;
            let from = self.pieced_to;
            let to = self.verified.min(segment_start + size);
            let bytes = self.slice(segment_start, from - segment_start, to - segment_start)?;
            let path = self.repo.path(&partial_object(
                self.timeline,
                &wal_file_name(self.timeline, segment_start / size, self.segment_size),
                from - segment_start,
                to - segment_start,
            ));
            self.piece_in_flight = Some(segment_start);
            self.piece_started = Some(Instant::now());
            self.pieced_to = to;
            self.waiting_since = (self.verified > self.pieced_to).then(Instant::now);
            let repo = self.repo.clone();
            self.tasks.push(tokio::spawn(async move {
                repo.put_bytes(&path, bytes).await?;
                Ok(Done::Piece {
                    segment_start,
                    from,
                    to,
                    path,
                })
            }));
        }
        if self.pieced_to >= self.verified {
            self.flush_requested = !self.flush_waiters.is_empty() && self.piece_in_flight.is_some();
        }
        Ok(())
    }

    /// Bytes `from..to` of the segment starting at `segment_start`, wherever it is held.
    fn slice(&self, segment_start: u64, from: u64, to: u64) -> Result<Bytes> {
        let (from, to) = (from as usize, to as usize);
        if segment_start == self.current_start {
            return Ok(Bytes::copy_from_slice(&self.current[from..to]));
        }
        if let Some(bytes) = self.completing.get(&segment_start) {
            return Ok(bytes.slice(from..to));
        }
        if let Some((_, bytes)) = self.full.iter().find(|(s, _)| *s == segment_start) {
            return Ok(bytes.slice(from..to));
        }
        Err(Error::usage(
            format!(
                "the bytes of the segment at {} are no longer held",
                Lsn(segment_start)
            ),
            "this is a bug; the archive is consistent, start again",
        ))
    }

    fn finished(&mut self, done: Done) {
        let size = self.segment_bytes();
        match done {
            Done::Piece {
                segment_start,
                from,
                to,
                path,
            } => {
                self.piece_in_flight = None;
                if let Some(started) = self.piece_started.take() {
                    self.piece_latency = (self.piece_latency * 3 + started.elapsed()) / 4;
                }
                self.pieces.entry(segment_start).or_default().push(path);
                self.stored(from, to);
                if self.stored_whole.contains(&segment_start) {
                    self.fold(segment_start);
                }
            }
            Done::Complete { segment_start } => {
                self.completes_in_flight -= 1;
                self.completing.remove(&segment_start);
                self.completed_segments += 1;
                {
                    let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
                    shared.segments_completed += 1;
                }
                self.pieced_to = self.pieced_to.max(segment_start + size);
                if self.pieced_to >= self.verified {
                    self.waiting_since = None;
                }
                self.stored(segment_start, segment_start + size);
                self.stored_whole.insert(segment_start);
                self.fold(segment_start);
            }
            Done::Folded => {}
        }
        let durable = self.durable();
        self.durable_tx.send_if_modified(|value| {
            let moved = durable > *value;
            if moved {
                *value = durable;
            }
            moved
        });
        let mut index = 0;
        while index < self.flush_waiters.len() {
            if self.flush_waiters[index].0 <= durable {
                let (_, reply) = self.flush_waiters.swap_remove(index);
                let _ = reply.send(Lsn(durable));
            } else {
                index += 1;
            }
        }
        // Forget segments long stored.
        while let Some(first) = self.stored_whole.first().copied() {
            // Kept while a piece of it is still being stored, so that the piece is
            // folded away when it lands.
            if first + 4 * size < self.stored_to
                && !self.pieces.contains_key(&first)
                && self.piece_in_flight != Some(first)
            {
                self.stored_whole.remove(&first);
            } else {
                break;
            }
        }
    }

    fn stored(&mut self, from: u64, to: u64) {
        let entry = self.stored_ranges.entry(from).or_insert(to);
        *entry = (*entry).max(to);
        while let Some((&from, &to)) = self.stored_ranges.first_key_value() {
            if from > self.stored_to {
                break;
            }
            self.stored_to = self.stored_to.max(to);
            self.stored_ranges.remove(&from);
        }
    }

    /// Deletes the pieces of a segment stored whole (in the background; a piece left by
    /// a failure is removed by the next receiver).
    fn fold(&mut self, segment_start: u64) {
        let Some(paths) = self.pieces.remove(&segment_start) else {
            return;
        };
        let repo = self.repo.clone();
        self.tasks.push(tokio::spawn(async move {
            for path in paths {
                match repo.store().delete(&path).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => tracing::warn!(object = %repo.describe(&path), error = %e, "could not delete a folded WAL piece; the next receiver removes it"),
                }
            }
            Ok(Done::Folded)
        }));
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

/// Compresses (on a blocking thread) and stores one complete segment.
async fn store_segment(
    repo: &Repository,
    timeline: TimelineId,
    name: &str,
    bytes: Bytes,
    compression: WalCompression,
) -> Result<()> {
    let (object, body) = match compression {
        WalCompression::None => (segment_object(timeline, name, false), bytes),
        WalCompression::Zstd { level } => {
            let compressed = tokio::task::spawn_blocking(move || compress_segment(&bytes, level))
                .await
                .map_err(|e| {
                    Error::usage(
                        format!("the compression thread stopped: {e}"),
                        "this is a bug; start again",
                    )
                })??;
            (segment_object(timeline, name, true), compressed)
        }
    };
    repo.put_bytes(&repo.path(&object), body).await
}

/// One zstd frame with the content size and checksum in it.
pub fn compress_segment(bytes: &[u8], level: i32) -> Result<Bytes> {
    let fail = |e: std::io::Error| {
        Error::usage(
            format!("compressing a WAL segment failed: {e}"),
            "choose another --compress level",
        )
    };
    let mut compressor = zstd::bulk::Compressor::new(level).map_err(fail)?;
    compressor
        .set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))
        .map_err(fail)?;
    compressor.compress(bytes).map(Bytes::from).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn archive(repo: &Repository, synchronous: bool) -> RepoWal {
        let options = WalArchiveOptions {
            take_lease: false,
            synchronous,
            ..WalArchiveOptions::default()
        };
        RepoWal::new(repo.clone(), options)
    }

    async fn opened(repo: &Repository) -> RepoWal {
        let mut wal = archive(repo, false);
        wal.open(WalSegmentSize::new(MIB).unwrap()).await.unwrap();
        wal.check_system(SystemId(42)).await.unwrap();
        wal
    }

    fn wal_bytes(from: u64, len: u64, salt: u8) -> Bytes {
        (from..from + len)
            .map(|i| (i % 251) as u8 ^ salt)
            .collect::<Vec<u8>>()
            .into()
    }

    #[tokio::test]
    async fn segments_pieces_resume_and_divergence() {
        let repo = Repository::open("memory://walarchive", &Default::default()).unwrap();
        let mut wal = opened(&repo).await;
        assert_eq!(wal.resume_point().await.unwrap(), None);
        let mut writer = wal.writer(TimelineId(1), Lsn(MIB)).await.unwrap();
        // 1.5 segments, of which the last 0.1 MiB is not verified yet.
        let data = wal_bytes(MIB, 3 * MIB / 2, 0);
        let verified = Lsn(MIB + 14 * MIB / 10);
        for (i, chunk) in data.chunks(128 << 10).enumerate() {
            let at = MIB + (i as u64) * (128 << 10);
            writer
                .write(
                    Lsn(at),
                    Bytes::copy_from_slice(chunk),
                    verified.min(Lsn(at + chunk.len() as u64)),
                )
                .await
                .unwrap();
        }
        let durable = writer.flush().await.unwrap();
        assert_eq!(durable, verified, "durable stops at the verified end");
        let totals = writer.close().await.unwrap();
        assert_eq!(totals.completed_segments, 1);
        assert_eq!(totals.durable, verified);
        let inventory = wal_inventory(&repo, WalSegmentSize::new(MIB).unwrap())
            .await
            .unwrap();
        let first = &inventory.segments[&(TimelineId(1), 1)];
        let stored = repo
            .get_bytes(first.complete.as_ref().unwrap(), 2 * MIB)
            .await
            .unwrap();
        assert_eq!(
            zstd::bulk::decompress(&stored, MIB as usize).unwrap(),
            data[..MIB as usize]
        );
        assert!(
            first.pieces.is_empty(),
            "pieces of a complete segment are folded"
        );
        let second = &inventory.segments[&(TimelineId(1), 2)];
        assert!(second.complete.is_none());
        assert_eq!(second.contiguous_end(), 4 * MIB / 10);

        // A new receiver resumes at the second segment, compares what it streams again
        // with the pieces and stores only what is new.
        let mut wal = opened(&repo).await;
        let resume = wal.resume_point().await.unwrap().unwrap();
        assert_eq!((resume.lsn, resume.timeline), (Lsn(2 * MIB), TimelineId(1)));
        let mut writer = wal.writer(TimelineId(1), Lsn(2 * MIB)).await.unwrap();
        let again = wal_bytes(2 * MIB, 7 * MIB / 10, 0);
        writer
            .write(
                Lsn(2 * MIB),
                again.clone(),
                Lsn(2 * MIB + again.len() as u64),
            )
            .await
            .unwrap();
        let totals = writer.close().await.unwrap();
        assert_eq!(totals.durable, Lsn(2 * MIB + 7 * MIB / 10));
        let inventory = wal_inventory(&repo, WalSegmentSize::new(MIB).unwrap())
            .await
            .unwrap();
        let second = &inventory.segments[&(TimelineId(1), 2)];
        assert_eq!(second.contiguous_end(), 7 * MIB / 10);
        assert_eq!(second.pieces.len(), 2, "{:?}", second.pieces);
        assert_eq!(
            second.pieces[1].0,
            4 * MIB / 10,
            "the stored part is not written twice"
        );

        // WAL that differs from what is stored is refused.
        let mut wal = opened(&repo).await;
        wal.resume_point().await.unwrap();
        let mut writer = wal.writer(TimelineId(1), Lsn(2 * MIB)).await.unwrap();
        let other = wal_bytes(2 * MIB, 64 << 10, 0x55);
        let refused = match writer
            .write(Lsn(2 * MIB), other, Lsn(2 * MIB + (64 << 10)))
            .await
        {
            Err(e) => e,
            Ok(()) => writer.close().await.unwrap_err(),
        };
        assert!(refused.to_string().contains("differs"), "{refused}");
        assert!(!refused.is_retryable());
    }

    #[tokio::test]
    async fn another_cluster_is_refused() {
        let repo = Repository::open("memory://walarchive-other", &Default::default()).unwrap();
        opened(&repo).await;
        let mut wal = archive(&repo, false);
        wal.open(WalSegmentSize::new(MIB).unwrap()).await.unwrap();
        let refused = wal.check_system(SystemId(43)).await.unwrap_err();
        assert!(refused.to_string().contains("belongs"), "{refused}");
    }

    fn inventory(entries: &[(u32, u64, bool, u64)]) -> WalInventory {
        let mut inventory = WalInventory::default();
        for &(timeline, segment, complete, pieces_to) in entries {
            let objects = inventory
                .segments
                .entry((TimelineId(timeline), segment))
                .or_default();
            if complete {
                objects.complete = Some(Path::from("c"));
            }
            if pieces_to > 0 {
                objects.pieces.push((0, pieces_to, Path::from("p")));
            }
        }
        inventory
    }

    #[test]
    fn where_a_receiver_resumes() {
        assert_eq!(resume_segment(&WalInventory::default()), None);
        // After the newest complete segment.
        let run = inventory(&[(1, 3, true, 0), (1, 4, true, 0)]);
        assert_eq!(resume_segment(&run), Some((TimelineId(1), 4, true)));
        // At the newest segment with pieces.
        let pieces = inventory(&[(1, 3, true, 0), (1, 4, false, 100)]);
        assert_eq!(resume_segment(&pieces), Some((TimelineId(1), 4, false)));
        // A hole left by a crash below newer objects is filled first.
        let hole = inventory(&[
            (1, 3, true, 0),
            (1, 4, false, 0),
            (1, 5, true, 0),
            (1, 6, false, 10),
        ]);
        assert_eq!(resume_segment(&hole), Some((TimelineId(1), 4, false)));
        let hole_with_pieces = inventory(&[(1, 3, true, 0), (1, 4, false, 50), (1, 5, true, 0)]);
        assert_eq!(
            resume_segment(&hole_with_pieces),
            Some((TimelineId(1), 4, false))
        );
        // A timeline switch is not a hole: segment 5 is complete on timeline 2.
        let switched = inventory(&[
            (1, 4, true, 0),
            (1, 5, false, 70),
            (2, 5, true, 0),
            (2, 6, false, 5),
        ]);
        assert_eq!(resume_segment(&switched), Some((TimelineId(2), 6, false)));
        // Segments before the first stored one (removed by retention) are not holes.
        let trimmed = inventory(&[(1, 100, true, 0), (1, 101, true, 0)]);
        assert_eq!(resume_segment(&trimmed), Some((TimelineId(1), 101, true)));
    }

    proptest::proptest! {
        #[test]
        fn the_run_from_zero_tiles_what_the_pieces_cover(
            pieces in proptest::collection::vec((0u64..64, 1u64..16), 0..20)
        ) {
            let pieces: Vec<(u64, u64, ())> = pieces.into_iter().map(|(f, l)| (f, f + l, ())).collect();
            // The model: offsets covered from 0 with no hole.
            let mut covered = 0;
            while pieces.iter().any(|(f, t, _)| *f <= covered && covered < *t) {
                covered += 1;
            }
            let run = contiguous_run(&pieces);
            let mut end = 0;
            for (index, new_from) in &run {
                let (from, to, _) = pieces[*index];
                proptest::prop_assert_eq!(*new_from, end);
                proptest::prop_assert!(from <= end && to > end);
                end = to;
            }
            proptest::prop_assert_eq!(end, covered);
        }
    }

    #[test]
    fn contiguous_pieces() {
        let p = |from, to| (from, to, Path::from("x"));
        let objects = SegmentObjects {
            complete: None,
            pieces: vec![p(0, 10), p(10, 30), p(20, 40), p(50, 60)],
        };
        assert_eq!(objects.contiguous_end(), 40);
        let none = SegmentObjects {
            complete: None,
            pieces: vec![p(5, 10)],
        };
        assert_eq!(none.contiguous_end(), 0);
    }

    #[test]
    fn compressed_segments_carry_size_and_checksum() {
        let data: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        let frame = compress_segment(&data, 3).unwrap();
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&frame).unwrap(),
            Some(data.len() as u64)
        );
        let mut damaged = frame.to_vec();
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        assert!(zstd::bulk::decompress(&damaged, data.len()).is_err());
        assert_eq!(zstd::bulk::decompress(&frame, data.len()).unwrap(), data);
    }
}
