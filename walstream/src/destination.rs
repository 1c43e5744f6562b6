//! Where received WAL goes: the [`WalDestination`] and [`WalWriter`] traits, and the
//! local pg_receivewal-compatible directory ([`LocalDir`]) that implements them.
//!
//! [`receive_wal_into`](crate::receive_wal_into) keeps all of the receiver's logic
//! (where to resume, timeline history, timeline switches, verification before writing,
//! reconnects, the flush position reported to the server) and asks a destination only
//! to store bytes and to say what is durable. A destination never sees unverified
//! WAL as complete: `verified` tells it how far the records have been checked, and it
//! must not treat a segment as finished beyond that point.
//!
//! The flush position the server receives (which moves a slot's `restart_lsn`, and
//! which a synchronous primary waits for) is [`WalWriter::durable`]: a slow or remote
//! destination holds the slot back instead of losing WAL.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use pgwire_repl::{Lsn, SystemId, TimelineId, WalSegmentSize};
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
use crate::waldir::{SegmentWriter, WalDir, WalDirOptions};

/// Where a destination holding WAL already wants streaming to resume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    /// A segment start: the segment after the newest complete one, or the start of the
    /// oldest partial one that follows it (streamed again from its start).
    pub lsn: Lsn,
    /// The timeline of that segment.
    pub timeline: TimelineId,
    /// The system identifier found in the stored WAL, when the destination can tell;
    /// the receiver refuses to append another cluster's WAL.
    pub system_id: Option<SystemId>,
    /// What the resume point was derived from (a file name, an object key), for
    /// messages.
    pub from: String,
}

/// Totals of one writer, from [`WalWriter::close`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterTotals {
    /// The end of the WAL written.
    pub written: Lsn,
    /// The end of the WAL durably stored.
    pub durable: Lsn,
    /// Segments completed (stored whole, verified) by this writer.
    pub completed_segments: u64,
}

/// A place WAL segments are stored: a directory, object storage, memory.
///
/// The receiver calls [`open`](Self::open) once per connection, then
/// [`resume_point`](Self::resume_point), history calls, and one
/// [`writer`](Self::writer) per timeline streamed. Methods may do I/O; they run on the
/// receiver's task, so a destination that blocks must move that work to a thread of
/// its own (as [`LocalDir`] does).
///
/// ```
/// use walstream::{MemoryWal, ReceiveOptions};
/// # async fn demo() -> walstream::Result<()> {
/// let config = pgwire_repl::Config::parse_with_env("host=primary user=repl")?;
/// let wal = MemoryWal::new();
/// let mut options = ReceiveOptions::new("unused-for-other-destinations");
/// options.endpos = Some(pgwire_repl::Lsn(0x3000000));
/// let summary = walstream::receive_wal_into(&config, &options, wal.clone(), std::future::pending()).await?;
/// println!("{} segments complete", wal.complete_segments().len());
/// # Ok(()) }
/// ```
pub trait WalDestination: Send {
    /// The writer of one timeline's WAL.
    type Writer: WalWriter;

    /// Prepares the destination for a server with this segment size (called on every
    /// connection, before anything else).
    fn open(&mut self, segment_size: WalSegmentSize) -> impl Future<Output = Result<()>> + Send;

    /// Called after [`open`](Self::open) with the server's system identifier, so that a
    /// destination that records it (or refuses another cluster's WAL) can check it
    /// before anything is written. The default accepts every system.
    fn check_system(&mut self, system_id: SystemId) -> impl Future<Output = Result<()>> + Send {
        let _ = system_id;
        async { Ok(()) }
    }

    /// Where to resume, from what the destination already holds; `None` when it holds
    /// no segment. Follows pg_receivewal's rule: the newest segment by number, then
    /// timeline, complete preferred over partial.
    fn resume_point(&mut self) -> impl Future<Output = Result<Option<Resume>>> + Send;

    /// Whether the history file of `timeline` is stored.
    fn has_history(&mut self, timeline: TimelineId) -> impl Future<Output = Result<bool>> + Send;

    /// Stores the history file of `timeline` durably.
    fn write_history(
        &mut self,
        timeline: TimelineId,
        content: Bytes,
    ) -> impl Future<Output = Result<()>> + Send;

    /// A writer for `timeline` from `start`, a segment start.
    fn writer(
        &mut self,
        timeline: TimelineId,
        start: Lsn,
    ) -> impl Future<Output = Result<Self::Writer>> + Send;
}

/// Stores one timeline's WAL, contiguous from its start.
pub trait WalWriter: Send {
    /// The end of what `write` has accepted (not necessarily durable).
    fn written(&self) -> Lsn;

    /// The end of what is durably stored now: the flush position reported to the
    /// server. It may move forward on its own (a background upload finishing).
    fn durable(&self) -> Lsn;

    /// `data` at `lsn`, which is [`written`](Self::written). WAL up to `verified` has
    /// passed its record checks: only segments entirely below it may be completed.
    ///
    /// Cancel safety: the receiver never drops this future midway.
    fn write(
        &mut self,
        lsn: Lsn,
        data: Bytes,
        verified: Lsn,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Makes everything written durable and returns [`durable`](Self::durable).
    fn flush(&mut self) -> impl Future<Output = Result<Lsn>> + Send;

    /// Flushes and finishes; segments not complete stay partial, to be resumed.
    fn close(self) -> impl Future<Output = Result<WriterTotals>> + Send;

    /// Whether this writer makes what it is given durable on its own, promptly, and
    /// signals it through [`durable_advanced`](Self::durable_advanced) (an object store
    /// writer uploading in the background). In synchronous mode the receiver then does
    /// not wait for a [`flush`](Self::flush) after every message: it keeps reading, and
    /// WAL that arrives during one upload goes into the next (group commit). The default
    /// is `false`: flush after every message, as pg_receivewal does.
    fn flushes_in_background(&self) -> bool {
        false
    }

    /// Resolves when [`durable`](Self::durable) may have moved. It must be cancel safe.
    /// The default never resolves (durability moves only in `write` and `flush`).
    fn durable_advanced(&mut self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }
}

/// Messages queued for the writer thread at most: with XLogData of at most 128 KiB,
/// this bounds the WAL held in memory to 8 MiB (plus the receive buffer).
const WRITER_QUEUE: usize = 64;

/// A pg_receivewal-compatible directory ([`WalDir`]) as a destination: the blocking
/// file work runs on a thread of its own, fed through a bounded channel, so the network
/// side never waits for the disk.
///
/// ```no_run
/// # async fn demo() -> walstream::Result<()> {
/// let config = pgwire_repl::Config::parse_with_env("host=primary user=repl")?;
/// let options = walstream::ReceiveOptions::new("/var/lib/wal-archive");
/// let dir = walstream::LocalDir::new("/var/lib/wal-archive", walstream::WalDirOptions::default());
/// walstream::receive_wal_into(&config, &options, dir, std::future::pending()).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct LocalDir {
    path: PathBuf,
    options: WalDirOptions,
    dir: Option<WalDir>,
}

impl LocalDir {
    /// A destination writing into `path` (created with mode 0700 if missing).
    pub fn new(path: impl Into<PathBuf>, options: WalDirOptions) -> LocalDir {
        LocalDir {
            path: path.into(),
            options,
            dir: None,
        }
    }

    fn dir(&self) -> Result<&WalDir> {
        self.dir.as_ref().ok_or_else(|| {
            Error::usage(
                "the WAL directory was used before it was opened",
                "call open() first (receive_wal_into does)",
            )
        })
    }
}

impl WalDestination for LocalDir {
    type Writer = LocalWriter;

    async fn open(&mut self, segment_size: WalSegmentSize) -> Result<()> {
        self.dir = Some(WalDir::open(&self.path, segment_size, self.options)?);
        Ok(())
    }

    async fn resume_point(&mut self) -> Result<Option<Resume>> {
        let dir = self.dir()?;
        let Some(found) = dir.find_streaming_start()? else {
            return Ok(None);
        };
        Ok(Some(Resume {
            lsn: found.lsn,
            timeline: found.timeline,
            system_id: dir.file_system_id(&found.file)?,
            from: found.file.display().to_string(),
        }))
    }

    async fn has_history(&mut self, timeline: TimelineId) -> Result<bool> {
        Ok(self.dir()?.has_history(timeline))
    }

    async fn write_history(&mut self, timeline: TimelineId, content: Bytes) -> Result<()> {
        self.dir()?.write_history(timeline, &content)
    }

    async fn writer(&mut self, timeline: TimelineId, start: Lsn) -> Result<LocalWriter> {
        Ok(LocalWriter::spawn(self.dir()?.writer(timeline, start)?))
    }
}

enum WriterCommand {
    Write {
        lsn: Lsn,
        data: Bytes,
        verified: Lsn,
    },
    Flush(oneshot::Sender<Lsn>),
}

#[derive(Default)]
struct WriterProgress {
    written: AtomicU64,
    durable: AtomicU64,
}

/// The writer of a [`LocalDir`]: the async side of its writer thread.
pub struct LocalWriter {
    tx: Option<mpsc::Sender<WriterCommand>>,
    progress: Arc<WriterProgress>,
    task: Option<tokio::task::JoinHandle<Result<WriterTotals>>>,
}

impl std::fmt::Debug for LocalWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalWriter")
            .field("written", &self.written())
            .field("durable", &self.durable())
            .finish()
    }
}

impl LocalWriter {
    fn spawn(mut writer: SegmentWriter) -> LocalWriter {
        let (tx, mut rx) = mpsc::channel(WRITER_QUEUE);
        let progress = Arc::new(WriterProgress::default());
        progress
            .written
            .store(writer.written().0, Ordering::Release);
        progress
            .durable
            .store(writer.flushed().0, Ordering::Release);
        let shared = progress.clone();
        let task = tokio::task::spawn_blocking(move || {
            while let Some(command) = rx.blocking_recv() {
                match command {
                    WriterCommand::Write {
                        lsn,
                        data,
                        verified,
                    } => {
                        writer.write(lsn, &data, verified)?;
                        shared.written.store(writer.written().0, Ordering::Release);
                        // Completing a segment makes it durable.
                        shared.durable.store(writer.flushed().0, Ordering::Release);
                    }
                    WriterCommand::Flush(reply) => {
                        let flushed = writer.flush()?;
                        shared.durable.store(flushed.0, Ordering::Release);
                        let _ = reply.send(flushed);
                    }
                }
            }
            let completed_segments = writer.completed_segments();
            let written = writer.written();
            let durable = writer.close()?;
            Ok(WriterTotals {
                written,
                durable,
                completed_segments,
            })
        });
        LocalWriter {
            tx: Some(tx),
            progress,
            task: Some(task),
        }
    }

    /// Closes the queue and waits for the thread.
    async fn join(&mut self) -> Result<WriterTotals> {
        self.tx = None;
        match self.task.take() {
            Some(task) => match task.await {
                Ok(result) => result,
                Err(join) => Err(writer_gone(&join.to_string())),
            },
            None => Err(writer_gone("it was already closed")),
        }
    }

    /// The writer thread stopped: its error.
    async fn failure(&mut self) -> Error {
        match self.join().await {
            Err(err) => err,
            Ok(_) => writer_gone("it ended early"),
        }
    }
}

impl WalWriter for LocalWriter {
    fn written(&self) -> Lsn {
        Lsn(self.progress.written.load(Ordering::Acquire))
    }

    fn durable(&self) -> Lsn {
        Lsn(self.progress.durable.load(Ordering::Acquire))
    }

    async fn write(&mut self, lsn: Lsn, data: Bytes, verified: Lsn) -> Result<()> {
        let sent = match &self.tx {
            Some(tx) => tx
                .send(WriterCommand::Write {
                    lsn,
                    data,
                    verified,
                })
                .await
                .is_ok(),
            None => false,
        };
        if sent {
            Ok(())
        } else {
            Err(self.failure().await)
        }
    }

    async fn flush(&mut self) -> Result<Lsn> {
        let (reply, answer) = oneshot::channel();
        let sent = match &self.tx {
            Some(tx) => tx.send(WriterCommand::Flush(reply)).await.is_ok(),
            None => false,
        };
        if sent {
            if let Ok(lsn) = answer.await {
                return Ok(lsn);
            }
        }
        Err(self.failure().await)
    }

    async fn close(mut self) -> Result<WriterTotals> {
        self.join().await
    }
}

fn writer_gone(why: &str) -> Error {
    Error::state(
        format!("the WAL writer thread stopped unexpectedly: {why}"),
        "this is a bug; the directory is consistent (incomplete segments stay .partial), start again",
    )
}
