//! The writer thread: decompression, tar parsing, checksums and the sink.
//!
//! The async side sends [`Msg`]s through a bounded channel; this side blocks on disk
//! writes without stalling the network, and the channel bound caps memory.

use std::collections::HashMap;
use std::io::Read;

use bytes::Bytes;
use tokio::sync::mpsc::Receiver;

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
/// (EOF) at the first message that is not data and leaves it in `pending`.
struct ChannelReader<'a> {
    rx: &'a mut Receiver<Msg>,
    pending: &'a mut Option<Msg>,
    current: Bytes,
    queued: std::vec::IntoIter<Bytes>,
}

impl Read for ChannelReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            if let Some(next) = self.queued.next() {
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
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        let _ = self.current.split_to(n);
        Ok(n)
    }
}

/// Runs the writer until `End` (commit) or failure (abort).
pub(crate) fn run(
    rx: Receiver<Msg>,
    sink: &mut dyn BackupSink,
    algorithm: ChecksumAlgorithm,
    manifest_expected: bool,
) -> Result<Outcome> {
    let result = run_inner(rx, sink, algorithm, manifest_expected);
    if result.is_err() {
        sink.abort();
    }
    result
}

fn run_inner(
    mut rx: Receiver<Msg>,
    sink: &mut dyn BackupSink,
    algorithm: ChecksumAlgorithm,
    manifest_expected: bool,
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
                None => return Err(Error::protocol("the backup stream ended early")),
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
                let mut feed = |chunk: Bytes, tar: &mut TarParser| -> Result<()> {
                    sink.archive_bytes(&chunk)?;
                    tar.push(chunk, &mut |e| {
                        verifier.event(&e)?;
                        sink.entry(&e)
                    })
                };
                match info.compression {
                    None => loop {
                        match rx.blocking_recv() {
                            Some(Msg::Data(batch)) => {
                                for chunk in batch {
                                    feed(chunk, &mut tar)?;
                                }
                            }
                            Some(other) => {
                                pending = Some(other);
                                break;
                            }
                            None => return Err(Error::protocol("the backup stream ended early")),
                        }
                    },
                    Some(method) => {
                        let reader = ChannelReader {
                            rx: &mut rx,
                            pending: &mut pending,
                            current: Bytes::new(),
                            queued: Vec::new().into_iter(),
                        };
                        let mut decoder: Box<dyn Read + '_> = match method {
                            CompressionMethod::Gzip => {
                                Box::new(flate2::read::MultiGzDecoder::new(reader))
                            }
                            CompressionMethod::Lz4 => {
                                Box::new(lz4_flex::frame::FrameDecoder::new(reader))
                            }
                            CompressionMethod::Zstd => {
                                Box::new(zstd::stream::read::Decoder::new(reader).map_err(|e| {
                                    Error::protocol(format!("starting zstd decompression: {e}"))
                                })?)
                            }
                        };
                        loop {
                            let mut buf = vec![0u8; DECOMPRESS_CHUNK];
                            let n = decoder.read(&mut buf).map_err(|e| {
                                Error::protocol(format!("decompressing archive {name}: {e}"))
                            })?;
                            if n == 0 {
                                break;
                            }
                            buf.truncate(n);
                            feed(Bytes::from(buf), &mut tar)?;
                        }
                        drop(decoder);
                        while pending.is_none() {
                            match rx.blocking_recv() {
                                Some(Msg::Data(batch)) if batch.iter().all(Bytes::is_empty) => {}
                                Some(Msg::Data(_)) => {
                                    return Err(Error::protocol(format!(
                                        "archive {name} has data after the end of its compressed stream"
                                    )))
                                }
                                Some(other) => pending = Some(other),
                                None => return Err(Error::protocol("the backup stream ended early")),
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
        run(rx, &mut sink, ChecksumAlgorithm::Crc32c, false)
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
