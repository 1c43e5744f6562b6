//! Verifying an existing plain-format backup, like `pg_verifybackup`.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use pgwire_repl::{Lsn, WalSegmentSize};

use crate::error::{Error, Result};
use crate::manifest::{check_files, is_ignored, FileChecksum, Manifest, Received};
use crate::tar::display;

/// Options for [`verify_backup_with`].
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Skip the per-file checksums (sizes are still checked), like `pg_verifybackup -s`.
    pub skip_checksums: bool,
    /// Skip the WAL check, like `pg_verifybackup -n`.
    pub skip_wal: bool,
    /// Where the WAL is (default `<backup>/pg_wal`), like `pg_verifybackup -w`.
    pub wal_dir: Option<PathBuf>,
}

/// Verifies the plain-format backup in `dir` against its `backup_manifest`: the manifest's
/// own checksum, every file present with the right size and checksum, no unexpected file,
/// the system identifier in `global/pg_control` (version-2 manifests), and the WAL the
/// manifest's WAL-Ranges need present in `pg_wal` (segment files with valid headers).
///
/// ```no_run
/// let manifest = basebackup::verify_backup(std::path::Path::new("/backup/data"))?;
/// println!("{} files verified", manifest.files.len());
/// # Ok::<(), basebackup::Error>(())
/// ```
pub fn verify_backup(dir: &Path) -> Result<Manifest> {
    verify_backup_with(dir, &VerifyOptions::default())
}

/// [`verify_backup_with`] for async callers: runs on a blocking thread
/// (`spawn_blocking`), so the runtime's workers stay free while it reads every file.
///
/// Cancel safety: dropping the future does not stop the verification, which only reads;
/// it runs to its end and the result is discarded. A panic in it is resumed in the caller.
///
/// ```no_run
/// # async fn demo() -> basebackup::Result<()> {
/// let options = basebackup::VerifyOptions::default();
/// let manifest = basebackup::verify_backup_async("/backup/data", options).await?;
/// println!("{} files verified", manifest.files.len());
/// # Ok(()) }
/// ```
pub async fn verify_backup_async(
    dir: impl Into<PathBuf>,
    options: VerifyOptions,
) -> Result<Manifest> {
    let dir = dir.into();
    match tokio::task::spawn_blocking(move || verify_backup_with(&dir, &options)).await {
        Ok(result) => result,
        Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
        // Only when the runtime shuts down.
        Err(_) => Err(Error::cancelled()),
    }
}

/// [`verify_backup`] with options.
pub fn verify_backup_with(dir: &Path, options: &VerifyOptions) -> Result<Manifest> {
    let manifest_path = dir.join("backup_manifest");
    let bytes = fs::read(&manifest_path).map_err(|e| Error::io("reading", &manifest_path, e))?;
    let manifest = Manifest::parse(&bytes)?;
    let algorithms: HashMap<&[u8], _> = manifest
        .files
        .iter()
        .map(|f| (f.path.as_slice(), f.algorithm))
        .collect();
    let mut received = HashMap::new();
    let mut stack = vec![(dir.to_path_buf(), Vec::<u8>::new())];
    while let Some((path, rel)) = stack.pop() {
        let entries = fs::read_dir(&path).map_err(|e| Error::io("reading directory", &path, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("reading directory", &path, e))?;
            let mut child_rel = rel.clone();
            if !child_rel.is_empty() {
                child_rel.push(b'/');
            }
            child_rel.extend_from_slice(entry.file_name().as_bytes());
            if is_ignored(&child_rel) {
                continue;
            }
            let full = entry.path();
            // Follows links (pg_tblspc/<oid>), as pg_verifybackup does.
            let meta = fs::metadata(&full).map_err(|e| Error::io("examining", &full, e))?;
            if meta.is_dir() {
                stack.push((full, child_rel));
            } else if meta.is_file() {
                let checksum = match algorithms.get(child_rel.as_slice()) {
                    Some(&alg) if !options.skip_checksums => {
                        let mut sum = FileChecksum::new(alg);
                        let mut f =
                            File::open(&full).map_err(|e| Error::io("opening", &full, e))?;
                        let mut buf = vec![0u8; 1 << 20];
                        let mut size = 0u64;
                        loop {
                            let n = f
                                .read(&mut buf)
                                .map_err(|e| Error::io("reading", &full, e))?;
                            if n == 0 {
                                break;
                            }
                            size += n as u64;
                            sum.update(&buf[..n]);
                        }
                        if size != meta.len() {
                            return Err(Error::verify(
                                display(&child_rel),
                                "the file changed while it was read",
                            ));
                        }
                        sum.finish()
                    }
                    _ => None,
                };
                received.insert(
                    child_rel,
                    Received {
                        size: meta.len(),
                        checksum,
                    },
                );
            } else {
                return Err(Error::verify(
                    display(&child_rel),
                    "not a regular file or directory",
                ));
            }
        }
    }
    if options.skip_checksums {
        let m = Manifest {
            files: manifest
                .files
                .iter()
                .map(|f| crate::manifest::ManifestFile {
                    checksum: None,
                    ..f.clone()
                })
                .collect(),
            ..manifest.clone()
        };
        check_files(&m, &received)?;
    } else {
        check_files(&manifest, &received)?;
    }
    if let Some(sysid) = manifest.system_identifier {
        let control = dir.join("global/pg_control");
        let mut raw = [0u8; 8];
        File::open(&control)
            .and_then(|mut f| f.read_exact(&mut raw))
            .map_err(|e| Error::io("reading", &control, e))?;
        let found = u64::from_le_bytes(raw);
        if found != sysid {
            return Err(Error::verify(
                "global/pg_control",
                format!("manifest system identifier is {sysid}, but control file has {found}"),
            ));
        }
    }
    if !options.skip_wal {
        let wal_dir = options
            .wal_dir
            .clone()
            .unwrap_or_else(|| dir.join("pg_wal"));
        check_wal(&wal_dir, &manifest)?;
    }
    Ok(manifest)
}

/// Offsets in `XLogLongPageHeaderData` (native endian; little-endian assumed).
const XLP_PAGEADDR: usize = 8;
const XLP_SYSID: usize = 24;
const XLP_SEG_SIZE: usize = 32;
const XLP_BLCKSZ: usize = 36;

/// Checks that the segments covering each WAL range exist with full size and a first-page
/// header naming the right address (record parsing is out of scope).
pub fn check_wal(wal_dir: &Path, manifest: &Manifest) -> Result<()> {
    if manifest.wal_ranges.is_empty() {
        return Ok(());
    }
    // With no segment at all, name the missing files as for the default size.
    let seg_size = detect_segment_size(wal_dir)?.unwrap_or(WalSegmentSize::DEFAULT);
    for range in &manifest.wal_ranges {
        let first = range.start.segment_number(seg_size);
        let last_lsn = if range.end > range.start {
            Lsn(range.end.0 - 1)
        } else {
            range.start
        };
        let last = last_lsn.segment_number(seg_size);
        for seg in first..=last {
            let name = pgwire_repl::types::wal_file_name(range.timeline, seg, seg_size);
            let path = wal_dir.join(&name);
            let rel = format!("pg_wal/{name}");
            let meta = fs::metadata(&path).map_err(|_| {
                Error::verify(
                    &rel,
                    format!(
                        "WAL segment needed for timeline {} from {} to {} is missing",
                        range.timeline, range.start, range.end
                    ),
                )
            })?;
            if meta.len() != seg_size.bytes() {
                return Err(Error::verify(
                    &rel,
                    format!(
                        "WAL segment has {} bytes, expected {}",
                        meta.len(),
                        seg_size.bytes()
                    ),
                ));
            }
            check_segment(
                &path,
                &rel,
                seg * seg_size.bytes(),
                seg_size.bytes(),
                range.end,
                manifest.system_identifier,
            )?;
        }
    }
    Ok(())
}

/// Checks the page headers of one segment from its start up to the page holding `end`:
/// the same magic everywhere, the right address on every page, and (on the first page)
/// the system identifier. Pages after `end` may be left from a recycled segment.
fn check_segment(
    path: &Path,
    rel: &str,
    seg_start: u64,
    seg_bytes: u64,
    end: Lsn,
    sysid: Option<u64>,
) -> Result<()> {
    let mut file = std::io::BufReader::with_capacity(
        1 << 20,
        File::open(path).map_err(|e| Error::io("opening", path, e))?,
    );
    let mut header = [0u8; 40];
    file.read_exact(&mut header)
        .map_err(|e| Error::io("reading", path, e))?;
    let le32 = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let le64 = |b: &[u8]| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    let magic = u16::from_le_bytes([header[0], header[1]]);
    let page = u64::from(le32(&header[XLP_BLCKSZ..]));
    if !page.is_power_of_two() || !(1024..=65536).contains(&page) {
        return Err(Error::verify(
            rel,
            format!("WAL segment header has an invalid page size {page}"),
        ));
    }
    if let Some(sysid) = sysid {
        let found = le64(&header[XLP_SYSID..]);
        if found != sysid {
            return Err(Error::verify(
                rel,
                format!("WAL segment belongs to system {found}, not {sysid}"),
            ));
        }
    }
    let limit = end.0.saturating_sub(seg_start).min(seg_bytes);
    let mut buf = vec![0u8; page as usize];
    buf[..40].copy_from_slice(&header);
    file.read_exact(&mut buf[40..])
        .map_err(|e| Error::io("reading", path, e))?;
    let mut offset = 0u64;
    loop {
        let addr = le64(&buf[XLP_PAGEADDR..]);
        if u16::from_le_bytes([buf[0], buf[1]]) != magic || addr != seg_start + offset {
            return Err(Error::verify(
                rel,
                format!(
                    "WAL page at offset {offset} has address {} (magic {:#06x}), expected {} (magic {magic:#06x}): the WAL is damaged or not from this backup",
                    Lsn(addr),
                    u16::from_le_bytes([buf[0], buf[1]]),
                    Lsn(seg_start + offset)
                ),
            ));
        }
        offset += page;
        if offset >= limit || offset >= seg_bytes {
            return Ok(());
        }
        file.read_exact(&mut buf)
            .map_err(|e| Error::io("reading", path, e))?;
    }
}

fn detect_segment_size(wal_dir: &Path) -> Result<Option<WalSegmentSize>> {
    let entries =
        fs::read_dir(wal_dir).map_err(|e| Error::io("reading WAL directory", wal_dir, e))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.as_bytes();
        if name.len() == 24 && name.iter().all(u8::is_ascii_hexdigit) {
            let mut header = [0u8; 40];
            let path = entry.path();
            File::open(&path)
                .and_then(|mut f| f.read_exact(&mut header))
                .map_err(|e| Error::io("reading", &path, e))?;
            let size = u32::from_le_bytes(
                header[XLP_SEG_SIZE..XLP_SEG_SIZE + 4]
                    .try_into()
                    .unwrap_or_default(),
            );
            return WalSegmentSize::new(u64::from(size)).map(Some).map_err(|_| {
                Error::verify(
                    format!("pg_wal/{}", display(name)),
                    "WAL segment header has an invalid segment size",
                )
            });
        }
    }
    Ok(None)
}
