//! The pure WAL decoder and verifier: fed bytes in LSN order, no I/O.
//!
//! STUB: the interface is fixed; the implementation is in progress.

use pgwire_repl::{Lsn, SystemId, TimelineId, WalSegmentSize};

/// What the verifier checks against.
#[derive(Debug, Clone)]
pub struct VerifierConfig {
    /// The WAL segment size (from `SHOW wal_segment_size`).
    pub segment_size: WalSegmentSize,
    /// The server's major version (13–18), which fixes the page magic. `None`: learn it
    /// from the first long page header and accept only known values.
    pub server_major: Option<u32>,
    /// The expected system identifier (from IDENTIFY_SYSTEM), checked in long page headers.
    pub system_id: Option<SystemId>,
    /// The timeline being streamed; page headers must carry it.
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

/// The kinds of verification failures.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WalVerifyErrorKind {
    /// Bytes were fed for a position other than the expected one.
    Discontinuity {
        /// The position the verifier expected.
        expected: Lsn,
    },
    /// Anything else, described.
    Other(String),
}

impl std::fmt::Display for WalVerifyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid WAL at {}: {:?}", self.lsn, self.kind)
    }
}

impl std::error::Error for WalVerifyError {}

/// Verifies a WAL byte stream incrementally.
#[derive(Debug)]
pub struct WalVerifier {
    config: VerifierConfig,
    position: Lsn,
    verified: Lsn,
}

impl WalVerifier {
    /// Starts at `start`, which must be a segment start (streaming always starts there;
    /// the first record may be a continuation, which is skipped).
    pub fn new(start: Lsn, config: VerifierConfig) -> WalVerifier {
        WalVerifier {
            config,
            position: start,
            verified: start,
        }
    }

    /// Feeds the bytes at `lsn` (which must equal [`WalVerifier::position`]). Returns an
    /// error as soon as anything in them is invalid; nothing after it is accepted.
    pub fn feed(&mut self, lsn: Lsn, data: &[u8]) -> Result<(), WalVerifyError> {
        if lsn != self.position {
            return Err(WalVerifyError {
                lsn,
                kind: WalVerifyErrorKind::Discontinuity {
                    expected: self.position,
                },
            });
        }
        let _ = &self.config;
        self.position = Lsn(self.position.0 + data.len() as u64);
        self.verified = self.position;
        Ok(())
    }

    /// The next LSN expected.
    pub fn position(&self) -> Lsn {
        self.position
    }

    /// The end of the last fully verified record (or page-skip): everything before it is
    /// known good. Report flush positions and complete segments only up to here.
    pub fn verified_up_to(&self) -> Lsn {
        self.verified
    }

    /// Continues on a new timeline from `start` (a segment start), as after a promotion.
    pub fn switch_timeline(&mut self, timeline: TimelineId, start: Lsn) {
        self.config.timeline = timeline;
        self.position = start;
        self.verified = start;
    }
}
