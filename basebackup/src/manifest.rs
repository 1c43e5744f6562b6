//! `backup_manifest`: parsing, its own SHA-256, and per-file checksums (pure).

use std::collections::HashMap;

use pgwire_repl::{Lsn, TimelineId};
use sha2::Digest;

use crate::command::ChecksumAlgorithm;
use crate::error::{Error, Result};
use crate::tar::display;

/// One file listed in the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestFile {
    /// The path relative to the data directory (raw bytes; tablespace files are
    /// `pg_tblspc/<oid>/…`).
    pub path: Vec<u8>,
    /// Size in bytes.
    pub size: u64,
    /// The checksum algorithm.
    pub algorithm: ChecksumAlgorithm,
    /// The checksum in lower-case hex, absent with `NONE`.
    pub checksum: Option<String>,
}

/// One `WAL-Ranges` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalRange {
    /// The timeline.
    pub timeline: TimelineId,
    /// Where the range starts.
    pub start: Lsn,
    /// Where it ends.
    pub end: Lsn,
}

/// A parsed and checksum-verified `backup_manifest`.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// 1 (13–16) or 2 (17+).
    pub version: u32,
    /// The cluster's system identifier (version 2 only).
    pub system_identifier: Option<u64>,
    /// The files, in the server's order.
    pub files: Vec<ManifestFile>,
    /// The WAL needed to make the backup consistent.
    pub wal_ranges: Vec<WalRange>,
}

impl Manifest {
    /// Parses a manifest and checks its `Manifest-Checksum` (SHA-256 over everything up to
    /// and including the penultimate newline).
    ///
    /// ```
    /// use sha2::Digest;
    /// let body = "{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [\n\
    ///     { \"Path\": \"PG_VERSION\", \"Size\": 3, \"Last-Modified\": \"2026-01-01 00:00:00 GMT\", \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"12345678\" }\n],\n\
    ///     \"WAL-Ranges\": [\n{ \"Timeline\": 1, \"Start-LSN\": \"0/2000028\", \"End-LSN\": \"0/2000100\" }\n],\n";
    /// let sum = hex::encode(sha2::Sha256::digest(body.as_bytes()));
    /// # mod hex { pub fn encode(b: impl AsRef<[u8]>) -> String { b.as_ref().iter().map(|x| format!("{x:02x}")).collect() } }
    /// let text = format!("{body}\"Manifest-Checksum\": \"{sum}\"}}\n");
    /// let m = basebackup::Manifest::parse(text.as_bytes()).unwrap();
    /// assert_eq!(m.files[0].size, 3);
    /// ```
    pub fn parse(bytes: &[u8]) -> Result<Manifest> {
        let bad =
            |what: &str| Error::verify("backup_manifest", format!("invalid manifest: {what}"));
        if bytes.last() != Some(&b'\n') {
            return Err(bad("the last line has no newline"));
        }
        let body = &bytes[..bytes.len() - 1];
        let penultimate = body
            .iter()
            .rposition(|&b| b == b'\n')
            .ok_or_else(|| bad("fewer than 2 lines"))?;
        let computed = hex(&sha2::Sha256::digest(&bytes[..=penultimate]));
        let json: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| bad(&format!("not JSON ({e})")))?;
        let obj = json.as_object().ok_or_else(|| bad("not a JSON object"))?;
        let version = obj
            .get("PostgreSQL-Backup-Manifest-Version")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| bad("no integer PostgreSQL-Backup-Manifest-Version"))?;
        if version != 1 && version != 2 {
            return Err(bad(&format!("unknown version {version}")));
        }
        let system_identifier = match obj.get("System-Identifier") {
            Some(v) => Some(
                v.as_u64()
                    .ok_or_else(|| bad("System-Identifier is not an integer"))?,
            ),
            None if version == 2 => return Err(bad("version 2 needs a System-Identifier")),
            None => None,
        };
        let stated = obj
            .get("Manifest-Checksum")
            .and_then(|v| v.as_str())
            .ok_or_else(|| bad("no Manifest-Checksum"))?;
        if !stated.eq_ignore_ascii_case(&computed) {
            return Err(Error::verify(
                "backup_manifest",
                format!(
                    "manifest checksum mismatch: it says {stated}, its contents give {computed}"
                ),
            ));
        }
        let mut files = Vec::new();
        let mut seen = HashMap::new();
        for f in obj
            .get("Files")
            .and_then(|v| v.as_array())
            .ok_or_else(|| bad("no Files array"))?
        {
            let f = f
                .as_object()
                .ok_or_else(|| bad("a file entry is not an object"))?;
            let path = match (f.get("Path"), f.get("Encoded-Path")) {
                (Some(p), None) => p
                    .as_str()
                    .ok_or_else(|| bad("Path is not a string"))?
                    .as_bytes()
                    .to_vec(),
                (None, Some(p)) => unhex(
                    p.as_str()
                        .ok_or_else(|| bad("Encoded-Path is not a string"))?,
                )
                .ok_or_else(|| bad("Encoded-Path is not hex"))?,
                _ => {
                    return Err(bad(
                        "a file entry needs exactly one of Path and Encoded-Path",
                    ))
                }
            };
            let size = f
                .get("Size")
                .and_then(|v| v.as_u64())
                .ok_or_else(|| bad(&format!("no integer Size for {}", display(&path))))?;
            let algorithm = match f.get("Checksum-Algorithm") {
                Some(a) => ChecksumAlgorithm::parse(a.as_str().unwrap_or("")).ok_or_else(|| {
                    bad(&format!(
                        "unknown checksum algorithm for {}",
                        display(&path)
                    ))
                })?,
                None => ChecksumAlgorithm::None,
            };
            let checksum = match f.get("Checksum") {
                Some(c) => {
                    let c = c.as_str().ok_or_else(|| bad("Checksum is not a string"))?;
                    if algorithm == ChecksumAlgorithm::None
                        || c.len() != 2 * digest_len(algorithm)
                        || unhex(c).is_none()
                    {
                        return Err(bad(&format!("bad checksum for {}", display(&path))));
                    }
                    Some(c.to_ascii_lowercase())
                }
                None if algorithm != ChecksumAlgorithm::None => {
                    return Err(bad(&format!(
                        "checksum algorithm without checksum for {}",
                        display(&path)
                    )))
                }
                None => None,
            };
            if seen.insert(path.clone(), ()).is_some() {
                return Err(bad(&format!("duplicate path {}", display(&path))));
            }
            files.push(ManifestFile {
                path,
                size,
                algorithm,
                checksum,
            });
        }
        let mut wal_ranges = Vec::new();
        for r in obj
            .get("WAL-Ranges")
            .and_then(|v| v.as_array())
            .ok_or_else(|| bad("no WAL-Ranges array"))?
        {
            let timeline = r
                .get("Timeline")
                .and_then(|v| v.as_u64())
                .and_then(|t| u32::try_from(t).ok())
                .ok_or_else(|| bad("a WAL range has no integer Timeline"))?;
            let lsn = |key: &str| -> Result<Lsn> {
                r.get(key)
                    .and_then(|v| v.as_str())
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| bad(&format!("a WAL range has no valid {key}")))
            };
            wal_ranges.push(WalRange {
                timeline: TimelineId(timeline),
                start: lsn("Start-LSN")?,
                end: lsn("End-LSN")?,
            });
        }
        Ok(Manifest {
            version: version as u32,
            system_identifier,
            files,
            wal_ranges,
        })
    }
}

/// The digest length in bytes.
pub fn digest_len(alg: ChecksumAlgorithm) -> usize {
    match alg {
        ChecksumAlgorithm::None => 0,
        ChecksumAlgorithm::Crc32c => 4,
        ChecksumAlgorithm::Sha224 => 28,
        ChecksumAlgorithm::Sha256 => 32,
        ChecksumAlgorithm::Sha384 => 48,
        ChecksumAlgorithm::Sha512 => 64,
    }
}

/// A running per-file checksum, computed over the same chunks that are written.
#[derive(Debug, Clone)]
pub enum FileChecksum {
    /// No checksum.
    None,
    /// CRC-32C running value.
    Crc32c(u32),
    /// SHA-224.
    Sha224(sha2::Sha224),
    /// SHA-256.
    Sha256(sha2::Sha256),
    /// SHA-384.
    Sha384(sha2::Sha384),
    /// SHA-512.
    Sha512(sha2::Sha512),
}

impl FileChecksum {
    /// A fresh checksum for `alg`.
    pub fn new(alg: ChecksumAlgorithm) -> FileChecksum {
        match alg {
            ChecksumAlgorithm::None => FileChecksum::None,
            ChecksumAlgorithm::Crc32c => FileChecksum::Crc32c(0),
            ChecksumAlgorithm::Sha224 => FileChecksum::Sha224(Default::default()),
            ChecksumAlgorithm::Sha256 => FileChecksum::Sha256(Default::default()),
            ChecksumAlgorithm::Sha384 => FileChecksum::Sha384(Default::default()),
            ChecksumAlgorithm::Sha512 => FileChecksum::Sha512(Default::default()),
        }
    }

    /// Adds bytes.
    pub fn update(&mut self, data: &[u8]) {
        match self {
            FileChecksum::None => {}
            FileChecksum::Crc32c(c) => *c = crc32c::crc32c_append(*c, data),
            FileChecksum::Sha224(h) => h.update(data),
            FileChecksum::Sha256(h) => h.update(data),
            FileChecksum::Sha384(h) => h.update(data),
            FileChecksum::Sha512(h) => h.update(data),
        }
    }

    /// The checksum as the manifest writes it (CRC-32C: little-endian bytes in hex, §6.3).
    ///
    /// ```
    /// use basebackup::manifest::FileChecksum;
    /// let mut c = FileChecksum::new(basebackup::ChecksumAlgorithm::Crc32c);
    /// c.update(b"123456789");
    /// assert_eq!(c.finish().as_deref(), Some("839206e3")); // CRC 0xE3069283
    /// ```
    pub fn finish(self) -> Option<String> {
        match self {
            FileChecksum::None => None,
            FileChecksum::Crc32c(c) => Some(hex(&c.to_le_bytes())),
            FileChecksum::Sha224(h) => Some(hex(&h.finalize())),
            FileChecksum::Sha256(h) => Some(hex(&h.finalize())),
            FileChecksum::Sha384(h) => Some(hex(&h.finalize())),
            FileChecksum::Sha512(h) => Some(hex(&h.finalize())),
        }
    }
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

/// What was received (or found on disk) for one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Size in bytes.
    pub size: u64,
    /// The checksum computed with the manifest's algorithm (if any).
    pub checksum: Option<String>,
}

/// Paths pg_verifybackup ignores by default (a path equal to one of these or beneath it).
pub const IGNORED: &[&str] = &[
    "backup_manifest",
    "pg_wal",
    "postgresql.auto.conf",
    "recovery.signal",
    "standby.signal",
];

/// True when pg_verifybackup would ignore `path`.
pub fn is_ignored(path: &[u8]) -> bool {
    IGNORED.iter().any(|i| {
        let i = i.as_bytes();
        path == i || (path.starts_with(i) && path.get(i.len()) == Some(&b'/'))
    })
}

/// Compares the received files with the manifest: every listed file present with the right
/// size and checksum, nothing unexpected (outside [`IGNORED`]). The first problem fails,
/// naming the file.
pub fn check_files(manifest: &Manifest, received: &HashMap<Vec<u8>, Received>) -> Result<()> {
    let mut listed = HashMap::with_capacity(manifest.files.len());
    for f in &manifest.files {
        listed.insert(f.path.as_slice(), f);
        let path = display(&f.path);
        let Some(got) = received.get(&f.path) else {
            if is_ignored(&f.path) {
                continue;
            }
            return Err(Error::verify(
                path,
                "listed in the backup manifest but missing from the backup",
            ));
        };
        if got.size != f.size {
            return Err(Error::verify(
                path,
                format!("size {} differs from the manifest's {}", got.size, f.size),
            ));
        }
        if let (Some(want), Some(have)) = (&f.checksum, &got.checksum) {
            if want != have {
                return Err(Error::verify(
                    path,
                    format!(
                        "{} checksum {have} differs from the manifest's {want}",
                        f.algorithm.name()
                    ),
                ));
            }
        } else if f.checksum.is_some() {
            return Err(Error::verify(
                path,
                "no checksum was computed for this file",
            ));
        }
    }
    let mut extra: Vec<&Vec<u8>> = received
        .keys()
        .filter(|p| !listed.contains_key(p.as_slice()) && !is_ignored(p))
        .collect();
    extra.sort();
    if let Some(p) = extra.first() {
        return Err(Error::verify(
            display(p),
            "present in the backup but not in the backup manifest",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    fn with_checksum(body: &str) -> String {
        let sum = hex(&sha2::Sha256::digest(body.as_bytes()));
        format!("{body}\"Manifest-Checksum\": \"{sum}\"}}\n")
    }

    const V1: &str = "{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [\n\
{ \"Path\": \"backup_label\", \"Size\": 201, \"Last-Modified\": \"2026-11-25 23:43:41 GMT\", \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"48469665\" },\n\
{ \"Encoded-Path\": \"464f4fe0e0\", \"Size\": 0, \"Last-Modified\": \"2026-11-25 23:43:41 GMT\" },\n\
{ \"Path\": \"global/pg_control\", \"Size\": 8192, \"Last-Modified\": \"2026-11-25 23:43:41 GMT\", \"Checksum-Algorithm\": \"crc32c\", \"Checksum\": \"43872087\" }\n\
],\n\"WAL-Ranges\": [\n{ \"Timeline\": 1, \"Start-LSN\": \"0/4000028\", \"End-LSN\": \"0/4000100\" }\n],\n";

    #[test]
    fn version_1() {
        let m = Manifest::parse(with_checksum(V1).as_bytes()).unwrap();
        assert_eq!(m.version, 1);
        assert_eq!(m.system_identifier, None);
        assert_eq!(m.files.len(), 3);
        assert_eq!(m.files[1].path, b"FOO\xe0\xe0".to_vec());
        assert_eq!(m.files[1].checksum, None);
        assert_eq!(m.files[2].algorithm, ChecksumAlgorithm::Crc32c);
        assert_eq!(m.wal_ranges[0].start, Lsn(0x4000028));
    }

    #[test]
    fn version_2_needs_system_identifier() {
        let v2 = V1.replace(
            "Version\": 1,\n",
            "Version\": 2,\n\"System-Identifier\": 7712258631147479762,\n",
        );
        let m = Manifest::parse(with_checksum(&v2).as_bytes()).unwrap();
        assert_eq!(m.system_identifier, Some(7712258631147479762));
        let no_id = V1.replace("Version\": 1,", "Version\": 2,");
        assert!(Manifest::parse(with_checksum(&no_id).as_bytes()).is_err());
    }

    #[test]
    fn bad_manifests() {
        let good = with_checksum(V1);
        let extra_newline = good.replacen("],\n\"WAL", "],\n\n\"WAL", 1);
        let e = Manifest::parse(extra_newline.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("manifest checksum mismatch"), "{e}");
        assert_eq!(e.kind(), ErrorKind::Verify);
        assert!(Manifest::parse(&good.as_bytes()[..good.len() - 1]).is_err());
        assert!(Manifest::parse(
            with_checksum(&V1.replace("Version\": 1", "Version\": 3")).as_bytes()
        )
        .is_err());
        let dup = V1.replace("464f4fe0e0", "6261636b75705f6c6162656c");
        assert!(Manifest::parse(with_checksum(&dup).as_bytes())
            .unwrap_err()
            .to_string()
            .contains("duplicate"));
        let badsum = V1.replace("48469665", "4846966");
        assert!(Manifest::parse(with_checksum(&badsum).as_bytes()).is_err());
    }

    #[test]
    fn check_files_names_the_file() {
        let m = Manifest::parse(with_checksum(V1).as_bytes()).unwrap();
        let mut got: HashMap<Vec<u8>, Received> = HashMap::new();
        got.insert(
            b"backup_label".to_vec(),
            Received {
                size: 201,
                checksum: Some("48469665".into()),
            },
        );
        got.insert(
            b"FOO\xe0\xe0".to_vec(),
            Received {
                size: 0,
                checksum: None,
            },
        );
        got.insert(
            b"global/pg_control".to_vec(),
            Received {
                size: 8192,
                checksum: Some("43872087".into()),
            },
        );
        got.insert(
            b"pg_wal/000000010000000000000004".to_vec(),
            Received {
                size: 1,
                checksum: None,
            },
        );
        check_files(&m, &got).unwrap();
        got.insert(
            b"extra".to_vec(),
            Received {
                size: 1,
                checksum: None,
            },
        );
        assert_eq!(check_files(&m, &got).unwrap_err().path(), Some("extra"));
        got.remove(b"extra".as_slice());
        got.insert(
            b"global/pg_control".to_vec(),
            Received {
                size: 8192,
                checksum: Some("00000000".into()),
            },
        );
        let e = check_files(&m, &got).unwrap_err();
        assert_eq!(e.path(), Some("global/pg_control"));
        got.remove(b"global/pg_control".as_slice());
        assert!(check_files(&m, &got)
            .unwrap_err()
            .to_string()
            .contains("missing"));
    }
}
