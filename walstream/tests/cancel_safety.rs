//! Cancel safety of `WalStream::next_event` and `EventStream`, and the `StopHandle`,
//! against a scripted fake walsender: reads cancelled in the middle of a message,
//! sends cancelled in the middle of a status update, a stop from another task.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use pgwire_repl::proto::backend::{BackendMessage, CopyResponse};
use pgwire_repl::proto::replication::{ReplicationMessage, StandbyStatusUpdate};
use pgwire_repl::{Config, ConnectOptions, ReplicationClient};
use testkit::fake::{Action, FakeServer, FrontendMessage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use walstream::{Lsn, StreamEvent, StreamOptions, WalStream, XLogData};

fn copy_both() -> Action {
    Action::Send(BackendMessage::CopyBothResponse(CopyResponse {
        format: 0,
        column_formats: vec![],
    }))
}

/// An XLogData frame of `len` bytes all equal to `fill`, as raw bytes.
fn xlog_frame(start: u64, len: usize, fill: u8) -> Bytes {
    let mut payload = BytesMut::new();
    ReplicationMessage::XLogData(XLogData {
        wal_start: Lsn(start),
        wal_end: Lsn(start + len as u64),
        send_time: 0,
        data: Bytes::from(vec![fill; len]),
    })
    .encode(&mut payload);
    let mut frame = BytesMut::new();
    BackendMessage::CopyData(payload.freeze()).encode(&mut frame);
    frame.freeze()
}

/// The server's side of stopping: CopyDone and the two command tags, then idle.
fn end_of_copy() -> Vec<Action> {
    vec![
        Action::Expect(b'c'),
        Action::Send(BackendMessage::CopyDone),
        Action::Send(BackendMessage::CommandComplete {
            tag: "START_STREAMING".into(),
        }),
        Action::Send(BackendMessage::CommandComplete {
            tag: "START_REPLICATION".into(),
        }),
        Action::Send(BackendMessage::ReadyForQuery { status: b'I' }),
        Action::Expect(b'X'),
    ]
}

fn status_updates(messages: &[FrontendMessage]) -> Vec<StandbyStatusUpdate> {
    messages
        .iter()
        .filter(|m| m.tag == b'd' && m.body.first() == Some(&b'r'))
        .map(|m| StandbyStatusUpdate::parse(&m.body).unwrap())
        .collect()
}

const CHUNKS: u64 = 6;
const CHUNK: usize = 3000;
const START: u64 = 0x1000000;

#[tokio::test]
async fn reads_cancelled_mid_message_lose_nothing() {
    // Each XLogData arrives in two halves 40 ms apart, and the reader gives up every
    // 10 ms: most calls are cancelled with half a message buffered.
    let mut script = vec![Action::handshake("16.4"), Action::Expect(b'Q'), copy_both()];
    for i in 0..CHUNKS {
        let frame = xlog_frame(START + i * CHUNK as u64, CHUNK, i as u8 + 1);
        let half = frame.len() / 2;
        script.push(Action::SendRaw(frame.slice(..half)));
        script.push(Action::Sleep(Duration::from_millis(40)));
        script.push(Action::SendRaw(frame.slice(half..)));
        script.push(Action::Sleep(Duration::from_millis(40)));
    }
    script.extend(end_of_copy());
    let server = FakeServer::start(vec![script]).await;
    let config = Config::parse(&server.conninfo()).unwrap();
    let client = ReplicationClient::connect(&config).await.unwrap();
    let mut stream = WalStream::start(client, StreamOptions::new(Lsn(START)).status_interval(None))
        .await
        .unwrap();

    let mut received = Vec::new();
    let mut cancelled = 0;
    while received.len() < CHUNKS as usize {
        match tokio::time::timeout(Duration::from_millis(10), stream.next_event()).await {
            Err(_) => cancelled += 1,
            Ok(Ok(Some(StreamEvent::XLogData(x)))) => received.push(x),
            Ok(other) => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        cancelled >= CHUNKS as usize,
        "only {cancelled} reads were cancelled"
    );
    for (i, x) in received.iter().enumerate() {
        assert_eq!(x.wal_start, Lsn(START + i as u64 * CHUNK as u64));
        assert_eq!(x.data.len(), CHUNK);
        assert!(
            x.data.iter().all(|&b| b == i as u8 + 1),
            "chunk {i} damaged"
        );
    }
    assert_eq!(stream.stop().await.unwrap(), None);
    stream.into_connection().close().await.unwrap();
    let sent = server.finish().await.remove(0);
    assert!(sent.iter().all(|m| m.tag != b'f'), "CopyFail was sent");
}

/// A stream to `port` whose client-to-server direction trickles `step` bytes at a time
/// with a pause after each, so that writes of a few dozen bytes take several polls.
async fn slow_uplink(port: u16, step: usize, pause: Duration) -> tokio::io::DuplexStream {
    let (ours, theirs) = tokio::io::duplex(step);
    let socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (mut from_client, mut to_client) = tokio::io::split(theirs);
    let (mut from_server, mut to_server) = socket.into_split();
    tokio::spawn(async move {
        let mut buf = vec![0u8; step];
        loop {
            let n = match from_client.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if to_server.write_all(&buf[..n]).await.is_err() {
                break;
            }
            tokio::time::sleep(pause).await;
        }
    });
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
    });
    ours
}

#[tokio::test]
async fn sends_cancelled_mid_message_are_finished_in_order() {
    // Status updates every 20 ms through an uplink that moves 8 bytes per 5 ms (a
    // 39-byte update takes about 25 ms), while every read is cancelled after 7 ms: most
    // status updates are cut off in the middle, and must still reach the server whole.
    let mut script = vec![Action::handshake("16.4"), Action::Expect(b'Q'), copy_both()];
    for i in 0..CHUNKS {
        script.push(Action::SendRaw(xlog_frame(START + i * 16, 16, i as u8 + 1)));
        script.push(Action::Sleep(Duration::from_millis(60)));
    }
    script.extend(end_of_copy());
    let server = FakeServer::start(vec![script]).await;
    let config = Config::parse(&server.conninfo()).unwrap();
    let uplink = slow_uplink(server.port(), 8, Duration::from_millis(5)).await;
    let client = ReplicationClient::connect_over(uplink, &config, &ConnectOptions::default())
        .await
        .unwrap();
    let mut stream = WalStream::start(
        client,
        StreamOptions::new(Lsn(START)).status_interval(Some(Duration::from_millis(20))),
    )
    .await
    .unwrap();

    let mut received = 0u64;
    let mut cancelled = 0;
    while received < CHUNKS {
        match tokio::time::timeout(Duration::from_millis(7), stream.next_event()).await {
            Err(_) => cancelled += 1,
            Ok(Ok(Some(StreamEvent::XLogData(x)))) => {
                assert_eq!(x.wal_start, Lsn(START + received * 16));
                received += 1;
                stream.feedback().set_write(Lsn(START + received * 16));
            }
            Ok(other) => panic!("unexpected {other:?}"),
        }
    }
    assert!(cancelled > 10, "only {cancelled} calls were cancelled");
    assert_eq!(stream.stop().await.unwrap(), None);
    stream.into_connection().close().await.unwrap();

    // The server parsed every message we sent as a whole frame: nothing cut, nothing
    // doubled, CopyDone after the updates, never CopyFail.
    let sent = server.finish().await.remove(0);
    assert!(sent.iter().all(|m| m.tag != b'f'), "CopyFail was sent");
    assert!(
        sent.iter()
            .all(|m| matches!(m.tag, 0 | b'Q' | b'd' | b'c' | b'X')),
        "{:?}",
        sent.iter().map(|m| m.tag).collect::<Vec<_>>()
    );
    let updates = status_updates(&sent);
    assert!(updates.len() >= 3, "{} status updates", updates.len());
    let writes: Vec<Lsn> = updates.iter().map(|u| u.write).collect();
    assert!(
        writes.windows(2).all(|w| w[0] <= w[1]),
        "positions went backwards: {writes:?}"
    );
    assert_eq!(writes.last(), Some(&Lsn(START + CHUNKS * 16)));
}

#[tokio::test]
async fn a_stop_handle_ends_a_waiting_stream_cleanly() {
    // The server sends one chunk and then nothing: only the stop ends the wait.
    let mut script = vec![
        Action::handshake("16.4"),
        Action::Expect(b'Q'),
        copy_both(),
        Action::SendRaw(xlog_frame(START, 64, 7)),
    ];
    script.extend(end_of_copy());
    let server = FakeServer::start(vec![script.clone(), script]).await;
    let config = Config::parse(&server.conninfo()).unwrap();

    // WalStream::next_event, stopped from another task while it waits.
    let client = ReplicationClient::connect(&config).await.unwrap();
    let mut stream = WalStream::start(client, StreamOptions::new(Lsn(START)).status_interval(None))
        .await
        .unwrap();
    let stop = stream.stop_handle();
    assert!(matches!(
        stream.next_event().await.unwrap(),
        Some(StreamEvent::XLogData(_))
    ));
    stream.feedback().set_write(Lsn(START + 64));
    stream.feedback().set_flush(Lsn(START + 64));
    let stopper = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        stop.stop();
        stop
    });
    let waited = Instant::now();
    assert_eq!(stream.next_event().await.unwrap(), None);
    assert!(waited.elapsed() >= Duration::from_millis(150));
    assert!(waited.elapsed() < Duration::from_secs(5));
    assert!(stopper.await.unwrap().is_stop_requested());
    // Over for good.
    assert_eq!(stream.next_event().await.unwrap(), None);
    stream.into_connection().close().await.unwrap();

    // The same for the futures::Stream form.
    let client = ReplicationClient::connect(&config).await.unwrap();
    let stream = WalStream::start(client, StreamOptions::new(Lsn(START)).status_interval(None))
        .await
        .unwrap();
    let stop = stream.stop_handle();
    let mut events = stream.into_stream();
    assert!(matches!(
        events.next().await,
        Some(Ok(StreamEvent::XLogData(_)))
    ));
    // A `next()` dropped by a select loses nothing and the stop still lands.
    tokio::select! {
        _ = events.next() => panic!("the server is silent"),
        () = tokio::time::sleep(Duration::from_millis(50)) => {}
    }
    stop.stop();
    assert!(events.next().await.is_none());
    assert!(events.next().await.is_none());
    let stream = events.into_inner().expect("an ended stream is given back");
    stream.into_connection().close().await.unwrap();

    let sessions = server.finish().await;
    for sent in &sessions {
        assert!(sent.iter().all(|m| m.tag != b'f'), "CopyFail was sent");
        assert_eq!(sent.iter().filter(|m| m.tag == b'c').count(), 1);
    }
    // The first stream's final status update reported what the caller had made durable.
    let last = status_updates(&sessions[0])
        .pop()
        .expect("no final status update");
    assert_eq!(last.flush, Lsn(START + 64));
    assert!(
        !status_updates(&sessions[1]).is_empty(),
        "no final status update"
    );
}
