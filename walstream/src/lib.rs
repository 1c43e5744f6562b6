//! Physical WAL streaming (`START_REPLICATION`), WAL verification and a segment writer.
//!
//! * [`WalStream`]: `START_REPLICATION … PHYSICAL` as a stream of typed
//!   [`StreamEvent`]s (WAL, keepalives, the end of a timeline, a server shutdown),
//!   with automatic and periodic standby status updates. Its state machine is pure
//!   ([`protocol`]).
//! * [`WalDir`]: a pg_receivewal-compatible directory of WAL segments (`.partial`
//!   files, durable renames, `.history` files, resume).
//! * [`receive_wal`]: the whole receiver (what `pg_receivewal` does): resume from the
//!   directory, verify every byte with [`decode::WalVerifier`], follow timeline
//!   switches, reconnect after a lost connection as a [`ReconnectPolicy`] says, and
//!   report each step as a [`ReceiverEvent`].
//! * [`receive_wal_into`] and [`WalDestination`]: the same receiver writing anywhere:
//!   [`LocalDir`] (what `receive_wal` uses), [`MemoryWal`], or a destination of your own.
//! * [`slot`]: create and drop physical replication slots.
//!
//! What an embedder names when handling [`StreamEvent`]s is re-exported here:
//! [`XLogData`] (its `data` is a [`Bytes`] slice of the receive buffer),
//! [`PrimaryKeepalive`], [`Lsn`] and [`TimelineId`]; so are the verifier's types
//! ([`WalVerifier`], [`VerifierConfig`], [`WalVerifyError`]) and the `pgwire_repl`
//! crate itself, for its [`pgwire_repl::Config`] and [`pgwire_repl::ReplicationClient`].
//!
//! ```no_run
//! # async fn demo() -> walstream::Result<()> {
//! use walstream::{Lsn, StreamEvent, StreamOptions, WalStream, XLogData};
//!
//! let config = walstream::pgwire_repl::Config::parse_with_env("host=primary user=repl")?;
//! let client = walstream::pgwire_repl::ReplicationClient::connect(&config).await?;
//! let mut stream = WalStream::start(client, StreamOptions::new(Lsn(0x3000000))).await?;
//! if let Some(StreamEvent::XLogData(XLogData { wal_start, data, .. })) = stream.next_event().await? {
//!     let bytes: walstream::Bytes = data;
//!     println!("{} bytes at {wal_start}", bytes.len());
//! }
//! # Ok(()) }
//! ```

pub mod decode;
pub mod destination;
mod error;
pub mod memory;
pub mod protocol;
pub mod receive;
pub mod reconnect;
pub mod slot;
mod stream;
pub mod waldir;

pub use bytes::Bytes;
pub use decode::{VerifierConfig, WalVerifier, WalVerifyError};
pub use destination::{LocalDir, LocalWriter, Resume, WalDestination, WalWriter, WriterTotals};
pub use error::{Error, ErrorKind, Result};
pub use memory::{MemoryWal, MemoryWriter};
pub use pgwire_repl;
pub use pgwire_repl::proto::replication::{HotStandbyFeedback, PrimaryKeepalive, XLogData};
pub use pgwire_repl::{Lsn, SystemId, TimelineId, WalSegmentSize};
pub use protocol::StreamEvent;
pub use receive::{receive_wal, receive_wal_into, EndReason, ReceiveOptions, ReceiveSummary};
pub use reconnect::{
    EventHandler, ReceiverEvent, ReconnectPolicy, DEFAULT_GIVE_UP_AFTER,
    DEFAULT_RECONNECT_INTERVAL, DEFAULT_SLOT_WAIT,
};
pub use stream::{
    EventStream, Feedback, StopHandle, StreamOptions, WalStream, DEFAULT_IDLE_TIMEOUT,
    DEFAULT_STATUS_INTERVAL,
};
pub use waldir::{Compression, ResumePoint, SegmentWriter, WalDir, WalDirOptions};
