//! PostgreSQL 17+ incremental files: arbitrary bytes never panic the header parser, and
//! a chain planned from whatever parses never indexes outside its files.
#![no_main]

use basebackup::incremental::{plan_file, BlockSource, FilePlan, FileVersion, IncrementalHeader};
use libfuzzer_sys::fuzz_target;

const BLOCK: u32 = 8192;
// A small segment keeps block maps small while still exercising every check.
const SEGMENT_BLOCKS: u32 = 4096;

fuzz_target!(|data: &[u8]| {
    // Up to three versions, split at 0xFE bytes; a version of
    // fewer than 4 bytes is a whole file of its length in blocks.
    let mut versions = Vec::new();
    let mut lengths = Vec::new();
    for part in data.splitn(3, |b| *b == 0xFE) {
        if part.len() < 4 {
            let len = u64::from(part.first().copied().unwrap_or(0)) * u64::from(BLOCK);
            versions.push(FileVersion::Whole { len });
            lengths.push(len);
            break;
        }
        match IncrementalHeader::parse(part, BLOCK, SEGMENT_BLOCKS) {
            Ok(header) => {
                lengths.push(header.file_len(BLOCK));
                versions.push(FileVersion::Incremental(header));
            }
            Err(_) => return,
        }
    }
    match plan_file(&versions, BLOCK) {
        Ok(FilePlan::Blocks(sources)) => {
            for source in sources {
                if let BlockSource::Stored { version, offset } = source {
                    assert!(offset + u64::from(BLOCK) <= lengths[version]);
                }
            }
        }
        Ok(FilePlan::Copy { version }) => assert!(version < versions.len()),
        Err(_) => {}
    }
});
