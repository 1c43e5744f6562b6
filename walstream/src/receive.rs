//! [`receive_wal`]: the whole WAL receiver, equivalent to pg_receivewal, and
//! [`receive_wal_into`]: the same receiver writing into any [`WalDestination`].
//!
//! It connects, picks the start (the destination, else the slot, else the server's
//! position), fetches missing timeline history files, streams through
//! [`WalStream`], verifies every byte with [`WalVerifier`] before it is written, hands
//! it to the destination's [`WalWriter`] (the local directory writes on a dedicated
//! thread, so the network side never waits for the disk), reports what the destination
//! holds durably as the flush position, follows timeline switches and reconnects after
//! a lost connection as its [`ReconnectPolicy`] says, reporting each step as a
//! [`ReceiverEvent`].
//!
//! # What is reported as flushed
//!
//! The flush position of every status update is [`WalWriter::durable`]: WAL the
//! destination holds durably, verified record by record. It moves a slot's
//! `restart_lsn`, so the server keeps everything after it.
//!
//! - A local directory ([`LocalDir`]) counts a segment as durable once it is complete:
//!   every byte written and verified, fsynced and renamed to its final name (the rename
//!   and the directory fsynced too). With `synchronous` every write is fsynced and
//!   reported at once. This is what pg_receivewal reports (its position at the last
//!   closed segment, or at each fsync with `--synchronous`), so a slot stays at most one
//!   segment behind what the directory holds, whatever the load, and moves with the next
//!   status update (every `status_interval`, 10 s by default) without a reconnect.
//! - An object store destination counts what its uploads have finished.
//! - Without a slot and outside synchronous mode, the flush position sent is 0 (as
//!   pg_receivewal), so the receiver never counts as a synchronous standby by accident.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use pgwire_repl::{Config, Lsn, ReplicationClient, SystemId, TimelineId, WalSegmentSize};

use crate::decode::{VerifierConfig, WalVerifier};
use crate::destination::{LocalDir, WalDestination, WalWriter};
use crate::error::{Error, Result};
use crate::reconnect::{EventHandler, ReceiverEvent, ReconnectPolicy};
use crate::stream::{StreamOptions, WalStream, DEFAULT_IDLE_TIMEOUT, DEFAULT_STATUS_INTERVAL};
use crate::waldir::WalDirOptions;
use crate::StreamEvent;

/// How long a stop after an error may take before the connection is just dropped.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Options of [`receive_wal`]; start from [`ReceiveOptions::new`] and set fields.
///
/// ```
/// use pgwire_repl::Lsn;
/// use walstream::ReceiveOptions;
///
/// let mut options = ReceiveOptions::new("/var/lib/wal-archive");
/// options.slot = Some("archive".into());
/// options.create_slot = true;
/// options.endpos = Some(Lsn(0x9000000));
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ReceiveOptions {
    /// The WAL directory (created if missing) of [`receive_wal`];
    /// [`receive_wal_into`] does not use it.
    pub directory: PathBuf,
    /// Stream from this physical slot (its restart_lsn follows the flushed position).
    pub slot: Option<String>,
    /// Create the slot (with RESERVE_WAL) if it does not exist.
    pub create_slot: bool,
    /// Stop once everything up to here is written and flushed (pg_receivewal
    /// `--endpos`). As pg_receivewal, nothing past the end of the segment holding it is
    /// written: a segment that ends at or after it is completed (once its last record is
    /// verified, which may take WAL from the next segment, read but not written), and a
    /// segment that reaches it only partly stays `.partial`. A timeline switch before it
    /// is followed, as pg_receivewal does; for `endpos_updates` (a base backup's end, on
    /// the backup's timeline) it is an error.
    pub endpos: Option<Lsn>,
    /// fsync and report the flush position after every write (pg_receivewal
    /// `--synchronous`); needed to act as a synchronous standby.
    pub synchronous: bool,
    /// fsync and compression (pg_receivewal `--no-sync`, `--compress`) of
    /// [`receive_wal`]'s directory.
    pub dir_options: WalDirOptions,
    /// Report the flushed position to the server. `None` (the default) does as
    /// pg_receivewal: report it with a slot or in synchronous mode, else report 0, so
    /// that this receiver never counts as a synchronous standby by accident.
    pub report_flush: Option<bool>,
    /// Periodic status updates (default 10 s).
    pub status_interval: Option<Duration>,
    /// The dead-peer bound, as PostgreSQL's `wal_receiver_timeout` (default 60 s): when
    /// the server has sent nothing for half of it, a status update asks for an immediate
    /// reply (a live walsender answers with a keepalive, idle or not); only when that
    /// request stays unanswered for the other half is the connection taken as dead, and
    /// the receiver reconnects. `None` waits forever (TCP keepalives, set in the
    /// connection string as in libpq, still apply).
    pub idle_timeout: Option<Duration>,
    /// Return instead of reconnecting when the connection is lost or the server shuts
    /// down (pg_receivewal `--no-loop`).
    pub no_loop: bool,
    /// When to reconnect after a lost connection and when to give up (default: at once,
    /// then every 5 s, giving up after 5 minutes without a streaming connection).
    pub reconnect: ReconnectPolicy,
    /// Receives the connection events (streaming, disconnected, retrying, given up,
    /// timeline switches); see [`ReceiveOptions::on_event`].
    pub events: Option<EventHandler>,
    /// Decode and CRC-check every record (default true). Off, WAL is only checked for
    /// continuity.
    pub verify_records: bool,
    /// Where to start when the directory holds no segment, instead of the slot's
    /// restart_lsn or the server's position (rounded down to a segment start). A base
    /// backup's start LSN, for example; PostgreSQL 13/14 cannot read a slot's position.
    pub start_position: Option<Lsn>,
    /// Create `slot` as a TEMPORARY slot (with RESERVE_WAL) on each streaming
    /// connection, as `pg_basebackup -X stream` does; it disappears with the session.
    pub temporary_slot: bool,
    /// An end position that becomes known while streaming (a base backup's end LSN):
    /// once the channel holds `Some(lsn)`, it acts as `endpos`.
    pub endpos_updates: Option<tokio::sync::watch::Receiver<Option<Lsn>>>,
}

impl ReceiveOptions {
    /// Defaults for receiving into `directory`.
    pub fn new(directory: impl Into<PathBuf>) -> ReceiveOptions {
        ReceiveOptions {
            directory: directory.into(),
            slot: None,
            create_slot: false,
            endpos: None,
            synchronous: false,
            dir_options: WalDirOptions::default(),
            report_flush: None,
            status_interval: Some(DEFAULT_STATUS_INTERVAL),
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            no_loop: false,
            verify_records: true,
            reconnect: ReconnectPolicy::default(),
            events: None,
            start_position: None,
            temporary_slot: false,
            endpos_updates: None,
        }
    }

    /// Sets the callback that receives the connection events.
    ///
    /// ```
    /// let mut options = walstream::ReceiveOptions::new("/var/lib/wal-archive");
    /// options.on_event(|event| eprintln!("wal receiver: {event}"));
    /// ```
    pub fn on_event(
        &mut self,
        callback: impl Fn(&ReceiverEvent<'_>) + Send + Sync + 'static,
    ) -> &mut Self {
        self.events = Some(EventHandler::new(callback));
        self
    }

    fn emit(&self, event: ReceiverEvent<'_>) {
        if let Some(handler) = &self.events {
            handler.emit(&event);
        }
    }

    /// The end position in force now: `endpos`, else the latest value sent through
    /// `endpos_updates`.
    fn current_endpos(&self) -> Option<Lsn> {
        self.endpos
            .or_else(|| self.endpos_updates.as_ref().and_then(|rx| *rx.borrow()))
    }

    fn validate(&self) -> Result<()> {
        if self.synchronous && !self.dir_options.sync {
            return Err(Error::usage(
                "synchronous mode and no-sync contradict each other",
                "choose one: synchronous mode reports only fsynced WAL",
            ));
        }
        if self.temporary_slot && (self.slot.is_none() || self.create_slot) {
            return Err(Error::usage(
                "temporary_slot needs a slot name and excludes create_slot",
                "name the temporary slot in slot and leave create_slot off",
            ));
        }
        if self.create_slot && self.slot.is_none() {
            return Err(Error::usage(
                "create_slot is set but no slot is named",
                "set slot to the name of the slot to create",
            ));
        }
        if self.endpos.is_some_and(Lsn::is_invalid) {
            return Err(Error::usage(
                "endpos 0/0 is not a position",
                "leave endpos unset to stream without end",
            ));
        }
        Ok(())
    }
}

/// Why [`receive_wal`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EndReason {
    /// Everything up to the end position is written and flushed.
    EndPos,
    /// The shutdown future completed; streaming was stopped with CopyDone.
    Shutdown,
    /// The server shut down (`COPY 0`) and `no_loop` is set.
    ServerShutdown,
}

/// What [`receive_wal`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiveSummary {
    /// Why it returned.
    pub end_reason: EndReason,
    /// The timeline streamed last.
    pub timeline: TimelineId,
    /// The end of the WAL written.
    pub written: Lsn,
    /// The end of the WAL flushed and verified.
    pub flushed: Lsn,
    /// WAL bytes received (including bytes received again after a reconnection).
    pub bytes_received: u64,
    /// Segments completed (renamed to their final names).
    pub segments_completed: u64,
    /// Timeline switches followed.
    pub timeline_switches: u32,
    /// Reconnections after a lost connection.
    pub reconnects: u32,
}

/// Receives WAL into a directory until the end position, a shutdown request, or (with
/// `no_loop`) the loss of the connection.
///
/// `shutdown` is any future; when it completes, streaming stops cleanly (CopyDone, the
/// current segment flushed and left `.partial`) and the summary says
/// [`EndReason::Shutdown`]. Pass `std::future::pending()` to run until the end
/// position, or e.g. `async { tokio::signal::ctrl_c().await.ok(); }`.
///
/// Retryable failures ([`crate::Error::is_retryable`]: a lost connection, a dead peer, a
/// server shutting down), a missing slot ([`crate::Error::is_missing_slot`], which an
/// HA manager recreates on a new leader) and a slot still held by the previous
/// connection ([`crate::Error::is_slot_in_use`]) lead to a new connection as
/// `options.reconnect` says (at once, then every 5 s, by default), resuming from the
/// directory without a gap; each step is reported to `options.events`. Other failures
/// (a refused certificate or password, other server errors, verification errors, local
/// I/O errors) are returned, and so is the last failure once the policy gives up.
///
/// # Cancel safety
///
/// Stop it with `shutdown`, not by dropping the future. Dropping it loses no verified
/// WAL: the writer thread still writes and flushes what was queued, and a segment is
/// only completed once verified, so the next run resumes without a gap. But the
/// connection is dropped without CopyDone (the server logs an unexpected end of
/// file), and the last flushed position is not reported to the server (a slot stays
/// where the previous status update put it).
///
/// ```no_run
/// # async fn demo() -> walstream::Result<()> {
/// use walstream::{receive_wal, ReceiveOptions};
///
/// let config = pgwire_repl::Config::parse_with_env("host=primary user=repl")?;
/// let mut options = ReceiveOptions::new("/var/lib/wal-archive");
/// options.slot = Some("archive".into());
/// options.create_slot = true;
/// let summary = receive_wal(&config, &options, async {
///     let _ = tokio::signal::ctrl_c().await;
/// })
/// .await?;
/// println!("stopped at {} ({:?})", summary.flushed, summary.end_reason);
/// # Ok(()) }
/// ```
pub async fn receive_wal(
    config: &Config,
    options: &ReceiveOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<ReceiveSummary> {
    let destination = LocalDir::new(&options.directory, options.dir_options);
    receive_wal_into(config, options, destination, shutdown).await
}

/// [`receive_wal`] into any [`WalDestination`]: the same resume, verification,
/// timeline following, reconnects and end positions, with the destination deciding
/// where segments go and what is durable (reported to the server as flushed, so a slot
/// never moves past WAL the destination has not stored).
/// `options.directory` and `options.dir_options` are not used.
///
/// # Cancel safety
///
/// As [`receive_wal`]: stop it with `shutdown`. When the future is dropped instead, the
/// destination's writer is dropped without [`crate::WalWriter::close`], so what it does
/// with unflushed data is up to it.
///
/// ```no_run
/// # async fn demo() -> walstream::Result<()> {
/// let config = pgwire_repl::Config::parse_with_env("host=primary user=repl")?;
/// let mut options = walstream::ReceiveOptions::new("");
/// options.slot = Some("archive".into());
/// let wal = walstream::MemoryWal::new();
/// let summary = walstream::receive_wal_into(&config, &options, wal.clone(), async {
///     tokio::time::sleep(std::time::Duration::from_secs(10)).await;
/// })
/// .await?;
/// println!("{} complete segments, durable up to {}", wal.complete_segments().len(), summary.flushed);
/// # Ok(()) }
/// ```
pub async fn receive_wal_into<D: WalDestination>(
    config: &Config,
    options: &ReceiveOptions,
    destination: D,
    shutdown: impl Future<Output = ()>,
) -> Result<ReceiveSummary> {
    options.validate()?;
    let shutdown = std::pin::pin!(shutdown);
    let mut receiver = Receiver {
        config,
        options,
        destination,
        shutdown,
        system_id: None,
        slot_checked: false,
        streamed: false,
        summary: ReceiveSummary {
            end_reason: EndReason::Shutdown,
            timeline: TimelineId(1),
            written: Lsn::INVALID,
            flushed: Lsn::INVALID,
            bytes_received: 0,
            segments_completed: 0,
            timeline_switches: 0,
            reconnects: 0,
        },
    };
    let policy = options.reconnect;
    // Attempts since the last connection that streamed, and since when they fail.
    let mut attempt: u32 = 0;
    let mut failing_since: Option<tokio::time::Instant> = None;
    loop {
        receiver.streamed = false;
        let error = match receiver.session().await {
            Ok(EndReason::ServerShutdown) if !options.no_loop => None,
            Ok(reason) => {
                receiver.summary.end_reason = reason;
                return Ok(receiver.summary);
            }
            // A missing slot is transient in an HA stack: the manager creates its
            // permanent slots on a new leader a moment after promoting it. A slot in use
            // is usually held by our previous walsender, not yet gone.
            Err(err)
                if !options.no_loop
                    && (err.is_retryable() || err.is_missing_slot() || err.is_slot_in_use()) =>
            {
                Some(err)
            }
            Err(err) => return Err(err),
        };
        if receiver.streamed {
            attempt = 0;
            failing_since = None;
        }
        attempt += 1;
        options.emit(ReceiverEvent::Disconnected {
            error: error.as_ref(),
        });
        let now = tokio::time::Instant::now();
        let since = *failing_since.get_or_insert(now);
        let failing_for = now.duration_since(since);
        let error = match error {
            Some(err)
                if policy
                    .give_up_after_time()
                    .is_some_and(|limit| failing_for >= limit) =>
            {
                options.emit(ReceiverEvent::GaveUp {
                    error: &err,
                    after: failing_for,
                });
                tracing::error!(error = %err, "no connection streamed for {} s; giving up", failing_for.as_secs());
                return Err(err);
            }
            other => other,
        };
        let slot_wait = error
            .as_ref()
            .is_some_and(|err| err.is_missing_slot() || err.is_slot_in_use());
        let delay = if slot_wait {
            policy.slot_delay_before(attempt)
        } else {
            policy.delay_before(attempt)
        };
        let waiting_for = match (&error, &options.slot) {
            (Some(err), Some(slot)) if err.is_missing_slot() => Some(format!(
                "replication slot \"{slot}\" to exist (an HA manager creates permanent slots on a new leader)"
            )),
            (Some(err), Some(slot)) if err.is_slot_in_use() => Some(format!(
                "replication slot \"{slot}\" to be released (by the previous connection, or another receiver using the same slot)"
            )),
            _ => None,
        };
        options.emit(ReceiverEvent::Retrying {
            attempt,
            delay,
            waiting_for: waiting_for.as_deref(),
        });
        match &error {
            // An event handler takes over reporting; the log keeps a debug line.
            Some(err) if options.events.is_none() => tracing::warn!(
                error = %err,
                delay_ms = delay.as_millis() as u64,
                waiting_for = waiting_for.as_deref().unwrap_or(""),
                "streaming failed; reconnecting"
            ),
            Some(err) => {
                tracing::debug!(error = %err, delay_ms = delay.as_millis() as u64, "streaming failed; reconnecting")
            }
            None => tracing::info!(
                delay_ms = delay.as_millis() as u64,
                "the server shut down; reconnecting"
            ),
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = receiver.shutdown.as_mut() => {
                receiver.summary.end_reason = EndReason::Shutdown;
                return Ok(receiver.summary);
            }
        }
        receiver.summary.reconnects += 1;
    }
}

struct Receiver<'a, F: Future<Output = ()>, D> {
    config: &'a Config,
    options: &'a ReceiveOptions,
    destination: D,
    shutdown: Pin<&'a mut F>,
    system_id: Option<SystemId>,
    slot_checked: bool,
    /// The current session reached streaming.
    streamed: bool,
    summary: ReceiveSummary,
}

/// How one timeline's streaming ended.
enum TimelineOutcome {
    Switched {
        next_timeline: TimelineId,
        next_start: Lsn,
    },
    Ended(EndReason),
}

/// What a session knows about the server.
struct ServerInfo {
    system_id: SystemId,
    segment_size: WalSegmentSize,
    major: u32,
}

impl<F: Future<Output = ()>, D: WalDestination> Receiver<'_, F, D> {
    /// One connection (plus one more per timeline switch): from the directory's state
    /// to the end, a shutdown, or an error.
    async fn session(&mut self) -> Result<EndReason> {
        let options = self.options;
        let mut client = ReplicationClient::connect(self.config).await?;
        let id = client.identify_system().await?;
        if let Some(previous) = self.system_id {
            if previous != id.system_id {
                return Err(Error::state(
                    format!(
                        "the server's system identifier changed from {previous} to {} between connections",
                        id.system_id
                    ),
                    "the connection now reaches a different cluster; point the receiver at the original one or use a new directory",
                ));
            }
        }
        self.system_id = Some(id.system_id);
        let segment_size = client.wal_segment_size().await?;
        let server = ServerInfo {
            system_id: id.system_id,
            segment_size,
            major: client.server_major(),
        };
        if let (Some(slot), true, false) = (&options.slot, options.create_slot, self.slot_checked) {
            // Permanent slots are created once; temporary ones per streaming connection.
            crate::slot::create_physical_slot_if_not_exists(&mut client, slot).await?;
        }
        self.slot_checked = true;
        self.destination.open(segment_size).await?;
        self.destination.check_system(id.system_id).await?;

        let (mut start, mut timeline) = match self.destination.resume_point().await? {
            Some(resume) => {
                if let Some(found) = resume.system_id {
                    if found != id.system_id {
                        return Err(Error::state(
                            format!(
                                "{} belongs to database system {found}, but the server is system {}",
                                resume.from,
                                id.system_id
                            ),
                            "the destination holds another cluster's WAL; use a new directory (or store) for this server",
                        ));
                    }
                }
                (resume.lsn, resume.timeline)
            }
            None => self.start_without_files(&mut client, &id).await?,
        };
        start = start.segment_start(segment_size);
        if timeline > id.timeline {
            return Err(Error::state(
                format!(
                    "the WAL directory is on timeline {timeline} but the server only on {}",
                    id.timeline
                ),
                "the directory holds WAL from another server or from a newer timeline; use a new directory",
            ));
        }
        let mut client = Some(client);
        loop {
            if options.current_endpos().is_some_and(|end| start >= end) {
                return Ok(EndReason::EndPos);
            }
            let mut current = match client.take() {
                Some(c) => c,
                None => ReplicationClient::connect(self.config).await?,
            };
            if let (Some(slot), true) = (&options.slot, options.temporary_slot) {
                current
                    .create_physical_slot(
                        slot,
                        pgwire_repl::client::SlotOptions {
                            temporary: true,
                            reserve_wal: true,
                        },
                    )
                    .await?;
            }
            if timeline.0 > 1 && !self.destination.has_history(timeline).await? {
                let history = current.timeline_history(timeline).await?;
                self.destination
                    .write_history(timeline, history.content)
                    .await?;
            }
            self.summary.timeline = timeline;
            match self
                .stream_timeline(current, &server, timeline, start)
                .await?
            {
                TimelineOutcome::Ended(reason) => return Ok(reason),
                TimelineOutcome::Switched {
                    next_timeline,
                    next_start,
                } => {
                    tracing::info!(%timeline, %next_timeline, %next_start, "timeline switch");
                    if let (None, Some(end)) = (options.endpos, options.current_endpos()) {
                        // A base backup's end lies on the backup's timeline: WAL of
                        // another timeline cannot complete it.
                        if next_start < end {
                            return Err(Error::state(
                                format!(
                                    "the server switched from timeline {timeline} to {next_timeline} at {next_start}, before the end position {end}, which lies on timeline {timeline}"
                                ),
                                "the end position cannot be reached on this timeline (the server was promoted meanwhile); take the backup again",
                            ));
                        }
                    }
                    options.emit(ReceiverEvent::TimelineSwitch {
                        from: timeline,
                        to: next_timeline,
                        at: next_start,
                    });
                    self.summary.timeline_switches += 1;
                    timeline = next_timeline;
                    start = next_start.segment_start(segment_size);
                }
            }
        }
    }

    /// The start when the directory holds no segment: the configured start position,
    /// else the slot's restart_lsn (15+), else the server's current position.
    async fn start_without_files(
        &mut self,
        client: &mut ReplicationClient,
        id: &pgwire_repl::IdentifySystem,
    ) -> Result<(Lsn, TimelineId)> {
        if let Some(start) = self.options.start_position {
            return Ok((start, id.timeline));
        }
        if self.options.temporary_slot {
            // A temporary slot does not exist yet: it is made on the streaming connection.
            return Ok((id.xlog_pos, id.timeline));
        }
        if let Some(slot) = &self.options.slot {
            if client.server_major() >= 15 {
                match client.read_replication_slot(slot).await? {
                    None => return Err(Error::missing_slot(slot, client.connection().target())),
                    Some(info) if info.slot_type != "physical" => {
                        return Err(Error::state(
                            format!(
                                "replication slot {slot:?} is {}, not physical",
                                info.slot_type
                            ),
                            "use a physical slot",
                        ))
                    }
                    Some(info) => {
                        if let Some(lsn) = info.restart_lsn.filter(|l| !l.is_invalid()) {
                            return Ok((lsn, info.restart_tli.unwrap_or(id.timeline)));
                        }
                    }
                }
            }
        }
        Ok((id.xlog_pos, id.timeline))
    }

    async fn stream_timeline(
        &mut self,
        client: ReplicationClient,
        server: &ServerInfo,
        timeline: TimelineId,
        start: Lsn,
    ) -> Result<TimelineOutcome> {
        let options = self.options;
        let report_flush = options
            .report_flush
            .unwrap_or(options.slot.is_some() || options.synchronous);
        let mut verifier = WalVerifier::new(
            start,
            VerifierConfig {
                segment_size: server.segment_size,
                server_major: Some(server.major),
                system_id: Some(server.system_id),
                timeline,
                verify_records: options.verify_records,
            },
        );
        let mut stream_options = StreamOptions::new(start)
            .timeline(timeline)
            .status_interval(options.status_interval)
            .idle_timeout(options.idle_timeout);
        if let Some(slot) = &options.slot {
            stream_options = stream_options.slot(slot.clone());
        }
        tracing::info!(%start, %timeline, "starting to stream WAL");
        let mut stream = WalStream::start(client, stream_options).await?;
        self.streamed = true;
        options.emit(ReceiverEvent::Streaming {
            server: stream.target(),
            timeline,
            start,
        });
        if !options.synchronous {
            // Catching up is the bulk of the work; a synchronous standby must not add
            // latency to the primary's commits.
            stream.set_bulk_receive(256 * 1024);
        }
        let mut writer = self.destination.writer(timeline, start).await?;
        let feedback = stream.feedback().clone();
        feedback.set_write(start);
        if report_flush {
            feedback.set_flush(start);
        }
        let result = self
            .pump(
                &mut stream,
                &mut writer,
                &mut verifier,
                report_flush,
                server.segment_size,
            )
            .await;
        // Whatever happened, flush what was written; segments not complete stay partial.
        let closed = writer.close().await;
        match closed {
            Ok(totals) => {
                self.summary.written = totals.written;
                self.summary.flushed = totals.durable;
                self.summary.segments_completed += totals.completed_segments;
            }
            Err(err) if result.is_ok() => return Err(err),
            Err(err) => tracing::warn!(error = %err, "closing the WAL files failed too"),
        }
        let outcome = result?;
        let conn = stream.into_connection();
        let _ = conn.close().await;
        if let TimelineOutcome::Switched {
            next_timeline,
            next_start,
        } = &outcome
        {
            if *next_timeline <= timeline {
                return Err(Error::state(
                    format!("the server switched from timeline {timeline} to {next_timeline}, which is not newer"),
                    "the server's timeline history is inconsistent; check it with TIMELINE_HISTORY",
                ));
            }
            if *next_start > self.summary.written {
                return Err(Error::state(
                    format!(
                        "timeline {next_timeline} starts at {next_start}, after the end of what timeline {timeline} sent ({})",
                        self.summary.written
                    ),
                    "the server's timeline history is inconsistent; check it with TIMELINE_HISTORY",
                ));
            }
        }
        Ok(outcome)
    }

    /// Moves events from the stream through the verifier to the writer.
    async fn pump<W: WalWriter>(
        &mut self,
        stream: &mut WalStream,
        writer: &mut W,
        verifier: &mut WalVerifier,
        report_flush: bool,
        segment_size: WalSegmentSize,
    ) -> Result<TimelineOutcome> {
        let options = self.options;
        let feedback = stream.feedback().clone();
        let mut endpos_updates = options.endpos_updates.clone();
        // Asked the server for its position while waiting to verify the record that
        // crosses the end of the last segment before the end position.
        let mut asked_for_position = false;
        // The end of what was handed to the writer (its own `written` may lag behind,
        // when it writes on a thread).
        let mut handed = writer.written();
        loop {
            // An end position that arrived while WAL was already past it ends here.
            let endpos = options.current_endpos();
            match end_state(endpos, handed, verifier, segment_size) {
                EndState::Reached => {
                    let flushed = writer.flush().await?;
                    feedback.set_write(writer.written());
                    if report_flush {
                        feedback.set_flush(flushed);
                    }
                    if let Some(StreamEvent::EndOfTimeline {
                        next_timeline,
                        next_start,
                    }) = stream.stop().await?
                    {
                        tracing::debug!(%next_timeline, %next_start, "the timeline ended while stopping at endpos");
                    }
                    return Ok(TimelineOutcome::Ended(EndReason::EndPos));
                }
                EndState::Verifying if !asked_for_position => {
                    // The reply (a keepalive) says how far the server's WAL goes.
                    stream.send_status(true).await?;
                    asked_for_position = true;
                }
                EndState::Verifying | EndState::Streaming => {}
            }
            let event = tokio::select! {
                biased;
                changed = wait_for_update(&mut endpos_updates) => {
                    if changed.is_err() {
                        // The sender is gone: no end position will come any more.
                        endpos_updates = None;
                    }
                    continue;
                }
                () = self.shutdown.as_mut() => {
                    let flushed = writer.flush().await?;
                    if report_flush {
                        feedback.set_flush(flushed);
                    }
                    feedback.set_write(writer.written());
                    stream.stop().await?;
                    return Ok(TimelineOutcome::Ended(EndReason::Shutdown));
                }
                () = writer.durable_advanced(), if report_flush => {
                    // A background upload finished: report it, at once when a synchronous
                    // primary is waiting for it.
                    feedback.set_flush(writer.durable());
                    if options.synchronous {
                        stream.send_status(false).await?;
                    }
                    continue;
                }
                event = stream.next_event() => event?,
            };
            feedback.set_write(writer.written());
            if report_flush {
                // What the destination holds durably now (a completed segment, a
                // finished upload) moves the slot, without waiting for a flush.
                feedback.set_flush(writer.durable());
            }
            match event {
                None => return Ok(TimelineOutcome::Ended(EndReason::Shutdown)),
                Some(StreamEvent::XLogData(x)) => {
                    let len = x.data.len() as u64;
                    if let Err(bad) = verifier.feed(x.wal_start, &x.data) {
                        let context = format!("WAL streamed from {}", stream.target());
                        let _ = tokio::time::timeout(STOP_TIMEOUT, stream.stop()).await;
                        return Err(Error::verify(bad, context));
                    }
                    self.summary.bytes_received += len;
                    // As pg_receivewal, nothing past the end of the segment holding the
                    // end position is written; what lies beyond only serves to verify
                    // the record crossing into it.
                    let mut data = x.data;
                    if let Some(limit) =
                        endpos.map(|end| segment_end_at_or_after(end, segment_size))
                    {
                        let room = limit.0.saturating_sub(handed.0) as usize;
                        data.truncate(room);
                    }
                    let lsn = handed;
                    handed = Lsn(lsn.0 + data.len() as u64);
                    writer
                        .write(lsn, data, verifier.verified_up_to().min(handed))
                        .await?;
                    let at_end = !matches!(
                        end_state(endpos, handed, verifier, segment_size),
                        EndState::Streaming
                    );
                    if options.synchronous && !at_end && writer.flushes_in_background() {
                        // The writer stores it on its own; tell the primary what was
                        // received now and what is durable when the upload is done.
                        feedback.set_write(writer.written());
                        stream.send_status(false).await?;
                    } else if options.synchronous && !at_end {
                        let flushed = writer.flush().await?;
                        feedback.set_write(writer.written());
                        if report_flush {
                            feedback.set_flush(flushed);
                        }
                        stream.send_status(false).await?;
                    }
                    // At the end position, the top of the loop flushes and stops.
                }
                Some(StreamEvent::Keepalive(k)) => {
                    if k.reply_requested && report_flush {
                        // The reply goes out on the next read; make it say what is durable.
                        let flushed = writer.flush().await?;
                        feedback.set_flush(flushed);
                        feedback.set_write(writer.written());
                    }
                    if asked_for_position && k.wal_end <= verifier.position() {
                        // The server has sent all the WAL it has, and the last record
                        // before the end position is not whole yet: stop without
                        // completing the segment, which cannot be verified.
                        tracing::info!(
                            position = %verifier.position(),
                            verified = %verifier.verified_up_to(),
                            "the record crossing the end of the last segment is not complete on the server; the segment stays partial"
                        );
                        let flushed = writer.flush().await?;
                        if report_flush {
                            feedback.set_flush(flushed);
                        }
                        stream.stop().await?;
                        return Ok(TimelineOutcome::Ended(EndReason::EndPos));
                    }
                }
                Some(StreamEvent::EndOfTimeline {
                    next_timeline,
                    next_start,
                }) => {
                    return Ok(TimelineOutcome::Switched {
                        next_timeline,
                        next_start,
                    })
                }
                Some(StreamEvent::ServerShutdown) => {
                    return Ok(TimelineOutcome::Ended(EndReason::ServerShutdown))
                }
            }
        }
    }
}

/// Where a receiver stands against its end position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EndState {
    /// No end position, or not reached.
    Streaming,
    /// Written up to the end of the last segment, whose last record is not verified
    /// yet: WAL of the next segment is read, not written, to verify it.
    Verifying,
    /// Done: flush and stop.
    Reached,
}

fn end_state(
    endpos: Option<Lsn>,
    written: Lsn,
    verifier: &WalVerifier,
    segment_size: WalSegmentSize,
) -> EndState {
    match endpos {
        Some(end) if written >= end => {
            let ends_segment = written.segment_offset(segment_size) == 0;
            if ends_segment && verifier.verified_up_to() < written {
                EndState::Verifying
            } else {
                EndState::Reached
            }
        }
        _ => EndState::Streaming,
    }
}

/// The first segment boundary at or after `lsn`.
fn segment_end_at_or_after(lsn: Lsn, segment_size: WalSegmentSize) -> Lsn {
    let size = segment_size.bytes();
    Lsn(lsn.0.div_ceil(size).saturating_mul(size))
}

/// Waits for a new end position; pends forever without a channel.
async fn wait_for_update(
    updates: &mut Option<tokio::sync::watch::Receiver<Option<Lsn>>>,
) -> std::result::Result<(), tokio::sync::watch::error::RecvError> {
    match updates {
        Some(rx) => rx.changed().await,
        None => std::future::pending().await,
    }
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EndReason::EndPos => "reached the end position",
            EndReason::Shutdown => "stopped on request",
            EndReason::ServerShutdown => "the server shut down",
        })
    }
}
