//! The WAL page and record verifier: arbitrary bytes, fed at a segment start in
//! arbitrary chunks, never panic, and the verdict does not depend on the chunking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgwire_repl::{Lsn, TimelineId, WalSegmentSize};
use walstream::decode::{VerifierConfig, WalVerifier};

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let config = VerifierConfig {
        // 16 MiB, so that the seeds (real segment 000000010000000000000001, which
        // starts at 0/1000000 = `start`) verify as far as they go.
        segment_size: WalSegmentSize::DEFAULT,
        server_major: None,
        system_id: None,
        timeline: TimelineId(1),
        verify_records: true,
    };
    let start = Lsn(1 << 24);
    let verdict = |cuts: &[usize]| {
        let mut verifier = WalVerifier::new(start, config.clone());
        let mut from = 0;
        for &to in cuts {
            if let Err(e) = verifier.feed(Lsn(start.0 + from as u64), &rest[from..to]) {
                return (Some(e.lsn), verifier.verified_up_to());
            }
            from = to;
        }
        (None, verifier.verified_up_to())
    };
    let cut = (split as usize * 131) % (rest.len() + 1);
    assert_eq!(verdict(&[rest.len()]), verdict(&[cut, rest.len()]));
});
