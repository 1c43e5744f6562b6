//! Asynchronous destinations: the [`AsyncBackupSink`] trait, and the bridge that feeds
//! one from the writer thread.
//!
//! Decompression, tar parsing and checksums stay on the writer thread (they are CPU
//! work). An asynchronous sink runs as a task on the runtime; the writer thread never
//! polls its futures and never calls `block_on`. It hands the sink owned commands
//! (zero-copy [`Bytes`] slices) through a bounded channel, in batches: data once about
//! [`BRIDGE_BATCH_BYTES`] have gathered and at the end of each archive, `begin_backup`
//! and `begin_archive` at once. It waits only for the answers to `commit` and `abort`:
//!
//! ```text
//!  network ─► state machine ─► writer thread ──[batches of commands, bounded]──► sink task
//!                              (decompress,     ◄──[first error: at once]───────  (your async
//!                               parse, verify)  ◄──[commit / abort: answer]─────   methods)
//! ```
//!
//! Memory stays bounded: at most [`BRIDGE_CAPACITY`] batches of about
//! [`BRIDGE_BATCH_BYTES`] wait for the sink, on top of the writer's own bounded queue.
//! A sink that is slower than the network slows the backup down; it never makes memory
//! grow.

use std::future::Future;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::backup::{BackupResult, BaseBackup, ProgressFn};
use crate::error::{Error, Result};
use crate::sink::{ArchiveInfo, BackupInfo, BackupSink};
use crate::tar::TarEvent;

/// Batches of commands waiting for the sink task, at most.
pub const BRIDGE_CAPACITY: usize = 4;

/// A batch of commands is handed to the sink task once it holds this many bytes of data
/// (or 1024 commands, or at the end of each archive).
pub const BRIDGE_BATCH_BYTES: usize = 1 << 20;

const BRIDGE_BATCH_COMMANDS: usize = 1024;

/// An asynchronous destination for a base backup (object storage, a network service…),
/// run by [`BaseBackup::receive_async`]. The counterpart of
/// [`BackupSink`], with the same calls in the same order and owned
/// data (the [`Bytes`] are zero-copy slices, cheap to keep or send on):
///
/// `begin_backup`, then for each archive `begin_archive`, any mix of `compressed_bytes`,
/// `archive_bytes` and `entry`, `end_archive`; finally `commit` (only after the manifest
/// was verified and the server reported success) or `abort` (told why). A server-
/// compressed archive reaches `compressed_bytes` as it arrived, each chunk before the
/// uncompressed data decoded from it, so it can be stored without recompression while
/// the backup is verified on the uncompressed stream.
///
/// The methods run one at a time, in order, on a task of the runtime. An error fails the
/// backup: the writer learns of it at its next hand-over (within about a MiB), stops, and
/// `abort` follows with that error as the reason. Use [`Error::sink`] for failures of
/// the sink's own.
///
/// ```
/// use basebackup::{ArchiveInfo, AsyncBackupSink, BackupInfo, Bytes, Error, Result};
///
/// /// Keeps each archive in memory, as an object store client would upload it.
/// #[derive(Default)]
/// struct Memory {
///     archives: Vec<(String, Vec<u8>)>,
///     manifest: Option<Bytes>,
/// }
///
/// impl AsyncBackupSink for Memory {
///     async fn begin_backup(&mut self, _: &BackupInfo) -> Result<()> {
///         Ok(())
///     }
///     async fn begin_archive(&mut self, archive: &ArchiveInfo) -> Result<()> {
///         self.archives.push((archive.name.clone(), Vec::new()));
///         Ok(())
///     }
///     async fn compressed_bytes(&mut self, data: Bytes) -> Result<()> {
///         self.archive_bytes(data).await
///     }
///     async fn archive_bytes(&mut self, data: Bytes) -> Result<()> {
///         let (_, bytes) = self.archives.last_mut().ok_or_else(|| {
///             Error::sink("archive data before any archive", "report this as a bug")
///         })?;
///         bytes.extend_from_slice(&data);
///         Ok(())
///     }
///     fn wants_entries(&self) -> bool {
///         false
///     }
///     async fn end_archive(&mut self, _trailer_present: bool) -> Result<()> {
///         Ok(())
///     }
///     async fn commit(&mut self, manifest: Option<Bytes>) -> Result<()> {
///         self.manifest = manifest;
///         Ok(())
///     }
///     async fn abort(&mut self, reason: &Error) {
///         eprintln!("discarding the backup: {reason}");
///         self.archives.clear();
///     }
/// }
/// ```
pub trait AsyncBackupSink: Send + 'static {
    /// Called once before any archive.
    fn begin_backup(&mut self, info: &BackupInfo) -> impl Future<Output = Result<()>> + Send;

    /// A new archive starts.
    fn begin_archive(&mut self, archive: &ArchiveInfo) -> impl Future<Output = Result<()>> + Send;

    /// For an archive whose [`ArchiveInfo::compression`] is `Some`: the bytes exactly as
    /// the server sent them, in order. Does nothing unless overridden.
    fn compressed_bytes(&mut self, data: Bytes) -> impl Future<Output = Result<()>> + Send {
        let _ = data;
        std::future::ready(Ok(()))
    }

    /// Uncompressed tar bytes of the current archive, in order. Does nothing unless
    /// overridden.
    fn archive_bytes(&mut self, data: Bytes) -> impl Future<Output = Result<()>> + Send {
        let _ = data;
        std::future::ready(Ok(()))
    }

    /// Whether [`entry`](AsyncBackupSink::entry) is to be called (asked once, when the
    /// backup starts). Return `false` when only the archive bytes matter: the parsed
    /// entries are then not handed over at all. `true` unless overridden.
    fn wants_entries(&self) -> bool {
        true
    }

    /// A parsed, already safety-checked archive entry or file data chunk. Does nothing
    /// unless overridden.
    fn entry(&mut self, event: TarEvent) -> impl Future<Output = Result<()>> + Send {
        let _ = event;
        std::future::ready(Ok(()))
    }

    /// The archive is complete; `trailer_present` says whether the stream carried the
    /// end-of-archive blocks (15+) or not (13/14).
    fn end_archive(&mut self, trailer_present: bool) -> impl Future<Output = Result<()>> + Send;

    /// Everything was received and verified: make it durable and store the manifest
    /// (last, so that nothing looks finished before this point).
    fn commit(&mut self, manifest: Option<Bytes>) -> impl Future<Output = Result<()>> + Send;

    /// The backup failed, for `reason`: remove what this sink created. Called at most
    /// once, instead of `commit`, and never after a successful `commit`; also when the
    /// caller dropped the backup (reason [`ErrorKind::Cancelled`](crate::ErrorKind::Cancelled)),
    /// since the sink's task outlives the dropped future until this returns.
    fn abort(&mut self, reason: &Error) -> impl Future<Output = ()> + Send;
}

/// What the writer thread hands to the sink task.
enum Command {
    BeginBackup(BackupInfo),
    BeginArchive(ArchiveInfo),
    Compressed(Bytes),
    Archive(Bytes),
    Entry(TarEvent),
    EndArchive(bool),
    Commit(Option<Bytes>, oneshot::Sender<Result<()>>),
    Abort(Error, oneshot::Sender<()>),
}

/// The [`BackupSink`] the writer thread calls: queues owned commands for the sink task.
struct Bridge {
    tx: mpsc::Sender<Vec<Command>>,
    batch: Vec<Command>,
    batch_bytes: usize,
    /// The sink task's first error, sent as soon as it happens.
    failed: oneshot::Receiver<Error>,
    entries: bool,
}

impl Bridge {
    fn push(&mut self, command: Command, bytes: usize) -> Result<()> {
        self.batch.push(command);
        self.batch_bytes += bytes;
        if self.batch_bytes >= BRIDGE_BATCH_BYTES || self.batch.len() >= BRIDGE_BATCH_COMMANDS {
            self.flush()?;
        }
        Ok(())
    }

    /// Hands the batch over; fails with the sink's error once it has one.
    fn flush(&mut self) -> Result<()> {
        if let Ok(error) = self.failed.try_recv() {
            // What is queued would be discarded by the task anyway.
            self.batch.clear();
            return Err(error);
        }
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(64));
        self.batch_bytes = 0;
        // Waits while the sink task is `BRIDGE_CAPACITY` batches behind.
        if self.tx.blocking_send(batch).is_err() {
            return Err(self.task_gone());
        }
        Ok(())
    }

    /// The sink task stopped: its error, or else it panicked.
    fn task_gone(&mut self) -> Error {
        self.failed
            .try_recv()
            .unwrap_or_else(|_| Error::writer_panicked("the asynchronous sink's task stopped"))
    }
}

impl BackupSink for Bridge {
    // The calls that start something are handed over at once, so that the sink can
    // refuse early (bad credentials, a missing bucket) before data piles up.
    fn begin_backup(&mut self, info: &BackupInfo) -> Result<()> {
        self.push(Command::BeginBackup(info.clone()), 0)?;
        self.flush()
    }

    fn begin_archive(&mut self, archive: &ArchiveInfo) -> Result<()> {
        self.push(Command::BeginArchive(archive.clone()), 0)?;
        self.flush()
    }

    fn compressed_bytes(&mut self, data: &Bytes) -> Result<()> {
        self.push(Command::Compressed(data.clone()), data.len())
    }

    fn archive_bytes(&mut self, data: &Bytes) -> Result<()> {
        self.push(Command::Archive(data.clone()), data.len())
    }

    fn entry(&mut self, event: &TarEvent) -> Result<()> {
        if !self.entries {
            return Ok(());
        }
        let bytes = match event {
            TarEvent::Data(d) => d.len(),
            _ => 0,
        };
        self.push(Command::Entry(event.clone()), bytes)
    }

    fn end_archive(&mut self, trailer_present: bool) -> Result<()> {
        self.push(Command::EndArchive(trailer_present), 0)?;
        self.flush()
    }

    fn commit(&mut self, manifest: Option<&[u8]>) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.batch
            .push(Command::Commit(manifest.map(Bytes::copy_from_slice), reply));
        self.flush()?;
        match answer.blocking_recv() {
            Ok(result) => result,
            Err(_) => Err(self.task_gone()),
        }
    }

    fn abort(&mut self, reason: &Error) {
        let (done, finished) = oneshot::channel();
        // Data not yet handed over is of no use any more.
        self.batch.clear();
        self.batch.push(Command::Abort(reason.clone(), done));
        let batch = std::mem::take(&mut self.batch);
        // A task that already stopped has nothing left to abort.
        if self.tx.blocking_send(batch).is_ok() {
            let _ = finished.blocking_recv();
        }
    }
}

/// The sink task: runs the commands in order; after the first error it only answers
/// `commit` (with that error) and runs `abort`. Aborts by itself when the writer went
/// away after the first command without either (it panicked).
async fn drive<S: AsyncBackupSink>(
    mut sink: S,
    mut rx: mpsc::Receiver<Vec<Command>>,
    failed: oneshot::Sender<Error>,
) -> S {
    let mut failed = Some(failed);
    let mut first_error: Option<Error> = None;
    let mut finished = false;
    let mut began = false;
    while let Some(batch) = rx.recv().await {
        began = true;
        for command in batch {
            let result = match command {
                Command::Commit(manifest, reply) => {
                    let result = match &first_error {
                        Some(e) => Err(e.clone()),
                        None if finished => Err(Error::usage(
                            "commit after the backup ended",
                            "report this as a bug",
                        )),
                        None => sink.commit(manifest).await,
                    };
                    if result.is_ok() {
                        finished = true;
                    }
                    let outcome = result.as_ref().map(|_| ()).map_err(Clone::clone);
                    let _ = reply.send(result);
                    outcome
                }
                Command::Abort(reason, done) => {
                    if !finished {
                        finished = true;
                        sink.abort(&reason).await;
                    }
                    let _ = done.send(());
                    Ok(())
                }
                _ if first_error.is_some() || finished => Ok(()),
                Command::BeginBackup(info) => sink.begin_backup(&info).await,
                Command::BeginArchive(archive) => sink.begin_archive(&archive).await,
                Command::Compressed(data) => sink.compressed_bytes(data).await,
                Command::Archive(data) => sink.archive_bytes(data).await,
                Command::Entry(event) => sink.entry(event).await,
                Command::EndArchive(trailer) => sink.end_archive(trailer).await,
            };
            if let Err(e) = result {
                if first_error.is_none() {
                    if let Some(failed) = failed.take() {
                        let _ = failed.send(e.clone());
                    }
                    first_error = Some(e);
                }
            }
        }
    }
    // A backup that failed before the writer started never called the sink.
    if began && !finished {
        let reason = first_error.unwrap_or_else(|| {
            Error::writer_panicked("the writer thread stopped without committing or aborting")
        });
        sink.abort(&reason).await;
    }
    sink
}

impl BaseBackup {
    /// [`receive`](BaseBackup::receive) into an [`AsyncBackupSink`]: receives the
    /// archives, verifies them against the manifest, commits, and gives the sink back.
    /// On a failure the sink's `abort` runs, with the reason, before this returns (a
    /// failure before its first call, reading the tablespace list, only drops it).
    ///
    /// The sink runs as a task on the current runtime, fed by the writer thread through
    /// a bounded channel (see the [module documentation](crate::async_sink)): memory
    /// stays bounded and no thread blocks on the sink's futures.
    ///
    /// Cancel safety: not resumable. Dropping the future abandons the backup: the
    /// connection is closed, and the sink's task keeps running until it has run `abort`
    /// with an [`ErrorKind::Cancelled`](crate::ErrorKind::Cancelled) reason, then drops
    /// the sink.
    ///
    /// ```no_run
    /// # use basebackup::{ArchiveInfo, AsyncBackupSink, BackupInfo, Bytes, Error, Result};
    /// # struct Upload;
    /// # impl AsyncBackupSink for Upload {
    /// #     async fn begin_backup(&mut self, _: &BackupInfo) -> Result<()> { Ok(()) }
    /// #     async fn begin_archive(&mut self, _: &ArchiveInfo) -> Result<()> { Ok(()) }
    /// #     async fn end_archive(&mut self, _: bool) -> Result<()> { Ok(()) }
    /// #     async fn commit(&mut self, _: Option<Bytes>) -> Result<()> { Ok(()) }
    /// #     async fn abort(&mut self, _: &Error) {}
    /// # }
    /// # async fn demo() -> basebackup::Result<()> {
    /// let config = pgwire_repl::Config::parse_with_env("host=primary user=replicator")?;
    /// let client = pgwire_repl::ReplicationClient::connect(&config).await?;
    /// let backup = basebackup::BaseBackup::start(client, basebackup::BackupOptions::default()).await?;
    /// let (result, _upload) = backup.receive_async(Upload, None).await?;
    /// println!("stored and verified, consistent at {}", result.end_lsn);
    /// # Ok(()) }
    /// ```
    pub async fn receive_async<S: AsyncBackupSink>(
        self,
        sink: S,
        progress: Option<ProgressFn>,
    ) -> Result<(BackupResult, S)> {
        let (tx, rx) = mpsc::channel(BRIDGE_CAPACITY);
        let (failed_tx, failed_rx) = oneshot::channel();
        let entries = sink.wants_entries();
        let task = tokio::spawn(drive(sink, rx, failed_tx));
        let bridge = Bridge {
            tx,
            batch: Vec::with_capacity(64),
            batch_bytes: 0,
            failed: failed_rx,
            entries,
        };
        // The bridge comes back (or is dropped) when the writer has finished; dropping
        // it closes the channel, so the task ends once it has run everything queued.
        let result = self
            .receive(bridge, progress)
            .await
            .map(|(result, _)| result);
        let sink = match task.await {
            Ok(sink) => sink,
            Err(join) => {
                return Err(match result {
                    Err(e) => e,
                    Ok(_) => {
                        Error::writer_panicked(format!("the asynchronous sink's task: {join}"))
                    }
                })
            }
        };
        result.map(|result| (result, sink))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    const CHUNK: usize = 64 * 1024;

    fn bridge(tx: mpsc::Sender<Vec<Command>>, failed: oneshot::Receiver<Error>) -> Bridge {
        Bridge {
            tx,
            batch: Vec::new(),
            batch_bytes: 0,
            failed,
            entries: true,
        }
    }

    fn archive() -> ArchiveInfo {
        ArchiveInfo {
            name: "base.tar".into(),
            tablespace: crate::Tablespace {
                oid: None,
                location: None,
                size_estimate: None,
            },
            compression: None,
        }
    }

    /// Pushes `chunks` archive chunks through `bridge` on a plain thread (the writer);
    /// counts the bytes accepted.
    fn writer(
        mut bridge: Bridge,
        chunks: usize,
        accepted: Arc<AtomicUsize>,
    ) -> std::thread::JoinHandle<(Result<()>, Bridge)> {
        std::thread::spawn(move || {
            let run = |bridge: &mut Bridge| -> Result<()> {
                bridge.begin_archive(&archive())?;
                let chunk = Bytes::from(vec![7u8; CHUNK]);
                for _ in 0..chunks {
                    bridge.archive_bytes(&chunk)?;
                    accepted.fetch_add(CHUNK, Ordering::SeqCst);
                }
                bridge.end_archive(true)
            };
            let result = run(&mut bridge);
            (result, bridge)
        })
    }

    #[test]
    fn a_sink_that_does_not_keep_up_holds_the_writer_back() {
        let (tx, mut rx) = mpsc::channel(BRIDGE_CAPACITY);
        let (_failed_tx, failed_rx) = oneshot::channel();
        let accepted = Arc::new(AtomicUsize::new(0));
        // 64 MiB offered; nobody takes anything from the channel.
        let handle = writer(bridge(tx, failed_rx), 1024, accepted.clone());
        std::thread::sleep(Duration::from_millis(300));
        let held = accepted.load(Ordering::SeqCst);
        let bound = (BRIDGE_CAPACITY + 1) * BRIDGE_BATCH_BYTES;
        assert!(
            // One slot holds the begin_archive batch.
            held >= (BRIDGE_CAPACITY - 1) * BRIDGE_BATCH_BYTES && held <= bound,
            "{held} bytes handed over without a consumer (bound {bound})"
        );
        // Once the sink takes them, everything arrives, in order.
        let mut bytes = 0;
        let mut kinds = Vec::new();
        while kinds.last() != Some(&"end") {
            let batch = rx.blocking_recv().expect("the writer went away");
            for command in batch {
                match command {
                    Command::Archive(d) => bytes += d.len(),
                    Command::BeginArchive(_) => kinds.push("begin"),
                    Command::EndArchive(_) => kinds.push("end"),
                    _ => kinds.push("other"),
                }
            }
        }
        let (result, _) = handle.join().unwrap();
        result.unwrap();
        assert_eq!((bytes, kinds), (1024 * CHUNK, vec!["begin", "end"]));
    }

    /// Fails its second data call; records its abort.
    struct Failing {
        calls: usize,
        aborted: Option<Error>,
    }

    impl AsyncBackupSink for Failing {
        async fn begin_backup(&mut self, _: &BackupInfo) -> Result<()> {
            Ok(())
        }
        async fn begin_archive(&mut self, _: &ArchiveInfo) -> Result<()> {
            Ok(())
        }
        async fn archive_bytes(&mut self, _: Bytes) -> Result<()> {
            self.calls += 1;
            if self.calls == 2 {
                return Err(Error::sink("the store is full", "free space"));
            }
            Ok(())
        }
        async fn end_archive(&mut self, _: bool) -> Result<()> {
            Ok(())
        }
        async fn commit(&mut self, _: Option<Bytes>) -> Result<()> {
            panic!("committed after a failure");
        }
        async fn abort(&mut self, reason: &Error) {
            assert!(self.aborted.is_none(), "aborted twice");
            self.aborted = Some(reason.clone());
        }
    }

    #[test]
    fn the_sinks_first_error_stops_the_writer_soon_and_reaches_abort() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let (tx, rx) = mpsc::channel(BRIDGE_CAPACITY);
        let (failed_tx, failed_rx) = oneshot::channel();
        let task = runtime.spawn(drive(
            Failing {
                calls: 0,
                aborted: None,
            },
            rx,
            failed_tx,
        ));
        let accepted = Arc::new(AtomicUsize::new(0));
        // 64 MiB offered; the sink fails on its second chunk.
        let (result, mut bridge) = writer(bridge(tx, failed_rx), 1024, accepted.clone())
            .join()
            .unwrap();
        let e = result.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Sink, "{e}");
        let held = accepted.load(Ordering::SeqCst);
        assert!(
            held <= (BRIDGE_CAPACITY + 3) * BRIDGE_BATCH_BYTES,
            "the writer went on for {held} bytes after the sink failed"
        );
        // What the pipeline does next: abort with the error, then a commit is refused.
        bridge.abort(&e);
        drop(bridge);
        let sink = runtime.block_on(task).unwrap();
        let reason = sink.aborted.expect("abort did not run");
        assert!(reason.to_string().contains("the store is full"), "{reason}");
    }

    #[test]
    fn commit_waits_for_the_sinks_answer() {
        struct Slow(bool);
        impl AsyncBackupSink for Slow {
            async fn begin_backup(&mut self, _: &BackupInfo) -> Result<()> {
                Ok(())
            }
            async fn begin_archive(&mut self, _: &ArchiveInfo) -> Result<()> {
                Ok(())
            }
            async fn end_archive(&mut self, _: bool) -> Result<()> {
                Ok(())
            }
            async fn commit(&mut self, manifest: Option<Bytes>) -> Result<()> {
                tokio::time::sleep(Duration::from_millis(200)).await;
                self.0 = manifest.as_deref() == Some(&b"{}"[..]);
                Err(Error::sink("the final rename failed", "retry").retryable(true))
            }
            async fn abort(&mut self, _: &Error) {}
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_time()
            .build()
            .unwrap();
        let (tx, rx) = mpsc::channel(BRIDGE_CAPACITY);
        let (failed_tx, failed_rx) = oneshot::channel();
        let task = runtime.spawn(drive(Slow(false), rx, failed_tx));
        let mut bridge = bridge(tx, failed_rx);
        let started = std::time::Instant::now();
        let e = std::thread::spawn(move || bridge.commit(Some(b"{}")))
            .join()
            .unwrap()
            .unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(
            e.is_retryable() && e.to_string().contains("final rename"),
            "{e}"
        );
        assert!(
            runtime.block_on(task).unwrap().0,
            "the manifest did not arrive"
        );
    }
}
