#![allow(missing_docs)] // criterion_group! generates undocumented items
//! The archive byte path of a base backup, end to end in one process: a scripted server
//! on loopback sends a 128 MiB backup (32 KiB CopyData messages, as PostgreSQL's
//! `SINK_BUFFER_LENGTH` and `TAR_SEND_SIZE`), and `BaseBackup::receive` decodes the
//! frames, runs the response state machine, batches the data to the writer thread,
//! parses the tar stream and checksums every file (CRC32C) into a sink that only counts.
//! No disk is involved, so this is the CPU cost of the path; compare runs on the same
//! machine only.
//!
//! Each case is measured twice: `…_wall` is the elapsed time, `…_cpu` the CPU time the
//! whole process used for it (user + system, all threads: client, writer thread and the
//! scripted server), which other load on the machine disturbs much less.

use std::time::{Duration, Instant};

use basebackup::manifest::FileChecksum;
use basebackup::ChecksumAlgorithm;
use basebackup::{ArchiveInfo, BackupInfo, BackupOptions, BackupSink, BaseBackup};
use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pgwire_repl::proto::backend::{BackendMessage, CopyResponse, FieldDescription};
use pgwire_repl::{Config, ReplicationClient};
use sha2::Digest;
use testkit::fake::{Action, FakeServer};

const FILES: usize = 16;
const FILE_SIZE: usize = 8 << 20;
const COPY_CHUNK: usize = 32 * 1024;

/// Counts what it is given.
#[derive(Default)]
struct Count {
    bytes: u64,
}

impl BackupSink for Count {
    fn begin_backup(&mut self, _: &BackupInfo) -> basebackup::Result<()> {
        Ok(())
    }
    fn begin_archive(&mut self, _: &ArchiveInfo) -> basebackup::Result<()> {
        Ok(())
    }
    fn archive_bytes(&mut self, data: &Bytes) -> basebackup::Result<()> {
        self.bytes += data.len() as u64;
        Ok(())
    }
    fn end_archive(&mut self, _: bool) -> basebackup::Result<()> {
        Ok(())
    }
    fn commit(&mut self, _: Option<&[u8]>) -> basebackup::Result<()> {
        Ok(())
    }
    fn abort(&mut self, _: &basebackup::Error) {}
}

fn header(name: &str, size: usize) -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    h.set_path(name).unwrap();
    h.set_size(size as u64);
    h.set_mode(0o600);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    h.as_bytes().to_vec()
}

/// The tar stream (with its trailer) and the manifest that describes it.
fn backup_content() -> (Vec<u8>, Vec<u8>) {
    let mut tar = Vec::with_capacity(FILES * (FILE_SIZE + 512) + 4096);
    let mut listed = String::new();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..FILES {
        let data: Vec<u8> = (0..FILE_SIZE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let path = format!("base/5/{}", 16384 + i);
        tar.extend(header(&path, data.len()));
        tar.extend(&data);
        let mut sum = FileChecksum::new(ChecksumAlgorithm::Crc32c);
        sum.update(&data);
        if i > 0 {
            listed.push_str(",\n");
        }
        listed.push_str(&format!(
            "{{ \"Path\": \"{path}\", \"Size\": {}, \"Last-Modified\": \"2026-01-01 00:00:00 GMT\", \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"{}\" }}",
            data.len(),
            sum.finish().unwrap()
        ));
    }
    tar.extend([0u8; 1024]);
    let body = format!(
        "{{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [\n{listed} ],\n\"WAL-Ranges\": [\n{{ \"Timeline\": 1, \"Start-LSN\": \"0/2000028\", \"End-LSN\": \"0/2000100\" }}\n],\n"
    );
    let sum: String = sha2::Sha256::digest(body.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    (
        tar,
        format!("{body}\"Manifest-Checksum\": \"{sum}\"}}\n").into_bytes(),
    )
}

fn column(name: &str, type_oid: u32) -> FieldDescription {
    FieldDescription {
        name: name.into(),
        table_oid: 0,
        column_id: 0,
        type_oid,
        type_size: -1,
        type_modifier: -1,
        format: 0,
    }
}

fn position(wire: &mut BytesMut, lsn: &str) {
    BackendMessage::RowDescription(vec![column("recptr", 25), column("tli", 20)]).encode(wire);
    BackendMessage::DataRow(vec![
        Some(Bytes::copy_from_slice(lsn.as_bytes())),
        Some(Bytes::from_static(b"1")),
    ])
    .encode(wire);
    BackendMessage::CommandComplete {
        tag: "SELECT".into(),
    }
    .encode(wire);
}

/// Everything the server sends after the command, in the 15+ framing (`v15`) or the
/// 13/14 one.
fn response(v15: bool, tar: &[u8], manifest: &[u8]) -> Bytes {
    let mut wire = BytesMut::with_capacity(tar.len() + tar.len() / 1000 + manifest.len() + 4096);
    position(&mut wire, "0/2000028");
    BackendMessage::RowDescription(vec![
        column("spcoid", 26),
        column("spclocation", 25),
        column("size", 20),
    ])
    .encode(&mut wire);
    BackendMessage::DataRow(vec![None, None, Some(Bytes::from_static(b"131072"))])
        .encode(&mut wire);
    BackendMessage::CommandComplete {
        tag: "SELECT".into(),
    }
    .encode(&mut wire);
    let copy_out = BackendMessage::CopyOutResponse(CopyResponse {
        format: 0,
        column_formats: vec![],
    });
    let mut payload = Vec::with_capacity(COPY_CHUNK + 1);
    if v15 {
        copy_out.encode(&mut wire);
        BackendMessage::CopyData(Bytes::from_static(b"nbase.tar\0\0")).encode(&mut wire);
        for chunk in tar.chunks(COPY_CHUNK) {
            payload.clear();
            payload.push(b'd');
            payload.extend_from_slice(chunk);
            BackendMessage::CopyData(Bytes::copy_from_slice(&payload)).encode(&mut wire);
        }
        BackendMessage::CopyData(Bytes::from_static(b"m")).encode(&mut wire);
        for chunk in manifest.chunks(COPY_CHUNK) {
            payload.clear();
            payload.push(b'd');
            payload.extend_from_slice(chunk);
            BackendMessage::CopyData(Bytes::copy_from_slice(&payload)).encode(&mut wire);
        }
        BackendMessage::CopyDone.encode(&mut wire);
    } else {
        // 13/14 send no trailer.
        for data in [&tar[..tar.len() - 1024], manifest] {
            copy_out.encode(&mut wire);
            for chunk in data.chunks(COPY_CHUNK) {
                BackendMessage::CopyData(Bytes::copy_from_slice(chunk)).encode(&mut wire);
            }
            BackendMessage::CopyDone.encode(&mut wire);
        }
    }
    position(&mut wire, "0/2000100");
    BackendMessage::CommandComplete {
        tag: "BASE_BACKUP".into(),
    }
    .encode(&mut wire);
    BackendMessage::ReadyForQuery { status: b'I' }.encode(&mut wire);
    wire.freeze()
}

/// CPU time (user + system) of this process so far.
fn cpu_time() -> Duration {
    // SAFETY: getrusage writes into the zeroed struct we pass; no other preconditions.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// One backup against a fresh scripted server; returns the elapsed and CPU time from
/// `start` to the verified end.
async fn one_backup(version: &str, wire: Bytes) -> (Duration, Duration) {
    let server = FakeServer::start(vec![vec![
        Action::handshake(version),
        Action::Expect(b'Q'),
        Action::SendRaw(wire),
        Action::GoSilent,
    ]])
    .await;
    let config = Config::parse(&server.conninfo()).unwrap();
    let client = ReplicationClient::connect(&config).await.unwrap();
    let started = Instant::now();
    let cpu = cpu_time();
    let backup = BaseBackup::start(client, BackupOptions::default())
        .await
        .unwrap();
    let (result, sink) = backup.receive(Count::default(), None).await.unwrap();
    let elapsed = started.elapsed();
    let cpu = cpu_time() - cpu;
    assert_eq!(result.files, FILES);
    assert!(sink.bytes >= (FILES * (FILE_SIZE + 512)) as u64);
    let _ = server.outcomes().await;
    (elapsed, cpu)
}

fn bench_receive(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (tar, manifest) = backup_content();
    let mut group = c.benchmark_group("base_backup_receive");
    group.throughput(Throughput::Bytes(tar.len() as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    for (name, version, v15) in [
        ("v15_framing", "15.18", true),
        ("v14_framing", "14.13", false),
    ] {
        let wire = response(v15, &tar, &manifest);
        for cpu in [false, true] {
            let id = format!("{name}_{}", if cpu { "cpu" } else { "wall" });
            group.bench_function(id, |b| {
                b.iter_custom(|iterations| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iterations {
                        let (elapsed, used) = runtime.block_on(one_backup(version, wire.clone()));
                        total += if cpu { used } else { elapsed };
                    }
                    total
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_receive);
criterion_main!(benches);
