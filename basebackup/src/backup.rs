//! The async side: send `BASE_BACKUP`, read both response framings, feed the writer.

use std::time::Duration;

use bytes::Bytes;
use pgwire_repl::proto::backend::BackendMessage;
use pgwire_repl::proto::frontend;
use pgwire_repl::{Config, Connection, Lsn, ReplicationClient, TimelineId};
use tokio::sync::mpsc;

use crate::command::{build_command, BackupOptions, CompressionMethod, ManifestMode};
use crate::demux::{self, StreamMessage};
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::pipeline::{self, Msg};
use crate::sink::{ArchiveInfo, BackupInfo, BackupSink, Tablespace};

/// Messages in flight between the network and the writer thread. With CopyData slices of
/// a 256 KiB receive buffer this keeps memory well under 64 MiB.
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
/// ```no_run
/// # async fn demo() -> basebackup::Result<()> {
/// use basebackup::{BaseBackup, BackupOptions, PlainDirSink};
/// let config = pgwire_repl::Config::parse_with_env("host=primary user=replicator")?;
/// let client = pgwire_repl::ReplicationClient::connect(&config).await?;
/// let backup = BaseBackup::start(client, BackupOptions::default()).await?;
/// // Start WAL streaming on a second connection from here.
/// println!("starts at {} on timeline {}", backup.start_lsn(), backup.timeline());
/// let result = backup.receive(Box::new(PlainDirSink::new("/backup/data")), None).await?;
/// println!("ends at {}", result.end_lsn);
/// # Ok(()) }
/// ```
pub struct BaseBackup {
    conn: Connection,
    options: BackupOptions,
    major: u32,
    start_lsn: Lsn,
    timeline: TimelineId,
    tablespaces: Option<Vec<Tablespace>>,
}

impl std::fmt::Debug for BaseBackup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BaseBackup")
            .field("server_major", &self.major)
            .field("start_lsn", &self.start_lsn)
            .field("timeline", &self.timeline)
            .field("tablespaces", &self.tablespaces)
            .finish()
    }
}

/// Connects, takes a backup into `sink` and verifies it: the one-call form of
/// [`BaseBackup::start`] + [`BaseBackup::receive`].
pub async fn backup(
    config: &Config,
    options: BackupOptions,
    sink: Box<dyn BackupSink>,
) -> Result<BackupResult> {
    let client = ReplicationClient::connect(config).await?;
    BaseBackup::start(client, options)
        .await?
        .receive(sink, None)
        .await
}

fn text(value: &Option<Bytes>, what: &str) -> Result<Option<String>> {
    match value {
        None => Ok(None),
        Some(b) => String::from_utf8(b.to_vec())
            .map(Some)
            .map_err(|_| Error::protocol(format!("{what} is not UTF-8"))),
    }
}

/// Reads one result set (RowDescription, DataRows, CommandComplete).
async fn read_result_set(conn: &mut Connection, what: &str) -> Result<Vec<Vec<Option<Bytes>>>> {
    let mut rows = Vec::new();
    let mut described = false;
    loop {
        match conn.read_message().await? {
            BackendMessage::RowDescription(_) if !described => described = true,
            BackendMessage::DataRow(row) if described => rows.push(row),
            BackendMessage::CommandComplete { .. } if described => return Ok(rows),
            BackendMessage::ErrorResponse(db) => {
                return Err(
                    pgwire_repl::Error::server(format!("BASE_BACKUP failed ({what})"), db).into(),
                )
            }
            other => return Err(Error::protocol(format!("expected {what}, got {other:?}"))),
        }
    }
}

fn position(rows: &[Vec<Option<Bytes>>], what: &str) -> Result<(Lsn, TimelineId)> {
    let row = rows
        .first()
        .ok_or_else(|| Error::protocol(format!("no row with the {what}")))?;
    let lsn: Lsn = text(row.first().unwrap_or(&None), what)?
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::protocol(format!("invalid {what} LSN")))?;
    let tli = text(row.get(1).unwrap_or(&None), what)?
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::protocol(format!("invalid {what} timeline")))?;
    Ok((lsn, TimelineId(tli)))
}

impl BaseBackup {
    /// Sends `BASE_BACKUP` with `options` and returns as soon as the server reports the
    /// start position (after its checkpoint), so that WAL streaming can begin on a second
    /// connection before the data flows.
    pub async fn start(client: ReplicationClient, options: BackupOptions) -> Result<BaseBackup> {
        let major = client.server_major();
        let command = build_command(&options, major)?;
        let mut conn = client.into_connection();
        frontend::query(&command, conn.write_buf())?;
        conn.flush().await?;
        let rows = read_result_set(&mut conn, "the start position").await?;
        let (start_lsn, timeline) = position(&rows, "start")?;
        Ok(BaseBackup {
            conn,
            options,
            major,
            start_lsn,
            timeline,
            tablespaces: None,
        })
    }

    /// The server's tablespaces, base directory last; read from the server on the first
    /// call (with PROGRESS the server sizes every tablespace first).
    pub async fn read_tablespaces(&mut self) -> Result<&[Tablespace]> {
        if self.tablespaces.is_none() {
            let rows = read_result_set(&mut self.conn, "the tablespace list").await?;
            let mut tablespaces = Vec::new();
            for row in &rows {
                let oid = text(row.first().unwrap_or(&None), "spcoid")?
                    .map(|s| {
                        s.parse::<u32>()
                            .map_err(|_| Error::protocol("invalid tablespace OID"))
                    })
                    .transpose()?;
                let location = text(row.get(1).unwrap_or(&None), "spclocation")?;
                let size_estimate = text(row.get(2).unwrap_or(&None), "size")?
                    .and_then(|s| s.parse::<u64>().ok())
                    .map(|kb| kb * 1024);
                tablespaces.push(Tablespace {
                    oid,
                    location,
                    size_estimate,
                });
            }
            if tablespaces.last().is_none_or(|t| t.oid.is_some()) {
                return Err(Error::protocol(
                    "the tablespace list does not end with the base directory",
                ));
            }
            self.tablespaces = Some(tablespaces);
        }
        Ok(self.tablespaces.as_deref().unwrap_or_default())
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

    /// Receives the archives into `sink`, verifies them against the manifest and commits.
    /// On any failure the sink is told to abort (removing what it created).
    pub async fn receive(
        mut self,
        mut sink: Box<dyn BackupSink>,
        progress: Option<ProgressFn>,
    ) -> Result<BackupResult> {
        self.read_tablespaces().await?;
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let algorithm = self.options.manifest_checksums;
        let manifest_expected = self.options.manifest != ManifestMode::No;
        let writer = tokio::task::spawn_blocking(move || {
            pipeline::run(rx, sink.as_mut(), algorithm, manifest_expected)
        });
        let net = self.receive_stream(&tx, progress).await;
        self.conn.set_bulk_receive(0);
        match net {
            Ok((end_lsn, end_timeline, bytes)) => {
                // Only now, after the server's final CommandComplete, may the writer commit.
                let _ = tx.send(Msg::End).await;
                drop(tx);
                let outcome = join(writer).await?;
                Ok(BackupResult {
                    start_lsn: self.start_lsn,
                    start_timeline: self.timeline,
                    end_lsn,
                    end_timeline,
                    bytes,
                    files: outcome.files,
                    manifest: outcome.manifest,
                })
            }
            Err(net_err) => {
                drop(tx);
                // A writer error (verification, unsafe entry, disk) is the root cause when
                // it made the network side stop; otherwise report the network error.
                match join(writer).await {
                    Err(w) if net_err.message().contains(WRITER_GONE) => Err(w),
                    _ => Err(net_err),
                }
            }
        }
    }

    async fn receive_stream(
        &mut self,
        tx: &mpsc::Sender<Msg>,
        mut progress: Option<ProgressFn>,
    ) -> Result<(Lsn, TimelineId, u64)> {
        let tablespaces = self.tablespaces.clone().unwrap_or_default();
        let info = BackupInfo {
            server_major: self.major,
            start_lsn: self.start_lsn,
            timeline: self.timeline,
            tablespaces: tablespaces.clone(),
        };
        let mut out = Outbox::new(tx);
        out.send(Msg::Begin(info)).await?;
        let total_estimate = tablespaces
            .iter()
            .map(|t| t.size_estimate)
            .sum::<Option<u64>>();
        let archives = tablespaces.len();
        let mut state = ProgressState {
            cb: progress.take(),
            p: Progress {
                archive: String::new(),
                tablespace: None,
                archive_index: 0,
                archives,
                archive_bytes: 0,
                archive_estimate: None,
                bytes_done: 0,
                total_estimate,
            },
            archive_start: 0,
            last_report: 0,
        };
        let manifest_expected = self.options.manifest != ManifestMode::No;
        // Every read of the copy stream is bounded by `idle_timeout`, so that a server or
        // link that stalls mid-copy fails the backup instead of hanging it forever.
        let idle = self.options.idle_timeout;
        let conn = &mut self.conn;
        conn.set_bulk_receive(BULK_RECEIVE_BYTES);
        if self.major >= 15 {
            expect_copy_out(conn, idle, &mut out).await?;
            let mut in_manifest = false;
            let mut index = 0usize;
            while let Some(payload) = next_copy_data(
                conn,
                idle,
                &mut out,
                "BASE_BACKUP failed during the transfer",
            )
            .await?
            {
                match demux::parse(payload)? {
                    StreamMessage::NewArchive { name, location } => {
                        if in_manifest {
                            return Err(Error::protocol("a new archive after the manifest"));
                        }
                        let ts = tablespaces.get(index).cloned().ok_or_else(|| {
                            Error::protocol(format!("archive {name} is not in the tablespace list"))
                        })?;
                        if ts.location.as_deref().unwrap_or("") != location {
                            return Err(Error::protocol(format!(
                                    "archive {name} has location {location:?}, the tablespace list says {:?}",
                                    ts.location
                                )));
                        }
                        let compression = [
                            CompressionMethod::Gzip,
                            CompressionMethod::Lz4,
                            CompressionMethod::Zstd,
                        ]
                        .into_iter()
                        .find(|m| name.ends_with(m.suffix()));
                        let expected_compression = self.options.compression.map(|c| c.method);
                        if compression != expected_compression
                            || !name
                                .trim_end_matches(compression.map_or("", |m| m.suffix()))
                                .ends_with(".tar")
                        {
                            return Err(Error::protocol(format!(
                                "unexpected archive name {name:?}"
                            )));
                        }
                        state.start_archive(&name, &ts, index);
                        out.send(Msg::Archive(ArchiveInfo {
                            name,
                            tablespace: ts,
                            compression,
                        }))
                        .await?;
                        index += 1;
                    }
                    StreamMessage::Data(d) => {
                        if index == 0 && !in_manifest {
                            return Err(Error::protocol("archive data before the first archive"));
                        }
                        if in_manifest {
                            out.send(Msg::Manifest(d)).await?;
                        } else {
                            out.data(d).await?;
                        }
                    }
                    StreamMessage::Progress(done) => state.report(done, true),
                    StreamMessage::Manifest => {
                        if !manifest_expected || in_manifest {
                            return Err(Error::protocol("unexpected manifest"));
                        }
                        in_manifest = true;
                    }
                }
            }
            if index != tablespaces.len() {
                return Err(Error::protocol(format!(
                    "the server sent {index} archives, its tablespace list has {}",
                    tablespaces.len()
                )));
            }
            if manifest_expected && !in_manifest {
                return Err(Error::verify(
                    "backup_manifest",
                    "the server sent no manifest",
                ));
            }
        } else {
            for (index, ts) in tablespaces.clone().into_iter().enumerate() {
                expect_copy_out(conn, idle, &mut out).await?;
                let name = match ts.oid {
                    Some(oid) => format!("{oid}.tar"),
                    None => "base.tar".into(),
                };
                state.start_archive(&name, &ts, index);
                out.send(Msg::Archive(ArchiveInfo {
                    name,
                    tablespace: ts,
                    compression: None,
                }))
                .await?;
                let mut done = state.archive_start;
                while let Some(d) = next_copy_data(
                    conn,
                    idle,
                    &mut out,
                    "BASE_BACKUP failed during the transfer",
                )
                .await?
                {
                    done += d.len() as u64;
                    out.data(d).await?;
                    state.report(done, false);
                }
                state.report(done, true);
            }
            if manifest_expected {
                expect_copy_out(conn, idle, &mut out).await?;
                while let Some(d) = next_copy_data(
                    conn,
                    idle,
                    &mut out,
                    "BASE_BACKUP failed sending the manifest",
                )
                .await?
                {
                    out.send(Msg::Manifest(d)).await?;
                }
            }
        }
        out.flush().await?;
        let rows = read_result_set(conn, "the end position").await?;
        let (end_lsn, end_tli) = position(&rows, "end")?;
        // An error here (XX001: page checksum failures) fails the backup.
        loop {
            match conn.read_message_timeout(Duration::from_secs(300)).await? {
                BackendMessage::CommandComplete { .. } => {}
                BackendMessage::ReadyForQuery { .. } => break,
                BackendMessage::ErrorResponse(db) => {
                    let advice = if db.code == "XX001" {
                        "the server found damaged data pages (see the WARNINGs in its log); repair or restore the damaged relations before taking a backup, or turn off verify_checksums to copy them as they are"
                    } else {
                        "see the server log"
                    };
                    let e: Error = pgwire_repl::Error::server("BASE_BACKUP failed at the end", db)
                        .with_advice(advice)
                        .into();
                    return Err(e);
                }
                other => {
                    return Err(Error::protocol(format!(
                        "expected CommandComplete, got {other:?}"
                    )))
                }
            }
        }
        Ok((end_lsn, end_tli, state.p.bytes_done))
    }
}

const WRITER_GONE: &str = "the writer stopped";

async fn send(tx: &mpsc::Sender<Msg>, msg: Msg) -> Result<()> {
    tx.send(msg).await.map_err(|_| Error::protocol(WRITER_GONE))
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

    async fn data(&mut self, chunk: Bytes) -> Result<()> {
        self.batch_bytes += chunk.len();
        self.batch.push(chunk);
        if self.batch_bytes >= BATCH_BYTES {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        if !self.batch.is_empty() {
            let batch = std::mem::take(&mut self.batch);
            self.batch_bytes = 0;
            send(self.tx, Msg::Data(batch)).await?;
        }
        Ok(())
    }

    async fn send(&mut self, msg: Msg) -> Result<()> {
        self.flush().await?;
        send(self.tx, msg).await
    }
}

async fn join(
    writer: tokio::task::JoinHandle<Result<pipeline::Outcome>>,
) -> Result<pipeline::Outcome> {
    match writer.await {
        Ok(r) => r,
        Err(e) => Err(Error::protocol(format!("the writer thread failed: {e}"))),
    }
}

/// The archive stream is read in steps of at least this much while it flows fast (see
/// `Connection::set_bulk_receive`): one wake-up per 256 KiB instead of per few segments.
const BULK_RECEIVE_BYTES: u32 = 256 * 1024;

/// How long archive data may wait in the writer's batch while the server sends nothing.
const BATCH_IDLE_FLUSH: Duration = Duration::from_millis(100);

/// Reads the next message of the copy stream, failing with a `Timeout` error when the
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
) -> Result<BackendMessage> {
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
        () = tx.closed() => Err(Error::protocol(WRITER_GONE)),
    }
}

/// The next CopyData payload of an archive or manifest copy, or `None` at CopyDone;
/// a server error is reported with `during` as its context.
async fn next_copy_data(
    conn: &mut Connection,
    idle: Option<Duration>,
    out: &mut Outbox<'_>,
    during: &str,
) -> Result<Option<Bytes>> {
    match read_copy(conn, idle, out).await? {
        BackendMessage::CopyData(payload) => Ok(Some(payload)),
        BackendMessage::CopyDone => Ok(None),
        BackendMessage::ErrorResponse(db) => Err(pgwire_repl::Error::server(during, db).into()),
        other => Err(Error::protocol(format!("expected CopyData, got {other:?}"))),
    }
}

async fn expect_copy_out(
    conn: &mut Connection,
    idle: Option<Duration>,
    out: &mut Outbox<'_>,
) -> Result<()> {
    match read_copy(conn, idle, out).await? {
        BackendMessage::CopyOutResponse(_) => Ok(()),
        BackendMessage::ErrorResponse(db) => {
            Err(pgwire_repl::Error::server("BASE_BACKUP failed", db).into())
        }
        other => Err(Error::protocol(format!(
            "expected CopyOutResponse, got {other:?}"
        ))),
    }
}

struct ProgressState {
    cb: Option<ProgressFn>,
    p: Progress,
    archive_start: u64,
    last_report: u64,
}

impl ProgressState {
    fn start_archive(&mut self, name: &str, ts: &Tablespace, index: usize) {
        self.archive_start = self.p.bytes_done;
        self.p.archive = name.to_owned();
        self.p.tablespace = ts.oid;
        self.p.archive_index = index;
        self.p.archive_bytes = 0;
        self.p.archive_estimate = ts.size_estimate;
    }

    /// `force` reports at once; otherwise at most every MiB.
    fn report(&mut self, done: u64, force: bool) {
        self.p.bytes_done = done.max(self.p.bytes_done);
        self.p.archive_bytes = self.p.bytes_done.saturating_sub(self.archive_start);
        if let Some(cb) = self.cb.as_mut() {
            if force || self.p.bytes_done - self.last_report >= 1 << 20 {
                self.last_report = self.p.bytes_done;
                cb(&self.p);
            }
        }
    }
}
