//! WAL verification throughput: a synthetic 64 MiB stream fed in 128 KiB pieces (the
//! size of the server's XLogData messages), against the raw CRC32C rate over the
//! same bytes.
//!
//! `cargo bench -p walstream --bench verify -- --warm-up-time 1 --measurement-time 3`
#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pgwire_repl::{Lsn, SystemId, TimelineId, WalSegmentSize};
use walstream::decode::synth::{SynthOptions, WalBuilder};
use walstream::decode::{VerifierConfig, WalVerifier};

const STREAM_BYTES: u64 = 64 << 20;
const CHUNK: usize = 128 * 1024;
const START: Lsn = Lsn(0x1_0000_0000);

/// Mostly ~100-byte records (heap inserts, commits) with an 8 KiB full-page image
/// every 16th record, as after a checkpoint; or small records only.
fn stream(with_fpis: bool) -> Vec<u8> {
    let opts = SynthOptions::new(WalSegmentSize::DEFAULT, 16);
    let mut wal = WalBuilder::new(START, opts);
    let mut i: u32 = 0;
    while wal.position().0 - START.0 < STREAM_BYTES {
        let len = if with_fpis && i % 16 == 15 {
            8192 + 64
        } else {
            54 + (i * 37) % 100
        };
        wal.filler(len);
        i += 1;
    }
    let mut bytes = wal.into_bytes();
    bytes.truncate(STREAM_BYTES as usize);
    bytes
}

fn config(verify_records: bool) -> VerifierConfig {
    VerifierConfig {
        segment_size: WalSegmentSize::DEFAULT,
        server_major: Some(16),
        system_id: Some(SystemId(7_000_000_000_000_000_001)),
        timeline: TimelineId(1),
        verify_records,
    }
}

fn verify(bytes: &[u8], verify_records: bool) -> Lsn {
    let mut verifier = WalVerifier::new(START, config(verify_records));
    let mut lsn = START;
    for chunk in bytes.chunks(CHUNK) {
        if let Err(err) = verifier.feed(lsn, black_box(chunk)) {
            panic!("{err}");
        }
        lsn = Lsn(lsn.0 + chunk.len() as u64);
    }
    verifier.verified_up_to()
}

fn benches(c: &mut Criterion) {
    let mixed = stream(true);
    let small = stream(false);
    let mut group = c.benchmark_group("wal");
    group.throughput(Throughput::Bytes(STREAM_BYTES));
    group.sample_size(20);
    group.bench_function("verify_mixed_128k", |b| b.iter(|| verify(&mixed, true)));
    group.bench_function("verify_small_records_128k", |b| {
        b.iter(|| verify(&small, true))
    });
    group.bench_function("positions_only_128k", |b| b.iter(|| verify(&mixed, false)));
    group.bench_function("crc32c_raw_whole", |b| {
        b.iter(|| crc32c::crc32c(black_box(&mixed)))
    });
    group.bench_function("crc32c_raw_128k", |b| {
        b.iter(|| {
            mixed.chunks(CHUNK).fold(0u32, |crc, chunk| {
                crc32c::crc32c_append(crc, black_box(chunk))
            })
        })
    });
    group.finish();
}

criterion_group!(verify_benches, benches);
criterion_main!(verify_benches);
