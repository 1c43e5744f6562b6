//! How a receiver behaves around its connection: the [`ReconnectPolicy`] (when to try
//! again after a lost connection, and when to give up) and the [`ReceiverEvent`]s it
//! reports through an [`EventHandler`] (connected, disconnected, retrying, given up,
//! timeline switched), so that an embedder sees what the receiver does without parsing
//! log lines.
//!
//! The defaults follow PostgreSQL's `pg_receivewal`, which waits 5 s between attempts,
//! with one difference that matters in an HA stack: the first attempt after a lost
//! connection is made at once, so that a receiver reaches a new leader as soon as it
//! accepts connections.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use pgwire_repl::{Lsn, TimelineId};

use crate::error::Error;

/// When a receiver reconnects after losing its connection, and when it gives up.
///
/// Attempt 1 after a lost connection waits [`first_delay`](Self::first_delay) (none by
/// default); every further attempt waits [`interval`](Self::interval) (5 s by default,
/// as pg_receivewal). The count starts again once a connection streams.
///
/// When the server was reached but its slot is missing or still held by the previous
/// connection, the receiver tries again after [`slot_wait`](Self::slot_wait) (1 s by
/// default) instead: that is a matter of seconds on a live server (an HA manager creates
/// its permanent slots 1–3 s after promoting a new leader), and the archive's loss bound
/// does not hold while the receiver waits.
///
/// By default the receiver gives up when no connection has streamed for 5 minutes,
/// returning the last error: a library does not retry forever unless asked to.
/// [`retry_forever`](Self::retry_forever) is what a long-running archiver wants (every
/// command of this project uses it, as pg_receivewal never gives up).
///
/// ```
/// use std::time::Duration;
/// use walstream::ReconnectPolicy;
///
/// let policy = ReconnectPolicy::default();
/// assert_eq!(policy.delay_before(1), Duration::ZERO);
/// assert_eq!(policy.delay_before(2), Duration::from_secs(5));
/// assert_eq!(policy.give_up_after_time(), Some(Duration::from_secs(300)));
/// assert_eq!(policy.slot_delay_before(2), Duration::from_secs(1));
///
/// let forever = ReconnectPolicy::default()
///     .interval(Duration::from_secs(2))
///     .retry_forever();
/// assert_eq!(forever.delay_before(7), Duration::from_secs(2));
/// assert_eq!(forever.give_up_after_time(), None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconnectPolicy {
    first_delay: Duration,
    interval: Duration,
    slot_wait: Duration,
    give_up_after: Option<Duration>,
}

/// pg_receivewal's `RECONNECT_SLEEP_TIME`.
pub const DEFAULT_RECONNECT_INTERVAL: Duration = Duration::from_secs(5);

/// How long, by default, a receiver goes on trying without a streaming connection.
pub const DEFAULT_GIVE_UP_AFTER: Duration = Duration::from_secs(300);

/// How often, by default, a receiver tries again while its slot is missing or in use.
pub const DEFAULT_SLOT_WAIT: Duration = Duration::from_secs(1);

impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy {
            first_delay: Duration::ZERO,
            interval: DEFAULT_RECONNECT_INTERVAL,
            slot_wait: DEFAULT_SLOT_WAIT,
            give_up_after: Some(DEFAULT_GIVE_UP_AFTER),
        }
    }
}

impl ReconnectPolicy {
    /// The wait before the first attempt after a lost connection (default none).
    pub fn first_delay(mut self, delay: Duration) -> Self {
        self.first_delay = delay;
        self
    }

    /// The wait before every further attempt (default 5 s).
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// The wait before another attempt when the server was reached but its slot is
    /// missing or in use (default 1 s; never longer than [`interval`](Self::interval)).
    pub fn slot_wait(mut self, wait: Duration) -> Self {
        self.slot_wait = wait;
        self
    }

    /// The wait before attempt `attempt` after a failure that was the slot's (missing
    /// or in use) rather than the connection's.
    pub fn slot_delay_before(&self, attempt: u32) -> Duration {
        self.delay_before(attempt).min(self.slot_wait)
    }

    /// Gives up when no connection has streamed for this long (default 5 minutes),
    /// counted from the first failure; `None` never gives up.
    pub fn give_up_after(mut self, limit: Option<Duration>) -> Self {
        self.give_up_after = limit;
        self
    }

    /// Never gives up: retries every [`interval`](Self::interval) until stopped.
    pub fn retry_forever(self) -> Self {
        self.give_up_after(None)
    }

    /// The wait before attempt `attempt` (1 for the first after a lost connection).
    pub fn delay_before(&self, attempt: u32) -> Duration {
        if attempt <= 1 {
            self.first_delay
        } else {
            self.interval
        }
    }

    /// How long the receiver goes on without a streaming connection; `None` is forever.
    pub fn give_up_after_time(&self) -> Option<Duration> {
        self.give_up_after
    }
}

/// Something that happened to a receiver's connection, passed to its [`EventHandler`].
///
/// Events borrow from the receiver; copy what you keep.
#[derive(Debug)]
#[non_exhaustive]
pub enum ReceiverEvent<'a> {
    /// Streaming started on `server` (as the connection names it, `host:port`).
    Streaming {
        /// The server streamed from.
        server: &'a str,
        /// The timeline streamed.
        timeline: TimelineId,
        /// Where streaming started (a segment start).
        start: Lsn,
    },
    /// The server ended a timeline; streaming goes on on the next.
    TimelineSwitch {
        /// The timeline that ended.
        from: TimelineId,
        /// The timeline that follows.
        to: TimelineId,
        /// Where `to` begins.
        at: Lsn,
    },
    /// The connection was lost or could not be made. `error` is `None` when the server
    /// shut down cleanly.
    Disconnected {
        /// Why.
        error: Option<&'a Error>,
    },
    /// The receiver waits `delay`, then makes attempt `attempt` (counted since the last
    /// connection that streamed).
    Retrying {
        /// Attempts since the last streaming connection, this one included.
        attempt: u32,
        /// The wait before it.
        delay: Duration,
        /// What the receiver is waiting for, when it knows (a replication slot that an
        /// HA manager recreates on a new leader, say).
        waiting_for: Option<&'a str>,
    },
    /// No connection streamed for the policy's limit: the receiver returns `error`.
    GaveUp {
        /// The last failure, which the receiver returns.
        error: &'a Error,
        /// How long it had been trying.
        after: Duration,
    },
}

impl fmt::Display for ReceiverEvent<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReceiverEvent::Streaming {
                server,
                timeline,
                start,
            } => write!(
                f,
                "streaming from {server} on timeline {timeline} at {start}"
            ),
            ReceiverEvent::TimelineSwitch { from, to, at } => {
                write!(f, "timeline {from} ended; timeline {to} begins at {at}")
            }
            ReceiverEvent::Disconnected { error: None } => f.write_str("the server shut down"),
            ReceiverEvent::Disconnected { error: Some(error) } => {
                write!(f, "disconnected: {error}")
            }
            ReceiverEvent::Retrying {
                attempt,
                delay,
                waiting_for,
            } => {
                write!(
                    f,
                    "connecting again in {:.1} s (attempt {attempt})",
                    delay.as_secs_f64()
                )?;
                if let Some(what) = waiting_for {
                    write!(f, ", waiting for {what}")?;
                }
                Ok(())
            }
            ReceiverEvent::GaveUp { after, .. } => write!(
                f,
                "giving up: no connection streamed for {:.0} s",
                after.as_secs_f64()
            ),
        }
    }
}

/// A callback for [`ReceiverEvent`]s, set with
/// [`ReceiveOptions::on_event`](crate::ReceiveOptions::on_event). It runs on the
/// receiver's task: keep it short (send the event on, or log it).
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use walstream::{EventHandler, ReceiverEvent};
///
/// let seen = Arc::new(Mutex::new(Vec::new()));
/// let log = seen.clone();
/// let handler = EventHandler::new(move |event: &ReceiverEvent<'_>| {
///     log.lock().unwrap().push(event.to_string());
/// });
/// handler.emit(&ReceiverEvent::Disconnected { error: None });
/// assert_eq!(seen.lock().unwrap()[0], "the server shut down");
/// ```
#[derive(Clone)]
pub struct EventHandler(Arc<dyn Fn(&ReceiverEvent<'_>) + Send + Sync>);

impl EventHandler {
    /// Wraps a callback.
    pub fn new(callback: impl Fn(&ReceiverEvent<'_>) + Send + Sync + 'static) -> EventHandler {
        EventHandler(Arc::new(callback))
    }

    /// Calls the callback.
    pub fn emit(&self, event: &ReceiverEvent<'_>) {
        (self.0)(event)
    }
}

impl fmt::Debug for EventHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EventHandler(..)")
    }
}
