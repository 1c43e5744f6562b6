//! The writer thread: decompression, tar parsing, checksums and the sink.
//!
//! The async side sends [`Msg`]s through a bounded channel; this side blocks on disk
//! writes without stalling the network, and the channel bound caps memory.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Read;

use bytes::Bytes;
use tokio::sync::mpsc::Receiver;

use crate::backup::StopReason;
use crate::command::{ChecksumAlgorithm, CompressionMethod};
use crate::error::{Error, Result};
use crate::manifest::{check_files, FileChecksum, Manifest, Received};
use crate::sink::{ArchiveInfo, BackupInfo, BackupSink};
use crate::tar::{display, TarEvent, TarParser};

/// Messages from the receiving side.
#[derive(Debug)]
pub(crate) enum Msg {
    Begin(BackupInfo),
    Archive(ArchiveInfo),
    /// Archive data, batched (see `BATCH_BYTES` in backup.rs).
    Data(Vec<Bytes>),
    Manifest(Bytes),
    /// The server reported success: verify and commit.
    End,
}

/// What the writer thread reports.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub manifest: Option<Manifest>,
    pub files: usize,
}

/// Size of the buffers decompressed data is produced in.
const DECOMPRESS_CHUNK: usize = 256 * 1024;

struct Verifier {
    algorithm: ChecksumAlgorithm,
    prefix: Vec<u8>,
    current: Option<(Vec<u8>, FileChecksum, u64)>,
    received: HashMap<Vec<u8>, Received>,
    /// The first bytes of `global/pg_control`: the system identifier.
    control_prefix: Vec<u8>,
}

impl Verifier {
    fn event(&mut self, e: &TarEvent) -> Result<()> {
        match e {
            TarEvent::File { path, .. } => {
                let mut full = self.prefix.clone();
                full.extend_from_slice(path);
                self.current = Some((full, FileChecksum::new(self.algorithm), 0));
            }
            TarEvent::Data(d) => {
                if let Some((path, sum, size)) = self.current.as_mut() {
                    if path == b"global/pg_control" && self.control_prefix.len() < 8 {
                        let take = (8 - self.control_prefix.len()).min(d.len());
                        self.control_prefix.extend_from_slice(&d[..take]);
                    }
                    sum.update(d);
                    *size += d.len() as u64;
                }
            }
            TarEvent::FileEnd => {
                if let Some((path, sum, size)) = self.current.take() {
                    let r = Received {
                        size,
                        checksum: sum.finish(),
                    };
                    if self.received.insert(path.clone(), r).is_some() {
                        return Err(Error::unsafe_entry(
                            display(&path),
                            "the same file arrived twice",
                        ));
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// Reads one archive's data messages as a byte stream, for the pull-based decoders; stops
/// (EOF) at the first message that is not data and leaves it in `pending`, or at the end
/// of the channel (then `closed` is set: the stream ended before `End`). Every chunk it
/// starts reading is also appended to `raw` (a cheap `Bytes` clone), so the loop can hand
/// the compressed bytes to the sink.
struct ChannelReader<'a> {
    rx: &'a mut Receiver<Msg>,
    pending: &'a mut Option<Msg>,
    current: Bytes,
    queued: std::vec::IntoIter<Bytes>,
    raw: &'a RefCell<Vec<Bytes>>,
    closed: &'a std::cell::Cell<bool>,
}

impl Read for ChannelReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            if let Some(next) = self.queued.next() {
                if !next.is_empty() {
                    self.raw.borrow_mut().push(next.clone());
                }
                self.current = next;
                continue;
            }
            if self.pending.is_some() {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Msg::Data(batch)) => self.queued = batch.into_iter(),
                Some(other) => {
                    *self.pending = Some(other);
                    return Ok(0);
                }
                None => {
                    self.closed.set(true);
                    return Ok(0);
                }
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        let _ = self.current.split_to(n);
        Ok(n)
    }
}

/// Concatenated LZ4 frames, read as one stream: lz4_flex's decoder ends each read at
/// the end of a frame; the next frame is read when more input follows. (pgrepo stores
/// client-compressed archives as a series of frames.)
struct Lz4Frames<R: std::io::BufRead>(lz4_flex::frame::FrameDecoder<R>);

impl<R: std::io::BufRead> Read for Lz4Frames<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let n = self.0.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            // Each pass either ends here or consumes a frame header (or fails).
            if self.0.get_mut().fill_buf()?.is_empty() {
                return Ok(0);
            }
        }
    }
}

/// One uncompressed chunk: to the sink as bytes, then parsed, verified and to the sink as
/// entries.
#[inline]
fn feed(
    chunk: Bytes,
    tar: &mut TarParser,
    sink: &mut dyn BackupSink,
    verifier: &mut Verifier,
) -> Result<()> {
    sink.archive_bytes(&chunk)?;
    tar.push(chunk, &mut |e| {
        verifier.event(&e)?;
        sink.entry(&e)
    })
}

/// Runs the writer until `End` (commit) or failure (abort, told why). When the channel
/// closes before `End`, the reason is `stopped`'s (the network side's error, or
/// cancellation).
pub(crate) fn run(
    rx: Receiver<Msg>,
    sink: &mut dyn BackupSink,
    algorithm: ChecksumAlgorithm,
    manifest_expected: bool,
    stopped: &StopReason,
) -> Result<Outcome> {
    let result = run_inner(rx, sink, algorithm, manifest_expected, stopped);
    if let Err(reason) = &result {
        sink.abort(reason);
    }
    result
}

fn run_inner(
    mut rx: Receiver<Msg>,
    sink: &mut dyn BackupSink,
    algorithm: ChecksumAlgorithm,
    manifest_expected: bool,
    stopped: &StopReason,
) -> Result<Outcome> {
    let mut verifier = Verifier {
        algorithm,
        prefix: Vec::new(),
        current: None,
        received: HashMap::new(),
        control_prefix: Vec::new(),
    };
    let mut manifest: Vec<u8> = Vec::new();
    let mut pending: Option<Msg> = None;
    loop {
        let msg = match pending.take() {
            Some(m) => m,
            None => match rx.blocking_recv() {
                Some(m) => m,
                None => return Err(stopped.take()),
            },
        };
        match msg {
            Msg::Begin(info) => sink.begin_backup(&info)?,
            Msg::Archive(info) => {
                sink.begin_archive(&info)?;
                verifier.prefix = match info.tablespace.oid {
                    Some(oid) => format!("pg_tblspc/{oid}/").into_bytes(),
                    None => Vec::new(),
                };
                let mut tar = TarParser::new(info.is_base());
                let name = info.name.clone();
                match info.compression {
                    None => loop {
                        match rx.blocking_recv() {
                            Some(Msg::Data(batch)) => {
                                for chunk in batch {
                                    feed(chunk, &mut tar, sink, &mut verifier)?;
                                }
                            }
                            Some(other) => {
                                pending = Some(other);
                                break;
                            }
                            None => return Err(stopped.take()),
                        }
                    },
                    Some(method) => {
                        // The compressed chunks the decoder has pulled in, not yet given
                        // to the sink.
                        let raw = RefCell::new(Vec::new());
                        let closed = std::cell::Cell::new(false);
                        let mut reader = ChannelReader {
                            rx: &mut rx,
                            pending: &mut pending,
                            current: Bytes::new(),
                            queued: Vec::new().into_iter(),
                            raw: &raw,
                            closed: &closed,
                        };
                        let mut decoder: Box<dyn Read + '_> = match method {
                            CompressionMethod::Gzip => {
                                Box::new(flate2::read::MultiGzDecoder::new(&mut reader))
                            }
                            CompressionMethod::Lz4 => {
                                Box::new(Lz4Frames(lz4_flex::frame::FrameDecoder::new(
                                    std::io::BufReader::new(&mut reader),
                                )))
                            }
                            CompressionMethod::Zstd => Box::new(
                                zstd::stream::read::Decoder::new(&mut reader).map_err(|e| {
                                    Error::protocol(format!("starting zstd decompression: {e}"))
                                })?,
                            ),
                        };
                        loop {
                            let mut buf = vec![0u8; DECOMPRESS_CHUNK];
                            let n = match decoder.read(&mut buf) {
                                Ok(n) => n,
                                // Cut off, not damaged: the stream stopped before its end.
                                Err(_) if closed.get() => return Err(stopped.take()),
                                Err(e) => {
                                    return Err(Error::protocol(format!(
                                        "decompressing archive {name}: {e}"
                                    )))
                                }
                            };
                            // Whatever was decoded came from chunks already pulled in, so
                            // the sink gets those first.
                            for chunk in raw.borrow_mut().drain(..) {
                                sink.compressed_bytes(&chunk)?;
                            }
                            if n == 0 {
                                break;
                            }
                            buf.truncate(n);
                            feed(Bytes::from(buf), &mut tar, sink, &mut verifier)?;
                        }
                        drop(decoder);
                        if closed.get() {
                            return Err(stopped.take());
                        }
                        // The gzip and zstd decoders read to the end of the data; the lz4
                        // one stops at the end of a frame, possibly mid-chunk. Bytes left
                        // there were given to the sink as compressed bytes but never
                        // decoded, so they are refused like any later data.
                        let leftover = !reader.current.is_empty()
                            || reader.queued.as_slice().iter().any(|b| !b.is_empty());
                        drop(reader);
                        if leftover {
                            return Err(Error::protocol(format!(
                                "archive {name} has data after the end of its compressed stream"
                            )));
                        }
                        while pending.is_none() {
                            match rx.blocking_recv() {
                                Some(Msg::Data(batch)) if batch.iter().all(Bytes::is_empty) => {}
                                Some(Msg::Data(_)) => {
                                    return Err(Error::protocol(format!(
                                        "archive {name} has data after the end of its compressed stream"
                                    )))
                                }
                                Some(other) => pending = Some(other),
                                None => return Err(stopped.take()),
                            }
                        }
                    }
                }
                tar.finish()
                    .map_err(|e| e.context(format!("archive {name}")))?;
                sink.end_archive(tar.trailer_seen())?;
            }
            Msg::Data(_) => return Err(Error::protocol("archive data before any archive started")),
            Msg::Manifest(b) => manifest.extend_from_slice(&b),
            Msg::End => {
                let parsed = if manifest_expected {
                    if manifest.is_empty() {
                        return Err(Error::verify(
                            "backup_manifest",
                            "the server sent no manifest",
                        ));
                    }
                    let m = Manifest::parse(&manifest)?;
                    check_files(&m, &verifier.received)?;
                    if let (Some(id), Ok(raw)) = (
                        m.system_identifier,
                        <[u8; 8]>::try_from(verifier.control_prefix.as_slice()),
                    ) {
                        // pg_control starts with the native-endian system identifier.
                        let found = u64::from_le_bytes(raw);
                        if found != id {
                            return Err(Error::verify(
                                "global/pg_control",
                                format!("manifest system identifier is {id}, but control file has {found}"),
                            ));
                        }
                    }
                    Some(m)
                } else {
                    None
                };
                sink.commit(manifest_expected.then_some(&manifest[..]))?;
                return Ok(Outcome {
                    manifest: parsed,
                    files: verifier.received.len(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::{PlainDirSink, Tablespace};
    use crate::ErrorKind;
    use pgwire_repl::{Lsn, TimelineId};

    fn header(name: &str, typeflag: u8, size: usize, link: &str) -> Vec<u8> {
        let mut h = ::tar::Header::new_ustar();
        h.as_mut_bytes()[..name.len()].copy_from_slice(name.as_bytes());
        h.set_size(size as u64);
        h.set_mode(0o600);
        h.set_entry_type(::tar::EntryType::new(typeflag));
        h.as_mut_bytes()[157..157 + link.len()].copy_from_slice(link.as_bytes());
        h.set_cksum();
        h.as_bytes().to_vec()
    }

    fn run_with(archive: Vec<u8>, target: &std::path::Path) -> Result<Outcome> {
        run_with_options(archive, target, crate::SinkOptions::default())
    }

    fn run_with_options(
        archive: Vec<u8>,
        target: &std::path::Path,
        options: crate::SinkOptions,
    ) -> Result<Outcome> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let base = Tablespace {
            oid: None,
            location: None,
            size_estimate: None,
        };
        let info = BackupInfo {
            server_major: 14,
            start_lsn: Lsn(1),
            timeline: TimelineId(1),
            tablespaces: vec![base.clone()],
        };
        for m in [
            Msg::Begin(info),
            Msg::Archive(ArchiveInfo {
                name: "base.tar".into(),
                tablespace: base,
                compression: None,
            }),
            Msg::Data(vec![Bytes::from(archive)]),
            Msg::End,
        ] {
            tx.try_send(m).unwrap();
        }
        drop(tx);
        let mut sink = PlainDirSink::new(target).options(options);
        run(
            rx,
            &mut sink,
            ChecksumAlgorithm::Crc32c,
            false,
            &StopReason::default(),
        )
    }

    #[test]
    fn hostile_stream_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("t");
        let mut archive = header("PG_VERSION", b'0', 3, "");
        archive.extend(b"15\n");
        archive.resize(1024, 0);
        archive.extend(header("pg_tblspc/1/", b'2', 0, "/etc"));
        let e = run_with(archive, &target).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsafe, "{e}");
        assert_eq!(e.path(), Some("pg_tblspc/1"));
        assert!(!target.exists());
        // With keep_on_failure the partial backup stays for inspection, without a manifest.
        let mut archive = header("PG_VERSION", b'0', 3, "");
        archive.extend(b"15\n");
        archive.resize(1024, 0);
        archive.extend(header("/etc/passwd", b'0', 0, ""));
        let options = crate::SinkOptions {
            keep_on_failure: true,
            ..Default::default()
        };
        let e = run_with_options(archive, &target, options).unwrap_err();
        assert_eq!(e.path(), Some("/etc/passwd"));
        assert!(target.join("PG_VERSION").exists() && !target.join("backup_manifest").exists());
    }

    /// A tar stream as a 15+ server sends it (with the trailer unless `trailer` is false):
    /// a directory and a 600 kB file, enough for several decoder reads.
    fn server_tar(trailer: bool) -> Vec<u8> {
        // Random letters from a 16-letter alphabet: compressible, but not to nothing.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let data: Vec<u8> = (0..600_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b'a' + (x % 16) as u8
            })
            .collect();
        let mut archive = header("global/", b'5', 0, "");
        archive.extend(header("global/big", b'0', data.len(), ""));
        archive.extend(&data);
        archive.resize(archive.len().next_multiple_of(512), 0);
        archive.extend(header("PG_VERSION", b'0', 3, ""));
        archive.extend(b"15\n");
        archive.resize(archive.len().next_multiple_of(512), 0);
        if trailer {
            archive.resize(archive.len() + 1024, 0);
        }
        archive
    }

    /// Compresses as a server would, with the content checksums the formats offer.
    fn compress(method: CompressionMethod, data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        match method {
            CompressionMethod::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            CompressionMethod::Lz4 => {
                let info = lz4_flex::frame::FrameInfo::new().content_checksum(true);
                let mut e = lz4_flex::frame::FrameEncoder::with_frame_info(info, Vec::new());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            CompressionMethod::Zstd => {
                let mut e = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
                e.include_checksum(true).unwrap();
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
        }
    }

    const METHODS: [CompressionMethod; 3] = [
        CompressionMethod::Gzip,
        CompressionMethod::Lz4,
        CompressionMethod::Zstd,
    ];

    /// Sends a base archive and a tablespace archive, both `compressed` by `method`, in
    /// batches of odd-sized chunks (with empty ones), as a 15+ server would.
    fn run_compressed(
        method: CompressionMethod,
        compressed: &[u8],
        sink: &mut dyn BackupSink,
    ) -> Result<Outcome> {
        let (tx, rx) = tokio::sync::mpsc::channel(4096);
        let base = Tablespace {
            oid: None,
            location: None,
            size_estimate: None,
        };
        let ts = Tablespace {
            oid: Some(16385),
            location: Some("/srv/ts".into()),
            size_estimate: None,
        };
        tx.try_send(Msg::Begin(BackupInfo {
            server_major: 15,
            start_lsn: Lsn(1),
            timeline: TimelineId(1),
            tablespaces: vec![ts.clone(), base.clone()],
        }))
        .unwrap();
        // Hostile names: the sink must not use them as paths.
        for (tablespace, name) in [(ts, "../16385.tar"), (base, "/tmp/base.tar")] {
            tx.try_send(Msg::Archive(ArchiveInfo {
                name: format!("{name}{}", method.suffix()),
                tablespace,
                compression: Some(method),
            }))
            .unwrap();
            let mut chunks: Vec<Bytes> = compressed
                .chunks(7001)
                .map(Bytes::copy_from_slice)
                .collect();
            chunks.insert(1, Bytes::new());
            for batch in chunks.chunks(3) {
                tx.try_send(Msg::Data(batch.to_vec())).unwrap();
            }
        }
        tx.try_send(Msg::End).unwrap();
        drop(tx);
        run(
            rx,
            sink,
            ChecksumAlgorithm::Crc32c,
            false,
            &StopReason::default(),
        )
    }

    #[test]
    fn server_compressed_archives_are_stored_as_sent() {
        let tar = server_tar(true);
        for method in METHODS {
            let dir = tempfile::tempdir().unwrap();
            let target = dir.path().join("t");
            let compressed = compress(method, &tar);
            assert!(
                compressed.len() > 3 * 7001,
                "{method:?}: {}",
                compressed.len()
            );
            let mut sink = crate::TarSink::new(&target);
            let outcome = run_compressed(method, &compressed, &mut sink).unwrap();
            // Verified on the decompressed stream: PG_VERSION and global/big, twice.
            assert_eq!(outcome.files, 4, "{method:?}");
            let mut names: Vec<String> = std::fs::read_dir(&target)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            let suffix = method.suffix();
            assert_eq!(
                names,
                [format!("16385.tar{suffix}"), format!("base.tar{suffix}")],
                "{method:?}"
            );
            for name in names {
                assert!(
                    std::fs::read(target.join(&name)).unwrap() == compressed,
                    "{method:?}: {name} is not the compressed stream as sent"
                );
            }
            assert!(!dir.path().join("16385.tar").exists() && !dir.path().join("tmp").exists());

            // With client-side zstd, the decompressed stream is recompressed.
            let target = dir.path().join("z");
            let mut sink = crate::TarSink::new(&target).zstd(Some(1));
            run_compressed(method, &compressed, &mut sink).unwrap();
            for name in ["base.tar.zst", "16385.tar.zst"] {
                let raw = std::fs::read(target.join(name)).unwrap();
                assert!(
                    zstd::stream::decode_all(&raw[..]).unwrap() == tar,
                    "{method:?}: {name}"
                );
            }
        }
    }

    /// Records the order of the calls.
    #[derive(Default)]
    struct Recorder {
        compressed: Vec<u8>,
        /// At each `archive_bytes`: compressed bytes delivered, uncompressed bytes so far.
        points: Vec<(usize, usize)>,
        uncompressed: usize,
    }

    impl BackupSink for Recorder {
        fn begin_backup(&mut self, _: &BackupInfo) -> Result<()> {
            Ok(())
        }
        fn begin_archive(&mut self, _: &ArchiveInfo) -> Result<()> {
            self.compressed.clear();
            self.points.clear();
            self.uncompressed = 0;
            Ok(())
        }
        fn compressed_bytes(&mut self, data: &Bytes) -> Result<()> {
            assert!(!data.is_empty());
            self.compressed.extend_from_slice(data);
            Ok(())
        }
        fn archive_bytes(&mut self, data: &Bytes) -> Result<()> {
            self.uncompressed += data.len();
            self.points.push((self.compressed.len(), self.uncompressed));
            Ok(())
        }
        fn end_archive(&mut self, trailer_present: bool) -> Result<()> {
            assert!(trailer_present);
            Ok(())
        }
        fn commit(&mut self, _: Option<&[u8]>) -> Result<()> {
            Ok(())
        }
        fn abort(&mut self, _: &Error) {}
    }

    /// How much a fresh decoder produces from the first bytes of a compressed stream.
    fn decodable(method: CompressionMethod, prefix: &[u8]) -> usize {
        let mut decoder: Box<dyn Read + '_> = match method {
            CompressionMethod::Gzip => Box::new(flate2::read::MultiGzDecoder::new(prefix)),
            CompressionMethod::Lz4 => Box::new(lz4_flex::frame::FrameDecoder::new(prefix)),
            CompressionMethod::Zstd => Box::new(zstd::stream::read::Decoder::new(prefix).unwrap()),
        };
        let (mut buf, mut total) = (vec![0u8; 65536], 0);
        while let Ok(n @ 1..) = decoder.read(&mut buf) {
            total += n;
        }
        total
    }

    #[test]
    fn compressed_bytes_come_first_and_in_order() {
        let tar = server_tar(true);
        for method in METHODS {
            let compressed = compress(method, &tar);
            let mut sink = Recorder::default();
            run_compressed(method, &compressed, &mut sink).unwrap();
            // Checked on the last archive.
            assert!(sink.compressed == compressed, "{method:?}");
            assert_eq!(sink.uncompressed, tar.len(), "{method:?}");
            assert!(sink.points.len() > 1, "{method:?}");
            for &(delivered, uncompressed) in &sink.points {
                assert!(
                    uncompressed <= decodable(method, &compressed[..delivered]),
                    "{method:?}: {uncompressed} bytes passed on after only {delivered} compressed"
                );
            }
        }
    }

    #[test]
    fn concatenated_frames_are_one_stream() {
        let tar = server_tar(true);
        let cut = 512;
        for method in METHODS {
            let mut compressed = compress(method, &tar[..cut]);
            compressed.extend(compress(method, &[]));
            compressed.extend(compress(method, &tar[cut..]));
            let mut sink = Recorder::default();
            run_compressed(method, &compressed, &mut sink).unwrap();
            assert_eq!(sink.uncompressed, tar.len(), "{method:?}");
        }
    }

    #[test]
    fn damaged_compressed_stream_fails_and_leaves_nothing() {
        let tar = server_tar(true);
        for method in METHODS {
            let compressed = compress(method, &tar);
            let mut flipped = compressed.clone();
            flipped[compressed.len() / 2] ^= 0x40;
            let truncated = compressed[..compressed.len() / 2].to_vec();
            // Trailing bytes would be stored without having been verified.
            let mut trailing = compressed.clone();
            trailing.extend_from_slice(&[0x5a; 100]);
            for (what, bad) in [
                ("flipped", flipped),
                ("truncated", truncated),
                ("trailing", trailing),
            ] {
                let dir = tempfile::tempdir().unwrap();
                let target = dir.path().join("t");
                let mut sink = crate::TarSink::new(&target);
                let e = run_compressed(method, &bad, &mut sink).unwrap_err();
                eprintln!("{method:?} {what}: {e}");
                assert_eq!(e.kind(), ErrorKind::Protocol, "{method:?} {what}: {e}");
                assert!(!target.exists(), "{method:?} {what}: left {target:?}");
            }
        }
    }

    #[test]
    fn compressed_archive_without_trailer_is_refused() {
        let tar = server_tar(false);
        for method in METHODS {
            let dir = tempfile::tempdir().unwrap();
            let target = dir.path().join("t");
            let mut sink = crate::TarSink::new(&target);
            let e = run_compressed(method, &compress(method, &tar), &mut sink).unwrap_err();
            assert!(e.to_string().contains("no end-of-archive blocks"), "{e}");
            assert!(!target.exists());
            // Without server compression (13/14) the sink adds the trailer itself.
        }
    }

    #[test]
    fn good_stream_is_extracted() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("t");
        let mut archive = header("global/", b'5', 0, "");
        archive.extend(header("global/PG_VERSION", b'0', 3, ""));
        archive.extend(b"15\n");
        archive.resize(1536, 0);
        let outcome = run_with(archive, &target).unwrap();
        assert_eq!(outcome.files, 1);
        assert_eq!(
            std::fs::read(target.join("global/PG_VERSION")).unwrap(),
            b"15\n"
        );
    }
}
