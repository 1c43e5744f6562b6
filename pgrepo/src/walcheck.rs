//! Checks the WAL a backup carries in its base archive (`pg_wal/`), record by record,
//! as the archive streams past (pure: fed tar events, no I/O).
//!
//! The manifest's `WAL-Ranges` say which WAL the backup needs. Each segment file of
//! `pg_wal/` is fed to a [`WalVerifier`] for the range it belongs to, from the range's
//! start to its end: every record there must pass its CRC, and the bytes up to the end
//! must all be present. Bytes after the end (the rest of the last segment) may be
//! anything, as in a recycled segment, and are not read.

use std::collections::BTreeMap;

use basebackup::manifest::WalRange;
use basebackup::TarEvent;
use pgwire_repl::types::{parse_wal_file_name, WalSegmentSize};
use pgwire_repl::{Lsn, SystemId, TimelineId};
use walstream::decode::{VerifierConfig, WalVerifier};

use crate::error::{Error, Result};

/// One WAL segment file of the archive.
#[derive(Debug)]
struct Segment {
    name: String,
    timeline: TimelineId,
    number: u64,
    size: u64,
    received: u64,
}

/// Collects and verifies the WAL segments of a base archive. Segments are verified as
/// they stream when they arrive in order (the server sends them sorted).
#[derive(Debug, Default)]
pub struct WalCheck {
    server_major: Option<u32>,
    system_id: Option<u64>,
    /// The segments seen, by (timeline, number): their size.
    seen: BTreeMap<(u32, u64), u64>,
    current: Option<Segment>,
    /// Record verification per timeline, started at the first segment of that timeline.
    verifiers: BTreeMap<u32, WalVerifier>,
    /// The first verification failure per timeline: where, in which file, and why. One
    /// at or after the end of the needed WAL is harmless (the rest of the last segment).
    failures: BTreeMap<u32, (Lsn, String, String)>,
}

impl WalCheck {
    /// A checker for a backup of a `server_major` server of cluster `system_id`.
    pub fn new(server_major: u32, system_id: Option<u64>) -> WalCheck {
        WalCheck {
            server_major: Some(server_major),
            system_id,
            ..WalCheck::default()
        }
    }

    /// Feeds a tar event of the base archive.
    pub fn event(&mut self, event: &TarEvent) {
        match event {
            TarEvent::File { path, size, .. } => {
                self.current = None;
                let Some(name) = path.strip_prefix(b"pg_wal/") else {
                    return;
                };
                let Ok(name) = std::str::from_utf8(name) else {
                    return;
                };
                // The size of a WAL segment file is the segment size; a file of another
                // size with a segment's name is refused at the end (not enough WAL).
                let Ok(segment_size) = WalSegmentSize::new(*size) else {
                    return;
                };
                let Some((timeline, number)) = parse_wal_file_name(name, segment_size) else {
                    return;
                };
                self.current = Some(Segment {
                    name: name.to_string(),
                    timeline,
                    number,
                    size: *size,
                    received: 0,
                });
            }
            TarEvent::Data(data) => {
                let Some(segment) = self.current.as_mut() else {
                    return;
                };
                let lsn = Lsn(segment
                    .number
                    .saturating_mul(segment.size)
                    .saturating_add(segment.received));
                segment.received += data.len() as u64;
                let verifier = self.verifiers.entry(segment.timeline.0).or_insert_with(|| {
                    WalVerifier::new(
                        lsn,
                        VerifierConfig {
                            segment_size: WalSegmentSize::new(segment.size)
                                .unwrap_or(WalSegmentSize::DEFAULT),
                            server_major: self.server_major,
                            system_id: self.system_id.map(SystemId),
                            timeline: segment.timeline,
                            verify_records: true,
                        },
                    )
                });
                if verifier.position() != lsn {
                    // Not contiguous with what was verified on this timeline: the range
                    // check at the end reports the gap.
                    return;
                }
                if let Err(e) = verifier.feed(lsn, data) {
                    self.failures
                        .entry(segment.timeline.0)
                        .or_insert_with(|| (e.lsn, segment.name.clone(), e.to_string()));
                }
            }
            TarEvent::FileEnd => {
                if let Some(segment) = self.current.take() {
                    self.seen
                        .insert((segment.timeline.0, segment.number), segment.received);
                }
            }
            _ => {}
        }
    }

    /// Records verified so far.
    pub fn records_verified(&self) -> u64 {
        self.verifiers.values().map(|v| v.records_verified()).sum()
    }

    /// Segment files seen.
    pub fn segments(&self) -> u64 {
        self.seen.len() as u64
    }

    /// Checks that the WAL of every range is present, complete and verified.
    pub fn finish(&self, ranges: &[WalRange]) -> Result<()> {
        for range in ranges {
            let needed = format!(
                "WAL of timeline {} from {} to {}",
                range.timeline, range.start, range.end
            );
            let verifier = self.verifiers.get(&range.timeline.0).ok_or_else(|| {
                Error::verify(
                    "pg_wal",
                    format!("the backup carries none of the {needed} it needs"),
                )
            })?;
            let segment_size = verifier.config().segment_size;
            let first = range.start.segment_number(segment_size);
            let last =
                Lsn(range.end.0.saturating_sub(1).max(range.start.0)).segment_number(segment_size);
            for number in first..=last {
                let name = pgwire_repl::types::wal_file_name(range.timeline, number, segment_size);
                match self.seen.get(&(range.timeline.0, number)) {
                    Some(&size) if size == segment_size.bytes() => {}
                    Some(&size) => {
                        return Err(Error::verify(
                            format!("pg_wal/{name}"),
                            format!("has {size} bytes, expected {}", segment_size.bytes()),
                        ))
                    }
                    None => {
                        return Err(Error::verify(
                            format!("pg_wal/{name}"),
                            format!("missing: it holds part of the {needed}"),
                        ))
                    }
                }
            }
            if let Some((lsn, name, why)) = self.failures.get(&range.timeline.0) {
                if *lsn < range.end {
                    return Err(Error::verify(
                        format!("pg_wal/{name}"),
                        format!("WAL needed up to {} does not verify: {why}", range.end),
                    ));
                }
            } else if verifier.position() < range.end {
                return Err(Error::verify(
                    "pg_wal",
                    format!(
                        "the {needed} was verified only up to {}",
                        verifier.position()
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use basebackup::Bytes;
    use walstream::decode::synth::{SynthOptions, WalBuilder};

    const SEGMENT: u64 = 1 << 20;
    const SYSTEM: u64 = 7_000_000_000_000_000_001;

    /// Two 1 MiB segments of records from 0/1000000; returns them and the LSN a record
    /// boundary lands on in the second one.
    fn wal() -> (Vec<u8>, Lsn) {
        let size = WalSegmentSize::new(SEGMENT).unwrap();
        let mut builder = WalBuilder::new(Lsn(SEGMENT), SynthOptions::new(size, 16));
        let mut end = Lsn(0);
        while builder.position().0 < 3 * SEGMENT - 4096 {
            end = builder.record(0, 0, &[7u8; 300]);
        }
        builder.zeros_until(Lsn(3 * SEGMENT));
        (builder.into_bytes(), end)
    }

    fn feed(check: &mut WalCheck, name: &str, data: &[u8]) {
        check.event(&TarEvent::File {
            path: format!("pg_wal/{name}").into_bytes(),
            mode: 0o600,
            size: data.len() as u64,
        });
        for piece in data.chunks(100_000) {
            check.event(&TarEvent::Data(Bytes::copy_from_slice(piece)));
        }
        check.event(&TarEvent::FileEnd);
    }

    fn range(end: Lsn) -> Vec<WalRange> {
        vec![WalRange {
            timeline: TimelineId(1),
            start: Lsn(SEGMENT + 40),
            end,
        }]
    }

    const FIRST: &str = "000000010000000000000001";
    const SECOND: &str = "000000010000000000000002";

    #[test]
    fn complete_wal_passes_and_damage_before_the_end_fails() {
        let (bytes, end) = wal();
        let (one, two) = bytes.split_at(SEGMENT as usize);
        let mut check = WalCheck::new(16, Some(SYSTEM));
        feed(&mut check, FIRST, one);
        feed(&mut check, SECOND, two);
        check.finish(&range(end)).unwrap();
        assert!(check.records_verified() > 1000);
        assert_eq!(check.segments(), 2);

        // A flipped byte inside a record before the end.
        let mut damaged = two.to_vec();
        damaged[5000] ^= 0xff;
        let mut check = WalCheck::new(16, Some(SYSTEM));
        feed(&mut check, FIRST, one);
        feed(&mut check, SECOND, &damaged);
        let err = check.finish(&range(end)).unwrap_err();
        assert!(err.message().contains(SECOND), "{err}");

        // Damage after the end (the rest of a recycled segment) is not read.
        let mut after = two.to_vec();
        let beyond = (end.0 + 2000 - 2 * SEGMENT) as usize;
        after[beyond] ^= 0xff;
        let mut check = WalCheck::new(16, Some(SYSTEM));
        feed(&mut check, FIRST, one);
        feed(&mut check, SECOND, &after);
        check.finish(&range(Lsn(end.0 - 400))).unwrap();
    }

    #[test]
    fn missing_and_short_segments_are_named() {
        let (bytes, end) = wal();
        let (one, two) = bytes.split_at(SEGMENT as usize);
        let mut check = WalCheck::new(16, Some(SYSTEM));
        feed(&mut check, FIRST, one);
        let err = check.finish(&range(end)).unwrap_err();
        assert!(err.message().contains(SECOND), "{err}");

        let mut check = WalCheck::new(16, Some(SYSTEM));
        feed(&mut check, SECOND, two);
        let err = check.finish(&range(end)).unwrap_err();
        assert!(err.message().contains(FIRST), "{err}");

        let mut check = WalCheck::new(16, Some(SYSTEM));
        let err = check.finish(&range(end)).unwrap_err();
        assert!(err.message().contains("carries none"), "{err}");
        // A file with a segment's name but not a segment's size is not WAL.
        feed(&mut check, FIRST, &one[..1000]);
        assert_eq!(check.segments(), 0);
    }
}
