//! LSN, timeline, system-identifier and WAL-segment-size types.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// A WAL location (log sequence number): a byte position in the WAL stream.
///
/// Displays as PostgreSQL does (`16/B374D848`, upper-case hex, no padding) and parses
/// any width of either half, so PostgreSQL 19's zero-padded form is accepted too.
///
/// ```
/// use pgwire_repl::Lsn;
/// let lsn: Lsn = "16/B374D848".parse().unwrap();
/// assert_eq!(lsn.0, 0x16_B374_D848);
/// assert_eq!(lsn.to_string(), "16/B374D848");
/// assert_eq!("0/0176A250".parse::<Lsn>().unwrap(), Lsn(0x176A250));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The invalid LSN `0/0`.
    pub const INVALID: Lsn = Lsn(0);

    /// True for `0/0`, which PostgreSQL uses for "unknown".
    pub fn is_invalid(self) -> bool {
        self.0 == 0
    }

    /// Adds a byte count, or `None` on overflow.
    pub fn checked_add(self, bytes: u64) -> Option<Lsn> {
        self.0.checked_add(bytes).map(Lsn)
    }

    /// Subtracts a byte count, or `None` below zero.
    pub fn checked_sub(self, bytes: u64) -> Option<Lsn> {
        self.0.checked_sub(bytes).map(Lsn)
    }

    /// The number of bytes from `earlier` to `self`, or `None` if `earlier` is later.
    pub fn bytes_since(self, earlier: Lsn) -> Option<u64> {
        self.0.checked_sub(earlier.0)
    }

    /// The segment number this LSN falls in.
    pub fn segment_number(self, segment_size: WalSegmentSize) -> u64 {
        self.0 / segment_size.bytes()
    }

    /// The offset of this LSN inside its segment.
    pub fn segment_offset(self, segment_size: WalSegmentSize) -> u64 {
        self.0 % segment_size.bytes()
    }

    /// The start of the segment this LSN falls in.
    pub fn segment_start(self, segment_size: WalSegmentSize) -> Lsn {
        Lsn(self.0 - self.segment_offset(segment_size))
    }

    /// The offset of this LSN inside its WAL page of `page_size` bytes (a power of two).
    pub fn page_offset(self, page_size: u64) -> u64 {
        self.0 & (page_size.wrapping_sub(1))
    }

    /// The WAL file name of the segment holding this LSN on `timeline`,
    /// e.g. `000000010000000000000001`.
    ///
    /// ```
    /// use pgwire_repl::{Lsn, TimelineId, WalSegmentSize};
    /// let name = Lsn(0x1_0300_0028).wal_file_name(TimelineId(2), WalSegmentSize::DEFAULT);
    /// assert_eq!(name, "000000020000000100000003");
    /// ```
    pub fn wal_file_name(self, timeline: TimelineId, segment_size: WalSegmentSize) -> String {
        wal_file_name(timeline, self.segment_number(segment_size), segment_size)
    }
}

/// The WAL file name for segment number `segment` on `timeline`.
pub fn wal_file_name(timeline: TimelineId, segment: u64, segment_size: WalSegmentSize) -> String {
    let per_id = segment_size.segments_per_xlog_id();
    format!(
        "{:08X}{:08X}{:08X}",
        timeline.0,
        segment / per_id,
        segment % per_id
    )
}

/// Parses a WAL file name (`TTTTTTTTXXXXXXXXYYYYYYYY`, optionally followed by
/// `.partial`) into its timeline and segment number.
///
/// ```
/// use pgwire_repl::types::parse_wal_file_name;
/// use pgwire_repl::{TimelineId, WalSegmentSize};
/// let (tli, seg) = parse_wal_file_name("000000020000000100000003", WalSegmentSize::DEFAULT).unwrap();
/// assert_eq!((tli, seg), (TimelineId(2), 0x103));
/// ```
pub fn parse_wal_file_name(name: &str, segment_size: WalSegmentSize) -> Option<(TimelineId, u64)> {
    let name = name.strip_suffix(".partial").unwrap_or(name);
    if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let timeline = u32::from_str_radix(&name[0..8], 16).ok()?;
    let log = u64::from_str_radix(&name[8..16], 16).ok()?;
    let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
    let per_id = segment_size.segments_per_xlog_id();
    if seg >= per_id || timeline == 0 {
        return None;
    }
    Some((
        TimelineId(timeline),
        log.checked_mul(per_id)?.checked_add(seg)?,
    ))
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = Error;

    fn from_str(s: &str) -> Result<Lsn, Error> {
        let invalid = || {
            Error::usage(
                format!("invalid LSN {s:?}"),
                "write an LSN as two hexadecimal numbers separated by a slash, e.g. 16/B374D848",
            )
        };
        let (high, low) = s.split_once('/').ok_or_else(invalid)?;
        let parse_half = |half: &str| {
            if half.is_empty() || half.len() > 8 || !half.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid());
            }
            u32::from_str_radix(half, 16).map_err(|_| invalid())
        };
        let (high, low) = (parse_half(high)?, parse_half(low)?);
        Ok(Lsn((u64::from(high) << 32) | u64::from(low)))
    }
}

impl From<u64> for Lsn {
    fn from(value: u64) -> Lsn {
        Lsn(value)
    }
}

impl From<Lsn> for u64 {
    fn from(value: Lsn) -> u64 {
        value.0
    }
}

/// A WAL timeline ID (1 for a cluster that was never promoted or recovered to a point).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimelineId(pub u32);

impl TimelineId {
    /// The history file name for this timeline, e.g. `00000002.history`.
    pub fn history_file_name(self) -> String {
        format!("{:08X}.history", self.0)
    }
}

impl fmt::Display for TimelineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A cluster's system identifier, set by initdb and shared by all its standbys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SystemId(pub u64);

impl fmt::Display for SystemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The WAL segment size: a power of two from 1 MiB to 1 GiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WalSegmentSize(u32);

impl WalSegmentSize {
    /// The default, 16 MiB.
    pub const DEFAULT: WalSegmentSize = WalSegmentSize(16 * 1024 * 1024);

    /// Validates a size in bytes.
    pub fn new(bytes: u64) -> Result<WalSegmentSize, Error> {
        if bytes.is_power_of_two() && (1 << 20..=1 << 30).contains(&bytes) {
            Ok(WalSegmentSize(bytes as u32))
        } else {
            Err(Error::protocol(format!(
                "WAL segment size {bytes} bytes is not a power of two between 1 MB and 1 GB"
            )))
        }
    }

    /// Parses the output of `SHOW wal_segment_size` (`16MB`, `1GB`, or plain bytes).
    ///
    /// ```
    /// use pgwire_repl::WalSegmentSize;
    /// assert_eq!(WalSegmentSize::parse_setting("16MB").unwrap(), WalSegmentSize::DEFAULT);
    /// assert_eq!(WalSegmentSize::parse_setting("1GB").unwrap().bytes(), 1 << 30);
    /// assert!(WalSegmentSize::parse_setting("3MB").is_err());
    /// ```
    pub fn parse_setting(value: &str) -> Result<WalSegmentSize, Error> {
        let value = value.trim();
        let (number, multiplier) = if let Some(n) = value.strip_suffix("GB") {
            (n, 1u64 << 30)
        } else if let Some(n) = value.strip_suffix("MB") {
            (n, 1u64 << 20)
        } else if let Some(n) = value.strip_suffix("kB") {
            (n, 1u64 << 10)
        } else {
            (value, 1)
        };
        let number: u64 = number
            .trim()
            .parse()
            .map_err(|_| Error::protocol(format!("cannot parse wal_segment_size {value:?}")))?;
        let bytes = number
            .checked_mul(multiplier)
            .ok_or_else(|| Error::protocol(format!("wal_segment_size {value:?} overflows")))?;
        WalSegmentSize::new(bytes)
    }

    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        u64::from(self.0)
    }

    /// How many segments share one "xlog id" (the middle 8 hex digits of a file name).
    pub fn segments_per_xlog_id(self) -> u64 {
        0x1_0000_0000 / self.bytes()
    }
}

impl Default for WalSegmentSize {
    fn default() -> WalSegmentSize {
        WalSegmentSize::DEFAULT
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn display_matches_postgres() {
        assert_eq!(Lsn(0).to_string(), "0/0");
        assert_eq!(Lsn(0x176A250).to_string(), "0/176A250");
        assert_eq!(Lsn(u64::MAX).to_string(), "FFFFFFFF/FFFFFFFF");
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "/",
            "0/",
            "/0",
            "1/2/3",
            "g/0",
            "0/123456789",
            " 0/0",
            "-1/0",
            "+1/0",
        ] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn segment_names_for_other_sizes() {
        let one_gb = WalSegmentSize::new(1 << 30).unwrap();
        assert_eq!(one_gb.segments_per_xlog_id(), 4);
        assert_eq!(
            Lsn(0x1_C000_0000).wal_file_name(TimelineId(1), one_gb),
            "000000010000000100000003"
        );
        let one_mb = WalSegmentSize::new(1 << 20).unwrap();
        assert_eq!(
            Lsn(0x2_0010_0000).wal_file_name(TimelineId(1), one_mb),
            "000000010000000200000001"
        );
        assert!(parse_wal_file_name("000000010000000100000004", one_gb).is_none());
        assert!(parse_wal_file_name("000000000000000100000000", one_gb).is_none());
    }

    fn segment_sizes() -> impl Strategy<Value = WalSegmentSize> {
        (20u32..=30).prop_map(|shift| WalSegmentSize::new(1 << shift).unwrap())
    }

    proptest! {
        #[test]
        fn lsn_text_round_trips(value: u64) {
            let lsn = Lsn(value);
            prop_assert_eq!(lsn.to_string().parse::<Lsn>().unwrap(), lsn);
            // The zero-padded form PostgreSQL 19 prints parses to the same value.
            let padded = format!("{:X}/{:08X}", value >> 32, value & 0xFFFF_FFFF);
            prop_assert_eq!(padded.parse::<Lsn>().unwrap(), lsn);
        }

        #[test]
        fn segment_arithmetic_is_consistent(value: u64, size in segment_sizes(), tli in 1u32..) {
            let lsn = Lsn(value);
            let start = lsn.segment_start(size);
            prop_assert!(start <= lsn);
            prop_assert_eq!(start.0 % size.bytes(), 0);
            prop_assert_eq!(start.0 + lsn.segment_offset(size), lsn.0);
            let name = lsn.wal_file_name(TimelineId(tli), size);
            prop_assert_eq!(name.len(), 24);
            let (parsed_tli, segment) = parse_wal_file_name(&name, size).unwrap();
            prop_assert_eq!(parsed_tli, TimelineId(tli));
            prop_assert_eq!(segment, lsn.segment_number(size));
            let partial = format!("{name}.partial");
            prop_assert_eq!(parse_wal_file_name(&partial, size), Some((TimelineId(tli), segment)));
        }

        #[test]
        fn checked_arithmetic_never_panics(a: u64, b: u64) {
            let lsn = Lsn(a);
            prop_assert_eq!(lsn.checked_add(b).map(|l| l.0), a.checked_add(b));
            prop_assert_eq!(lsn.checked_sub(b).map(|l| l.0), a.checked_sub(b));
            prop_assert_eq!(lsn.bytes_since(Lsn(b)), a.checked_sub(b));
        }

        #[test]
        fn lsn_parse_never_panics(s in ".{0,24}") {
            let _ = s.parse::<Lsn>();
        }
    }
}
