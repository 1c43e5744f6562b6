//! The WAL check of `pg_verifybackup`: every record from a WAL range's start to its end
//! is read from the segment files of the range's timeline and verified (page headers,
//! record headers, CRC-32C) by walstream's [`WalVerifier`], which is what the real tool
//! asks `pg_waldump` to do.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use pgwire_repl::types::wal_file_name;
use pgwire_repl::{Lsn, WalSegmentSize};
use walstream::decode::layout::WAL_PAGE_SIZE;
use walstream::{VerifierConfig, WalVerifier};

use super::manifest::Range;
use super::strerror;

/// Offset of `xlp_seg_size` in a segment's long page header.
const XLP_SEG_SIZE: usize = 32;

/// Checks one range; the error explains what failed (like `pg_waldump`'s message).
pub(crate) fn check_range(wal_dir: &Path, range: &Range) -> Result<(), String> {
    if range.end < range.start {
        return Err(format!(
            "end LSN {} is before start LSN {}",
            range.end, range.start
        ));
    }
    let seg_size = segment_size(wal_dir, range)?;
    // Start at the page holding the first record: the verifier skips the tail of a record
    // continued from the previous page and checks every record after it.
    let page_start = Lsn(range.start.0 - range.start.0 % WAL_PAGE_SIZE);
    let config = VerifierConfig {
        segment_size: seg_size,
        server_major: None,
        system_id: None,
        timeline: range.timeline,
        verify_records: true,
    };
    let mut verifier = WalVerifier::new(page_start, config);
    let first = page_start.segment_number(seg_size);
    let last = if range.end > range.start {
        Lsn(range.end.0 - 1).segment_number(seg_size)
    } else {
        first
    };
    let mut buf = vec![0u8; 1 << 20];
    for seg in first..=last {
        let name = wal_file_name(range.timeline, seg, seg_size);
        let path = wal_dir.join(&name);
        let mut file = File::open(&path).map_err(|e| {
            format!(
                "could not open file \"{}\": {}",
                path.display(),
                strerror(&e)
            )
        })?;
        let seg_start = seg * seg_size.bytes();
        let mut offset = 0u64;
        if seg == first {
            // Skip to the first page to verify.
            let skip = page_start.0 - seg_start;
            std::io::copy(&mut (&mut file).take(skip), &mut std::io::sink()).map_err(|e| {
                format!(
                    "could not read file \"{}\": {}",
                    path.display(),
                    strerror(&e)
                )
            })?;
            offset = skip;
        }
        while offset < seg_size.bytes() {
            let want = (seg_size.bytes() - offset).min(buf.len() as u64) as usize;
            let n = read_full(&mut file, &mut buf[..want]).map_err(|e| {
                format!(
                    "could not read file \"{}\": {}",
                    path.display(),
                    strerror(&e)
                )
            })?;
            if n == 0 {
                return Err(format!(
                    "could not read file \"{}\": it ends at offset {offset} of a {}-byte segment",
                    path.display(),
                    seg_size.bytes()
                ));
            }
            let lsn = Lsn(seg_start + offset);
            if let Err(e) = verifier.feed(lsn, &buf[..n]) {
                // Only records that begin before the end matter: what follows may be
                // left over from a recycled segment.
                if e.lsn < range.end {
                    return Err(format!("error in WAL record at {}: {e}", e.lsn));
                }
                return Ok(());
            }
            offset += n as u64;
            if verifier.verified_up_to() >= range.end {
                return Ok(());
            }
        }
    }
    if verifier.verified_up_to() >= range.end {
        Ok(())
    } else {
        Err(format!(
            "WAL ends before {}: verified up to {}",
            range.end,
            verifier.verified_up_to()
        ))
    }
}

fn read_full(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut have = 0;
    while have < buf.len() {
        match file.read(&mut buf[have..]) {
            Ok(0) => break,
            Ok(n) => have += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(have)
}

/// The segment size, from the long page header of the range's first segment (trying
/// the default size's file name first, then the others).
fn segment_size(wal_dir: &Path, range: &Range) -> Result<WalSegmentSize, String> {
    let mut tried = None;
    for shift in std::iter::once(24).chain((20..=30).filter(|&s| s != 24)) {
        let Ok(size) = WalSegmentSize::new(1u64 << shift) else {
            continue;
        };
        let name = wal_file_name(range.timeline, range.start.segment_number(size), size);
        let path = wal_dir.join(&name);
        let mut header = [0u8; 40];
        match File::open(&path).and_then(|mut f| f.read_exact(&mut header)) {
            Ok(()) => {
                let raw = u32::from_le_bytes([
                    header[XLP_SEG_SIZE],
                    header[XLP_SEG_SIZE + 1],
                    header[XLP_SEG_SIZE + 2],
                    header[XLP_SEG_SIZE + 3],
                ]);
                return match WalSegmentSize::new(u64::from(raw)) {
                    Ok(found) if found == size => Ok(found),
                    _ => Err(format!(
                        "WAL segment size in \"{}\" is invalid or does not match its name ({raw} bytes)",
                        path.display()
                    )),
                };
            }
            Err(e) => {
                if tried.is_none() {
                    tried = Some(format!(
                        "could not open file \"{}\": {}",
                        path.display(),
                        strerror(&e)
                    ));
                }
            }
        }
    }
    Err(tried.unwrap_or_else(|| "no WAL segment found".into()))
}
