//! The repository layout and its records (pure: names and JSON, no I/O).
//!
//! ```text
//! <prefix>/pgrepo.json                     the repository record: format, system identifier
//! <prefix>/backups/<label>/<archive>       archives as the server sent them
//!                                          (base.tar.zst, 16385.tar.zst, …) or compressed
//!                                          here (base.tar.zst) or as plain tar
//! <prefix>/backups/<label>/<archive>.index.json  where each frame of an archive
//!                                          stored here starts ([`ArchiveIndex`])
//! <prefix>/backups/<label>/backup_manifest the server's manifest, byte for byte
//! <prefix>/backups/<label>/backup.json     the commit record, written last
//! <prefix>/wal/<TLI>/…                     reserved for the streamed WAL archive
//! <prefix>/locks/…                         reserved for receiver leases
//! ```
//!
//! A backup exists only once its `backup.json` does: `list`, `restore` and retention
//! ignore a label without one (an interrupted upload). Labels are unique and never
//! reused. An incremental backup will name its parent in the commit record.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The repository record's object name.
pub const REPOSITORY_RECORD: &str = "pgrepo.json";
/// The directory of backups.
pub const BACKUPS_DIR: &str = "backups";
/// A backup's commit record.
pub const COMMIT_RECORD: &str = "backup.json";
/// A backup's manifest.
pub const MANIFEST: &str = "backup_manifest";
/// The format version of the records this code writes.
pub const FORMAT: u32 = 1;

/// `pgrepo.json`: which cluster the repository belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepositoryRecord {
    /// The layout's format version.
    pub format: u32,
    /// The PostgreSQL system identifier (as a string: it does not fit a JSON double).
    pub system_identifier: String,
    /// When the repository was created (RFC 3339).
    pub created_at: String,
}

/// How an archive is compressed in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoredCompression {
    /// Plain tar.
    None,
    /// gzip.
    Gzip,
    /// LZ4 frames.
    Lz4,
    /// zstd.
    Zstd,
}

impl StoredCompression {
    /// The file-name suffix.
    pub fn suffix(self) -> &'static str {
        match self {
            StoredCompression::None => "",
            StoredCompression::Gzip => ".gz",
            StoredCompression::Lz4 => ".lz4",
            StoredCompression::Zstd => ".zst",
        }
    }

    /// As a basebackup compression method (`None` for plain tar).
    pub fn method(self) -> Option<basebackup::CompressionMethod> {
        match self {
            StoredCompression::None => None,
            StoredCompression::Gzip => Some(basebackup::CompressionMethod::Gzip),
            StoredCompression::Lz4 => Some(basebackup::CompressionMethod::Lz4),
            StoredCompression::Zstd => Some(basebackup::CompressionMethod::Zstd),
        }
    }

    /// From a basebackup compression method.
    pub fn from_method(method: Option<basebackup::CompressionMethod>) -> StoredCompression {
        match method {
            None => StoredCompression::None,
            Some(basebackup::CompressionMethod::Gzip) => StoredCompression::Gzip,
            Some(basebackup::CompressionMethod::Lz4) => StoredCompression::Lz4,
            Some(basebackup::CompressionMethod::Zstd) => StoredCompression::Zstd,
        }
    }

    /// The name used in options and output.
    pub fn name(self) -> &'static str {
        match self {
            StoredCompression::None => "none",
            StoredCompression::Gzip => "gzip",
            StoredCompression::Lz4 => "lz4",
            StoredCompression::Zstd => "zstd",
        }
    }
}

/// One stored archive of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveRecord {
    /// The object's name inside the backup's directory (`base.tar.zst`).
    pub object: String,
    /// The tablespace OID, `None` for the base directory.
    pub tablespace_oid: Option<u32>,
    /// The tablespace's location on the source.
    pub location: Option<String>,
    /// How it is compressed.
    pub compression: StoredCompression,
    /// Who compressed it: `server`, `client` or `none`.
    pub compressed_by: String,
    /// The object's size.
    pub stored_bytes: u64,
    /// The size of the tar stream inside.
    pub tar_bytes: u64,
    /// The name of its frame index object (`base.tar.zst.index.json`), when the archive
    /// was cut into independently readable frames here; `None` for server-compressed
    /// archives and backups taken before indexes existed.
    #[serde(default)]
    pub index: Option<String>,
}

/// The suffix of an archive's index object.
pub const INDEX_SUFFIX: &str = ".index.json";

/// `<archive>.index.json`: where an archive stored by this tool can be entered. Each
/// frame is an independent compressed stream (or a plain slice of tar) that starts at a
/// tar entry's first header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveIndex {
    /// The layout's format version.
    pub format: u32,
    /// How each frame is compressed.
    pub compression: StoredCompression,
    /// The frames, in order; together they are the whole object.
    pub frames: Vec<IndexFrame>,
}

/// One frame of an [`ArchiveIndex`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexFrame {
    /// Where it starts in the stored object.
    pub stored_offset: u64,
    /// Its stored length.
    pub stored_len: u64,
    /// Where its tar data starts in the archive's tar stream.
    pub tar_offset: u64,
    /// Its length of tar data.
    pub tar_len: u64,
    /// The entries whose first header is in this frame.
    pub entries: Vec<IndexEntry>,
}

/// One tar entry of an [`IndexFrame`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    /// Its path as stored in the archive (lossy UTF-8).
    pub path: String,
    /// Its data size.
    pub size: u64,
    /// `file`, `dir`, `link` or `other`.
    pub kind: String,
}

impl ArchiveIndex {
    /// Parses a stored index and checks that its frames tile an object of `stored_bytes`
    /// holding `tar_bytes` of tar, naming the object on failure.
    pub fn from_json(
        bytes: &[u8],
        object: &str,
        stored_bytes: u64,
        tar_bytes: u64,
    ) -> Result<ArchiveIndex> {
        let index: ArchiveIndex = serde_json::from_slice(bytes)
            .map_err(|e| Error::verify(object, format!("not a valid archive index: {e}")))?;
        let (mut stored, mut tar) = (0u64, 0u64);
        for f in &index.frames {
            if f.stored_offset != stored || f.tar_offset != tar {
                return Err(Error::verify(object, "its frames do not tile the archive"));
            }
            stored = stored.saturating_add(f.stored_len);
            tar = tar.saturating_add(f.tar_len);
        }
        if stored != stored_bytes || tar != tar_bytes {
            return Err(Error::verify(
                object,
                format!(
                    "its frames cover {stored} stored and {tar} tar bytes, but the commit \
                     record says {stored_bytes} and {tar_bytes}"
                ),
            ));
        }
        Ok(index)
    }
}

/// How the WAL a backup needs is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalRecord {
    /// `included`: the segments are in the base archive's `pg_wal/`, checked record by
    /// record while uploading (the equivalent of `pg_basebackup -X fetch`).
    pub mode: String,
    /// Segment files included.
    pub segments: u64,
    /// Records whose CRC was verified.
    pub records_verified: u64,
}

/// `backup.json`: a committed, verified backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitRecord {
    /// The layout's format version.
    pub format: u32,
    /// The backup's label (its directory name).
    pub label: String,
    /// The PostgreSQL system identifier.
    pub system_identifier: String,
    /// The server's major version.
    pub server_major: u32,
    /// When the backup started and was committed (RFC 3339, UTC).
    pub started_at: String,
    /// When it was committed.
    pub finished_at: String,
    /// Where replay starts.
    pub start_lsn: String,
    /// The timeline at the start.
    pub start_timeline: u32,
    /// Where the backup becomes consistent.
    pub end_lsn: String,
    /// The timeline at the end.
    pub end_timeline: u32,
    /// The archives, base directory last (as the server sends them).
    pub archives: Vec<ArchiveRecord>,
    /// The manifest's size and SHA-256 (of the object's bytes).
    pub manifest_bytes: u64,
    /// The manifest object's SHA-256, hex.
    pub manifest_sha256: String,
    /// The manifest's per-file checksum algorithm.
    pub checksum_algorithm: String,
    /// Files in the backup (from the manifest).
    pub files: u64,
    /// The database's size: the sum of the manifest's file sizes.
    pub database_bytes: u64,
    /// Bytes stored: the archives plus the manifest.
    pub stored_bytes: u64,
    /// How its WAL is kept.
    pub wal: WalRecord,
    /// The backup an incremental backup depends on (none yet).
    pub parent: Option<String>,
}

impl CommitRecord {
    /// The start position.
    pub fn start(&self) -> Result<pgwire_repl::Lsn> {
        parse_lsn(&self.start_lsn, &self.label)
    }

    /// The end position.
    pub fn end(&self) -> Result<pgwire_repl::Lsn> {
        parse_lsn(&self.end_lsn, &self.label)
    }

    /// The system identifier.
    pub fn system_id(&self) -> Result<u64> {
        self.system_identifier.parse().map_err(|_| {
            Error::verify(
                format!("{BACKUPS_DIR}/{}/{COMMIT_RECORD}", self.label),
                "bad system_identifier",
            )
        })
    }

    /// The record's JSON, pretty-printed (what is stored).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default() + "\n"
    }

    /// Parses a stored record, naming the object on failure.
    pub fn from_json(bytes: &[u8], object: &str) -> Result<CommitRecord> {
        let record: CommitRecord = serde_json::from_slice(bytes)
            .map_err(|e| Error::verify(object, format!("not a valid commit record: {e}")))?;
        if record.format > FORMAT {
            return Err(Error::usage(
                format!(
                    "{object} has format {}, newer than this tool's {FORMAT}",
                    record.format
                ),
                "use a newer version of this tool",
            ));
        }
        Ok(record)
    }
}

fn parse_lsn(value: &str, label: &str) -> Result<pgwire_repl::Lsn> {
    value.parse().map_err(|_| {
        Error::verify(
            format!("{BACKUPS_DIR}/{label}/{COMMIT_RECORD}"),
            format!("bad LSN {value:?}"),
        )
    })
}

/// Checks a label: it becomes an object-name component, so only `[A-Za-z0-9._-]`, not
/// starting with a dot, at most 100 characters; `latest` is reserved.
///
/// ```
/// assert!(pgrepo::layout::check_label("20261130T101500Z").is_ok());
/// assert!(pgrepo::layout::check_label("../x").is_err());
/// assert!(pgrepo::layout::check_label("latest").is_err());
/// ```
pub fn check_label(label: &str) -> Result<()> {
    let ok = !label.is_empty()
        && label.len() <= 100
        && !label.starts_with('.')
        && label != "latest"
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::usage(
            format!("backup label {label:?} is not allowed"),
            "use letters, digits, '.', '_' and '-' only (not starting with '.', at most \
             100 characters; \"latest\" is reserved)",
        ))
    }
}

/// A UTC time, as labels and records use it.
pub type Timestamp = chrono::DateTime<chrono::Utc>;

/// The current UTC time.
pub fn now() -> Timestamp {
    chrono::Utc::now()
}

/// The default label: the UTC time, sortable (`20261130T101500Z`).
pub fn default_label(now: Timestamp) -> String {
    now.format("%Y%m%dT%H%M%SZ").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_records_round_trip() {
        let record = CommitRecord {
            format: FORMAT,
            label: "l".into(),
            system_identifier: "7712258631147479762".into(),
            server_major: 17,
            started_at: "2026-11-30T10:00:00Z".into(),
            finished_at: "2026-11-30T10:01:00Z".into(),
            start_lsn: "0/2000028".into(),
            start_timeline: 1,
            end_lsn: "0/2000100".into(),
            end_timeline: 1,
            archives: vec![],
            manifest_bytes: 10,
            manifest_sha256: "ab".into(),
            checksum_algorithm: "CRC32C".into(),
            files: 3,
            database_bytes: 100,
            stored_bytes: 50,
            wal: WalRecord {
                mode: "included".into(),
                segments: 1,
                records_verified: 5,
            },
            parent: None,
        };
        let parsed = CommitRecord::from_json(record.to_json().as_bytes(), "x").unwrap();
        assert_eq!(parsed, record);
        assert_eq!(parsed.system_id().unwrap(), 7712258631147479762);
        assert_eq!(parsed.end().unwrap(), pgwire_repl::Lsn(0x2000100));
        let newer = record.to_json().replace("\"format\": 1", "\"format\": 9");
        assert!(CommitRecord::from_json(newer.as_bytes(), "x").is_err());
        assert!(CommitRecord::from_json(b"{", "x").is_err());
    }

    #[test]
    fn archive_records_without_an_index_still_parse() {
        let old = r#"{"object":"base.tar.zst","tablespace_oid":null,"location":null,
            "compression":"zstd","compressed_by":"server","stored_bytes":5,"tar_bytes":9}"#;
        let record: ArchiveRecord = serde_json::from_str(old).unwrap();
        assert_eq!(record.index, None);
    }

    #[test]
    fn indexes_must_tile_the_archive() {
        let frame = |stored_offset, stored_len, tar_offset, tar_len| IndexFrame {
            stored_offset,
            stored_len,
            tar_offset,
            tar_len,
            entries: vec![],
        };
        let index = ArchiveIndex {
            format: FORMAT,
            compression: StoredCompression::Zstd,
            frames: vec![frame(0, 10, 0, 100), frame(10, 5, 100, 50)],
        };
        let json = serde_json::to_vec(&index).unwrap();
        assert_eq!(ArchiveIndex::from_json(&json, "x", 15, 150).unwrap(), index);
        assert!(ArchiveIndex::from_json(&json, "x", 16, 150).is_err());
        assert!(ArchiveIndex::from_json(&json, "x", 15, 149).is_err());
        assert!(ArchiveIndex::from_json(b"[", "x", 15, 150).is_err());
        let gap = ArchiveIndex {
            frames: vec![frame(0, 10, 0, 100), frame(11, 4, 100, 50)],
            ..index
        };
        let json = serde_json::to_vec(&gap).unwrap();
        assert!(ArchiveIndex::from_json(&json, "x", 15, 150).is_err());
    }
}
