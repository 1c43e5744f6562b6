//! CopyBoth sub-messages of START_REPLICATION: parse must never panic, and whatever
//! parses must survive encode → parse unchanged. (Byte-exact re-encoding is not
//! expected: any non-zero reply-requested byte means "yes", as in pg_receivewal.)
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use pgwire_repl::proto::replication::{HotStandbyFeedback, ReplicationMessage, StandbyStatusUpdate};

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = ReplicationMessage::parse(Bytes::copy_from_slice(data)) {
        let mut out = BytesMut::new();
        message.encode(&mut out);
        assert_eq!(out.len(), data.len());
        assert_eq!(ReplicationMessage::parse(out.freeze()).unwrap(), message);
    }
    if let Ok(update) = StandbyStatusUpdate::parse(data) {
        let mut out = BytesMut::new();
        update.encode(&mut out);
        assert_eq!(out[..33], data[..33]);
        assert_eq!(StandbyStatusUpdate::parse(&out).unwrap(), update);
    }
    let _ = HotStandbyFeedback::parse(data);
});
