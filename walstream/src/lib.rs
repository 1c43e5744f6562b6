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
//!   switches, reconnect after a lost connection.
//! * [`receive_wal_into`] and [`WalDestination`]: the same receiver writing anywhere:
//!   [`LocalDir`] (what `receive_wal` uses), [`MemoryWal`], or a destination of your own.
//! * [`slot`]: create and drop physical replication slots.

pub mod decode;
pub mod destination;
mod error;
pub mod memory;
pub mod protocol;
pub mod receive;
pub mod slot;
mod stream;
pub mod waldir;

pub use destination::{LocalDir, LocalWriter, Resume, WalDestination, WalWriter, WriterTotals};
pub use error::{Error, ErrorKind, Result};
pub use memory::{MemoryWal, MemoryWriter};
pub use protocol::StreamEvent;
pub use receive::{receive_wal, receive_wal_into, EndReason, ReceiveOptions, ReceiveSummary};
pub use stream::{
    EventStream, Feedback, StreamOptions, WalStream, DEFAULT_IDLE_TIMEOUT, DEFAULT_STATUS_INTERVAL,
};
pub use waldir::{Compression, ResumePoint, SegmentWriter, WalDir, WalDirOptions};
