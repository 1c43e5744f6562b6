//! The async driver: send `BASE_BACKUP`, feed each backend message to the sans-IO
//! [`BackupResponse`], hand the archives to the writer thread.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use pgwire_repl::proto::backend::BackendMessage;
use pgwire_repl::proto::frontend;
use pgwire_repl::{Config, Connection, Lsn, ReplicationClient, TimelineId};
use tokio::sync::mpsc;

use crate::command::{build_command, BackupOptions, ManifestMode};
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::pipeline::{self, Msg};
use crate::protocol::{BackupEvent, BackupResponse};
use crate::sink::{ArchiveInfo, BackupInfo, BackupSink, Tablespace};

/// Messages queued for the writer at most. Archive data travels in batches of about
/// [`BATCH_BYTES`], so this bounds the data in flight to a few MiB.
const CHANNEL_CAPACITY: usize = 8;

/// Archive data is handed to the writer in batches of this size: one wake-up per MiB
/// instead of one per CopyData message (which cost ~200k context switches on a 1.5 GB
/// backup).
const BATCH_BYTES: usize = 1 << 20;

/// Progress of a running backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// The archive being received (`base.tar`, `16385.tar`…).
    pub archive: String,
    /// Its tablespace OID (`None` for the base directory).
    pub tablespace: Option<u32>,
    /// Index of the archive (0-based) and the number of archives.
    pub archive_index: usize,
    /// Number of archives.
    pub archives: usize,
    /// Uncompressed bytes of this archive so far.
    pub archive_bytes: u64,
    /// The server's estimate for this archive (with PROGRESS).
    pub archive_estimate: Option<u64>,
    /// Uncompressed bytes of all archives so far.
    pub bytes_done: u64,
    /// The server's estimate for all archives (with PROGRESS).
    pub total_estimate: Option<u64>,
}

/// A progress callback.
pub type ProgressFn = Box<dyn FnMut(&Progress) + Send>;

/// The result of a finished, verified backup.
#[derive(Debug, Clone)]
pub struct BackupResult {
    /// Where the backup starts (replay must begin here).
    pub start_lsn: Lsn,
    /// The timeline at the start.
    pub start_timeline: TimelineId,
    /// Where it ends (the backup is consistent once replay reaches this).
    pub end_lsn: Lsn,
    /// The timeline at the end.
    pub end_timeline: TimelineId,
    /// Uncompressed archive bytes received.
    pub bytes: u64,
    /// Files received.
    pub files: usize,
    /// The verified manifest (`None` with `ManifestMode::No`).
    pub manifest: Option<Manifest>,
}

/// A base backup in progress: the command was sent and the start position is known.
///
/// Drives a [`BackupResponse`] (the protocol rules) over the connection; the archives go
/// to a sink on a writer thread ([`receive`](BaseBackup::receive)) or to an asynchronous
/// sink ([`receive_async`](BaseBackup::receive_async)).
///
/// ```no_run
/// # async fn demo() -> basebackup::Result<()> {
/// use basebackup::{BaseBackup, BackupOptions, PlainDirSink};
/// let config = pgwire_repl::Config::parse_with_env("host=primary user=replicator")?;
/// let client = pgwire_repl::ReplicationClient::connect(&config).await?;
/// let backup = BaseBackup::start(client, BackupOptions::default()).await?;
/// // Start WAL streaming on a second connection from here.
/// println!("starts at {} on timeline {}", backup.start_lsn(), backup.timeline());
/// let (result, _sink) = backup.receive(PlainDirSink::new("/backup/data"), None).await?;
/// println!("ends at {}", result.end_lsn);
/// # Ok(()) }
/// ```
pub struct BaseBackup {
    pub(crate) conn: Connection,
    pub(crate) options: BackupOptions,
    pub(crate) major: u32,
    start_lsn: Lsn,
    timeline: TimelineId,
    pub(crate) response: BackupResponse,
}

impl std::fmt::Debug for BaseBackup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BaseBackup")
            .field("server_major", &self.major)
            .field("start_lsn", &self.start_lsn)
            .field("timeline", &self.timeline)
            .field("tablespaces", &self.response.tablespaces())
            .finish()
    }
}

/// Connects, takes a backup into `sink` and verifies it: the one-call form of
/// [`BaseBackup::start`] + [`BaseBackup::receive`]. Gives the sink back with the result.
///
/// Cancel safety: as [`BaseBackup::receive`]; dropping the future abandons the backup.
///
/// ```no_run
/// # async fn demo() -> basebackup::Result<()> {
/// let config = pgwire_repl::Config::parse_with_env("host=primary user=replicator")?;
/// let sink = basebackup::TarSink::new("/backup/2026-11-26");
/// let (result, _sink) = basebackup::backup(&config, basebackup::BackupOptions::default(), sink).await?;
/// println!("{} files, consistent at {}", result.files, result.end_lsn);
/// # Ok(()) }
/// ```
pub async fn backup<S: BackupSink + 'static>(
    config: &Config,
    options: BackupOptions,
    sink: S,
) -> Result<(BackupResult, S)> {
    let client = ReplicationClient::connect(config).await?;
    BaseBackup::start(client, options)
        .await?
        .receive(sink, None)
        .await
}

impl BaseBackup {
    /// Sends `BASE_BACKUP` with `options` and returns as soon as the server reports the
    /// start position (after its checkpoint), so that WAL streaming can begin on a second
    /// connection before the data flows.
    ///
    /// Cancel safety: dropping the future drops the connection, which ends the command
    /// on the server (it sees the client go away); nothing else is left behind.
    pub async fn start(client: ReplicationClient, options: BackupOptions) -> Result<BaseBackup> {
        let major = client.server_major();
        let command = build_command(&options, major)?;
        let mut conn = client.into_connection();
        frontend::query(&command, conn.write_buf())?;
        conn.flush().await?;
        let mut response = BackupResponse::new(major, &options);
        let (start_lsn, timeline) = loop {
            // Only `Started` can come before the start position is known.
            response.handle(conn.read_message().await?)?;
            if let Some(start) = response.start() {
                break start;
            }
        };
        Ok(BaseBackup {
            conn,
            options,
            major,
            start_lsn,
            timeline,
            response,
        })
    }

    /// The server's tablespaces, base directory last; read from the server on the first
    /// call (with PROGRESS the server sizes every tablespace first).
    ///
    /// Cancel safety: cancel-safe. A message is fed to the state machine in the same
    /// poll that completes its read, and a partly received message stays in the
    /// connection's buffer, so calling again after a dropped call continues where it
    /// stopped.
    pub async fn read_tablespaces(&mut self) -> Result<&[Tablespace]> {
        while self.response.tablespaces().is_none() {
            if self.response.is_failed() {
                return Err(Error::usage(
                    "this BASE_BACKUP already failed",
                    "start a new backup with BaseBackup::start",
                ));
            }
            let message = self.conn.read_message().await?;
            // Only `Tablespaces` can come before the list is known.
            self.response.handle(message)?;
        }
        Ok(self.response.tablespaces().unwrap_or_default())
    }

    /// Where the backup starts.
    pub fn start_lsn(&self) -> Lsn {
        self.start_lsn
    }

    /// The timeline at the start.
    pub fn timeline(&self) -> TimelineId {
        self.timeline
    }

    /// The server's major version.
    pub fn server_major(&self) -> u32 {
        self.major
    }

    /// Receives the archives into `sink`, verifies them against the manifest and commits,
    /// then gives the sink back (to read what it counted, or reuse it). On a failure the
    /// sink is told to [`abort`](BackupSink::abort), with the reason, and dropped (a
    /// failure before its first call, reading the tablespace list, only drops it).
    ///
    /// The sink runs on a writer thread (`spawn_blocking`), fed through a bounded
    /// channel: it may block, and memory stays bounded by the channel (a few MiB)
    /// whatever the size of the backup. For a sink that is asynchronous itself, use
    /// [`receive_async`](BaseBackup::receive_async).
    ///
    /// Cancel safety: not resumable. Dropping the future abandons the backup: the
    /// connection is closed, and the writer thread stops at its next message, calls the
    /// sink's `abort` with an [`ErrorKind::Cancelled`](crate::ErrorKind::Cancelled)
    /// reason and drops the sink. The sink's current call, if any, finishes first.
    ///
    /// ```no_run
    /// # async fn demo(backup: basebackup::BaseBackup) -> basebackup::Result<()> {
    /// use basebackup::{PlainDirSink, Progress};
    /// let progress = Box::new(|p: &Progress| eprintln!("{} / {:?} bytes", p.bytes_done, p.total_estimate));
    /// let (result, _sink) = backup.receive(PlainDirSink::new("/backup/data"), Some(progress)).await?;
    /// println!("{} files verified, consistent at {}", result.files, result.end_lsn);
    /// # Ok(()) }
    /// ```
    pub async fn receive<S: BackupSink + 'static>(
        mut self,
        sink: S,
        progress: Option<ProgressFn>,
    ) -> Result<(BackupResult, S)> {
        self.read_tablespaces().await?;
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let stopped = StopReason::default();
        let writer_stopped = stopped.clone();
        let algorithm = self.options.manifest_checksums;
        let manifest_expected = self.options.manifest != ManifestMode::No;
        let writer = tokio::task::spawn_blocking(move || {
            let mut sink = sink;
            let outcome =
                pipeline::run(rx, &mut sink, algorithm, manifest_expected, &writer_stopped);
            (outcome, sink)
        });
        let mut net = self.receive_stream(&tx, progress).await;
        self.conn.set_bulk_receive(0);
        if net.is_ok() && tx.send(Msg::End).await.is_err() {
            // Only now, after the server's final ReadyForQuery, may the writer commit.
            net = Err(Stop::Writer);
        }
        if let Err(Stop::Failed(e)) = &net {
            // The sink's `abort` is told the root cause, not just that the stream ended.
            stopped.set(e.clone());
        }
        drop(tx);
        let (outcome, sink) = match writer.await {
            Ok(pair) => pair,
            Err(join) => {
                return Err(match net {
                    Err(Stop::Failed(e)) => e,
                    _ => Error::writer_panicked(join),
                })
            }
        };
        match (net, outcome) {
            (Ok((end_lsn, end_timeline)), Ok(outcome)) => Ok((
                BackupResult {
                    start_lsn: self.start_lsn,
                    start_timeline: self.timeline,
                    end_lsn,
                    end_timeline,
                    bytes: self.response.bytes_done(),
                    files: outcome.files,
                    manifest: outcome.manifest,
                },
                sink,
            )),
            // The network side failed first (server error, lost connection, protocol).
            (Err(Stop::Failed(e)), _) => Err(e),
            // The writer failed (verification, unsafe entry, disk, sink): the root cause.
            (_, Err(w)) => Err(w),
            (Err(Stop::Writer), Ok(_)) => Err(Error::writer_panicked(
                "the writer stopped before the end of the backup without an error",
            )),
        }
    }

    /// Finishes a backup sent to a server-side target ([`BackupOptions::target`]): the
    /// server writes (or discards) the archives and manifest itself, so only the
    /// response's framing comes here. Reads it to the end and returns the end position;
    /// nothing is verified on this side (`files` is 0 and `manifest` is `None`). Archive
    /// data that arrives anyway is discarded.
    ///
    /// ```no_run
    /// # async fn demo() -> basebackup::Result<()> {
    /// use basebackup::{BackupOptions, BaseBackup};
    /// let config = pgwire_repl::Config::parse_with_env("host=primary user=backup")?;
    /// let client = pgwire_repl::ReplicationClient::connect(&config).await?;
    /// let options = BackupOptions {
    ///     target: Some(("server".into(), Some("/srv/backups/today".into()))),
    ///     ..BackupOptions::default()
    /// };
    /// let result = BaseBackup::start(client, options).await?.finish_elsewhere().await?;
    /// println!("the server wrote a backup ending at {}", result.end_lsn);
    /// # Ok(()) }
    /// ```
    pub async fn finish_elsewhere(mut self) -> Result<BackupResult> {
        self.read_tablespaces().await?;
        loop {
            let message = self.conn.read_message().await?;
            for event in self.response.handle(message)? {
                if event == BackupEvent::Done {
                    let (end_lsn, end_timeline) = self.response.end().ok_or_else(|| {
                        Error::protocol("the backup ended without an end position")
                    })?;
                    return Ok(BackupResult {
                        start_lsn: self.start_lsn,
                        start_timeline: self.timeline,
                        end_lsn,
                        end_timeline,
                        bytes: self.response.bytes_done(),
                        files: 0,
                        manifest: None,
                    });
                }
            }
        }
    }

    /// Reads the response up to `ReadyForQuery`, handing archives and manifest to the
    /// writer; returns the end position.
    async fn receive_stream(
        &mut self,
        tx: &mpsc::Sender<Msg>,
        progress: Option<ProgressFn>,
    ) -> Result<(Lsn, TimelineId), Stop> {
        let tablespaces = self.response.tablespaces().unwrap_or_default().to_vec();
        let mut progress = ProgressState::new(progress, &tablespaces);
        let mut out = Outbox::new(tx);
        out.send(Msg::Begin(BackupInfo {
            server_major: self.major,
            start_lsn: self.start_lsn,
            timeline: self.timeline,
            tablespaces,
        }))
        .await?;
        // Every read is bounded by `idle_timeout`, so that a server or link that stalls
        // mid-copy fails the backup instead of hanging it forever.
        let idle = self.options.idle_timeout;
        let conn = &mut self.conn;
        let response = &mut self.response;
        conn.set_bulk_receive(BULK_RECEIVE_BYTES);
        loop {
            let message = read_copy(conn, idle, &mut out).await?;
            for event in response.handle(message)? {
                match event {
                    BackupEvent::ArchiveStart(archive) => {
                        progress.start_archive(
                            &archive,
                            response.archives_started().saturating_sub(1),
                            response.bytes_done(),
                        );
                        out.send(Msg::Archive(archive)).await?;
                    }
                    BackupEvent::ArchiveData(data) => {
                        out.data(data).await?;
                        progress.report(response.bytes_done(), false);
                    }
                    BackupEvent::Progress(_) | BackupEvent::ArchiveEnd => {
                        progress.report(response.bytes_done(), true)
                    }
                    BackupEvent::ManifestStart => {}
                    BackupEvent::ManifestData(data) => out.send(Msg::Manifest(data)).await?,
                    BackupEvent::Ended { .. } => {
                        out.flush().await?;
                        conn.set_bulk_receive(0);
                    }
                    BackupEvent::Done => {
                        return response.end().ok_or_else(|| {
                            Stop::Failed(Error::protocol(
                                "the backup ended without an end position",
                            ))
                        })
                    }
                    // Produced before the copy, by `start` and `read_tablespaces`.
                    BackupEvent::Started { .. } | BackupEvent::Tablespaces(_) => {}
                }
            }
        }
    }
}

/// Why the network side stopped.
#[derive(Debug)]
enum Stop {
    /// The writer thread went away (it failed): its error is the root cause.
    Writer,
    /// The network side failed (server error, lost connection, protocol violation).
    Failed(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Stop {
        Stop::Failed(e)
    }
}

impl From<pgwire_repl::Error> for Stop {
    fn from(e: pgwire_repl::Error) -> Stop {
        Stop::Failed(e.into())
    }
}

/// Why the network side stopped feeding the writer, for the sink's `abort`: set before
/// the channel closes; empty when the receiving future was dropped (cancelled).
#[derive(Debug, Clone, Default)]
pub(crate) struct StopReason(Arc<Mutex<Option<Error>>>);

impl StopReason {
    pub(crate) fn set(&self, error: Error) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(error);
        }
    }

    /// The reason the stream ended before `End`: the network side's error, or else
    /// cancellation.
    pub(crate) fn take(&self) -> Error {
        self.0
            .lock()
            .ok()
            .and_then(|mut slot| slot.take())
            .unwrap_or_else(Error::cancelled)
    }
}

async fn send(tx: &mpsc::Sender<Msg>, msg: Msg) -> Result<(), Stop> {
    tx.send(msg).await.map_err(|_| Stop::Writer)
}

/// The network side's end of the writer channel: batches archive data, and keeps order
/// by flushing the batch before any other message.
struct Outbox<'a> {
    tx: &'a mpsc::Sender<Msg>,
    batch: Vec<Bytes>,
    batch_bytes: usize,
}

impl<'a> Outbox<'a> {
    fn new(tx: &'a mpsc::Sender<Msg>) -> Outbox<'a> {
        Outbox {
            tx,
            batch: Vec::new(),
            batch_bytes: 0,
        }
    }

    async fn data(&mut self, chunk: Bytes) -> Result<(), Stop> {
        self.batch_bytes += chunk.len();
        self.batch.push(chunk);
        if self.batch_bytes >= BATCH_BYTES {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), Stop> {
        if !self.batch.is_empty() {
            let batch = std::mem::take(&mut self.batch);
            self.batch_bytes = 0;
            send(self.tx, Msg::Data(batch)).await?;
        }
        Ok(())
    }

    async fn send(&mut self, msg: Msg) -> Result<(), Stop> {
        self.flush().await?;
        send(self.tx, msg).await
    }
}

/// The archive stream is read in steps of at least this much while it flows fast (see
/// `Connection::set_bulk_receive`): one wake-up per 256 KiB instead of per few segments.
const BULK_RECEIVE_BYTES: u32 = 256 * 1024;

/// How long archive data may wait in the writer's batch while the server sends nothing.
const BATCH_IDLE_FLUSH: Duration = Duration::from_millis(100);

/// Reads the next message of the response, failing with a `Timeout` error when the
/// server sends nothing for `idle` (`BackupOptions::idle_timeout`), and at once when the
/// writer thread has stopped (it failed: an unsafe entry, a verification or disk error),
/// instead of waiting for a server that may have gone silent after sending a bad entry.
/// Batched data goes to the writer once the server pauses for `BATCH_IDLE_FLUSH`: it
/// must not sit in the batch while the server is slow or silent (a hostile entry would
/// then only be seen when more data came, if ever).
/// (`read_message` keeps partial frames in the connection's buffer, so dropping the
/// read is safe.)
async fn read_copy(
    conn: &mut Connection,
    idle: Option<Duration>,
    out: &mut Outbox<'_>,
) -> Result<BackendMessage, Stop> {
    if let Some(message) = conn.try_read_buffered()? {
        return Ok(message);
    }
    if !out.batch.is_empty() {
        match tokio::time::timeout(BATCH_IDLE_FLUSH, conn.read_message()).await {
            Ok(message) => return Ok(message?),
            Err(_) => out.flush().await?,
        }
    }
    let tx = out.tx;
    let read = async {
        match idle {
            Some(limit) => conn.read_message_timeout(limit).await,
            None => conn.read_message().await,
        }
    };
    tokio::select! {
        message = read => Ok(message?),
        () = tx.closed() => Err(Stop::Writer),
    }
}

struct ProgressState {
    cb: Option<ProgressFn>,
    p: Progress,
    archive_start: u64,
    /// What the callback was last given: the archive index and the bytes done.
    last_report: Option<(usize, u64)>,
}

impl ProgressState {
    fn new(cb: Option<ProgressFn>, tablespaces: &[Tablespace]) -> ProgressState {
        ProgressState {
            cb,
            p: Progress {
                archive: String::new(),
                tablespace: None,
                archive_index: 0,
                archives: tablespaces.len(),
                archive_bytes: 0,
                archive_estimate: None,
                bytes_done: 0,
                total_estimate: tablespaces.iter().map(|t| t.size_estimate).sum(),
            },
            archive_start: 0,
            last_report: None,
        }
    }

    fn start_archive(&mut self, archive: &ArchiveInfo, index: usize, done: u64) {
        self.p.bytes_done = done.max(self.p.bytes_done);
        self.archive_start = self.p.bytes_done;
        self.p.archive.clone_from(&archive.name);
        self.p.tablespace = archive.tablespace.oid;
        self.p.archive_index = index;
        self.p.archive_bytes = 0;
        self.p.archive_estimate = archive.tablespace.size_estimate;
    }

    /// `force` reports at once, otherwise at most every MiB; never twice the same.
    fn report(&mut self, done: u64, force: bool) {
        let Some(cb) = self.cb.as_mut() else { return };
        self.p.bytes_done = done.max(self.p.bytes_done);
        self.p.archive_bytes = self.p.bytes_done.saturating_sub(self.archive_start);
        let now = (self.p.archive_index, self.p.bytes_done);
        let due = match self.last_report {
            None => true,
            Some(last) if last == now => false,
            Some((_, bytes)) => force || self.p.bytes_done - bytes >= 1 << 20,
        };
        if due {
            self.last_report = Some(now);
            cb(&self.p);
        }
    }
}
