#![allow(missing_docs)] // criterion_group! generates undocumented items
//! Message decoding on the hot path: XLogData-sized CopyData frames (128 KiB of WAL,
//! as the walsender sends them) and small DataRow messages, against the hardware's
//! CRC32C rate over the same bytes as a yardstick.

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pgwire_repl::proto::backend::{decode, BackendMessage, DecodeLimits};
use pgwire_repl::proto::replication::{ReplicationMessage, XLogData};
use pgwire_repl::Lsn;

fn wire_of(messages: &[BackendMessage]) -> Bytes {
    let mut wire = BytesMut::new();
    for message in messages {
        message.encode(&mut wire);
    }
    wire.freeze()
}

fn xlogdata_stream(count: usize) -> Bytes {
    let wal = Bytes::from(vec![0xA5u8; 128 * 1024]);
    let messages: Vec<BackendMessage> = (0..count)
        .map(|i| {
            let mut payload = BytesMut::new();
            ReplicationMessage::XLogData(XLogData {
                wal_start: Lsn((i * wal.len()) as u64),
                wal_end: Lsn(u64::MAX),
                send_time: 0,
                data: wal.clone(),
            })
            .encode(&mut payload);
            BackendMessage::CopyData(payload.freeze())
        })
        .collect();
    wire_of(&messages)
}

fn data_row_stream(count: usize) -> Bytes {
    let row = BackendMessage::DataRow(vec![
        Some(Bytes::from_static(b"7712258631147479762")),
        Some(Bytes::from_static(b"1")),
        Some(Bytes::from_static(b"0/176A250")),
        None,
    ]);
    wire_of(&vec![row; count])
}

fn decode_all(wire: &Bytes, read_size: usize) -> usize {
    let limits = DecodeLimits::default();
    let mut buf = BytesMut::with_capacity(read_size * 2);
    let mut payload_bytes = 0;
    for chunk in wire.chunks(read_size) {
        buf.extend_from_slice(chunk);
        while let Ok(Some(message)) = decode(&mut buf, &limits) {
            if let BackendMessage::CopyData(payload) = message {
                if let Ok(ReplicationMessage::XLogData(x)) = ReplicationMessage::parse(payload) {
                    payload_bytes += x.data.len();
                }
            }
        }
    }
    payload_bytes
}

fn bench_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    let wal = xlogdata_stream(256); // 32 MiB of WAL
    group.throughput(Throughput::Bytes(wal.len() as u64));
    for read_size in [64 * 1024, 256 * 1024] {
        group.bench_with_input(
            BenchmarkId::new("xlogdata_128k", read_size),
            &read_size,
            |b, &size| b.iter(|| decode_all(&wal, size)),
        );
    }
    let rows = data_row_stream(100_000);
    group.throughput(Throughput::Bytes(rows.len() as u64));
    group.bench_function("data_rows", |b| b.iter(|| decode_all(&rows, 64 * 1024)));
    group.throughput(Throughput::Bytes(wal.len() as u64));
    group.bench_function("crc32c_same_bytes", |b| b.iter(|| crc32c::crc32c(&wal)));
    group.finish();
}

criterion_group!(benches, bench_decode);
criterion_main!(benches);
