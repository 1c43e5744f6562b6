//! A base backup into a custom sink that writes nothing: it hashes and counts what it
//! receives, and the totals are read from the sink afterwards (no shared state).
//!
//! ```sh
//! cargo run -p basebackup --example hashing_sink -- "host=primary user=replicator"
//! ```
//!
//! The connection string takes any libpq form (key=value or URI); PG* variables and
//! `~/.pgpass` apply. The role needs the REPLICATION attribute. The backup is verified
//! against the server's manifest as it streams, so the hashes printed are of data that
//! passed verification.
//!
//! The tests run [`hash_backup`] against real servers (`tests/real_server.rs`).

use std::collections::BTreeMap;
use std::process::ExitCode;

use basebackup::{
    ArchiveInfo, BackupInfo, BackupOptions, BackupResult, BackupSink, Bytes, Error, TarEvent,
};
use sha2::{Digest, Sha256};

/// What the sink saw of one archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveTotals {
    /// The archive's name as the server gave it (`base.tar`, `16385.tar.gz`…).
    pub name: String,
    /// Bytes as sent when the server compressed the archive (else 0).
    pub compressed_bytes: u64,
    /// SHA-256 of the compressed stream, when there was one.
    pub compressed_sha256: Option<String>,
    /// Uncompressed tar bytes.
    pub tar_bytes: u64,
    /// SHA-256 of the uncompressed tar stream.
    pub tar_sha256: String,
}

/// Everything the sink counted.
#[derive(Debug, Clone, Default)]
pub struct Totals {
    /// One entry per archive, in the order received.
    pub archives: Vec<ArchiveTotals>,
    /// Regular files.
    pub files: usize,
    /// Bytes in regular files.
    pub file_bytes: u64,
    /// Directories.
    pub directories: usize,
    /// Tablespace links.
    pub links: usize,
    /// SHA-256 of every file, by its path in the data directory (`pg_tblspc/<oid>/…` for
    /// tablespace files).
    pub file_sha256: BTreeMap<String, String>,
    /// SHA-256 of the backup manifest.
    pub manifest_sha256: Option<String>,
    /// Whether the backup was committed (verified and complete).
    pub committed: bool,
}

/// The sink: hashes each archive's stream and each file, counts entries.
#[derive(Default)]
pub struct HashingSink {
    totals: Totals,
    /// The current archive: its totals so far, its hashers and its path prefix.
    archive: Option<(ArchiveTotals, Sha256, Option<Sha256>, String)>,
    /// The current file: its path and hasher.
    file: Option<(String, Sha256)>,
}

impl HashingSink {
    /// What was counted.
    pub fn totals(&self) -> &Totals {
        &self.totals
    }

    fn current(
        &mut self,
    ) -> basebackup::Result<&mut (ArchiveTotals, Sha256, Option<Sha256>, String)> {
        self.archive.as_mut().ok_or_else(|| {
            Error::sink(
                "hashing sink: data arrived outside an archive",
                "report this as a bug in the basebackup crate",
            )
        })
    }
}

fn hex(digest: impl AsRef<[u8]>) -> String {
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

impl BackupSink for HashingSink {
    fn begin_backup(&mut self, info: &BackupInfo) -> basebackup::Result<()> {
        eprintln!(
            "backup of PostgreSQL {} starts at {} on timeline {}, {} archive(s)",
            info.server_major,
            info.start_lsn,
            info.timeline,
            info.tablespaces.len()
        );
        Ok(())
    }

    fn begin_archive(&mut self, archive: &ArchiveInfo) -> basebackup::Result<()> {
        let prefix = match archive.tablespace.oid {
            Some(oid) => format!("pg_tblspc/{oid}/"),
            None => String::new(),
        };
        let totals = ArchiveTotals {
            name: archive.name.clone(),
            compressed_bytes: 0,
            compressed_sha256: None,
            tar_bytes: 0,
            tar_sha256: String::new(),
        };
        let compressed = archive.compression.map(|_| Sha256::new());
        self.archive = Some((totals, Sha256::new(), compressed, prefix));
        Ok(())
    }

    fn compressed_bytes(&mut self, data: &Bytes) -> basebackup::Result<()> {
        let (totals, _, compressed, _) = self.current()?;
        totals.compressed_bytes += data.len() as u64;
        if let Some(hasher) = compressed {
            hasher.update(data);
        }
        Ok(())
    }

    fn archive_bytes(&mut self, data: &Bytes) -> basebackup::Result<()> {
        let (totals, tar, _, _) = self.current()?;
        totals.tar_bytes += data.len() as u64;
        tar.update(data);
        Ok(())
    }

    fn entry(&mut self, event: &TarEvent) -> basebackup::Result<()> {
        let prefix = self.current()?.3.clone();
        match event {
            TarEvent::Directory { .. } => self.totals.directories += 1,
            TarEvent::Symlink { .. } => self.totals.links += 1,
            TarEvent::File { path, .. } => {
                let path = format!("{prefix}{}", String::from_utf8_lossy(path));
                self.file = Some((path, Sha256::new()));
            }
            TarEvent::Data(data) => {
                if let Some((_, hasher)) = self.file.as_mut() {
                    hasher.update(data);
                }
                self.totals.file_bytes += data.len() as u64;
            }
            TarEvent::FileEnd => {
                if let Some((path, hasher)) = self.file.take() {
                    self.totals.files += 1;
                    self.totals.file_sha256.insert(path, hex(hasher.finalize()));
                }
            }
        }
        Ok(())
    }

    fn end_archive(&mut self, _trailer_present: bool) -> basebackup::Result<()> {
        if let Some((mut totals, tar, compressed, _)) = self.archive.take() {
            totals.tar_sha256 = hex(tar.finalize());
            totals.compressed_sha256 = compressed.map(|h| hex(h.finalize()));
            self.totals.archives.push(totals);
        }
        Ok(())
    }

    fn commit(&mut self, manifest: Option<&[u8]>) -> basebackup::Result<()> {
        self.totals.manifest_sha256 = manifest.map(|m| hex(Sha256::digest(m)));
        self.totals.committed = true;
        Ok(())
    }

    fn abort(&mut self, reason: &Error) {
        eprintln!("backup failed, totals discarded: {reason}");
        self.totals = Totals::default();
    }
}

/// Takes a base backup from the server `conninfo` names into a [`HashingSink`], and
/// returns the verified result with the sink's totals.
pub async fn hash_backup(
    conninfo: &str,
    options: BackupOptions,
) -> basebackup::Result<(BackupResult, Totals)> {
    let config = pgwire_repl::Config::parse_with_env(conninfo)?;
    let (result, sink) = basebackup::backup(&config, options, HashingSink::default()).await?;
    Ok((result, sink.totals().clone()))
}

#[tokio::main]
async fn main() -> ExitCode {
    let conninfo = std::env::args().nth(1).unwrap_or_default();
    match hash_backup(&conninfo, BackupOptions::default()).await {
        Ok((result, totals)) => {
            for a in &totals.archives {
                println!("{}: {} bytes, sha256 {}", a.name, a.tar_bytes, a.tar_sha256);
                if let Some(sum) = &a.compressed_sha256 {
                    println!("  as sent: {} bytes, sha256 {sum}", a.compressed_bytes);
                }
            }
            println!(
                "{} files ({} bytes), {} directories, {} tablespace links; manifest sha256 {}",
                totals.files,
                totals.file_bytes,
                totals.directories,
                totals.links,
                totals.manifest_sha256.as_deref().unwrap_or("(none)")
            );
            println!(
                "verified; consistent from {} to {} (timeline {})",
                result.start_lsn, result.end_lsn, result.end_timeline
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
