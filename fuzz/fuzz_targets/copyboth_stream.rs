//! START_REPLICATION's CopyBoth state machine fed whatever a hostile server sends:
//! arbitrary bytes are framed into backend messages and handed to `CopyBoth::handle`.
//! It must never panic, accept WAL only where the previous XLogData ended (no gap, no
//! overlap), never move its expected position backwards, and stay failed after an error.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pgwire_repl::proto::backend::{decode, DecodeLimits};
use pgwire_repl::Lsn;
use walstream::protocol::{CopyBoth, Step};
use walstream::StreamEvent;

fuzz_target!(|data: &[u8]| {
    // The first byte: stop (send CopyDone) after that many messages, or never (0).
    let Some((&stop_after, rest)) = data.split_first() else { return };
    let limits = DecodeLimits { max_short_message: 4096, max_long_message: 1 << 16 };
    let mut buf = BytesMut::from(rest);
    let start = Lsn(0x100_0000);
    let mut machine = CopyBoth::new(start);
    let mut expected = start;
    let mut count = 0u32;
    while let Ok(Some(message)) = decode(&mut buf, &limits) {
        count += 1;
        if u32::from(stop_after) == count {
            machine.stop();
        }
        match machine.handle(message) {
            Ok(Step::Event(StreamEvent::XLogData(x))) => {
                assert_eq!(x.wal_start, expected, "accepted WAL out of order");
                expected = Lsn(x.wal_start.0 + x.data.len() as u64);
                assert_eq!(machine.expected(), expected);
            }
            Ok(_) => assert!(machine.expected() >= expected),
            Err(_) => {
                // Once failed, it accepts nothing more.
                if let Ok(Some(next)) = decode(&mut buf, &limits) {
                    assert!(machine.handle(next).is_err(), "accepted a message after an error");
                }
                return;
            }
        }
        if machine.is_done() {
            return;
        }
    }
});
