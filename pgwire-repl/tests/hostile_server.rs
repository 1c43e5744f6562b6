//! A scripted fake server sends what a real one never would; the client must fail with
//! a typed, clear error, never panic, hang or allocate without bound.

use std::time::{Duration, Instant};

use bytes::Bytes;
use pgwire_repl::proto::backend::{AuthRequest, BackendMessage};
use pgwire_repl::{Config, DbError, ErrorKind, ReplicationClient, SqlClient};
use testkit::fake::{Action, FakeServer};

fn config(server: &FakeServer) -> Config {
    Config::parse(&format!(
        "{} password=secret connect_timeout=5",
        server.conninfo()
    ))
    .unwrap()
}

#[tokio::test]
async fn a_two_gigabyte_length_prefix_is_refused_without_allocating() {
    let server = FakeServer::start(vec![vec![
        Action::handshake("15.18"),
        Action::Expect(b'Q'),
        // A DataRow announcing 2 GiB, then nothing.
        Action::SendRaw(Bytes::from_static(&[b'D', 0x80, 0, 0, 0])),
        Action::GoSilent,
    ]])
    .await;
    let mut client = SqlClient::connect(&config(&server)).await.unwrap();
    let started = Instant::now();
    let err = client.query("SELECT 1").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Protocol, "{err}");
    assert!(err.to_string().contains("2147483648 bytes"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "must fail at once, not wait for 2 GiB"
    );
    drop(client);
    server.finish().await;
}

#[tokio::test]
async fn a_message_cut_short_is_an_io_error_naming_it() {
    let server = FakeServer::start(vec![vec![
        Action::handshake("16.4"),
        Action::Expect(b'Q'),
        Action::SendRaw(Bytes::from_static(&[b'T', 0, 0, 0, 40, 0, 1, b'a'])),
        Action::Close,
    ]])
    .await;
    let mut client = SqlClient::connect(&config(&server)).await.unwrap();
    let err = client.query("SELECT 1").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io, "{err}");
    assert!(
        err.to_string().contains("in the middle of a message"),
        "{err}"
    );
    server.finish().await;
}

#[tokio::test]
async fn a_silent_server_times_out() {
    let server = FakeServer::start(vec![vec![Action::handshake("17.2"), Action::GoSilent]]).await;
    let mut client = ReplicationClient::connect(&config(&server)).await.unwrap();
    let started = Instant::now();
    let err = client
        .connection()
        .read_message_timeout(Duration::from_millis(500))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(450) && elapsed < Duration::from_secs(2),
        "{elapsed:?}"
    );
    drop(client);
    server.finish().await;
}

#[tokio::test]
async fn a_silent_server_during_startup_fails_within_connect_timeout() {
    let server = FakeServer::start(vec![vec![Action::ReadStartup, Action::GoSilent]]).await;
    let mut config = config(&server);
    config.connect_timeout = Some(Duration::from_secs(2));
    let started = Instant::now();
    let err = SqlClient::connect(&config).await.err().unwrap();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));
    server.finish().await;
}

#[tokio::test]
async fn unsupported_authentication_methods_are_named() {
    for (request, name) in [
        (AuthRequest::Gss, "GSSAPI"),
        (AuthRequest::Sspi, "SSPI"),
        (AuthRequest::KerberosV5, "Kerberos"),
        (AuthRequest::Other { code: 99 }, "code 99"),
        (
            AuthRequest::Sasl {
                mechanisms: vec!["OAUTHBEARER".into()],
            },
            "OAUTHBEARER",
        ),
    ] {
        let server = FakeServer::start(vec![vec![
            Action::ReadStartup,
            Action::Send(BackendMessage::Authentication(request)),
            Action::GoSilent,
        ]])
        .await;
        let err = SqlClient::connect(&config(&server)).await.err().unwrap();
        assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
        assert!(err.to_string().contains(name), "expected {name} in: {err}");
        assert!(err.advice().is_some());
        server.finish().await;
    }
}

#[tokio::test]
async fn a_scram_nonce_that_does_not_extend_ours_is_refused() {
    let server = FakeServer::start(vec![vec![
        Action::ReadStartup,
        Action::Send(BackendMessage::Authentication(AuthRequest::Sasl {
            mechanisms: vec!["SCRAM-SHA-256".into()],
        })),
        Action::Expect(b'p'),
        Action::Send(BackendMessage::Authentication(AuthRequest::SaslContinue(
            Bytes::from_static(b"r=notyournonce,s=c2FsdHNhbHQ=,i=4096"),
        ))),
        Action::GoSilent,
    ]])
    .await;
    let err = SqlClient::connect(&config(&server)).await.err().unwrap();
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    assert!(err.to_string().contains("SCRAM"), "{err}");
    let received = server.finish().await;
    // The client's first SCRAM message leaves the user name empty and sends n,, (no TLS).
    let initial = &received[0][1];
    assert!(
        initial.body.windows(6).any(|w| w == b"n,,n=,"),
        "{:?}",
        initial.body
    );
}

#[tokio::test]
async fn server_error_mid_query_keeps_the_session_and_startup_quirks_are_accepted() {
    let db_error = DbError {
        severity: "ERROR".into(),
        code: "XX000".into(),
        message: "scripted failure".into(),
        ..DbError::default()
    };
    let server = FakeServer::start(vec![vec![
        Action::ReadStartup,
        // A server that does not know a requested minor version says so, then goes on.
        Action::Send(BackendMessage::NegotiateProtocolVersion {
            newest_minor: 0,
            unrecognized_options: vec![],
        }),
        Action::Send(BackendMessage::Authentication(
            AuthRequest::CleartextPassword,
        )),
        Action::Expect(b'p'),
        Action::Send(BackendMessage::Authentication(AuthRequest::Ok)),
        Action::Send(BackendMessage::ParameterStatus {
            name: "server_version".into(),
            value: "18devel".into(),
        }),
        Action::Send(BackendMessage::ReadyForQuery { status: b'I' }),
        Action::Expect(b'Q'),
        Action::Send(BackendMessage::ErrorResponse(db_error)),
        Action::Send(BackendMessage::ReadyForQuery { status: b'I' }),
        Action::Expect(b'Q'),
        Action::Send(BackendMessage::CommandComplete {
            tag: "SELECT 0".into(),
        }),
        Action::Send(BackendMessage::ReadyForQuery { status: b'I' }),
        Action::Expect(b'X'),
    ]])
    .await;
    let mut client = SqlClient::connect(&config(&server)).await.unwrap();
    assert_eq!(client.server_major(), 18);
    let err = client.query("SELECT broken").await.unwrap_err();
    assert_eq!(err.sqlstate(), Some("XX000"), "{err}");
    let ok = client.query("SELECT nothing").await.unwrap();
    assert_eq!(ok.tag, "SELECT 0");
    client.close().await.unwrap();
    let received = server.finish().await;
    assert_eq!(
        received[0][1].body.as_ref(),
        b"secret\0",
        "cleartext password message"
    );
}

#[tokio::test]
async fn unexpected_messages_during_startup_are_protocol_errors() {
    let server = FakeServer::start(vec![vec![
        Action::ReadStartup,
        Action::Send(BackendMessage::Authentication(AuthRequest::Ok)),
        Action::Send(BackendMessage::CopyDone),
        Action::GoSilent,
    ]])
    .await;
    let err = SqlClient::connect(&config(&server)).await.err().unwrap();
    assert_eq!(err.kind(), ErrorKind::Protocol, "{err}");
    assert!(err.to_string().contains("CopyDone"), "{err}");
    server.finish().await;
}
