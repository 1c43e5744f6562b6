//! A scripted fake PostgreSQL server, for what a real server will not do: hostile input,
//! faults, and errors at chosen points.
//!
//! Each accepted connection runs one script of [`Action`]s over loopback TCP; everything
//! the client sends is recorded and returned by [`FakeServer::finish`].
//!
//! ```no_run
//! # async fn demo() {
//! use testkit::fake::{Action, FakeServer};
//! use pgwire_repl::proto::backend::BackendMessage;
//! let server = FakeServer::start(vec![vec![
//!     Action::handshake("15.18"),
//!     Action::Expect(b'Q'),
//!     Action::Send(BackendMessage::CopyDone),
//!     Action::Close,
//! ]]).await;
//! let conninfo = server.conninfo();
//! # }
//! ```

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use pgwire_repl::proto::backend::{AuthRequest, BackendMessage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// One step of a connection's script.
#[derive(Debug, Clone)]
pub enum Action {
    /// Read the startup packet (answering an SSLRequest with `N`), then send the given
    /// authentication request, the ParameterStatus messages, BackendKeyData and
    /// ReadyForQuery. `auth` of `None` sends AuthenticationOk only.
    Handshake {
        /// `server_version` to report.
        server_version: String,
        /// Authentication exchange to run before AuthenticationOk, if any.
        auth: Option<AuthRequest>,
    },
    /// Read the startup packet only (answering an SSLRequest with `N`).
    ReadStartup,
    /// Send a message.
    Send(BackendMessage),
    /// Send raw bytes (for malformed frames and partial messages).
    SendRaw(Bytes),
    /// Read client messages until one with this type byte arrives.
    Expect(u8),
    /// Wait.
    Sleep(Duration),
    /// Send nothing more, but keep the connection open until the client closes it.
    GoSilent,
    /// Close the connection now.
    Close,
}

impl Action {
    /// A trust-authenticated handshake reporting `server_version`.
    pub fn handshake(server_version: &str) -> Action {
        Action::Handshake {
            server_version: server_version.to_string(),
            auth: None,
        }
    }
}

/// A message the client sent. The startup packet has `tag == 0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontendMessage {
    /// The type byte (`Q`, `d`, `c`, `X`, `p`, …), or 0 for the startup packet.
    pub tag: u8,
    /// The body without type byte and length.
    pub body: Bytes,
}

impl FrontendMessage {
    /// The text of a Query message.
    pub fn query_text(&self) -> Option<&str> {
        if self.tag != b'Q' {
            return None;
        }
        let text = self.body.strip_suffix(&[0]).unwrap_or(&self.body);
        std::str::from_utf8(text).ok()
    }
}

/// A running fake server. Accepts one connection per script, in order.
pub struct FakeServer {
    port: u16,
    task: JoinHandle<Vec<Result<Vec<FrontendMessage>, String>>>,
}

impl FakeServer {
    /// Starts listening on 127.0.0.1 and runs `scripts`, one per accepted connection.
    pub async fn start(scripts: Vec<Vec<Action>>) -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("testkit: cannot bind a loopback port for the fake server");
        let port = listener.local_addr().expect("local address").port();
        let task = tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for script in scripts {
                let (socket, _) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        outcomes.push(Err(format!("accept failed: {e}")));
                        break;
                    }
                };
                outcomes.push(run_script(socket, script).await);
            }
            outcomes
        });
        FakeServer { port, task }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection string for it (`sslmode=disable`, user `fake`).
    pub fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=fake sslmode=disable",
            self.port
        )
    }

    /// Waits for every script to finish and returns what each connection received.
    /// Panics if a script failed (for example the client closed before an `Expect`).
    pub async fn finish(self) -> Vec<Vec<FrontendMessage>> {
        let outcomes = self.task.await.expect("fake server task panicked");
        outcomes
            .into_iter()
            .map(|outcome| outcome.unwrap_or_else(|e| panic!("fake server script failed: {e}")))
            .collect()
    }

    /// Like [`FakeServer::finish`] but returns script failures instead of panicking.
    pub async fn outcomes(self) -> Vec<Result<Vec<FrontendMessage>, String>> {
        self.task.await.expect("fake server task panicked")
    }
}

async fn run_script(
    mut socket: TcpStream,
    script: Vec<Action>,
) -> Result<Vec<FrontendMessage>, String> {
    let mut received = Vec::new();
    let mut buf = BytesMut::new();
    for action in script {
        match action {
            Action::ReadStartup => {
                received.push(read_startup(&mut socket, &mut buf).await?);
            }
            Action::Handshake {
                server_version,
                auth,
            } => {
                received.push(read_startup(&mut socket, &mut buf).await?);
                let mut out = BytesMut::new();
                if let Some(request) = auth {
                    BackendMessage::Authentication(request).encode(&mut out);
                    send(&mut socket, &out).await?;
                    out.clear();
                    received.push(read_message(&mut socket, &mut buf).await?);
                }
                BackendMessage::Authentication(AuthRequest::Ok).encode(&mut out);
                for (name, value) in [
                    ("server_version", server_version.as_str()),
                    ("integer_datetimes", "on"),
                    ("server_encoding", "UTF8"),
                    ("client_encoding", "UTF8"),
                ] {
                    BackendMessage::ParameterStatus {
                        name: name.into(),
                        value: value.into(),
                    }
                    .encode(&mut out);
                }
                BackendMessage::BackendKeyData {
                    process_id: 4242,
                    secret_key: Bytes::from_static(&[1, 2, 3, 4]),
                }
                .encode(&mut out);
                BackendMessage::ReadyForQuery { status: b'I' }.encode(&mut out);
                send(&mut socket, &out).await?;
            }
            Action::Send(message) => {
                let mut out = BytesMut::new();
                message.encode(&mut out);
                send(&mut socket, &out).await?;
            }
            Action::SendRaw(bytes) => send(&mut socket, &bytes).await?,
            Action::Expect(tag) => loop {
                let message = read_message(&mut socket, &mut buf).await?;
                let found = message.tag == tag;
                received.push(message);
                if found {
                    break;
                }
            },
            Action::Sleep(duration) => tokio::time::sleep(duration).await,
            Action::GoSilent => {
                // Drain until the client closes, answering nothing.
                let mut sink = [0u8; 4096];
                while matches!(socket.read(&mut sink).await, Ok(n) if n > 0) {}
                return Ok(received);
            }
            Action::Close => return Ok(received),
        }
    }
    Ok(received)
}

async fn send(socket: &mut TcpStream, bytes: &[u8]) -> Result<(), String> {
    socket
        .write_all(bytes)
        .await
        .map_err(|e| format!("sending to the client: {e}"))
}

async fn fill(socket: &mut TcpStream, buf: &mut BytesMut, need: usize) -> Result<(), String> {
    while buf.len() < need {
        let n = socket
            .read_buf(buf)
            .await
            .map_err(|e| format!("reading from the client: {e}"))?;
        if n == 0 {
            return Err(format!(
                "the client closed the connection ({} of {need} bytes buffered)",
                buf.len()
            ));
        }
    }
    Ok(())
}

async fn read_startup(
    socket: &mut TcpStream,
    buf: &mut BytesMut,
) -> Result<FrontendMessage, String> {
    loop {
        fill(socket, buf, 8).await?;
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let code = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
        if len == 8 && code == 80_877_103 {
            buf.advance(8);
            send(socket, b"N").await?;
            continue;
        }
        if !(8..=10_000).contains(&len) {
            return Err(format!("invalid startup packet length {len}"));
        }
        fill(socket, buf, len).await?;
        let packet = buf.split_to(len).freeze();
        return Ok(FrontendMessage {
            tag: 0,
            body: packet.slice(4..),
        });
    }
}

async fn read_message(
    socket: &mut TcpStream,
    buf: &mut BytesMut,
) -> Result<FrontendMessage, String> {
    fill(socket, buf, 5).await?;
    let tag = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if !(4..=1 << 30).contains(&len) {
        return Err(format!(
            "invalid length {len} for client message '{}'",
            tag as char
        ));
    }
    fill(socket, buf, len + 1).await?;
    let frame = buf.split_to(len + 1).freeze();
    Ok(FrontendMessage {
        tag,
        body: frame.slice(5..),
    })
}
