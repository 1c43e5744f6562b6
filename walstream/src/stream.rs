//! [`WalStream`]: `START_REPLICATION … PHYSICAL` as a stream of typed events, with
//! standby status updates. The thin tokio layer over [`crate::protocol`].

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use pgwire_repl::proto::frontend;
use pgwire_repl::proto::replication::{postgres_now, HotStandbyFeedback, StandbyStatusUpdate};
use pgwire_repl::{Connection, Lsn, ReplicationClient, TimelineId};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::protocol::{CopyBoth, StatusSchedule, Step, StreamEvent};

/// The default interval of periodic status updates (pg_receivewal's
/// `--status-interval` default).
pub const DEFAULT_STATUS_INTERVAL: Duration = Duration::from_secs(10);

/// The default dead-peer bound (PostgreSQL's default `wal_receiver_timeout`); see
/// [`StreamOptions::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How to start streaming.
///
/// ```
/// use std::time::Duration;
/// use pgwire_repl::{Lsn, TimelineId};
/// use walstream::StreamOptions;
///
/// let options = StreamOptions::new(Lsn(0x3000000))
///     .slot("standby1")
///     .timeline(TimelineId(1))
///     .status_interval(Some(Duration::from_secs(5)));
/// assert_eq!(options.start_command(), "START_REPLICATION SLOT \"standby1\" PHYSICAL 0/3000000 TIMELINE 1");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamOptions {
    start: Lsn,
    slot: Option<String>,
    timeline: Option<TimelineId>,
    status_interval: Option<Duration>,
    idle_timeout: Option<Duration>,
}

impl StreamOptions {
    /// Streams from `start` (pg_receivewal always starts at a segment start; the server
    /// accepts any position).
    pub fn new(start: Lsn) -> StreamOptions {
        StreamOptions {
            start,
            slot: None,
            timeline: None,
            status_interval: Some(DEFAULT_STATUS_INTERVAL),
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
        }
    }

    /// Streams from this physical replication slot; the flush positions reported
    /// advance its `restart_lsn`.
    pub fn slot(mut self, name: impl Into<String>) -> StreamOptions {
        self.slot = Some(name.into());
        self
    }

    /// Streams this timeline (default: the server's current one).
    pub fn timeline(mut self, timeline: TimelineId) -> StreamOptions {
        self.timeline = Some(timeline);
        self
    }

    /// How often to send a status update unasked (default 10 s; `None` only answers
    /// the server's requests). Keep it below half the server's `wal_sender_timeout`.
    pub fn status_interval(mut self, interval: Option<Duration>) -> StreamOptions {
        self.status_interval = interval;
        self
    }

    /// The dead-peer bound, as PostgreSQL's `wal_receiver_timeout` (default 60 s; `None`
    /// waits forever). When the server has sent nothing for half of it, a status update
    /// asks for an immediate reply, which a live walsender answers with a keepalive even
    /// when it has no WAL to send (it sends keepalives of its own only when it has not
    /// heard from the client for `wal_sender_timeout / 2`, so a client that reports every
    /// 10 s would otherwise get none). Only when that request stays unanswered for the
    /// other half does the stream fail with [`crate::ErrorKind::Timeout`]. Before
    /// streaming starts, no request can be sent: silence for the whole bound fails.
    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> StreamOptions {
        self.idle_timeout = timeout;
        self
    }

    /// The start position.
    pub fn start(&self) -> Lsn {
        self.start
    }

    /// The `START_REPLICATION` command these options make.
    pub fn start_command(&self) -> String {
        let mut command = String::from("START_REPLICATION ");
        if let Some(slot) = &self.slot {
            command.push_str(&format!("SLOT \"{slot}\" "));
        }
        command.push_str(&format!("PHYSICAL {}", self.start));
        if let Some(tli) = self.timeline {
            command.push_str(&format!(" TIMELINE {tli}"));
        }
        command
    }
}

/// The positions reported to the server, shared between a [`WalStream`] and whoever
/// writes the WAL (another task or thread can update them).
///
/// Report as flushed only what is durably stored, wherever the WAL goes (a local disk,
/// an object store, another service): with a slot, the flush position lets the server
/// recycle older WAL, so a position reported too early can lose WAL for good.
#[derive(Debug, Default)]
pub struct Feedback {
    write: AtomicU64,
    flush: AtomicU64,
    apply: AtomicU64,
}

impl Feedback {
    /// Sets the written position (last byte + 1 handed to the destination, not
    /// necessarily durable yet).
    pub fn set_write(&self, lsn: Lsn) {
        self.write.store(lsn.0, Ordering::Release);
    }

    /// Sets the flushed position (last byte + 1 durably stored by the destination).
    pub fn set_flush(&self, lsn: Lsn) {
        self.flush.store(lsn.0, Ordering::Release);
    }

    /// Sets the applied position (0 for a pure receiver).
    pub fn set_apply(&self, lsn: Lsn) {
        self.apply.store(lsn.0, Ordering::Release);
    }

    /// The current (write, flush, apply) positions.
    pub fn positions(&self) -> (Lsn, Lsn, Lsn) {
        (
            Lsn(self.write.load(Ordering::Acquire)),
            Lsn(self.flush.load(Ordering::Acquire)),
            Lsn(self.apply.load(Ordering::Acquire)),
        )
    }
}

/// A running `START_REPLICATION … PHYSICAL`.
///
/// Read it with [`WalStream::next_event`] (or turn it into a [`futures::Stream`] with
/// [`WalStream::into_stream`]). Keepalives that ask for a reply are answered, and
/// periodic status updates sent, from inside those calls, so keep calling them.
///
/// To end it: [`WalStream::stop`] from the task that reads it, or a [`StopHandle`]
/// ([`WalStream::stop_handle`]) from anywhere else. [`WalStream::next_event`] is
/// cancel-safe, so it can also be raced against a deadline or another future:
///
/// ```no_run
/// # async fn demo(mut stream: walstream::WalStream) -> walstream::Result<()> {
/// use std::time::Duration;
/// use tokio::time::{timeout_at, Instant};
///
/// // Stream for 30 seconds, whether or not WAL arrives, then stop cleanly.
/// let deadline = Instant::now() + Duration::from_secs(30);
/// loop {
///     match timeout_at(deadline, stream.next_event()).await {
///         Err(_elapsed) => {
///             stream.stop().await?; // nothing was lost by the cancelled read
///             break;
///         }
///         Ok(Ok(Some(event))) => { /* handle the event */ let _ = event; }
///         Ok(Ok(None)) => break,
///         Ok(Err(err)) => return Err(err),
///     }
/// }
/// # Ok(()) }
/// ```
///
/// ```no_run
/// # async fn demo() -> walstream::Result<()> {
/// use pgwire_repl::{Config, Lsn, ReplicationClient};
/// use walstream::{StreamEvent, StreamOptions, WalStream};
///
/// let config = Config::parse_with_env("host=primary user=repl")?;
/// let client = ReplicationClient::connect(&config).await?;
/// let mut stream = WalStream::start(client, StreamOptions::new(Lsn(0x3000000))).await?;
/// while let Some(event) = stream.next_event().await? {
///     match event {
///         StreamEvent::XLogData(x) => {
///             // … write x.data at x.wal_start, then report it:
///             let end = Lsn(x.wal_start.0 + x.data.len() as u64);
///             stream.feedback().set_write(end);
///             if end.0 >= 0x4000000 {
///                 stream.stop().await?; // CopyDone, never CopyFail
///                 break;
///             }
///         }
///         StreamEvent::EndOfTimeline { next_timeline, next_start } => {
///             println!("continue on timeline {next_timeline} at {next_start}");
///         }
///         _ => {}
///     }
/// }
/// # Ok(()) }
/// ```
pub struct WalStream {
    conn: Connection,
    machine: CopyBoth,
    schedule: StatusSchedule,
    feedback: Arc<Feedback>,
    hot_standby: Option<HotStandbyFeedback>,
    idle_timeout: Option<Duration>,
    last_received: Instant,
    /// When a status update asking for a reply went out because the server was silent
    /// (cleared by anything the server sends).
    probe_sent: Option<Instant>,
    pending: Option<StreamEvent>,
    status_buf: BytesMut,
    /// A status update is in the send buffer, not yet sent in full (its send was
    /// cancelled).
    status_queued: bool,
    stop_signal: Arc<StopSignal>,
}

/// Asks a [`WalStream`] to stop, from another task (a signal handler, a deadline, a
/// supervisor); from [`WalStream::stop_handle`]. Cloneable, `Send` and `Sync`.
///
/// ```no_run
/// # async fn demo(mut stream: walstream::WalStream) -> walstream::Result<()> {
/// let stop = stream.stop_handle();
/// tokio::spawn(async move {
///     let _ = tokio::signal::ctrl_c().await;
///     stop.stop();
/// });
/// while let Some(event) = stream.next_event().await? {
///     // … handle the event; after Ctrl-C the loop ends with None once the
///     // stream has been stopped cleanly (CopyDone, never CopyFail).
///     let _ = event;
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct StopHandle(Arc<StopSignal>);

#[derive(Debug, Default)]
struct StopSignal {
    requested: AtomicBool,
    wake: Notify,
}

impl StopHandle {
    /// Requests the stop. The [`WalStream::next_event`] call in progress (woken at once
    /// if it is waiting for the server) or the next one stops the stream as
    /// [`WalStream::stop`] does: a final status update with the positions in
    /// [`Feedback`], CopyDone, and whatever the server had queued read and dropped.
    /// It then returns `Ok(None)`, or the [`StreamEvent::EndOfTimeline`] or
    /// [`StreamEvent::ServerShutdown`] that ended the stream meanwhile, and `Ok(None)`
    /// from then on. Calling it again does nothing.
    pub fn stop(&self) {
        self.0.requested.store(true, Ordering::Release);
        self.0.wake.notify_one();
    }

    /// Whether a stop was requested.
    ///
    /// ```no_run
    /// # fn demo(stream: &walstream::WalStream) {
    /// let stop = stream.stop_handle();
    /// assert!(!stop.is_stop_requested());
    /// stop.stop();
    /// assert!(stop.is_stop_requested());
    /// # }
    /// ```
    pub fn is_stop_requested(&self) -> bool {
        self.0.requested.load(Ordering::Acquire)
    }
}

impl std::fmt::Debug for WalStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalStream")
            .field("target", &self.conn.target())
            .field("machine", &self.machine)
            .field("feedback", &self.feedback)
            .finish_non_exhaustive()
    }
}

impl WalStream {
    /// Sends `START_REPLICATION` and waits for the server to start streaming (or to
    /// answer at once with the end of the timeline, which is then the first event).
    /// Server errors before the stream starts (a missing slot, a start position not
    /// in the server's history, WAL already removed) are returned here.
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: the client is consumed, so dropping the future drops the
    /// connection (the server ends the walsender). Bound it with `tokio::time::timeout`
    /// and connect again if it fires.
    pub async fn start(mut client: ReplicationClient, options: StreamOptions) -> Result<WalStream> {
        // The reply to a command whose call was cancelled must not be taken for ours.
        client.settle().await?;
        WalStream::start_on(client.into_connection(), options).await
    }

    /// Like [`WalStream::start`], on a bare connection (one that is idle in a
    /// physical replication session). Not cancel-safe either, for the same reason.
    pub async fn start_on(mut conn: Connection, options: StreamOptions) -> Result<WalStream> {
        frontend::query(&options.start_command(), conn.write_buf())?;
        conn.flush().await?;
        let now = Instant::now();
        let mut stream = WalStream {
            conn,
            machine: CopyBoth::new(options.start),
            schedule: StatusSchedule::new(options.status_interval, now.into_std()),
            feedback: Arc::new(Feedback::default()),
            hot_standby: None,
            idle_timeout: options.idle_timeout,
            last_received: now,
            probe_sent: None,
            pending: None,
            status_buf: BytesMut::with_capacity(64),
            status_queued: false,
            stop_signal: Arc::new(StopSignal::default()),
        };
        loop {
            let message = stream.read().await?;
            match stream.machine.handle(message)? {
                Step::Started => return Ok(stream),
                Step::Nothing => {}
                Step::Finished(next) => {
                    stream.pending = Some(end_event(next)?);
                    return Ok(stream);
                }
                Step::SendCopyDone => {
                    stream.send_copy_done().await?;
                    return Ok(stream);
                }
                Step::Event(event) => {
                    stream.pending = Some(event);
                    return Ok(stream);
                }
            }
        }
    }

    /// Reads the stream in steps of `bytes` while it flows fast (catching up), with at
    /// most 1 ms of extra latency when it slows down; see
    /// [`pgwire_repl::Connection::set_bulk_receive`]. Off (`0`) by default: a
    /// synchronous standby should leave it off.
    pub fn set_bulk_receive(&mut self, bytes: u32) {
        self.conn.set_bulk_receive(bytes);
    }

    /// A handle that stops this stream from another task; see [`StopHandle`]. Take it
    /// before [`WalStream::into_stream`] to stop the [`EventStream`] too.
    ///
    /// ```no_run
    /// # async fn demo(stream: walstream::WalStream) -> walstream::Result<()> {
    /// use futures::StreamExt;
    /// let stop = stream.stop_handle();
    /// let mut events = stream.into_stream();
    /// tokio::spawn(async move {
    ///     tokio::time::sleep(std::time::Duration::from_secs(60)).await;
    ///     stop.stop(); // the event stream ends cleanly a moment later
    /// });
    /// while let Some(event) = events.next().await {
    ///     let _ = event?;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.stop_signal.clone())
    }

    /// The shared positions to report. Update them as WAL is written and flushed.
    pub fn feedback(&self) -> &Arc<Feedback> {
        &self.feedback
    }

    /// Sends hot-standby feedback (`h`) with every status update from now on; `None`
    /// stops sending it. A WAL archiver should not send it: it holds back the
    /// primary's cleanup.
    pub fn set_hot_standby_feedback(&mut self, feedback: Option<HotStandbyFeedback>) {
        self.hot_standby = feedback;
    }

    /// The position the next XLogData will start at.
    pub fn position(&self) -> Lsn {
        self.machine.expected()
    }

    /// The server this stream is connected to, for messages.
    pub fn target(&self) -> &str {
        self.conn.target()
    }

    /// The next event, or `None` once the stream is over (after
    /// [`StreamEvent::EndOfTimeline`], [`StreamEvent::ServerShutdown`], or a stop).
    ///
    /// Sends a status update first when one is due (a keepalive asked for it, or the
    /// status interval passed). Fails with a typed server error
    /// ([`crate::ErrorKind::Server`], with the SQLSTATE, detail and hint) when the
    /// server reports one mid-stream, with the connection's own kind (usually
    /// [`crate::ErrorKind::Io`]) when the connection is lost, and with
    /// [`crate::ErrorKind::Timeout`] after the idle timeout; [`crate::Error::is_retryable`]
    /// says whether a new connection may do better. After a [`StopHandle::stop`], it
    /// stops the stream and returns `Ok(None)` (see there).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it can be a branch of `tokio::select!` or wrapped in
    /// `tokio::time::timeout`, and when the future is dropped before it returns, no
    /// event is lost and the stream stays usable. Bytes read so far stay in the receive
    /// buffer; a message is taken out of it only together with what it causes (its
    /// event returned, or the stream's state moved on, as for the server's CopyDone)
    /// with no wait in between. A status update or CopyDone that was being sent stays
    /// queued, in order, and goes out first at the next call (or [`WalStream::stop`]). A status update that was
    /// due is sent again if the cancelled one had not been sent in full. The idle
    /// timeout keeps counting from the last message received, across calls.
    pub async fn next_event(&mut self) -> Result<Option<StreamEvent>> {
        if self.stop_signal.requested.load(Ordering::Acquire) {
            return self.stop_on_request().await;
        }
        if let Some(event) = self.pending.take() {
            return Ok(Some(event));
        }
        loop {
            if self.machine.is_done() {
                return Ok(None);
            }
            if self.stop_signal.requested.load(Ordering::Acquire) {
                return self.stop_on_request().await;
            }
            if self.machine.is_streaming() && self.schedule.due(Instant::now().into_std()) {
                self.send_status(false).await?;
            }
            let signal = self.stop_signal.clone();
            let message = tokio::select! {
                // The read is cancel-safe: a message not returned stays buffered.
                message = self.read() => message?,
                () = signal.wake.notified() => continue,
            };
            match self.machine.handle(message)? {
                Step::Nothing | Step::Started => {}
                Step::SendCopyDone => self.send_copy_done().await?,
                Step::Finished(next) => {
                    return match next {
                        Some(_) => end_event(next).map(Some),
                        None => Ok(None),
                    }
                }
                Step::Event(event) => {
                    if let StreamEvent::Keepalive(k) = &event {
                        if k.reply_requested {
                            self.schedule.request_reply();
                        }
                    }
                    return Ok(Some(event));
                }
            }
        }
    }

    /// Sends a standby status update now, with the positions in [`WalStream::feedback`]
    /// (and hot-standby feedback if set). With `reply_requested`, the server answers
    /// with a keepalive.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: what was not sent stays queued and goes out first at the next call
    /// that reads or sends.
    pub async fn send_status(&mut self, reply_requested: bool) -> Result<()> {
        // A periodic update still on its way (its send was cancelled) is finished
        // rather than followed by another, so repeated cancellation cannot pile updates
        // up; a reply the server or the caller asked for is always fresh.
        let fresh = !self.status_queued || reply_requested || self.schedule.reply_requested();
        if fresh {
            let (write, flush, apply) = self.feedback.positions();
            let now = postgres_now();
            self.status_buf.clear();
            StandbyStatusUpdate {
                write,
                flush,
                apply,
                client_time: now,
                reply_requested,
            }
            .encode(&mut self.status_buf);
            frontend::copy_data(&self.status_buf, self.conn.write_buf());
            if let Some(mut hs) = self.hot_standby {
                hs.client_time = now;
                self.status_buf.clear();
                hs.encode(&mut self.status_buf);
                frontend::copy_data(&self.status_buf, self.conn.write_buf());
            }
            self.status_queued = true;
            tracing::trace!(%write, %flush, %apply, "sending standby status update");
        }
        self.send().await
    }

    /// Stops streaming: sends a final status update and CopyDone (never CopyFail),
    /// then reads (and drops) whatever the server had queued until ReadyForQuery.
    /// Returns the end of the timeline if the server reached it meanwhile. The
    /// connection is idle afterwards ([`WalStream::into_connection`]).
    ///
    /// # Cancel safety
    ///
    /// Resumable rather than cancel-safe: once started, the stream is stopping. If the
    /// future is dropped, calling `stop` (or [`WalStream::next_event`]) again sends
    /// whatever was still queued (CopyDone included) and finishes the job. Bound it
    /// with `tokio::time::timeout` when the server may not answer, and drop the
    /// connection if that fires.
    pub async fn stop(&mut self) -> Result<Option<StreamEvent>> {
        if let Some(event) = self.pending.take() {
            if matches!(event, StreamEvent::EndOfTimeline { .. }) {
                return Ok(Some(event));
            }
        }
        if self.machine.is_streaming() {
            self.send_status(false).await?;
        }
        if self.machine.stop() {
            self.send_copy_done().await?;
        }
        while !self.machine.is_done() {
            let message = self.read().await?;
            match self.machine.handle(message)? {
                Step::SendCopyDone => self.send_copy_done().await?,
                Step::Finished(Some(next)) => return end_event(Some(next)).map(Some),
                Step::Event(StreamEvent::ServerShutdown) => {
                    return Ok(Some(StreamEvent::ServerShutdown))
                }
                _ => {}
            }
        }
        Ok(None)
    }

    /// The connection, idle again once the stream has finished (after
    /// [`StreamEvent::EndOfTimeline`] or [`WalStream::stop`]).
    pub fn into_connection(self) -> Connection {
        self.conn
    }

    /// Turns the stream into a [`futures::Stream`] of events. Status updates are sent
    /// as with [`WalStream::next_event`]; update the positions through the
    /// [`Feedback`] obtained from [`WalStream::feedback`] before converting, and take a
    /// [`StopHandle`] first to be able to stop it.
    ///
    /// ```no_run
    /// # async fn demo(stream: walstream::WalStream) -> walstream::Result<()> {
    /// use futures::StreamExt;
    /// let feedback = stream.feedback().clone();
    /// let mut events = stream.into_stream();
    /// while let Some(event) = events.next().await {
    ///     if let walstream::StreamEvent::XLogData(x) = event? {
    ///         feedback.set_write(pgwire_repl::Lsn(x.wal_start.0 + x.data.len() as u64));
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn into_stream(self) -> EventStream {
        EventStream {
            state: EventStreamState::Idle(Box::new(self)),
        }
    }

    /// Stops for a [`StopHandle`]: as [`WalStream::stop`], reporting the end of the
    /// stream as the last event, then `None`.
    async fn stop_on_request(&mut self) -> Result<Option<StreamEvent>> {
        if self.machine.is_done() && self.pending.is_none() {
            return Ok(None);
        }
        self.stop().await
    }

    async fn read(&mut self) -> Result<pgwire_repl::proto::backend::BackendMessage> {
        // What a cancelled call left queued (a status update, CopyDone) goes out first:
        // the server may be waiting for it.
        if self.conn.unsent() > 0 {
            self.send().await?;
        }
        loop {
            let streaming = self.machine.is_streaming();
            let status_at = if streaming {
                self.schedule.next_periodic().map(Instant::from_std)
            } else {
                None
            };
            let silence = self.silence_deadlines(streaming);
            let wake_at = [status_at, silence.probe_at, silence.dead_at]
                .into_iter()
                .flatten()
                .min();
            let read = self.conn.read_message();
            let message = match wake_at {
                None => read.await,
                // Reading is cancel-safe: bytes read so far stay in the connection's buffer.
                Some(at) => match tokio::time::timeout_at(at, read).await {
                    Ok(message) => message,
                    Err(_) => {
                        let now = Instant::now();
                        if silence.dead_at.is_some_and(|at| now >= at) {
                            return Err(self.idle_error());
                        }
                        if silence.probe_at.is_some_and(|at| now >= at) {
                            tracing::debug!(target = %self.conn.target(), "the server is silent; asking it for a reply");
                            self.send_status(true).await?;
                            self.probe_sent = Some(now);
                        } else if streaming && self.schedule.due(now.into_std()) {
                            self.send_status(false).await?;
                        }
                        continue;
                    }
                },
            };
            return match message {
                Ok(message) => {
                    self.last_received = Instant::now();
                    self.probe_sent = None;
                    Ok(message)
                }
                Err(err) => Err(self.read_error(err)),
            };
        }
    }

    /// When to ask a silent server for a reply, and when silence means a dead peer.
    fn silence_deadlines(&self, streaming: bool) -> Silence {
        let Some(limit) = self.idle_timeout else {
            return Silence::default();
        };
        if !streaming {
            // No status update can ask for a reply outside CopyBoth.
            return Silence {
                probe_at: None,
                dead_at: Some(self.last_received + limit),
            };
        }
        let half = limit / 2;
        match self.probe_sent {
            None => Silence {
                probe_at: Some(self.last_received + half),
                dead_at: None,
            },
            Some(sent) => Silence {
                probe_at: None,
                dead_at: Some(sent + (limit - half)),
            },
        }
    }

    fn idle_error(&self) -> Error {
        // The configured bound, not the measured silence, so that the message is stable;
        // fractional seconds, or a sub-second bound would read "0 s".
        let limit = self.idle_timeout.unwrap_or_default();
        let message = match self.probe_sent {
            Some(_) => format!(
                "{} sent nothing for {} s while streaming WAL and did not answer a request for a reply within {} s",
                self.conn.target(),
                limit.as_secs_f64(),
                (limit - limit / 2).as_secs_f64()
            ),
            None => format!(
                "{} sent nothing for {} s before streaming started",
                self.conn.target(),
                limit.as_secs_f64()
            ),
        };
        Error::timeout(
            message,
            "the server is stopped or overloaded, or the network between us drops packets (a live walsender answers at once); check the server and its log; raise the timeout if the server is merely slow",
        )
    }

    fn read_error(&self, err: pgwire_repl::Error) -> Error {
        if self.machine.is_shut_down() {
            return Error::connection(err.with_advice(
                "the server shut down (it sent COPY 0); connect again once it is back",
            ));
        }
        Error::connection(err)
    }

    async fn send_copy_done(&mut self) -> Result<()> {
        frontend::copy_done(self.conn.write_buf());
        self.send().await
    }

    /// Sends what is queued; cancel-safe ([`pgwire_repl::Connection::flush`]). A status
    /// update counts as sent once it has left in full.
    async fn send(&mut self) -> Result<()> {
        self.conn
            .flush()
            .await
            .map_err(|err| self.read_error(err))?;
        if self.status_queued {
            self.status_queued = false;
            self.schedule.sent(Instant::now().into_std());
        }
        Ok(())
    }
}

/// Deadlines of [`WalStream::silence_deadlines`].
#[derive(Debug, Default, Clone, Copy)]
struct Silence {
    /// Ask for a reply then.
    probe_at: Option<Instant>,
    /// The peer is dead then.
    dead_at: Option<Instant>,
}

fn end_event(next: Option<(TimelineId, Lsn)>) -> Result<StreamEvent> {
    match next {
        Some((next_timeline, next_start)) => Ok(StreamEvent::EndOfTimeline {
            next_timeline,
            next_start,
        }),
        None => Err(Error::protocol(
            "the server ended the WAL stream without naming the next timeline",
        )),
    }
}

type NextFuture =
    Pin<Box<dyn Future<Output = (Box<WalStream>, Result<Option<StreamEvent>>)> + Send>>;

enum EventStreamState {
    Idle(Box<WalStream>),
    Busy(NextFuture),
    /// The stream ended normally; kept for [`EventStream::into_inner`].
    Finished(Box<WalStream>),
    /// Ended with an error (the stream was dropped), or being polled.
    Done,
}

/// A [`WalStream`] as a [`futures::Stream`] of `Result<StreamEvent>`; from
/// [`WalStream::into_stream`]. Ends after the last event or the first error.
///
/// # Cancel safety
///
/// Cancel-safe: the [`WalStream::next_event`] call in progress lives inside the
/// `EventStream`, not in the `next()` future, so dropping that future (in a
/// `tokio::select!`, or on a timeout) loses nothing and the next poll continues the
/// same call. A [`StopHandle`] taken before [`WalStream::into_stream`] ends it cleanly.
pub struct EventStream {
    state: EventStreamState,
}

impl EventStream {
    /// The stream back, to [`WalStream::stop`] it or to close its connection
    /// ([`WalStream::into_connection`]) once it has ended, unless a read is in progress
    /// or it ended with an error.
    pub fn into_inner(self) -> Option<WalStream> {
        match self.state {
            EventStreamState::Idle(stream) | EventStreamState::Finished(stream) => Some(*stream),
            _ => None,
        }
    }
}

impl futures::Stream for EventStream {
    type Item = Result<StreamEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            match std::mem::replace(&mut self.state, EventStreamState::Done) {
                EventStreamState::Done => return Poll::Ready(None),
                EventStreamState::Finished(stream) => {
                    self.state = EventStreamState::Finished(stream);
                    return Poll::Ready(None);
                }
                EventStreamState::Idle(mut stream) => {
                    self.state = EventStreamState::Busy(Box::pin(async move {
                        let result = stream.next_event().await;
                        (stream, result)
                    }));
                }
                EventStreamState::Busy(mut future) => match future.as_mut().poll(cx) {
                    Poll::Pending => {
                        self.state = EventStreamState::Busy(future);
                        return Poll::Pending;
                    }
                    Poll::Ready((stream, result)) => {
                        return Poll::Ready(match result {
                            Ok(Some(event)) => {
                                self.state = EventStreamState::Idle(stream);
                                Some(Ok(event))
                            }
                            Ok(None) => {
                                self.state = EventStreamState::Finished(stream);
                                None
                            }
                            Err(err) => Some(Err(err)),
                        });
                    }
                },
            }
        }
    }
}
