//! Unit tests of the verifier against synthetic WAL.

use pgwire_repl::{Lsn, SystemId, TimelineId, WalSegmentSize};
use proptest::prelude::*;

use super::layout::{WAL_PAGE_SIZE, XLP_FIRST_IS_CONTRECORD};
use super::synth::{SwitchPadding, SynthOptions, WalBuilder};
use super::*;

const MIB: u64 = 1 << 20;

fn seg(bytes: u64) -> WalSegmentSize {
    WalSegmentSize::new(bytes).unwrap()
}

fn opts(segment: u64) -> SynthOptions {
    SynthOptions::new(seg(segment), 16)
}

fn config(segment: u64) -> VerifierConfig {
    VerifierConfig {
        segment_size: seg(segment),
        server_major: Some(16),
        system_id: Some(SystemId(7_000_000_000_000_000_001)),
        timeline: TimelineId(1),
        verify_records: true,
    }
}

/// Feeds `bytes` starting at `start` in chunks of `chunk` bytes.
fn run(
    start: Lsn,
    cfg: VerifierConfig,
    bytes: &[u8],
    chunk: usize,
) -> (WalVerifier, Result<(), WalVerifyError>, Vec<RecordInfo>) {
    let mut verifier = WalVerifier::new(start, cfg);
    let mut records = Vec::new();
    let mut result = Ok(());
    let mut lsn = start;
    for piece in bytes.chunks(chunk.max(1)) {
        result = verifier.feed_with(lsn, piece, |r| records.push(*r));
        if result.is_err() {
            break;
        }
        lsn = Lsn(lsn.0 + piece.len() as u64);
    }
    (verifier, result, records)
}

fn verify_all(wal: &WalBuilder, cfg: VerifierConfig) -> (WalVerifier, Vec<RecordInfo>) {
    let (verifier, result, records) = run(wal.start(), cfg, wal.bytes(), 128 * 1024);
    if let Err(err) = result {
        panic!("{err}");
    }
    (verifier, records)
}

/// A stream with a bit of everything, starting at a segment start.
fn mixed_stream(segment: u64, start: Lsn) -> WalBuilder {
    let mut wal = WalBuilder::new(start, opts(segment));
    for i in 0..40u32 {
        wal.filler(24 + (i * 37) % 300);
    }
    wal.filler(8192 + 24); // a full-page image
    wal.filler(20_000); // several pages
    wal.filler(24); // header only
    for i in 0..30u32 {
        wal.filler(50 + i * 101);
    }
    wal.switch();
    wal.filler(300_000);
    for _ in 0..10 {
        wal.filler(100);
    }
    wal
}

#[test]
fn mixed_stream_verifies_and_reports_every_record() {
    let wal = mixed_stream(MIB, Lsn(MIB));
    let (verifier, records) = verify_all(&wal, config(MIB));
    let expected: Vec<Lsn> = wal.records().iter().map(|r| r.lsn).collect();
    let got: Vec<Lsn> = records.iter().map(|r| r.lsn).collect();
    assert_eq!(got, expected);
    assert_eq!(verifier.records_verified(), expected.len() as u64);
    assert_eq!(verifier.position(), wal.position());
    assert_eq!(verifier.verified_up_to(), wal.position());
    assert!(records.iter().any(RecordInfo::is_switch));
}

#[test]
fn one_byte_at_a_time() {
    let wal = mixed_stream(MIB, Lsn(MIB));
    let (verifier, result, records) = run(wal.start(), config(MIB), wal.bytes(), 1);
    result.unwrap();
    assert_eq!(records.len(), wal.records().len());
    assert_eq!(verifier.verified_up_to(), wal.position());
}

#[test]
fn record_longer_than_a_segment() {
    let mut wal = WalBuilder::new(Lsn(4 * MIB), opts(MIB));
    wal.filler(100);
    let big = wal.filler((MIB + MIB / 2) as u32);
    wal.filler(100);
    let (verifier, records) = verify_all(&wal, config(MIB));
    assert_eq!(records.len(), 3);
    assert_eq!(records[1].lsn, big);
    assert!(records[1].end.0 > 5 * MIB + MIB / 4);
    assert_eq!(verifier.verified_up_to(), wal.position());
}

#[test]
fn verified_up_to_stays_at_an_incomplete_record() {
    let mut wal = WalBuilder::new(Lsn(MIB), opts(MIB));
    let a = wal.filler(100);
    let b = wal.filler(50_000);
    let bytes = wal.bytes();
    let cut = (b.0 - MIB) as usize + 30_000;
    let mut verifier = WalVerifier::new(Lsn(MIB), config(MIB));
    verifier.feed(Lsn(MIB), &bytes[..cut]).unwrap();
    assert_eq!(verifier.records_verified(), 1);
    assert_eq!(verifier.verified_up_to(), b);
    assert_eq!(verifier.last_record(), Some(a));
    verifier.feed(Lsn(MIB + cut as u64), &bytes[cut..]).unwrap();
    assert_eq!(verifier.verified_up_to(), wal.position());
}

#[test]
fn xlog_switch_in_various_places() {
    // (bytes of filler before the switch record, padding style)
    let page = WAL_PAGE_SIZE as u32;
    for style in [SwitchPadding::Zeros, SwitchPadding::PageHeaders] {
        // 1_045_464: the switch record ends exactly at the segment end (no padding).
        for &filler in &[
            0u32,
            100,
            page - 40 - 24,
            page - 40 - 8,
            page - 40,
            3 * page,
            1_045_464,
            1_045_456,
        ] {
            let mut options = opts(MIB);
            options.switch_padding = style;
            let mut wal = WalBuilder::new(Lsn(MIB), options);
            if filler >= 24 {
                wal.filler(filler);
            }
            let switch = wal.switch();
            let after = wal.filler(100);
            assert_eq!(after, Lsn(2 * MIB + 40), "filler {filler}");
            if filler == 1_045_464 {
                assert_eq!(switch.0 + 24, 2 * MIB);
            }
            let (verifier, records) = verify_all(&wal, config(MIB));
            let found = records.iter().find(|r| r.is_switch()).unwrap();
            assert_eq!(found.lsn, switch);
            assert_eq!(
                verifier.verified_up_to(),
                wal.position(),
                "filler {filler} {style:?}"
            );
            // Every chunking of the padding too.
            let (v, result, _) = run(wal.start(), config(MIB), wal.bytes(), 7919);
            result.unwrap();
            assert_eq!(v.records_verified(), records.len() as u64);
        }
    }
}

#[test]
fn non_zero_switch_padding_is_refused() {
    let mut wal = WalBuilder::new(Lsn(MIB), opts(MIB));
    wal.filler(100);
    let switch = wal.switch();
    wal.filler(100);
    let mut bytes = wal.bytes().to_vec();
    let at = (switch.0 - MIB) as usize + 5000;
    bytes[at] = 1;
    let (verifier, result, _) = run(wal.start(), config(MIB), &bytes, 4096);
    let err = result.unwrap_err();
    assert_eq!(
        err.kind,
        WalVerifyErrorKind::BadSwitchPadding {
            switch_record: switch
        }
    );
    assert_eq!(err.lsn, Lsn(MIB + at as u64));
    assert!(verifier.verified_up_to() <= err.lsn);
}

#[test]
fn start_in_the_middle_of_a_record_at_a_segment_start() {
    let mut wal = WalBuilder::new(Lsn(MIB), opts(MIB));
    wal.filler(100);
    wal.filler((2 * MIB) as u32); // spans segments 1, 2 and into 3
    let next = wal.filler(100);
    wal.filler(9000);
    for start in [2 * MIB, 3 * MIB] {
        let bytes = wal.bytes_from(Lsn(start));
        for chunk in [1, 100, 8192, 128 * 1024] {
            if chunk == 1 && start == 2 * MIB {
                continue; // slow and covered by the 3 MiB start
            }
            let (verifier, result, records) = run(Lsn(start), config(MIB), bytes, chunk);
            result.unwrap();
            assert_eq!(records.len(), 2);
            assert_eq!(records[0].lsn, next);
            assert_eq!(verifier.verified_up_to(), wal.position());
        }
    }
}

#[test]
fn start_at_any_page_or_byte() {
    let wal = mixed_stream(MIB, Lsn(MIB));
    let records = wal.records();
    for start in [
        MIB + WAL_PAGE_SIZE,
        MIB + 5 * WAL_PAGE_SIZE,
        MIB + 5 * WAL_PAGE_SIZE + 17,
        MIB + 100,
    ] {
        let (verifier, result, seen) =
            run(Lsn(start), config(MIB), wal.bytes_from(Lsn(start)), 10_000);
        result.unwrap();
        // Every record starting at or after the first page boundary from `start` is verified.
        let boundary = start.next_multiple_of(WAL_PAGE_SIZE);
        let first = seen.first().unwrap().lsn;
        assert!(first.0 > boundary);
        let expected: Vec<Lsn> = records
            .iter()
            .map(|r| r.lsn)
            .filter(|l| *l >= first)
            .collect();
        assert_eq!(seen.iter().map(|r| r.lsn).collect::<Vec<_>>(), expected);
        assert!(
            records
                .iter()
                .filter(|r| r.lsn.0 > boundary && r.lsn < first)
                .count()
                == 0
        );
        assert_eq!(verifier.verified_up_to(), wal.position());
    }
}

#[test]
fn data_may_end_anywhere() {
    let wal = mixed_stream(MIB, Lsn(MIB));
    let bytes = wal.bytes();
    let mut verifier = WalVerifier::new(Lsn(MIB), config(MIB));
    let mut last_verified = Lsn(MIB);
    for (i, piece) in bytes.chunks(3001).enumerate() {
        verifier.feed(Lsn(MIB + (i * 3001) as u64), piece).unwrap();
        assert!(verifier.verified_up_to() >= last_verified);
        assert!(verifier.verified_up_to() <= verifier.position());
        last_verified = verifier.verified_up_to();
    }
    assert_eq!(last_verified, wal.position());
}

#[test]
fn wrong_magic_timeline_system_segment_size_and_block_size() {
    let wal = mixed_stream(MIB, Lsn(MIB));
    let check = |cfg: VerifierConfig,
                 mutate: &dyn Fn(&mut [u8]),
                 lsn: u64,
                 expected: WalVerifyErrorKind| {
        let mut bytes = wal.bytes().to_vec();
        mutate(&mut bytes);
        let (_, result, _) = run(Lsn(MIB), cfg, &bytes, 65536);
        let err = result.unwrap_err();
        assert_eq!((err.lsn, &err.kind), (Lsn(lsn), &expected), "{err}");
        assert!(!err.to_string().is_empty());
    };
    let mut other_version = config(MIB);
    other_version.server_major = Some(15);
    check(
        other_version,
        &|_| {},
        MIB,
        WalVerifyErrorKind::BadPageMagic {
            found: 0xD113,
            expected: 0xD110,
        },
    );
    let page3 = 3 * WAL_PAGE_SIZE as usize;
    check(
        config(MIB),
        &|b| b[page3] ^= 0x01,
        MIB + page3 as u64,
        WalVerifyErrorKind::BadPageMagic {
            found: 0xD112,
            expected: 0xD113,
        },
    );
    check(
        config(MIB),
        &|b| b[page3 + 2] |= 0x20,
        MIB + page3 as u64,
        WalVerifyErrorKind::BadPageInfo {
            info: 0x24 | (read_u16(b_page(&wal, page3), 2) & 1),
        },
    );
    check(
        config(MIB),
        &|b| b[page3 + 4] = 2,
        MIB + page3 as u64,
        WalVerifyErrorKind::WrongTimeline {
            found: 2,
            expected: 1,
        },
    );
    check(
        config(MIB),
        &|b| b[page3 + 9] ^= 0x40,
        MIB + page3 as u64,
        WalVerifyErrorKind::PageAddressMismatch {
            found: Lsn((MIB + page3 as u64) ^ 0x4000),
        },
    );
    let mut other_system = config(MIB);
    other_system.system_id = Some(SystemId(42));
    check(
        other_system,
        &|_| {},
        MIB,
        WalVerifyErrorKind::BadLongHeader {
            field: LongHeaderField::SystemId,
            found: 7_000_000_000_000_000_001,
            expected: 42,
        },
    );
    let at_2mib = mixed_stream(MIB, Lsn(2 * MIB));
    let (_, result, _) = run(Lsn(2 * MIB), config(2 * MIB), at_2mib.bytes(), 65536);
    assert_eq!(
        result.unwrap_err().kind,
        WalVerifyErrorKind::BadLongHeader {
            field: LongHeaderField::SegmentSize,
            found: MIB,
            expected: 2 * MIB
        }
    );
    // Misconfigured the other way, the next segment start shows a long header mid-segment.
    let (_, result, _) = run(Lsn(2 * MIB), config(4 * MIB), at_2mib.bytes(), 65536);
    assert_eq!(
        result.unwrap_err(),
        WalVerifyError {
            lsn: Lsn(2 * MIB),
            kind: WalVerifyErrorKind::UnexpectedLongHeader { info: 6 }
        }
    );
    check(
        config(MIB),
        &|b| b[37] = 0x40,
        MIB,
        WalVerifyErrorKind::BadLongHeader {
            field: LongHeaderField::BlockSize,
            found: 16384,
            expected: 8192,
        },
    );
    check(
        config(MIB),
        &|b| b[2] &= !0x02,
        MIB,
        WalVerifyErrorKind::MissingLongHeader { info: 0x04 },
    );
    check(
        config(MIB),
        &|b| b[..4].copy_from_slice(&[0; 4]),
        MIB,
        WalVerifyErrorKind::BadPageMagic {
            found: 0,
            expected: 0xD113,
        },
    );
    let mut unsupported = config(MIB);
    unsupported.server_major = Some(12);
    check(
        unsupported,
        &|_| {},
        MIB,
        WalVerifyErrorKind::UnsupportedServerVersion { major: 12 },
    );
}

fn b_page(wal: &WalBuilder, at: usize) -> &[u8] {
    &wal.bytes()[at..at + 24]
}

#[test]
fn the_version_can_be_learnt() {
    let wal = mixed_stream(MIB, Lsn(MIB));
    let mut cfg = config(MIB);
    cfg.server_major = None;
    let (verifier, _) = verify_all(&wal, cfg.clone());
    assert_eq!(verifier.server_major(), Some(16));
    let mut bytes = wal.bytes().to_vec();
    bytes[0] = 0x99;
    let (_, result, _) = run(Lsn(MIB), cfg, &bytes, 1000);
    assert_eq!(
        result.unwrap_err().kind,
        WalVerifyErrorKind::UnknownMagic { found: 0xD199 }
    );
}

#[test]
fn a_missing_page_is_a_page_address_mismatch() {
    let wal = mixed_stream(MIB, Lsn(MIB));
    let page = WAL_PAGE_SIZE as usize;
    let mut bytes = wal.bytes()[..4 * page].to_vec();
    bytes.extend_from_slice(&wal.bytes()[5 * page..]);
    let (verifier, result, _) = run(Lsn(MIB), config(MIB), &bytes, 100_000);
    let err = result.unwrap_err();
    assert_eq!(err.lsn, Lsn(MIB + 4 * page as u64));
    assert_eq!(
        err.kind,
        WalVerifyErrorKind::PageAddressMismatch {
            found: Lsn(MIB + 5 * page as u64)
        }
    );
    assert!(verifier.verified_up_to() <= err.lsn);
}

#[test]
fn continuation_flags_must_match() {
    let mut wal = WalBuilder::new(Lsn(MIB), opts(MIB));
    let first = wal.filler(100);
    let big = wal.filler(20_000);
    wal.filler(100);
    let page1 = WAL_PAGE_SIZE as usize;
    // Clear the continuation flag of the page the big record continues onto.
    let mut bytes = wal.bytes().to_vec();
    bytes[page1 + 2] &= !(XLP_FIRST_IS_CONTRECORD as u8);
    let (_, result, _) = run(Lsn(MIB), config(MIB), &bytes, 4096);
    let err = result.unwrap_err();
    assert_eq!(err.lsn, Lsn(MIB + page1 as u64));
    assert!(
        matches!(err.kind, WalVerifyErrorKind::BadContinuation { record: Some(r), contrecord_flag: false, .. } if r == big),
        "{err}"
    );
    // A wrong remaining length.
    let mut bytes = wal.bytes().to_vec();
    bytes[page1 + 16] ^= 0x08;
    let (_, result, _) = run(Lsn(MIB), config(MIB), &bytes, 4096);
    assert!(matches!(
        result.unwrap_err().kind,
        WalVerifyErrorKind::BadContinuation {
            contrecord_flag: true,
            ..
        }
    ));
    // A continuation flag where no record continues.
    let mut wal = WalBuilder::new(Lsn(MIB), opts(MIB));
    wal.filler(WAL_PAGE_SIZE as u32 - 40); // ends exactly at the page end
    wal.filler(100);
    let mut bytes = wal.bytes().to_vec();
    assert_eq!(bytes[page1 + 2] & 1, 0);
    bytes[page1 + 2] |= 1;
    let (_, result, _) = run(Lsn(MIB), config(MIB), &bytes, 4096);
    assert!(matches!(
        result.unwrap_err().kind,
        WalVerifyErrorKind::BadContinuation {
            record: None,
            expected_remaining: Some(0),
            ..
        }
    ));
    let _ = first;
}

#[test]
fn zero_length_and_huge_length_records() {
    let mut wal = WalBuilder::new(Lsn(MIB), opts(MIB));
    let a = wal.filler(100);
    let b = wal.filler(100);
    wal.zeros_until(Lsn(MIB + 3 * WAL_PAGE_SIZE));
    let (verifier, result, _) = run(Lsn(MIB), config(MIB), wal.bytes(), 1000);
    let err = result.unwrap_err();
    let after_b = Lsn((b.0 + 100).next_multiple_of(8));
    assert_eq!(err.lsn, after_b);
    assert!(matches!(
        err.kind,
        WalVerifyErrorKind::InvalidRecordLength { tot_len: 0, .. }
    ));
    assert!(err.to_string().contains("zero-filled"), "{err}");
    assert_eq!(verifier.verified_up_to(), after_b);

    // A bogus 1 GB length is refused at once; one within the limit is waited for
    // (without allocating: the verifier holds no buffer) and refused at the next page.
    let mut bytes = wal.bytes()[..(after_b.0 - MIB) as usize].to_vec();
    let huge = (1u32 << 30).to_le_bytes();
    bytes[(b.0 - MIB) as usize..][..4].copy_from_slice(&huge);
    let (_, result, _) = run(Lsn(MIB), config(MIB), &bytes, 1000);
    let err = result.unwrap_err();
    assert_eq!(err.lsn, b);
    assert!(matches!(
        err.kind,
        WalVerifyErrorKind::InvalidRecordLength {
            tot_len: 0x4000_0000,
            ..
        }
    ));
    let mut bytes = wal.bytes().to_vec();
    bytes[(b.0 - MIB) as usize..][..4].copy_from_slice(&(1000u32 << 20).to_le_bytes());
    let (verifier, result, _) = run(Lsn(MIB), config(MIB), &bytes, 1000);
    assert!(
        matches!(result.unwrap_err().kind, WalVerifyErrorKind::BadContinuation { record: Some(r), .. } if r == b)
    );
    assert_eq!(verifier.verified_up_to(), b);
    let _ = a;
}

#[test]
fn prev_link_is_checked() {
    let mut wal = WalBuilder::new(Lsn(MIB), opts(MIB));
    let a = wal.filler(100);
    let b = wal.filler(100);
    wal.filler(100);
    let mut bytes = wal.bytes().to_vec();
    let at = (b.0 - MIB) as usize + 8;
    bytes[at] ^= 0x08;
    let (_, result, _) = run(Lsn(MIB), config(MIB), &bytes, 7);
    let err = result.unwrap_err();
    assert_eq!(err.lsn, b);
    assert_eq!(
        err.kind,
        WalVerifyErrorKind::PrevLinkMismatch {
            found: Lsn(a.0 ^ 0x08),
            expected: a
        }
    );
}

#[test]
fn errors_are_sticky_and_discontinuity_is_refused() {
    let wal = mixed_stream(MIB, Lsn(MIB));
    let mut verifier = WalVerifier::new(Lsn(MIB), config(MIB));
    let err = verifier.feed(Lsn(MIB + 8), wal.bytes()).unwrap_err();
    assert_eq!(
        err.kind,
        WalVerifyErrorKind::Discontinuity { expected: Lsn(MIB) }
    );
    assert_eq!(verifier.feed(Lsn(MIB), wal.bytes()), Err(err.clone()));
    assert_eq!(verifier.error(), Some(&err));

    let mut bytes = wal.bytes().to_vec();
    bytes[500] ^= 1;
    let mut verifier = WalVerifier::new(Lsn(MIB), config(MIB));
    let first = verifier.feed(Lsn(MIB), &bytes[..1000]).unwrap_err();
    let pos = verifier.position();
    assert_eq!(verifier.feed(pos, &bytes[1000..]), Err(first));
}

#[test]
fn without_record_verification_only_positions_are_checked() {
    let mut cfg = config(MIB);
    cfg.verify_records = false;
    let mut verifier = WalVerifier::new(Lsn(MIB), cfg);
    verifier.feed(Lsn(MIB), &[0xAB; 10_000]).unwrap();
    assert_eq!(verifier.verified_up_to(), Lsn(MIB + 10_000));
    assert_eq!(verifier.position(), Lsn(MIB + 10_000));
    assert!(verifier.feed(Lsn(MIB), &[0; 10]).is_err());
}

#[test]
fn overwritten_contrecord_abandons_the_partial_record() {
    let mut wal = WalBuilder::new(Lsn(MIB), opts(MIB));
    let a = wal.filler(100);
    let aborted = wal.aborted_record(30_000);
    let b = wal.filler(100);
    wal.filler(9000);
    let (verifier, records) = verify_all(&wal, config(MIB));
    assert_eq!(verifier.records_abandoned(), 1);
    let lsns: Vec<Lsn> = records.iter().map(|r| r.lsn).collect();
    assert_eq!(lsns[..2], [a, b]);
    assert!(!lsns.contains(&aborted));
    assert_eq!(b, Lsn(MIB + WAL_PAGE_SIZE + 24));
    assert_eq!(records[1].prev, a);
    assert_eq!(verifier.verified_up_to(), wal.position());
    // One byte at a time as well.
    let (v, result, _) = run(wal.start(), config(MIB), wal.bytes(), 1);
    result.unwrap();
    assert_eq!(v.records_abandoned(), 1);
}

#[test]
fn timelines_may_rise_but_never_fall_or_exceed_the_configured_one() {
    let mut wal = WalBuilder::new(Lsn(MIB), opts(MIB));
    wal.filler(20_000);
    wal.set_timeline(2);
    wal.filler(20_000);
    wal.filler(100);
    let mut cfg = config(MIB);
    cfg.timeline = TimelineId(2);
    verify_all(&wal, cfg.clone());
    let (_, result, _) = run(Lsn(MIB), config(MIB), wal.bytes(), 50_000);
    assert!(matches!(
        result.unwrap_err().kind,
        WalVerifyErrorKind::WrongTimeline {
            found: 2,
            expected: 1
        }
    ));
    wal.set_timeline(1);
    wal.filler(20_000);
    let (_, result, _) = run(Lsn(MIB), cfg, wal.bytes(), 50_000);
    assert!(matches!(
        result.unwrap_err().kind,
        WalVerifyErrorKind::TimelineWentBackwards {
            found: 1,
            previous: 2
        }
    ));
}

#[test]
fn switch_timeline_restarts_at_a_segment_start() {
    // Timeline 1 up to a switch point in segment 2, then timeline 2's copy of segment 2
    // (old pages keep TLI 1) continuing with new records.
    let mut tl1 = WalBuilder::new(Lsn(MIB), opts(MIB));
    tl1.filler(900_000);
    let switch_point = tl1.filler(300_000);
    let mut tl2 = tl1.clone();
    tl1.filler(5_000);
    tl2.set_timeline(2);
    tl2.filler(70_000);
    let mut verifier = WalVerifier::new(Lsn(MIB), config(MIB));
    verifier.feed(Lsn(MIB), tl1.bytes()).unwrap();
    verifier.switch_timeline(TimelineId(2), Lsn(2 * MIB));
    assert_eq!(verifier.position(), Lsn(2 * MIB));
    verifier
        .feed(Lsn(2 * MIB), tl2.bytes_from(Lsn(2 * MIB)))
        .unwrap();
    assert_eq!(verifier.verified_up_to(), tl2.position());
    assert_eq!(verifier.config().timeline, TimelineId(2));
    assert!(switch_point.0 < 2 * MIB); // so timeline 2's segment starts with its tail
}

#[test]
fn display_says_what_and_what_to_do() {
    let err = WalVerifyError {
        lsn: Lsn(0x1_0000_0028),
        kind: WalVerifyErrorKind::RecordCrcMismatch {
            expected: 1,
            computed: 2,
            record_len: 50,
        },
    };
    let text = err.to_string();
    assert!(
        text.starts_with("invalid WAL at 1/28: CRC32C mismatch"),
        "{text}"
    );
    assert!(
        text.contains("restart streaming from the segment start"),
        "{text}"
    );
    assert!(err.kind.is_corruption());
}

fn segment_stream() -> &'static WalBuilder {
    static WAL: std::sync::OnceLock<WalBuilder> = std::sync::OnceLock::new();
    WAL.get_or_init(|| {
        let mut wal = WalBuilder::new(Lsn(MIB), opts(MIB));
        // Records fill most of the segment, so that most flips hit them.
        let mut i = 0u32;
        while wal.position().0 < 2 * MIB - 40_000 {
            wal.filler(if i % 9 == 8 {
                8300
            } else {
                24 + (i * 131) % 700
            });
            i += 1;
        }
        wal.switch();
        wal.filler(40);
        wal.filler(17_000);
        wal.filler(24);
        wal.filler(60);
        wal
    })
}

/// What owns the byte at stream offset `at`.
#[derive(Debug, PartialEq)]
enum Owner {
    PageHeader(Lsn),
    Record(Lsn),
    Unread,
}

fn owner(wal: &WalBuilder, at: usize) -> Owner {
    let lsn = wal.start().0 + at as u64;
    let page = lsn - lsn % WAL_PAGE_SIZE;
    let header_len = if page % MIB == 0 { 40 } else { 24 };
    let records = wal.records();
    // Inside a record's extent (which skips page headers)?
    let mut record_owner = None;
    for r in records {
        if r.lsn.0 > lsn {
            break;
        }
        // Extent in stream bytes: count page headers crossed.
        let mut pos = r.lsn.0;
        let mut left = u64::from(r.tot_len);
        while left > 0 {
            if pos % WAL_PAGE_SIZE == 0 {
                pos += if pos % MIB == 0 { 40 } else { 24 };
            }
            let take = (WAL_PAGE_SIZE - pos % WAL_PAGE_SIZE).min(left);
            if lsn >= pos && lsn < pos + take {
                record_owner = Some(r.lsn);
            }
            pos += take;
            left -= take;
        }
    }
    let in_header = lsn - page;
    if in_header < header_len {
        // Unread by PostgreSQL too: the header's padding (20..24) and the
        // informational XLP_BKP_REMOVABLE bit (handled by the caller).
        if (20..24).contains(&in_header) {
            return Owner::Unread;
        }
        return Owner::PageHeader(Lsn(page));
    }
    record_owner.map_or(Owner::Unread, Owner::Record)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn any_chunking_verifies_identically(cuts in proptest::collection::vec(0usize..usize::MAX, 0..40)) {
        let wal = segment_stream();
        let bytes = wal.bytes();
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % bytes.len()).collect();
        cuts.push(0);
        cuts.push(bytes.len());
        cuts.sort_unstable();
        let mut verifier = WalVerifier::new(wal.start(), config(MIB));
        let mut seen = Vec::new();
        for pair in cuts.windows(2) {
            let (from, to) = (pair[0], pair[1]);
            verifier.feed_with(Lsn(wal.start().0 + from as u64), &bytes[from..to], |r| seen.push(r.lsn)).unwrap();
        }
        prop_assert_eq!(verifier.verified_up_to(), wal.position());
        prop_assert_eq!(seen.len(), wal.records().len());
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        start in prop_oneof![0u64..(1 << 40), (u64::MAX - (1 << 20))..=u64::MAX],
        garbage in proptest::collection::vec(any::<u8>(), 0..20_000),
        splice_at in 0usize..usize::MAX,
        chunk in 1usize..5000,
        learn in any::<bool>(),
    ) {
        // Pure garbage, and a valid stream with garbage spliced in.
        let mut cfg = config(MIB);
        if learn {
            cfg.server_major = None;
        }
        let _ = run(Lsn(start), cfg.clone(), &garbage, chunk);
        let wal = segment_stream();
        let mut bytes = wal.bytes()[..200_000].to_vec();
        let at = splice_at % bytes.len();
        let end = (at + garbage.len()).min(bytes.len());
        bytes[at..end].copy_from_slice(&garbage[..end - at]);
        let (verifier, _, _) = run(wal.start(), cfg, &bytes, chunk);
        prop_assert!(verifier.verified_up_to() <= verifier.position());
    }

    #[test]
    fn any_byte_flip_is_detected_at_the_right_place(index in 0usize..usize::MAX, bit in 0u8..8, chunk in 1usize..20_000) {
        let wal = segment_stream();
        if let Err(message) = check_flip(wal, index % wal.bytes().len(), bit, chunk) {
            prop_assert!(false, "{}", message);
        }
    }
}

/// Flips one bit at stream offset `at` and checks that the error names the right place.
fn check_flip(wal: &WalBuilder, at: usize, bit: u8, chunk: usize) -> Result<(), String> {
    let mut bytes = wal.bytes().to_vec();
    let lsn = wal.start().0 + at as u64;
    // XLP_BKP_REMOVABLE is informational: nobody checks it.
    let bit = if lsn % WAL_PAGE_SIZE == 2 && bit == 2 {
        0
    } else {
        bit
    };
    bytes[at] ^= 1 << bit;
    let (verifier, result, _) = run(wal.start(), config(MIB), &bytes, chunk);
    let page = Lsn(lsn - lsn % WAL_PAGE_SIZE);
    match (owner(wal, at), result) {
        (Owner::PageHeader(page), Ok(())) => {
            Err(format!("flip in the page header at {page} not detected"))
        }
        (Owner::PageHeader(page), Err(err)) if err.lsn != page => {
            Err(format!("{err} for a flip in the page header at {page}"))
        }
        (Owner::Record(record), Err(err)) => {
            let names_record = err.lsn == record
                || matches!(err.kind, WalVerifyErrorKind::BadContinuation { record: Some(r), .. } if r == record);
            if names_record {
                Ok(())
            } else {
                Err(format!("{err} for a flip in the record at {record}"))
            }
        }
        // A longer xl_tot_len can make the record run past the data: it is then never
        // reported as verified.
        (Owner::Record(record), Ok(())) if verifier.verified_up_to() > record => {
            Err(format!("flip in the record at {record} not detected"))
        }
        // Alignment padding (PostgreSQL does not read it) or switch padding.
        (Owner::Unread, Err(err))
            if !matches!(err.kind, WalVerifyErrorKind::BadSwitchPadding { .. })
                && err.lsn != page =>
        {
            Err(format!("{err} for a flip in unread bytes at {}", Lsn(lsn)))
        }
        _ => Ok(()),
    }
}

#[test]
fn byte_flips_across_the_first_pages_are_detected_at_the_right_place() {
    let wal = segment_stream();
    let mut failures = Vec::new();
    for at in (0..6 * WAL_PAGE_SIZE as usize).step_by(11) {
        if let Err(message) = check_flip(wal, at, (at % 8) as u8, 65536) {
            failures.push(message);
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}

#[test]
fn the_verifier_holds_no_buffers() {
    // Everything it keeps is inline: a record's claimed length never makes it allocate.
    assert!(
        std::mem::size_of::<WalVerifier>() < 512,
        "{}",
        std::mem::size_of::<WalVerifier>()
    );
}
