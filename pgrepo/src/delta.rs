//! Delta restore: bring an existing data directory of the same cluster to a backup,
//! downloading only the frames that hold files whose local copy is missing or differs.
//!
//! Order of work (pgBackRest's, in spirit): check the target; remove `global/pg_control`
//! so the directory never looks complete while it is being changed; check every local
//! file against the manifest; fetch and rewrite what differs (each file written to a
//! temporary name, verified, renamed over the old one); remove what the backup does not
//! hold; check the WAL; write `backup_manifest`, and `global/pg_control` last.
//!
//! An incremental backup is restored the same way from its chain: its whole files are
//! checked against its manifest; its `INCREMENTAL.<name>` files go through the chain's
//! reader ([`crate::chain::DeltaChain`]), which leaves out a file whose result equals a
//! whole older file that the local copy already holds, and rebuilds the others (written
//! under temporary names, renamed once the reader's checksums are known); the combined
//! manifest is written as `backup_manifest`.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use basebackup::incremental::whole_file_name;
use basebackup::manifest::{is_ignored, FileChecksum, ManifestFile};
use basebackup::tar::{normalize, TarParser};
use basebackup::{Bytes, TarEvent};
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;

use crate::error::{Error, Result};
use crate::layout::{ArchiveIndex, CommitRecord, IndexFrame, StoredCompression};
use crate::repository::Repository;
use crate::restore::{read_manifest, ReadSummary, RestoreOptions};
use crate::walcheck::WalCheck;

const PG_CONTROL: &[u8] = b"global/pg_control";
const TMP_SUFFIX: &str = ".pgrepo-delta";

/// One archive as the delta restore sees it.
struct Plan {
    /// Where its entries go.
    root: PathBuf,
    /// Its entries' prefix in the manifest (`pg_tblspc/<oid>/` or empty).
    prefix: Vec<u8>,
    base: bool,
    object: object_store::path::Path,
    describe: String,
    compression: StoredCompression,
    /// Its frames (one covering the whole object when it has no index).
    frames: Vec<IndexFrame>,
    indexed: bool,
}

/// Checks that `pgdata` may be delta-restored for cluster `system_id`: new, empty, or
/// a stopped data directory of that cluster.
fn check_target(pgdata: &FsPath, system_id: u64) -> Result<()> {
    let meta = match std::fs::symlink_metadata(pgdata) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(pgdata)
                .map_err(|e| Error::io("creating", pgdata, e))?;
            return Ok(());
        }
        Err(e) => return Err(Error::io("reading", pgdata, e)),
    };
    if !meta.is_dir() {
        return Err(Error::usage(
            format!("{} is not a directory", pgdata.display()),
            "give the data directory to bring up to date",
        ));
    }
    let mut entries = std::fs::read_dir(pgdata).map_err(|e| Error::io("reading", pgdata, e))?;
    if entries.next().is_none() {
        return Ok(());
    }
    if std::fs::symlink_metadata(pgdata.join("postmaster.pid")).is_ok() {
        return Err(Error::unsafe_op(
            format!(
                "{} holds postmaster.pid: a server may be running on it",
                pgdata.display()
            ),
            "stop the server first (remove postmaster.pid only if it is stale)",
        ));
    }
    let control = pgdata.join("global/pg_control");
    let mut id = [0u8; 8];
    let found = File::open(&control).and_then(|mut f| f.read_exact(&mut id));
    match found {
        Ok(()) if u64::from_le_bytes(id) == system_id => Ok(()),
        Ok(()) => Err(Error::unsafe_op(
            format!(
                "{} belongs to the cluster with system identifier {}, not the backup's {system_id}",
                pgdata.display(),
                u64::from_le_bytes(id)
            ),
            "restore into an empty directory, or into a data directory of this cluster",
        )),
        Err(e) => Err(Error::unsafe_op(
            format!(
                "{} is not empty and has no readable global/pg_control ({e}), so it is not \
                 known to be a data directory of this cluster",
                pgdata.display()
            ),
            "restore into an empty directory, or into a data directory of this cluster \
             (a --delta restore that failed removes global/pg_control: run it again with an \
             empty directory)",
        )),
    }
}

/// `root/rel` when no existing component of `rel` below `root` but the last is a
/// symlink or a non-directory (a top-level `pg_wal` link of the base directory is
/// followed, as initdb -X makes one).
fn local_path(root: &FsPath, rel: &[u8], base: bool) -> Option<PathBuf> {
    let rel = std::str::from_utf8(rel).ok()?;
    let parts: Vec<&str> = rel.split('/').collect();
    let mut path = root.to_path_buf();
    for (i, part) in parts.iter().enumerate() {
        if part.is_empty() || *part == "." || *part == ".." {
            return None;
        }
        path.push(part);
        if i + 1 == parts.len() {
            break;
        }
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() && base && i == 0 && *part == "pg_wal" => {}
            Ok(_) => return None,
            Err(_) => {} // missing: created when needed
        }
    }
    Some(path)
}

/// The size and checksum of a local regular file (not following a final symlink).
fn local_sum(path: &FsPath, file: &ManifestFile) -> Option<bool> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    if !meta.is_file() || meta.len() != file.size {
        return Some(false);
    }
    let mut f = File::open(path).ok()?;
    let mut sum = FileChecksum::new(file.algorithm);
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        total += n as u64;
        sum.update(&buf[..n]);
    }
    Some(total == file.size && sum.finish() == file.checksum)
}

fn mkdir(path: &FsPath) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => {
            std::fs::remove_file(path).map_err(|e| Error::io("removing", path, e))?;
            mkdir(path)
        }
        Err(_) => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(|e| Error::io("creating", path, e)),
    }
}

fn remove_any(path: &FsPath) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(_) => return Ok(()),
    };
    let r = if meta.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    r.map_err(|e| Error::io("removing", path, e))
}

fn fsync(path: &FsPath) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io("fsync of", path, e))
}

/// A file being written.
struct Open {
    file: File,
    tmp: PathBuf,
    path: PathBuf,
    manifest_path: Vec<u8>,
    expect: Option<(u64, Option<String>)>,
    /// Rebuilt from a chain: checked against what the chain's reader computed, and
    /// renamed into place, once the whole stream is read.
    later: bool,
    sum: FileChecksum,
    size: u64,
}

/// A rebuilt file written under its temporary name, waiting for its check.
struct Pending {
    tmp: PathBuf,
    path: PathBuf,
    manifest_path: Vec<u8>,
    size: u64,
    checksum: Option<String>,
}

/// Writes the entries of the fetched frames (runs on a blocking thread).
struct Writer {
    manifest: HashMap<Vec<u8>, ManifestFile>,
    good: Arc<HashSet<Vec<u8>>>,
    /// Paths whose content a chain's reader rebuilds (not in the newest manifest as
    /// they are written), and the algorithm of their checksums.
    later: HashSet<Vec<u8>>,
    later_algorithm: basebackup::ChecksumAlgorithm,
    pending: Vec<Pending>,
    /// Its input stopped inside a frame (the reader failed and says why).
    interrupted: bool,
    no_sync: bool,
    wal: WalCheck,
    current: Option<Open>,
    written: HashSet<Vec<u8>>,
    /// Paths seen in archives without an index, per plan.
    seen: Vec<HashSet<Vec<u8>>>,
    dirs: HashSet<PathBuf>,
    /// `global/pg_control`, written and verified, renamed into place last.
    control: Option<(PathBuf, PathBuf)>,
}

impl Drop for Writer {
    /// A restore that failed leaves no temporary file behind (a finished one has taken
    /// them all).
    fn drop(&mut self) {
        if let Some(open) = self.current.take() {
            let _ = std::fs::remove_file(&open.tmp);
        }
        if let Some((tmp, _)) = self.control.take() {
            let _ = std::fs::remove_file(&tmp);
        }
        for pending in self.pending.drain(..) {
            let _ = std::fs::remove_file(&pending.tmp);
        }
    }
}

impl Writer {
    fn event(&mut self, plan: &Plan, index: usize, event: TarEvent) -> Result<()> {
        if plan.base {
            self.wal.event(&event);
        }
        match event {
            TarEvent::Directory { path, .. } => {
                self.seen[index].insert(path.clone());
                let local = local_path(&plan.root, &path, plan.base)
                    .ok_or_else(|| unsafe_path(&plan.root, &path))?;
                mkdir(&local)
            }
            TarEvent::Symlink { path, .. } => {
                self.seen[index].insert(path);
                Ok(()) // tablespace links are made from the mapping
            }
            TarEvent::File { path, size, .. } => {
                self.seen[index].insert(path.clone());
                let manifest_path = [plan.prefix.as_slice(), &path].concat();
                if self.good.contains(&manifest_path) {
                    self.current = None;
                    return Ok(());
                }
                let later = self.later.contains(&manifest_path);
                let expect = match self.manifest.get(manifest_path.as_slice()) {
                    _ if later => None,
                    Some(f) => Some((f.size, f.checksum.clone())),
                    None if is_ignored(&manifest_path) => None,
                    None => {
                        return Err(Error::verify(
                            &plan.describe,
                            format!(
                                "{} is not in the backup's manifest",
                                String::from_utf8_lossy(&manifest_path)
                            ),
                        ))
                    }
                };
                if let Some((want, _)) = &expect {
                    if *want != size {
                        return Err(Error::verify(
                            &plan.describe,
                            format!(
                                "{} has {size} bytes, but the manifest says {want}",
                                String::from_utf8_lossy(&manifest_path)
                            ),
                        ));
                    }
                }
                let local = local_path(&plan.root, &path, plan.base)
                    .ok_or_else(|| unsafe_path(&plan.root, &path))?;
                let parent = local.parent().unwrap_or(&plan.root).to_path_buf();
                mkdir(&parent)?;
                let mut tmp = local.clone().into_os_string();
                tmp.push(TMP_SUFFIX);
                let tmp = PathBuf::from(tmp);
                let file = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(|e| Error::io("creating", &tmp, e))?;
                let algorithm = match self.manifest.get(manifest_path.as_slice()) {
                    _ if later => self.later_algorithm,
                    Some(f) => f.algorithm,
                    None => basebackup::ChecksumAlgorithm::None,
                };
                self.current = Some(Open {
                    file,
                    tmp,
                    path: local,
                    manifest_path,
                    expect,
                    later,
                    sum: FileChecksum::new(algorithm),
                    size: 0,
                });
                Ok(())
            }
            TarEvent::Data(data) => {
                if let Some(open) = self.current.as_mut() {
                    open.file
                        .write_all(&data)
                        .map_err(|e| Error::io("writing", &open.tmp, e))?;
                    open.sum.update(&data);
                    open.size += data.len() as u64;
                }
                Ok(())
            }
            TarEvent::FileEnd => {
                let Some(open) = self.current.take() else {
                    return Ok(());
                };
                let got = open.sum.finish();
                if let Some((size, checksum)) = &open.expect {
                    if open.size != *size || got != *checksum {
                        let _ = std::fs::remove_file(&open.tmp);
                        return Err(Error::verify(
                            &plan.describe,
                            format!(
                                "{} does not match the manifest ({} bytes, checksum {:?}; \
                                 expected {size} bytes, {checksum:?})",
                                String::from_utf8_lossy(&open.manifest_path),
                                open.size,
                                got
                            ),
                        ));
                    }
                }
                if !self.no_sync {
                    open.file
                        .sync_all()
                        .map_err(|e| Error::io("fsync of", &open.tmp, e))?;
                }
                drop(open.file);
                if let Some(parent) = open.path.parent() {
                    self.dirs.insert(parent.to_path_buf());
                }
                if open.later {
                    self.pending.push(Pending {
                        tmp: open.tmp,
                        path: open.path,
                        manifest_path: open.manifest_path,
                        size: open.size,
                        checksum: got,
                    });
                    return Ok(());
                } else if plan.base && open.manifest_path == PG_CONTROL {
                    self.control = Some((open.tmp, open.path));
                } else {
                    std::fs::rename(&open.tmp, &open.path)
                        .map_err(|e| Error::io("renaming into place", &open.path, e))?;
                }
                self.written.insert(open.manifest_path);
                Ok(())
            }
        }
    }
}

fn unsafe_path(root: &FsPath, path: &[u8]) -> Error {
    Error::unsafe_op(
        format!(
            "{}/{} would be written through a symbolic link or a non-directory",
            root.display(),
            String::from_utf8_lossy(path)
        ),
        "remove it, or restore into an empty directory",
    )
}

/// A tar stream in pieces: from the downloader (or a chain's reader) to a delta
/// restore's writer, a frame at a time; from a chain's reader to the restore pipeline,
/// an archive at a time.
pub(crate) enum Msg {
    /// An archive starts (to the pipeline).
    Archive(basebackup::ArchiveInfo),
    /// A frame of archive (plan) `i` starts (to the writer).
    Frame(usize),
    Data(Bytes),
    /// The frame ends.
    End,
}

/// Reads one frame's stored bytes from the channel, up to its `End`.
struct FrameReader<'a> {
    rx: &'a mut tokio::sync::mpsc::Receiver<Msg>,
    current: Bytes,
    done: bool,
    /// The channel closed inside the frame: its sender failed.
    stopped: &'a std::cell::Cell<bool>,
}

impl Read for FrameReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() && !self.done {
            match self.rx.blocking_recv() {
                Some(Msg::Data(b)) => self.current = b,
                Some(Msg::End) => self.done = true,
                Some(Msg::Frame(_) | Msg::Archive(_)) => {
                    return Err(std::io::Error::other("a frame does not end"))
                }
                None => {
                    self.stopped.set(true);
                    return Err(std::io::Error::other("the download stopped"));
                }
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// Concatenated LZ4 frames as one stream (lz4_flex's decoder ends a read at each frame's
/// end; the next is read when more input follows).
pub(crate) struct Lz4Frames<R: std::io::BufRead>(pub(crate) lz4_flex::frame::FrameDecoder<R>);

impl<R: std::io::BufRead> Read for Lz4Frames<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let n = self.0.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            if self.0.get_mut().fill_buf()?.is_empty() {
                return Ok(0);
            }
        }
    }
}

/// Decompresses (unless `plain`: the frames arrive as plain tar) and writes the frames
/// arriving on `rx`. Input that stops inside a frame is no error of the writer's (its
/// sender failed and says why): it only sets `writer.interrupted`.
fn write_frames(
    plans: &[Plan],
    writer: &mut Writer,
    rx: tokio::sync::mpsc::Receiver<Msg>,
    plain: bool,
) -> Result<()> {
    let stopped = std::cell::Cell::new(false);
    let written = write_frames_from(plans, writer, rx, plain, &stopped);
    if stopped.get() {
        writer.interrupted = true;
        if let Some(open) = writer.current.take() {
            let _ = std::fs::remove_file(&open.tmp);
        }
        return Ok(());
    }
    written
}

fn write_frames_from(
    plans: &[Plan],
    writer: &mut Writer,
    mut rx: tokio::sync::mpsc::Receiver<Msg>,
    plain: bool,
    stopped: &std::cell::Cell<bool>,
) -> Result<()> {
    while let Some(msg) = rx.blocking_recv() {
        let Msg::Frame(index) = msg else {
            return Err(Error::usage(
                "frame data out of order",
                "report this as a bug",
            ));
        };
        let plan = &plans[index];
        let mut reader = FrameReader {
            rx: &mut rx,
            current: Bytes::new(),
            done: false,
            stopped,
        };
        let damaged = |e: std::io::Error| {
            Error::verify(&plan.describe, format!("cannot be decompressed: {e}"))
        };
        let compression = if plain {
            StoredCompression::None
        } else {
            plan.compression
        };
        let mut decoder: Box<dyn Read + '_> = match compression {
            StoredCompression::None => Box::new(&mut reader),
            StoredCompression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(&mut reader)),
            StoredCompression::Lz4 => Box::new(Lz4Frames(lz4_flex::frame::FrameDecoder::new(
                std::io::BufReader::new(&mut reader),
            ))),
            StoredCompression::Zstd => {
                Box::new(zstd::stream::read::Decoder::new(&mut reader).map_err(damaged)?)
            }
        };
        let mut tar = TarParser::new(plan.base);
        loop {
            let mut buf = vec![0u8; 256 << 10];
            let n = decoder.read(&mut buf).map_err(damaged)?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            let mut failure = None;
            let pushed = tar.push(Bytes::from(buf), &mut |event| {
                writer.event(plan, index, event).map_err(|e| {
                    let b = basebackup::Error::sink(e.message().to_string(), "");
                    failure = Some(e);
                    b
                })
            });
            if let Some(e) = failure {
                return Err(e);
            }
            pushed.map_err(|e| Error::verify(&plan.describe, e.message()))?;
        }
        drop(decoder);
        let mut rest = [0u8; 1];
        if reader.read(&mut rest).map_err(damaged)? != 0 {
            return Err(Error::verify(
                &plan.describe,
                "has data after the end of a compressed frame",
            ));
        }
        tar.finish()
            .map_err(|e| Error::verify(&plan.describe, e.message()))?;
        if let Some(open) = writer.current.take() {
            return Err(Error::verify(
                &plan.describe,
                format!(
                    "a frame ends inside {}",
                    String::from_utf8_lossy(&open.manifest_path)
                ),
            ));
        }
    }
    Ok(())
}

/// Removes from `dir` (relative `rel` below the plan's root) what `keep` does not hold;
/// never follows a symbolic link. With `spare_top`, unknown entries directly in `dir`
/// are left alone (a tablespace directory may hold other versions' subdirectories).
fn prune(
    dir: &FsPath,
    rel: &[u8],
    keep: &HashSet<Vec<u8>>,
    spare_top: bool,
    removed: &mut usize,
) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("reading", dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("reading", dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            if !spare_top {
                remove_any(&entry.path())?;
                *removed += 1;
            }
            continue;
        };
        let path: Vec<u8> = if rel.is_empty() {
            name.as_bytes().to_vec()
        } else {
            [rel, b"/", name.as_bytes()].concat()
        };
        let meta = std::fs::symlink_metadata(entry.path())
            .map_err(|e| Error::io("reading", &entry.path(), e))?;
        if !keep.contains(&path) {
            if !spare_top {
                remove_any(&entry.path())?;
                *removed += 1;
            }
        } else if meta.is_dir() {
            prune(&entry.path(), &path, keep, false, removed)?;
        }
    }
    Ok(())
}

/// True when manifest path `path` lies in one of the tablespace archives.
fn is_tablespace_file(path: &[u8], plans: &[Plan]) -> bool {
    plans.iter().any(|p| !p.base && path.starts_with(&p.prefix))
}

/// The final name of an incremental file's manifest path (`base/5/INCREMENTAL.16384` →
/// `base/5/16384`).
fn final_name(path: &[u8]) -> Option<Vec<u8>> {
    std::str::from_utf8(path)
        .ok()
        .and_then(whole_file_name)
        .map(String::into_bytes)
}

/// Whether the local copy of manifest path `path` holds `file`'s size and checksum.
fn local_matches(plans: &[Plan], path: &[u8], file: &ManifestFile) -> bool {
    let plan = plans
        .iter()
        .find(|p| !p.base && path.starts_with(&p.prefix));
    let plan = plan.or_else(|| plans.iter().find(|p| p.base));
    plan.and_then(|p| local_path(&p.root, &path[p.prefix.len()..], p.base))
        .and_then(|local| local_sum(&local, file))
        .unwrap_or(false)
}

/// The delta restore of `chain` (a backup, newest first with its parents when it is
/// incremental) into `pgdata` (see the module documentation).
pub(crate) async fn restore_delta(
    repo: &Repository,
    chain: Vec<CommitRecord>,
    pgdata: &FsPath,
    options: RestoreOptions,
    downloaded: Arc<AtomicU64>,
) -> Result<ReadSummary> {
    let Some(record) = chain.first().cloned() else {
        return Err(Error::usage("no backup to restore", "report this as a bug"));
    };
    let system_id = record.system_id()?;
    let (manifest_bytes, manifest) = read_manifest(repo, &record).await?;
    check_target(pgdata, system_id)?;
    // An incremental backup: its chain's reader, loaded before anything is changed.
    let reader = match chain.len() {
        1 => None,
        _ => Some(
            crate::chain::DeltaChain::load(
                repo,
                &chain,
                &manifest,
                options.download,
                downloaded.clone(),
            )
            .await?,
        ),
    };
    let chained = reader.is_some();

    // The plan: where each archive goes, and its frames.
    let mut plans = Vec::new();
    for archive in &record.archives {
        let (object, describe, _) = crate::restore::stored_archive(repo, &record, archive).await?;
        let (root, prefix) = match (archive.tablespace_oid, &archive.location) {
            (None, _) => (pgdata.to_path_buf(), Vec::new()),
            (Some(oid), Some(location)) => (
                options.tablespace_mapping.apply(location),
                format!("pg_tblspc/{oid}/").into_bytes(),
            ),
            (Some(oid), None) => {
                return Err(Error::verify(
                    describe,
                    format!("tablespace {oid} has no location in the commit record"),
                ))
            }
        };
        let (frames, indexed) = match &archive.index {
            Some(name) => {
                let path = repo.backup_path(&record.label, name);
                let bytes = repo
                    .get_bytes(&path, crate::repository::INDEX_LIMIT)
                    .await?;
                let index = ArchiveIndex::from_json(
                    &bytes,
                    &repo.describe(&path),
                    archive.stored_bytes,
                    archive.tar_bytes,
                )?;
                (index.frames, true)
            }
            None => (
                vec![IndexFrame {
                    stored_offset: 0,
                    stored_len: archive.stored_bytes,
                    tar_offset: 0,
                    tar_len: archive.tar_bytes,
                    entries: Vec::new(),
                }],
                false,
            ),
        };
        plans.push(Plan {
            root,
            prefix,
            base: archive.tablespace_oid.is_none(),
            object,
            describe,
            compression: archive.compression,
            frames,
            indexed,
        });
    }

    let inconsistent = |e: Error| {
        e.context(format!(
            "the delta restore into {} failed, and the directory is now inconsistent: \
             restore it again before using it",
            pgdata.display()
        ))
    };
    let work = async {
        // From here on the directory is changed: first so it no longer looks complete.
        remove_any(&pgdata.join("global/pg_control"))?;
        let wal_dir = pgdata.join("pg_wal");
        if let Ok(entries) = std::fs::read_dir(&wal_dir) {
            for entry in entries.flatten() {
                if entry.file_name() != "archive_status" {
                    remove_any(&entry.path())?;
                }
            }
        }
        prune(
            &wal_dir.join("archive_status"),
            b"",
            &HashSet::new(),
            false,
            &mut 0,
        )?;
        // Tablespace directories and links, from the mapping.
        for (plan, archive) in plans.iter().zip(&record.archives) {
            let Some(oid) = archive.tablespace_oid else {
                continue;
            };
            mkdir(&plan.root)?;
            mkdir(&pgdata.join("pg_tblspc"))?;
            let link = pgdata.join(format!("pg_tblspc/{oid}"));
            if std::fs::read_link(&link).ok().as_deref() != Some(plan.root.as_path()) {
                remove_any(&link)?;
                std::os::unix::fs::symlink(&plan.root, &link)
                    .map_err(|e| Error::io("creating the link", &link, e))?;
            }
        }

        // A chain rebuilds its incremental files, and rewrites backup_label: written
        // under their final names, checked once the whole stream is read.
        let later: HashSet<Vec<u8>> = if chained {
            manifest
                .files
                .iter()
                .filter_map(|f| final_name(&f.path))
                .chain([b"backup_label".to_vec()])
                .collect()
        } else {
            HashSet::new()
        };
        // Which local files already match the manifest (for a chain: its whole files).
        let good: HashSet<Vec<u8>> = {
            let plans = &plans;
            let manifest = &manifest;
            let later = &later;
            crate::upload::cpu(|| {
                manifest
                    .files
                    .iter()
                    .filter(|f| !is_ignored(&f.path) && !later.contains(&f.path))
                    .filter(|f| !chained || final_name(&f.path).is_none())
                    .filter(|f| local_matches(plans, &f.path, f))
                    .map(|f| f.path.clone())
                    .collect()
            })
        };

        // Directories from the indexes; the frames with anything to write.
        let mut keep: Vec<HashSet<Vec<u8>>> = vec![HashSet::new(); plans.len()];
        let mut needed = Vec::new();
        for (i, plan) in plans.iter().enumerate() {
            for frame in &plan.frames {
                let mut need = !plan.indexed;
                for entry in &frame.entries {
                    let Ok(path) = normalize(entry.path.as_bytes()) else {
                        need = true;
                        continue;
                    };
                    if path.is_empty() {
                        continue;
                    }
                    // A chain's incremental file is restored under its final name.
                    let final_path = match final_name(&path) {
                        Some(name) if chained => name,
                        _ => path.clone(),
                    };
                    keep[i].insert(final_path);
                    match entry.kind.as_str() {
                        "dir" => {
                            let local = local_path(&plan.root, &path, plan.base)
                                .ok_or_else(|| unsafe_path(&plan.root, &path))?;
                            mkdir(&local)?;
                        }
                        "link" => {}
                        _ => {
                            let manifest_path = [plan.prefix.as_slice(), &path].concat();
                            need |= !good.contains(&manifest_path);
                        }
                    }
                }
                if need {
                    needed.push((i, frame.stored_offset, frame.stored_len));
                }
            }
        }

        tracing::info!(
            "delta restore: {} of {} local files match; fetching {} of {} frames",
            good.len(),
            manifest.files.len(),
            needed.len(),
            plans.iter().map(|p| p.frames.len()).sum::<usize>()
        );
        // Fetch the frames (ranged GETs, several in flight) and write them.
        let by_path: HashMap<Vec<u8>, ManifestFile> = manifest
            .files
            .iter()
            .map(|f| (f.path.clone(), f.clone()))
            .collect();
        let good = Arc::new(good);
        let plans = Arc::new(plans);
        let later_algorithm = reader
            .as_ref()
            .map_or(basebackup::ChecksumAlgorithm::None, |r| r.algorithm());
        let mut writer = Writer {
            manifest: by_path,
            good: good.clone(),
            later,
            later_algorithm,
            pending: Vec::new(),
            interrupted: false,
            no_sync: options.no_sync,
            wal: WalCheck::new(record.server_major, Some(system_id)),
            current: None,
            written: HashSet::new(),
            seen: vec![HashSet::new(); plans.len()],
            dirs: HashSet::new(),
            control: None,
        };
        let (tx, rx) = tokio::sync::mpsc::channel::<Msg>(options.download.concurrency.max(1) * 2);
        let chunk = options.download.chunk_size.max(1);
        let mut requests = Vec::new();
        // A chain's reader reads the frames itself.
        let direct = if chained { &[][..] } else { &needed[..] };
        for &(index, offset, len) in direct {
            let pieces = len.div_ceil(chunk).max(1);
            for p in 0..pieces {
                let start = offset + p * chunk;
                let end = (start + chunk).min(offset + len);
                requests.push((index, p == 0, p + 1 == pieces, start..end));
            }
        }
        // For a chain's reader: each needed frame of the newest backup.
        let archives: Vec<_> = plans
            .iter()
            .zip(&record.archives)
            .enumerate()
            .map(|(i, (plan, archive))| crate::chain::NewestArchive {
                path: plan.object.clone(),
                describe: plan.describe.clone(),
                compression: plan.compression,
                tablespace: basebackup::Tablespace {
                    oid: archive.tablespace_oid,
                    location: archive.location.clone(),
                    size_estimate: None,
                },
                ranges: needed
                    .iter()
                    .filter(|(index, _, _)| *index == i)
                    .map(|(_, offset, len)| *offset..offset + len)
                    .collect(),
            })
            .collect();
        let store = repo.store().clone();
        let plans_ref = plans.clone();
        let downloaded_ref = downloaded.clone();
        let download = async move {
            if let Some(reader) = reader {
                let plans = plans_ref.clone();
                let reuse: crate::chain::Reuse =
                    Box::new(move |path, file| local_matches(&plans, path, file));
                return reader.run(archives, reuse, tx).await.map(Some);
            }
            let mut chunks = futures::stream::iter(requests)
                .map(|(index, first, last, range)| {
                    let store = store.clone();
                    let path = plans_ref[index].object.clone();
                    async move {
                        let bytes = if range.is_empty() {
                            Bytes::new()
                        } else {
                            store.get_range(&path, range).await?
                        };
                        Ok::<_, object_store::Error>((index, first, last, bytes))
                    }
                })
                .buffered(options.download.concurrency.max(1));
            loop {
                let next = chunks
                    .try_next()
                    .await
                    .map_err(|e| Error::store("reading the backup's archives", e))?;
                let Some((index, first, last, bytes)) = next else {
                    break;
                };
                downloaded_ref.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                let mut msgs = Vec::new();
                if first {
                    msgs.push(Msg::Frame(index));
                }
                msgs.push(Msg::Data(bytes));
                if last {
                    msgs.push(Msg::End);
                }
                for msg in msgs {
                    if tx.send(msg).await.is_err() {
                        return Ok(None); // the writer failed; it reports why
                    }
                }
            }
            Ok::<_, Error>(None)
        };
        // The writer blocks: it runs on its own thread beside the downloads.
        let plans_writer = plans.clone();
        let write = tokio::task::spawn_blocking(move || {
            let result = write_frames(&plans_writer, &mut writer, rx, chained);
            (result, writer)
        });
        let (d, w) = futures::join!(download, write);
        let (w, mut writer) = w.map_err(|e| {
            Error::usage(format!("the writer stopped: {e}"), "report this as a bug")
        })?;
        // The writer's own failure first (a chain's reader then only saw it go away);
        // a failed download or chain's reader only stops the writer's input.
        w?;
        let combined = d?;
        if writer.interrupted {
            return Err(Error::usage(
                "the restore's input stopped inside a frame without an error",
                "report this as a bug",
            ));
        }

        // A chain: the combined manifest, and the rebuilt files checked against what
        // the chain's reader computed, then renamed into place.
        let mut kept = HashSet::new();
        let (manifest_bytes, manifest) = match combined {
            None => (manifest_bytes, manifest),
            Some((overrides, reused)) => {
                let bytes = crate::chain::combined_manifest(&manifest_bytes, &overrides)?;
                let parsed = basebackup::Manifest::parse(&bytes).map_err(|e| {
                    Error::usage(
                        format!("the combined manifest is invalid: {}", e.message()),
                        "report this as a bug",
                    )
                })?;
                for pending in std::mem::take(&mut writer.pending) {
                    let expected = overrides.get(&pending.manifest_path);
                    if expected != Some(&(pending.size, pending.checksum.clone())) {
                        let _ = std::fs::remove_file(&pending.tmp);
                        return Err(Error::verify(
                            format!("the chain of backup {}", record.label),
                            format!(
                                "{} was written with {} bytes and checksum {:?}, but rebuilt \
                                 with {:?}",
                                String::from_utf8_lossy(&pending.manifest_path),
                                pending.size,
                                pending.checksum,
                                expected
                            ),
                        ));
                    }
                    std::fs::rename(&pending.tmp, &pending.path)
                        .map_err(|e| Error::io("renaming into place", &pending.path, e))?;
                    writer.written.insert(pending.manifest_path);
                }
                kept = reused;
                (bytes, parsed)
            }
        };

        // Everything the manifest lists is here: checked up front, or while writing.
        for f in &manifest.files {
            if !is_ignored(&f.path)
                && !good.contains(&f.path)
                && !kept.contains(&f.path)
                && !writer.written.contains(&f.path)
            {
                return Err(Error::verify(
                    repo.describe(&repo.backup_path(&record.label, "")),
                    format!(
                        "{} is in the manifest but in none of the archives",
                        String::from_utf8_lossy(&f.path)
                    ),
                ));
            }
        }
        writer.wal.finish(&manifest.wal_ranges)?;

        // Remove what the backup does not hold.
        let mut removed = 0usize;
        for (i, plan) in plans.iter().enumerate() {
            let mut keep = std::mem::take(&mut keep[i]);
            keep.extend(writer.seen[i].drain());
            // Whatever the manifest lists stays, with its directories, whatever an index
            // says.
            for f in &manifest.files {
                let Some(rel) = f.path.strip_prefix(plan.prefix.as_slice()) else {
                    continue;
                };
                if plan.base && is_tablespace_file(&f.path, &plans) {
                    continue;
                }
                let mut end = rel.len();
                loop {
                    keep.insert(rel[..end].to_vec());
                    match rel[..end].iter().rposition(|&b| b == b'/') {
                        Some(slash) => end = slash,
                        None => break,
                    }
                }
            }
            if plan.base {
                keep.insert(b"backup_manifest".to_vec());
                keep.insert(PG_CONTROL.to_vec());
                // Written and verified; renamed into place last.
                keep.insert([PG_CONTROL, TMP_SUFFIX.as_bytes()].concat());
                keep.insert(b"pg_tblspc".to_vec());
                for archive in &record.archives {
                    if let Some(oid) = archive.tablespace_oid {
                        keep.insert(format!("pg_tblspc/{oid}").into_bytes());
                    }
                }
            }
            prune(&plan.root, b"", &keep, !plan.base, &mut removed)?;
            if !options.no_sync {
                // Every directory of the backup: new entries in it, renames, removals.
                fsync(&plan.root)?;
                for path in &keep {
                    let Ok(path) = std::str::from_utf8(path) else {
                        continue;
                    };
                    let local = plan.root.join(path);
                    if std::fs::symlink_metadata(&local).is_ok_and(|m| m.is_dir()) {
                        fsync(&local)?;
                    }
                }
            }
        }

        // The manifest, then pg_control last.
        let manifest_tmp = pgdata.join(format!("backup_manifest{TMP_SUFFIX}"));
        std::fs::write(&manifest_tmp, &manifest_bytes)
            .map_err(|e| Error::io("writing", &manifest_tmp, e))?;
        if !options.no_sync {
            fsync(&manifest_tmp)?;
        }
        std::fs::rename(&manifest_tmp, pgdata.join("backup_manifest"))
            .map_err(|e| Error::io("renaming into place", &manifest_tmp, e))?;
        if !options.no_sync {
            for dir in &writer.dirs {
                fsync(dir)?;
            }
            fsync(pgdata)?;
        }
        let Some((tmp, control)) = writer.control.take() else {
            return Err(Error::verify(
                repo.describe(&plans[plans.len() - 1].object),
                "holds no global/pg_control",
            ));
        };
        std::fs::rename(&tmp, &control)
            .map_err(|e| Error::io("renaming into place", &control, e))?;
        if !options.no_sync {
            fsync(control.parent().unwrap_or(pgdata))?;
        }
        tracing::info!("delta restore: {removed} local entries removed");
        Ok::<_, Error>(ReadSummary {
            files: manifest.files.len(),
            files_reused: good.len() + kept.len(),
            files_written: writer.written.iter().filter(|p| !is_ignored(p)).count(),
            wal_records: writer.wal.records_verified(),
            downloaded: 0,
            record: record.clone(),
        })
    };
    let mut summary = work.await.map_err(inconsistent)?;
    summary.downloaded = downloaded.load(Ordering::Relaxed);
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control(dir: &FsPath, system_id: u64) {
        std::fs::create_dir_all(dir.join("global")).unwrap();
        let mut bytes = system_id.to_le_bytes().to_vec();
        bytes.resize(8192, 0);
        std::fs::write(dir.join("global/pg_control"), bytes).unwrap();
    }

    #[test]
    fn targets_are_checked() {
        let tmp = tempfile::tempdir().unwrap();
        // New and empty directories are fine.
        check_target(&tmp.path().join("new/data"), 7).unwrap();
        assert!(tmp.path().join("new/data").is_dir());
        check_target(&tmp.path().join("new/data"), 7).unwrap();
        // The same cluster, stopped.
        let same = tmp.path().join("same");
        control(&same, 7);
        check_target(&same, 7).unwrap();
        // Another cluster.
        let e = check_target(&same, 8).unwrap_err();
        assert!(e.message().contains("system identifier 7"), "{e}");
        // A running server.
        std::fs::write(same.join("postmaster.pid"), "1\n").unwrap();
        let e = check_target(&same, 7).unwrap_err();
        assert!(e.message().contains("postmaster.pid"), "{e}");
        // Not a data directory: a short pg_control, or none.
        let short = tmp.path().join("short");
        std::fs::create_dir_all(short.join("global")).unwrap();
        std::fs::write(short.join("global/pg_control"), [1, 2, 3]).unwrap();
        assert!(check_target(&short, 7).is_err());
        let other = tmp.path().join("other");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("notes.txt"), "x").unwrap();
        assert!(check_target(&other, 7).is_err());
        // A file.
        assert!(check_target(&other.join("notes.txt"), 7).is_err());
    }

    #[test]
    fn local_paths_never_pass_through_links() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("data");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(root.join("base/1")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("base/evil")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("pg_wal")).unwrap();
        assert_eq!(
            local_path(&root, b"base/1/123", true),
            Some(root.join("base/1/123"))
        );
        assert_eq!(local_path(&root, b"base/evil/123", true), None);
        assert_eq!(local_path(&root, b"base/../x", true), None);
        assert_eq!(local_path(&root, b"/etc/passwd", true), None);
        // The top-level pg_wal link of the base directory only.
        assert!(local_path(&root, b"pg_wal/000000010000000000000001", true).is_some());
        assert_eq!(local_path(&root, b"pg_wal/x", false), None);
        // Missing directories are fine (created when written).
        assert!(local_path(&root, b"base/2/1", true).is_some());
    }

    #[test]
    fn pruning_removes_extras_and_never_follows_links() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("data");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(root.join("base/1")).unwrap();
        std::fs::create_dir_all(root.join("extra_dir/sub")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("precious"), "x").unwrap();
        std::fs::write(root.join("base/1/keep"), "k").unwrap();
        std::fs::write(root.join("base/1/stray"), "s").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("base/link")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("kept_link")).unwrap();
        let keep: HashSet<Vec<u8>> = ["base", "base/1", "base/1/keep", "kept_link"]
            .iter()
            .map(|p| p.as_bytes().to_vec())
            .collect();
        let mut removed = 0;
        prune(&root, b"", &keep, false, &mut removed).unwrap();
        assert_eq!(removed, 3);
        assert!(root.join("base/1/keep").exists());
        assert!(!root.join("base/1/stray").exists());
        assert!(!root.join("extra_dir").exists());
        assert!(std::fs::symlink_metadata(root.join("base/link")).is_err());
        assert!(outside.join("precious").exists());
        // A tablespace directory: unknown top-level entries are spared.
        std::fs::create_dir_all(root.join("PG_14_other")).unwrap();
        prune(&root, b"", &keep, true, &mut removed).unwrap();
        assert!(root.join("PG_14_other").exists());
    }

    /// A ustar header for a regular file.
    fn tar_header(name: &str, size: u64) -> [u8; 512] {
        let mut raw = [0u8; 512];
        raw[..name.len()].copy_from_slice(name.as_bytes());
        raw[100..108].copy_from_slice(b"0000600\0");
        raw[156] = b'0';
        raw[257..263].copy_from_slice(b"ustar\0");
        crate::chain::sized_header(&mut raw, size);
        raw
    }

    #[test]
    fn rebuilt_files_wait_and_a_stopped_input_leaves_no_temporary_file() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("data");
        std::fs::create_dir_all(&root).unwrap();
        let plans = [Plan {
            root: root.clone(),
            prefix: Vec::new(),
            base: false,
            object: object_store::path::Path::from("x"),
            describe: "x".into(),
            compression: StoredCompression::None,
            frames: Vec::new(),
            indexed: false,
        }];
        let file = |path: &str, size| ManifestFile {
            path: path.as_bytes().to_vec(),
            size,
            algorithm: basebackup::ChecksumAlgorithm::Crc32c,
            checksum: Some("839206e3".into()),
        };
        let mut writer = Writer {
            manifest: [(b"whole".to_vec(), file("whole", 9))]
                .into_iter()
                .collect(),
            good: Arc::default(),
            later: [b"rebuilt".to_vec()].into_iter().collect(),
            later_algorithm: basebackup::ChecksumAlgorithm::Crc32c,
            pending: Vec::new(),
            interrupted: false,
            no_sync: true,
            wal: WalCheck::new(17, None),
            current: None,
            written: HashSet::new(),
            seen: vec![HashSet::new()],
            dirs: HashSet::new(),
            control: None,
        };
        // A frame with a whole file (renamed into place) and a rebuilt one (kept under
        // its temporary name with its checksum), then a frame cut inside a file.
        let mut frame = Vec::new();
        for name in ["whole", "rebuilt"] {
            frame.extend_from_slice(&tar_header(name, 9));
            frame.extend_from_slice(b"123456789");
            frame.resize(frame.len().div_ceil(512) * 512, 0);
        }
        let mut cut = tar_header("whole", 9).to_vec();
        cut.extend_from_slice(b"1234");
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        for msg in [
            Msg::Frame(0),
            Msg::Data(frame.into()),
            Msg::End,
            Msg::Frame(0),
            Msg::Data(cut.into()),
        ] {
            tx.try_send(msg).ok().unwrap();
        }
        drop(tx);
        write_frames(&plans, &mut writer, rx, true).unwrap();
        assert!(writer.interrupted);
        assert!(writer.written.contains(b"whole".as_slice()));
        assert_eq!(std::fs::read(root.join("whole")).unwrap(), b"123456789");
        assert!(!root.join("rebuilt").exists());
        assert_eq!(writer.pending.len(), 1);
        assert_eq!(writer.pending[0].checksum.as_deref(), Some("839206e3"));
        assert_eq!(std::fs::read(&writer.pending[0].tmp).unwrap(), b"123456789");
        // The file cut short left no temporary file behind.
        assert!(!root.join(format!("whole{TMP_SUFFIX}")).exists());
    }

    #[test]
    fn local_checksums() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        std::fs::write(&path, b"123456789").unwrap();
        let mut file = ManifestFile {
            path: b"f".to_vec(),
            size: 9,
            algorithm: basebackup::ChecksumAlgorithm::Crc32c,
            checksum: Some("839206e3".into()),
        };
        assert_eq!(local_sum(&path, &file), Some(true));
        file.checksum = Some("00000000".into());
        assert_eq!(local_sum(&path, &file), Some(false));
        file.size = 8;
        assert_eq!(local_sum(&path, &file), Some(false));
        assert_eq!(local_sum(&tmp.path().join("missing"), &file), None);
    }
}
