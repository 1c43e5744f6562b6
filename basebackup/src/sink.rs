//! Where the backup goes: the [`BackupSink`] trait, a plain data directory
//! ([`PlainDirSink`]) and tar archives ([`TarSink`]).
//!
//! Sinks run on the writer thread, never on the async runtime, so they may block. A sink
//! that is asynchronous itself (an object store client) implements
//! [`AsyncBackupSink`](crate::AsyncBackupSink) instead.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use pgwire_repl::{Lsn, TimelineId};

use crate::command::CompressionMethod;
use crate::direct::{DirectFile, Stage, DIRECT_MIN_FILE};
use crate::error::{Error, Result};
use crate::tar::{display, TarEvent};

/// One row of the server's tablespace list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tablespace {
    /// The tablespace OID; `None` for the base directory.
    pub oid: Option<u32>,
    /// The location on the server; `None` for the base directory. Relative for in-place
    /// tablespaces (`pg_tblspc/<oid>`).
    pub location: Option<String>,
    /// The server's size estimate in bytes (only with PROGRESS).
    pub size_estimate: Option<u64>,
}

/// What a sink learns before the first archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupInfo {
    /// The server's major version.
    pub server_major: u32,
    /// Where the backup starts.
    pub start_lsn: Lsn,
    /// The timeline at the start.
    pub timeline: TimelineId,
    /// The tablespaces, base directory last.
    pub tablespaces: Vec<Tablespace>,
}

/// One archive (the base directory or a tablespace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveInfo {
    /// The name the server gave it (`base.tar`, `16385.tar.zst`…). On 13/14 it is derived
    /// from the tablespace list.
    pub name: String,
    /// The tablespace (with `oid: None` for the base directory).
    pub tablespace: Tablespace,
    /// Server-side compression of the stream. The pipeline undoes it before
    /// [`BackupSink::archive_bytes`] and [`BackupSink::entry`]; the bytes as sent reach
    /// [`BackupSink::compressed_bytes`].
    pub compression: Option<CompressionMethod>,
}

impl ArchiveInfo {
    /// True for the base directory's archive.
    pub fn is_base(&self) -> bool {
        self.tablespace.oid.is_none()
    }

    /// `base.tar` or `<oid>.tar`, without any compression suffix.
    pub fn tar_name(&self) -> String {
        match self.tablespace.oid {
            Some(oid) => format!("{oid}.tar"),
            None => "base.tar".into(),
        }
    }
}

/// A destination for a base backup. Embedding services implement this to send a backup
/// elsewhere (object storage, a pipe…); the crate provides [`PlainDirSink`] and [`TarSink`].
///
/// The calls come in this order: `begin_backup`, then for each archive `begin_archive`,
/// any mix of `compressed_bytes`, `archive_bytes` and `entry`, `end_archive`; finally
/// `commit` (only after the manifest was verified and the server reported success) or
/// `abort`. Within an archive, each uncompressed chunk goes first to `archive_bytes`, then
/// its parsed entries to `entry`. When the server compressed the archive
/// ([`ArchiveInfo::compression`]), each compressed chunk goes to `compressed_bytes` before
/// any uncompressed data decoded from it; the last compressed chunks may follow the last
/// uncompressed data (a frame's end carries no data). Without server compression,
/// `compressed_bytes` is never called.
///
/// The sink runs on the backup's writer thread and may block there (file I/O, a
/// synchronous client); it must not call `block_on` on the runtime. An error it returns
/// fails the backup: use [`Error::sink`](crate::Error::sink) for failures of its own.
/// [`BaseBackup::receive`](crate::BaseBackup::receive) gives the sink back at the end.
///
/// ```
/// use basebackup::{BackupSink, ArchiveInfo, BackupInfo, Error, Result, TarEvent};
/// /// Counts file bytes, writes nothing.
/// struct Count(u64);
/// impl BackupSink for Count {
///     fn begin_backup(&mut self, _: &BackupInfo) -> Result<()> { Ok(()) }
///     fn begin_archive(&mut self, _: &ArchiveInfo) -> Result<()> { Ok(()) }
///     fn entry(&mut self, e: &TarEvent) -> Result<()> {
///         if let TarEvent::Data(d) = e { self.0 += d.len() as u64 }
///         Ok(())
///     }
///     fn end_archive(&mut self, _trailer: bool) -> Result<()> { Ok(()) }
///     fn commit(&mut self, _manifest: Option<&[u8]>) -> Result<()> { Ok(()) }
///     fn abort(&mut self, reason: &Error) { eprintln!("backup failed: {reason}") }
/// }
/// ```
pub trait BackupSink: Send {
    /// Called once before any archive.
    fn begin_backup(&mut self, info: &BackupInfo) -> Result<()>;
    /// A new archive starts.
    fn begin_archive(&mut self, archive: &ArchiveInfo) -> Result<()>;
    /// For an archive whose [`ArchiveInfo::compression`] is `Some`: the bytes exactly as
    /// the server sent them (still compressed), in order, each chunk delivered before the
    /// uncompressed data decoded from it reaches `archive_bytes` and `entry`. Verification
    /// still runs on the uncompressed stream, so a sink that stores these bytes stores a
    /// verified archive once `commit` is called. Does nothing unless overridden.
    fn compressed_bytes(&mut self, data: &Bytes) -> Result<()> {
        let _ = data;
        Ok(())
    }
    /// Uncompressed tar bytes of the current archive, in order (a zero-copy slice).
    fn archive_bytes(&mut self, data: &Bytes) -> Result<()> {
        let _ = data;
        Ok(())
    }
    /// A parsed, already safety-checked archive entry or file data chunk.
    fn entry(&mut self, event: &TarEvent) -> Result<()> {
        let _ = event;
        Ok(())
    }
    /// The archive is complete; `trailer_present` says whether the stream carried the
    /// end-of-archive blocks (15+) or not (13/14).
    fn end_archive(&mut self, trailer_present: bool) -> Result<()>;
    /// Everything was received and verified: make it durable and write the manifest
    /// (last, so that nothing looks finished before this point).
    fn commit(&mut self, manifest: Option<&[u8]>) -> Result<()>;
    /// The backup failed, for `reason` (the error the backup returns, or
    /// [`ErrorKind::Cancelled`](crate::ErrorKind::Cancelled) when its caller dropped it):
    /// remove what this sink created (unless told to keep it). Called at most once,
    /// instead of `commit`, and never after a successful `commit`.
    fn abort(&mut self, reason: &Error);
}

/// A boxed sink is a sink (so `Box<dyn BackupSink>` can be passed where a sink is
/// expected).
impl<S: BackupSink + ?Sized> BackupSink for Box<S> {
    fn begin_backup(&mut self, info: &BackupInfo) -> Result<()> {
        (**self).begin_backup(info)
    }
    fn begin_archive(&mut self, archive: &ArchiveInfo) -> Result<()> {
        (**self).begin_archive(archive)
    }
    fn compressed_bytes(&mut self, data: &Bytes) -> Result<()> {
        (**self).compressed_bytes(data)
    }
    fn archive_bytes(&mut self, data: &Bytes) -> Result<()> {
        (**self).archive_bytes(data)
    }
    fn entry(&mut self, event: &TarEvent) -> Result<()> {
        (**self).entry(event)
    }
    fn end_archive(&mut self, trailer_present: bool) -> Result<()> {
        (**self).end_archive(trailer_present)
    }
    fn commit(&mut self, manifest: Option<&[u8]>) -> Result<()> {
        (**self).commit(manifest)
    }
    fn abort(&mut self, reason: &Error) {
        (**self).abort(reason)
    }
}

/// Tablespace mapping `OLDDIR=NEWDIR`, as `pg_basebackup -T`.
///
/// ```
/// let mut m = basebackup::TablespaceMapping::default();
/// m.parse_arg(r"/srv/a\=b=/new/ts").unwrap();
/// assert_eq!(m.apply("/srv/a=b/"), std::path::PathBuf::from("/new/ts"));
/// assert!(m.parse_arg("relative=/x").is_err());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TablespaceMapping(Vec<(String, PathBuf)>);

impl TablespaceMapping {
    /// Adds a mapping given as `OLDDIR=NEWDIR` (`\=` for a literal `=`).
    pub fn parse_arg(&mut self, arg: &str) -> Result<()> {
        let bad = |why: &str| {
            Error::usage(
                format!("invalid tablespace mapping {arg:?}: {why}"),
                "write it as OLDDIR=NEWDIR with two absolute paths; escape an = in a path as \\=",
            )
        };
        let (mut old, mut new, mut seen_eq) = (String::new(), String::new(), false);
        let mut chars = arg.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '\\' && chars.peek() == Some(&'=') {
                chars.next();
                if seen_eq {
                    new.push('=')
                } else {
                    old.push('=')
                }
            } else if c == '=' {
                if seen_eq {
                    return Err(bad("multiple = signs"));
                }
                seen_eq = true;
            } else if seen_eq {
                new.push(c);
            } else {
                old.push(c);
            }
        }
        if !seen_eq {
            return Err(bad("no ="));
        }
        if old.is_empty() || new.is_empty() {
            return Err(bad("an empty directory"));
        }
        if !old.starts_with('/') || !new.starts_with('/') {
            return Err(bad("both directories must be absolute"));
        }
        self.add(&old, new);
        Ok(())
    }

    /// Adds a mapping.
    pub fn add(&mut self, old: &str, new: impl Into<PathBuf>) {
        self.0.push((canonical_path(old), new.into()));
    }

    /// Where a server tablespace location goes (itself when not mapped).
    pub fn apply(&self, location: &str) -> PathBuf {
        let c = canonical_path(location);
        self.0
            .iter()
            .find(|(old, _)| *old == c)
            .map(|(_, new)| new.clone())
            .unwrap_or_else(|| PathBuf::from(c))
    }
}

/// The ustar header of a regular file member `name` of `size` bytes that this client
/// adds to an archive (`backup_manifest`, `-R`'s files): mode 0600, modified now, owned
/// like the server's members by this process's user, named postgres.
///
/// ```
/// let header = basebackup::sink::regular_member_header("standby.signal", 0).unwrap();
/// assert_eq!(header.mode().unwrap(), 0o600);
/// ```
pub fn regular_member_header(name: &str, size: u64) -> Result<tar::Header> {
    let mut header = tar::Header::new_ustar();
    header
        .set_path(name)
        .map_err(|e| Error::io("adding", Path::new(name), e))?;
    header.set_size(size);
    header.set_mode(0o600);
    header.set_mtime(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    );
    header.set_entry_type(tar::EntryType::Regular);
    // SAFETY: geteuid and getegid cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    header.set_uid(u64::from(uid));
    header.set_gid(u64::from(gid));
    let _ = header.set_username("postgres");
    let _ = header.set_groupname("postgres");
    header.set_cksum();
    Ok(header)
}

/// Collapses repeated slashes and removes a trailing slash, as PostgreSQL's
/// `canonicalize_path` does for the comparisons of tablespace paths (simplified: no
/// `.`/`..` processing).
///
/// ```
/// assert_eq!(basebackup::sink::canonical_path("/srv//ts/"), "/srv/ts");
/// ```
pub fn canonical_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if c == '/' && out.ends_with('/') {
            continue;
        }
        out.push(c);
    }
    while out.len() > 1 && out.ends_with('/') {
        out.pop();
    }
    out
}

/// Options shared by the built-in sinks.
#[derive(Debug, Clone, Default)]
pub struct SinkOptions {
    /// Accept a target directory that is not empty (the data directory or the archive
    /// directory only: a tablespace directory must always be new or empty).
    pub allow_non_empty: bool,
    /// Keep what was written when the backup fails (for inspection).
    pub keep_on_failure: bool,
    /// Skip all fsyncs (faster, not durable).
    pub no_sync: bool,
}

/// Creates `dir` if missing, or checks it is empty. Returns true if it was created.
fn prepare_dir(dir: &Path, allow_non_empty: bool) -> Result<bool> {
    match fs::read_dir(dir) {
        Ok(mut entries) => {
            if !allow_non_empty && entries.next().is_some() {
                return Err(Error::usage(
                    format!("target directory {} is not empty", dir.display()),
                    "choose an empty or new directory, remove its contents, or allow a non-empty target explicitly",
                ));
            }
            Ok(false)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).map_err(|e| Error::io("creating directory", dir, e))?;
            Ok(true)
        }
        Err(e) => Err(Error::io("reading directory", dir, e)),
    }
}

/// Creates `dir` and any missing parents; `dir` itself gets `mode` (0700 as
/// pg_basebackup, or 0750 with group access), the parents the process's default.
fn create_private_dir(dir: &Path, mode: u32) -> Result<()> {
    if let Some(parent) = dir.parent() {
        fs::create_dir_all(parent).map_err(|e| Error::io("creating directory", parent, e))?;
    }
    fs::DirBuilder::new()
        .mode(mode)
        .create(dir)
        .map_err(|e| Error::io("creating directory", dir, e))?;
    // The umask may have taken bits away; set exactly the mode asked for.
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io("setting the mode of", dir, e))
}

/// Starts writeback of a finished file so that the final fsync finds it mostly clean.
/// How much of one file is written before its writeback is started.
const WRITEBACK_BYTES: usize = 8 << 20;

fn start_writeback(file: &File) {
    // SAFETY: sync_file_range on a valid open descriptor; only a hint, errors are ignored
    // because the final fdatasync reports any real problem.
    #[cfg(target_os = "linux")]
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}

fn fsync_path(path: &Path, data_only: bool) -> Result<()> {
    let f = File::open(path).map_err(|e| Error::io("opening for fsync", path, e))?;
    let r = if data_only {
        f.sync_data()
    } else {
        f.sync_all()
    };
    r.map_err(|e| Error::io("fsync of", path, e))
}

fn write_manifest(dir: &Path, manifest: &[u8], no_sync: bool) -> Result<()> {
    let tmp = dir.join("backup_manifest.tmp");
    let fin = dir.join("backup_manifest");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| Error::io("creating", &tmp, e))?;
    f.write_all(manifest)
        .map_err(|e| Error::io("writing", &tmp, e))?;
    if !no_sync {
        f.sync_all().map_err(|e| Error::io("fsync of", &tmp, e))?;
    }
    drop(f);
    fs::rename(&tmp, &fin).map_err(|e| Error::io("renaming to backup_manifest", &tmp, e))?;
    if !no_sync {
        fsync_path(dir, false)?;
    }
    Ok(())
}

/// The file being extracted.
enum OpenFile {
    /// Written through the page cache (small files, or no direct I/O).
    Buffered(File),
    /// Written with `O_DIRECT` from the staging buffer.
    Direct(DirectFile),
}

impl OpenFile {
    fn file(&self) -> &File {
        match self {
            OpenFile::Buffered(file) => file,
            OpenFile::Direct(direct) => direct.file(),
        }
    }
}

impl std::fmt::Debug for OpenFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OpenFile::Buffered(_) => "Buffered",
            OpenFile::Direct(_) => "Direct",
        })
    }
}

#[derive(Debug)]
enum Created {
    File(PathBuf),
    Dir(PathBuf),
    Link(PathBuf),
    Tree(PathBuf),
}

/// Extracts the backup into a data directory as the bytes arrive (pg_basebackup `-Fp`):
/// no temporary copy, no second pass. Tablespaces go to their original locations or as
/// mapped; `pg_tblspc/<oid>` becomes a link to the tablespace's (mapped) directory.
///
/// ```no_run
/// # async fn demo() -> basebackup::Result<()> {
/// let config = pgwire_repl::Config::parse_with_env("host=primary user=replicator")?;
/// let mut mapping = basebackup::TablespaceMapping::default();
/// mapping.parse_arg("/srv/ts1=/backup/ts1")?;
/// let sink = basebackup::PlainDirSink::new("/backup/data").tablespace_mapping(mapping);
/// let (result, _sink) = basebackup::backup(&config, basebackup::BackupOptions::default().wal(true), sink).await?;
/// println!("backup ends at {}", result.end_lsn);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct PlainDirSink {
    target: PathBuf,
    mapping: TablespaceMapping,
    options: SinkOptions,
    dir_mode: u32,
    root: PathBuf,
    tablespace_dirs: HashMap<u32, PathBuf>,
    source_dirs: Vec<PathBuf>,
    current: Option<(OpenFile, PathBuf)>,
    /// The staging buffer of direct writes, allocated with the first large file.
    stage: Option<Stage>,
    /// When the backup began, and how long direct writes have taken since.
    began: Option<Instant>,
    direct_time: Duration,
    /// Bytes written to the current file since its writeback was last started.
    not_yet_written_back: usize,
    created: Vec<Created>,
    sync_files: Vec<PathBuf>,
    sync_dirs: Vec<PathBuf>,
}

impl PlainDirSink {
    /// A sink that extracts into `target` (created if missing; must be empty).
    pub fn new(target: impl Into<PathBuf>) -> PlainDirSink {
        let target = target.into();
        PlainDirSink {
            root: target.clone(),
            target,
            mapping: TablespaceMapping::default(),
            options: SinkOptions::default(),
            dir_mode: 0o700,
            tablespace_dirs: HashMap::new(),
            source_dirs: Vec::new(),
            current: None,
            stage: None,
            began: None,
            direct_time: Duration::ZERO,
            not_yet_written_back: 0,
            created: Vec::new(),
            sync_files: Vec::new(),
            sync_dirs: Vec::new(),
        }
    }

    /// Sets the tablespace mapping.
    pub fn tablespace_mapping(mut self, mapping: TablespaceMapping) -> Self {
        self.mapping = mapping;
        self
    }

    /// Sets the sink options.
    pub fn options(mut self, options: SinkOptions) -> Self {
        self.options = options;
        self
    }

    /// The source server's own directories (its data directory, as `SHOW data_directory`
    /// reports it), so that a target inside them on this host is refused. The source's
    /// tablespace locations are always checked; see [`plain_target_dirs`](crate::plain_target_dirs).
    pub fn source_directories(mut self, dirs: Vec<PathBuf>) -> Self {
        self.source_dirs = dirs;
        self
    }

    /// Sets the data directory's mode (0700 by default; 0750 for group access).
    pub fn data_directory_mode(mut self, mode: u32) -> Self {
        self.dir_mode = mode & 0o777;
        self
    }

    fn full(&self, path: &[u8]) -> PathBuf {
        self.root.join(OsStr::from_bytes(path))
    }

    /// Whether the next large file should be written with `O_DIRECT`.
    ///
    /// A durable clone waits for the disk in any case, so direct writes only save the
    /// page-cache work. With no sync, the page cache would let the clone finish before
    /// the disk has caught up; direct writes are kept only while the disk keeps up with
    /// the stream, that is while they have taken less than half of the time so far.
    fn direct_pays_off(&self) -> bool {
        if !self.options.no_sync {
            return true;
        }
        let elapsed = self.began.map_or(Duration::ZERO, |t| t.elapsed());
        self.direct_time * 2 <= elapsed
    }

    fn finish_file(&mut self) -> Result<()> {
        match self.current.take() {
            Some((OpenFile::Buffered(file), path)) if !self.options.no_sync => {
                start_writeback(&file);
                self.sync_files.push(path);
            }
            Some((OpenFile::Direct(direct), path)) => {
                let stage = self.stage.get_or_insert_with(Stage::new);
                direct
                    .finish(stage)
                    .map_err(|e| Error::io("writing", &path, e))?;
                // Nothing to write back: only metadata and the device cache are left
                // for the final fdatasync.
                if !self.options.no_sync {
                    self.sync_files.push(path);
                }
            }
            Some((OpenFile::Buffered(_), _)) | None => {}
        }
        Ok(())
    }
}

impl BackupSink for PlainDirSink {
    fn begin_backup(&mut self, info: &BackupInfo) -> Result<()> {
        self.began = Some(Instant::now());
        // Decided before anything is written: new or empty directories only, none of
        // them inside the source's directories on this host.
        let dirs = crate::targets::plain_target_dirs(
            &self.target,
            &info.tablespaces,
            &self.mapping,
            &self.source_dirs,
            self.options.allow_non_empty,
        )?;
        for ts in &info.tablespaces {
            if let (Some(oid), Some(location)) = (ts.oid, ts.location.as_deref()) {
                if !location.starts_with('/') {
                    // In-place tablespace: relative to the data directory.
                    self.tablespace_dirs.insert(oid, self.target.join(location));
                }
            }
        }
        for dir in dirs {
            if let Some(oid) = dir.tablespace {
                self.tablespace_dirs.insert(oid, dir.path.clone());
            }
            if let Some(top) = &dir.creates {
                create_private_dir(&dir.path, self.dir_mode)?;
                self.created.push(Created::Tree(top.clone()));
            }
            self.sync_dirs.push(dir.path);
        }
        fs::set_permissions(&self.target, fs::Permissions::from_mode(self.dir_mode))
            .map_err(|e| Error::io("setting the mode of", &self.target, e))?;
        Ok(())
    }

    fn begin_archive(&mut self, archive: &ArchiveInfo) -> Result<()> {
        self.root = match archive.tablespace.oid {
            None => self.target.clone(),
            Some(oid) => {
                let dir = self.tablespace_dirs.get(&oid).cloned().ok_or_else(|| {
                    Error::protocol(format!(
                        "archive {} is for tablespace {oid}, which was not in the tablespace list",
                        archive.name
                    ))
                })?;
                if !dir.exists() {
                    // In-place tablespace under pg_tblspc, which the base archive creates later.
                    fs::create_dir_all(&dir)
                        .map_err(|e| Error::io("creating directory", &dir, e))?;
                    self.created.push(Created::Tree(dir.clone()));
                    self.sync_dirs.push(dir.clone());
                }
                dir
            }
        };
        Ok(())
    }

    fn entry(&mut self, event: &TarEvent) -> Result<()> {
        match event {
            TarEvent::Directory { path, mode } => {
                let full = self.full(path);
                match fs::create_dir(&full) {
                    Ok(()) => self.created.push(Created::Dir(full.clone())),
                    // Allowed like pg_basebackup (pg_wal, pg_tblspc/<oid> of in-place
                    // tablespaces…), as long as it is a real directory and not a link.
                    Err(e)
                        if e.kind() == std::io::ErrorKind::AlreadyExists
                            && fs::symlink_metadata(&full).is_ok_and(|m| m.is_dir()) => {}
                    Err(e) => return Err(Error::io("creating directory", &full, e)),
                }
                fs::set_permissions(&full, fs::Permissions::from_mode(*mode))
                    .map_err(|e| Error::io("setting the mode of", &full, e))?;
                if !self.options.no_sync {
                    self.sync_dirs.push(full);
                }
            }
            TarEvent::File { path, mode, size } => {
                // The parser ends every file first; finishing here keeps the staging
                // buffer empty for the new file whatever the event order.
                self.finish_file()?;
                let full = self.full(path);
                let mut open = OpenOptions::new();
                open.write(true).mode(*mode);
                if self.options.allow_non_empty {
                    open.create(true).truncate(true);
                } else {
                    open.create_new(true);
                }
                let direct = *size >= DIRECT_MIN_FILE && self.direct_pays_off();
                let opened = if direct {
                    match open
                        .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECT)
                        .open(&full)
                    {
                        // A file system without direct I/O (tmpfs before Linux 6.6, …):
                        // nothing was created, so open it again buffered.
                        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => open
                            .custom_flags(libc::O_NOFOLLOW)
                            .open(&full)
                            .map(OpenFile::Buffered),
                        other => other.map(|f| OpenFile::Direct(DirectFile::new(f))),
                    }
                } else {
                    open.custom_flags(libc::O_NOFOLLOW)
                        .open(&full)
                        .map(OpenFile::Buffered)
                };
                let file = opened.map_err(|e| Error::io("creating", &full, e))?;
                self.created.push(Created::File(full.clone()));
                file.file()
                    .set_permissions(fs::Permissions::from_mode(*mode))
                    .map_err(|e| Error::io("setting the mode of", &full, e))?;
                self.current = Some((file, full));
            }
            TarEvent::Data(data) => {
                let (file, path) = self
                    .current
                    .as_mut()
                    .ok_or_else(|| Error::protocol("file data outside a file"))?;
                match file {
                    OpenFile::Direct(direct) => {
                        let stage = self.stage.get_or_insert_with(Stage::new);
                        let started = Instant::now();
                        direct
                            .write(stage, data)
                            .map_err(|e| Error::io("writing", path, e))?;
                        self.direct_time += started.elapsed();
                    }
                    OpenFile::Buffered(file) => {
                        file.write_all(data)
                            .map_err(|e| Error::io("writing", path, e))?;
                        // Large files start writeback as they grow, so dirty pages
                        // never pile up for one long flush at the end.
                        self.not_yet_written_back += data.len();
                        if !self.options.no_sync && self.not_yet_written_back >= WRITEBACK_BYTES {
                            start_writeback(file);
                            self.not_yet_written_back = 0;
                        }
                    }
                }
            }
            TarEvent::FileEnd => {
                self.not_yet_written_back = 0;
                self.finish_file()?
            }
            TarEvent::Symlink { path, target } => {
                let oid: Option<u32> = path
                    .strip_prefix(b"pg_tblspc/")
                    .and_then(|o| std::str::from_utf8(o).ok())
                    .and_then(|o| o.parse().ok());
                let mapped = std::str::from_utf8(target)
                    .ok()
                    .map(|t| self.mapping.apply(t));
                let expected = oid.and_then(|o| self.tablespace_dirs.get(&o));
                match (mapped, expected) {
                    (Some(m), Some(e)) if &m == e && self.root == self.target => {
                        let full = self.full(path);
                        std::os::unix::fs::symlink(&m, &full)
                            .map_err(|e| Error::io("creating the tablespace link", &full, e))?;
                        self.created.push(Created::Link(full));
                    }
                    _ => {
                        return Err(Error::unsafe_entry(
                            display(path),
                            format!(
                            "tablespace link to {:?} does not point at a tablespace of this backup",
                            display(target)
                        ),
                        ))
                    }
                }
            }
        }
        Ok(())
    }

    fn end_archive(&mut self, _trailer_present: bool) -> Result<()> {
        self.finish_file()
    }

    fn commit(&mut self, manifest: Option<&[u8]>) -> Result<()> {
        self.finish_file()?;
        if !self.options.no_sync {
            for f in &self.sync_files {
                fsync_path(f, true)?;
            }
            for d in &self.sync_dirs {
                fsync_path(d, false)?;
            }
            for d in self.tablespace_dirs.values().chain([&self.target]) {
                if let Some(parent) = d.parent() {
                    let _ = fsync_path(parent, false);
                }
            }
        }
        if let Some(m) = manifest {
            write_manifest(&self.target, m, self.options.no_sync)?;
        }
        self.created.clear();
        Ok(())
    }

    fn abort(&mut self, _reason: &Error) {
        self.current = None;
        if self.options.keep_on_failure {
            return;
        }
        remove_created(&mut self.created);
    }
}

fn remove_created(created: &mut Vec<Created>) {
    while let Some(c) = created.pop() {
        let _ = match c {
            Created::File(p) | Created::Link(p) => fs::remove_file(p),
            Created::Dir(p) => fs::remove_dir(p),
            Created::Tree(p) => fs::remove_dir_all(p),
        };
    }
}

enum TarOut {
    /// The uncompressed tar stream.
    Plain(File),
    /// The uncompressed tar stream, compressed here.
    Zstd(zstd::stream::write::Encoder<'static, File>),
    /// The uncompressed tar stream, gzip-compressed here.
    Gzip(flate2::write::GzEncoder<File>),
    /// The uncompressed tar stream, compressed here into LZ4 frames.
    Lz4(lz4_flex::frame::FrameEncoder<File>),
    /// The server's compressed stream, stored as it arrived.
    AsSent(File),
}

/// Client-side compression of the archives a [`TarSink`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCompression {
    /// gzip at a level from 1 to 9 (default 6 when `None`): `.gz`.
    Gzip(Option<u32>),
    /// LZ4 frames: `.lz4`. The level is accepted for compatibility; the encoder has
    /// one (fast) level.
    Lz4(Option<u32>),
    /// zstd at a level (`None`: zstd's default): `.zst`.
    Zstd(Option<i32>),
}

impl ClientCompression {
    /// The file-name suffix (`.gz`, `.lz4`, `.zst`).
    pub fn suffix(self) -> &'static str {
        match self {
            ClientCompression::Gzip(_) => ".gz",
            ClientCompression::Lz4(_) => ".lz4",
            ClientCompression::Zstd(_) => ".zst",
        }
    }
}

/// Writes `base.tar`, `<oid>.tar` and `backup_manifest`, as `pg_basebackup -Ft` does;
/// adds the end-of-archive blocks that 13/14 servers leave out.
///
/// An archive the server compressed is stored as it arrived (`base.tar.zst`,
/// `<oid>.tar.gz`, `.tar.lz4`…), while the backup is still verified on the decompressed
/// stream. With client-side [`zstd`](TarSink::zstd), every archive is written as
/// `.tar.zst`, recompressing any server-compressed one.
/// [`archive_file_name`](TarSink::archive_file_name) gives each archive's file name.
///
/// Use it with [`BackupOptions::tablespace_map`](crate::BackupOptions) set, as
/// pg_basebackup does for tar format, so that restoring does not need the links.
pub struct TarSink {
    dir: PathBuf,
    options: SinkOptions,
    zstd_level: Option<i32>,
    client: Option<ClientCompression>,
    current: Option<(TarOut, PathBuf)>,
    created: Vec<Created>,
    files: Vec<PathBuf>,
}

impl std::fmt::Debug for TarSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TarSink")
            .field("dir", &self.dir)
            .field("zstd_level", &self.zstd_level)
            .finish()
    }
}

impl TarSink {
    /// A sink writing archives into `dir` (created if missing; must be empty).
    ///
    /// ```
    /// let sink = basebackup::TarSink::new("/backup/2026-11-26").zstd(Some(3));
    /// ```
    pub fn new(dir: impl Into<PathBuf>) -> TarSink {
        TarSink {
            dir: dir.into(),
            options: SinkOptions::default(),
            zstd_level: None,
            client: None,
            current: None,
            created: Vec::new(),
            files: Vec::new(),
        }
    }

    /// Compresses each archive on the client with zstd at `level` (`.tar.zst`).
    pub fn zstd(mut self, level: Option<i32>) -> Self {
        self.zstd_level = level;
        self
    }

    /// Compresses each archive on the client (`pg_basebackup --compress client-…`):
    /// gzip (`.tar.gz`), LZ4 frames (`.tar.lz4`) or zstd (`.tar.zst`, the same as
    /// [`TarSink::zstd`]). A server-compressed archive is recompressed.
    ///
    /// ```
    /// use basebackup::{ArchiveInfo, ClientCompression, Tablespace, TarSink};
    /// let base = ArchiveInfo {
    ///     name: "base.tar".into(),
    ///     tablespace: Tablespace { oid: None, location: None, size_estimate: None },
    ///     compression: None,
    /// };
    /// let sink = TarSink::new("/backup").compress(ClientCompression::Gzip(Some(1)));
    /// assert_eq!(sink.archive_file_name(&base), "base.tar.gz");
    /// ```
    pub fn compress(mut self, compression: ClientCompression) -> Self {
        match compression {
            ClientCompression::Zstd(level) => {
                self.zstd_level = Some(level.unwrap_or(0));
                self.client = None;
            }
            other => {
                self.zstd_level = None;
                self.client = Some(other);
            }
        }
        self
    }

    /// Sets the sink options.
    pub fn options(mut self, options: SinkOptions) -> Self {
        self.options = options;
        self
    }

    /// The file name this sink writes `archive` to, inside its directory: the archive's
    /// [`tar_name`](ArchiveInfo::tar_name) (`base.tar` or `<oid>.tar`, never the name the
    /// server sent) plus `.zst` with client-side zstd, or else the suffix of the server's
    /// compression method, if any.
    ///
    /// ```
    /// use basebackup::{ArchiveInfo, CompressionMethod, Tablespace, TarSink};
    /// let base = ArchiveInfo {
    ///     name: "base.tar.gz".into(),
    ///     tablespace: Tablespace { oid: None, location: None, size_estimate: None },
    ///     compression: Some(CompressionMethod::Gzip),
    /// };
    /// let ts = ArchiveInfo {
    ///     name: "16385.tar".into(),
    ///     tablespace: Tablespace {
    ///         oid: Some(16385),
    ///         location: Some("/srv/ts1".into()),
    ///         size_estimate: None,
    ///     },
    ///     compression: None,
    /// };
    /// let sink = TarSink::new("/backup");
    /// assert_eq!(sink.archive_file_name(&base), "base.tar.gz");
    /// assert_eq!(sink.archive_file_name(&ts), "16385.tar");
    /// let sink = TarSink::new("/backup").zstd(Some(3));
    /// assert_eq!(sink.archive_file_name(&base), "base.tar.zst");
    /// assert_eq!(sink.archive_file_name(&ts), "16385.tar.zst");
    /// ```
    pub fn archive_file_name(&self, archive: &ArchiveInfo) -> String {
        let mut name = archive.tar_name();
        if let Some(client) = self.client {
            name.push_str(client.suffix());
            return name;
        }
        match (self.zstd_level, archive.compression) {
            (Some(_), _) => name.push_str(".zst"),
            (None, Some(method)) => name.push_str(method.suffix()),
            (None, None) => {}
        }
        name
    }

    fn write(&mut self, data: &[u8]) -> Result<()> {
        let (out, path) = self
            .current
            .as_mut()
            .ok_or_else(|| Error::protocol("archive data outside an archive"))?;
        let r = match out {
            TarOut::Plain(f) => f.write_all(data),
            TarOut::Zstd(z) => z.write_all(data),
            TarOut::Gzip(z) => z.write_all(data),
            TarOut::Lz4(z) => z.write_all(data),
            TarOut::AsSent(_) => {
                return Err(Error::protocol(format!(
                    "uncompressed data for {}, which stores the server's compressed stream",
                    path.display()
                )))
            }
        };
        r.map_err(|e| Error::io("writing", path, e))
    }
}

impl BackupSink for TarSink {
    fn begin_backup(&mut self, _info: &BackupInfo) -> Result<()> {
        if prepare_dir(&self.dir, self.options.allow_non_empty)? {
            self.created.push(Created::Tree(self.dir.clone()));
        }
        Ok(())
    }

    fn begin_archive(&mut self, archive: &ArchiveInfo) -> Result<()> {
        let path = self.dir.join(self.archive_file_name(archive));
        let file = OpenOptions::new()
            .write(true)
            .create_new(!self.options.allow_non_empty)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::io("creating", &path, e))?;
        self.created.push(Created::File(path.clone()));
        let out = match (self.client, self.zstd_level, archive.compression) {
            (Some(ClientCompression::Gzip(level)), _, _) => {
                TarOut::Gzip(flate2::write::GzEncoder::new(
                    file,
                    level.map_or(flate2::Compression::default(), |l| {
                        flate2::Compression::new(l.clamp(0, 9))
                    }),
                ))
            }
            (Some(_), _, _) => TarOut::Lz4(lz4_flex::frame::FrameEncoder::new(file)),
            (None, level, compression) => match (level, compression) {
                (None, None) => TarOut::Plain(file),
                (None, Some(_)) => TarOut::AsSent(file),
                (Some(level), _) => TarOut::Zstd(
                    zstd::stream::write::Encoder::new(file, level)
                        .map_err(|e| Error::io("starting zstd compression of", &path, e))?,
                ),
            },
        };
        self.current = Some((out, path));
        Ok(())
    }

    fn compressed_bytes(&mut self, data: &Bytes) -> Result<()> {
        match self.current.as_mut() {
            Some((TarOut::AsSent(f), path)) => {
                f.write_all(data).map_err(|e| Error::io("writing", path, e))
            }
            // Client-side zstd: the decompressed bytes are recompressed instead.
            Some(_) => Ok(()),
            None => Err(Error::protocol("archive data outside an archive")),
        }
    }

    fn archive_bytes(&mut self, data: &Bytes) -> Result<()> {
        if let Some((TarOut::AsSent(_), _)) = self.current {
            // Stored from `compressed_bytes`.
            return Ok(());
        }
        self.write(data)
    }

    fn end_archive(&mut self, trailer_present: bool) -> Result<()> {
        if !trailer_present {
            if let Some((TarOut::AsSent(_), path)) = &self.current {
                // Only 13/14 leave the trailer out, and they cannot compress: a stored
                // compressed stream cannot be completed after the fact.
                return Err(Error::protocol(format!(
                    "the server-compressed archive {} has no end-of-archive blocks",
                    path.display()
                )));
            }
            self.write(&[0u8; 1024])?;
        }
        if let Some((out, path)) = self.current.take() {
            let file = match out {
                TarOut::Plain(f) | TarOut::AsSent(f) => f,
                TarOut::Zstd(z) => z
                    .finish()
                    .map_err(|e| Error::io("finishing zstd compression of", &path, e))?,
                TarOut::Gzip(z) => z
                    .finish()
                    .map_err(|e| Error::io("finishing gzip compression of", &path, e))?,
                TarOut::Lz4(z) => z.finish().map_err(|e| {
                    Error::io(
                        "finishing lz4 compression of",
                        &path,
                        std::io::Error::other(e),
                    )
                })?,
            };
            if !self.options.no_sync {
                start_writeback(&file);
            }
            self.files.push(path);
        }
        Ok(())
    }

    fn commit(&mut self, manifest: Option<&[u8]>) -> Result<()> {
        if !self.options.no_sync {
            for f in &self.files {
                fsync_path(f, true)?;
            }
        }
        if let Some(m) = manifest {
            write_manifest(&self.dir, m, self.options.no_sync)?;
        } else if !self.options.no_sync {
            fsync_path(&self.dir, false)?;
        }
        self.created.clear();
        Ok(())
    }

    fn abort(&mut self, _reason: &Error) {
        self.current = None;
        if !self.options.keep_on_failure {
            remove_created(&mut self.created);
        }
    }
}

/// Writes the base archive as one tar stream to any writer (standard output for
/// `pg_basebackup -D - -Ft`), with the manifest added as the member `backup_manifest`
/// at the end, as pg_basebackup does. Only a cluster without user tablespaces fits in
/// one stream, and the manifest can only be added to an uncompressed stream (compress
/// the writer instead). The stream is verified like any other; it is only complete
/// once `commit` has written the manifest and the end-of-archive blocks.
///
/// ```
/// use basebackup::{BackupSink, TarStreamSink};
/// let sink = TarStreamSink::new(Vec::new());
/// assert!(sink.into_inner().is_empty());
/// ```
pub struct TarStreamSink<W: Write + Send> {
    out: W,
    /// The last bytes seen, held back: they may be the end-of-archive blocks, which
    /// must follow the manifest.
    tail: Vec<u8>,
}

impl<W: Write + Send> std::fmt::Debug for TarStreamSink<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TarStreamSink").finish_non_exhaustive()
    }
}

/// The size of the end-of-archive marker: two zero blocks.
const TAR_TRAILER: usize = 1024;

impl<W: Write + Send> TarStreamSink<W> {
    /// A sink writing to `out`.
    pub fn new(out: W) -> TarStreamSink<W> {
        TarStreamSink {
            out,
            tail: Vec::with_capacity(2 * TAR_TRAILER),
        }
    }

    /// The writer back (to finish a compressor around it, for example).
    pub fn into_inner(self) -> W {
        self.out
    }

    fn put(&mut self, data: &[u8]) -> Result<()> {
        self.out
            .write_all(data)
            .map_err(|e| Error::io("writing", Path::new("the output stream"), e))
    }
}

impl<W: Write + Send> BackupSink for TarStreamSink<W> {
    fn begin_backup(&mut self, info: &BackupInfo) -> Result<()> {
        if info.tablespaces.len() > 1 {
            return Err(Error::usage(
                format!(
                    "can only write single tablespace to stdout, database has {}",
                    info.tablespaces.len()
                ),
                "write the backup into a directory instead",
            ));
        }
        Ok(())
    }

    fn begin_archive(&mut self, archive: &ArchiveInfo) -> Result<()> {
        if archive.compression.is_some() {
            return Err(Error::usage(
                "cannot inject manifest into a compressed tar file",
                "use client-side compression, or write the backup into a directory",
            ));
        }
        self.tail.clear();
        Ok(())
    }

    fn archive_bytes(&mut self, data: &Bytes) -> Result<()> {
        self.tail.extend_from_slice(data);
        if self.tail.len() > TAR_TRAILER {
            let keep_from = self.tail.len() - TAR_TRAILER;
            let ready: Vec<u8> = self.tail.drain(..keep_from).collect();
            self.put(&ready)?;
        }
        Ok(())
    }

    fn end_archive(&mut self, trailer_present: bool) -> Result<()> {
        if trailer_present {
            if self.tail.len() != TAR_TRAILER || self.tail.iter().any(|&b| b != 0) {
                return Err(Error::protocol(
                    "the archive does not end with the end-of-archive blocks",
                ));
            }
            self.tail.clear();
        } else {
            let tail = std::mem::take(&mut self.tail);
            self.put(&tail)?;
        }
        Ok(())
    }

    fn commit(&mut self, manifest: Option<&[u8]>) -> Result<()> {
        if let Some(manifest) = manifest {
            let header = regular_member_header("backup_manifest", manifest.len() as u64)?;
            self.put(header.as_bytes())?;
            self.put(manifest)?;
            let padding = (512 - manifest.len() % 512) % 512;
            self.put(&[0u8; 512][..padding])?;
        }
        self.put(&[0u8; TAR_TRAILER])?;
        self.out
            .flush()
            .map_err(|e| Error::io("flushing", Path::new("the output stream"), e))
    }

    fn abort(&mut self, _reason: &Error) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_stream_puts_the_manifest_before_the_end_blocks() {
        let base = ArchiveInfo {
            name: "base.tar".into(),
            tablespace: Tablespace {
                oid: None,
                location: None,
                size_estimate: None,
            },
            compression: None,
        };
        let mut member = tar::Header::new_ustar();
        member.set_path("PG_VERSION").unwrap();
        member.set_size(3);
        member.set_cksum();
        let mut stream = member.as_bytes().to_vec();
        stream.extend_from_slice(b"15\n");
        stream.resize(1024, 0);
        stream.extend_from_slice(&[0u8; 1024]);
        let mut sink = TarStreamSink::new(Vec::new());
        sink.begin_archive(&base).unwrap();
        // In uneven pieces, as the network delivers them.
        for piece in stream.chunks(700) {
            sink.archive_bytes(&Bytes::copy_from_slice(piece)).unwrap();
        }
        sink.end_archive(true).unwrap();
        sink.commit(Some(b"{}")).unwrap();
        let out = sink.into_inner();
        let mut archive = tar::Archive::new(out.as_slice());
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["PG_VERSION", "backup_manifest"]);
        assert!(out.ends_with(&[0u8; 1024]));

        // 13/14 send no end blocks: everything is data.
        let mut sink = TarStreamSink::new(Vec::new());
        sink.begin_archive(&base).unwrap();
        sink.archive_bytes(&Bytes::copy_from_slice(&stream[..1024]))
            .unwrap();
        sink.end_archive(false).unwrap();
        sink.commit(None).unwrap();
        assert_eq!(sink.into_inner().len(), 2048);
    }

    #[test]
    fn mapping_parse() {
        let mut m = TablespaceMapping::default();
        for bad in [
            "=/foo",
            "/foo=",
            "/foo=/bar=/baz",
            "foo=/bar",
            "/foo=bar",
            "/foo",
        ] {
            assert_eq!(
                m.parse_arg(bad).unwrap_err().kind(),
                crate::ErrorKind::Usage,
                "{bad}"
            );
        }
        m.parse_arg("/a//b/=/c").unwrap();
        assert_eq!(m.apply("/a/b"), PathBuf::from("/c"));
        assert_eq!(m.apply("/other"), PathBuf::from("/other"));
    }
}
