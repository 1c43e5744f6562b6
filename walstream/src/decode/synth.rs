//! A synthetic WAL builder for tests, fuzzers and benchmarks (not part of the stable API).
//!
//! [`WalBuilder`] lays out records exactly as PostgreSQL's `xlog.c` does: 8-byte
//! alignment, a page header on every 8192-byte page (a long one at each segment
//! start), `XLP_FIRST_IS_CONTRECORD` with `xlp_rem_len` on pages a record continues
//! onto, correct `xl_prev` links and CRC32Cs, `XLOG_SWITCH` with the rest of the segment
//! unused, and `XLP_FIRST_IS_OVERWRITE_CONTRECORD` after an aborted record. The bytes
//! it produces verify with [`WalVerifier`](super::WalVerifier) for the same settings.
//!
//! ```
//! use pgwire_repl::{Lsn, WalSegmentSize};
//! use walstream::decode::synth::{SynthOptions, WalBuilder};
//! let mut wal = WalBuilder::new(Lsn(0x100_0000), SynthOptions::new(WalSegmentSize::DEFAULT, 16));
//! let first = wal.filler(100);
//! wal.filler(20_000); // crosses pages
//! wal.switch();
//! assert_eq!(first, Lsn(0x100_0028));
//! assert_eq!(wal.position(), Lsn(0x200_0000));
//! ```
//!
//! Misuse (a start that is not a page boundary, a record shorter than its header)
//! panics: this is test code.

use pgwire_repl::{Lsn, WalSegmentSize};

use super::layout::{
    self, LONG_PAGE_HEADER_LEN, RECORD_ALIGN, RECORD_CRC_OFFSET, RECORD_HEADER_LEN,
    SHORT_PAGE_HEADER_LEN, WAL_PAGE_SIZE, XLP_BKP_REMOVABLE, XLP_FIRST_IS_CONTRECORD,
    XLP_FIRST_IS_OVERWRITE_CONTRECORD, XLP_LONG_HEADER,
};

/// What follows an XLOG_SWITCH record on the pages it leaves unused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchPadding {
    /// Zeros, page headers included (what PostgreSQL writes).
    Zeros,
    /// A valid short page header on each page, zeros otherwise.
    PageHeaders,
}

/// Settings for [`WalBuilder`].
#[derive(Debug, Clone)]
pub struct SynthOptions {
    /// The segment size.
    pub segment_size: WalSegmentSize,
    /// The page magic to write.
    pub magic: u16,
    /// The TLI written into page headers.
    pub timeline: u32,
    /// The system identifier written into long page headers.
    pub system_id: u64,
    /// What to write after XLOG_SWITCH.
    pub switch_padding: SwitchPadding,
}

impl SynthOptions {
    /// Timeline 1, system id 7_000_000_000_000_000_001, zeros after XLOG_SWITCH, the
    /// magic of `major` (13–18; panics otherwise).
    pub fn new(segment_size: WalSegmentSize, major: u32) -> SynthOptions {
        SynthOptions {
            segment_size,
            magic: layout::page_magic(major).expect("a major version from 13 to 18"),
            timeline: 1,
            system_id: 7_000_000_000_000_000_001,
            switch_padding: SwitchPadding::Zeros,
        }
    }
}

/// One record the builder wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SynthRecord {
    /// Its start.
    pub lsn: Lsn,
    /// Its `xl_tot_len`.
    pub tot_len: u32,
    /// Its resource manager.
    pub rmid: u8,
    /// Its `xl_info`.
    pub info: u8,
    /// False for a record cut short by [`WalBuilder::aborted_record`].
    pub complete: bool,
}

/// Builds a WAL byte stream in memory. See the [module](self) documentation.
#[derive(Debug, Clone)]
pub struct WalBuilder {
    opts: SynthOptions,
    start: u64,
    bytes: Vec<u8>,
    prev_record: u64,
    overwrite_next_page: bool,
    records: Vec<SynthRecord>,
    seed: u64,
}

impl WalBuilder {
    /// Starts at `start`, a page boundary. The first record's `xl_prev` is
    /// `start - 1` (any value works: the verifier does not check the first record's).
    pub fn new(start: Lsn, opts: SynthOptions) -> WalBuilder {
        assert_eq!(
            start.0 % WAL_PAGE_SIZE,
            0,
            "WalBuilder must start at a page boundary"
        );
        WalBuilder {
            opts,
            start: start.0,
            bytes: Vec::new(),
            prev_record: start.0.saturating_sub(1),
            overwrite_next_page: false,
            records: Vec::new(),
            seed: start.0 ^ 0x9E37_79B9_7F4A_7C15,
        }
    }

    /// The LSN of the next byte.
    pub fn position(&self) -> Lsn {
        Lsn(self.start + self.bytes.len() as u64)
    }

    /// The LSN of the first byte.
    pub fn start(&self) -> Lsn {
        Lsn(self.start)
    }

    /// Everything written so far.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Takes the bytes written so far.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// The bytes from `lsn` on (panics outside the stream).
    pub fn bytes_from(&self, lsn: Lsn) -> &[u8] {
        &self.bytes[(lsn.0 - self.start) as usize..]
    }

    /// The records written so far, in order.
    pub fn records(&self) -> &[SynthRecord] {
        &self.records
    }

    /// Changes the TLI written into the page headers from the next page on.
    pub fn set_timeline(&mut self, timeline: u32) {
        self.opts.timeline = timeline;
    }

    /// Writes a record with this resource manager, info and data (after the 24-byte
    /// header); returns its start.
    pub fn record(&mut self, rmid: u8, info: u8, data: &[u8]) -> Lsn {
        let record = self.assemble(rmid, info, data);
        let lsn = self.begin_record();
        self.put_record_bytes(&record, None);
        self.prev_record = lsn;
        self.records.push(SynthRecord {
            lsn: Lsn(lsn),
            tot_len: record.len() as u32,
            rmid,
            info,
            complete: true,
        });
        Lsn(lsn)
    }

    /// Writes a record of `tot_len` bytes (at least 24) of pseudo-random data with a
    /// heap resource manager id; returns its start.
    pub fn filler(&mut self, tot_len: u32) -> Lsn {
        let data = self.noise(tot_len as usize - RECORD_HEADER_LEN);
        self.record(10, 0x00, &data)
    }

    /// Writes an XLOG_SWITCH record, then the unused rest of its segment; returns the
    /// record's start.
    pub fn switch(&mut self) -> Lsn {
        let lsn = self.record(layout::RM_XLOG_ID, layout::XLOG_SWITCH, &[]);
        let segment = self.opts.segment_size.bytes();
        let end = self.position().0.div_ceil(segment) * segment;
        while self.position().0 < end {
            let pos = self.position().0;
            if pos % WAL_PAGE_SIZE == 0 {
                match self.opts.switch_padding {
                    SwitchPadding::Zeros => {
                        self.bytes.extend_from_slice(&[0; SHORT_PAGE_HEADER_LEN])
                    }
                    SwitchPadding::PageHeaders => self.put_page_header(0, false),
                }
            } else {
                let room = WAL_PAGE_SIZE - pos % WAL_PAGE_SIZE;
                self.bytes.resize(self.bytes.len() + room as usize, 0);
            }
        }
        lsn
    }

    /// Writes the head of a `tot_len`-byte record up to the end of the current page
    /// only, as if the server crashed before the rest reached disk; the next page gets
    /// `XLP_FIRST_IS_OVERWRITE_CONTRECORD` and the next record links back past the
    /// aborted one, as PostgreSQL does after crash recovery. Returns the aborted
    /// record's start. Panics if the record would fit on the page.
    pub fn aborted_record(&mut self, tot_len: u32) -> Lsn {
        let data = self.noise(tot_len as usize - RECORD_HEADER_LEN);
        let record = self.assemble(10, 0, &data);
        let lsn = self.begin_record();
        let room = (WAL_PAGE_SIZE - lsn % WAL_PAGE_SIZE) as usize;
        assert!(
            record.len() > room,
            "an aborted record must not fit on its page"
        );
        self.put_record_bytes(&record, Some(room));
        self.overwrite_next_page = true;
        self.records.push(SynthRecord {
            lsn: Lsn(lsn),
            tot_len,
            rmid: 10,
            info: 0,
            complete: false,
        });
        Lsn(lsn)
    }

    /// Writes never-used space (zeros, with page headers where pages start) up to
    /// `end`, as at the end of a WAL file.
    pub fn zeros_until(&mut self, end: Lsn) {
        while self.position().0 < end.0 {
            let pos = self.position().0;
            if pos % WAL_PAGE_SIZE == 0 {
                self.put_page_header(0, false);
            } else {
                let room = (WAL_PAGE_SIZE - pos % WAL_PAGE_SIZE).min(end.0 - pos);
                self.bytes.resize(self.bytes.len() + room as usize, 0);
            }
        }
    }

    /// Pseudo-random bytes (deterministic per builder).
    pub fn noise(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            // xorshift64*
            self.seed ^= self.seed >> 12;
            self.seed ^= self.seed << 25;
            self.seed ^= self.seed >> 27;
            out.extend_from_slice(&self.seed.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        out.truncate(len);
        out
    }

    fn assemble(&self, rmid: u8, info: u8, data: &[u8]) -> Vec<u8> {
        let tot_len = (RECORD_HEADER_LEN + data.len()) as u32;
        let mut record = Vec::with_capacity(tot_len as usize);
        record.extend_from_slice(&tot_len.to_le_bytes());
        record.extend_from_slice(&1234u32.to_le_bytes()); // xl_xid
        record.extend_from_slice(&self.prev_record.to_le_bytes());
        record.push(info);
        record.push(rmid);
        record.extend_from_slice(&[0, 0]);
        let crc = crc32c::crc32c_append(crc32c::crc32c(data), &record[..RECORD_CRC_OFFSET]);
        record.extend_from_slice(&crc.to_le_bytes());
        record.extend_from_slice(data);
        record
    }

    /// Pads to the record alignment and writes a page header if a page starts there;
    /// returns where the record starts.
    fn begin_record(&mut self) -> u64 {
        let pad = (RECORD_ALIGN - self.position().0 % RECORD_ALIGN) % RECORD_ALIGN;
        self.bytes.resize(self.bytes.len() + pad as usize, 0);
        if self.position().0 % WAL_PAGE_SIZE == 0 {
            self.put_page_header(0, false);
        }
        self.position().0
    }

    /// Writes a record's bytes (all, or the first `limit`), with continuation page
    /// headers where it crosses pages.
    fn put_record_bytes(&mut self, record: &[u8], limit: Option<usize>) {
        let end = limit.unwrap_or(record.len());
        let mut done = 0;
        while done < end {
            let pos = self.position().0;
            if pos % WAL_PAGE_SIZE == 0 {
                self.put_page_header((record.len() - done) as u32, true);
                continue;
            }
            let room = (WAL_PAGE_SIZE - pos % WAL_PAGE_SIZE) as usize;
            let take = room.min(end - done);
            self.bytes.extend_from_slice(&record[done..done + take]);
            done += take;
        }
    }

    fn put_page_header(&mut self, rem_len: u32, continuation: bool) {
        let page = self.position().0;
        let long = page % self.opts.segment_size.bytes() == 0;
        let mut info = XLP_BKP_REMOVABLE;
        if long {
            info |= XLP_LONG_HEADER;
        }
        if std::mem::take(&mut self.overwrite_next_page) {
            info |= XLP_FIRST_IS_OVERWRITE_CONTRECORD;
        } else if continuation {
            info |= XLP_FIRST_IS_CONTRECORD;
        }
        let rem_len = if info & XLP_FIRST_IS_CONTRECORD != 0 {
            rem_len
        } else {
            0
        };
        let mut header = Vec::with_capacity(LONG_PAGE_HEADER_LEN);
        header.extend_from_slice(&self.opts.magic.to_le_bytes());
        header.extend_from_slice(&info.to_le_bytes());
        header.extend_from_slice(&self.opts.timeline.to_le_bytes());
        header.extend_from_slice(&page.to_le_bytes());
        header.extend_from_slice(&rem_len.to_le_bytes());
        header.extend_from_slice(&[0; 4]);
        if long {
            header.extend_from_slice(&self.opts.system_id.to_le_bytes());
            header.extend_from_slice(&(self.opts.segment_size.bytes() as u32).to_le_bytes());
            header.extend_from_slice(&(WAL_PAGE_SIZE as u32).to_le_bytes());
        }
        self.bytes.extend_from_slice(&header);
    }
}
