//! A byte changed in transit (by a loopback TCP proxy between the server and the
//! receiver) is refused: the verification error names the record, and the bad bytes
//! never reach the segment file.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;
use pgwire_repl::{Config, Lsn, WalSegmentSize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use walstream::decode::WalVerifyErrorKind;
use walstream::{receive_wal, ErrorKind, ReceiveOptions};

/// Forwards connections to `server_port`, flipping the WAL byte at `target` (once)
/// in the server's XLogData messages.
async fn start_proxy(server_port: u16, target: Lsn) -> (u16, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let flipped = Arc::new(AtomicBool::new(false));
    let flag = flipped.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = TcpStream::connect(("127.0.0.1", server_port))
                .await
                .unwrap();
            let flag = flag.clone();
            tokio::spawn(async move {
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                    let _ = server_write.shutdown().await;
                });
                let mut buf = Vec::new();
                let mut chunk = vec![0u8; 64 * 1024];
                loop {
                    let n = match server_read.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    // Forward whole messages, changing the target byte on the way.
                    let mut at = 0;
                    while buf.len() - at >= 5 {
                        let len =
                            u32::from_be_bytes(buf[at + 1..at + 5].try_into().unwrap()) as usize;
                        if buf.len() - at < 1 + len {
                            break;
                        }
                        let body = &mut buf[at + 5..at + 1 + len];
                        if buf_is_xlogdata(body) {
                            let start = u64::from_be_bytes(body[1..9].try_into().unwrap());
                            let data_len = body.len() as u64 - 25;
                            if (start..start + data_len).contains(&target.0)
                                && !flag.swap(true, Ordering::SeqCst)
                            {
                                body[25 + (target.0 - start) as usize] ^= 0x5A;
                            }
                        }
                        at += 1 + len;
                    }
                    if client_write.write_all(&buf[..at]).await.is_err() {
                        break;
                    }
                    buf.drain(..at);
                }
                let _ = client_write.shutdown().await;
            });
        }
    });
    (port, flipped)
}

fn buf_is_xlogdata(body: &[u8]) -> bool {
    body.len() > 25 && body[0] == b'w'
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_changed_in_transit_is_refused_naming_the_record() {
    let primary = start_primary();
    primary
        .execute("CREATE TABLE victim (payload text); CHECKPOINT;")
        .await;
    switch_wal(&primary).await;
    // The record: a ~2 kB row of incompressible text, well inside one page.
    let mut record = lsn(&primary, "SELECT pg_current_wal_insert_lsn()").await;
    while record.page_offset(8192) > 8192 - 2500 {
        primary
            .execute("INSERT INTO victim VALUES ('filler')")
            .await;
        record = lsn(&primary, "SELECT pg_current_wal_insert_lsn()").await;
    }
    primary
        .execute(
            "INSERT INTO victim SELECT string_agg(md5(g::text), '') FROM generate_series(1, 60) g",
        )
        .await;
    let end = lsn(&primary, "SELECT pg_current_wal_flush_lsn()").await;
    assert_eq!(
        record.segment_number(WalSegmentSize::DEFAULT),
        end.segment_number(WalSegmentSize::DEFAULT)
    );
    let target = Lsn(record.0 + 100);
    let (proxy_port, flipped) = start_proxy(primary.port(), target).await;

    let config = Config::parse(&format!(
        "host=127.0.0.1 port={proxy_port} user=postgres sslmode=disable"
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wal = dir.path().join("wal");
    let mut options = ReceiveOptions::new(&wal);
    options.endpos = Some(end);
    let err = receive_wal(&config, &options, std::future::pending())
        .await
        .unwrap_err();
    eprintln!("receive_wal refused the WAL: {err}");
    assert!(
        flipped.load(Ordering::SeqCst),
        "the proxy never saw the target byte"
    );
    assert_eq!(err.kind(), ErrorKind::Verify, "{err}");
    let bad = err.lsn().unwrap();
    assert!(
        bad >= record && bad <= target,
        "the error names {bad}, not the record at {record}: {err}"
    );
    assert!(
        matches!(
            err.verify_error().map(|v| &v.kind),
            Some(WalVerifyErrorKind::RecordCrcMismatch { .. })
        ),
        "{err}"
    );
    assert!(err.to_string().contains(&bad.to_string()), "{err}");
    // Refused before it landed: the segment is still partial and the changed byte is
    // not in it.
    let name = segment_name(1, record);
    assert!(!wal.join(&name).exists());
    // (When the first message held the bad byte, nothing was written at all.)
    if let Ok(ours) = std::fs::read(wal.join(format!("{name}.partial"))) {
        let server = std::fs::read(primary.data_dir().join("pg_wal").join(&name)).unwrap();
        let offset = target.segment_offset(WalSegmentSize::DEFAULT) as usize;
        assert_ne!(ours[offset], server[offset] ^ 0x5A);
    }
}
