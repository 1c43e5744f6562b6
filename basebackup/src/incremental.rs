//! PostgreSQL 17+ incremental files (`INCREMENTAL.<name>`) and how a chain of backups
//! combines into whole files (pure: no I/O; driven by fuzzers and property tests).
//!
//! An incremental relation file, as `BASE_BACKUP (INCREMENTAL)` sends it, is a header of
//! 32-bit integers in the server's byte order (the magic `0xd3ae1f0d`, the number of
//! blocks, the truncation length in blocks, then the block numbers relative to the
//! 1 GB segment, ascending), padded with zeros to a block boundary when it holds blocks,
//! then the blocks themselves in the order of their numbers.
//!
//! To rebuild a file, the newest backup decides the length; each block comes from the
//! newest backup that holds it, looking only at blocks below the newest truncation
//! length in older backups, down to the first backup holding the file whole. Blocks no
//! backup holds are zeros (extended but never written, as pg_combinebackup assumes).

use std::fmt;

/// The magic number at the start of an incremental file.
pub const INCREMENTAL_MAGIC: u32 = 0xd3ae_1f0d;

/// The prefix of an incremental file's name.
pub const INCREMENTAL_PREFIX: &str = "INCREMENTAL.";

/// Blocks per relation segment of a default build (1 GB of 8 KiB blocks).
pub const DEFAULT_SEGMENT_BLOCKS: u32 = 131_072;

/// The default block size.
pub const DEFAULT_BLOCK_SIZE: u32 = 8192;

/// The parsed header of an incremental file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncrementalHeader {
    /// The file's length in blocks when the backup was taken, as far as older backups
    /// matter: blocks at or past it are not taken from older backups.
    pub truncation_block_length: u32,
    /// The blocks stored in the file, ascending.
    pub block_numbers: Vec<u32>,
    /// Where the first block starts (the header, padded to a block boundary when there
    /// are blocks).
    pub data_offset: u64,
    /// Whether the integers are big-endian (a big-endian server).
    pub big_endian: bool,
}

/// Why bytes are not a valid incremental file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IncrementalError {
    /// More bytes are needed to read the header: at least this many in all.
    Truncated {
        /// The bytes needed.
        needed: u64,
    },
    /// The first four bytes are not the magic number.
    BadMagic(u32),
    /// The block count exceeds a segment.
    TooManyBlocks(u32),
    /// The truncation length exceeds a segment.
    TruncationTooLong(u32),
    /// A block number outside the segment.
    BlockOutOfRange(u32),
    /// Block numbers not strictly ascending.
    Unsorted {
        /// The block before.
        previous: u32,
        /// The block that does not follow it.
        block: u32,
    },
    /// The header padding holds something other than zeros.
    BadPadding,
    /// The file's length disagrees with its header.
    WrongLength {
        /// The length the header implies.
        expected: u64,
        /// The actual length.
        actual: u64,
    },
}

impl fmt::Display for IncrementalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IncrementalError::Truncated { needed } => {
                write!(
                    f,
                    "the incremental header is cut short (it needs {needed} bytes)"
                )
            }
            IncrementalError::BadMagic(magic) => write!(
                f,
                "bad incremental magic number 0x{magic:08x} (expected 0x{INCREMENTAL_MAGIC:08x})"
            ),
            IncrementalError::TooManyBlocks(n) => {
                write!(f, "block count {n} exceeds a relation segment")
            }
            IncrementalError::TruncationTooLong(n) => {
                write!(f, "truncation length {n} blocks exceeds a relation segment")
            }
            IncrementalError::BlockOutOfRange(b) => {
                write!(f, "block number {b} lies outside a relation segment")
            }
            IncrementalError::Unsorted { previous, block } => {
                write!(f, "block {block} follows block {previous}: not ascending")
            }
            IncrementalError::BadPadding => f.write_str("the header padding is not zeros"),
            IncrementalError::WrongLength { expected, actual } => write!(
                f,
                "the file holds {actual} bytes, its header says {expected}"
            ),
        }
    }
}

impl std::error::Error for IncrementalError {}

impl IncrementalHeader {
    /// Parses the header at the start of `bytes` (which may hold more, or the whole
    /// file). `block_size` and `segment_blocks` are the server's (8192 and 131072 by
    /// default).
    ///
    /// ```
    /// use basebackup::incremental::{IncrementalHeader, INCREMENTAL_MAGIC};
    /// let mut file = Vec::new();
    /// for word in [INCREMENTAL_MAGIC, 1, 10, 7] {
    ///     file.extend_from_slice(&word.to_le_bytes());
    /// }
    /// file.resize(8192, 0);
    /// file.extend_from_slice(&[0xAB; 8192]);
    /// let header = IncrementalHeader::parse(&file, 8192, 131072).unwrap();
    /// assert_eq!(header.block_numbers, vec![7]);
    /// assert_eq!(header.data_offset, 8192);
    /// assert_eq!(header.file_len(8192), file.len() as u64);
    /// ```
    pub fn parse(
        bytes: &[u8],
        block_size: u32,
        segment_blocks: u32,
    ) -> Result<IncrementalHeader, IncrementalError> {
        let word_at = |index: usize, big_endian: bool| -> Option<u32> {
            let raw: [u8; 4] = bytes.get(index * 4..index * 4 + 4)?.try_into().ok()?;
            Some(if big_endian {
                u32::from_be_bytes(raw)
            } else {
                u32::from_le_bytes(raw)
            })
        };
        let Some(magic) = word_at(0, false) else {
            return Err(IncrementalError::Truncated { needed: 12 });
        };
        let big_endian = if magic == INCREMENTAL_MAGIC {
            false
        } else if magic.swap_bytes() == INCREMENTAL_MAGIC {
            true
        } else {
            return Err(IncrementalError::BadMagic(magic));
        };
        let (Some(num_blocks), Some(truncation_block_length)) =
            (word_at(1, big_endian), word_at(2, big_endian))
        else {
            return Err(IncrementalError::Truncated { needed: 12 });
        };
        if num_blocks > segment_blocks {
            return Err(IncrementalError::TooManyBlocks(num_blocks));
        }
        if truncation_block_length > segment_blocks {
            return Err(IncrementalError::TruncationTooLong(truncation_block_length));
        }
        let header_len = 12 + 4 * u64::from(num_blocks);
        let block_size = u64::from(block_size.max(1));
        let data_offset = if num_blocks > 0 {
            header_len.div_ceil(block_size) * block_size
        } else {
            header_len
        };
        if (bytes.len() as u64) < data_offset {
            return Err(IncrementalError::Truncated {
                needed: data_offset,
            });
        }
        let mut block_numbers = Vec::with_capacity(num_blocks as usize);
        for index in 0..num_blocks as usize {
            let block = word_at(3 + index, big_endian).unwrap_or(u32::MAX);
            if block >= segment_blocks {
                return Err(IncrementalError::BlockOutOfRange(block));
            }
            if let Some(&previous) = block_numbers.last() {
                if block <= previous {
                    return Err(IncrementalError::Unsorted { previous, block });
                }
            }
            block_numbers.push(block);
        }
        if bytes[header_len as usize..data_offset as usize]
            .iter()
            .any(|b| *b != 0)
        {
            return Err(IncrementalError::BadPadding);
        }
        Ok(IncrementalHeader {
            truncation_block_length,
            block_numbers,
            data_offset,
            big_endian,
        })
    }

    /// The length of the whole file the header describes.
    pub fn file_len(&self, block_size: u32) -> u64 {
        self.data_offset + self.block_numbers.len() as u64 * u64::from(block_size)
    }

    /// Checks the file's length against the header.
    pub fn check_len(&self, actual: u64, block_size: u32) -> Result<(), IncrementalError> {
        let expected = self.file_len(block_size);
        if expected == actual {
            Ok(())
        } else {
            Err(IncrementalError::WrongLength { expected, actual })
        }
    }

    /// The length in blocks of the file rebuilt from this one: the truncation length,
    /// extended to hold every block it stores.
    pub fn rebuilt_blocks(&self) -> u32 {
        self.block_numbers
            .last()
            .map_or(self.truncation_block_length, |last| {
                self.truncation_block_length.max(last + 1)
            })
    }

    /// Where block `block` is stored in the file, if it is.
    pub fn offset_of(&self, block: u32, block_size: u32) -> Option<u64> {
        self.block_numbers
            .binary_search(&block)
            .ok()
            .map(|index| self.data_offset + index as u64 * u64::from(block_size))
    }
}

/// The name of the whole file an incremental file stands for, when `path` names an
/// incremental file (`base/5/INCREMENTAL.16384` → `base/5/16384`).
///
/// ```
/// use basebackup::incremental::whole_file_name;
/// assert_eq!(whole_file_name("base/5/INCREMENTAL.16384_fsm").as_deref(), Some("base/5/16384_fsm"));
/// assert_eq!(whole_file_name("base/5/16384"), None);
/// ```
pub fn whole_file_name(path: &str) -> Option<String> {
    let (dir, name) = match path.rsplit_once('/') {
        Some((dir, name)) => (Some(dir), name),
        None => (None, path),
    };
    let bare = name.strip_prefix(INCREMENTAL_PREFIX)?;
    if bare.is_empty() {
        return None;
    }
    Some(match dir {
        Some(dir) => format!("{dir}/{bare}"),
        None => bare.to_string(),
    })
}

/// One backup's version of a file, as the chain planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileVersion {
    /// The file whole, `len` bytes.
    Whole {
        /// Its length in bytes.
        len: u64,
    },
    /// An incremental file.
    Incremental(IncrementalHeader),
}

/// Where one block of a rebuilt file comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockSource {
    /// Bytes `offset..offset + block_size` of the file in backup `version` (an index
    /// into the versions given to [`plan_file`], newest first).
    Stored {
        /// Which version (0 = newest).
        version: usize,
        /// The offset inside that version's file.
        offset: u64,
    },
    /// A block no backup holds: zeros.
    Zero,
}

/// How a file is rebuilt from a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilePlan {
    /// Version `version` is exactly the result: copy it whole.
    Copy {
        /// Which version (0 = newest).
        version: usize,
    },
    /// Block by block.
    Blocks(Vec<BlockSource>),
}

/// Why a chain cannot rebuild a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanError {
    /// Every version is incremental: the chain does not start with the file whole.
    NoWholeVersion,
    /// No versions were given.
    Empty,
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlanError::NoWholeVersion => f.write_str(
                "every backup in the chain holds this file as incremental: none holds it whole",
            ),
            PlanError::Empty => f.write_str("no backup holds this file"),
        }
    }
}

impl std::error::Error for PlanError {}

/// Plans a file's reconstruction from its versions, newest first, ending at (or before)
/// the first whole version; versions after a whole one are ignored. The newest version
/// decides the length.
///
/// ```
/// use basebackup::incremental::{plan_file, BlockSource, FilePlan, FileVersion, IncrementalHeader};
/// let newest = IncrementalHeader { truncation_block_length: 3, block_numbers: vec![1], data_offset: 8192, big_endian: false };
/// let plan = plan_file(&[FileVersion::Incremental(newest), FileVersion::Whole { len: 3 * 8192 }], 8192).unwrap();
/// assert_eq!(plan, FilePlan::Blocks(vec![
///     BlockSource::Stored { version: 1, offset: 0 },
///     BlockSource::Stored { version: 0, offset: 8192 },
///     BlockSource::Stored { version: 1, offset: 2 * 8192 },
/// ]));
/// ```
pub fn plan_file(versions: &[FileVersion], block_size: u32) -> Result<FilePlan, PlanError> {
    let bs = u64::from(block_size);
    let newest = match versions.first() {
        None => return Err(PlanError::Empty),
        Some(FileVersion::Whole { .. }) => return Ok(FilePlan::Copy { version: 0 }),
        Some(FileVersion::Incremental(header)) => header,
    };
    let length = newest.rebuilt_blocks() as usize;
    let limit = newest.truncation_block_length;
    let mut sources: Vec<Option<BlockSource>> = vec![None; length];
    let mut copy_possible = newest.block_numbers.is_empty();
    for (index, block) in newest.block_numbers.iter().enumerate() {
        sources[*block as usize] = Some(BlockSource::Stored {
            version: 0,
            offset: newest.data_offset + index as u64 * bs,
        });
    }
    for (version, older) in versions.iter().enumerate().skip(1) {
        match older {
            FileVersion::Whole { len } => {
                let blocks = len / bs;
                for block in 0..u64::from(limit).min(blocks) {
                    let slot = &mut sources[block as usize];
                    if slot.is_none() {
                        *slot = Some(BlockSource::Stored {
                            version,
                            offset: block * bs,
                        });
                    }
                }
                if copy_possible && u64::from(limit) * bs == *len {
                    return Ok(FilePlan::Copy { version });
                }
                return Ok(FilePlan::Blocks(
                    sources
                        .into_iter()
                        .map(|s| s.unwrap_or(BlockSource::Zero))
                        .collect(),
                ));
            }
            FileVersion::Incremental(header) => {
                for (index, block) in header.block_numbers.iter().enumerate() {
                    if *block < limit && sources[*block as usize].is_none() {
                        sources[*block as usize] = Some(BlockSource::Stored {
                            version,
                            offset: header.data_offset + index as u64 * bs,
                        });
                        copy_possible = false;
                    }
                }
            }
        }
    }
    Err(PlanError::NoWholeVersion)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BS: u32 = 8192;

    fn file(blocks: &[u32], truncation: u32, big_endian: bool) -> Vec<u8> {
        let word = |w: u32| {
            if big_endian {
                w.to_be_bytes()
            } else {
                w.to_le_bytes()
            }
        };
        let mut out = Vec::new();
        for w in [INCREMENTAL_MAGIC, blocks.len() as u32, truncation] {
            out.extend_from_slice(&word(w));
        }
        for b in blocks {
            out.extend_from_slice(&word(*b));
        }
        if !blocks.is_empty() {
            out.resize(out.len().div_ceil(BS as usize) * BS as usize, 0);
        }
        for b in blocks {
            out.extend(std::iter::repeat_n(*b as u8, BS as usize));
        }
        out
    }

    #[test]
    fn parses_both_byte_orders_and_checks_everything() {
        for big in [false, true] {
            let bytes = file(&[0, 5, 9], 12, big);
            let header = IncrementalHeader::parse(&bytes, BS, DEFAULT_SEGMENT_BLOCKS).unwrap();
            assert_eq!(header.block_numbers, vec![0, 5, 9]);
            assert_eq!(header.big_endian, big);
            header.check_len(bytes.len() as u64, BS).unwrap();
            assert_eq!(header.offset_of(5, BS), Some(8192 + 8192));
            assert_eq!(header.rebuilt_blocks(), 12);
        }
        let empty = file(&[], 0, false);
        let header = IncrementalHeader::parse(&empty, BS, DEFAULT_SEGMENT_BLOCKS).unwrap();
        assert_eq!(header.data_offset, 12);
        header.check_len(12, BS).unwrap();
        let parse = |b: &[u8]| IncrementalHeader::parse(b, BS, DEFAULT_SEGMENT_BLOCKS);
        assert_eq!(
            parse(&[1, 2]),
            Err(IncrementalError::Truncated { needed: 12 })
        );
        let mut bad = file(&[1], 2, false);
        bad[0] ^= 1;
        assert!(matches!(parse(&bad), Err(IncrementalError::BadMagic(_))));
        assert_eq!(
            parse(&file(&[3, 3], 4, false)),
            Err(IncrementalError::Unsorted {
                previous: 3,
                block: 3
            })
        );
        assert_eq!(
            parse(&file(&[DEFAULT_SEGMENT_BLOCKS], 0, false)),
            Err(IncrementalError::BlockOutOfRange(DEFAULT_SEGMENT_BLOCKS))
        );
        let mut padded = file(&[1], 2, false);
        padded[100] = 7;
        assert_eq!(parse(&padded), Err(IncrementalError::BadPadding));
        assert_eq!(
            parse(&file(&[1], 2, false)[..100]),
            Err(IncrementalError::Truncated { needed: 8192 })
        );
        assert!(parse(&file(&[1], 2, false))
            .unwrap()
            .check_len(9000, BS)
            .is_err());
    }

    #[test]
    fn plans_like_pg_combinebackup() {
        let inc = |blocks: &[u32], truncation| {
            FileVersion::Incremental(
                IncrementalHeader::parse(
                    &file(blocks, truncation, false),
                    BS,
                    DEFAULT_SEGMENT_BLOCKS,
                )
                .unwrap(),
            )
        };
        let bs = u64::from(BS);
        // Untouched since the full backup, same length: copied whole.
        assert_eq!(
            plan_file(&[inc(&[], 4), FileVersion::Whole { len: 4 * bs }], BS),
            Ok(FilePlan::Copy { version: 1 })
        );
        // Truncated since: blocks from the full backup up to the new length only.
        assert_eq!(
            plan_file(&[inc(&[], 2), FileVersion::Whole { len: 4 * bs }], BS),
            Ok(FilePlan::Blocks(vec![
                BlockSource::Stored {
                    version: 1,
                    offset: 0
                },
                BlockSource::Stored {
                    version: 1,
                    offset: bs
                },
            ]))
        );
        // Three levels: the newest wins, an older incremental fills what it holds below
        // the newest truncation length, the full backup the rest; a block past the
        // full file's end that nobody holds is zeros.
        let plan = plan_file(
            &[
                inc(&[1], 5),
                inc(&[1, 2, 6], 7),
                FileVersion::Whole { len: 3 * bs },
            ],
            BS,
        )
        .unwrap();
        assert_eq!(
            plan,
            FilePlan::Blocks(vec![
                BlockSource::Stored {
                    version: 2,
                    offset: 0
                },
                BlockSource::Stored {
                    version: 0,
                    offset: bs
                },
                BlockSource::Stored {
                    version: 1,
                    offset: 2 * bs
                },
                BlockSource::Zero,
                BlockSource::Zero,
            ])
        );
        assert_eq!(
            plan_file(&[inc(&[1], 2)], BS),
            Err(PlanError::NoWholeVersion)
        );
        assert_eq!(plan_file(&[], BS), Err(PlanError::Empty));
    }

    proptest! {
        #[test]
        fn parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..20000)) {
            let _ = IncrementalHeader::parse(&bytes, BS, DEFAULT_SEGMENT_BLOCKS);
        }

        #[test]
        fn written_files_parse_back(mut blocks in proptest::collection::btree_set(0u32..2000, 0..40), extra in 0u32..50, big in any::<bool>()) {
            let blocks: Vec<u32> = std::mem::take(&mut blocks).into_iter().collect();
            let truncation = blocks.last().map_or(0, |b| b + 1) + extra;
            let bytes = file(&blocks, truncation, big);
            let header = IncrementalHeader::parse(&bytes, BS, DEFAULT_SEGMENT_BLOCKS).unwrap();
            prop_assert_eq!(&header.block_numbers, &blocks);
            prop_assert!(header.check_len(bytes.len() as u64, BS).is_ok());
            for (index, block) in blocks.iter().enumerate() {
                let offset = header.offset_of(*block, BS).unwrap() as usize;
                prop_assert_eq!(offset, header.data_offset as usize + index * BS as usize);
                prop_assert!(bytes[offset..offset + BS as usize].iter().all(|b| *b == *block as u8));
            }
        }

        #[test]
        fn a_plan_takes_each_block_from_the_newest_version_holding_it(
            levels in proptest::collection::vec((proptest::collection::btree_set(0u32..64, 0..12), 0u32..70), 1..4),
            full_blocks in 0u64..70,
        ) {
            let bs = u64::from(BS);
            let mut versions: Vec<FileVersion> = levels.iter().map(|(blocks, truncation)| {
                let blocks: Vec<u32> = blocks.iter().copied().collect();
                FileVersion::Incremental(IncrementalHeader::parse(&file(&blocks, *truncation, false), BS, DEFAULT_SEGMENT_BLOCKS).unwrap())
            }).collect();
            versions.push(FileVersion::Whole { len: full_blocks * bs });
            let FileVersion::Incremental(newest) = &versions[0] else { unreachable!() };
            let length = newest.rebuilt_blocks();
            let limit = newest.truncation_block_length;
            match plan_file(&versions, BS).unwrap() {
                FilePlan::Copy { version } => {
                    prop_assert_eq!(version, versions.len() - 1);
                    prop_assert_eq!(u64::from(limit) * bs, full_blocks * bs);
                    prop_assert!(newest.block_numbers.is_empty());
                    for v in &versions[1..versions.len() - 1] {
                        let FileVersion::Incremental(h) = v else { unreachable!() };
                        prop_assert!(h.block_numbers.iter().all(|b| *b >= limit));
                    }
                }
                FilePlan::Blocks(sources) => {
                    prop_assert_eq!(sources.len(), length as usize);
                    for (block, source) in sources.iter().enumerate() {
                        let block = block as u32;
                        // The expected source: the newest version holding the block (only
                        // the newest counts at or past its truncation length).
                        let mut expected = BlockSource::Zero;
                        for (version, v) in versions.iter().enumerate() {
                            if version > 0 && block >= limit { break; }
                            match v {
                                FileVersion::Incremental(h) => if let Some(offset) = h.offset_of(block, BS) {
                                    expected = BlockSource::Stored { version, offset };
                                    break;
                                },
                                FileVersion::Whole { len } => {
                                    if u64::from(block) < len / bs {
                                        expected = BlockSource::Stored { version, offset: u64::from(block) * bs };
                                    }
                                    break;
                                }
                            }
                        }
                        prop_assert_eq!(*source, expected, "block {}", block);
                    }
                }
            }
        }
    }
}
