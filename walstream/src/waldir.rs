//! [`WalDir`]: a directory of WAL segments, byte-compatible with pg_receivewal.
//!
//! * A segment being received is `<24 hex digits>.partial`, pre-sized with zeros to the
//!   segment size (as pg_receivewal does), and is fsynced before its data is reported
//!   as flushed.
//! * A segment is complete when all its bytes are written **and verified**; it is then
//!   renamed durably (fsync the file, rename, fsync the directory) to its final name.
//! * With zstd compression, a completed segment is compressed to `<name>.zst` (one
//!   zstd frame recording the segment size) and the `.partial` is removed; restore with
//!   `restore_command = 'zstd -d -q -o %p /archive/%f.zst'`. pg_receivewal names its
//!   compressed files `.gz` and `.lz4` and knows nothing of `.zst`.
//! * Timeline history files are written via `<name>.tmp`, fsync, rename, fsync dir.
//!
//! All of this is synchronous `std::fs`; [`crate::receive`] runs it on a dedicated
//! thread so the network side never waits for the disk.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use pgwire_repl::types::wal_file_name;
use pgwire_repl::{Lsn, SystemId, TimelineId, WalSegmentSize};

use crate::error::{Error, Result};

const PARTIAL: &str = ".partial";
const ZSTD: &str = ".zst";
const GZIP: &str = ".gz";
const LZ4: &str = ".lz4";
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// What to do with completed segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Compression {
    /// Keep them as plain segments (what PostgreSQL's restore_command expects).
    #[default]
    None,
    /// Compress each completed segment to `<name>.zst` at this level (1–22; 3 is
    /// zstd's default).
    Zstd {
        /// The zstd level.
        level: i32,
    },
    /// pg_receivewal's `--compress=gzip`: each completed segment becomes `<name>.gz`,
    /// and a segment left incomplete when the writer closes becomes
    /// `<name>.gz.partial` (the bytes received so far, gzip-compressed). A resume
    /// restarts such a segment from its start, as pg_receivewal does.
    Gzip {
        /// The gzip level, 1–9.
        level: u32,
    },
    /// pg_receivewal's `--compress=lz4`: `<name>.lz4` and `<name>.lz4.partial` (LZ4
    /// frames), as for [`Compression::Gzip`]. The frames are written with LZ4's fast
    /// mode whatever the level.
    Lz4,
}

impl Compression {
    /// The suffix of a completed segment (`""`, `.zst`, `.gz`, `.lz4`).
    pub fn suffix(self) -> &'static str {
        match self {
            Compression::None => "",
            Compression::Zstd { .. } => ZSTD,
            Compression::Gzip { .. } => GZIP,
            Compression::Lz4 => LZ4,
        }
    }
}

/// Options of a [`WalDir`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalDirOptions {
    /// fsync files and the directory (default true). `false` is pg_receivewal's
    /// `--no-sync`: faster, but a crash of the machine can lose WAL that was reported
    /// as flushed.
    pub sync: bool,
    /// Compression of completed segments.
    pub compression: Compression,
}

impl Default for WalDirOptions {
    fn default() -> Self {
        WalDirOptions {
            sync: true,
            compression: Compression::None,
        }
    }
}

/// Where to resume, found from the files in a directory (pg_receivewal's
/// `FindStreamingStart`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumePoint {
    /// A segment start: the segment after the newest complete one, or the start of
    /// the newest partial one (which is streamed again from its start).
    pub lsn: Lsn,
    /// The timeline of that file.
    pub timeline: TimelineId,
    /// The file it was derived from.
    pub file: PathBuf,
}

/// A directory of WAL segments.
///
/// ```no_run
/// use pgwire_repl::{Lsn, SystemId, TimelineId, WalSegmentSize};
/// use walstream::{WalDir, WalDirOptions};
///
/// # fn demo() -> walstream::Result<()> {
/// let dir = WalDir::open("/var/lib/wal-archive", WalSegmentSize::DEFAULT, WalDirOptions::default())?;
/// let start = dir.find_streaming_start()?.map(|r| r.lsn).unwrap_or(Lsn(0x1000000));
/// let mut writer = dir.writer(TimelineId(1), start)?;
/// writer.write(start, &[0u8; 8192], start)?; // bytes at `start`, nothing verified yet
/// let flushed = writer.flush()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct WalDir {
    path: PathBuf,
    segment_size: WalSegmentSize,
    options: WalDirOptions,
}

impl WalDir {
    /// Opens (creating it with mode 0700 if missing) a WAL directory.
    pub fn open(
        path: impl Into<PathBuf>,
        segment_size: WalSegmentSize,
        options: WalDirOptions,
    ) -> Result<WalDir> {
        let path = path.into();
        if !path.is_dir() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&path)
                .map_err(|e| Error::file("creating the WAL directory", &path, e))?;
        }
        if let Compression::Zstd { level } = options.compression {
            if !zstd::compression_level_range().contains(&level) {
                return Err(Error::usage(
                    format!("zstd level {level} is out of range"),
                    "use a level from 1 to 22 (3 is the default)",
                ));
            }
        }
        if let Compression::Gzip { level } = options.compression {
            if !(1..=9).contains(&level) {
                return Err(Error::usage(
                    format!("gzip level {level} is out of range"),
                    "use a level from 1 to 9",
                ));
            }
        }
        Ok(WalDir {
            path,
            segment_size,
            options,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The segment size.
    pub fn segment_size(&self) -> WalSegmentSize {
        self.segment_size
    }

    /// The options.
    pub fn options(&self) -> WalDirOptions {
        self.options
    }

    /// Scans the directory like pg_receivewal's `FindStreamingStart`: the file with
    /// the highest segment number, then the highest timeline, complete preferred over
    /// partial. A complete file must have the full segment size (others are skipped
    /// with a warning). `None` for a directory without segments.
    pub fn find_streaming_start(&self) -> Result<Option<ResumePoint>> {
        let entries = fs::read_dir(&self.path)
            .map_err(|e| Error::file("reading the WAL directory", &self.path, e))?;
        // (segno, timeline, complete, path)
        let mut best: Option<(u64, u32, bool, PathBuf)> = None;
        let mut partials = std::collections::HashSet::new();
        let mut completes = std::collections::HashSet::new();
        for entry in entries {
            let entry =
                entry.map_err(|e| Error::file("reading the WAL directory", &self.path, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some((base, kind)) = classify(name) else {
                continue;
            };
            let Some((tli, segno)) = parse_segment_name(base, self.segment_size) else {
                continue;
            };
            let complete = match kind {
                FileKind::Partial => false,
                FileKind::Complete => {
                    let size = entry
                        .metadata()
                        .map_err(|e| Error::file("reading the size of", &entry.path(), e))?
                        .len();
                    if size != self.segment_size.bytes() {
                        tracing::warn!(file = %entry.path().display(), size, "segment file has the wrong size, skipping it");
                        continue;
                    }
                    true
                }
                FileKind::Zstd | FileKind::Gzip | FileKind::Lz4 => {
                    let size = match kind {
                        FileKind::Zstd => zstd_content_size(&entry.path())?,
                        FileKind::Gzip => gzip_content_size(&entry.path())?,
                        _ => lz4_content_size(&entry.path())?,
                    };
                    if size != Some(self.segment_size.bytes()) {
                        tracing::warn!(file = %entry.path().display(), "compressed segment does not hold a full segment, skipping it");
                        continue;
                    }
                    true
                }
            };
            if complete {
                completes.insert((segno, tli.0));
            } else {
                partials.insert((segno, tli.0));
            }
            let candidate = (segno, tli.0, complete);
            if best
                .as_ref()
                .is_none_or(|(s, t, c, _)| candidate > (*s, *t, *c))
            {
                best = Some((segno, tli.0, complete, entry.path()));
            }
        }
        Ok(best.map(|(segno, tli, complete, file)| {
            let mut segno = if complete { segno + 1 } else { segno };
            // Unlike pg_receivewal, a segment is completed only once verified, so an
            // interrupted run can leave a run of partials (the older ones written in
            // full, waiting for a record that continued into the next). Resume from
            // the oldest, or it would never be completed.
            if !complete {
                while segno > 0
                    && partials.contains(&(segno - 1, tli))
                    && !completes.contains(&(segno - 1, tli))
                {
                    segno -= 1;
                }
            }
            ResumePoint {
                lsn: Lsn(segno * self.segment_size.bytes()),
                timeline: TimelineId(tli),
                file,
            }
        }))
    }

    /// The system identifier in the long page header of an uncompressed segment file
    /// (`None` for compressed or never-written files), to check that a directory holds
    /// WAL of the server it is about to receive from.
    pub fn file_system_id(&self, path: &Path) -> Result<Option<SystemId>> {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if name.is_some_and(|n| {
            let n = n.strip_suffix(PARTIAL).unwrap_or(&n);
            n.ends_with(ZSTD) || n.ends_with(GZIP) || n.ends_with(LZ4)
        }) {
            return Ok(None);
        }
        let file = File::open(path).map_err(|e| Error::file("opening", path, e))?;
        let mut header = [0u8; 32];
        match file.read_exact_at(&mut header, 0) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(Error::file("reading", path, e)),
        }
        // xlp_magic == 0: a pre-sized file nothing was written to yet.
        if header[0..2] == [0, 0] {
            return Ok(None);
        }
        let mut sysid = [0u8; 8];
        sysid.copy_from_slice(&header[24..32]);
        // WAL is in the server's byte order; all supported platforms are little-endian.
        Ok(Some(SystemId(u64::from_le_bytes(sysid))))
    }

    /// True if the history file of `timeline` is present.
    pub fn has_history(&self, timeline: TimelineId) -> bool {
        self.path.join(timeline.history_file_name()).is_file()
    }

    /// Writes a timeline history file durably (temporary file, fsync, rename, fsync
    /// the directory).
    pub fn write_history(&self, timeline: TimelineId, content: &[u8]) -> Result<()> {
        let name = timeline.history_file_name();
        let tmp = self.path.join(format!("{name}.tmp"));
        let path = self.path.join(&name);
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| Error::file("creating", &tmp, e))?;
        file.write_all(content)
            .map_err(|e| Error::file("writing", &tmp, e))?;
        self.durable_rename(&file, &tmp, &path)
    }

    /// A writer for `timeline` starting at `start`, which must be a segment start.
    pub fn writer(&self, timeline: TimelineId, start: Lsn) -> Result<SegmentWriter> {
        if start.segment_offset(self.segment_size) != 0 {
            return Err(Error::usage(
                format!("WAL writing must start at a segment start, not at {start}"),
                "round the start position down to its segment start",
            ));
        }
        Ok(SegmentWriter {
            dir: self.clone(),
            timeline,
            written: start,
            flushed: start,
            verified: start,
            current: None,
            full: Vec::new(),
            completed: 0,
        })
    }

    fn segment_path(&self, timeline: TimelineId, segno: u64, suffix: &str) -> PathBuf {
        self.path.join(format!(
            "{}{suffix}",
            wal_file_name(timeline, segno, self.segment_size)
        ))
    }

    fn sync_file(&self, file: &File, path: &Path) -> Result<()> {
        if self.options.sync {
            file.sync_all()
                .map_err(|e| Error::file("fsyncing", path, e))?;
        }
        Ok(())
    }

    fn sync_dir(&self) -> Result<()> {
        if self.options.sync {
            File::open(&self.path)
                .and_then(|d| d.sync_all())
                .map_err(|e| Error::file("fsyncing the directory", &self.path, e))?;
        }
        Ok(())
    }

    fn durable_rename(&self, file: &File, from: &Path, to: &Path) -> Result<()> {
        self.sync_file(file, from)?;
        fs::rename(from, to).map_err(|e| {
            Error::io(
                format!("renaming {} to {}", from.display(), to.display()),
                e,
            )
        })?;
        self.sync_dir()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileKind {
    Complete,
    Partial,
    Zstd,
    Gzip,
    Lz4,
}

fn classify(name: &str) -> Option<(&str, FileKind)> {
    if let Some(base) = name.strip_suffix(PARTIAL) {
        // `.partial`, and pg_receivewal's compressed `.gz.partial` / `.lz4.partial`.
        let base = base
            .strip_suffix(GZIP)
            .or_else(|| base.strip_suffix(LZ4))
            .unwrap_or(base);
        Some((base, FileKind::Partial))
    } else if let Some(base) = name.strip_suffix(ZSTD) {
        Some((base, FileKind::Zstd))
    } else if let Some(base) = name.strip_suffix(GZIP) {
        Some((base, FileKind::Gzip))
    } else if let Some(base) = name.strip_suffix(LZ4) {
        Some((base, FileKind::Lz4))
    } else {
        Some((name, FileKind::Complete))
    }
}

/// The uncompressed size of a gzip file as its trailer records it (modulo 2^32, which
/// is exact for segments below 4 GB). `None` when the file is too short.
fn gzip_content_size(path: &Path) -> Result<Option<u64>> {
    let file = File::open(path).map_err(|e| Error::file("opening", path, e))?;
    let len = file
        .metadata()
        .map_err(|e| Error::file("reading the size of", path, e))?
        .len();
    if len < 18 {
        return Ok(None);
    }
    let mut isize = [0u8; 4];
    file.read_exact_at(&mut isize, len - 4)
        .map_err(|e| Error::file("reading", path, e))?;
    Ok(Some(u64::from(u32::from_le_bytes(isize))))
}

/// The uncompressed size of an LZ4 frame file, by decompressing it (as pg_receivewal
/// does). `None` when it does not decompress.
fn lz4_content_size(path: &Path) -> Result<Option<u64>> {
    let file = File::open(path).map_err(|e| Error::file("opening", path, e))?;
    let mut decoder = lz4_flex::frame::FrameDecoder::new(std::io::BufReader::new(file));
    match std::io::copy(&mut decoder, &mut std::io::sink()) {
        Ok(n) => Ok(Some(n)),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot decompress LZ4 file");
            Ok(None)
        }
    }
}

/// `IsXLogFileName`: exactly 24 upper-case hex digits.
fn parse_segment_name(name: &str, size: WalSegmentSize) -> Option<(TimelineId, u64)> {
    if name.len() != 24
        || !name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
    {
        return None;
    }
    pgwire_repl::types::parse_wal_file_name(name, size)
}

/// The content size recorded in a zstd file's frame header.
fn zstd_content_size(path: &Path) -> Result<Option<u64>> {
    let mut head = [0u8; 18];
    let mut file = File::open(path).map_err(|e| Error::file("opening", path, e))?;
    let mut read = 0;
    while read < head.len() {
        match file.read(&mut head[read..]) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) => return Err(Error::file("reading", path, e)),
        }
    }
    Ok(zstd::zstd_safe::get_frame_content_size(&head[..read])
        .ok()
        .flatten())
}

/// An open `.partial` segment.
#[derive(Debug)]
struct OpenSegment {
    segno: u64,
    file: File,
    path: PathBuf,
    dirty: bool,
}

/// Writes one timeline's WAL into a [`WalDir`], from a segment start on.
///
/// Bytes must come in order ([`SegmentWriter::write`] checks). Each call also says how
/// far the WAL is verified; a segment whose bytes are all written is renamed to its
/// final name only once the verified position reaches its end, and
/// [`SegmentWriter::flush`] never reports more than is verified.
#[derive(Debug)]
pub struct SegmentWriter {
    dir: WalDir,
    timeline: TimelineId,
    written: Lsn,
    flushed: Lsn,
    verified: Lsn,
    current: Option<OpenSegment>,
    /// Segments with every byte written, waiting for verification to reach their end.
    full: Vec<OpenSegment>,
    completed: u64,
}

impl SegmentWriter {
    /// The end of what was written.
    pub fn written(&self) -> Lsn {
        self.written
    }

    /// The end of what is durably flushed and verified (what may be reported as
    /// flushed).
    pub fn flushed(&self) -> Lsn {
        self.flushed
    }

    /// The number of segments completed (renamed) by this writer.
    pub fn completed_segments(&self) -> u64 {
        self.completed
    }

    /// The timeline written.
    pub fn timeline(&self) -> TimelineId {
        self.timeline
    }

    /// Writes `data`, the WAL at `lsn` (which must be [`SegmentWriter::written`]),
    /// splitting it at segment boundaries, and notes that everything before
    /// `verified` has been verified.
    pub fn write(&mut self, lsn: Lsn, data: &[u8], verified: Lsn) -> Result<()> {
        if lsn != self.written {
            return Err(Error::state(
                format!(
                    "WAL for {lsn} arrived while the writer is at {}",
                    self.written
                ),
                "this is a bug in the caller: WAL must be written in order without gaps",
            ));
        }
        let size = self.dir.segment_size.bytes();
        let mut rest = data;
        while !rest.is_empty() {
            let offset = self.written.segment_offset(self.dir.segment_size);
            let segno = self.written.segment_number(self.dir.segment_size);
            if self.current.is_none() {
                if offset != 0 {
                    return Err(Error::state(
                        format!("received WAL for offset {offset} of a segment with no file open"),
                        "streaming must start at a segment start",
                    ));
                }
                self.current = Some(self.open_segment(segno)?);
            }
            let n = rest.len().min((size - offset) as usize);
            let (chunk, tail) = rest.split_at(n);
            if let Some(seg) = self.current.as_mut() {
                seg.file
                    .write_all_at(chunk, offset)
                    .map_err(|e| Error::file("writing", &seg.path, e))?;
                seg.dirty = true;
            }
            self.written = Lsn(self.written.0 + n as u64);
            rest = tail;
            if self.written.segment_offset(self.dir.segment_size) == 0 {
                if let Some(seg) = self.current.take() {
                    self.full.push(seg);
                }
            }
        }
        self.set_verified(verified)
    }

    /// Notes that everything before `verified` is verified; completes the segments
    /// that are now whole and verified.
    pub fn set_verified(&mut self, verified: Lsn) -> Result<()> {
        self.verified = self.verified.max(verified.min(self.written));
        let size = self.dir.segment_size.bytes();
        while let Some(seg) = self.full.first() {
            if (seg.segno + 1) * size > self.verified.0 {
                break;
            }
            let seg = self.full.remove(0);
            self.complete(seg)?;
        }
        Ok(())
    }

    /// fsyncs what was written and returns the new flushed position (never beyond
    /// what is verified).
    pub fn flush(&mut self) -> Result<Lsn> {
        for seg in self.full.iter_mut().chain(self.current.as_mut()) {
            if seg.dirty {
                self.dir.sync_file(&seg.file, &seg.path)?;
                seg.dirty = false;
            }
        }
        self.flushed = self.flushed.max(self.verified.min(self.written));
        Ok(self.flushed)
    }

    /// Flushes and closes the files. Segments not completely written and verified stay
    /// `.partial` (pg_receivewal: "not renaming …, segment is not complete"). Returns
    /// the flushed position.
    pub fn close(mut self) -> Result<Lsn> {
        let flushed = self.flush()?;
        let size = self.dir.segment_size.bytes();
        let open: Vec<OpenSegment> = self.full.drain(..).chain(self.current.take()).collect();
        if matches!(
            self.dir.options.compression,
            Compression::Gzip { .. } | Compression::Lz4
        ) {
            // pg_receivewal's layout: an incomplete segment is kept compressed as
            // `<name><suffix>.partial` with the bytes written so far.
            for seg in open {
                let len = self.written.0.saturating_sub(seg.segno * size).min(size);
                self.compress_partial(&seg, len)?;
            }
        }
        Ok(flushed)
    }

    fn compress_partial(&self, seg: &OpenSegment, len: u64) -> Result<()> {
        let dir = &self.dir;
        let suffix = dir.options.compression.suffix();
        let target = dir.segment_path(self.timeline, seg.segno, &format!("{suffix}{PARTIAL}"));
        let tmp = dir.segment_path(self.timeline, seg.segno, &format!("{suffix}.tmp"));
        let out = compress_file(&seg.file, &seg.path, &tmp, dir.options.compression, len)?;
        dir.durable_rename(&out, &tmp, &target)?;
        fs::remove_file(&seg.path).map_err(|e| Error::file("removing", &seg.path, e))?;
        dir.sync_dir()
    }

    fn open_segment(&self, segno: u64) -> Result<OpenSegment> {
        let dir = &self.dir;
        let size = dir.segment_size.bytes();
        let path = dir.segment_path(self.timeline, segno, PARTIAL);
        let existing = match fs::metadata(&path) {
            Ok(meta) => Some(meta.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::file("checking", &path, e)),
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::file("opening", &path, e))?;
        match existing {
            // A partial from an earlier run: reuse it, writing over it from the start.
            Some(len) if len == size => {
                dir.sync_file(&file, &path)?;
            }
            None | Some(0) => {
                let mut offset = 0;
                while offset < size {
                    let n = ZEROS.len().min((size - offset) as usize);
                    file.write_all_at(&ZEROS[..n], offset)
                        .map_err(|e| Error::file("pre-sizing", &path, e))?;
                    offset += n as u64;
                }
                dir.sync_file(&file, &path)?;
                dir.sync_dir()?;
            }
            Some(len) => {
                return Err(Error::state(
                    format!(
                        "WAL file {} has {len} bytes, should be 0 or {size}",
                        path.display()
                    ),
                    "the file is damaged or was written by something else; move it away and start again",
                ))
            }
        }
        Ok(OpenSegment {
            segno,
            file,
            path,
            dirty: false,
        })
    }

    fn complete(&mut self, seg: OpenSegment) -> Result<()> {
        let dir = &self.dir;
        match dir.options.compression {
            Compression::None => {
                let target = dir.segment_path(self.timeline, seg.segno, "");
                dir.durable_rename(&seg.file, &seg.path, &target)?;
            }
            Compression::Zstd { level } => {
                dir.sync_file(&seg.file, &seg.path)?;
                let target = dir.segment_path(self.timeline, seg.segno, ZSTD);
                let tmp = dir.segment_path(self.timeline, seg.segno, ".zst.tmp");
                let out = compress_file(
                    &seg.file,
                    &seg.path,
                    &tmp,
                    Compression::Zstd { level },
                    dir.segment_size.bytes(),
                )?;
                dir.durable_rename(&out, &tmp, &target)?;
                fs::remove_file(&seg.path).map_err(|e| Error::file("removing", &seg.path, e))?;
                dir.sync_dir()?;
            }
            compression @ (Compression::Gzip { .. } | Compression::Lz4) => {
                let suffix = compression.suffix();
                let target = dir.segment_path(self.timeline, seg.segno, suffix);
                let tmp = dir.segment_path(self.timeline, seg.segno, &format!("{suffix}.tmp"));
                let out = compress_file(
                    &seg.file,
                    &seg.path,
                    &tmp,
                    compression,
                    dir.segment_size.bytes(),
                )?;
                dir.durable_rename(&out, &tmp, &target)?;
                fs::remove_file(&seg.path).map_err(|e| Error::file("removing", &seg.path, e))?;
                // A compressed partial of this segment left by an earlier run is stale.
                for stale in [".gz.partial", ".lz4.partial"] {
                    let _ = fs::remove_file(dir.segment_path(self.timeline, seg.segno, stale));
                }
                dir.sync_dir()?;
            }
        }
        self.completed += 1;
        // The segment is now fsynced under its final name (durable_rename syncs the file
        // and the directory): it counts as flushed, as pg_receivewal reports a segment
        // it has closed, so that a slot follows every completed segment without waiting
        // for an explicit flush.
        self.flushed = self
            .flushed
            .max(Lsn((seg.segno + 1) * dir.segment_size.bytes()));
        tracing::debug!(segment = %wal_file_name(self.timeline, seg.segno, dir.segment_size), "segment complete");
        Ok(())
    }
}

/// Compresses the first `len` bytes of `source` into `tmp` (`Compression::None` copies
/// them). A zstd frame records `len` in its header, which the resume scan checks.
fn compress_file(
    source: &File,
    source_path: &Path,
    tmp: &Path,
    compression: Compression,
    len: u64,
) -> Result<File> {
    enum Encoder<'a> {
        Plain(&'a File),
        Zstd(zstd::Encoder<'static, &'a File>),
        Gzip(flate2::write::GzEncoder<&'a File>),
        Lz4(lz4_flex::frame::FrameEncoder<&'a File>),
    }
    let out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(tmp)
        .map_err(|e| Error::file("creating", tmp, e))?;
    let failed = |e| Error::file("compressing into", tmp, e);
    {
        let mut encoder = match compression {
            Compression::None => Encoder::Plain(&out),
            Compression::Zstd { level } => {
                let mut encoder = zstd::Encoder::new(&out, level).map_err(failed)?;
                encoder.set_pledged_src_size(Some(len)).map_err(failed)?;
                Encoder::Zstd(encoder)
            }
            Compression::Gzip { level } => Encoder::Gzip(flate2::write::GzEncoder::new(
                &out,
                flate2::Compression::new(level),
            )),
            Compression::Lz4 => Encoder::Lz4(lz4_flex::frame::FrameEncoder::new(&out)),
        };
        let mut buf = vec![0u8; 1 << 20];
        let mut offset = 0u64;
        while offset < len {
            let n = buf.len().min((len - offset) as usize);
            source
                .read_exact_at(&mut buf[..n], offset)
                .map_err(|e| Error::file("reading", source_path, e))?;
            match &mut encoder {
                Encoder::Plain(w) => w.write_all(&buf[..n]),
                Encoder::Zstd(w) => w.write_all(&buf[..n]),
                Encoder::Gzip(w) => w.write_all(&buf[..n]),
                Encoder::Lz4(w) => w.write_all(&buf[..n]),
            }
            .map_err(failed)?;
            offset += n as u64;
        }
        match encoder {
            Encoder::Plain(_) => {}
            Encoder::Zstd(w) => {
                w.finish().map_err(failed)?;
            }
            Encoder::Gzip(w) => {
                w.finish().map_err(failed)?;
            }
            Encoder::Lz4(w) => {
                w.finish().map_err(|e| failed(std::io::Error::other(e)))?;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    fn dir(options: WalDirOptions) -> (tempfile::TempDir, WalDir) {
        let tmp = tempfile::tempdir().unwrap();
        let size = WalSegmentSize::new(MB).unwrap();
        let d = WalDir::open(tmp.path().join("wal"), size, options).unwrap();
        (tmp, d)
    }

    fn names(d: &WalDir) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn partial_is_presized_and_completed_only_when_verified() {
        let (_t, d) = dir(WalDirOptions::default());
        let mut w = d.writer(TimelineId(1), Lsn(MB)).unwrap();
        w.write(Lsn(MB), &[7u8; 1000], Lsn(MB)).unwrap();
        assert_eq!(names(&d), ["000000010000000000000001.partial"]);
        let len = fs::metadata(d.path().join("000000010000000000000001.partial"))
            .unwrap()
            .len();
        assert_eq!(len, MB);
        // Nothing verified yet: nothing flushed.
        assert_eq!(w.flush().unwrap(), Lsn(MB));
        // Fill the segment and 10 bytes of the next; verification lags behind.
        let rest = vec![9u8; (MB - 1000 + 10) as usize];
        w.write(Lsn(MB + 1000), &rest, Lsn(MB + 500)).unwrap();
        assert_eq!(
            names(&d),
            [
                "000000010000000000000001.partial",
                "000000010000000000000002.partial"
            ]
        );
        assert_eq!(w.flush().unwrap(), Lsn(MB + 500));
        w.set_verified(Lsn(2 * MB + 4)).unwrap();
        assert_eq!(
            names(&d),
            [
                "000000010000000000000001",
                "000000010000000000000002.partial"
            ]
        );
        // The completed segment is durable without a flush: it counts as flushed at
        // once, as pg_receivewal reports a segment it closed.
        assert_eq!(w.flushed(), Lsn(2 * MB));
        assert_eq!(w.close().unwrap(), Lsn(2 * MB + 4));
        let data = fs::read(d.path().join("000000010000000000000001")).unwrap();
        assert!(data[..1000].iter().all(|&b| b == 7));
        assert!(data[1000..].iter().all(|&b| b == 9));
        let resume = d.find_streaming_start().unwrap().unwrap();
        assert_eq!((resume.lsn, resume.timeline), (Lsn(2 * MB), TimelineId(1)));
        assert!(resume.file.ends_with("000000010000000000000002.partial"));
        // The long page header's system identifier is read back.
        let mut header = vec![0u8; 40];
        header[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
        header[24..32].copy_from_slice(&7712258631147479762u64.to_le_bytes());
        let path = d.path().join("000000010000000000000009");
        fs::write(&path, &header).unwrap();
        assert_eq!(
            d.file_system_id(&path).unwrap(),
            Some(SystemId(7712258631147479762))
        );
        fs::write(&path, [0u8; 40]).unwrap();
        assert_eq!(d.file_system_id(&path).unwrap(), None);
    }

    #[test]
    fn scan_prefers_higher_segment_then_timeline_then_complete() {
        let (_t, d) = dir(WalDirOptions::default());
        let full = vec![0u8; MB as usize];
        fs::write(d.path().join("000000010000000000000005"), &full).unwrap();
        fs::write(d.path().join("000000010000000000000006.partial"), &full).unwrap();
        fs::write(d.path().join("000000020000000000000006.partial"), &full).unwrap();
        fs::write(d.path().join("00000002.history"), b"1\t0/6000000\tx\n").unwrap();
        // Wrong size: skipped. Lower case: not a WAL name.
        fs::write(d.path().join("000000020000000000000007"), b"short").unwrap();
        fs::write(d.path().join("00000002000000000000000a"), &full).unwrap();
        let resume = d.find_streaming_start().unwrap().unwrap();
        assert_eq!((resume.lsn, resume.timeline), (Lsn(6 * MB), TimelineId(2)));
        fs::write(d.path().join("000000020000000000000006"), &full).unwrap();
        assert_eq!(d.find_streaming_start().unwrap().unwrap().lsn, Lsn(7 * MB));
        // A run of partials on one timeline resumes from its oldest.
        fs::write(d.path().join("000000020000000000000007.partial"), &full).unwrap();
        fs::write(d.path().join("000000020000000000000008.partial"), &full).unwrap();
        assert_eq!(d.find_streaming_start().unwrap().unwrap().lsn, Lsn(7 * MB));
    }

    #[test]
    fn resumes_over_an_existing_partial_and_refuses_odd_sizes() {
        let (_t, d) = dir(WalDirOptions::default());
        fs::write(
            d.path().join("000000010000000000000003.partial"),
            vec![1u8; MB as usize],
        )
        .unwrap();
        let mut w = d.writer(TimelineId(1), Lsn(3 * MB)).unwrap();
        w.write(Lsn(3 * MB), &[2u8; 10], Lsn(3 * MB + 10)).unwrap();
        w.close().unwrap();
        let data = fs::read(d.path().join("000000010000000000000003.partial")).unwrap();
        assert_eq!(&data[..11], &[2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 1]);

        fs::write(d.path().join("000000010000000000000004.partial"), b"odd").unwrap();
        let mut w = d.writer(TimelineId(1), Lsn(4 * MB)).unwrap();
        let err = w.write(Lsn(4 * MB), &[0u8; 4], Lsn(4 * MB)).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::State);
        assert!(err.to_string().contains("should be 0 or"), "{err}");
    }

    #[test]
    fn refuses_gaps_and_mid_segment_starts() {
        let (_t, d) = dir(WalDirOptions::default());
        assert!(d.writer(TimelineId(1), Lsn(MB + 8)).is_err());
        let mut w = d.writer(TimelineId(1), Lsn(MB)).unwrap();
        assert!(w.write(Lsn(MB + 8), &[0u8; 4], Lsn(MB)).is_err());
    }

    #[test]
    fn gzip_and_lz4_keep_pg_receivewal_names_for_complete_and_partial_segments() {
        use std::io::Read as _;
        for (compression, suffix) in [
            (Compression::Gzip { level: 1 }, ".gz"),
            (Compression::Lz4, ".lz4"),
        ] {
            let (_t, d) = dir(WalDirOptions {
                sync: false,
                compression,
            });
            let mut w = d.writer(TimelineId(1), Lsn(MB)).unwrap();
            let data: Vec<u8> = (0..MB + 1000).map(|i| (i % 251) as u8).collect();
            w.write(Lsn(MB), &data, Lsn(2 * MB + 1000)).unwrap();
            w.close().unwrap();
            assert_eq!(
                names(&d),
                [
                    format!("000000010000000000000001{suffix}"),
                    format!("000000010000000000000002{suffix}.partial"),
                ]
            );
            let unpack = |name: &str| {
                let file = File::open(d.path().join(name)).unwrap();
                let mut out = Vec::new();
                if suffix == ".gz" {
                    flate2::read::GzDecoder::new(file)
                        .read_to_end(&mut out)
                        .unwrap();
                } else {
                    lz4_flex::frame::FrameDecoder::new(file)
                        .read_to_end(&mut out)
                        .unwrap();
                }
                out
            };
            assert_eq!(
                unpack(&format!("000000010000000000000001{suffix}")),
                data[..MB as usize]
            );
            assert_eq!(
                unpack(&format!("000000010000000000000002{suffix}.partial")),
                data[MB as usize..]
            );
            // The partial segment is streamed again from its start.
            let resume = d.find_streaming_start().unwrap().unwrap();
            assert_eq!(resume.lsn, Lsn(2 * MB));
            assert_eq!(d.file_system_id(&resume.file).unwrap(), None);
            // Completing it replaces the compressed partial.
            let mut w = d.writer(TimelineId(1), Lsn(2 * MB)).unwrap();
            w.write(Lsn(2 * MB), &data[..MB as usize], Lsn(3 * MB))
                .unwrap();
            w.close().unwrap();
            assert_eq!(
                names(&d),
                [
                    format!("000000010000000000000001{suffix}"),
                    format!("000000010000000000000002{suffix}"),
                ]
            );
            assert_eq!(d.find_streaming_start().unwrap().unwrap().lsn, Lsn(3 * MB));
        }
    }

    #[test]
    fn zstd_completes_into_a_zst_file_the_scan_accepts() {
        let (_t, d) = dir(WalDirOptions {
            sync: false,
            compression: Compression::Zstd { level: 3 },
        });
        let mut w = d.writer(TimelineId(1), Lsn(MB)).unwrap();
        let data: Vec<u8> = (0..MB).map(|i| (i % 251) as u8).collect();
        w.write(Lsn(MB), &data, Lsn(2 * MB)).unwrap();
        w.close().unwrap();
        assert_eq!(names(&d), ["000000010000000000000001.zst"]);
        let packed = fs::read(d.path().join("000000010000000000000001.zst")).unwrap();
        assert_eq!(zstd::decode_all(&packed[..]).unwrap(), data);
        assert_eq!(d.find_streaming_start().unwrap().unwrap().lsn, Lsn(2 * MB));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(12))]
        /// Any chunking of the stream, and any lag of verification, gives the same
        /// files: complete segments equal to the input, the rest partial.
        #[test]
        fn any_chunking_gives_the_same_files(
            cuts in proptest::collection::vec(1usize..400_000, 1..40),
            lag in 0u64..300_000,
        ) {
            let (_t, d) = dir(WalDirOptions { sync: false, compression: Compression::None });
            let total = 2 * MB as usize + 12_345;
            let input: Vec<u8> = (0..total).map(|i| (i * 7 % 253) as u8).collect();
            let mut w = d.writer(TimelineId(1), Lsn(MB)).unwrap();
            let mut at = 0;
            let mut cut = cuts.iter().cycle();
            while at < total {
                let n = (*cut.next().unwrap()).min(total - at);
                let end = Lsn(MB + (at + n) as u64);
                let verified = Lsn(end.0.saturating_sub(lag).max(MB));
                w.write(Lsn(MB + at as u64), &input[at..at + n], verified).unwrap();
                at += n;
            }
            w.set_verified(Lsn(MB + total as u64)).unwrap();
            assert_eq!(w.close().unwrap(), Lsn(MB + total as u64));
            let first = fs::read(d.path().join("000000010000000000000001")).unwrap();
            let second = fs::read(d.path().join("000000010000000000000002")).unwrap();
            let third = fs::read(d.path().join("000000010000000000000003.partial")).unwrap();
            proptest::prop_assert!(first[..] == input[..MB as usize]);
            proptest::prop_assert!(second[..] == input[MB as usize..2 * MB as usize]);
            proptest::prop_assert!(third[..12_345] == input[2 * MB as usize..]);
            proptest::prop_assert!(third[12_345..].iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn history_files_are_written_whole() {
        let (_t, d) = dir(WalDirOptions::default());
        assert!(!d.has_history(TimelineId(2)));
        d.write_history(
            TimelineId(2),
            b"1\t0/9000090\tno recovery target specified\n",
        )
        .unwrap();
        assert!(d.has_history(TimelineId(2)));
        assert_eq!(names(&d), ["00000002.history"]);
    }
}
