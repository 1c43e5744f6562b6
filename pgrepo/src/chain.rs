//! Chains of incremental backups: loading and checking a chain, and restoring it in one
//! pass.
//!
//! The newest backup's archives are read in order, as a normal restore reads them, and
//! turned on the fly into the tar stream of the combined backup: whole files pass
//! through; each `INCREMENTAL.<name>` file is rebuilt block by block from forward-only
//! readers on the same file in the older backups (the frame that holds it, fetched by
//! ranged GETs and decompressed), as [`basebackup::incremental::plan_file`] decides.
//! Every input file is read to its end and checked against its own backup's manifest.
//! The synthesized stream goes through the same verifying pipeline as any restore,
//! with a manifest for the combined result built as the stream is made.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use basebackup::incremental::{
    plan_file, whole_file_name, BlockSource, FilePlan, FileVersion, IncrementalError,
    IncrementalHeader, DEFAULT_BLOCK_SIZE, DEFAULT_SEGMENT_BLOCKS, INCREMENTAL_PREFIX,
};
use basebackup::manifest::{FileChecksum, ManifestFile};
use basebackup::replay::Replay;
use basebackup::{ArchiveInfo, BackupSink, Bytes, ChecksumAlgorithm, Manifest, Tablespace};
use futures::StreamExt;
use object_store::ObjectStoreExt;
use sha2::Digest;
use tokio::sync::mpsc;

use crate::delta::Msg;
use crate::error::{Error, Result};
use crate::layout::{ArchiveIndex, CommitRecord, IndexFrame, StoredCompression};
use crate::repository::Repository;
use crate::restore::{read_manifest, stored_archive, DownloadOptions, ReadSummary};

/// Backups in a chain at most (a guard against a cycle of parents).
const MAX_CHAIN: usize = 1000;

/// Loads the chain of `newest`: its commit record, its parent's, and so on down to the
/// full backup, newest first. A parent that is missing or not committed is an error
/// naming it; so is a chain whose LSNs or timelines do not link.
pub async fn load_chain(repo: &Repository, newest: CommitRecord) -> Result<Vec<CommitRecord>> {
    let mut chain = vec![newest];
    let mut seen = HashSet::new();
    while let Some(parent) = chain.last().and_then(|r| r.parent.clone()) {
        let child = &chain[chain.len() - 1].label;
        if !seen.insert(parent.clone()) || chain.len() >= MAX_CHAIN {
            return Err(Error::verify(
                format!("backup {child}"),
                format!("its chain of parents loops back to {parent}"),
            ));
        }
        let record = repo.backup(&parent).await.map_err(|e| {
            Error::usage(
                format!(
                    "backup {child} is incremental on top of {parent}, which is missing or \
                     not committed ({})",
                    e.message()
                ),
                "the chain cannot be restored; restore an older complete chain or a full \
                 backup (see `clone-standby list`), and take a new full backup",
            )
        })?;
        chain.push(record);
    }
    check_links(&chain)?;
    for pair in chain.windows(2) {
        let (child, parent) = (&pair[0], &pair[1]);
        if child.start_timeline != parent.end_timeline {
            // Without an archived history file the server's own check when it took
            // the backup (its WAL summaries follow the timeline history) stands.
            let object =
                crate::walnames::history_object(pgwire_repl::TimelineId(child.start_timeline));
            if let Some(history) = repo.get_optional(&repo.path(&object), 1 << 20).await? {
                check_descends(child, parent, &history)?;
            }
        }
    }
    // Each incremental backup's backup_label must name its parent's start: the parent
    // in the repository is the one the server compared against.
    for pair in chain.windows(2) {
        let label = read_backup_label(repo, &pair[0]).await?;
        check_incremental_from(&label, &pair[0].label, &pair[1])?;
    }
    Ok(chain)
}

/// Reads `record`'s backup_label from its base archive (only the frame holding it when
/// the archive has an index, else the archive up to it: it comes first) and checks it
/// against the manifest.
async fn read_backup_label(repo: &Repository, record: &CommitRecord) -> Result<Vec<u8>> {
    let (_, manifest) = read_manifest(repo, record).await?;
    let expected = manifest
        .files
        .iter()
        .find(|f| f.path == b"backup_label")
        .cloned();
    let describe_backup = format!("backup {}", record.label);
    let Some(expected) = expected else {
        return Err(Error::verify(
            describe_backup,
            "its manifest lists no backup_label",
        ));
    };
    let Some(base) = record.archives.iter().find(|a| a.tablespace_oid.is_none()) else {
        return Err(Error::verify(describe_backup, "it has no base archive"));
    };
    let (path, describe, size) = stored_archive(repo, record, base).await?;
    let (range, compression) = match &base.index {
        Some(name) => {
            let index_path = repo.backup_path(&record.label, name);
            let bytes = repo
                .get_bytes(&index_path, crate::repository::INDEX_LIMIT)
                .await?;
            let index = ArchiveIndex::from_json(
                &bytes,
                &repo.describe(&index_path),
                base.stored_bytes,
                base.tar_bytes,
            )?;
            let frame = index.frames.iter().find(|f| {
                f.entries.iter().any(|e| {
                    basebackup::tar::normalize(e.path.as_bytes())
                        .ok()
                        .as_deref()
                        == Some(b"backup_label".as_slice())
                })
            });
            let Some(frame) = frame else {
                return Err(Error::verify(describe, "its index lists no backup_label"));
            };
            (
                frame.stored_offset..frame.stored_offset + frame.stored_len,
                index.compression,
            )
        }
        None => (0..size, base.compression),
    };
    let ctx = CombineCtx {
        handle: tokio::runtime::Handle::current(),
        repo: repo.clone(),
        download: DownloadOptions::default(),
        failure: StoreFailure::default(),
        downloaded: Arc::default(),
    };
    let label = tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
        let reader = RangeReader::open(
            &ctx.handle,
            &ctx.repo,
            path,
            describe.clone(),
            range,
            DownloadOptions {
                chunk_size: ctx.download.chunk_size,
                concurrency: 1,
            },
            ctx.failure.clone(),
            ctx.downloaded.clone(),
        );
        let stream = decompressed(compression, reader).map_err(|e| ctx.io_error(&describe, e))?;
        let mut tar = TarReader::new(stream);
        while let Some(header) = tar.next().map_err(|e| ctx.io_error(&describe, e))? {
            if header.name == b"backup_label" {
                let mut label = Vec::new();
                (&mut tar)
                    .take(1 << 20)
                    .read_to_end(&mut label)
                    .map_err(|e| ctx.io_error(&describe, e))?;
                return Ok(label);
            }
        }
        Err(Error::verify(describe, "holds no backup_label"))
    })
    .await
    .map_err(|e| {
        Error::usage(
            format!("reading a backup_label failed: {e}"),
            "report this as a bug",
        )
    })??;
    let mut sum = FileChecksum::new(expected.algorithm);
    sum.update(&label);
    if label.len() as u64 != expected.size
        || (expected.checksum.is_some() && sum.finish() != expected.checksum)
    {
        return Err(Error::verify(
            format!("backup_label of backup {}", record.label),
            "differs from the manifest",
        ));
    }
    Ok(label)
}

/// Checks that each backup of `chain` (newest first) follows its parent: the same
/// cluster and major version, a start at or after the parent's end, on the same
/// timeline or a later one.
pub fn check_links(chain: &[CommitRecord]) -> Result<()> {
    for pair in chain.windows(2) {
        let (child, parent) = (&pair[0], &pair[1]);
        let bad = |what: String| Error::verify(format!("backup {}", child.label), what);
        if child.system_identifier != parent.system_identifier {
            return Err(bad(format!(
                "its parent {} belongs to another cluster (system identifier {} vs {})",
                parent.label, parent.system_identifier, child.system_identifier
            )));
        }
        if child.server_major != parent.server_major {
            return Err(bad(format!(
                "its parent {} was taken from PostgreSQL {}, it from {}",
                parent.label, parent.server_major, child.server_major
            )));
        }
        if child.start()? < parent.end()? {
            return Err(bad(format!(
                "it starts at {}, before its parent {} ends at {}",
                child.start_lsn, parent.label, parent.end_lsn
            )));
        }
        if child.start_timeline < parent.end_timeline {
            return Err(bad(format!(
                "it starts on timeline {}, older than its parent {}'s timeline {}",
                child.start_timeline, parent.label, parent.end_timeline
            )));
        }
    }
    Ok(())
}

/// Checks with the child's timeline history file that the parent's timeline is an
/// ancestor which the child's branched off after the parent's end.
pub fn check_descends(child: &CommitRecord, parent: &CommitRecord, history: &[u8]) -> Result<()> {
    let parent_end = parent.end()?;
    let text = String::from_utf8_lossy(history);
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(tli), Some(switch)) = (fields.next(), fields.next()) else {
            continue;
        };
        let (Ok(tli), Ok(switch)) = (tli.parse::<u32>(), switch.parse::<pgwire_repl::Lsn>()) else {
            continue;
        };
        if tli == parent.end_timeline {
            if switch >= parent_end {
                return Ok(());
            }
            return Err(Error::verify(
                format!("backup {}", child.label),
                format!(
                    "its timeline {} left timeline {tli} at {switch}, before its parent {} \
                     ends at {}: the parent is not in its history",
                    child.start_timeline, parent.label, parent.end_lsn
                ),
            ));
        }
    }
    Err(Error::verify(
        format!("backup {}", child.label),
        format!(
            "its timeline {}'s history does not descend from its parent {}'s timeline {}",
            child.start_timeline, parent.label, parent.end_timeline
        ),
    ))
}

/// The first store failure seen by any reader: reported as itself (a `Store` error), not
/// as the I/O error the decompressor turned it into.
type StoreFailure = Arc<Mutex<Option<Error>>>;

/// Reads a range of an object in order, by ranged GETs kept in flight by a task (which
/// counts every byte received, read or not).
struct RangeReader {
    rx: mpsc::Receiver<object_store::Result<Bytes>>,
    current: Bytes,
    describe: String,
    failure: StoreFailure,
}

impl RangeReader {
    #[allow(clippy::too_many_arguments)]
    fn open(
        handle: &tokio::runtime::Handle,
        repo: &Repository,
        path: object_store::path::Path,
        describe: String,
        range: std::ops::Range<u64>,
        download: DownloadOptions,
        failure: StoreFailure,
        downloaded: Arc<AtomicU64>,
    ) -> RangeReader {
        let concurrency = download.concurrency.max(1);
        let (tx, rx) = mpsc::channel(concurrency);
        let chunk = download.chunk_size.max(1);
        let store = repo.store().clone();
        let ranges: Vec<_> = (range.start..range.end)
            .step_by(chunk as usize)
            .map(|start| start..(start + chunk).min(range.end))
            .collect();
        handle.spawn(async move {
            let mut gets = futures::stream::iter(ranges)
                .map(|r| {
                    let store = store.clone();
                    let path = path.clone();
                    async move { store.get_range(&path, r).await }
                })
                .buffered(concurrency);
            while let Some(got) = gets.next().await {
                if let Ok(bytes) = &got {
                    downloaded.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                }
                let failed = got.is_err();
                // A closed channel: the reader is gone, and so is the need.
                if tx.send(got).await.is_err() || failed {
                    break;
                }
            }
        });
        RangeReader {
            rx,
            current: Bytes::new(),
            describe,
            failure,
        }
    }
}

impl Read for RangeReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(bytes)) => self.current = bytes,
                Some(Err(e)) => {
                    let error = Error::store(format!("reading {}", self.describe), e);
                    let message = error.message().to_string();
                    self.failure
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert(error);
                    return Err(std::io::Error::other(message));
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// The decompressed tar bytes of a stored range.
fn decompressed(
    compression: StoredCompression,
    reader: RangeReader,
) -> std::io::Result<Box<dyn Read + Send>> {
    Ok(match compression {
        StoredCompression::None => Box::new(reader),
        StoredCompression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(reader)),
        StoredCompression::Lz4 => Box::new(crate::delta::Lz4Frames(
            lz4_flex::frame::FrameDecoder::new(std::io::BufReader::new(reader)),
        )),
        StoredCompression::Zstd => Box::new(zstd::stream::read::Decoder::new(reader)?),
    })
}

/// One tar header block and what it says.
struct Header {
    raw: [u8; 512],
    /// The path (ustar prefix and name), normalized as the pipeline does.
    name: Vec<u8>,
    size: u64,
    typeflag: u8,
}

/// A forward-only tar reader; reading it reads the current entry's data.
struct TarReader<R> {
    inner: R,
    remaining: u64,
    padding: u64,
    ended: bool,
}

fn tar_number(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        // Base-256, for sizes beyond 8 GiB.
        let mut value: u64 = u64::from(field[0] & 0x7f);
        for b in &field[1..] {
            value = value.checked_mul(256)?.checked_add(u64::from(*b))?;
        }
        return Some(value);
    }
    let text = std::str::from_utf8(field).ok()?;
    let text = text.trim_matches(|c: char| c == '\0' || c == ' ');
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

fn cstr(field: &[u8]) -> &[u8] {
    &field[..field.iter().position(|b| *b == 0).unwrap_or(field.len())]
}

impl<R: Read> TarReader<R> {
    fn new(inner: R) -> TarReader<R> {
        TarReader {
            inner,
            remaining: 0,
            padding: 0,
            ended: false,
        }
    }

    /// The next entry's header, after skipping what is left of the current one; `None`
    /// at the end-of-archive block or at the end of the stream.
    fn next(&mut self) -> std::io::Result<Option<Header>> {
        let rest = self.remaining + self.padding;
        let skipped = std::io::copy(&mut (&mut self.inner).take(rest), &mut std::io::sink())?;
        if skipped != rest {
            return Err(std::io::Error::other("the tar stream ends inside an entry"));
        }
        self.remaining = 0;
        self.padding = 0;
        if self.ended {
            return Ok(None);
        }
        let mut raw = [0u8; 512];
        let mut filled = 0;
        while filled < raw.len() {
            let n = self.inner.read(&mut raw[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 || raw.iter().all(|b| *b == 0) {
            self.ended = true;
            return Ok(None);
        }
        if filled < raw.len() {
            return Err(std::io::Error::other("the tar stream ends inside a header"));
        }
        let size = tar_number(&raw[124..136])
            .ok_or_else(|| std::io::Error::other("a tar header has an invalid size"))?;
        let mut name = Vec::new();
        if &raw[257..262] == b"ustar" && raw[345] != 0 {
            name.extend_from_slice(cstr(&raw[345..500]));
            name.push(b'/');
        }
        name.extend_from_slice(cstr(&raw[..100]));
        let name = basebackup::tar::normalize(&name).unwrap_or(name);
        // Only these carry data; the size of a link or directory is ignored.
        let typeflag = raw[156];
        let data = match typeflag {
            b'1' | b'2' | b'3' | b'4' | b'5' | b'6' => 0,
            _ => size,
        };
        self.remaining = data;
        self.padding = (512 - data % 512) % 512;
        Ok(Some(Header {
            raw,
            name,
            size: data,
            typeflag,
        }))
    }

    /// Reads the stream to its end (so that compressed frames check their content
    /// checksums).
    fn drain(&mut self) -> std::io::Result<()> {
        std::io::copy(&mut self.inner, &mut std::io::sink()).map(|_| ())
    }
}

impl<R: Read> Read for TarReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::Error::other("the tar stream ends inside an entry"));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// A header block for `name` (the header's own name with the `INCREMENTAL.` prefix
/// taken off its last component) and `size`, keeping the rest of `raw`.
fn renamed_header(raw: &[u8; 512], size: u64) -> [u8; 512] {
    let mut out = *raw;
    let name = cstr(&raw[..100]);
    let start = name.iter().rposition(|b| *b == b'/').map_or(0, |i| i + 1);
    let mut new_name = name[..start].to_vec();
    new_name.extend_from_slice(
        name[start..]
            .strip_prefix(INCREMENTAL_PREFIX.as_bytes())
            .unwrap_or(&name[start..]),
    );
    out[..100].fill(0);
    out[..new_name.len()].copy_from_slice(&new_name);
    sized_header(&mut out, size);
    out
}

/// Sets a header's size and checksum.
pub(crate) fn sized_header(out: &mut [u8; 512], size: u64) {
    if size < 8u64.pow(11) {
        out[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    } else {
        out[124..136].fill(0);
        out[124] = 0x80;
        out[128..136].copy_from_slice(&size.to_be_bytes());
    }
    out[148..156].fill(b' ');
    let sum: u32 = out.iter().map(|b| u32::from(*b)).sum();
    out[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

/// The combined tar stream, handed on in pieces: to the pipeline (an archive at a
/// time) or to a delta restore's writer (a frame at a time).
struct Output {
    tx: mpsc::Sender<Msg>,
    buf: Vec<u8>,
}

const OUTPUT_PIECE: usize = 256 << 10;

impl Output {
    fn stopped() -> Error {
        Error::usage(
            "the restore's writer stopped",
            "see the error reported with it",
        )
    }

    fn flush(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(OUTPUT_PIECE + 8192),
        ));
        self.tx
            .blocking_send(Msg::Data(piece))
            .map_err(|_| Output::stopped())
    }

    /// Sends `msg` after what is buffered.
    fn send(&mut self, msg: Msg) -> Result<()> {
        self.flush()?;
        self.tx.blocking_send(msg).map_err(|_| Output::stopped())
    }

    fn write(&mut self, data: &[u8]) -> Result<()> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= OUTPUT_PIECE {
            self.flush()?;
        }
        Ok(())
    }

    /// Room for `len` more bytes, to be filled in place.
    fn reserve(&mut self, len: usize) -> Result<&mut [u8]> {
        if self.buf.len() >= OUTPUT_PIECE {
            self.flush()?;
        }
        let start = self.buf.len();
        self.buf.resize(start + len, 0);
        Ok(&mut self.buf[start..])
    }
}

/// One input file being read: checked, every byte, against its own backup's manifest.
struct Source<'a> {
    reader: &'a mut dyn Read,
    pos: u64,
    len: u64,
    sum: FileChecksum,
    expected: ManifestFile,
    describe: String,
    failure: StoreFailure,
}

impl Source<'_> {
    fn damaged(&self, what: impl std::fmt::Display) -> Error {
        Error::verify(&self.describe, what)
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<()> {
        if self.pos + buf.len() as u64 > self.len {
            return Err(self.damaged(format!(
                "needs bytes up to {}, but holds {}",
                self.pos + buf.len() as u64,
                self.len
            )));
        }
        if let Err(e) = self.reader.read_exact(buf) {
            // A failed GET is reported as itself, not as damage.
            let store = self
                .failure
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            return Err(store
                .unwrap_or_else(|| Error::verify(&self.describe, format!("cannot be read: {e}"))));
        }
        self.sum.update(buf);
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn skip_to(&mut self, offset: u64) -> Result<()> {
        if offset < self.pos {
            return Err(Error::usage(
                format!("{}: a block is wanted behind the reader", self.describe),
                "report this as a bug",
            ));
        }
        if self.pos == offset {
            return Ok(());
        }
        let mut scratch = vec![0u8; (offset - self.pos).min(64 << 10) as usize];
        while self.pos < offset {
            let n = (offset - self.pos).min(scratch.len() as u64) as usize;
            self.read_exact(&mut scratch[..n])?;
        }
        Ok(())
    }

    /// The incremental header at the start.
    fn header(&mut self) -> Result<IncrementalHeader> {
        let mut bytes = Vec::new();
        let mut want = 12u64;
        loop {
            let have = bytes.len() as u64;
            let take = want.min(self.len).saturating_sub(have) as usize;
            bytes.resize(have as usize + take, 0);
            self.read_exact(&mut bytes[have as usize..])?;
            match IncrementalHeader::parse(&bytes, DEFAULT_BLOCK_SIZE, DEFAULT_SEGMENT_BLOCKS) {
                Ok(header) => {
                    header
                        .check_len(self.len, DEFAULT_BLOCK_SIZE)
                        .map_err(|e| self.incremental_error(e))?;
                    return Ok(header);
                }
                Err(IncrementalError::Truncated { needed })
                    if needed > want && needed <= self.len =>
                {
                    want = needed;
                }
                Err(e) => return Err(self.incremental_error(e)),
            }
        }
    }

    fn incremental_error(&self, e: IncrementalError) -> Error {
        self.damaged(format!(
            "is not a valid incremental file for a server with 8 kB blocks and 1 GB \
             segments (the only layout supported): {e}"
        ))
    }

    /// Reads the rest and checks size and checksum against the manifest.
    fn finish(mut self) -> Result<()> {
        let mut scratch = vec![0u8; 64 << 10];
        while self.pos < self.len {
            let n = (self.len - self.pos).min(scratch.len() as u64) as usize;
            self.read_exact(&mut scratch[..n])?;
        }
        if self.len != self.expected.size {
            return Err(self.damaged(format!(
                "holds {} bytes, the manifest says {}",
                self.len, self.expected.size
            )));
        }
        let computed = std::mem::replace(&mut self.sum, FileChecksum::None).finish();
        if let (Some(expected), Some(computed)) = (&self.expected.checksum, &computed) {
            if !expected.eq_ignore_ascii_case(computed) {
                return Err(self.damaged(format!(
                    "checksum {computed} differs from the manifest's {expected}"
                )));
            }
        }
        Ok(())
    }
}

/// A tar reader on a decompressed frame.
type FrameTar = TarReader<Box<dyn Read + Send>>;

/// An archive of an older backup, entered by its frames.
struct OlderArchive {
    tablespace_oid: Option<u32>,
    path: object_store::path::Path,
    describe: String,
    compression: StoredCompression,
    frames: Vec<IndexFrame>,
    /// Tar path → frame.
    frame_of: HashMap<Vec<u8>, usize>,
}

/// An older backup of the chain, with a reader left where it stopped (the next file
/// wanted is usually further on in the same frame).
struct Older {
    label: String,
    files: HashMap<Vec<u8>, ManifestFile>,
    archives: Vec<OlderArchive>,
    cursor: Option<(usize, usize, FrameTar)>,
}

/// One archive of the newest backup, and the ranges of its stored object to read: the
/// whole object for a restore, the frames with anything to write for a delta restore.
pub(crate) struct NewestArchive {
    pub(crate) path: object_store::path::Path,
    pub(crate) describe: String,
    pub(crate) compression: StoredCompression,
    pub(crate) tablespace: Tablespace,
    pub(crate) ranges: Vec<std::ops::Range<u64>>,
}

/// Whether a local file already holds a rebuilt file's content: called with its final
/// manifest path and the whole file of an older backup that the result equals.
pub(crate) type Reuse = Box<dyn Fn(&[u8], &ManifestFile) -> bool + Send>;

/// Everything the combining thread reads from.
struct Combine {
    handle: tokio::runtime::Handle,
    repo: Repository,
    download: DownloadOptions,
    failure: StoreFailure,
    downloaded: Arc<AtomicU64>,
    newest_label: String,
    /// The newest backup's parent.
    parent: CommitRecord,
    newest_files: HashMap<Vec<u8>, ManifestFile>,
    algorithm: ChecksumAlgorithm,
    archives: Vec<NewestArchive>,
    older: Vec<Older>,
    /// A delta restore: the stream goes out a frame at a time (each range of archive
    /// `i` as `Msg::Frame(i)` … `Msg::End`, no end-of-archive blocks), and a file whose
    /// result equals a whole older file that `reuse` finds locally is left out.
    reuse: Option<Reuse>,
}

/// What the combined stream holds that differs from the newest manifest: the final
/// path, its size and checksum (`None` for a file the manifest keeps as is).
pub(crate) type Overrides = HashMap<Vec<u8>, (u64, Option<String>)>;

impl Older {
    /// Where `path` (a manifest path) is in this backup: whole or incremental.
    fn find(&self, path: &[u8]) -> Option<(ManifestFile, bool)> {
        if let Some(file) = self.files.get(path) {
            return Some((file.clone(), false));
        }
        let start = path.iter().rposition(|b| *b == b'/').map_or(0, |i| i + 1);
        let incremental = [
            &path[..start],
            INCREMENTAL_PREFIX.as_bytes(),
            &path[start..],
        ]
        .concat();
        self.files.get(&incremental).map(|f| (f.clone(), true))
    }

    /// A reader on file `path` (a manifest path) of this backup, at its first byte.
    fn open(&mut self, combine: &CombineCtx, path: &[u8]) -> Result<&mut FrameTar> {
        let (archive, tar_path) = archive_of(&self.archives, path);
        let not_found = || {
            Error::verify(
                format!("backup {}", self.label),
                format!(
                    "{} is in its manifest but in no frame of its archive index",
                    String::from_utf8_lossy(path)
                ),
            )
        };
        let Some(archive) = archive else {
            return Err(not_found());
        };
        let Some(&frame) = self.archives[archive].frame_of.get(tar_path) else {
            return Err(not_found());
        };
        let tar_path = tar_path.to_vec();
        for attempt in 0..2 {
            let reuse = attempt == 0
                && matches!(&self.cursor, Some((a, f, _)) if *a == archive && *f == frame);
            if !reuse {
                let a = &self.archives[archive];
                let fr = &a.frames[frame];
                let reader = RangeReader::open(
                    &combine.handle,
                    &combine.repo,
                    a.path.clone(),
                    a.describe.clone(),
                    fr.stored_offset..fr.stored_offset + fr.stored_len,
                    DownloadOptions {
                        chunk_size: combine.download.chunk_size,
                        concurrency: combine.download.concurrency.clamp(1, 2),
                    },
                    combine.failure.clone(),
                    combine.downloaded.clone(),
                );
                let stream = decompressed(a.compression, reader)
                    .map_err(|e| combine.io_error(&a.describe, e))?;
                self.cursor = Some((archive, frame, TarReader::new(stream)));
            }
            let describe = self.archives[archive].describe.clone();
            let Some((_, _, tar)) = self.cursor.as_mut() else {
                continue;
            };
            let mut found = false;
            while let Some(header) = tar.next().map_err(|e| combine.io_error(&describe, e))? {
                if header.name == tar_path {
                    found = true;
                    break;
                }
            }
            if found {
                let Some((_, _, tar)) = self.cursor.as_mut() else {
                    break;
                };
                return Ok(tar);
            }
            self.cursor = None;
        }
        Err(not_found())
    }
}

/// The archive holding manifest path `path`, and its path inside that archive.
fn archive_of<'p>(archives: &[OlderArchive], path: &'p [u8]) -> (Option<usize>, &'p [u8]) {
    if let Some(rest) = path.strip_prefix(b"pg_tblspc/".as_slice()) {
        if let Some(slash) = rest.iter().position(|b| *b == b'/') {
            let oid = std::str::from_utf8(&rest[..slash])
                .ok()
                .and_then(|s| s.parse::<u32>().ok());
            if let Some(i) = archives
                .iter()
                .position(|a| oid.is_some() && a.tablespace_oid == oid)
            {
                return (Some(i), &rest[slash + 1..]);
            }
        }
    }
    (
        archives.iter().position(|a| a.tablespace_oid.is_none()),
        path,
    )
}

/// The parts of [`Combine`] that readers need while the older backups are borrowed.
struct CombineCtx {
    handle: tokio::runtime::Handle,
    repo: Repository,
    download: DownloadOptions,
    failure: StoreFailure,
    downloaded: Arc<AtomicU64>,
}

impl CombineCtx {
    /// A read failure: the store's own error if a GET failed, else damage.
    fn io_error(&self, describe: &str, e: std::io::Error) -> Error {
        if let Some(store) = self
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            return store;
        }
        Error::verify(describe, format!("cannot be read: {e}"))
    }
}

/// Checks that an incremental backup's backup_label names `parent` (its start LSN and
/// timeline) as the backup it is incremental to, as pg_combinebackup does: the
/// repository's parent must be the one the server compared against.
fn check_incremental_from(label: &[u8], newest: &str, parent: &CommitRecord) -> Result<()> {
    let text = String::from_utf8_lossy(label);
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_string())
    };
    let bad = |what: String| Error::verify(format!("backup_label of backup {newest}"), what);
    let (Some(lsn), Some(tli)) = (
        value("INCREMENTAL FROM LSN:"),
        value("INCREMENTAL FROM TLI:"),
    ) else {
        return Err(bad(format!(
            "has no INCREMENTAL FROM lines, but the commit record names parent {}",
            parent.label
        )));
    };
    let lsn_ok = lsn.parse::<pgwire_repl::Lsn>().ok() == Some(parent.start()?);
    let tli_ok = tli.parse::<u32>().ok() == Some(parent.start_timeline);
    if !lsn_ok || !tli_ok {
        return Err(bad(format!(
            "says it is incremental from {lsn} on timeline {tli}, but its parent {} starts \
             at {} on timeline {}",
            parent.label, parent.start_lsn, parent.start_timeline
        )));
    }
    Ok(())
}

/// backup_label without the lines only an incremental backup has.
fn strip_incremental_lines(label: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(label.len());
    for line in label.split_inclusive(|b| *b == b'\n') {
        if !line.starts_with(b"INCREMENTAL FROM ") {
            out.extend_from_slice(line);
        }
    }
    out
}

impl Combine {
    /// Writes the combined stream to `out`; returns what differs from the newest
    /// manifest, and (a delta restore) the files left out because a local copy matched.
    fn run(self, out: mpsc::Sender<Msg>) -> Result<(Overrides, HashSet<Vec<u8>>)> {
        let Combine {
            handle,
            repo,
            download,
            failure,
            downloaded,
            newest_label,
            parent,
            newest_files,
            algorithm,
            archives,
            mut older,
            reuse,
        } = self;
        let ctx = CombineCtx {
            handle,
            repo,
            download,
            failure,
            downloaded,
        };
        let mut out = Output {
            tx: out,
            buf: Vec::with_capacity(OUTPUT_PIECE + 8192),
        };
        let mut overrides = Overrides::new();
        let mut kept = HashSet::new();
        let delta = reuse.is_some();
        for (index, archive) in archives.into_iter().enumerate() {
            let NewestArchive {
                path,
                describe,
                compression,
                tablespace,
                ranges,
            } = archive;
            let base = tablespace.oid.is_none();
            let prefix = match tablespace.oid {
                Some(oid) => format!("pg_tblspc/{oid}/").into_bytes(),
                None => Vec::new(),
            };
            if !delta {
                // The stream handed on is plain tar, whatever the object's compression.
                let object = describe.rsplit('/').next().unwrap_or("");
                out.send(Msg::Archive(ArchiveInfo {
                    name: object
                        .strip_suffix(compression.suffix())
                        .unwrap_or(object)
                        .to_string(),
                    tablespace,
                    compression: None,
                }))?;
            }
            for range in ranges {
                if delta {
                    out.send(Msg::Frame(index))?;
                }
                let reader = RangeReader::open(
                    &ctx.handle,
                    &ctx.repo,
                    path.clone(),
                    describe.clone(),
                    range,
                    ctx.download,
                    ctx.failure.clone(),
                    ctx.downloaded.clone(),
                );
                let stream =
                    decompressed(compression, reader).map_err(|e| ctx.io_error(&describe, e))?;
                let mut tar = TarReader::new(stream);
                while let Some(header) = tar.next().map_err(|e| ctx.io_error(&describe, e))? {
                    let regular = matches!(header.typeflag, b'0' | 0 | b'7');
                    let manifest_path = [prefix.as_slice(), &header.name].concat();
                    if regular && whole_file_name(&String::from_utf8_lossy(&header.name)).is_some()
                    {
                        let rebuilt = combine_file(
                            &ctx,
                            &mut older,
                            &newest_label,
                            &newest_files,
                            algorithm,
                            &mut tar,
                            &header,
                            &manifest_path,
                            &mut out,
                            reuse.as_ref(),
                        )?;
                        if rebuilt.kept {
                            kept.insert(rebuilt.path.clone());
                        }
                        overrides.insert(rebuilt.path, (rebuilt.size, rebuilt.checksum));
                        continue;
                    }
                    if regular && base && header.name == b"backup_label" {
                        let mut label = Vec::new();
                        (&mut tar)
                            .take(1 << 20)
                            .read_to_end(&mut label)
                            .map_err(|e| ctx.io_error(&describe, e))?;
                        let expected =
                            newest_files.get(&manifest_path).cloned().ok_or_else(|| {
                                Error::verify(&describe, "backup_label is not in the manifest")
                            })?;
                        let mut check = FileChecksum::new(expected.algorithm);
                        check.update(&label);
                        if label.len() as u64 != expected.size
                            || (expected.checksum.is_some() && check.finish() != expected.checksum)
                        {
                            return Err(Error::verify(
                                &describe,
                                "backup_label differs from the manifest",
                            ));
                        }
                        check_incremental_from(&label, &newest_label, &parent)?;
                        let label = strip_incremental_lines(&label);
                        let mut raw = header.raw;
                        sized_header(&mut raw, label.len() as u64);
                        out.write(&raw)?;
                        out.write(&label)?;
                        out.write(&vec![0u8; (512 - label.len() % 512) % 512])?;
                        let mut sum = FileChecksum::new(algorithm);
                        sum.update(&label);
                        overrides.insert(manifest_path, (label.len() as u64, sum.finish()));
                        continue;
                    }
                    // Anything else passes through as it is.
                    out.write(&header.raw)?;
                    let mut left = header.size;
                    while left > 0 {
                        let n = left.min(64 << 10) as usize;
                        let room = out.reserve(n)?;
                        tar.read_exact(room)
                            .map_err(|e| ctx.io_error(&describe, e))?;
                        left -= n as u64;
                    }
                    out.write(&vec![0u8; ((512 - header.size % 512) % 512) as usize])?;
                }
                tar.drain().map_err(|e| ctx.io_error(&describe, e))?;
                if delta {
                    out.send(Msg::End)?;
                }
            }
            if !delta {
                out.write(&[0u8; 1024])?;
            }
        }
        out.flush()?;
        Ok((overrides, kept))
    }
}

/// A file rebuilt from `INCREMENTAL.<name>` and the older backups.
struct Rebuilt {
    /// Its manifest path.
    path: Vec<u8>,
    size: u64,
    checksum: Option<String>,
    /// Left out of the stream: the local copy already holds it.
    kept: bool,
}

/// Which older version, if any, a rebuilt file equals whole, as far as the manifests
/// show it: `newest` is the header of the newest backup's incremental file, `older` the
/// file in each older backup (newest first; `true` for an incremental file). Older
/// incremental files must hold no block (an empty one has a known size); their headers
/// are then not needed. Returns an index into `older`; [`plan_file`] decides.
fn known_whole(newest: &IncrementalHeader, older: &[(ManifestFile, bool)]) -> Option<usize> {
    let empty = IncrementalHeader {
        truncation_block_length: 0,
        block_numbers: Vec::new(),
        data_offset: 12,
        big_endian: false,
    };
    let mut versions = vec![FileVersion::Incremental(newest.clone())];
    for (file, incremental) in older {
        if !incremental {
            versions.push(FileVersion::Whole { len: file.size });
            break;
        }
        if file.size != empty.file_len(DEFAULT_BLOCK_SIZE) {
            return None;
        }
        versions.push(FileVersion::Incremental(empty.clone()));
    }
    match plan_file(&versions, DEFAULT_BLOCK_SIZE) {
        Ok(FilePlan::Copy { version }) if version > 0 => Some(version - 1),
        _ => None,
    }
}

/// Rebuilds one file from `INCREMENTAL.<name>` (the current entry of `tar`) and the
/// older backups, writing its tar entry; returns its manifest path, size and checksum.
/// With `reuse`, a file equal to a whole older file that the local copy already holds
/// is read no further than its incremental header and not written.
#[allow(clippy::too_many_arguments)]
fn combine_file(
    ctx: &CombineCtx,
    older: &mut [Older],
    newest_label: &str,
    newest_files: &HashMap<Vec<u8>, ManifestFile>,
    algorithm: ChecksumAlgorithm,
    tar: &mut dyn Read,
    header: &Header,
    manifest_path: &[u8],
    out: &mut Output,
    reuse: Option<&Reuse>,
) -> Result<Rebuilt> {
    let shown = String::from_utf8_lossy(manifest_path).into_owned();
    let final_path = whole_file_name(&shown)
        .map(String::into_bytes)
        .unwrap_or_default();
    let final_shown = String::from_utf8_lossy(&final_path).into_owned();
    let expected = newest_files.get(manifest_path).cloned().ok_or_else(|| {
        Error::verify(
            format!("backup {newest_label}"),
            format!("{shown} is in its archive but not in its manifest"),
        )
    })?;
    let mut sources = vec![Source {
        reader: tar,
        pos: 0,
        len: header.size,
        sum: FileChecksum::new(expected.algorithm),
        expected,
        describe: format!("{shown} of backup {newest_label}"),
        failure: ctx.failure.clone(),
    }];
    let newest = sources[0].header()?;
    if let Some(reuse) = reuse {
        let found: Vec<(ManifestFile, bool)> = older
            .iter()
            .map_while(|backup| backup.find(&final_path))
            .collect();
        let same = known_whole(&newest, &found).map(|v| &found[v].0);
        if let Some(file) = same.filter(|f| f.checksum.is_some() && f.algorithm == algorithm) {
            if reuse(&final_path, file) {
                let (size, checksum) = (file.size, file.checksum.clone());
                for source in sources {
                    source.finish()?;
                }
                return Ok(Rebuilt {
                    path: final_path,
                    size,
                    checksum,
                    kept: true,
                });
            }
        }
    }
    let mut versions = vec![FileVersion::Incremental(newest)];
    let mut whole = false;
    for backup in older.iter_mut() {
        let Some((file, incremental)) = backup.find(&final_path) else {
            return Err(Error::verify(
                format!("backup {}", backup.label),
                format!(
                    "holds no version of {final_shown}, which a newer backup of its chain \
                     holds as incremental"
                ),
            ));
        };
        let describe = format!(
            "{} of backup {}",
            String::from_utf8_lossy(&file.path),
            backup.label
        );
        let path = file.path.clone();
        let reader = backup.open(ctx, &path)?;
        let len = reader.remaining;
        let mut source = Source {
            reader,
            pos: 0,
            len,
            sum: FileChecksum::new(file.algorithm),
            expected: file,
            describe,
            failure: ctx.failure.clone(),
        };
        if incremental {
            versions.push(FileVersion::Incremental(source.header()?));
            sources.push(source);
        } else {
            versions.push(FileVersion::Whole { len });
            sources.push(source);
            whole = true;
            break;
        }
    }
    if !whole {
        return Err(Error::verify(
            format!("backup {newest_label}"),
            format!("no backup of its chain holds {final_shown} whole"),
        ));
    }
    let plan = plan_file(&versions, DEFAULT_BLOCK_SIZE)
        .map_err(|e| Error::verify(format!("{final_shown} in backup {newest_label}"), e))?;
    let bs = u64::from(DEFAULT_BLOCK_SIZE);
    let size = match &plan {
        FilePlan::Copy { version } => sources[*version].len,
        FilePlan::Blocks(blocks) => blocks.len() as u64 * bs,
    };
    out.write(&renamed_header(&header.raw, size))?;
    let mut sum = FileChecksum::new(algorithm);
    match plan {
        FilePlan::Copy { version } => {
            let source = &mut sources[version];
            while source.pos < source.len {
                let n = (source.len - source.pos).min(64 << 10) as usize;
                let room = out.reserve(n)?;
                source.read_exact(room)?;
                sum.update(room);
            }
        }
        FilePlan::Blocks(blocks) => {
            for block in blocks {
                let room = out.reserve(bs as usize)?;
                match block {
                    BlockSource::Stored { version, offset } => {
                        let source = sources.get_mut(version).ok_or_else(|| {
                            Error::usage("a block from a version not read", "report this as a bug")
                        })?;
                        source.skip_to(offset)?;
                        source.read_exact(room)?;
                    }
                    BlockSource::Zero => room.fill(0),
                }
                sum.update(room);
            }
        }
    }
    out.write(&vec![0u8; ((512 - size % 512) % 512) as usize])?;
    for source in sources {
        source.finish()?;
    }
    Ok(Rebuilt {
        path: final_path,
        size,
        checksum: sum.finish(),
        kept: false,
    })
}

/// The manifest of the combined backup: the newest manifest's entries, with rebuilt
/// files under their final names, sizes and checksums; its own checksum computed.
pub(crate) fn combined_manifest(newest: &[u8], overrides: &Overrides) -> Result<Bytes> {
    let bad = |what: String| Error::verify("backup_manifest", what);
    let json: serde_json::Value =
        serde_json::from_slice(newest).map_err(|e| bad(format!("not JSON: {e}")))?;
    let version = json
        .get("PostgreSQL-Backup-Manifest-Version")
        .cloned()
        .unwrap_or(serde_json::Value::from(1));
    let mut text = format!("{{ \"PostgreSQL-Backup-Manifest-Version\": {version},\n");
    if let Some(id) = json.get("System-Identifier") {
        text.push_str(&format!("\"System-Identifier\": {id},\n"));
    }
    text.push_str("\"Files\": [\n");
    let files = json
        .get("Files")
        .and_then(|f| f.as_array())
        .ok_or_else(|| bad("no Files array".into()))?;
    let mut first = true;
    for file in files {
        let mut file = file
            .as_object()
            .cloned()
            .ok_or_else(|| bad("a file entry is not an object".into()))?;
        let path = match (file.get("Path"), file.get("Encoded-Path")) {
            (Some(p), _) => p.as_str().unwrap_or("").as_bytes().to_vec(),
            (None, Some(p)) => {
                let hex = p.as_str().unwrap_or("");
                (0..hex.len() / 2)
                    .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2).unwrap_or(""), 16))
                    .collect::<std::result::Result<Vec<u8>, _>>()
                    .map_err(|_| bad("an Encoded-Path is not hex".into()))?
            }
            (None, None) => return Err(bad("a file entry has no path".into())),
        };
        let (path, changed) = match whole_file_name(&String::from_utf8_lossy(&path)) {
            Some(whole) if std::str::from_utf8(&path).is_ok() => (whole.into_bytes(), true),
            _ => (path.clone(), overrides.contains_key(&path)),
        };
        if changed {
            let Some((size, sum)) = overrides.get(&path) else {
                return Err(bad(format!(
                    "{} is in the manifest but was not in the archives",
                    String::from_utf8_lossy(&path)
                )));
            };
            file.remove("Encoded-Path");
            file.insert(
                "Path".into(),
                String::from_utf8_lossy(&path).into_owned().into(),
            );
            file.insert("Size".into(), (*size).into());
            match sum {
                Some(sum) => {
                    file.insert("Checksum".into(), sum.clone().into());
                }
                None => {
                    file.remove("Checksum");
                    file.insert("Checksum-Algorithm".into(), "NONE".into());
                }
            }
        }
        if !first {
            text.push_str(",\n");
        }
        first = false;
        text.push_str(&serde_json::Value::Object(file).to_string());
    }
    text.push_str("\n],\n\"WAL-Ranges\": [\n");
    let ranges = json
        .get("WAL-Ranges")
        .and_then(|r| r.as_array())
        .ok_or_else(|| bad("no WAL-Ranges array".into()))?;
    let ranges: Vec<String> = ranges.iter().map(|r| r.to_string()).collect();
    text.push_str(&ranges.join(",\n"));
    text.push_str("\n],\n");
    let sum = crate::upload::hex(&sha2::Sha256::digest(text.as_bytes()));
    text.push_str(&format!("\"Manifest-Checksum\": \"{sum}\"}}\n"));
    Ok(Bytes::from(text))
}

/// Reads each older backup's manifest and archive indexes.
async fn load_older(repo: &Repository, record: &CommitRecord) -> Result<Older> {
    let (_, manifest) = read_manifest(repo, record).await?;
    let mut archives = Vec::new();
    for archive in &record.archives {
        let (path, describe, _) = stored_archive(repo, record, archive).await?;
        let Some(index) = &archive.index else {
            return Err(Error::usage(
                format!(
                    "{describe} has no frame index (it was compressed by the server), so the \
                     files an incremental backup needs from it cannot be read on their own"
                ),
                "take incremental chains with client-side compression (the default, no \
                 --compress server-…) and restore this chain's newest full backup instead",
            ));
        };
        let index_path = repo.backup_path(&record.label, index);
        let bytes = repo
            .get_bytes(&index_path, crate::repository::INDEX_LIMIT)
            .await?;
        let index = ArchiveIndex::from_json(
            &bytes,
            &repo.describe(&index_path),
            archive.stored_bytes,
            archive.tar_bytes,
        )?;
        let mut frame_of = HashMap::new();
        for (i, frame) in index.frames.iter().enumerate() {
            for entry in &frame.entries {
                if let Ok(name) = basebackup::tar::normalize(entry.path.as_bytes()) {
                    frame_of.insert(name, i);
                }
            }
        }
        archives.push(OlderArchive {
            tablespace_oid: archive.tablespace_oid,
            path,
            describe,
            compression: index.compression,
            frames: index.frames,
            frame_of,
        });
    }
    Ok(Older {
        label: record.label.clone(),
        files: manifest
            .files
            .into_iter()
            .map(|f| (f.path.clone(), f))
            .collect(),
        archives,
        cursor: None,
    })
}

/// The checksum algorithm of rebuilt files: the newest manifest's.
pub(crate) fn rebuilt_algorithm(newest_manifest: &Manifest) -> ChecksumAlgorithm {
    newest_manifest
        .files
        .iter()
        .map(|f| f.algorithm)
        .find(|a| *a != ChecksumAlgorithm::None)
        .unwrap_or(ChecksumAlgorithm::None)
}

impl Combine {
    /// The combining thread's inputs: the older backups' manifests and indexes, and the
    /// newest backup's archives (the ranges given of each).
    #[allow(clippy::too_many_arguments)]
    async fn new(
        repo: &Repository,
        chain: &[CommitRecord],
        parent: CommitRecord,
        newest_manifest: &Manifest,
        archives: Vec<NewestArchive>,
        download: DownloadOptions,
        downloaded: Arc<AtomicU64>,
        reuse: Option<Reuse>,
    ) -> Result<Combine> {
        let mut older = Vec::new();
        for record in chain.iter().skip(1) {
            older.push(load_older(repo, record).await?);
        }
        let algorithm = rebuilt_algorithm(newest_manifest);
        Ok(Combine {
            handle: tokio::runtime::Handle::current(),
            repo: repo.clone(),
            download,
            failure: StoreFailure::default(),
            downloaded,
            newest_label: chain.first().map(|r| r.label.clone()).unwrap_or_default(),
            parent,
            newest_files: newest_manifest
                .files
                .iter()
                .map(|f| (f.path.clone(), f.clone()))
                .collect(),
            algorithm,
            archives,
            older,
            reuse,
        })
    }
}

/// A chain's reader for a delta restore, with its older backups' manifests and indexes
/// loaded (before the target directory is touched: a chain that cannot be read is
/// refused while the directory is still as it was).
pub(crate) struct DeltaChain(Combine);

impl DeltaChain {
    /// Loads what reading `chain` (newest first, at least two backups) needs.
    pub(crate) async fn load(
        repo: &Repository,
        chain: &[CommitRecord],
        newest_manifest: &Manifest,
        download: DownloadOptions,
        downloaded: Arc<AtomicU64>,
    ) -> Result<DeltaChain> {
        let Some(parent) = chain.get(1).cloned() else {
            return Err(Error::usage(
                "a chain restore needs an incremental backup and its parent",
                "report this as a bug",
            ));
        };
        let combine = Combine::new(
            repo,
            chain,
            parent,
            newest_manifest,
            Vec::new(),
            download,
            downloaded,
            None,
        )
        .await?;
        Ok(DeltaChain(combine))
    }

    /// The checksum algorithm of the rebuilt files.
    pub(crate) fn algorithm(&self) -> ChecksumAlgorithm {
        self.0.algorithm
    }

    /// Sends the combined stream of the given ranges of the newest backup's archives
    /// (frames) to `tx`, each as `Msg::Frame(i)` (`i`: the archive's position in the
    /// newest commit record), its combined entries, `Msg::End`. A rebuilt file equal to
    /// a whole older file that `reuse` finds locally is left out. Returns what
    /// [`combined_manifest`] needs, and the files left out.
    pub(crate) async fn run(
        self,
        archives: Vec<NewestArchive>,
        reuse: Reuse,
        tx: mpsc::Sender<Msg>,
    ) -> Result<(Overrides, HashSet<Vec<u8>>)> {
        let mut combine = self.0;
        combine.archives = archives;
        combine.reuse = Some(reuse);
        tokio::task::spawn_blocking(move || combine.run(tx))
            .await
            .map_err(|e| {
                Error::usage(
                    format!("the chain restore's reader failed: {e}"),
                    "report this as a bug",
                )
            })?
    }
}

/// Replays the chain (newest first) as one combined backup into `sink`.
pub(crate) async fn replay_chain<S: BackupSink + 'static>(
    repo: &Repository,
    chain: Vec<CommitRecord>,
    sink: S,
    download: DownloadOptions,
    downloaded: Arc<AtomicU64>,
) -> Result<ReadSummary> {
    let (Some(newest), Some(parent)) = (chain.first().cloned(), chain.get(1).cloned()) else {
        return Err(Error::usage(
            "a chain restore needs an incremental backup and its parent",
            "report this as a bug",
        ));
    };
    let (newest_bytes, newest_manifest) = read_manifest(repo, &newest).await?;
    let mut archives = Vec::new();
    for archive in &newest.archives {
        let (path, describe, size) = stored_archive(repo, &newest, archive).await?;
        archives.push(NewestArchive {
            path,
            describe,
            compression: archive.compression,
            tablespace: Tablespace {
                oid: archive.tablespace_oid,
                location: archive.location.clone(),
                size_estimate: None,
            },
            ranges: std::iter::once(0..size).collect(),
        });
    }
    let combine = Combine::new(
        repo,
        &chain,
        parent,
        &newest_manifest,
        archives,
        download,
        downloaded.clone(),
        None,
    )
    .await?;
    let algorithm = combine.algorithm;
    let system_id = newest.system_id()?;
    let checked = crate::restore::Checked::new(sink, newest.server_major, system_id);
    let mut replay =
        Replay::start_manifest_later(crate::restore::backup_info(&newest)?, algorithm, checked)?;
    let (tx, mut rx) = mpsc::channel(4);
    let thread = tokio::task::spawn_blocking(move || combine.run(tx));
    let fed: basebackup::Result<()> = async {
        while let Some(piece) = rx.recv().await {
            match piece {
                Msg::Archive(info) => replay.begin_archive(info).await?,
                Msg::Data(bytes) => replay.data(bytes).await?,
                Msg::Frame(_) | Msg::End => {} // only sent to a delta restore's writer
            }
        }
        Ok(())
    }
    .await;
    drop(rx);
    let combined = thread.await.map_err(|e| {
        Error::usage(
            format!("the chain restore's reader failed: {e}"),
            "report this as a bug",
        )
    })?;
    let overrides = match (fed, combined) {
        (Ok(()), Ok((overrides, _))) => overrides,
        (Err(e), _) => {
            let root = replay.fail(e).await;
            return Err(crate::restore::stored_damage(repo, &newest, root));
        }
        (Ok(()), Err(e)) => {
            let reason = match e.backup_error() {
                Some(b) => b.clone(),
                None => basebackup::Error::sink(e.message().to_string(), e.advice().unwrap_or("")),
            };
            let _ = replay.fail(reason).await;
            return Err(e);
        }
    };
    let manifest = combined_manifest(&newest_bytes, &overrides)?;
    // Checked before the pipeline sees it: a manifest that would not parse is a bug here.
    Manifest::parse(&manifest).map_err(|e| {
        Error::usage(
            format!("the combined manifest is invalid: {}", e.message()),
            "report this as a bug",
        )
    })?;
    if let Err(e) = replay.manifest(manifest).await {
        let root = replay.fail(e).await;
        return Err(crate::restore::stored_damage(repo, &newest, root));
    }
    let (outcome, checked) = replay
        .finish()
        .await
        .map_err(|e| crate::restore::stored_damage(repo, &newest, e))?;
    Ok(ReadSummary {
        files: outcome.files,
        files_reused: 0,
        files_written: outcome.files,
        wal_records: checked.records_verified(),
        downloaded: downloaded.load(Ordering::Relaxed),
        record: newest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_numbers_and_renamed_headers() {
        assert_eq!(tar_number(b"00000001750\0"), Some(1000));
        assert_eq!(tar_number(b"\x80\0\0\0\0\0\0\0\0\0\x01\0"), Some(256));
        let mut raw = [0u8; 512];
        raw[..22].copy_from_slice(b"base/5/INCREMENTAL.123");
        raw[156] = b'0';
        let out = renamed_header(&raw, 8192);
        assert_eq!(cstr(&out[..100]), b"base/5/123");
        assert_eq!(tar_number(&out[124..136]), Some(8192));
        let mut check = out;
        check[148..156].fill(b' ');
        let sum: u32 = check.iter().map(|b| u32::from(*b)).sum();
        assert_eq!(tar_number(&out[148..155]), Some(u64::from(sum)));
    }

    fn header(name: &str, size: u64, typeflag: u8) -> [u8; 512] {
        let mut raw = [0u8; 512];
        raw[..name.len()].copy_from_slice(name.as_bytes());
        raw[156] = typeflag;
        raw[257..263].copy_from_slice(b"ustar\0");
        sized_header(&mut raw, size);
        raw
    }

    #[test]
    fn the_tar_reader_walks_entries_and_their_data() {
        let mut stream = Vec::new();
        stream.extend_from_slice(&header("./base/1/", 0, b'5'));
        stream.extend_from_slice(&header("base/1/123", 5, b'0'));
        stream.extend_from_slice(b"hello");
        stream.extend_from_slice(&[0u8; 507]);
        stream.extend_from_slice(&header("pg_tblspc/16400", 0, b'2'));
        stream.extend_from_slice(&[0u8; 1024]);
        let mut tar = TarReader::new(stream.as_slice());
        let first = tar.next().unwrap().unwrap();
        assert_eq!(
            (first.name.as_slice(), first.size),
            (b"base/1".as_slice(), 0)
        );
        let second = tar.next().unwrap().unwrap();
        assert_eq!(second.name, b"base/1/123");
        let mut data = String::new();
        tar.read_to_string(&mut data).unwrap();
        assert_eq!(data, "hello");
        assert_eq!(tar.next().unwrap().unwrap().typeflag, b'2');
        assert!(tar.next().unwrap().is_none());
        assert!(tar.next().unwrap().is_none());
        // Cut inside an entry: an error, not a panic or a silent end.
        let mut cut = TarReader::new(&stream[..512 + 512 + 3]);
        cut.next().unwrap();
        cut.next().unwrap();
        assert!(cut.next().is_err());
    }

    proptest::proptest! {
        #[test]
        fn hostile_tar_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3000)) {
            let mut tar = TarReader::new(bytes.as_slice());
            for _ in 0..8 {
                match tar.next() {
                    Ok(Some(_)) => {
                        let mut sink = Vec::new();
                        let _ = (&mut tar).take(4096).read_to_end(&mut sink);
                    }
                    _ => break,
                }
            }
            let _ = tar_number(&bytes[..bytes.len().min(12)]);
        }
    }

    fn record(label: &str, parent: Option<&str>, start: &str, end: &str, tli: u32) -> CommitRecord {
        CommitRecord {
            format: 1,
            label: label.into(),
            system_identifier: "7712258631147479762".into(),
            server_major: 17,
            started_at: "2026-11-30T10:00:00Z".into(),
            finished_at: "2026-11-30T10:01:00Z".into(),
            start_lsn: start.into(),
            start_timeline: tli,
            end_lsn: end.into(),
            end_timeline: tli,
            archives: vec![],
            manifest_bytes: 10,
            manifest_sha256: "ab".into(),
            checksum_algorithm: "CRC32C".into(),
            files: 3,
            database_bytes: 100,
            stored_bytes: 50,
            wal: crate::layout::WalRecord {
                mode: "included".into(),
                segments: 1,
                records_verified: 5,
            },
            parent: parent.map(str::to_string),
        }
    }

    #[test]
    fn chains_must_link() {
        let full = record("full", None, "0/2000028", "0/2000100", 1);
        let inc = record("inc", Some("full"), "0/3000028", "0/3000100", 1);
        check_links(&[inc.clone(), full.clone()]).unwrap();
        // A later timeline is accepted (a promotion between the backups).
        let promoted = record("inc", Some("full"), "0/3000028", "0/3000100", 2);
        check_links(&[promoted, full.clone()]).unwrap();
        let early = record("inc", Some("full"), "0/2000050", "0/3000100", 1);
        let e = check_links(&[early, full.clone()]).unwrap_err();
        assert!(e.message().contains("before its parent full ends"), "{e}");
        let mut older_timeline = inc.clone();
        older_timeline.start_timeline = 1;
        let mut parent2 = full.clone();
        parent2.end_timeline = 2;
        let e = check_links(&[older_timeline, parent2]).unwrap_err();
        assert!(e.message().contains("older than its parent"), "{e}");
        let mut foreign = full.clone();
        foreign.system_identifier = "1".into();
        let e = check_links(&[inc.clone(), foreign]).unwrap_err();
        assert!(e.message().contains("another cluster"), "{e}");
        let mut other_major = full;
        other_major.server_major = 18;
        let e = check_links(&[inc, other_major]).unwrap_err();
        assert!(e.message().contains("PostgreSQL 18"), "{e}");
    }

    #[test]
    fn timelines_must_descend() {
        let full = record("full", None, "0/2000028", "0/2000100", 1);
        let inc = record("inc", Some("full"), "0/5000028", "0/5000100", 3);
        let history = b"1\t0/3000000\tno recovery target specified\n\n2\t0/4000000\tafter\n";
        check_descends(&inc, &full, history).unwrap();
        let early = b"1\t0/2000050\tbefore the parent ends\n";
        let e = check_descends(&inc, &full, early).unwrap_err();
        assert!(
            e.message().contains("the parent is not in its history"),
            "{e}"
        );
        let e = check_descends(&inc, &full, b"# nothing\n7\t0/1\tx\n").unwrap_err();
        assert!(e.message().contains("does not descend"), "{e}");
    }

    #[test]
    fn backup_labels_must_name_the_parent() {
        let full = record("full", None, "0/2000028", "0/2000100", 1);
        let label = b"START WAL LOCATION: 0/3000028\nINCREMENTAL FROM LSN: 0/2000028\nINCREMENTAL FROM TLI: 1\n";
        check_incremental_from(label, "inc", &full).unwrap();
        let other = b"INCREMENTAL FROM LSN: 0/1000028\nINCREMENTAL FROM TLI: 1\n";
        let e = check_incremental_from(other, "inc", &full).unwrap_err();
        assert!(
            e.message().contains("its parent full starts at 0/2000028"),
            "{e}"
        );
        let e = check_incremental_from(b"START TIMELINE: 1\n", "inc", &full).unwrap_err();
        assert!(e.message().contains("no INCREMENTAL FROM"), "{e}");
    }

    #[test]
    fn backup_label_loses_only_the_incremental_lines() {
        let label = b"START WAL LOCATION: 0/2000028\nINCREMENTAL FROM LSN: 0/1000028\nINCREMENTAL FROM TLI: 1\nSTART TIMELINE: 1\n";
        assert_eq!(
            strip_incremental_lines(label),
            b"START WAL LOCATION: 0/2000028\nSTART TIMELINE: 1\n".to_vec()
        );
    }

    #[test]
    fn rebuilt_files_equal_a_whole_older_file_only_when_nothing_changed() {
        let bs = u64::from(DEFAULT_BLOCK_SIZE);
        let header = |blocks: Vec<u32>, truncation| IncrementalHeader {
            truncation_block_length: truncation,
            data_offset: if blocks.is_empty() { 12 } else { bs },
            block_numbers: blocks,
            big_endian: false,
        };
        let file = |size| ManifestFile {
            path: b"base/5/16384".to_vec(),
            size,
            algorithm: ChecksumAlgorithm::Crc32c,
            checksum: Some("01234567".into()),
        };
        let empty = (file(12), true);
        let whole = (file(4 * bs), false);
        // No block changed and the length kept: the full backup's file, through any
        // number of empty incremental files.
        assert_eq!(
            known_whole(&header(vec![], 4), std::slice::from_ref(&whole)),
            Some(0)
        );
        assert_eq!(
            known_whole(
                &header(vec![], 4),
                &[empty.clone(), empty.clone(), whole.clone()]
            ),
            Some(2)
        );
        // Truncated or extended since: not the same file.
        assert_eq!(
            known_whole(&header(vec![], 3), std::slice::from_ref(&whole)),
            None
        );
        assert_eq!(
            known_whole(&header(vec![], 5), std::slice::from_ref(&whole)),
            None
        );
        // A changed block, newest or older: rebuilt.
        assert_eq!(
            known_whole(&header(vec![1], 4), std::slice::from_ref(&whole)),
            None
        );
        let changed = (file(2 * bs), true);
        assert_eq!(known_whole(&header(vec![], 4), &[changed, whole]), None);
        // No whole version: nothing known.
        assert_eq!(known_whole(&header(vec![], 4), &[empty]), None);
        assert_eq!(known_whole(&header(vec![], 4), &[]), None);
    }

    #[test]
    fn combined_manifests_parse() {
        let body = "{ \"PostgreSQL-Backup-Manifest-Version\": 2,\n\"System-Identifier\": 42,\n\"Files\": [\n\
            { \"Path\": \"base/5/INCREMENTAL.16384\", \"Size\": 12, \"Last-Modified\": \"2026-01-01 00:00:00 GMT\", \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"12345678\" },\n\
            { \"Path\": \"PG_VERSION\", \"Size\": 3, \"Last-Modified\": \"2026-01-01 00:00:00 GMT\", \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"12345678\" }\n],\n\
            \"WAL-Ranges\": [\n{ \"Timeline\": 1, \"Start-LSN\": \"0/2000028\", \"End-LSN\": \"0/2000100\" }\n],\n";
        let sum = crate::upload::hex(&sha2::Sha256::digest(body.as_bytes()));
        let text = format!("{body}\"Manifest-Checksum\": \"{sum}\"}}\n");
        let mut overrides = Overrides::new();
        overrides.insert(b"base/5/16384".to_vec(), (16384, Some("abcdef01".into())));
        let combined = combined_manifest(text.as_bytes(), &overrides).unwrap();
        let parsed = Manifest::parse(&combined).unwrap();
        assert_eq!(parsed.system_identifier, Some(42));
        assert_eq!(parsed.files[0].path, b"base/5/16384");
        assert_eq!(parsed.files[0].size, 16384);
        assert_eq!(parsed.files[0].checksum.as_deref(), Some("abcdef01"));
        assert_eq!(parsed.files[1].path, b"PG_VERSION");
        assert_eq!(parsed.wal_ranges.len(), 1);
    }
}
