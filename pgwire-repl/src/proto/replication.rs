//! CopyBoth sub-messages of `START_REPLICATION … PHYSICAL`.
//!
//! All integers are big-endian. Timestamps are microseconds since 2000-01-01 UTC.
//!
//! ```
//! use bytes::BytesMut;
//! use pgwire_repl::proto::replication::{ReplicationMessage, StandbyStatusUpdate};
//! use pgwire_repl::Lsn;
//!
//! let update = StandbyStatusUpdate {
//!     write: Lsn(0x1000), flush: Lsn(0x800), apply: Lsn::INVALID,
//!     client_time: 0, reply_requested: false,
//! };
//! let mut payload = BytesMut::new();
//! update.encode(&mut payload);
//! assert_eq!(payload.len(), 34);
//! assert_eq!(StandbyStatusUpdate::parse(&payload).unwrap(), update);
//! ```

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::{Error, Result};
use crate::types::Lsn;

/// Seconds from the Unix epoch to the PostgreSQL epoch (2000-01-01 00:00:00 UTC).
const POSTGRES_EPOCH_UNIX_SECONDS: u64 = 946_684_800;

/// The current time as PostgreSQL's timestamp: microseconds since 2000-01-01 UTC.
pub fn postgres_now() -> i64 {
    to_postgres_timestamp(SystemTime::now())
}

/// Converts a `SystemTime` to microseconds since 2000-01-01 UTC (negative before it).
pub fn to_postgres_timestamp(time: SystemTime) -> i64 {
    let epoch = UNIX_EPOCH + Duration::from_secs(POSTGRES_EPOCH_UNIX_SECONDS);
    match time.duration_since(epoch) {
        Ok(after) => i64::try_from(after.as_micros()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_micros()).unwrap_or(i64::MAX),
    }
}

/// `w`: a chunk of WAL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XLogData {
    /// The WAL position of the first byte of `data`.
    pub wal_start: Lsn,
    /// The server's current end of WAL (its flush position, or the switch point on a
    /// historic timeline).
    pub wal_end: Lsn,
    /// Server time when sent.
    pub send_time: i64,
    /// The WAL bytes: a slice of the receive buffer, not a copy.
    pub data: Bytes,
}

/// `k`: a primary keepalive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrimaryKeepalive {
    /// The server's sent position.
    pub wal_end: Lsn,
    /// Server time when sent.
    pub send_time: i64,
    /// The server wants a status update now; it disconnects after `wal_sender_timeout`.
    pub reply_requested: bool,
}

/// A server → client CopyData payload during physical streaming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// `w`.
    XLogData(XLogData),
    /// `k`.
    PrimaryKeepalive(PrimaryKeepalive),
}

impl ReplicationMessage {
    /// Parses a CopyData payload. `payload` is sliced, never copied.
    pub fn parse(payload: Bytes) -> Result<ReplicationMessage> {
        match payload.first() {
            Some(b'w') => {
                if payload.len() < 25 {
                    return Err(short("XLogData", 25, payload.len()));
                }
                Ok(ReplicationMessage::XLogData(XLogData {
                    wal_start: Lsn(be_u64(&payload[1..9])),
                    wal_end: Lsn(be_u64(&payload[9..17])),
                    send_time: be_u64(&payload[17..25]) as i64,
                    data: payload.slice(25..),
                }))
            }
            Some(b'k') => {
                if payload.len() != 18 {
                    return Err(Error::protocol(format!(
                        "primary keepalive message has {} bytes, expected 18",
                        payload.len()
                    )));
                }
                Ok(ReplicationMessage::PrimaryKeepalive(PrimaryKeepalive {
                    wal_end: Lsn(be_u64(&payload[1..9])),
                    send_time: be_u64(&payload[9..17]) as i64,
                    reply_requested: payload[17] != 0,
                }))
            }
            Some(&other) => Err(Error::protocol(format!(
                "unexpected replication message type 0x{other:02x} in the WAL stream (expected 'w' or 'k')"
            ))),
            None => Err(Error::protocol("empty CopyData message in the WAL stream")),
        }
    }

    /// Appends the payload form (without CopyData framing).
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            ReplicationMessage::XLogData(x) => {
                out.reserve(25 + x.data.len());
                out.put_u8(b'w');
                out.put_u64(x.wal_start.0);
                out.put_u64(x.wal_end.0);
                out.put_i64(x.send_time);
                out.put_slice(&x.data);
            }
            ReplicationMessage::PrimaryKeepalive(k) => {
                out.put_u8(b'k');
                out.put_u64(k.wal_end.0);
                out.put_i64(k.send_time);
                out.put_u8(u8::from(k.reply_requested));
            }
        }
    }
}

/// `r`: the standby status update a client sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandbyStatusUpdate {
    /// Last WAL byte + 1 written to disk (not necessarily flushed).
    pub write: Lsn,
    /// Last WAL byte + 1 durably flushed. Report only what is fsynced: with a slot this
    /// advances the slot's restart_lsn, letting the server recycle older WAL.
    pub flush: Lsn,
    /// Last WAL byte + 1 applied (0 for a pure receiver).
    pub apply: Lsn,
    /// Client time, microseconds since 2000-01-01 UTC.
    pub client_time: i64,
    /// Ask the server to answer with a keepalive at once.
    pub reply_requested: bool,
}

impl StandbyStatusUpdate {
    /// Appends the 34-byte payload.
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u8(b'r');
        out.put_u64(self.write.0);
        out.put_u64(self.flush.0);
        out.put_u64(self.apply.0);
        out.put_i64(self.client_time);
        out.put_u8(u8::from(self.reply_requested));
    }

    /// Parses the payload (used by tests and scripted servers).
    pub fn parse(payload: &[u8]) -> Result<StandbyStatusUpdate> {
        if payload.len() != 34 || payload[0] != b'r' {
            return Err(Error::protocol(format!(
                "not a 34-byte standby status update ({} bytes)",
                payload.len()
            )));
        }
        Ok(StandbyStatusUpdate {
            write: Lsn(be_u64(&payload[1..9])),
            flush: Lsn(be_u64(&payload[9..17])),
            apply: Lsn(be_u64(&payload[17..25])),
            client_time: be_u64(&payload[25..33]) as i64,
            reply_requested: payload[33] != 0,
        })
    }
}

/// `h`: hot-standby feedback. All-zero xmin values mean "stop holding back cleanup".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HotStandbyFeedback {
    /// Client time, microseconds since 2000-01-01 UTC.
    pub client_time: i64,
    /// The standby's oldest xmin.
    pub xmin: u32,
    /// Its epoch.
    pub xmin_epoch: u32,
    /// Oldest catalog xmin.
    pub catalog_xmin: u32,
    /// Its epoch.
    pub catalog_xmin_epoch: u32,
}

impl HotStandbyFeedback {
    /// Appends the 25-byte payload.
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u8(b'h');
        out.put_i64(self.client_time);
        out.put_u32(self.xmin);
        out.put_u32(self.xmin_epoch);
        out.put_u32(self.catalog_xmin);
        out.put_u32(self.catalog_xmin_epoch);
    }

    /// Parses the payload (used by tests and scripted servers).
    pub fn parse(payload: &[u8]) -> Result<HotStandbyFeedback> {
        if payload.len() != 25 || payload[0] != b'h' {
            return Err(Error::protocol(format!(
                "not a 25-byte hot standby feedback message ({} bytes)",
                payload.len()
            )));
        }
        Ok(HotStandbyFeedback {
            client_time: be_u64(&payload[1..9]) as i64,
            xmin: be_u32(&payload[9..13]),
            xmin_epoch: be_u32(&payload[13..17]),
            catalog_xmin: be_u32(&payload[17..21]),
            catalog_xmin_epoch: be_u32(&payload[21..25]),
        })
    }
}

fn short(what: &str, need: usize, got: usize) -> Error {
    Error::protocol(format!(
        "{what} message has {got} bytes, needs at least {need}"
    ))
}

fn be_u64(b: &[u8]) -> u64 {
    let mut array = [0u8; 8];
    array.copy_from_slice(&b[..8]);
    u64::from_be_bytes(array)
}

fn be_u32(b: &[u8]) -> u32 {
    let mut array = [0u8; 4];
    array.copy_from_slice(&b[..4]);
    u32::from_be_bytes(array)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn epoch() {
        let epoch = UNIX_EPOCH + Duration::from_secs(POSTGRES_EPOCH_UNIX_SECONDS);
        assert_eq!(to_postgres_timestamp(epoch), 0);
        assert_eq!(to_postgres_timestamp(epoch + Duration::from_micros(5)), 5);
        assert_eq!(
            to_postgres_timestamp(epoch - Duration::from_secs(1)),
            -1_000_000
        );
    }

    #[test]
    fn xlogdata_payload_is_not_copied() {
        let mut wire = BytesMut::new();
        let msg = ReplicationMessage::XLogData(XLogData {
            wal_start: Lsn(1),
            wal_end: Lsn(2),
            send_time: 3,
            data: Bytes::from_static(&[9; 64]),
        });
        msg.encode(&mut wire);
        let wire = wire.freeze();
        let ReplicationMessage::XLogData(parsed) = ReplicationMessage::parse(wire.clone()).unwrap()
        else {
            panic!()
        };
        assert_eq!(parsed.data.as_ptr(), wire[25..].as_ptr());
    }

    #[test]
    fn bad_payloads() {
        assert!(ReplicationMessage::parse(Bytes::new()).is_err());
        assert!(ReplicationMessage::parse(Bytes::from_static(b"w123")).is_err());
        assert!(ReplicationMessage::parse(Bytes::from_static(b"k")).is_err());
        assert!(ReplicationMessage::parse(Bytes::from_static(b"s000000000000000000")).is_err());
    }

    proptest! {
        #[test]
        fn replication_messages_round_trip(
            start: u64, end: u64, time: i64, reply: bool,
            data in proptest::collection::vec(any::<u8>(), 0..200),
            keepalive: bool,
        ) {
            let msg = if keepalive {
                ReplicationMessage::PrimaryKeepalive(PrimaryKeepalive { wal_end: Lsn(end), send_time: time, reply_requested: reply })
            } else {
                ReplicationMessage::XLogData(XLogData { wal_start: Lsn(start), wal_end: Lsn(end), send_time: time, data: data.into() })
            };
            let mut out = BytesMut::new();
            msg.encode(&mut out);
            prop_assert_eq!(ReplicationMessage::parse(out.freeze()).unwrap(), msg);
        }

        #[test]
        fn status_and_feedback_round_trip(w: u64, f: u64, a: u64, t: i64, r: bool, x: [u32; 4]) {
            let update = StandbyStatusUpdate { write: Lsn(w), flush: Lsn(f), apply: Lsn(a), client_time: t, reply_requested: r };
            let mut out = BytesMut::new();
            update.encode(&mut out);
            prop_assert_eq!(StandbyStatusUpdate::parse(&out).unwrap(), update);
            let feedback = HotStandbyFeedback { client_time: t, xmin: x[0], xmin_epoch: x[1], catalog_xmin: x[2], catalog_xmin_epoch: x[3] };
            let mut out = BytesMut::new();
            feedback.encode(&mut out);
            prop_assert_eq!(HotStandbyFeedback::parse(&out).unwrap(), feedback);
        }

        #[test]
        fn arbitrary_payloads_never_panic(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = ReplicationMessage::parse(Bytes::from(data.clone()));
            let _ = StandbyStatusUpdate::parse(&data);
            let _ = HotStandbyFeedback::parse(&data);
        }
    }
}
