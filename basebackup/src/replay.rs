//! Stored archives through the same verifying pipeline as a live backup.
//!
//! A backup kept somewhere else (object storage, tar files) is read back archive by
//! archive and fed to [`Replay`]. It goes through exactly the code a live `BASE_BACKUP`
//! goes through on the writer thread: decompression, the tar parser with its safety
//! checks, the per-file checksums, the manifest comparison and then a [`BackupSink`].
//! Restoring is a replay into a [`PlainDirSink`](crate::PlainDirSink); verifying is a
//! replay into a sink that writes nothing.
//!
//! ```
//! # async fn demo() -> basebackup::Result<()> {
//! use basebackup::{replay::Replay, ArchiveInfo, BackupInfo, Bytes, Tablespace};
//! # let manifest_bytes = Bytes::new(); let info: BackupInfo = todo!(); let tar = Bytes::new();
//! # struct Nothing; impl basebackup::BackupSink for Nothing {
//! #   fn begin_backup(&mut self, _: &BackupInfo) -> basebackup::Result<()> { Ok(()) }
//! #   fn begin_archive(&mut self, _: &ArchiveInfo) -> basebackup::Result<()> { Ok(()) }
//! #   fn end_archive(&mut self, _: bool) -> basebackup::Result<()> { Ok(()) }
//! #   fn commit(&mut self, _: Option<&[u8]>) -> basebackup::Result<()> { Ok(()) }
//! #   fn abort(&mut self, _: &basebackup::Error) {}
//! # }
//! let mut replay = Replay::start(info, Some(manifest_bytes), Nothing)?;
//! replay
//!     .begin_archive(ArchiveInfo {
//!         name: "base.tar".into(),
//!         tablespace: Tablespace { oid: None, location: None, size_estimate: None },
//!         compression: None,
//!     })
//!     .await?;
//! replay.data(tar).await?;
//! let (outcome, _sink) = replay.finish().await?;
//! println!("{} files verified", outcome.files);
//! # Ok(()) }
//! ```

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::backup::StopReason;
use crate::command::ChecksumAlgorithm;
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::pipeline::{self, Msg, Outcome};
use crate::sink::{ArchiveInfo, BackupInfo, BackupSink};

/// Messages queued for the writer at most (as for a live backup).
const CHANNEL_CAPACITY: usize = 8;

/// Data is handed to the writer in batches of about this size.
const BATCH_BYTES: usize = 1 << 20;

/// What a finished replay verified.
#[derive(Debug, Clone)]
pub struct ReplayOutcome {
    /// The verified manifest (`None` when replayed without one).
    pub manifest: Option<Manifest>,
    /// Files received.
    pub files: usize,
    /// Bytes of archive data fed in, as stored (compressed if the archive was).
    pub stored_bytes: u64,
}

type Writer<S> = JoinHandle<(Result<Outcome>, S)>;

/// Feeds stored archives to a [`BackupSink`] through the verifying writer pipeline.
///
/// Call [`begin_archive`](Replay::begin_archive), then [`data`](Replay::data) with the
/// archive's bytes as stored (compressed if [`ArchiveInfo::compression`] says so), for
/// each archive, then [`finish`](Replay::finish): it verifies every file against the
/// manifest and commits the sink. On any error the sink is told to abort, and nothing
/// it made is left looking complete. Dropping a `Replay` aborts the sink too.
pub struct Replay<S: BackupSink + 'static> {
    tx: Option<mpsc::Sender<Msg>>,
    writer: Option<Writer<S>>,
    batch: Vec<Bytes>,
    batch_bytes: usize,
    stored_bytes: u64,
    stopped: StopReason,
    /// The writer's error, once it failed.
    failed: Option<Error>,
}

impl<S: BackupSink + 'static> Replay<S> {
    /// Starts the writer thread with `sink`. The manifest comes first, so that the file
    /// checksums are computed with its algorithm; without one (a backup taken with
    /// `ManifestMode::No`), nothing can be verified but the tar structure. Must be
    /// called inside a Tokio runtime.
    pub fn start(info: BackupInfo, manifest: Option<Bytes>, sink: S) -> Result<Replay<S>> {
        let algorithm = match &manifest {
            Some(bytes) => {
                let parsed = Manifest::parse(bytes)?;
                parsed
                    .files
                    .iter()
                    .map(|f| f.algorithm)
                    .find(|a| *a != ChecksumAlgorithm::None)
                    .unwrap_or(ChecksumAlgorithm::None)
            }
            None => ChecksumAlgorithm::None,
        };
        let manifest_expected = manifest.is_some();
        let mut first = vec![Msg::Begin(info)];
        if let Some(bytes) = manifest {
            first.push(Msg::Manifest(bytes));
        }
        Replay::spawn(first, algorithm, manifest_expected, sink)
    }

    /// Like [`start`](Replay::start), for a stream whose manifest is only known at its
    /// end (one synthesized while it is fed): files are checksummed with `algorithm`,
    /// and the manifest must come through [`manifest`](Replay::manifest) before
    /// [`finish`](Replay::finish), which verifies every file against it.
    pub fn start_manifest_later(
        info: BackupInfo,
        algorithm: ChecksumAlgorithm,
        sink: S,
    ) -> Result<Replay<S>> {
        Replay::spawn(vec![Msg::Begin(info)], algorithm, true, sink)
    }

    /// The manifest of a replay begun with
    /// [`start_manifest_later`](Replay::start_manifest_later), once every archive was fed.
    pub async fn manifest(&mut self, bytes: Bytes) -> Result<()> {
        self.send(Msg::Manifest(bytes)).await
    }

    fn spawn(
        first: Vec<Msg>,
        algorithm: ChecksumAlgorithm,
        manifest_expected: bool,
        sink: S,
    ) -> Result<Replay<S>> {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let stopped = StopReason::default();
        let writer_stopped = stopped.clone();
        let writer = tokio::task::spawn_blocking(move || {
            let mut sink = sink;
            let outcome =
                pipeline::run(rx, &mut sink, algorithm, manifest_expected, &writer_stopped);
            (outcome, sink)
        });
        // The channel is empty: these two fit without waiting.
        for msg in first {
            tx.try_send(msg).map_err(|_| {
                Error::writer_panicked("the writer stopped before the backup began")
            })?;
        }
        Ok(Replay {
            tx: Some(tx),
            writer: Some(writer),
            batch: Vec::new(),
            batch_bytes: 0,
            stored_bytes: 0,
            stopped,
            failed: None,
        })
    }

    /// A new archive starts (the previous one, if any, is complete).
    pub async fn begin_archive(&mut self, archive: ArchiveInfo) -> Result<()> {
        self.send(Msg::Archive(archive)).await
    }

    /// The next bytes of the current archive, as stored.
    pub async fn data(&mut self, chunk: Bytes) -> Result<()> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        self.stored_bytes += chunk.len() as u64;
        self.batch_bytes += chunk.len();
        self.batch.push(chunk);
        if self.batch_bytes >= BATCH_BYTES {
            self.flush().await?;
        }
        Ok(())
    }

    /// Every archive was fed: verifies against the manifest, commits the sink and gives
    /// it back.
    pub async fn finish(mut self) -> Result<(ReplayOutcome, S)> {
        let sent = self.send(Msg::End).await;
        drop(self.tx.take());
        let (outcome, sink) = self.join().await?;
        sent?;
        let outcome = outcome?;
        Ok((
            ReplayOutcome {
                manifest: outcome.manifest,
                files: outcome.files,
                stored_bytes: self.stored_bytes,
            },
            sink,
        ))
    }

    /// Gives up for `reason` (a download failed, say): the sink aborts, told why. Returns
    /// the error to report: the writer's own if it had failed first.
    pub async fn fail(mut self, reason: Error) -> Error {
        if let Some(error) = self.failed.take() {
            return error;
        }
        self.stopped.set(reason.clone());
        self.batch.clear();
        drop(self.tx.take());
        match self.join().await {
            Ok((Err(writer_error), _)) if writer_error.kind() != reason.kind() => writer_error,
            _ => reason,
        }
    }

    async fn send(&mut self, msg: Msg) -> Result<()> {
        self.flush().await?;
        self.send_raw(msg).await
    }

    async fn flush(&mut self) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        self.send_raw(Msg::Data(batch)).await
    }

    async fn send_raw(&mut self, msg: Msg) -> Result<()> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| Error::usage("the replay already finished", "report this as a bug"))?;
        if tx.send(msg).await.is_ok() {
            return Ok(());
        }
        // The writer stopped: it failed, and its error is the root cause.
        drop(self.tx.take());
        let error = match self.join().await {
            Ok((Err(e), _)) => e,
            Ok((Ok(_), _)) => Error::writer_panicked("the writer finished before the end"),
            Err(e) => e,
        };
        self.failed = Some(error.clone());
        Err(error)
    }

    async fn join(&mut self) -> Result<(Result<Outcome>, S)> {
        let writer = self.writer.take().ok_or_else(|| {
            self.failed.clone().unwrap_or_else(|| {
                Error::usage("the replay already finished", "report this as a bug")
            })
        })?;
        writer.await.map_err(Error::writer_panicked)
    }
}

impl<S: BackupSink + 'static> Drop for Replay<S> {
    fn drop(&mut self) {
        // Closing the channel before `End` makes the writer abort the sink (cancelled).
        drop(self.tx.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::Tablespace;
    use crate::{ErrorKind, PlainDirSink};
    use pgwire_repl::{Lsn, TimelineId};
    use sha2::Digest;

    fn header(name: &str, size: usize, typeflag: u8) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..107].copy_from_slice(if typeflag == b'5' {
            b"0000700"
        } else {
            b"0000600"
        });
        h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        h[136..147].copy_from_slice(b"00000000000");
        h[156] = typeflag;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| b as u32).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        h
    }

    fn archive(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = header("global", 0, b'5');
        for (name, data) in files {
            out.extend(header(name, data.len(), b'0'));
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.extend(vec![0u8; 1024]);
        out
    }

    fn manifest(files: &[(&str, &[u8])]) -> Bytes {
        let mut body = String::from("{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [\n");
        let rows: Vec<String> = files
            .iter()
            .map(|(name, data)| {
                format!(
                    "{{ \"Path\": \"{name}\", \"Size\": {}, \"Last-Modified\": \"2026-11-30 00:00:00 GMT\", \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"{:08x}\" }}",
                    data.len(),
                    // PostgreSQL prints the CRC's bytes in memory order.
                    crc32c::crc32c(data).swap_bytes()
                )
            })
            .collect();
        body.push_str(&rows.join(",\n"));
        body.push_str("\n],\n\"WAL-Ranges\": [\n{ \"Timeline\": 1, \"Start-LSN\": \"0/2000028\", \"End-LSN\": \"0/2000100\" }\n],\n");
        let sum: String = sha2::Sha256::digest(body.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Bytes::from(format!("{body}\"Manifest-Checksum\": \"{sum}\"}}\n"))
    }

    fn info() -> BackupInfo {
        BackupInfo {
            server_major: 15,
            start_lsn: Lsn(0x2000028),
            timeline: TimelineId(1),
            tablespaces: vec![base()],
        }
    }

    fn base() -> Tablespace {
        Tablespace {
            oid: None,
            location: None,
            size_estimate: None,
        }
    }

    async fn replay_into(
        dir: &std::path::Path,
        stored: Vec<u8>,
        manifest: Bytes,
    ) -> Result<ReplayOutcome> {
        let sink = PlainDirSink::new(dir);
        let mut replay = Replay::start(info(), Some(manifest), sink)?;
        replay
            .begin_archive(ArchiveInfo {
                name: "base.tar.zst".into(),
                tablespace: base(),
                compression: Some(crate::CompressionMethod::Zstd),
            })
            .await?;
        let stored = Bytes::from(stored);
        // Fed in odd-sized pieces, as downloads arrive.
        for piece in stored.chunks(777) {
            replay.data(stored.slice_ref(piece)).await?;
        }
        replay.finish().await.map(|(outcome, _)| outcome)
    }

    const FILES: &[(&str, &[u8])] = &[("PG_VERSION", b"15\n"), ("global/pg_control", &[7u8; 8192])];

    #[tokio::test]
    async fn a_stored_compressed_backup_is_restored_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("data");
        let stored = zstd::encode_all(&archive(FILES)[..], 3).unwrap();
        let outcome = replay_into(&target, stored.clone(), manifest(FILES))
            .await
            .unwrap();
        assert_eq!(outcome.files, 2);
        assert_eq!(outcome.stored_bytes, stored.len() as u64);
        assert_eq!(std::fs::read(target.join("PG_VERSION")).unwrap(), b"15\n");
    }

    #[tokio::test]
    async fn a_damaged_file_fails_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("data");
        let mut damaged = archive(FILES);
        // A byte of pg_control's data.
        let at = damaged.len() - 1024 - 100;
        damaged[at] ^= 0xff;
        let stored = zstd::encode_all(&damaged[..], 3).unwrap();
        let err = replay_into(&target, stored, manifest(FILES))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Verify, "{err}");
        assert_eq!(err.path(), Some("global/pg_control"), "{err}");
        assert!(
            !target.exists(),
            "the failed restore left {target:?} behind"
        );
    }

    #[tokio::test]
    async fn a_download_failure_aborts_the_sink() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("data");
        let stored = Bytes::from(zstd::encode_all(&archive(FILES)[..], 3).unwrap());
        let mut replay =
            Replay::start(info(), Some(manifest(FILES)), PlainDirSink::new(&target)).unwrap();
        replay
            .begin_archive(ArchiveInfo {
                name: "base.tar.zst".into(),
                tablespace: base(),
                compression: Some(crate::CompressionMethod::Zstd),
            })
            .await
            .unwrap();
        replay.data(stored.slice(..stored.len() / 2)).await.unwrap();
        let err = replay
            .fail(Error::sink("the download was cut", "retry"))
            .await;
        assert!(err.to_string().contains("download was cut"), "{err}");
        assert!(
            !target.exists(),
            "the failed restore left {target:?} behind"
        );
    }
}
