//! On-disk WAL layout constants (`xlog_internal.h`, `xlogrecord.h`), the same for
//! PostgreSQL 13–18 except the page magic.

/// `XLOG_BLCKSZ`: every WAL page is 8192 bytes (the only size we support; it is checked
/// in each segment's long page header).
pub const WAL_PAGE_SIZE: u64 = 8192;

/// `SizeOfXLogShortPHD`: a page header on every page but a segment's first.
pub const SHORT_PAGE_HEADER_LEN: usize = 24;

/// `SizeOfXLogLongPHD`: the page header on a segment's first page.
pub const LONG_PAGE_HEADER_LEN: usize = 40;

/// `SizeOfXLogRecord`: the fixed record header.
pub const RECORD_HEADER_LEN: usize = 24;

/// `offsetof(XLogRecord, xl_crc)`: the CRC covers the header up to here, after the data.
pub const RECORD_CRC_OFFSET: usize = 20;

/// `MAXALIGN`: records start at multiples of 8.
pub const RECORD_ALIGN: u64 = 8;

/// `xlp_info`: the page starts with the continuation of a record.
pub const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
/// `xlp_info`: a long header (a segment's first page).
pub const XLP_LONG_HEADER: u16 = 0x0002;
/// `xlp_info`: full-page images on this page may be removed; informational.
pub const XLP_BKP_REMOVABLE: u16 = 0x0004;
/// `xlp_info`: the record that should continue here was lost in a crash and is
/// abandoned; a new record (`XLOG_OVERWRITE_CONTRECORD`) starts after this header.
/// Written by 13.5+ and 14.1+.
pub const XLP_FIRST_IS_OVERWRITE_CONTRECORD: u16 = 0x0008;
/// `XLP_ALL_FLAGS`.
pub const XLP_ALL_FLAGS: u16 = 0x000F;

/// `RM_XLOG_ID`: the resource manager of XLOG_SWITCH.
pub const RM_XLOG_ID: u8 = 0;
/// `XLOG_SWITCH` (in the high four bits of `xl_info`).
pub const XLOG_SWITCH: u8 = 0x40;
/// `XLR_INFO_MASK`: the low four bits of `xl_info` belong to the WAL machinery.
pub const XLR_INFO_MASK: u8 = 0x0F;

/// `XLogRecordMaxSize` (16+): the writer refuses longer records.
pub const MAX_RECORD_LEN_16: u32 = 1020 * 1024 * 1024;
/// `MaxAllocSize`: before 16 the reader's allocation limit was the only bound.
pub const MAX_RECORD_LEN_OLD: u32 = 0x3FFF_FFFF;

/// The page magic (`XLOG_PAGE_MAGIC`) each major version writes.
pub fn page_magic(major: u32) -> Option<u16> {
    match major {
        13 => Some(0xD106),
        14 => Some(0xD10D),
        15 => Some(0xD110),
        16 => Some(0xD113),
        17 => Some(0xD116),
        18 => Some(0xD118),
        _ => None,
    }
}

/// The major version whose page magic this is, if it is one of 13–18.
pub fn major_for_magic(magic: u16) -> Option<u32> {
    (13..=18).find(|&major| page_magic(major) == Some(magic))
}

/// The longest record a server of this major version can write.
pub fn max_record_len(major: u32) -> u32 {
    if major >= 16 {
        MAX_RECORD_LEN_16
    } else {
        MAX_RECORD_LEN_OLD
    }
}
