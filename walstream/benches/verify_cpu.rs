#![allow(missing_docs)]
//! WAL verification throughput per CPU-second, for machines too busy for wall-clock
//! numbers: `cargo bench -p walstream --bench verify_cpu`.
//!
//! Thread CPU time comes from /proc/thread-self/schedstat (Linux).

use pgwire_repl::{Lsn, TimelineId, WalSegmentSize};
use walstream::decode::synth::{SynthOptions, WalBuilder};
use walstream::decode::{VerifierConfig, WalVerifier};

fn thread_cpu_ns() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

fn main() {
    for (name, fpi_every) in [
        ("mixed (8 KiB FPI every 16th record)", 16u32),
        ("~100-byte records only", 0),
    ] {
        let mut wal = WalBuilder::new(Lsn(1 << 32), SynthOptions::new(WalSegmentSize::DEFAULT, 16));
        let mut i = 0u32;
        while wal.bytes().len() < 64 << 20 {
            let fpi = fpi_every != 0 && i % fpi_every == fpi_every - 1;
            wal.filler(if fpi { 8192 + 64 } else { 54 + (i * 37) % 100 });
            i += 1;
        }
        let config = VerifierConfig {
            segment_size: WalSegmentSize::DEFAULT,
            server_major: Some(16),
            system_id: None,
            timeline: TimelineId(1),
            verify_records: true,
        };
        let bytes = wal.bytes();
        let rounds = 20;
        let (Some(cpu0), wall0) = (thread_cpu_ns(), std::time::Instant::now()) else {
            eprintln!("no per-thread CPU time on this system");
            return;
        };
        for _ in 0..rounds {
            let mut verifier = WalVerifier::new(wal.start(), config.clone());
            for (k, chunk) in bytes.chunks(128 * 1024).enumerate() {
                if let Err(e) = verifier.feed(Lsn(wal.start().0 + (k * 128 * 1024) as u64), chunk) {
                    panic!("synthetic WAL failed to verify: {e}");
                }
            }
            assert_eq!(verifier.verified_up_to(), wal.position());
        }
        let cpu = thread_cpu_ns().unwrap_or(cpu0) - cpu0;
        let wall = wall0.elapsed().as_nanos() as f64;
        let total = (bytes.len() * rounds) as f64;
        let crc0 = thread_cpu_ns().unwrap_or(0);
        let mut crc = 0;
        for _ in 0..rounds {
            crc = crc32c::crc32c_append(crc, std::hint::black_box(bytes));
        }
        let crc_cpu = thread_cpu_ns().unwrap_or(crc0) - crc0;
        println!(
            "{name}: verify {:.2} GB/s per CPU-second ({:.2} GB/s wall); raw crc32c {:.2} GB/s per CPU-second ({crc:08X})",
            total / cpu as f64,
            total / wall,
            total / crc_cpu as f64
        );
    }
}
