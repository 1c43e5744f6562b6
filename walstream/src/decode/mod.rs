//! The pure WAL decoder and verifier: fed bytes in LSN order, no I/O.
//!
//! [`WalVerifier`] follows the framing of a WAL byte stream exactly as PostgreSQL's
//! `xlogreader.c` does and checks, without buffering more than one 40-byte page header
//! and one 24-byte record header:
//!
//! * every page header (every 8192 bytes): the magic of the server version, known flag
//!   bits only, the address (`xlp_pageaddr` equals the page's LSN), the timeline, the
//!   long header at each segment start (system identifier, segment size, block size),
//!   and the continuation flag and remaining length against the record in progress;
//! * every record: `xl_tot_len` within limits, `xl_prev` equal to the previous record's
//!   start, and the CRC32C, computed incrementally over the record's pieces as they
//!   arrive (a record may span many pages and segments; it is never assembled);
//! * `XLOG_SWITCH`: the rest of the segment is unused and must be zeros, except that a
//!   page header there may be either valid or zeroed (both occur in real WAL).
//!
//! Bytes may be fed in any chunking, one at a time or a whole 128 KiB XLogData message
//! across a segment boundary. Nothing panics or allocates on any input.

use std::fmt;

use pgwire_repl::{Lsn, SystemId, TimelineId, WalSegmentSize};

pub mod layout;
#[doc(hidden)]
pub mod synth;
#[cfg(test)]
mod tests;

use layout::{
    LONG_PAGE_HEADER_LEN, RECORD_ALIGN, RECORD_CRC_OFFSET, RECORD_HEADER_LEN,
    SHORT_PAGE_HEADER_LEN, WAL_PAGE_SIZE, XLP_ALL_FLAGS, XLP_FIRST_IS_CONTRECORD,
    XLP_FIRST_IS_OVERWRITE_CONTRECORD, XLP_LONG_HEADER,
};

/// What the verifier checks against.
#[derive(Debug, Clone)]
pub struct VerifierConfig {
    /// The WAL segment size (from `SHOW wal_segment_size`).
    pub segment_size: WalSegmentSize,
    /// The server's major version (13–18), which fixes the page magic. `None`: learn it
    /// from the first page header and accept only known values.
    pub server_major: Option<u32>,
    /// The expected system identifier (from IDENTIFY_SYSTEM), checked in long page headers.
    pub system_id: Option<SystemId>,
    /// The timeline being streamed. Page headers may carry it or, before the point where
    /// this timeline branched off, an ancestor's (lower) TLI; never a higher one, and
    /// the TLI never goes down from one page to the next (PostgreSQL's own rule).
    pub timeline: TimelineId,
    /// When false, bytes are only position-checked, nothing is decoded.
    pub verify_records: bool,
}

/// A verification failure. Always names the LSN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalVerifyError {
    /// Where it was found: the record's or the page's start.
    pub lsn: Lsn,
    /// What is wrong.
    pub kind: WalVerifyErrorKind,
}

/// A field of a segment's long page header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LongHeaderField {
    /// `xlp_sysid`, the system identifier.
    SystemId,
    /// `xlp_seg_size`, the WAL segment size.
    SegmentSize,
    /// `xlp_xlog_blcksz`, the WAL page size.
    BlockSize,
}

/// The kinds of verification failures.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WalVerifyErrorKind {
    /// Bytes were fed for a position other than the expected one.
    Discontinuity {
        /// The position the verifier expected.
        expected: Lsn,
    },
    /// Anything else, described. (Not produced by the verifier itself.)
    Other(String),
    /// `config.server_major` is not one of 13–18.
    UnsupportedServerVersion {
        /// The configured major version.
        major: u32,
    },
    /// The first page header's magic is not one of a known server version (only when
    /// the version was not configured).
    UnknownMagic {
        /// The magic found.
        found: u16,
    },
    /// A page header's magic is not the expected server version's. Zeros here mean
    /// unwritten space where a page should be.
    BadPageMagic {
        /// The magic found.
        found: u16,
        /// The magic of the expected server version.
        expected: u16,
    },
    /// A page header has flag bits PostgreSQL does not define.
    BadPageInfo {
        /// The `xlp_info` found.
        info: u16,
    },
    /// A segment's first page has no long header.
    MissingLongHeader {
        /// The `xlp_info` found.
        info: u16,
    },
    /// A page other than a segment's first has a long header.
    UnexpectedLongHeader {
        /// The `xlp_info` found.
        info: u16,
    },
    /// A long page header does not match the configuration.
    BadLongHeader {
        /// Which field.
        field: LongHeaderField,
        /// The value found.
        found: u64,
        /// The value expected.
        expected: u64,
    },
    /// A page header's address is not the page's own LSN: the page belongs elsewhere
    /// (typically an old, recycled segment's content, or bytes out of order).
    PageAddressMismatch {
        /// The `xlp_pageaddr` found.
        found: Lsn,
    },
    /// A page header's TLI is zero or later than the configured timeline.
    WrongTimeline {
        /// The `xlp_tli` found.
        found: u32,
        /// The configured timeline.
        expected: u32,
    },
    /// A page header's TLI is lower than the previous page's.
    TimelineWentBackwards {
        /// The `xlp_tli` found.
        found: u32,
        /// The previous page's TLI.
        previous: u32,
    },
    /// A page's continuation flag or `xlp_rem_len` does not match the record in
    /// progress (or the absence of one).
    BadContinuation {
        /// The record in progress, if known.
        record: Option<Lsn>,
        /// The bytes of it still to come (0: no record in progress; `None`: unknown,
        /// at the start of the stream).
        expected_remaining: Option<u32>,
        /// Whether `XLP_FIRST_IS_CONTRECORD` was set.
        contrecord_flag: bool,
        /// The `xlp_rem_len` found.
        rem_len: u32,
    },
    /// `XLP_FIRST_IS_OVERWRITE_CONTRECORD` on a page where no record was in progress.
    UnexpectedOverwriteContrecord,
    /// `xl_tot_len` is shorter than a record header or longer than the server can write.
    /// Zero means zero-filled, never-written space where a record should start: the end
    /// of valid WAL in a file, and never part of a stream.
    InvalidRecordLength {
        /// The `xl_tot_len` found.
        tot_len: u32,
        /// The longest record the server version writes.
        max: u32,
    },
    /// `xl_prev` is not the previous record's start.
    PrevLinkMismatch {
        /// The `xl_prev` found.
        found: Lsn,
        /// The previous record's start.
        expected: Lsn,
    },
    /// The record's CRC32C does not match its contents.
    RecordCrcMismatch {
        /// The `xl_crc` stored in the record.
        expected: u32,
        /// The CRC32C of the bytes received.
        computed: u32,
        /// The record's `xl_tot_len`.
        record_len: u32,
    },
    /// A non-zero byte in the unused rest of a segment after XLOG_SWITCH.
    BadSwitchPadding {
        /// The start of the XLOG_SWITCH record.
        switch_record: Lsn,
    },
    /// The position would pass the end of the LSN space.
    LsnOverflow,
}

impl WalVerifyErrorKind {
    /// True for errors that mean the bytes are damaged or not WAL of the expected
    /// stream; false for a caller mistake or a configuration that does not match the
    /// server ([`Discontinuity`](Self::Discontinuity), unsupported version, system id,
    /// segment size).
    pub fn is_corruption(&self) -> bool {
        !matches!(
            self,
            WalVerifyErrorKind::Discontinuity { .. }
                | WalVerifyErrorKind::UnsupportedServerVersion { .. }
                | WalVerifyErrorKind::LsnOverflow
                | WalVerifyErrorKind::BadLongHeader {
                    field: LongHeaderField::SystemId | LongHeaderField::SegmentSize,
                    ..
                }
        )
    }
}

impl fmt::Display for WalVerifyErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use WalVerifyErrorKind as K;
        match self {
            K::Discontinuity { expected } => {
                write!(f, "bytes fed out of order: the next expected position is {expected}")
            }
            K::Other(message) => f.write_str(message),
            K::UnsupportedServerVersion { major } => write!(
                f,
                "server major version {major} is not supported (only PostgreSQL 13 to 18)"
            ),
            K::UnknownMagic { found } => write!(
                f,
                "page magic {found:04X} is not that of PostgreSQL 13 to 18{}",
                zero_hint(u64::from(*found))
            ),
            K::BadPageMagic { found, expected } => {
                write!(f, "page magic {found:04X}, expected {expected:04X}")?;
                if *found == 0 {
                    f.write_str(" (zeros: unwritten space where a page header should be)")
                } else if found.swap_bytes() == *expected {
                    f.write_str(" (byte-swapped: written by a big-endian server)")
                } else if let Some(major) = layout::major_for_magic(*found) {
                    write!(f, " (that is PostgreSQL {major}'s magic)")
                } else {
                    Ok(())
                }
            }
            K::BadPageInfo { info } => write!(f, "page header flags {info:04X} include unknown bits"),
            K::MissingLongHeader { info } => write!(
                f,
                "the segment's first page has no long header (flags {info:04X})"
            ),
            K::UnexpectedLongHeader { info } => write!(
                f,
                "a page that is not a segment's first has a long header (flags {info:04X})"
            ),
            K::BadLongHeader { field, found, expected } => match field {
                LongHeaderField::SystemId => write!(
                    f,
                    "the WAL is from another database system: system identifier {found}, expected {expected}"
                ),
                LongHeaderField::SegmentSize => write!(
                    f,
                    "the WAL segment size in the page header is {found} bytes, expected {expected}"
                ),
                LongHeaderField::BlockSize => write!(
                    f,
                    "the WAL block size in the page header is {found} bytes; only {expected} is supported"
                ),
            },
            K::PageAddressMismatch { found } => write!(
                f,
                "the page header says it is the page at {found} (an old, recycled segment's content, or bytes out of order)"
            ),
            K::WrongTimeline { found, expected } => write!(
                f,
                "page header timeline {found}, expected {expected} (or an ancestor)"
            ),
            K::TimelineWentBackwards { found, previous } => write!(
                f,
                "page header timeline {found} after a page of timeline {previous}; a timeline never goes down"
            ),
            K::BadContinuation { record, expected_remaining, contrecord_flag, rem_len } => {
                let flag = if *contrecord_flag { "set" } else { "not set" };
                match (record, expected_remaining) {
                    (Some(record), Some(remaining)) => write!(
                        f,
                        "the record at {record} has {remaining} bytes to come, but the page's continuation flag is {flag} with {rem_len} bytes remaining"
                    ),
                    (None, Some(0)) => write!(
                        f,
                        "no record continues onto this page, but its continuation flag is {flag} with {rem_len} bytes remaining"
                    ),
                    (_, remaining) => write!(
                        f,
                        "inconsistent continuation ({} bytes expected): flag {flag}, {rem_len} bytes remaining",
                        remaining.map_or_else(|| "unknown".to_owned(), |r| r.to_string())
                    ),
                }
            }
            K::UnexpectedOverwriteContrecord => f.write_str(
                "the page says it overwrites an aborted record, but no record was in progress",
            ),
            K::InvalidRecordLength { tot_len: 0, .. } => f.write_str(
                "record length 0 where a record should start: zero-filled, never-written space (the end of valid WAL), which a server does not stream",
            ),
            K::InvalidRecordLength { tot_len, max } => write!(
                f,
                "record length {tot_len} is outside {RECORD_HEADER_LEN}..={max}"
            ),
            K::PrevLinkMismatch { found, expected } => write!(
                f,
                "the record's previous-record link is {found}, but the previous record starts at {expected}"
            ),
            K::RecordCrcMismatch { expected, computed, record_len } => write!(
                f,
                "CRC32C mismatch in a {record_len}-byte record: stored {expected:08X}, computed {computed:08X}"
            ),
            K::BadSwitchPadding { switch_record } => write!(
                f,
                "non-zero byte in the unused rest of the segment after the XLOG_SWITCH record at {switch_record}"
            ),
            K::LsnOverflow => f.write_str("the position would pass the end of the LSN space"),
        }
    }
}

fn zero_hint(value: u64) -> &'static str {
    if value == 0 {
        " (zeros: unwritten space where a page header should be)"
    } else {
        ""
    }
}

impl fmt::Display for WalVerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid WAL at {}: {}", self.lsn, self.kind)?;
        let advice = match &self.kind {
            WalVerifyErrorKind::Discontinuity { .. } | WalVerifyErrorKind::LsnOverflow => {
                "this is a bug in the caller: feed each byte once, in LSN order"
            }
            WalVerifyErrorKind::UnsupportedServerVersion { .. } => {
                "use a server of version 13 to 18, or leave server_major unset"
            }
            WalVerifyErrorKind::BadLongHeader {
                field: LongHeaderField::SystemId | LongHeaderField::SegmentSize,
                ..
            } => "check that the connection goes to the intended server and that the configuration comes from its IDENTIFY_SYSTEM and SHOW wal_segment_size",
            WalVerifyErrorKind::UnknownMagic { .. } => {
                "the bytes are not WAL of a supported server, or are corrupt; the segment was not written as complete"
            }
            _ => "the WAL stream is corrupt or was altered in transit; nothing from this point was accepted and the segment was not written as complete; restart streaming from the segment start, and if the error repeats, check the server's own pg_wal",
        };
        write!(f, "; {advice}")
    }
}

impl std::error::Error for WalVerifyError {}

/// One verified record, as passed to the callback of [`WalVerifier::feed_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordInfo {
    /// The record's start.
    pub lsn: Lsn,
    /// The end of its last byte (exclusive, before alignment padding).
    pub end: Lsn,
    /// `xl_tot_len`: header and data, without page headers.
    pub tot_len: u32,
    /// `xl_xid`.
    pub xid: u32,
    /// `xl_prev`.
    pub prev: Lsn,
    /// `xl_info`.
    pub info: u8,
    /// `xl_rmid`, the resource manager.
    pub rmid: u8,
}

impl RecordInfo {
    /// True for an `XLOG_SWITCH` record, after which the segment's rest is unused.
    pub fn is_switch(&self) -> bool {
        self.rmid == layout::RM_XLOG_ID && self.info & !layout::XLR_INFO_MASK == layout::XLOG_SWITCH
    }
}

/// Where the decoder is relative to records.
#[derive(Debug, Clone)]
enum RecordState {
    /// Started mid-page: skip to the next page boundary, then as `Start`.
    Resync,
    /// At the first page header after a start: its flags say whether a record's tail
    /// (whose head is not in the stream) must be skipped.
    Start,
    /// Skipping the tail of a record whose head is not in the stream.
    SkipTail { remaining: u32 },
    /// Between records: alignment padding and page headers.
    Idle,
    /// Collecting a record's fixed header, which may span pages.
    Header {
        start: u64,
        have: usize,
        buf: [u8; RECORD_HEADER_LEN],
    },
    /// Hashing a record's data as it arrives.
    Body {
        start: u64,
        header: [u8; RECORD_HEADER_LEN],
        remaining: u32,
        crc: u32,
    },
    /// The unused rest of a segment after XLOG_SWITCH, up to `end`.
    SwitchPadding { switch_record: u64, end: u64 },
}

/// Verifies a WAL byte stream incrementally.
///
/// ```
/// use pgwire_repl::{Lsn, TimelineId, WalSegmentSize};
/// use walstream::decode::{VerifierConfig, WalVerifier};
/// let config = VerifierConfig {
///     segment_size: WalSegmentSize::DEFAULT,
///     server_major: Some(16),
///     system_id: None,
///     timeline: TimelineId(1),
///     verify_records: true,
/// };
/// let mut verifier = WalVerifier::new(Lsn(0x100_0000), config);
/// // Zeros where a page header must be are refused.
/// let err = verifier.feed(Lsn(0x100_0000), &[0u8; 64]).unwrap_err();
/// assert_eq!(err.lsn, Lsn(0x100_0000));
/// assert_eq!(verifier.verified_up_to(), Lsn(0x100_0000));
/// ```
#[derive(Debug, Clone)]
pub struct WalVerifier {
    config: VerifierConfig,
    /// The next byte's LSN.
    position: u64,
    /// Everything before this is known good.
    verified: u64,
    /// Sticky: once set, every feed returns it.
    error: Option<WalVerifyError>,
    /// The page magic, configured or learnt from the first page.
    magic: Option<u16>,
    /// Records may be at most this long (depends on the version).
    max_record_len: u32,
    /// The TLI of the last page header; page TLIs never go down.
    last_page_tli: u32,
    /// Page header bytes collected so far (only while `in_page_header`).
    page_header: [u8; LONG_PAGE_HEADER_LEN],
    page_header_have: usize,
    page_header_len: usize,
    in_page_header: bool,
    record: RecordState,
    /// The start of the last complete record: the next record's expected `xl_prev`.
    prev_record: Option<u64>,
    records_verified: u64,
    records_abandoned: u64,
}

impl WalVerifier {
    /// Starts at `start`. Streaming always starts at a segment start, but any LSN works:
    ///
    /// * at a page boundary (a segment start included), the first page may begin with
    ///   the tail of a record whose head is not in the stream (`XLP_FIRST_IS_CONTRECORD`);
    ///   that tail, possibly spanning several pages, is skipped unverified, and every
    ///   record after it is verified;
    /// * inside a page, the bytes up to the next page boundary are skipped unverified,
    ///   then as above.
    ///
    /// The first verified record's `xl_prev` is not checked (its predecessor is unknown).
    /// A `config.server_major` outside 13–18 makes the first [`feed`](Self::feed) fail.
    pub fn new(start: Lsn, config: VerifierConfig) -> WalVerifier {
        let magic = config.server_major.and_then(layout::page_magic);
        let max_record_len = layout::max_record_len(config.server_major.unwrap_or(13));
        let mut verifier = WalVerifier {
            config,
            position: start.0,
            verified: start.0,
            error: None,
            magic,
            max_record_len,
            last_page_tli: 0,
            page_header: [0; LONG_PAGE_HEADER_LEN],
            page_header_have: 0,
            page_header_len: 0,
            in_page_header: false,
            record: RecordState::Start,
            prev_record: None,
            records_verified: 0,
            records_abandoned: 0,
        };
        verifier.restart_at(start.0);
        verifier
    }

    fn restart_at(&mut self, start: u64) {
        self.position = start;
        self.verified = start;
        self.error = None;
        self.last_page_tli = 0;
        self.in_page_header = false;
        self.page_header_have = 0;
        self.prev_record = None;
        self.record = if start % WAL_PAGE_SIZE == 0 {
            RecordState::Start
        } else {
            RecordState::Resync
        };
    }

    /// Feeds the bytes at `lsn` (which must equal [`WalVerifier::position`]). Returns an
    /// error as soon as anything in them is invalid; nothing after it is accepted, and
    /// every later call returns the same error. Data may end anywhere (mid-page,
    /// mid-record): the verifier waits for the rest.
    pub fn feed(&mut self, lsn: Lsn, data: &[u8]) -> Result<(), WalVerifyError> {
        self.feed_with(lsn, data, |_| {})
    }

    /// Like [`feed`](Self::feed), and calls `on_record` for each record whose CRC was
    /// verified, in order (not for skipped or abandoned ones). With `verify_records`
    /// off, it is never called.
    pub fn feed_with<F: FnMut(&RecordInfo)>(
        &mut self,
        lsn: Lsn,
        data: &[u8],
        mut on_record: F,
    ) -> Result<(), WalVerifyError> {
        if let Some(err) = &self.error {
            return Err(err.clone());
        }
        let fail = |kind| WalVerifyError { lsn, kind };
        if lsn.0 != self.position {
            return Err(self.stick(fail(WalVerifyErrorKind::Discontinuity {
                expected: Lsn(self.position),
            })));
        }
        if lsn.0.checked_add(data.len() as u64).is_none() {
            return Err(self.stick(fail(WalVerifyErrorKind::LsnOverflow)));
        }
        if !self.config.verify_records {
            self.position += data.len() as u64;
            self.verified = self.position;
            return Ok(());
        }
        if let Some(major) = self.config.server_major {
            if layout::page_magic(major).is_none() {
                return Err(
                    self.stick(fail(WalVerifyErrorKind::UnsupportedServerVersion { major }))
                );
            }
        }
        let result = self.consume(data, &mut on_record);
        self.settle_verified();
        result.map_err(|err| self.stick(err))
    }

    fn stick(&mut self, err: WalVerifyError) -> WalVerifyError {
        self.error = Some(err.clone());
        err
    }

    /// The next LSN expected. After an error: where decoding stopped.
    pub fn position(&self) -> Lsn {
        Lsn(self.position)
    }

    /// The end of the last fully verified record, page header, skipped continuation or
    /// switch padding: everything before it is known good, and the record in progress
    /// (if any) starts at or after it. Report flush positions and complete segments
    /// only up to here: a segment is complete and good when this reaches its end. With
    /// `verify_records` off, equal to [`position`](Self::position).
    pub fn verified_up_to(&self) -> Lsn {
        Lsn(self.verified)
    }

    /// Continues on a new timeline from `start` (a segment start), as after a promotion.
    /// The state is reset as by [`new`](Self::new) (a pending error included); the page
    /// magic learnt so far is kept. Pages before the switch point may carry the parent
    /// timeline's TLI, which is accepted.
    pub fn switch_timeline(&mut self, timeline: TimelineId, start: Lsn) {
        self.config.timeline = timeline;
        self.restart_at(start.0);
    }

    /// How many records were CRC-verified so far.
    pub fn records_verified(&self) -> u64 {
        self.records_verified
    }

    /// How many partial records were abandoned at an `XLP_FIRST_IS_OVERWRITE_CONTRECORD`
    /// page (a crash cut them short, and the server wrote new WAL in their place).
    pub fn records_abandoned(&self) -> u64 {
        self.records_abandoned
    }

    /// The start of the last verified record (the next record's expected `xl_prev`).
    pub fn last_record(&self) -> Option<Lsn> {
        self.prev_record.map(Lsn)
    }

    /// The server major version, configured or learnt from the first page header.
    pub fn server_major(&self) -> Option<u32> {
        self.magic.and_then(layout::major_for_magic)
    }

    /// The configuration (with the current timeline).
    pub fn config(&self) -> &VerifierConfig {
        &self.config
    }

    /// The error returned by every feed from now on, if one occurred.
    pub fn error(&self) -> Option<&WalVerifyError> {
        self.error.as_ref()
    }

    fn settle_verified(&mut self) {
        let candidate = match &self.record {
            RecordState::Idle | RecordState::SwitchPadding { .. } => {
                if self.in_page_header {
                    self.position - self.page_header_have as u64
                } else {
                    self.position
                }
            }
            RecordState::Header { start, .. } | RecordState::Body { start, .. } => *start,
            RecordState::Resync | RecordState::Start | RecordState::SkipTail { .. } => return,
        };
        if candidate > self.verified {
            self.verified = candidate;
        }
    }

    fn consume<F: FnMut(&RecordInfo)>(
        &mut self,
        mut data: &[u8],
        on_record: &mut F,
    ) -> Result<(), WalVerifyError> {
        while !data.is_empty() {
            let page_offset = (self.position % WAL_PAGE_SIZE) as usize;
            if page_offset == 0 && !self.in_page_header {
                self.in_page_header = true;
                self.page_header_have = 0;
                self.page_header_len = if self.position % self.config.segment_size.bytes() == 0 {
                    LONG_PAGE_HEADER_LEN
                } else {
                    SHORT_PAGE_HEADER_LEN
                };
            }
            if self.in_page_header {
                let have = self.page_header_have;
                let take = (self.page_header_len - have).min(data.len());
                let (head, rest) = data.split_at(take);
                if let Some(dst) = self.page_header.get_mut(have..have + take) {
                    dst.copy_from_slice(head);
                }
                self.page_header_have += take;
                self.position += take as u64;
                data = rest;
                if self.page_header_have == self.page_header_len {
                    let page = self.position - self.page_header_len as u64;
                    self.check_page_header(page)
                        .map_err(|kind| WalVerifyError {
                            lsn: Lsn(page),
                            kind,
                        })?;
                    self.in_page_header = false;
                }
                continue;
            }
            let room = WAL_PAGE_SIZE as usize - page_offset;
            let take = room.min(data.len());
            let (in_page, rest) = data.split_at(take);
            self.consume_in_page(in_page, on_record)?;
            data = rest;
        }
        Ok(())
    }

    /// Consumes bytes that lie inside one page, after its header.
    fn consume_in_page<F: FnMut(&RecordInfo)>(
        &mut self,
        mut data: &[u8],
        on_record: &mut F,
    ) -> Result<(), WalVerifyError> {
        while !data.is_empty() {
            let used = match &mut self.record {
                RecordState::Resync => data.len(),
                RecordState::SkipTail { remaining } => {
                    let take = data.len().min(*remaining as usize);
                    *remaining -= take as u32;
                    if *remaining == 0 {
                        self.record = RecordState::Idle;
                    }
                    take
                }
                RecordState::Idle | RecordState::Start => {
                    let misalign = self.position % RECORD_ALIGN;
                    if misalign != 0 {
                        // Alignment padding; PostgreSQL does not read it.
                        data.len().min((RECORD_ALIGN - misalign) as usize)
                    } else {
                        let whole = self.whole_record(data, on_record)?;
                        if whole > 0 {
                            data = data.get(whole..).unwrap_or_default();
                            continue;
                        }
                        self.record = RecordState::Header {
                            start: self.position,
                            have: 0,
                            buf: [0; RECORD_HEADER_LEN],
                        };
                        0
                    }
                }
                RecordState::Header { start, have, buf } => {
                    let start = *start;
                    let before = *have;
                    let take = data.len().min(RECORD_HEADER_LEN - before);
                    if let (Some(dst), Some(src)) =
                        (buf.get_mut(before..before + take), data.get(..take))
                    {
                        dst.copy_from_slice(src);
                    }
                    *have += take;
                    let header = *buf;
                    let complete = *have == RECORD_HEADER_LEN;
                    if before < 4 && before + take >= 4 {
                        let tot_len = read_u32(&header, 0);
                        if tot_len < RECORD_HEADER_LEN as u32 || tot_len > self.max_record_len {
                            return Err(WalVerifyError {
                                lsn: Lsn(start),
                                kind: WalVerifyErrorKind::InvalidRecordLength {
                                    tot_len,
                                    max: self.max_record_len,
                                },
                            });
                        }
                    }
                    if complete {
                        self.position += take as u64;
                        self.start_body(start, header, on_record)?;
                        data = data.get(take..).unwrap_or_default();
                        continue;
                    }
                    take
                }
                RecordState::Body {
                    start,
                    header,
                    remaining,
                    crc,
                } => {
                    let take = data.len().min(*remaining as usize);
                    let (piece, _) = data.split_at(take);
                    *crc = crc32c::crc32c_append(*crc, piece);
                    *remaining -= take as u32;
                    if *remaining == 0 {
                        let (start, header, crc) = (*start, *header, *crc);
                        self.position += take as u64;
                        self.finish_record(start, header, crc, on_record)?;
                        data = data.get(take..).unwrap_or_default();
                        continue;
                    }
                    take
                }
                RecordState::SwitchPadding { switch_record, end } => {
                    let take = data.len().min(end.saturating_sub(self.position) as usize);
                    let (piece, _) = data.split_at(take);
                    if let Some(offset) = first_nonzero(piece) {
                        let switch_record = *switch_record;
                        self.position += offset as u64;
                        return Err(WalVerifyError {
                            lsn: Lsn(self.position),
                            kind: WalVerifyErrorKind::BadSwitchPadding {
                                switch_record: Lsn(switch_record),
                            },
                        });
                    }
                    if self.position + take as u64 >= *end {
                        self.record = RecordState::Idle;
                    }
                    take
                }
            };
            self.position += used as u64;
            data = data.get(used..).unwrap_or_default();
        }
        Ok(())
    }

    /// The fast path for a record that lies entirely in `data` (most records do): no
    /// header copy, no state changes in between. Returns its length, or 0 to leave the
    /// record (and any error in its length) to the general path.
    fn whole_record<F: FnMut(&RecordInfo)>(
        &mut self,
        data: &[u8],
        on_record: &mut F,
    ) -> Result<usize, WalVerifyError> {
        let Some(header) = data.get(..RECORD_HEADER_LEN) else {
            return Ok(0);
        };
        let tot_len = read_u32(header, 0);
        if tot_len < RECORD_HEADER_LEN as u32 || tot_len > self.max_record_len {
            return Ok(0);
        }
        let Some(body) = data.get(RECORD_HEADER_LEN..tot_len as usize) else {
            return Ok(0);
        };
        let mut fixed = [0u8; RECORD_HEADER_LEN];
        fixed.copy_from_slice(header);
        let start = self.position;
        self.check_prev_link(start, &fixed)?;
        let crc = crc32c::crc32c_append(0, body);
        self.position += u64::from(tot_len);
        self.finish_record(start, fixed, crc, on_record)?;
        Ok(tot_len as usize)
    }

    fn check_prev_link(
        &self,
        start: u64,
        header: &[u8; RECORD_HEADER_LEN],
    ) -> Result<(), WalVerifyError> {
        let prev = read_u64(header, 8);
        match self.prev_record {
            Some(expected) if prev != expected => Err(WalVerifyError {
                lsn: Lsn(start),
                kind: WalVerifyErrorKind::PrevLinkMismatch {
                    found: Lsn(prev),
                    expected: Lsn(expected),
                },
            }),
            _ => Ok(()),
        }
    }

    /// The record header is complete: check the back link, then hash the data.
    fn start_body<F: FnMut(&RecordInfo)>(
        &mut self,
        start: u64,
        header: [u8; RECORD_HEADER_LEN],
        on_record: &mut F,
    ) -> Result<(), WalVerifyError> {
        self.check_prev_link(start, &header)?;
        let remaining = read_u32(&header, 0).saturating_sub(RECORD_HEADER_LEN as u32);
        if remaining == 0 {
            return self.finish_record(start, header, 0, on_record);
        }
        self.record = RecordState::Body {
            start,
            header,
            remaining,
            crc: 0,
        };
        Ok(())
    }

    /// All of the record's data is hashed: fold in the header and compare.
    fn finish_record<F: FnMut(&RecordInfo)>(
        &mut self,
        start: u64,
        header: [u8; RECORD_HEADER_LEN],
        data_crc: u32,
        on_record: &mut F,
    ) -> Result<(), WalVerifyError> {
        let (covered, _) = header.split_at(RECORD_CRC_OFFSET);
        let computed = crc32c::crc32c_append(data_crc, covered);
        let stored = read_u32(&header, RECORD_CRC_OFFSET);
        let tot_len = read_u32(&header, 0);
        if computed != stored {
            self.record = RecordState::Body {
                start,
                header,
                remaining: 0,
                crc: data_crc,
            };
            return Err(WalVerifyError {
                lsn: Lsn(start),
                kind: WalVerifyErrorKind::RecordCrcMismatch {
                    expected: stored,
                    computed,
                    record_len: tot_len,
                },
            });
        }
        let info = RecordInfo {
            lsn: Lsn(start),
            end: Lsn(self.position),
            tot_len,
            xid: read_u32(&header, 4),
            prev: Lsn(read_u64(&header, 8)),
            info: header[16],
            rmid: header[17],
        };
        self.records_verified += 1;
        self.prev_record = Some(start);
        self.record = RecordState::Idle;
        if info.is_switch() {
            // As xlogreader.c: the next record is at the next segment start (unless
            // the switch record itself ended exactly on one).
            let segment = self.config.segment_size.bytes();
            let end = self.position.div_ceil(segment).saturating_mul(segment);
            if end > self.position {
                self.record = RecordState::SwitchPadding {
                    switch_record: start,
                    end,
                };
            }
        }
        on_record(&info);
        Ok(())
    }

    fn check_page_header(&mut self, page: u64) -> Result<(), WalVerifyErrorKind> {
        let header = self.page_header;
        let in_switch_padding = matches!(self.record, RecordState::SwitchPadding { .. });
        let used = header.get(..self.page_header_len).unwrap_or_default();
        if in_switch_padding && used.iter().all(|&b| b == 0) {
            // PostgreSQL zeroes the headers of the pages it skips after XLOG_SWITCH.
            return Ok(());
        }
        let magic = read_u16(&header, 0);
        let info = read_u16(&header, 2);
        let tli = read_u32(&header, 4);
        let page_addr = read_u64(&header, 8);
        let rem_len = read_u32(&header, 16);

        match self.magic {
            Some(expected) if magic != expected => {
                return Err(WalVerifyErrorKind::BadPageMagic {
                    found: magic,
                    expected,
                });
            }
            Some(_) => {}
            None => match layout::major_for_magic(magic) {
                Some(major) => {
                    self.magic = Some(magic);
                    self.max_record_len = layout::max_record_len(major);
                }
                None => return Err(WalVerifyErrorKind::UnknownMagic { found: magic }),
            },
        }
        if info & !XLP_ALL_FLAGS != 0 {
            return Err(WalVerifyErrorKind::BadPageInfo { info });
        }
        let segment_start = page % self.config.segment_size.bytes() == 0;
        match (segment_start, info & XLP_LONG_HEADER != 0) {
            (true, false) => return Err(WalVerifyErrorKind::MissingLongHeader { info }),
            (false, true) => return Err(WalVerifyErrorKind::UnexpectedLongHeader { info }),
            (true, true) => self.check_long_header(&header)?,
            (false, false) => {}
        }
        if page_addr != page {
            return Err(WalVerifyErrorKind::PageAddressMismatch {
                found: Lsn(page_addr),
            });
        }
        let timeline = self.config.timeline.0;
        if tli == 0 || tli > timeline {
            return Err(WalVerifyErrorKind::WrongTimeline {
                found: tli,
                expected: timeline,
            });
        }
        if tli < self.last_page_tli {
            return Err(WalVerifyErrorKind::TimelineWentBackwards {
                found: tli,
                previous: self.last_page_tli,
            });
        }
        self.last_page_tli = tli;
        self.check_continuation(info, rem_len)
    }

    fn check_long_header(
        &self,
        header: &[u8; LONG_PAGE_HEADER_LEN],
    ) -> Result<(), WalVerifyErrorKind> {
        let bad = |field, found: u64, expected: u64| WalVerifyErrorKind::BadLongHeader {
            field,
            found,
            expected,
        };
        let system_id = read_u64(header, 24);
        if let Some(expected) = self.config.system_id {
            if system_id != expected.0 {
                return Err(bad(LongHeaderField::SystemId, system_id, expected.0));
            }
        }
        let segment_size = u64::from(read_u32(header, 32));
        if segment_size != self.config.segment_size.bytes() {
            return Err(bad(
                LongHeaderField::SegmentSize,
                segment_size,
                self.config.segment_size.bytes(),
            ));
        }
        let block_size = u64::from(read_u32(header, 36));
        if block_size != WAL_PAGE_SIZE {
            return Err(bad(LongHeaderField::BlockSize, block_size, WAL_PAGE_SIZE));
        }
        Ok(())
    }

    /// Matches the page's continuation flag and length against the record state.
    fn check_continuation(&mut self, info: u16, rem_len: u32) -> Result<(), WalVerifyErrorKind> {
        let contrecord = info & XLP_FIRST_IS_CONTRECORD != 0;
        let overwrite = info & XLP_FIRST_IS_OVERWRITE_CONTRECORD != 0;
        let (record, expected) = match &self.record {
            RecordState::Resync | RecordState::Start => {
                if contrecord && rem_len > 0 && rem_len <= self.max_record_len {
                    self.record = RecordState::SkipTail { remaining: rem_len };
                    return Ok(());
                }
                if !contrecord && rem_len == 0 {
                    self.record = RecordState::Idle;
                    return Ok(());
                }
                (None, None)
            }
            RecordState::Idle | RecordState::SwitchPadding { .. } => {
                if overwrite {
                    // Only a record in progress can have been overwritten.
                    return Err(WalVerifyErrorKind::UnexpectedOverwriteContrecord);
                }
                if !contrecord && rem_len == 0 {
                    return Ok(());
                }
                (None, Some(0))
            }
            RecordState::SkipTail { remaining } => (None, Some(*remaining)),
            RecordState::Header { start, have, buf } => {
                let tot_len = read_u32(buf, 0);
                (Some(Lsn(*start)), tot_len.checked_sub(*have as u32))
            }
            RecordState::Body {
                start, remaining, ..
            } => (Some(Lsn(*start)), Some(*remaining)),
        };
        let in_record = !matches!(
            self.record,
            RecordState::Idle
                | RecordState::SwitchPadding { .. }
                | RecordState::Resync
                | RecordState::Start
        );
        if in_record && overwrite && !contrecord {
            // The record in progress was cut short by a crash; new WAL starts here.
            self.records_abandoned += 1;
            self.record = RecordState::Idle;
            return Ok(());
        }
        if in_record && contrecord && !overwrite && expected == Some(rem_len) && rem_len > 0 {
            return Ok(());
        }
        Err(WalVerifyErrorKind::BadContinuation {
            record,
            expected_remaining: expected,
            contrecord_flag: contrecord,
            rem_len,
        })
    }
}

fn first_nonzero(bytes: &[u8]) -> Option<usize> {
    // Fast path: OR-fold (vectorises); search only if something is set.
    if bytes.iter().fold(0u8, |acc, &b| acc | b) == 0 {
        None
    } else {
        bytes.iter().position(|&b| b != 0)
    }
}

fn read_u16(bytes: &[u8], at: usize) -> u16 {
    let mut out = [0u8; 2];
    if let Some(src) = bytes.get(at..at + 2) {
        out.copy_from_slice(src);
    }
    u16::from_le_bytes(out)
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    let mut out = [0u8; 4];
    if let Some(src) = bytes.get(at..at + 4) {
        out.copy_from_slice(src);
    }
    u32::from_le_bytes(out)
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    let mut out = [0u8; 8];
    if let Some(src) = bytes.get(at..at + 8) {
        out.copy_from_slice(src);
    }
    u64::from_le_bytes(out)
}
