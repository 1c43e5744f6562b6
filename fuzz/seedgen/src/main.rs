//! Captures fuzz seeds from a real PostgreSQL (a throwaway testkit cluster, version from
//! `PGREPL_TEST_PG`, default 15) and writes them to `fuzz/seeds/<target>/`.
//!
//! ```text
//! cargo run --manifest-path fuzz/seedgen/Cargo.toml --target-dir target -- fuzz/seeds
//! ```
//!
//! What it records, through a loopback relay that tees both directions:
//! - backend_messages: the server's bytes of a SQL session (rows, an error, a notice)
//!   and of a SCRAM-authenticated replication session (IDENTIFY_SYSTEM, SHOW,
//!   START_REPLICATION), cut to 64 KiB;
//! - replication_messages: CopyData payloads of START_REPLICATION (`w` cut short, `k`)
//!   and the client's `r`;
//! - scram_server_messages: the server-first and server-final SCRAM messages;
//! - tar_stream: the 15+ `n`/`p` sub-messages, the start of base.tar and one whole
//!   small entry sequence;
//! - manifest: the real backup_manifest;
//! - wal_verifier: the first 64 KiB (and 8 KiB) of segment 000000010000000000000001;
//! - copyboth_stream: the server's side of START_REPLICATION from CopyBothResponse on,
//!   and a scripted end of timeline;
//! - backup_response: the server's whole answer to BASE_BACKUP (15+ framing, data cut
//!   short), and the same answer re-framed as 13/14 send it;
//! - conninfo: testkit's own connection strings and URI forms of them.
//!
//! Every seed of a target that takes a leading selector byte gets one.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use pgwire_repl::proto::backend::{decode, AuthRequest, BackendMessage, DecodeLimits};
use pgwire_repl::{Config, ReplicationClient, SqlClient};
use testkit::{Cluster, ClusterOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use walstream::{StreamEvent, StreamOptions, WalStream};

/// Both directions of one relayed connection.
#[derive(Default)]
struct Capture {
    from_server: Vec<u8>,
    from_client: Vec<u8>,
}

/// A one-connection relay to `port` that records both directions; returns its port.
async fn relay(port: u16) -> (u16, Arc<Mutex<Capture>>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_port = listener.local_addr().unwrap().port();
    let capture = Arc::new(Mutex::new(Capture::default()));
    let shared = capture.clone();
    let task = tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let server = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        let up_capture = shared.clone();
        let up = async move {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = cr.read(&mut buf).await {
                if n == 0 || sw.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                up_capture
                    .lock()
                    .unwrap()
                    .from_client
                    .extend_from_slice(&buf[..n]);
            }
            let _ = sw.shutdown().await;
        };
        let down = async move {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = sr.read(&mut buf).await {
                if n == 0 || cw.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                shared
                    .lock()
                    .unwrap()
                    .from_server
                    .extend_from_slice(&buf[..n]);
            }
            let _ = cw.shutdown().await;
        };
        tokio::join!(up, down);
    });
    (relay_port, capture, task)
}

/// The backend messages in `bytes` (after the first message if it is the `N`/`S` answer
/// to an SSLRequest: there is none here, the relay is plain TCP with sslmode=disable).
fn messages(bytes: &[u8]) -> Vec<BackendMessage> {
    let mut buf = BytesMut::from(bytes);
    let limits = DecodeLimits::default();
    let mut out = Vec::new();
    while let Ok(Some(m)) = decode(&mut buf, &limits) {
        out.push(m);
    }
    out
}

/// The CopyData payloads of the frontend messages in `bytes` (skipping the startup
/// packet, which has no type byte).
fn client_copy_data(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    if bytes.len() < 4 {
        return out;
    }
    let startup = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
    let mut rest = &bytes[startup.min(bytes.len())..];
    while rest.len() >= 5 {
        let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
        if rest.len() < len + 1 {
            break;
        }
        if rest[0] == b'd' {
            out.push(rest[5..len + 1].to_vec());
        }
        rest = &rest[len + 1..];
    }
    out
}

struct Seeds {
    root: PathBuf,
    total: usize,
}

impl Seeds {
    fn put(&mut self, target: &str, name: &str, bytes: &[u8]) {
        let dir = self.root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
        self.total += bytes.len();
        println!("{target}/{name}: {} bytes", bytes.len());
    }

    /// With a leading selector/split byte.
    fn put_split(&mut self, target: &str, name: &str, split: u8, bytes: &[u8]) {
        let mut seed = vec![split];
        seed.extend_from_slice(bytes);
        self.put(target, name, &seed);
    }
}

fn config(port: u16, user: &str, password: Option<&str>) -> Config {
    let mut text =
        format!("host=127.0.0.1 port={port} user={user} dbname=postgres sslmode=disable");
    if let Some(p) = password {
        text.push_str(&format!(" password={p}"));
    }
    Config::parse(&text).unwrap()
}

#[tokio::main]
async fn main() {
    let out = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("fuzz/seeds"));
    let mut seeds = Seeds {
        root: out.clone(),
        total: 0,
    };
    let cluster = Cluster::start(
        ClusterOptions::new()
            .hba("host all scram 127.0.0.1/32 scram-sha-256")
            .hba("host replication scram 127.0.0.1/32 scram-sha-256"),
    );
    println!(
        "PostgreSQL {} on port {}",
        cluster.version(),
        cluster.port()
    );

    // The WAL first, before checkpoints recycle the first segment.
    let segment = cluster.data_dir().join("pg_wal/000000010000000000000001");
    let wal =
        std::fs::read(&segment).unwrap_or_else(|e| panic!("reading {}: {e}", segment.display()));
    seeds.put_split("wal_verifier", "segment1_64k", 0, &wal[..64 * 1024]);
    seeds.put_split("wal_verifier", "segment1_8k", 61, &wal[..8 * 1024]);

    cluster
        .execute("SET password_encryption = 'scram-sha-256'; CREATE ROLE scram LOGIN REPLICATION PASSWORD 'pencil'")
        .await;

    // A SQL session: rows, NULLs, an error, a notice.
    let (port, capture, task) = relay(cluster.port()).await;
    let mut sql = SqlClient::connect(&config(port, "postgres", None))
        .await
        .unwrap();
    sql.query("SELECT 1 AS one, 'two' AS two, NULL AS three, now() AS four")
        .await
        .unwrap();
    let _ = sql.query("SELECT 1/0").await;
    let _ = sql
        .batch("DO $$BEGIN RAISE NOTICE 'a notice from the fuzz seed capture'; END$$")
        .await;
    sql.close().await.unwrap();
    task.await.unwrap();
    let bytes = std::mem::take(&mut capture.lock().unwrap().from_server);
    seeds.put_split("backend_messages", "sql_session", 37, &bytes);

    // Some WAL to stream.
    cluster
        .execute("CREATE TABLE seed (i int, t text); INSERT INTO seed SELECT i, repeat('x', i % 50) FROM generate_series(1, 2000) i")
        .await;

    // A SCRAM replication session with START_REPLICATION.
    let (port, capture, task) = relay(cluster.port()).await;
    let mut repl = ReplicationClient::connect(&config(port, "scram", Some("pencil")))
        .await
        .unwrap();
    let id = repl.identify_system().await.unwrap();
    let segment_size = repl.wal_segment_size().await.unwrap();
    let start = id.xlog_pos.segment_start(segment_size);
    let mut stream = WalStream::start(
        repl,
        StreamOptions::new(start).status_interval(Some(Duration::from_millis(100))),
    )
    .await
    .unwrap();
    let mut got = 0usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while got < 3 && tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(500), stream.next_event()).await {
            Ok(Ok(Some(StreamEvent::XLogData(_)))) => got += 1,
            Ok(Ok(Some(_))) | Err(_) => {}
            Ok(other) => panic!("streaming: {other:?}"),
        }
    }
    stream.send_status(true).await.unwrap();
    let _ = tokio::time::timeout(Duration::from_millis(300), stream.next_event()).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.stop()).await;
    stream.into_connection().close().await.unwrap();
    task.await.unwrap();
    let capture = std::mem::take(&mut *capture.lock().unwrap());
    let server = &capture.from_server;
    seeds.put_split(
        "backend_messages",
        "replication_session",
        200,
        &server[..server.len().min(64 * 1024)],
    );
    // The CopyBoth part of the session: the real CopyBothResponse and keepalive, and
    // the first 8 KiB of the real WAL (which starts at 0/1000000, a fresh cluster's
    // first segment, where the target starts) re-cut into 2 KiB XLogData messages so
    // that they fit the target's frame limit; then the server's shutdown (`COPY 0`).
    if let Some(at) = frame_offset(server, b'W') {
        let real = copyboth_seed(&server[at..]);
        seeds.put_split("copyboth_stream", "real_stream", 0, &real);
        seeds.put_split("copyboth_stream", "real_stream_stop_at_3", 3, &real);
    }
    seeds.put_split("copyboth_stream", "end_of_timeline", 0, &end_of_timeline());
    let mut scram_first = None;
    let mut scram_final = None;
    let (mut w, mut k) = (0, 0);
    for m in messages(server) {
        match m {
            BackendMessage::Authentication(AuthRequest::SaslContinue(b)) => scram_first = Some(b),
            BackendMessage::Authentication(AuthRequest::SaslFinal(b)) => scram_final = Some(b),
            BackendMessage::CopyData(payload) => match payload.first() {
                Some(b'w') if w < 2 => {
                    let cut = payload.len().min(25 + 512 * (w + 1));
                    seeds.put(
                        "replication_messages",
                        &format!("xlogdata{w}"),
                        &payload[..cut],
                    );
                    w += 1;
                }
                Some(b'k') if k < 1 => {
                    seeds.put("replication_messages", "keepalive", &payload);
                    k += 1;
                }
                _ => {}
            },
            _ => {}
        }
    }
    if let Some(r) = client_copy_data(&capture.from_client)
        .into_iter()
        .find(|p| p.first() == Some(&b'r'))
    {
        seeds.put("replication_messages", "status_update", &r);
    }
    let (first, last) = (
        scram_first.expect("server-first"),
        scram_final.expect("server-final"),
    );
    for selector in [0u8, 2, 5] {
        let mut seed = first.to_vec();
        seed.push(0xFF);
        seed.extend_from_slice(&last);
        seeds.put_split(
            "scram_server_messages",
            &format!("exchange{selector}"),
            selector,
            &seed,
        );
    }
    let mut malformed = first.to_vec();
    malformed.truncate(malformed.len() / 2);
    seeds.put_split("scram_server_messages", "server_first_cut", 0, &malformed);

    // BASE_BACKUP (15+ sub-messages through the relay; the archive from a TarSink).
    let work = tempfile::tempdir().unwrap();
    let (port, capture, task) = relay(cluster.port()).await;
    let client = ReplicationClient::connect(&config(port, "postgres", None))
        .await
        .unwrap();
    let backup = basebackup::BaseBackup::start(client, basebackup::BackupOptions::default())
        .await
        .unwrap();
    let tar_dir = work.path().join("tar");
    backup
        .receive(
            Box::new(
                basebackup::TarSink::new(&tar_dir).options(basebackup::SinkOptions {
                    no_sync: true,
                    ..Default::default()
                }),
            ),
            None,
        )
        .await
        .unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    let server = std::mem::take(&mut capture.lock().unwrap().from_server);
    let mut n = 0;
    let mut p = 0;
    for m in messages(&server) {
        if let BackendMessage::CopyData(payload) = m {
            match payload.first() {
                Some(b'n') if n < 2 => {
                    seeds.put_split("tar_stream", &format!("new_archive{n}"), 3, &payload);
                    n += 1;
                }
                Some(b'p') if p < 1 => {
                    seeds.put_split("tar_stream", "progress", 3, &payload);
                    p += 1;
                }
                _ => {}
            }
        }
    }
    let (v15, v14) = backup_response_seeds(&messages(&server));
    // The selector byte: bits 0-2 the version (13 + n), bit 3 no manifest, bits 4-5
    // the server compression (none).
    seeds.put_split("backup_response", "real_v15", 2, &v15);
    seeds.put_split("backup_response", "reframed_v14", 1, &v14);
    let base_tar = std::fs::read(tar_dir.join("base.tar")).unwrap();
    seeds.put_split("tar_stream", "base_tar_16k", 90, &base_tar[..16 * 1024]);
    seeds.put_split(
        "tar_stream",
        "base_tar_tail_4k",
        17,
        &base_tar[base_tar.len() - 4096..],
    );
    let manifest = std::fs::read(tar_dir.join("backup_manifest")).unwrap();
    seeds.put("manifest", "backup_manifest", &manifest);
    // A small valid manifest: the real header, two files, the real tail.
    if let Some(small) = small_manifest(&manifest) {
        seeds.put("manifest", "backup_manifest_small", &small);
    }

    // Connection strings.
    let conninfos = [
        cluster.tcp_conninfo("postgres"),
        cluster.unix_conninfo("replicator"),
        format!(
            "postgresql://scram:pencil@127.0.0.1:{}/postgres?sslmode=disable&replication=true&application_name=seed",
            cluster.port()
        ),
        format!(
            "postgres://[::1]:{},127.0.0.1:{}/db?target_session_attrs=read-write&connect_timeout=5",
            cluster.port(),
            cluster.port()
        ),
        format!(
            "host=/tmp,127.0.0.1 port={},{} user='o\\'brien' password='p a s s' sslmode=verify-full sslrootcert=/etc/ssl/ca.crt channel_binding=require",
            cluster.port(),
            cluster.port()
        ),
    ];
    for (i, c) in conninfos.iter().enumerate() {
        seeds.put("conninfo", &format!("conninfo{i}"), c.as_bytes());
    }
    println!("{} bytes of seeds in {}", seeds.total, out.display());
    assert!(seeds.total < 2 << 20, "seeds must stay under 2 MiB");
    drop(cluster);
}

/// The real manifest cut down to its first two files, with its checksum recomputed by
/// the same rule (SHA-256 up to the penultimate newline) — done here without a hash
/// crate: the seed stays valid JSON, and its checksum mismatch is just one more path.
fn small_manifest(manifest: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(manifest).ok()?;
    let files_start = text.find("\"Files\": [\n")? + "\"Files\": [\n".len();
    let wal = text.find("],\n\"WAL-Ranges\"")?;
    let lines: Vec<&str> = text[files_start..wal].lines().take(2).collect();
    let mut files = lines.join("\n");
    if files.ends_with(',') {
        files.pop();
    }
    Some(format!("{}{}\n{}", &text[..files_start], files, &text[wal..]).into_bytes())
}

/// The offset of the first backend message with type `tag` (after the startup
/// exchange, which the server side does not frame differently).
fn frame_offset(bytes: &[u8], tag: u8) -> Option<usize> {
    let mut at = 0;
    while at + 5 <= bytes.len() {
        if bytes[at] == tag {
            return Some(at);
        }
        let len = u32::from_be_bytes(bytes[at + 1..at + 5].try_into().ok()?) as usize;
        at += 1 + len;
    }
    None
}

/// A historic timeline's end as the server sends it (§2.7): CopyBothResponse, one
/// XLogData, CopyDone, then (after the client's CopyDone) the next-timeline result set,
/// `C "START_STREAMING"`, `C "START_REPLICATION"`, `Z`.
fn end_of_timeline() -> Vec<u8> {
    use pgwire_repl::proto::backend::{CopyResponse, FieldDescription};
    use pgwire_repl::proto::replication::{ReplicationMessage, XLogData};
    let column = |name: &str, type_oid| FieldDescription {
        name: name.into(),
        table_oid: 0,
        column_id: 0,
        type_oid,
        type_size: -1,
        type_modifier: -1,
        format: 0,
    };
    let mut xlog = BytesMut::new();
    ReplicationMessage::XLogData(XLogData {
        wal_start: pgwire_repl::Lsn(0x100_0000),
        wal_end: pgwire_repl::Lsn(0x100_0040),
        send_time: 1,
        data: bytes::Bytes::from_static(&[0x10; 64]),
    })
    .encode(&mut xlog);
    let mut out = BytesMut::new();
    for m in [
        BackendMessage::CopyBothResponse(CopyResponse {
            format: 0,
            column_formats: vec![],
        }),
        BackendMessage::CopyData(xlog.freeze()),
        BackendMessage::CopyDone,
        BackendMessage::RowDescription(vec![
            column("next_tli", 20),
            column("next_tli_startpos", 25),
        ]),
        BackendMessage::DataRow(vec![
            Some(bytes::Bytes::from_static(b"2")),
            Some(bytes::Bytes::from_static(b"0/1000040")),
        ]),
        BackendMessage::CommandComplete {
            tag: "START_STREAMING".into(),
        },
        BackendMessage::CommandComplete {
            tag: "START_REPLICATION".into(),
        },
        BackendMessage::ReadyForQuery { status: b'I' },
    ] {
        m.encode(&mut out);
    }
    out.to_vec()
}

/// See the caller: `W`, real WAL re-cut into 2 KiB XLogData, a keepalive, `C "COPY 0"`.
fn copyboth_seed(from_w: &[u8]) -> Vec<u8> {
    use pgwire_repl::proto::replication::{ReplicationMessage, XLogData};
    let mut out = BytesMut::new();
    let mut keepalive = None;
    let mut wal = None;
    for m in messages(from_w) {
        match m {
            BackendMessage::CopyBothResponse(_) => m.encode(&mut out),
            BackendMessage::CopyData(p) if p.first() == Some(&b'k') && keepalive.is_none() => {
                keepalive = Some(p)
            }
            BackendMessage::CopyData(p) if p.first() == Some(&b'w') && wal.is_none() => {
                if let Ok(ReplicationMessage::XLogData(x)) = ReplicationMessage::parse(p) {
                    wal = Some(x);
                }
            }
            _ => {}
        }
    }
    if let Some(x) = wal {
        let data = x.data.slice(..x.data.len().min(8192));
        for (i, chunk) in data.chunks(2048).enumerate() {
            let mut payload = BytesMut::new();
            ReplicationMessage::XLogData(XLogData {
                wal_start: pgwire_repl::Lsn(x.wal_start.0 + (i * 2048) as u64),
                wal_end: x.wal_end,
                send_time: x.send_time,
                data: bytes::Bytes::copy_from_slice(chunk),
            })
            .encode(&mut payload);
            BackendMessage::CopyData(payload.freeze()).encode(&mut out);
        }
    }
    if let Some(k) = keepalive {
        BackendMessage::CopyData(k).encode(&mut out);
    }
    BackendMessage::CommandComplete {
        tag: "COPY 0".into(),
    }
    .encode(&mut out);
    out.to_vec()
}

/// The server's answer to BASE_BACKUP, from the start position's RowDescription on, with
/// at most three data messages of 200 bytes per archive and for the manifest: as sent
/// (15+ framing), and re-framed as 13/14 send it (a CopyOut per archive and one for the
/// manifest, no sub-message bytes, no progress messages).
fn backup_response_seeds(all: &[BackendMessage]) -> (Vec<u8>, Vec<u8>) {
    let start = all
        .iter()
        .position(|m| matches!(m, BackendMessage::RowDescription(_)))
        .expect("the start position");
    let copy_out = || {
        BackendMessage::CopyOutResponse(pgwire_repl::proto::backend::CopyResponse {
            format: 0,
            column_formats: vec![],
        })
    };
    let (mut v15, mut v14) = (BytesMut::new(), BytesMut::new());
    let (mut data_kept, mut in_part) = (0, false);
    for m in &all[start..] {
        match m {
            BackendMessage::CopyOutResponse(_) => m.encode(&mut v15),
            BackendMessage::CopyData(p) => match p.first() {
                Some(b'd') => {
                    if data_kept < 3 {
                        data_kept += 1;
                        let cut = p.slice(..p.len().min(201));
                        BackendMessage::CopyData(cut.clone()).encode(&mut v15);
                        BackendMessage::CopyData(cut.slice(1..)).encode(&mut v14);
                    }
                }
                Some(b'n') | Some(b'm') => {
                    m.encode(&mut v15);
                    if in_part {
                        BackendMessage::CopyDone.encode(&mut v14);
                    }
                    copy_out().encode(&mut v14);
                    (data_kept, in_part) = (0, true);
                }
                _ => m.encode(&mut v15),
            },
            BackendMessage::CopyDone => {
                m.encode(&mut v15);
                m.encode(&mut v14);
                in_part = false;
            }
            other => {
                other.encode(&mut v15);
                other.encode(&mut v14);
            }
        }
    }
    (v15.to_vec(), v14.to_vec())
}
