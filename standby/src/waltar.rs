//! `pg_wal.tar`: the streamed WAL of a tar-format clone, packed as `pg_basebackup -Ft
//! -X stream` packs it, so the archives are used the same way (`pg_wal.tar` extracted
//! into the data directory's `pg_wal`).

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};

/// Packs the WAL segments and timeline history files of `wal_dir` into the tar archive
/// `archive` (each segment followed by its `archive_status/<name>.done` marker, as
/// pg_basebackup writes them, so the restored server does not archive them again),
/// then removes `wal_dir`. Files are in name order, so the archive is reproducible.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let wal = dir.path().join("pg_wal");
/// std::fs::create_dir(&wal).unwrap();
/// std::fs::write(wal.join("000000010000000000000001"), vec![0u8; 1 << 20]).unwrap();
/// standby::waltar::pack_wal_dir(&wal, &dir.path().join("pg_wal.tar"), false).unwrap();
/// assert!(!wal.exists());
/// let mut archive = tar::Archive::new(std::fs::File::open(dir.path().join("pg_wal.tar")).unwrap());
/// let names: Vec<String> = archive.entries().unwrap()
///     .map(|e| e.unwrap().path().unwrap().display().to_string()).collect();
/// assert_eq!(names, ["000000010000000000000001", "archive_status/000000010000000000000001.done"]);
/// ```
pub fn pack_wal_dir(wal_dir: &Path, archive: &Path, sync: bool) -> Result<()> {
    let fail = |what: &str, path: &Path, e: std::io::Error| Error::io(what, path, e);
    let mut names: Vec<String> = fs::read_dir(wal_dir)
        .map_err(|e| fail("reading", wal_dir, e))?
        .flatten()
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| is_segment(name) || is_history(name))
        .collect();
    names.sort();
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(archive)
        .map_err(|e| fail("creating", archive, e))?;
    let mut builder = tar::Builder::new(BufWriter::with_capacity(1 << 20, file));
    let mtime = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let header = |size: u64| {
        let mut header = tar::Header::new_ustar();
        header.set_size(size);
        header.set_mode(0o600);
        header.set_mtime(mtime);
        header.set_entry_type(tar::EntryType::Regular);
        header
    };
    for name in &names {
        let path = wal_dir.join(name);
        let source = File::open(&path).map_err(|e| fail("opening", &path, e))?;
        let size = source
            .metadata()
            .map_err(|e| fail("reading the size of", &path, e))?
            .len();
        builder
            .append_data(&mut header(size), name, source)
            .map_err(|e| fail("writing into", archive, e))?;
        if is_segment(name) {
            builder
                .append_data(
                    &mut header(0),
                    format!("archive_status/{name}.done"),
                    std::io::empty(),
                )
                .map_err(|e| fail("writing into", archive, e))?;
        }
    }
    let mut out = builder
        .into_inner()
        .map_err(|e| fail("finishing", archive, e))?;
    out.flush().map_err(|e| fail("writing", archive, e))?;
    let file = out
        .into_inner()
        .map_err(|e| fail("writing", archive, e.into_error()))?;
    if sync {
        file.sync_all().map_err(|e| fail("fsync of", archive, e))?;
    }
    drop(file);
    fs::remove_dir_all(wal_dir).map_err(|e| fail("removing", wal_dir, e))?;
    if sync {
        if let Some(parent) = archive.parent() {
            File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(|e| fail("fsync of", parent, e))?;
        }
    }
    Ok(())
}

fn is_segment(name: &str) -> bool {
    name.len() == 24 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_history(name: &str) -> bool {
    name.strip_suffix(".history")
        .is_some_and(|tli| tli.len() == 8 && tli.bytes().all(|b| b.is_ascii_hexdigit()))
}
