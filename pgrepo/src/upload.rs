//! Streaming a backup into the repository: multipart uploads fed straight from the
//! verifying pipeline, with no local staging.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use basebackup::{ArchiveInfo, AsyncBackupSink, BackupInfo, Bytes, Manifest, TarEvent};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{MultipartUpload, ObjectStoreExt, PutPayload, UploadPart};
use sha2::Digest;

use crate::layout::{
    ArchiveIndex, ArchiveRecord, CommitRecord, IndexEntry, IndexFrame, StoredCompression,
    WalRecord, COMMIT_RECORD, FORMAT, INDEX_SUFFIX, MANIFEST,
};
use crate::repository::Repository;
use crate::tarindex::{TarEntry, TarWalker};
use crate::walcheck::WalCheck;

/// A stored archive compressed (or stored plain) here is cut into a new independent
/// frame at the first tar entry boundary after this much tar data.
pub const FRAME_TAR_BYTES: u64 = 8 << 20;
/// Entries at least this large get frames of their own, so that a small changed file
/// next to a large unchanged one (a catalog beside a 1 GB segment) costs little to fetch.
pub const LARGE_ENTRY_BYTES: u64 = 1 << 20;

/// S3's smallest part (but the last).
pub const MIN_PART_SIZE: usize = 5 << 20;
/// S3's largest number of parts.
const MAX_PARTS: usize = 10_000;
/// Parts are doubled in size every this many parts, so that an archive of any size fits
/// in [`MAX_PARTS`] without knowing its size in advance.
const PARTS_PER_SIZE: usize = 1_000;

/// How archives are uploaded.
#[derive(Debug, Clone, Copy)]
pub struct UploadOptions {
    /// The size of the first parts (at least 5 MiB); it doubles every 1000 parts.
    pub part_size: usize,
    /// Parts uploaded at the same time, per archive.
    pub concurrency: usize,
}

impl Default for UploadOptions {
    fn default() -> UploadOptions {
        // S3's smallest part: the memory in flight is what bounds the process's size.
        UploadOptions {
            part_size: MIN_PART_SIZE,
            concurrency: 3,
        }
    }
}

/// One object being uploaded in parts; memory holds at most the current part and
/// `concurrency` parts in flight.
struct ObjectUpload {
    upload: Box<dyn MultipartUpload>,
    describe: String,
    /// The part being filled. Data is copied in (about 0.1 s per GB) rather than kept
    /// as slices: a slice keeps its whole receive buffer alive, and parts waiting for
    /// the store would otherwise pin far more memory than their size.
    pending: bytes::BytesMut,
    pending_bytes: usize,
    part_size: usize,
    parts: usize,
    concurrency: usize,
    /// Part uploads run as tasks, so that they progress while this side waits for data.
    in_flight: FuturesUnordered<tokio::task::JoinHandle<object_store::Result<()>>>,
    bytes: u64,
    uploaded: Arc<AtomicU64>,
}

impl ObjectUpload {
    async fn write(&mut self, mut data: Bytes) -> crate::Result<()> {
        self.bytes += data.len() as u64;
        while !data.is_empty() {
            let room = self.part_size - self.pending_bytes;
            let take = room.min(data.len());
            if self.pending.capacity() == 0 {
                self.pending.reserve(self.part_size);
            }
            self.pending.extend_from_slice(&data.split_to(take));
            self.pending_bytes += take;
            if self.pending_bytes == self.part_size {
                self.send_part().await?;
            }
        }
        Ok(())
    }

    async fn send_part(&mut self) -> crate::Result<()> {
        while self.in_flight.len() >= self.concurrency {
            self.wait_one().await?;
        }
        if self.parts + 1 >= MAX_PARTS {
            return Err(crate::Error::usage(
                format!(
                    "{}: the archive needs more than {MAX_PARTS} parts",
                    self.describe
                ),
                "raise the part size",
            ));
        }
        let payload = PutPayload::from_bytes(std::mem::take(&mut self.pending).freeze());
        let size = self.pending_bytes as u64;
        self.pending_bytes = 0;
        self.parts += 1;
        if self.parts % PARTS_PER_SIZE == 0 {
            self.part_size *= 2;
        }
        let uploaded = self.uploaded.clone();
        let part: UploadPart = self.upload.put_part(payload);
        self.in_flight.push(tokio::spawn(async move {
            part.await?;
            uploaded.fetch_add(size, Ordering::Relaxed);
            Ok(())
        }));
        Ok(())
    }

    async fn wait_one(&mut self) -> crate::Result<()> {
        match self.in_flight.next().await {
            Some(Ok(result)) => {
                result.map_err(|e| crate::Error::store(format!("uploading {}", self.describe), e))
            }
            Some(Err(join)) => Err(crate::Error::usage(
                format!(
                    "uploading {}: the upload task failed: {join}",
                    self.describe
                ),
                "report this as a bug",
            )),
            None => Ok(()),
        }
    }

    /// Uploads the rest and completes the object.
    async fn finish(mut self) -> crate::Result<u64> {
        if self.pending_bytes > 0 || self.parts == 0 {
            self.send_part().await?;
        }
        while !self.in_flight.is_empty() {
            if let Err(e) = self.wait_one().await {
                let _ = self.upload.abort().await;
                return Err(e);
            }
        }
        self.upload
            .complete()
            .await
            .map_err(|e| crate::Error::store(format!("completing {}", self.describe), e))?;
        Ok(self.bytes)
    }

    async fn abort(mut self) {
        for task in self.in_flight.iter() {
            task.abort();
        }
        self.in_flight.clear();
        if let Err(e) = self.upload.abort().await {
            tracing::warn!("aborting the upload of {}: {e}", self.describe);
        }
    }
}

/// Client-side compression of an archive the server sent uncompressed.
enum ClientEncoder {
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
    Lz4(lz4_flex::frame::FrameEncoder<Vec<u8>>),
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
}

impl ClientEncoder {
    fn new(method: StoredCompression, level: Option<i32>) -> std::io::Result<Option<Self>> {
        Ok(Some(match method {
            StoredCompression::None => return Ok(None),
            // Every frame carries a checksum of its content: damage anywhere in it is
            // found when it is decompressed, also in bytes no other check covers (such
            // as a WAL segment's unused tail).
            StoredCompression::Zstd => {
                let mut encoder =
                    zstd::stream::write::Encoder::new(Vec::new(), level.unwrap_or(1))?;
                encoder.include_checksum(true)?;
                ClientEncoder::Zstd(encoder)
            }
            StoredCompression::Lz4 => {
                let info = lz4_flex::frame::FrameInfo::new().content_checksum(true);
                ClientEncoder::Lz4(lz4_flex::frame::FrameEncoder::with_frame_info(
                    info,
                    Vec::new(),
                ))
            }
            StoredCompression::Gzip => ClientEncoder::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::new(level.unwrap_or(1).clamp(1, 9) as u32),
            )),
        }))
    }

    fn output(&mut self) -> &mut Vec<u8> {
        match self {
            ClientEncoder::Zstd(e) => e.get_mut(),
            ClientEncoder::Lz4(e) => e.get_mut(),
            ClientEncoder::Gzip(e) => e.get_mut(),
        }
    }

    /// Compresses `data`; returns what is ready to store.
    fn write(&mut self, data: &[u8]) -> std::io::Result<Bytes> {
        match self {
            ClientEncoder::Zstd(e) => e.write_all(data)?,
            ClientEncoder::Lz4(e) => e.write_all(data)?,
            ClientEncoder::Gzip(e) => e.write_all(data)?,
        }
        Ok(Bytes::from(std::mem::take(self.output())))
    }

    fn finish(self) -> std::io::Result<Bytes> {
        Ok(Bytes::from(match self {
            ClientEncoder::Zstd(e) => e.finish()?,
            ClientEncoder::Lz4(e) => e.finish().map_err(std::io::Error::other)?,
            ClientEncoder::Gzip(e) => e.finish()?,
        }))
    }
}

/// Runs CPU-heavy work without stalling the runtime's other tasks where it can.
pub(crate) fn cpu<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

struct CurrentArchive {
    upload: ObjectUpload,
    path: Path,
    record: ArchiveRecord,
    encoder: Option<ClientEncoder>,
    level: Option<i32>,
    server_compressed: bool,
    base: bool,
    /// Walks the tar stream to find entry boundaries (archives stored by us only).
    walker: Option<TarWalker>,
    frames: Vec<IndexFrame>,
    /// The last entry was large (the next one starts a frame).
    after_large: bool,
}

fn index_entry(e: TarEntry) -> IndexEntry {
    IndexEntry {
        path: String::from_utf8_lossy(&e.path).into_owned(),
        size: e.size,
        kind: match e.typeflag {
            b'0' | 0 | b'7' => "file",
            b'5' => "dir",
            b'2' => "link",
            _ => "other",
        }
        .into(),
    }
}

impl CurrentArchive {
    /// Stores `data` (tar bytes), compressing it when asked.
    async fn store(&mut self, data: Bytes) -> crate::Result<()> {
        let stored = match self.encoder.as_mut() {
            Some(encoder) => cpu(|| encoder.write(&data)).map_err(|e| {
                crate::Error::usage(format!("compressing: {e}"), "report this as a bug")
            })?,
            None => data,
        };
        if !stored.is_empty() {
            self.upload.write(stored).await?;
        }
        Ok(())
    }

    /// Ends the current frame at tar offset `tar_end` (finishing the encoder).
    async fn end_frame(&mut self, tar_end: u64) -> crate::Result<()> {
        if let Some(encoder) = self.encoder.take() {
            let tail = cpu(|| encoder.finish()).map_err(|e| {
                crate::Error::usage(format!("compressing: {e}"), "report this as a bug")
            })?;
            if !tail.is_empty() {
                self.upload.write(tail).await?;
            }
        }
        if let Some(frame) = self.frames.last_mut() {
            frame.stored_len = self.upload.bytes - frame.stored_offset;
            frame.tar_len = tar_end - frame.tar_offset;
        }
        Ok(())
    }

    /// Starts a frame at tar offset `tar_start`.
    fn start_frame(&mut self, tar_start: u64) -> crate::Result<()> {
        self.encoder = ClientEncoder::new(self.record.compression, self.level).map_err(|e| {
            crate::Error::usage(format!("compressing: {e}"), "report this as a bug")
        })?;
        self.frames.push(IndexFrame {
            stored_offset: self.upload.bytes,
            stored_len: 0,
            tar_offset: tar_start,
            tar_len: 0,
            entries: Vec::new(),
        });
        Ok(())
    }

    /// Takes tar bytes of an archive stored here: walks them, cuts frames at entry
    /// boundaries, stores them.
    async fn tar_bytes(&mut self, data: Bytes) -> crate::Result<()> {
        let base = self.record.tar_bytes;
        self.record.tar_bytes += data.len() as u64;
        let Some(walker) = self.walker.as_mut() else {
            return self.store(data).await;
        };
        let mut entries = Vec::new();
        walker.push(&data, &mut |e| entries.push(e));
        let mut from = 0u64;
        for entry in entries {
            let frame_start = self.frames.last().map_or(0, |f| f.tar_offset);
            let large = entry.size >= LARGE_ENTRY_BYTES;
            let cut = entry.offset - frame_start >= FRAME_TAR_BYTES || large || self.after_large;
            self.after_large = large;
            if entry.offset >= base + from && entry.offset > frame_start && cut {
                let to = entry.offset - base;
                self.store(data.slice(from as usize..to as usize)).await?;
                from = to;
                self.end_frame(entry.offset).await?;
                self.start_frame(entry.offset)?;
            }
            if let Some(frame) = self.frames.last_mut() {
                frame.entries.push(index_entry(entry));
            }
        }
        self.store(data.slice(from as usize..)).await
    }
}

/// The [`AsyncBackupSink`] that streams a backup into a repository.
pub(crate) struct RepoSink {
    pub repo: Repository,
    pub label: String,
    pub system_id: u64,
    pub client_compression: (StoredCompression, Option<i32>),
    pub upload: UploadOptions,
    pub started_at: String,
    pub uploaded: Arc<AtomicU64>,
    info: Option<BackupInfo>,
    current: Option<CurrentArchive>,
    archives: Vec<ArchiveRecord>,
    wal: WalCheck,
    /// The commit record, once committed.
    pub committed: Option<CommitRecord>,
    parent: Option<String>,
}

impl RepoSink {
    pub fn new(
        repo: Repository,
        label: String,
        system_id: u64,
        client_compression: (StoredCompression, Option<i32>),
        upload: UploadOptions,
        uploaded: Arc<AtomicU64>,
    ) -> RepoSink {
        RepoSink {
            repo,
            label,
            system_id,
            client_compression,
            upload,
            started_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            uploaded,
            info: None,
            current: None,
            archives: Vec::new(),
            wal: WalCheck::default(),
            committed: None,
            parent: None,
        }
    }

    /// Names the parent of an incremental backup in its commit record.
    pub fn parent(mut self, parent: Option<String>) -> RepoSink {
        self.parent = parent;
        self
    }

    async fn write(&mut self, data: Bytes) -> basebackup::Result<()> {
        let current = self.current.as_mut().ok_or_else(|| {
            basebackup::Error::sink("archive data before any archive", "report this as a bug")
        })?;
        current.upload.write(data).await.map_err(to_sink)
    }

    fn record(
        &self,
        manifest: &Manifest,
        manifest_bytes: &[u8],
    ) -> basebackup::Result<CommitRecord> {
        let info = self.info.as_ref().ok_or_else(|| {
            basebackup::Error::sink("commit before the backup began", "report this as a bug")
        })?;
        let Some(last) = manifest.wal_ranges.last() else {
            return Err(basebackup::Error::verify(
                "backup_manifest",
                "lists no WAL range, so the backup's end is unknown",
            ));
        };
        let stored: u64 = self.archives.iter().map(|a| a.stored_bytes).sum();
        Ok(CommitRecord {
            format: FORMAT,
            label: self.label.clone(),
            system_identifier: self.system_id.to_string(),
            server_major: info.server_major,
            started_at: self.started_at.clone(),
            finished_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            start_lsn: info.start_lsn.to_string(),
            start_timeline: info.timeline.0,
            end_lsn: last.end.to_string(),
            end_timeline: last.timeline.0,
            archives: self.archives.clone(),
            manifest_bytes: manifest_bytes.len() as u64,
            manifest_sha256: hex(&sha2::Sha256::digest(manifest_bytes)),
            checksum_algorithm: manifest
                .files
                .iter()
                .map(|f| f.algorithm.name())
                .next()
                .unwrap_or("NONE")
                .to_string(),
            files: manifest.files.len() as u64,
            database_bytes: manifest.files.iter().map(|f| f.size).sum(),
            stored_bytes: stored + manifest_bytes.len() as u64,
            wal: WalRecord {
                mode: "included".into(),
                segments: self.wal.segments(),
                records_verified: self.wal.records_verified(),
            },
            parent: self.parent.clone(),
        })
    }
}

fn to_sink(e: crate::Error) -> basebackup::Error {
    let retryable = e.is_retryable();
    basebackup::Error::sink(
        e.message().to_string(),
        e.advice().unwrap_or("").to_string(),
    )
    .retryable(retryable)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl AsyncBackupSink for RepoSink {
    async fn begin_backup(&mut self, info: &BackupInfo) -> basebackup::Result<()> {
        self.wal = WalCheck::new(info.server_major, Some(self.system_id));
        self.info = Some(info.clone());
        Ok(())
    }

    async fn begin_archive(&mut self, archive: &ArchiveInfo) -> basebackup::Result<()> {
        let (compression, by, encoder) = match archive.compression {
            Some(method) => (StoredCompression::from_method(Some(method)), "server", None),
            None => {
                let (method, level) = self.client_compression;
                let encoder = ClientEncoder::new(method, level).map_err(|e| {
                    basebackup::Error::sink(
                        format!("starting {} compression: {e}", method.name()),
                        "report this as a bug",
                    )
                })?;
                let by = if encoder.is_some() { "client" } else { "none" };
                (method, by, encoder)
            }
        };
        let object = format!("{}{}", archive.tar_name(), compression.suffix());
        let path = self.repo.backup_path(&self.label, &object);
        let describe = self.repo.describe(&path);
        let upload = self.repo.store().put_multipart(&path).await.map_err(|e| {
            to_sink(crate::Error::store(
                format!("starting the upload of {describe}"),
                e,
            ))
        })?;
        self.current = Some(CurrentArchive {
            upload: ObjectUpload {
                upload,
                describe,
                pending: bytes::BytesMut::new(),
                pending_bytes: 0,
                part_size: self.upload.part_size.max(MIN_PART_SIZE),
                parts: 0,
                concurrency: self.upload.concurrency.max(1),
                in_flight: FuturesUnordered::new(),
                bytes: 0,
                uploaded: self.uploaded.clone(),
            },
            path,
            record: ArchiveRecord {
                object,
                tablespace_oid: archive.tablespace.oid,
                location: archive.tablespace.location.clone(),
                compression,
                compressed_by: by.into(),
                stored_bytes: 0,
                tar_bytes: 0,
                index: None,
            },
            encoder,
            level: self.client_compression.1,
            server_compressed: archive.compression.is_some(),
            base: archive.is_base(),
            walker: archive.compression.is_none().then(TarWalker::default),
            frames: Vec::new(),
            after_large: false,
        });
        if let Some(current) = self.current.as_mut() {
            if current.walker.is_some() {
                current.start_frame(0).map_err(to_sink)?;
            }
        }
        Ok(())
    }

    async fn compressed_bytes(&mut self, data: Bytes) -> basebackup::Result<()> {
        // Stored exactly as the server sent it.
        self.write(data).await
    }

    async fn archive_bytes(&mut self, data: Bytes) -> basebackup::Result<()> {
        let Some(current) = self.current.as_mut() else {
            return Err(basebackup::Error::sink(
                "archive data before any archive",
                "report this as a bug",
            ));
        };
        if current.server_compressed {
            current.record.tar_bytes += data.len() as u64;
            return Ok(());
        }
        current.tar_bytes(data).await.map_err(to_sink)
    }

    async fn entry(&mut self, event: TarEvent) -> basebackup::Result<()> {
        if self.current.as_ref().is_some_and(|c| c.base) {
            self.wal.event(&event);
        }
        Ok(())
    }

    async fn end_archive(&mut self, _trailer_present: bool) -> basebackup::Result<()> {
        let Some(mut current) = self.current.take() else {
            return Err(basebackup::Error::sink(
                "end of an archive that never began",
                "report this as a bug",
            ));
        };
        let tar_end = current.record.tar_bytes;
        current.end_frame(tar_end).await.map_err(to_sink)?;
        let path = current.path.clone();
        let bytes = current.upload.finish().await.map_err(to_sink)?;
        current.record.stored_bytes = bytes;
        tracing::debug!("stored {}", self.repo.describe(&path));
        // An index only when the walker understood the whole stream (the pipeline
        // verified it anyway); otherwise readers take the archive whole.
        if current.walker.as_ref().is_some_and(|w| !w.broken()) {
            let index = ArchiveIndex {
                format: FORMAT,
                compression: current.record.compression,
                frames: std::mem::take(&mut current.frames),
            };
            let name = format!("{}{INDEX_SUFFIX}", current.record.object);
            let json = serde_json::to_vec(&index).map_err(|e| {
                basebackup::Error::sink(format!("writing the index: {e}"), "report this as a bug")
            })?;
            self.repo
                .put_bytes(
                    &self.repo.backup_path(&self.label, &name),
                    Bytes::from(json),
                )
                .await
                .map_err(to_sink)?;
            current.record.index = Some(name);
        }
        self.archives.push(current.record);
        Ok(())
    }

    async fn commit(&mut self, manifest: Option<Bytes>) -> basebackup::Result<()> {
        let manifest = manifest.ok_or_else(|| {
            basebackup::Error::usage(
                "a backup without a manifest cannot be verified",
                "take repository backups with a manifest",
            )
        })?;
        let parsed = Manifest::parse(&manifest)?;
        self.wal.finish(&parsed.wal_ranges).map_err(|e| {
            basebackup::Error::verify(
                e.message().to_string(),
                "the backup's WAL is incomplete or damaged",
            )
        })?;
        let record = self.record(&parsed, &manifest)?;
        self.repo
            .put_bytes(
                &self.repo.backup_path(&self.label, MANIFEST),
                manifest.clone(),
            )
            .await
            .map_err(to_sink)?;
        // Last: from here on, the backup exists.
        self.repo
            .put_bytes(
                &self.repo.backup_path(&self.label, COMMIT_RECORD),
                Bytes::from(record.to_json()),
            )
            .await
            .map_err(to_sink)?;
        self.committed = Some(record);
        Ok(())
    }

    async fn abort(&mut self, reason: &basebackup::Error) {
        tracing::info!(
            "backup {} failed, removing its objects: {reason}",
            self.label
        );
        if let Some(current) = self.current.take() {
            current.upload.abort().await;
        }
        if let Err(e) = self.repo.delete_backup_objects(&self.label).await {
            tracing::warn!(
                "removing the objects of the failed backup {}: {e}",
                self.label
            );
        }
    }
}
