//! Names of the streamed WAL archive's objects (pure: no I/O).
//!
//! ```text
//! <prefix>/wal/archive.json                           cluster and segment size of the archive
//! <prefix>/wal/<TLI>/<TLI>.history                    a timeline's history file, as the server sent it
//! <prefix>/wal/<TLI>/<SEGMENT>.zst                    a complete segment, one zstd frame (checksummed)
//! <prefix>/wal/<TLI>/<SEGMENT>                        a complete segment, uncompressed (--compress none)
//! <prefix>/wal/<TLI>/<SEGMENT>.partial.<FROM>-<TO>    bytes FROM..TO (8 hex digits each, offsets
//!                                                     in the segment) of a segment not yet complete
//! <prefix>/locks/receiver.json                        the running receiver's lease
//! ```
//!
//! `<TLI>` is 8 upper-case hex digits and `<SEGMENT>` the 24-digit file name PostgreSQL
//! uses, so one listing of `wal/<TLI>/<SEGMENT>` finds a segment in every state.
//! Partial pieces tile the segment from offset 0; they are deleted once the complete
//! object is stored, and a complete object always wins over pieces left beside it.

use pgwire_repl::types::parse_wal_file_name;
use pgwire_repl::{TimelineId, WalSegmentSize};

/// The directory of the WAL archive.
pub const WAL_DIR: &str = "wal";
/// The WAL archive's record: cluster and segment size.
pub const ARCHIVE_RECORD: &str = "wal/archive.json";
/// The directory of leases.
pub const LOCKS_DIR: &str = "locks";
/// The receiver's lease.
pub const RECEIVER_LEASE: &str = "locks/receiver.json";

/// The suffix of a zstd-compressed complete segment.
pub const ZSTD_SUFFIX: &str = ".zst";
/// What separates a segment's name from a partial piece's range.
pub const PARTIAL_INFIX: &str = ".partial.";

/// `wal/<TLI>`, the directory of one timeline.
///
/// ```
/// use pgwire_repl::TimelineId;
/// assert_eq!(pgrepo::walnames::timeline_dir(TimelineId(2)), "wal/00000002");
/// ```
pub fn timeline_dir(timeline: TimelineId) -> String {
    format!("{WAL_DIR}/{:08X}", timeline.0)
}

/// The object of a timeline's history file.
///
/// ```
/// use pgwire_repl::TimelineId;
/// assert_eq!(pgrepo::walnames::history_object(TimelineId(3)), "wal/00000003/00000003.history");
/// ```
pub fn history_object(timeline: TimelineId) -> String {
    format!("{}/{:08X}.history", timeline_dir(timeline), timeline.0)
}

/// The object of a complete segment; `compressed` selects the `.zst` form.
pub fn segment_object(timeline: TimelineId, segment_name: &str, compressed: bool) -> String {
    format!(
        "{}/{segment_name}{}",
        timeline_dir(timeline),
        if compressed { ZSTD_SUFFIX } else { "" }
    )
}

/// The object of bytes `from..to` (offsets inside the segment) of a segment that is not
/// complete yet.
///
/// ```
/// use pgwire_repl::TimelineId;
/// let name = pgrepo::walnames::partial_object(TimelineId(1), "000000010000000000000003", 0, 0x2000);
/// assert_eq!(name, "wal/00000001/000000010000000000000003.partial.00000000-00002000");
/// ```
pub fn partial_object(timeline: TimelineId, segment_name: &str, from: u64, to: u64) -> String {
    format!(
        "{}/{segment_name}{PARTIAL_INFIX}{from:08X}-{to:08X}",
        timeline_dir(timeline)
    )
}

/// What one object under `wal/<TLI>/` is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalObject {
    /// A timeline history file.
    History {
        /// Its timeline.
        timeline: TimelineId,
    },
    /// A complete segment.
    Complete {
        /// Its timeline.
        timeline: TimelineId,
        /// Its segment number.
        segment: u64,
        /// Stored as one zstd frame.
        compressed: bool,
    },
    /// Bytes `from..to` of a segment not yet complete.
    Partial {
        /// Its timeline.
        timeline: TimelineId,
        /// Its segment number.
        segment: u64,
        /// The first offset in the segment.
        from: u64,
        /// The offset after the last byte.
        to: u64,
    },
}

impl WalObject {
    /// The timeline the object belongs to.
    pub fn timeline(&self) -> TimelineId {
        match self {
            WalObject::History { timeline }
            | WalObject::Complete { timeline, .. }
            | WalObject::Partial { timeline, .. } => *timeline,
        }
    }

    /// The segment number, for segments and pieces.
    pub fn segment(&self) -> Option<u64> {
        match self {
            WalObject::History { .. } => None,
            WalObject::Complete { segment, .. } | WalObject::Partial { segment, .. } => {
                Some(*segment)
            }
        }
    }
}

/// Parses an object's name relative to the repository (`wal/<TLI>/<name>`); `None` for
/// anything this layout does not write, which readers ignore.
///
/// ```
/// use pgrepo::walnames::{parse_wal_object, WalObject};
/// use pgwire_repl::{TimelineId, WalSegmentSize};
/// let size = WalSegmentSize::DEFAULT;
/// assert_eq!(
///     parse_wal_object("wal/00000001/000000010000000000000003.zst", size),
///     Some(WalObject::Complete { timeline: TimelineId(1), segment: 3, compressed: true })
/// );
/// assert_eq!(
///     parse_wal_object("wal/00000001/000000010000000000000003.partial.00000000-00002000", size),
///     Some(WalObject::Partial { timeline: TimelineId(1), segment: 3, from: 0, to: 0x2000 })
/// );
/// assert_eq!(parse_wal_object("wal/00000001/000000020000000000000003", size), None);
/// ```
pub fn parse_wal_object(relative: &str, segment_size: WalSegmentSize) -> Option<WalObject> {
    let rest = relative.strip_prefix(WAL_DIR)?.strip_prefix('/')?;
    let (dir, name) = rest.split_once('/')?;
    let dir_timeline = parse_timeline(dir)?;
    if let Some(history) = name.strip_suffix(".history") {
        let timeline = parse_timeline(history)?;
        return (timeline == dir_timeline).then_some(WalObject::History { timeline });
    }
    let (segment_name, kind) = if let Some((segment_name, range)) = name.split_once(PARTIAL_INFIX) {
        let (from, to) = range.split_once('-')?;
        (segment_name, Some((parse_hex8(from)?, parse_hex8(to)?)))
    } else if let Some(segment_name) = name.strip_suffix(ZSTD_SUFFIX) {
        (segment_name, None)
    } else {
        (name, None)
    };
    if segment_name.len() != 24 || segment_name.bytes().any(|b| b.is_ascii_lowercase()) {
        return None;
    }
    let (timeline, segment) = parse_wal_file_name(segment_name, segment_size)?;
    if timeline != dir_timeline || segment_name.ends_with(".partial") {
        return None;
    }
    match kind {
        Some((from, to)) => {
            (from < to && to <= segment_size.bytes()).then_some(WalObject::Partial {
                timeline,
                segment,
                from,
                to,
            })
        }
        None => Some(WalObject::Complete {
            timeline,
            segment,
            compressed: name.ends_with(ZSTD_SUFFIX),
        }),
    }
}

/// Whether `name` is a WAL segment name as `restore_command` receives it (`%f`).
pub fn is_segment_name(name: &str) -> bool {
    name.len() == 24
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

/// Whether `name` is a history file name (`00000002.history`); returns its timeline.
pub fn history_name_timeline(name: &str) -> Option<TimelineId> {
    parse_timeline(name.strip_suffix(".history")?)
}

fn parse_timeline(text: &str) -> Option<TimelineId> {
    let value = parse_hex8(text)?;
    (value != 0).then_some(TimelineId(value as u32))
}

fn parse_hex8(text: &str) -> Option<u64> {
    if text.len() != 8
        || !text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
    {
        return None;
    }
    u64::from_str_radix(text, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_round_trip() {
        let size = WalSegmentSize::DEFAULT;
        let tli = TimelineId(0x1A);
        let name = pgwire_repl::types::wal_file_name(tli, 0x1_23, size);
        for compressed in [false, true] {
            let object = segment_object(tli, &name, compressed);
            assert_eq!(
                parse_wal_object(&object, size),
                Some(WalObject::Complete {
                    timeline: tli,
                    segment: 0x123,
                    compressed
                })
            );
        }
        assert_eq!(
            parse_wal_object(&history_object(tli), size),
            Some(WalObject::History { timeline: tli })
        );
        assert_eq!(history_name_timeline("0000001A.history"), Some(tli));
        assert!(is_segment_name(&name));
        assert!(!is_segment_name("0000001a0000000100000023"));
    }

    #[test]
    fn rejects_what_the_layout_does_not_write() {
        let size = WalSegmentSize::DEFAULT;
        for bad in [
            "wal/00000001/000000010000000000000003.partial",
            "wal/00000001/000000010000000000000003.partial.00002000-00001000",
            "wal/00000001/000000010000000000000003.partial.00000000-01000001",
            "wal/00000001/000000010000000000000003.gz",
            "wal/00000000/000000000000000000000003",
            "wal/00000001/00000002.history",
            "wal/archive.json",
            "backups/x/backup.json",
            "wal/00000001/0000000100000000000001FF",
        ] {
            assert_eq!(parse_wal_object(bad, size), None, "{bad}");
        }
    }

    proptest! {
        #[test]
        fn parser_never_panics(name in ".{0,80}") {
            let _ = parse_wal_object(&name, WalSegmentSize::DEFAULT);
        }

        #[test]
        fn partial_names_round_trip(tli in 1u32.., segment in 0u64..(1 << 40), from in 0u64..(16 << 20), len in 1u64..(16 << 20)) {
            let size = WalSegmentSize::DEFAULT;
            let to = (from + len).min(size.bytes());
            prop_assume!(from < to);
            let name = pgwire_repl::types::wal_file_name(TimelineId(tli), segment, size);
            let object = partial_object(TimelineId(tli), &name, from, to);
            prop_assert_eq!(
                parse_wal_object(&object, size),
                Some(WalObject::Partial { timeline: TimelineId(tli), segment, from, to })
            );
        }
    }
}
