//! The pure (sans-IO) state machine of a `START_REPLICATION` exchange.
//!
//! [`CopyBoth`] is fed every backend message after `START_REPLICATION` was sent and
//! says what happened ([`Step`]). It does no I/O and reads no clock, so tests and
//! fuzzers drive it with plain values. [`StatusSchedule`] decides when standby status
//! updates are due, with the current time passed in.
//!
//! ```text
//!  Starting ──W──► Streaming ──c (server)──► BothDone ──T D C C──► Z: Finished
//!     │                │  └──C "COPY 0"──► ShutDown (the socket closes next)
//!     │                └──stop()──► ClientDone ──c──► BothDone
//!     └──T (start == switch point: no CopyBoth at all)──► BothDone
//!  any state ──E──► Failed
//! ```

use std::time::{Duration, Instant};

use bytes::Bytes;
use pgwire_repl::proto::backend::BackendMessage;
use pgwire_repl::proto::replication::{PrimaryKeepalive, ReplicationMessage, XLogData};
use pgwire_repl::{Lsn, TimelineId};

use crate::error::{Error, Result};

/// Something that happened on a replication stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// A chunk of WAL. `data` is a slice of the receive buffer (no copy).
    XLogData(XLogData),
    /// A keepalive. When `reply_requested` is set, the reply goes out at the start of
    /// the next call that reads the stream, after the caller has had the chance to
    /// make its positions durable and report them.
    Keepalive(PrimaryKeepalive),
    /// The timeline being streamed ended (the server was promoted, or it was a
    /// historic timeline). Streaming continues on `next_timeline` from `next_start`;
    /// pg_receivewal restarts at the segment start of `next_start`. This is the last
    /// event; the connection is idle again afterwards.
    EndOfTimeline {
        /// The timeline that follows.
        next_timeline: TimelineId,
        /// Where it starts (the switch point; may lie before the end of what was sent
        /// on the old timeline).
        next_start: Lsn,
    },
    /// The server is shutting down: it sent `CommandComplete "COPY 0"` without
    /// CopyDone and closes the connection next. This is the last event.
    ServerShutdown,
}

/// What the caller must do after feeding a message to [`CopyBoth::handle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing to report (e.g. a CommandComplete inside the closing sequence).
    Nothing,
    /// The server entered CopyBoth mode.
    Started,
    /// Deliver this event.
    Event(StreamEvent),
    /// The server ended the copy; the caller must send CopyDone now.
    SendCopyDone,
    /// ReadyForQuery: the exchange is over and the connection is idle. Carries the
    /// next timeline when the server named one.
    Finished(Option<(TimelineId, Lsn)>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Starting,
    Streaming,
    ClientDone,
    BothDone,
    Finished,
    ShutDown,
    Failed,
}

/// The CopyBoth state machine of one `START_REPLICATION`.
///
/// ```
/// use pgwire_repl::proto::backend::{BackendMessage, CopyResponse};
/// use pgwire_repl::Lsn;
/// use walstream::protocol::{CopyBoth, Step};
///
/// let mut machine = CopyBoth::new(Lsn(0x1000000));
/// let step = machine
///     .handle(BackendMessage::CopyBothResponse(CopyResponse { format: 0, column_formats: vec![] }))
///     .unwrap();
/// assert_eq!(step, Step::Started);
/// ```
#[derive(Debug, Clone)]
pub struct CopyBoth {
    state: State,
    expected: Lsn,
    stop_requested: bool,
    next_timeline: Option<(TimelineId, Lsn)>,
    row_columns: Option<usize>,
}

impl CopyBoth {
    /// A machine for a `START_REPLICATION` that was sent with start position `start`.
    pub fn new(start: Lsn) -> CopyBoth {
        CopyBoth {
            state: State::Starting,
            expected: start,
            stop_requested: false,
            next_timeline: None,
            row_columns: None,
        }
    }

    /// The position the next XLogData must start at.
    pub fn expected(&self) -> Lsn {
        self.expected
    }

    /// True while WAL may still arrive.
    pub fn is_streaming(&self) -> bool {
        self.state == State::Streaming
    }

    /// True once the exchange is over (finished, shut down or failed): no more events.
    pub fn is_done(&self) -> bool {
        matches!(
            self.state,
            State::Finished | State::ShutDown | State::Failed
        )
    }

    /// True after `COPY 0`: the server closes the connection, an EOF is expected.
    pub fn is_shut_down(&self) -> bool {
        self.state == State::ShutDown
    }

    /// The client wants to stop. Returns true when the caller must send CopyDone now;
    /// before CopyBothResponse it is sent as soon as that arrives (see
    /// [`Step::SendCopyDone`]).
    pub fn stop(&mut self) -> bool {
        match self.state {
            State::Streaming => {
                self.state = State::ClientDone;
                true
            }
            State::Starting => {
                self.stop_requested = true;
                false
            }
            _ => false,
        }
    }

    /// Feeds one backend message.
    pub fn handle(&mut self, message: BackendMessage) -> Result<Step> {
        // Any error ends the exchange: a malformed CopyData payload or end-of-timeline
        // row used to leave the state as it was, so a caller that went on reading could
        // still be handed `Finished` (a clean end) after it (found by the copyboth_stream
        // fuzz target).
        let step = self.handle_message(message);
        if step.is_err() {
            self.state = State::Failed;
        }
        step
    }

    fn handle_message(&mut self, message: BackendMessage) -> Result<Step> {
        if let BackendMessage::ErrorResponse(db) = message {
            let context = match self.state {
                State::Starting => "starting replication",
                State::Streaming | State::ClientDone => "streaming WAL",
                _ => "ending replication",
            };
            self.state = State::Failed;
            return Err(Error::connection(pgwire_repl::Error::server(context, db)));
        }
        match (self.state, message) {
            (State::Starting, BackendMessage::CopyBothResponse(_)) => {
                if self.stop_requested {
                    self.state = State::ClientDone;
                    Ok(Step::SendCopyDone)
                } else {
                    self.state = State::Streaming;
                    Ok(Step::Started)
                }
            }
            // Start at a historic timeline's switch point: no CopyBoth, straight to
            // the next-timeline result set.
            (State::Starting, BackendMessage::RowDescription(fields)) => {
                self.state = State::BothDone;
                self.row_description(fields.len())
            }
            (State::Streaming, BackendMessage::CopyData(payload)) => self.copy_data(payload),
            (State::Streaming, BackendMessage::CopyDone) => {
                self.state = State::BothDone;
                Ok(Step::SendCopyDone)
            }
            // `COPY 0` without CopyDone: the walsender is shutting down (WalSndDone).
            (State::Streaming | State::ClientDone, BackendMessage::CommandComplete { .. }) => {
                self.state = State::ShutDown;
                Ok(Step::Event(StreamEvent::ServerShutdown))
            }
            // After our CopyDone the server may still send what it had queued.
            (State::ClientDone, BackendMessage::CopyData(_)) => Ok(Step::Nothing),
            (State::ClientDone, BackendMessage::CopyDone) => {
                self.state = State::BothDone;
                Ok(Step::Nothing)
            }
            (State::BothDone, BackendMessage::RowDescription(fields)) => {
                self.row_description(fields.len())
            }
            (State::BothDone, BackendMessage::DataRow(values)) => self.data_row(values),
            (State::BothDone, BackendMessage::CommandComplete { .. }) => Ok(Step::Nothing),
            (State::BothDone, BackendMessage::ReadyForQuery { .. }) => {
                self.state = State::Finished;
                Ok(Step::Finished(self.next_timeline))
            }
            (state, other) => {
                self.state = State::Failed;
                Err(Error::protocol(format!(
                    "unexpected {} from the server {}",
                    other.name(),
                    match state {
                        State::Starting => "in reply to START_REPLICATION",
                        State::Streaming => "while streaming WAL",
                        State::ClientDone => "after the client's CopyDone",
                        State::BothDone => "after the end of the WAL copy",
                        State::Finished => "after ReadyForQuery",
                        State::ShutDown => "after COPY 0 (server shutdown)",
                        State::Failed => "after an error",
                    }
                )))
            }
        }
    }

    fn copy_data(&mut self, payload: Bytes) -> Result<Step> {
        match ReplicationMessage::parse(payload)? {
            ReplicationMessage::XLogData(x) => {
                if x.wal_start != self.expected {
                    self.state = State::Failed;
                    return Err(Error::protocol(format!(
                        "the server sent WAL starting at {}, expected {} (the continuation of what came before)",
                        x.wal_start, self.expected
                    )));
                }
                let Some(end) = x.wal_start.checked_add(x.data.len() as u64) else {
                    self.state = State::Failed;
                    return Err(Error::protocol(format!(
                        "XLogData at {} of {} bytes overflows the LSN range",
                        x.wal_start,
                        x.data.len()
                    )));
                };
                self.expected = end;
                Ok(Step::Event(StreamEvent::XLogData(x)))
            }
            ReplicationMessage::PrimaryKeepalive(k) => Ok(Step::Event(StreamEvent::Keepalive(k))),
        }
    }

    fn row_description(&mut self, columns: usize) -> Result<Step> {
        if columns != 2 {
            self.state = State::Failed;
            return Err(Error::protocol(format!(
                "the end-of-timeline result set has {columns} columns, expected 2 (next_tli, next_tli_startpos)"
            )));
        }
        self.row_columns = Some(columns);
        Ok(Step::Nothing)
    }

    fn data_row(&mut self, values: Vec<Option<Bytes>>) -> Result<Step> {
        if self.row_columns.is_none() || self.next_timeline.is_some() {
            self.state = State::Failed;
            return Err(Error::protocol(
                "unexpected DataRow after the end of the WAL copy",
            ));
        }
        let text = |value: Option<&Option<Bytes>>, what: &str| -> Result<String> {
            let bytes = value
                .and_then(|v| v.as_ref())
                .ok_or_else(|| Error::protocol(format!("the end-of-timeline row has no {what}")))?;
            String::from_utf8(bytes.to_vec())
                .map_err(|_| Error::protocol(format!("the end-of-timeline {what} is not UTF-8")))
        };
        let tli_text = text(values.first(), "next_tli")?;
        let lsn_text = text(values.get(1), "next_tli_startpos")?;
        let timeline = tli_text
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|t| *t > 0)
            .ok_or_else(|| Error::protocol(format!("invalid next timeline {tli_text:?}")))?;
        let start: Lsn = lsn_text
            .trim()
            .parse()
            .map_err(|_| Error::protocol(format!("invalid next timeline start {lsn_text:?}")))?;
        self.next_timeline = Some((TimelineId(timeline), start));
        Ok(Step::Nothing)
    }
}

/// When standby status updates are due: periodically, and at once when the server
/// asked for one. Pure: the current time is passed in.
///
/// ```
/// use std::time::{Duration, Instant};
/// use walstream::protocol::StatusSchedule;
///
/// let t0 = Instant::now();
/// let mut schedule = StatusSchedule::new(Some(Duration::from_secs(10)), t0);
/// assert!(!schedule.due(t0 + Duration::from_secs(1)));
/// assert!(schedule.due(t0 + Duration::from_secs(10)));
/// schedule.request_reply();
/// schedule.sent(t0 + Duration::from_secs(10));
/// assert!(!schedule.due(t0 + Duration::from_secs(11)));
/// ```
#[derive(Debug, Clone)]
pub struct StatusSchedule {
    interval: Option<Duration>,
    last_sent: Instant,
    reply_requested: bool,
}

impl StatusSchedule {
    /// A schedule that sends every `interval` (never periodically with `None`),
    /// counting from `now`.
    pub fn new(interval: Option<Duration>, now: Instant) -> StatusSchedule {
        StatusSchedule {
            interval: interval.filter(|d| !d.is_zero()),
            last_sent: now,
            reply_requested: false,
        }
    }

    /// The server asked for a reply.
    pub fn request_reply(&mut self) {
        self.reply_requested = true;
    }

    /// Whether the server asked for a reply that has not been sent yet.
    pub fn reply_requested(&self) -> bool {
        self.reply_requested
    }

    /// True if an update should go out at `now`.
    pub fn due(&self, now: Instant) -> bool {
        self.reply_requested || self.next_periodic().is_some_and(|at| now >= at)
    }

    /// When the next periodic update is due, if any.
    pub fn next_periodic(&self) -> Option<Instant> {
        self.interval.map(|interval| self.last_sent + interval)
    }

    /// An update went out at `now`.
    pub fn sent(&mut self, now: Instant) {
        self.last_sent = now;
        self.reply_requested = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use pgwire_repl::proto::backend::{CopyResponse, FieldDescription};
    use pgwire_repl::DbError;

    fn w() -> BackendMessage {
        BackendMessage::CopyBothResponse(CopyResponse {
            format: 0,
            column_formats: vec![],
        })
    }

    fn xlog(start: u64, len: usize) -> BackendMessage {
        let mut out = BytesMut::new();
        ReplicationMessage::XLogData(XLogData {
            wal_start: Lsn(start),
            wal_end: Lsn(start + len as u64),
            send_time: 7,
            data: Bytes::from(vec![0xAB; len]),
        })
        .encode(&mut out);
        BackendMessage::CopyData(out.freeze())
    }

    fn keepalive(reply: bool) -> BackendMessage {
        let mut out = BytesMut::new();
        ReplicationMessage::PrimaryKeepalive(PrimaryKeepalive {
            wal_end: Lsn(5),
            send_time: 1,
            reply_requested: reply,
        })
        .encode(&mut out);
        BackendMessage::CopyData(out.freeze())
    }

    fn field(name: &str) -> FieldDescription {
        FieldDescription {
            name: name.into(),
            table_oid: 0,
            column_id: 0,
            type_oid: 25,
            type_size: -1,
            type_modifier: -1,
            format: 0,
        }
    }

    fn timeline_result() -> Vec<BackendMessage> {
        vec![
            BackendMessage::RowDescription(vec![field("next_tli"), field("next_tli_startpos")]),
            BackendMessage::DataRow(vec![
                Some(Bytes::from_static(b"2")),
                Some(Bytes::from_static(b"0/9000090")),
            ]),
            BackendMessage::CommandComplete {
                tag: "START_STREAMING".into(),
            },
            BackendMessage::CommandComplete {
                tag: "START_REPLICATION".into(),
            },
            BackendMessage::ReadyForQuery { status: b'I' },
        ]
    }

    fn run(machine: &mut CopyBoth, messages: Vec<BackendMessage>) -> Vec<Step> {
        messages
            .into_iter()
            .map(|m| machine.handle(m).unwrap())
            .collect()
    }

    #[test]
    fn streams_and_ends_a_timeline() {
        let mut m = CopyBoth::new(Lsn(0x100));
        let steps = run(
            &mut m,
            vec![w(), xlog(0x100, 16), keepalive(true), xlog(0x110, 4)],
        );
        assert_eq!(steps[0], Step::Started);
        assert!(matches!(&steps[1], Step::Event(StreamEvent::XLogData(x)) if x.data.len() == 16));
        assert!(matches!(&steps[2], Step::Event(StreamEvent::Keepalive(k)) if k.reply_requested));
        assert_eq!(m.expected(), Lsn(0x114));
        assert_eq!(
            m.handle(BackendMessage::CopyDone).unwrap(),
            Step::SendCopyDone
        );
        let steps = run(&mut m, timeline_result());
        assert_eq!(
            steps.last(),
            Some(&Step::Finished(Some((TimelineId(2), Lsn(0x9000090)))))
        );
        assert!(m.is_done());
    }

    #[test]
    fn immediate_end_of_timeline_without_copy_both() {
        let mut m = CopyBoth::new(Lsn(0x9000090));
        let steps = run(&mut m, timeline_result());
        assert_eq!(
            steps.last(),
            Some(&Step::Finished(Some((TimelineId(2), Lsn(0x9000090)))))
        );
    }

    #[test]
    fn copy_zero_is_a_server_shutdown() {
        let mut m = CopyBoth::new(Lsn(0));
        run(&mut m, vec![w(), xlog(0, 8)]);
        let step = m
            .handle(BackendMessage::CommandComplete {
                tag: "COPY 0".into(),
            })
            .unwrap();
        assert_eq!(step, Step::Event(StreamEvent::ServerShutdown));
        assert!(m.is_shut_down() && m.is_done());
    }

    #[test]
    fn client_stop_drains_queued_data() {
        let mut m = CopyBoth::new(Lsn(0));
        run(&mut m, vec![w()]);
        assert!(m.stop());
        let steps = run(
            &mut m,
            vec![
                xlog(0, 8),
                BackendMessage::CopyDone,
                BackendMessage::CommandComplete {
                    tag: "START_STREAMING".into(),
                },
                BackendMessage::CommandComplete {
                    tag: "START_REPLICATION".into(),
                },
                BackendMessage::ReadyForQuery { status: b'I' },
            ],
        );
        assert_eq!(steps.last(), Some(&Step::Finished(None)));
    }

    #[test]
    fn stop_before_copy_both_sends_copy_done_when_it_arrives() {
        let mut m = CopyBoth::new(Lsn(0));
        assert!(!m.stop());
        assert_eq!(m.handle(w()).unwrap(), Step::SendCopyDone);
    }

    #[test]
    fn errors_and_gaps_are_typed() {
        let mut m = CopyBoth::new(Lsn(0));
        run(&mut m, vec![w()]);
        let err = m
            .handle(BackendMessage::ErrorResponse(DbError {
                severity: "ERROR".into(),
                code: "58P01".into(),
                message: "requested WAL segment has already been removed".into(),
                ..DbError::default()
            }))
            .unwrap_err();
        assert_eq!(err.sqlstate(), Some("58P01"));
        assert_eq!(err.kind(), crate::ErrorKind::Server);

        let mut m = CopyBoth::new(Lsn(0x100));
        run(&mut m, vec![w()]);
        let err = m.handle(xlog(0x200, 8)).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Protocol);
        assert!(err.to_string().contains("expected 0/100"), "{err}");
    }

    #[test]
    fn unknown_sub_message_is_a_protocol_error() {
        let mut m = CopyBoth::new(Lsn(0));
        run(&mut m, vec![w()]);
        let err = m
            .handle(BackendMessage::CopyData(Bytes::from_static(b"s123")))
            .unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Protocol);
    }

    #[test]
    fn bad_timeline_rows_are_refused() {
        let mut m = CopyBoth::new(Lsn(0));
        m.handle(BackendMessage::RowDescription(vec![field("a"), field("b")]))
            .unwrap();
        let err = m
            .handle(BackendMessage::DataRow(vec![
                Some(Bytes::from_static(b"x")),
                None,
            ]))
            .unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Protocol);
    }

    #[test]
    fn schedule_without_interval_only_answers_requests() {
        let t0 = Instant::now();
        let mut s = StatusSchedule::new(None, t0);
        assert!(!s.due(t0 + Duration::from_secs(3600)));
        s.request_reply();
        assert!(s.due(t0));
        s.sent(t0);
        assert!(!s.due(t0));
    }

    proptest::proptest! {
        /// Any sequence of messages gives a step or an error, never a panic.
        #[test]
        fn arbitrary_copy_data_never_panics(payloads in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40), 0..8)) {
            let mut m = CopyBoth::new(Lsn(0));
            let _ = m.handle(w());
            for p in payloads {
                let _ = m.handle(BackendMessage::CopyData(Bytes::from(p)));
            }
        }
    }
}
