//! WalStream against a scripted fake walsender, for what a real server will not do on
//! demand: silence, a dropped connection, an error in the middle of the copy. Also
//! checks exactly what the client sends (status replies, CopyDone and never CopyFail).

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pgwire_repl::proto::backend::{BackendMessage, CopyResponse};
use pgwire_repl::proto::replication::{
    HotStandbyFeedback, PrimaryKeepalive, ReplicationMessage, StandbyStatusUpdate, XLogData,
};
use pgwire_repl::{Config, DbError, Lsn, ReplicationClient};
use testkit::fake::{Action, FakeServer, FrontendMessage};
use walstream::{ErrorKind, StreamEvent, StreamOptions, WalStream};

fn copy_both() -> Action {
    Action::Send(BackendMessage::CopyBothResponse(CopyResponse {
        format: 0,
        column_formats: vec![],
    }))
}

fn sub(message: ReplicationMessage) -> Action {
    let mut out = BytesMut::new();
    message.encode(&mut out);
    Action::Send(BackendMessage::CopyData(out.freeze()))
}

fn keepalive(reply: bool) -> Action {
    sub(ReplicationMessage::PrimaryKeepalive(PrimaryKeepalive {
        wal_end: Lsn(0x1000100),
        send_time: 0,
        reply_requested: reply,
    }))
}

fn xlog(start: u64, len: usize) -> Action {
    sub(ReplicationMessage::XLogData(XLogData {
        wal_start: Lsn(start),
        wal_end: Lsn(start + len as u64),
        send_time: 0,
        data: Bytes::from(vec![1u8; len]),
    }))
}

fn complete(tag: &str) -> Action {
    Action::Send(BackendMessage::CommandComplete { tag: tag.into() })
}

async fn start(server: &FakeServer, options: StreamOptions) -> WalStream {
    let config = Config::parse(&server.conninfo()).unwrap();
    let client = ReplicationClient::connect(&config).await.unwrap();
    WalStream::start(client, options).await.unwrap()
}

fn status_updates(messages: &[FrontendMessage]) -> Vec<StandbyStatusUpdate> {
    messages
        .iter()
        .filter(|m| m.tag == b'd' && m.body.first() == Some(&b'r'))
        .map(|m| StandbyStatusUpdate::parse(&m.body).unwrap())
        .collect()
}

#[tokio::test]
async fn answers_a_reply_request_with_the_callers_positions_and_stops_with_copy_done() {
    let server = FakeServer::start(vec![vec![
        Action::handshake("15.18"),
        Action::Expect(b'Q'),
        copy_both(),
        xlog(0x1000000, 64),
        keepalive(true),
        Action::Expect(b'd'),
        xlog(0x1000040, 16),
        Action::Expect(b'c'),
        xlog(0x1000050, 16), // queued before the server saw our CopyDone
        Action::Send(BackendMessage::CopyDone),
        complete("START_STREAMING"),
        complete("START_REPLICATION"),
        Action::Send(BackendMessage::ReadyForQuery { status: b'I' }),
        Action::Expect(b'X'),
    ]])
    .await;
    let mut stream = start(
        &server,
        StreamOptions::new(Lsn(0x1000000)).status_interval(None),
    )
    .await;
    let Some(StreamEvent::XLogData(x)) = stream.next_event().await.unwrap() else {
        panic!("expected WAL");
    };
    assert_eq!(x.data.len(), 64);
    let Some(StreamEvent::Keepalive(k)) = stream.next_event().await.unwrap() else {
        panic!("expected a keepalive");
    };
    assert!(k.reply_requested);
    // The caller makes its data durable, then the reply goes out on the next read.
    stream.feedback().set_write(Lsn(0x1000040));
    stream.feedback().set_flush(Lsn(0x1000040));
    let Some(StreamEvent::XLogData(x)) = stream.next_event().await.unwrap() else {
        panic!("expected WAL");
    };
    assert_eq!(x.wal_start, Lsn(0x1000040));
    assert_eq!(stream.stop().await.unwrap(), None);
    stream.into_connection().close().await.unwrap();

    let received = server.finish().await.remove(0);
    assert!(received.iter().all(|m| m.tag != b'f'), "CopyFail was sent");
    assert_eq!(received.iter().filter(|m| m.tag == b'c').count(), 1);
    let updates = status_updates(&received);
    assert_eq!(updates[0].write, Lsn(0x1000040));
    assert_eq!(updates[0].flush, Lsn(0x1000040));
    assert_eq!(updates[0].apply, Lsn::INVALID);
}

#[tokio::test]
async fn sends_periodic_status_while_the_server_is_quiet() {
    let server = FakeServer::start(vec![vec![
        Action::handshake("16.4"),
        Action::Expect(b'Q'),
        copy_both(),
        // Two updates, each a status message and hot-standby feedback.
        Action::Expect(b'd'),
        Action::Expect(b'd'),
        Action::Expect(b'd'),
        Action::Expect(b'd'),
        Action::Close,
    ]])
    .await;
    let mut stream = start(
        &server,
        StreamOptions::new(Lsn(0x1000000)).status_interval(Some(Duration::from_millis(100))),
    )
    .await;
    stream.feedback().set_write(Lsn(0x1000000));
    stream.set_hot_standby_feedback(Some(HotStandbyFeedback {
        client_time: 0,
        xmin: 1234,
        xmin_epoch: 0,
        catalog_xmin: 0,
        catalog_xmin_epoch: 0,
    }));
    let err = stream.next_event().await.unwrap_err();
    // The server hung up after two updates: a lost connection, worth retrying.
    assert_eq!(err.kind(), ErrorKind::Io, "{err}");
    assert!(err.connection_error().is_some(), "{err}");
    assert!(err.is_retryable());
    let received = server.finish().await.remove(0);
    assert!(status_updates(&received).len() >= 2);
    // Hot-standby feedback goes with each update: 'h', time, then xmin 1234.
    let feedback: Vec<&FrontendMessage> = received
        .iter()
        .filter(|m| m.tag == b'd' && m.body.first() == Some(&b'h'))
        .collect();
    assert!(!feedback.is_empty());
    assert_eq!(feedback[0].body.len(), 25);
    assert_eq!(&feedback[0].body[9..13], &1234u32.to_be_bytes());
}

#[tokio::test]
async fn silence_beyond_the_idle_timeout_is_a_timeout() {
    let server = FakeServer::start(vec![vec![
        Action::handshake("17.2"),
        Action::Expect(b'Q'),
        copy_both(),
        Action::GoSilent,
    ]])
    .await;
    let mut stream = start(
        &server,
        StreamOptions::new(Lsn(0x1000000))
            .status_interval(None)
            .idle_timeout(Some(Duration::from_millis(300))),
    )
    .await;
    let began = Instant::now();
    let err = stream.next_event().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(began.elapsed() >= Duration::from_millis(250));
    assert!(err.to_string().contains("sent nothing"), "{err}");
    drop(stream);
    let _ = server.outcomes().await;
}

#[tokio::test]
async fn a_silent_server_is_asked_for_a_reply_and_a_live_one_keeps_the_stream() {
    // An idle walsender sends nothing while the client reports on time; it answers a
    // status update that requests a reply with a keepalive. Three rounds of that, well
    // past the 300 ms bound, keep the stream up.
    let mut script = vec![Action::handshake("17.2"), Action::Expect(b'Q'), copy_both()];
    for _ in 0..3 {
        script.push(Action::Expect(b'd'));
        script.push(keepalive(false));
    }
    script.push(Action::GoSilent);
    let server = FakeServer::start(vec![script]).await;
    let mut stream = start(
        &server,
        StreamOptions::new(Lsn(0x1000000))
            .status_interval(None)
            .idle_timeout(Some(Duration::from_millis(300))),
    )
    .await;
    let began = Instant::now();
    for round in 0..3 {
        match stream.next_event().await {
            Ok(Some(StreamEvent::Keepalive(_))) => {}
            other => panic!(
                "round {round}: expected the keepalive that answers the request, got {other:?}"
            ),
        }
    }
    assert!(
        began.elapsed() >= Duration::from_millis(400),
        "{:?}",
        began.elapsed()
    );
    // Then the server stops answering: dead within the bound.
    let err = stream.next_event().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(
        err.to_string()
            .contains("did not answer a request for a reply"),
        "{err}"
    );
    drop(stream);
    let received = server.finish().await.remove(0);
    let updates = status_updates(&received);
    assert_eq!(
        updates.len(),
        3,
        "one probe per silence, each answered: {updates:?}"
    );
    assert!(
        updates.iter().all(|u| u.reply_requested),
        "every probe asks for a reply: {updates:?}"
    );
}

#[tokio::test]
async fn an_error_inside_the_copy_is_a_typed_server_error() {
    let server = FakeServer::start(vec![vec![
        Action::handshake("15.18"),
        Action::Expect(b'Q'),
        copy_both(),
        xlog(0x1000000, 8),
        Action::Send(BackendMessage::ErrorResponse(DbError {
            severity: "ERROR".into(),
            code: "58P01".into(),
            message: "requested WAL segment 000000010000000000000002 has already been removed"
                .into(),
            ..DbError::default()
        })),
        Action::Send(BackendMessage::ReadyForQuery { status: b'I' }),
        Action::GoSilent,
    ]])
    .await;
    let mut stream = start(&server, StreamOptions::new(Lsn(0x1000000))).await;
    assert!(matches!(
        stream.next_event().await.unwrap(),
        Some(StreamEvent::XLogData(_))
    ));
    let err = stream.next_event().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Server);
    assert_eq!(err.sqlstate(), Some("58P01"));
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("wal_keep_size"), "{err}");
    drop(stream);
    let _ = server.outcomes().await;
}

#[tokio::test]
async fn end_of_timeline_after_the_servers_copy_done() {
    let server = FakeServer::start(vec![vec![
        Action::handshake("15.18"),
        Action::Expect(b'Q'),
        copy_both(),
        xlog(0x9000000, 0x90),
        Action::Send(BackendMessage::CopyDone),
        Action::Expect(b'c'),
        Action::Send(BackendMessage::RowDescription(vec![])),
        Action::Close,
    ]])
    .await;
    let mut stream = start(&server, StreamOptions::new(Lsn(0x9000000))).await;
    assert!(matches!(
        stream.next_event().await.unwrap(),
        Some(StreamEvent::XLogData(_))
    ));
    // A RowDescription with no columns is not a next-timeline result.
    let err = stream.next_event().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Protocol, "{err}");
    let received = server.finish().await.remove(0);
    assert!(received.iter().any(|m| m.tag == b'c'));
}
