//! Tar-format backups (`-F t`, PostgreSQL 18): `base.tar` and one `<oid>.tar` per
//! tablespace, each possibly `.gz`, `.lz4` or `.zst`, read as streams; every member is
//! checked against the manifest (tablespace members as `pg_tblspc/<oid>/…`). `pg_wal.tar`
//! is left alone, as PostgreSQL's tool does.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use basebackup::manifest::{hex, FileChecksum};
use basebackup::tar::{TarEvent, TarParser};
use basebackup::{Bytes, ChecksumAlgorithm};

use super::{strerror, Stop, Verifier};

/// What kind of archive a file name is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Archive {
    /// `base.tar…`.
    Base,
    /// `<oid>.tar…`.
    Tablespace(String),
    /// `pg_wal.tar…`.
    Wal,
}

/// Splits `<stem>.tar[.gz|.lz4|.zst]` into the archive kind and its compression suffix.
pub(crate) fn classify(name: &str) -> Option<(Archive, &str)> {
    let (stem, suffix) = [".tar", ".tar.gz", ".tar.lz4", ".tar.zst"]
        .iter()
        .find_map(|s| name.strip_suffix(s).map(|stem| (stem, &s[4..])))?;
    let kind = match stem {
        "base" => Archive::Base,
        "pg_wal" => Archive::Wal,
        oid if !oid.is_empty() && oid.bytes().all(|b| b.is_ascii_digit()) => {
            Archive::Tablespace(oid.to_string())
        }
        _ => return None,
    };
    Some((kind, suffix))
}

/// True when `dir` looks like a tar-format backup (a `base.tar…` and no `PG_VERSION`).
pub(crate) fn looks_like_tar(dir: &Path) -> bool {
    !dir.join("PG_VERSION").exists()
        && ["base.tar", "base.tar.gz", "base.tar.lz4", "base.tar.zst"]
            .iter()
            .any(|n| dir.join(n).is_file())
}

struct Member {
    index: Option<usize>,
    checksum: Option<FileChecksum>,
    is_control: bool,
}

impl Verifier<'_> {
    /// Checks every archive in `dir`; returns the first 8 bytes of `global/pg_control`
    /// (the system identifier) when `base.tar` had it.
    pub(crate) fn verify_tar(&mut self, dir: &Path) -> Result<Option<[u8; 8]>, Stop> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => {
                return Err(self.fatal(format_args!(
                    "could not open directory \"{}\": {}",
                    dir.display(),
                    strerror(&e)
                )))
            }
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let mut control = None;
        for name in names {
            if self.ignored(name.as_bytes()) {
                continue;
            }
            let path = dir.join(&name);
            // As PostgreSQL 18's precheck: stat (following links), then only plain files.
            match std::fs::metadata(&path) {
                Err(e) => {
                    self.problem(format_args!(
                        "could not stat file or directory \"{name}\": {}",
                        strerror(&e)
                    ))?;
                    continue;
                }
                Ok(meta) if !meta.is_file() => {
                    self.problem(format_args!("file \"{name}\" is not a regular file"))?;
                    continue;
                }
                Ok(_) => {}
            }
            match classify(&name) {
                None => self.problem(format_args!(
                    "file \"{name}\" is not expected in a tar format backup"
                ))?,
                Some((Archive::Wal, _)) => {}
                Some((kind, suffix)) => {
                    let prefix = match &kind {
                        Archive::Tablespace(oid) => format!("pg_tblspc/{oid}/"),
                        _ => String::new(),
                    };
                    if let Some(found) =
                        self.verify_archive(&path, &name, suffix, &prefix, kind == Archive::Base)?
                    {
                        control = Some(found);
                    }
                }
            }
        }
        Ok(control)
    }

    fn verify_archive(
        &mut self,
        path: &Path,
        name: &str,
        suffix: &str,
        prefix: &str,
        base: bool,
    ) -> Result<Option<[u8; 8]>, Stop> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) => {
                self.problem(format_args!(
                    "could not open file \"{name}\": {}",
                    strerror(&e)
                ))?;
                return Ok(None);
            }
        };
        let mut reader: Box<dyn Read> = match suffix {
            ".gz" => Box::new(flate2::read::MultiGzDecoder::new(std::io::BufReader::new(
                file,
            ))),
            ".lz4" => Box::new(lz4_flex::frame::FrameDecoder::new(std::io::BufReader::new(
                file,
            ))),
            ".zst" => match zstd::Decoder::new(file) {
                Ok(d) => Box::new(d),
                Err(e) => {
                    self.problem(format_args!(
                        "could not decompress file \"{name}\": {}",
                        strerror(&e)
                    ))?;
                    return Ok(None);
                }
            },
            _ => Box::new(file),
        };
        let mut parser = TarParser::new(base);
        let mut buf = vec![0u8; 256 * 1024];
        let mut current: Option<Member> = None;
        let mut control = Vec::new();
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.problem(format_args!(
                        "could not read file \"{name}\": {}",
                        strerror(&e)
                    ))?;
                    return Ok(None);
                }
            };
            let mut events = Vec::new();
            let pushed = parser.push(Bytes::copy_from_slice(&buf[..n]), &mut |e| {
                events.push(e);
                Ok(())
            });
            for event in events {
                self.member_event(event, name, prefix, &mut current, &mut control)?;
            }
            if let Err(e) = pushed {
                self.problem(format_args!("could not read archive \"{name}\": {e}"))?;
                return Ok(None);
            }
        }
        if let Err(e) = parser.finish() {
            self.problem(format_args!("could not read archive \"{name}\": {e}"))?;
        }
        Ok(<[u8; 8]>::try_from(control.get(..8).unwrap_or_default()).ok())
    }

    fn member_event(
        &mut self,
        event: TarEvent,
        archive: &str,
        prefix: &str,
        current: &mut Option<Member>,
        control: &mut Vec<u8>,
    ) -> Result<(), Stop> {
        match event {
            TarEvent::File { path, size, .. } => {
                let mut rel = prefix.as_bytes().to_vec();
                rel.extend_from_slice(&path);
                let shown = String::from_utf8_lossy(&rel).into_owned();
                let is_control = rel == b"global/pg_control";
                if self.ignored(&rel) {
                    *current = Some(Member {
                        index: None,
                        checksum: None,
                        is_control,
                    });
                    return Ok(());
                }
                let Some(&i) = self.index.get(&rel) else {
                    *current = Some(Member {
                        index: None,
                        checksum: None,
                        is_control,
                    });
                    return self.problem(format_args!(
                        "file \"{shown}\" is present in archive \"{archive}\" but not in the manifest"
                    ));
                };
                self.files[i].matched = true;
                let want = self.files[i].entry.size;
                if want != size {
                    self.files[i].bad = true;
                    self.problem(format_args!(
                        "file \"{shown}\" has size {size} in archive \"{archive}\" but size {want} in the manifest"
                    ))?;
                }
                let algorithm = self.files[i].entry.algorithm;
                let checksum = (!self.files[i].bad
                    && !self.options.skip_checksums
                    && algorithm != ChecksumAlgorithm::None)
                    .then(|| FileChecksum::new(algorithm));
                *current = Some(Member {
                    index: Some(i),
                    checksum,
                    is_control,
                });
            }
            TarEvent::Data(data) => {
                if let Some(member) = current.as_mut() {
                    if let Some(sum) = member.checksum.as_mut() {
                        sum.update(&data);
                    }
                    if member.is_control && control.len() < 8 {
                        let take = (8 - control.len()).min(data.len());
                        control.extend_from_slice(&data[..take]);
                    }
                }
            }
            TarEvent::FileEnd => {
                if let Some(Member {
                    index: Some(i),
                    checksum: Some(sum),
                    ..
                }) = current.take()
                {
                    let computed = sum.finish().unwrap_or_default();
                    let entry = &self.files[i].entry;
                    let expected_len = basebackup::manifest::digest_len(entry.algorithm);
                    let shown = String::from_utf8_lossy(&entry.path).into_owned();
                    if entry.checksum.len() != expected_len {
                        let have = entry.checksum.len();
                        self.problem(format_args!(
                            "file \"{shown}\" in archive \"{archive}\" has checksum of length {have}, but expected {expected_len}"
                        ))?;
                    } else if hex(&entry.checksum) != computed {
                        self.problem(format_args!(
                            "checksum mismatch for file \"{shown}\" in archive \"{archive}\""
                        ))?;
                    }
                }
            }
            TarEvent::Directory { .. } | TarEvent::Symlink { .. } => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_names() {
        assert_eq!(classify("base.tar"), Some((Archive::Base, "")));
        assert_eq!(classify("base.tar.gz"), Some((Archive::Base, ".gz")));
        assert_eq!(
            classify("16385.tar.zst"),
            Some((Archive::Tablespace("16385".into()), ".zst"))
        );
        assert_eq!(classify("pg_wal.tar.lz4"), Some((Archive::Wal, ".lz4")));
        assert_eq!(classify("base.tar.bz2"), None);
        assert_eq!(classify("x.tar"), None);
        assert_eq!(classify(".tar"), None);
    }
}
