//! A connected, authenticated session: the thin tokio layer over [`crate::proto`].
//!
//! [`Connection`] owns the socket, a large reused receive buffer and a send buffer. It
//! reads whole messages with [`Connection::read_message`], handing out `CopyData`
//! payloads as slices of the receive buffer. Notices are delivered to the configured
//! handler (and logged), never dropped silently.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use crate::config::{
    Config, Host, LoadBalanceHosts, ReplicationMode, SslMode, SslNegotiation, TargetSessionAttrs,
};
use crate::error::{Error, ErrorKind, Notice, Result};
pub use crate::proto::auth::AuthMethod;
use crate::proto::auth::{AuthSettings, Authenticator};
use crate::proto::backend::{self, BackendMessage, DecodeLimits};
use crate::proto::frontend;

/// Receive-buffer growth step. Large enough that one read usually takes several
/// 128 KiB XLogData messages at once.
const READ_CHUNK: usize = 256 * 1024;

/// A callback that receives every notice the server sends.
pub type NoticeHandler = Arc<dyn Fn(&Notice) + Send + Sync>;

/// Options that are not part of a libpq connection string.
#[derive(Clone, Default)]
pub struct ConnectOptions {
    /// Message length limits.
    pub limits: DecodeLimits,
    /// Receives notices. Without one, notices are logged through `tracing` at info level.
    pub notice_handler: Option<NoticeHandler>,
}

impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("limits", &self.limits)
            .field(
                "notice_handler",
                &self.notice_handler.as_ref().map(|_| "<fn>"),
            )
            .finish()
    }
}

/// The socket under a connection.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// What TLS the connection uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// Protocol version, e.g. `TLSv1.3`.
    pub version: String,
    /// Cipher suite name.
    pub cipher: String,
    /// Whether the handshake was direct (PG17+) rather than after an SSLRequest.
    pub direct: bool,
}

/// An authenticated connection, ready for simple queries.
pub struct Connection {
    stream: Stream,
    read_buf: BytesMut,
    write_buf: BytesMut,
    limits: DecodeLimits,
    notice_handler: Option<NoticeHandler>,
    parameters: HashMap<String, String>,
    server_major: u32,
    process_id: i32,
    tls: Option<TlsInfo>,
    auth_method: AuthMethod,
    target: String,
    /// The kind of session the startup packet asked for.
    replication: ReplicationMode,
    /// The configured host, hostaddr and port this connection reached.
    host: Host,
    host_addr: Option<String>,
    port: u16,
    /// Bulk-receive state: see [`Connection::set_bulk_receive`].
    bulk: BulkReceive,
}

/// How the socket's receive low-watermark (`SO_RCVLOWAT`) is used.
#[derive(Debug, Clone, Copy, Default)]
struct BulkReceive {
    /// Wake up only when this many bytes are queued (0: off).
    low_watermark: u32,
    /// Whether the socket currently has `low_watermark` set (otherwise 1, the default).
    armed: bool,
}

/// How long a bulk read waits for the low-watermark before taking whatever has arrived:
/// a server that pauses (or sends its last few bytes) is served after this delay.
const BULK_PATIENCE: Duration = Duration::from_millis(1);

/// Which encryption one attempt uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encryption {
    None,
    Negotiated { required: bool },
    Direct,
}

impl Connection {
    /// Connects and authenticates, trying the configured hosts as libpq does.
    ///
    /// Hosts are tried in order (in a random order with `load_balance_hosts=random`,
    /// which also shuffles the addresses of each host name), and each address of a host
    /// in turn. As in libpq, the next address or host is tried only when a server cannot
    /// be reached (the socket cannot connect, the name does not resolve,
    /// `connect_timeout` passes), when it answers "the database system is starting up"
    /// or another SQLSTATE 57P03, or when it is not the kind of server
    /// `target_session_attrs` asks for; any other failure, such as a refused
    /// password, ends the attempt at once.
    ///
    /// `target_session_attrs` is checked after authentication with the
    /// `in_hot_standby` and `default_transaction_read_only` values that PostgreSQL 14+
    /// reports, and otherwise (PostgreSQL 13) with `SHOW transaction_read_only` or
    /// `SELECT pg_catalog.pg_is_in_recovery()`, exactly the queries libpq sends. A
    /// physical replication connection cannot run the `SELECT` (only the `SHOW`), so
    /// `primary`, `standby` and `prefer-standby` cannot be checked on PostgreSQL 13
    /// there: such a server is skipped with an error saying so, as libpq skips it.
    /// `prefer-standby` makes a second pass over the hosts accepting any server when no
    /// standby was found.
    pub async fn connect(
        config: &Config,
        replication: ReplicationMode,
        options: &ConnectOptions,
    ) -> Result<Connection> {
        config.check_service_applied()?;
        let mut targets = config.targets();
        let mut shuffler = match config.load_balance_hosts {
            LoadBalanceHosts::Random => Some(Shuffler::new()),
            LoadBalanceHosts::Disable => None,
        };
        if let Some(shuffler) = shuffler.as_mut() {
            shuffler.shuffle(&mut targets);
        }
        let passes: Vec<TargetSessionAttrs> = match config.target_session_attrs {
            TargetSessionAttrs::PreferStandby => {
                vec![TargetSessionAttrs::PreferStandby, TargetSessionAttrs::Any]
            }
            other => vec![other],
        };
        let mut failures: Vec<Failure> = Vec::new();
        for wanted in passes {
            for (host, host_addr, port) in &targets {
                let result = connect_target(
                    config,
                    replication,
                    options,
                    host,
                    host_addr.as_deref(),
                    *port,
                    wanted,
                    shuffler.as_mut(),
                )
                .await;
                match result {
                    Ok(connection) => return Ok(connection),
                    Err(Attempt::Next(error)) => {
                        tracing::debug!(target = %describe(host, *port), error = %error, "connection attempt failed; trying the next host");
                        failures.push(Failure {
                            target: describe(host, *port),
                            error,
                            wrong_kind: false,
                        });
                    }
                    Err(Attempt::WrongKind(error)) => {
                        tracing::debug!(target = %describe(host, *port), error = %error, "server of the wrong kind; trying the next host");
                        failures.push(Failure {
                            target: describe(host, *port),
                            error,
                            wrong_kind: true,
                        });
                    }
                    Err(Attempt::Final(error)) => {
                        return Err(combine_failures(config, failures, Some(error)))
                    }
                }
            }
        }
        Err(combine_failures(config, failures, None))
    }

    /// The server's major version (13–18).
    pub fn server_major(&self) -> u32 {
        self.server_major
    }

    /// The full `server_version` parameter, e.g. `15.18 (Debian 15.18-0+deb12u1)`.
    pub fn server_version(&self) -> &str {
        self.parameters
            .get("server_version")
            .map(String::as_str)
            .unwrap_or("")
    }

    /// A parameter the server reported with ParameterStatus.
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters.get(name).map(String::as_str)
    }

    /// The backend's process ID.
    pub fn process_id(&self) -> i32 {
        self.process_id
    }

    /// TLS details, when TLS is in use.
    pub fn tls(&self) -> Option<&TlsInfo> {
        self.tls.as_ref()
    }

    /// How the client authenticated.
    pub fn auth_method(&self) -> AuthMethod {
        self.auth_method
    }

    /// `host=… port=…` of the server, for messages.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The entry of the host list this connection reached: the host (a name or a
    /// socket directory), its `hostaddr` if one was configured, and the port. With
    /// [`Config::for_host`] it makes a configuration that reaches the same server again,
    /// whatever `load_balance_hosts` or a failover would pick next.
    pub fn endpoint(&self) -> (&Host, Option<&str>, u16) {
        (&self.host, self.host_addr.as_deref(), self.port)
    }

    /// The send buffer; append messages with [`crate::proto::frontend`] and call
    /// [`Connection::flush`].
    pub fn write_buf(&mut self) -> &mut BytesMut {
        &mut self.write_buf
    }

    /// Writes out everything in the send buffer.
    pub async fn flush(&mut self) -> Result<()> {
        if !self.write_buf.is_empty() {
            let result = self.stream.write_all(&self.write_buf).await;
            self.write_buf.clear();
            result.map_err(|e| Error::io(format!("sending to {}", self.target), e))?;
        }
        self.stream
            .flush()
            .await
            .map_err(|e| Error::io(format!("sending to {}", self.target), e))
    }

    /// Reads the next message, delivering notices and parameter changes on the way.
    ///
    /// NoticeResponse and ParameterStatus are handled here and never returned.
    pub async fn read_message(&mut self) -> Result<BackendMessage> {
        loop {
            let message = self.read_raw_message().await?;
            if let Some(message) = self.absorb(message) {
                return Ok(message);
            }
        }
    }

    /// The next message if it has already been received in full, without waiting or
    /// reading from the socket; `Ok(None)` when more bytes are needed.
    ///
    /// A large copy stream arrives many messages per read, so a receive loop that tries
    /// this first pays for timers and task wake-ups only when the buffer runs dry.
    /// Notices and parameter changes are handled as in [`Connection::read_message`].
    ///
    /// ```no_run
    /// # async fn demo(conn: &mut pgwire_repl::Connection) -> pgwire_repl::Result<()> {
    /// let message = match conn.try_read_buffered()? {
    ///     Some(message) => message,
    ///     None => conn.read_message().await?,
    /// };
    /// # let _ = message; Ok(()) }
    /// ```
    pub fn try_read_buffered(&mut self) -> Result<Option<BackendMessage>> {
        while let Some(message) = backend::decode(&mut self.read_buf, &self.limits)? {
            if let Some(message) = self.absorb(message) {
                return Ok(Some(message));
            }
        }
        Ok(None)
    }

    /// Handles the asynchronous message types; returns every other message.
    fn absorb(&mut self, message: BackendMessage) -> Option<BackendMessage> {
        match message {
            BackendMessage::NoticeResponse(notice) => self.deliver_notice(&notice),
            BackendMessage::ParameterStatus { name, value } => {
                self.parameters.insert(name, value);
            }
            BackendMessage::NotificationResponse { .. } => {}
            other => return Some(other),
        }
        None
    }

    /// Reads the next message with a time limit.
    pub async fn read_message_timeout(&mut self, limit: Duration) -> Result<BackendMessage> {
        match tokio::time::timeout(limit, self.read_message()).await {
            Ok(result) => result,
            Err(_) => Err(Error::timeout(
                format!("{} sent nothing for {} s", self.target, limit.as_secs_f64()),
                "the server or the network stalled; check the server's log and load",
            )),
        }
    }

    async fn read_raw_message(&mut self) -> Result<BackendMessage> {
        loop {
            if let Some(message) = backend::decode(&mut self.read_buf, &self.limits)? {
                return Ok(message);
            }
            let read = read_some(&mut self.stream, &mut self.read_buf, &self.target);
            if !self.bulk.armed {
                let n = read.await?;
                if self.bulk.low_watermark > 0 && n >= self.bulk.low_watermark as usize / 2 {
                    // The data is coming fast: from now on, wake up once per watermark.
                    self.set_low_watermark(self.bulk.low_watermark);
                    self.bulk.armed = true;
                }
                continue;
            }
            match tokio::time::timeout(BULK_PATIENCE, read).await {
                Ok(result) => {
                    result?;
                }
                Err(_) => {
                    // Fewer bytes than the watermark are waiting, or none: the stream
                    // slowed down. Lowering the watermark signals readiness at once if
                    // anything is there, and slow streams are then read as they arrive.
                    self.set_low_watermark(1);
                    self.bulk.armed = false;
                }
            }
        }
    }

    /// Hints that a long, fast stream may follow (a base backup's archives, WAL being
    /// caught up): once reads keep returning at least half of `bytes`, the reading task
    /// is woken only when `bytes` have arrived (`SO_RCVLOWAT`), instead of for every few
    /// TCP segments; once the stream slows down (the watermark is not reached within
    /// 1 ms) it is read as it arrives again. Fewer wake-ups save CPU on both ends of a
    /// loopback or LAN connection; a stream that goes quiet costs at most 1 ms of
    /// latency, once. `0` turns it off. Only TCP (with or without TLS) uses it.
    ///
    /// ```no_run
    /// # async fn demo(conn: &mut pgwire_repl::Connection) {
    /// conn.set_bulk_receive(256 * 1024);
    /// # }
    /// ```
    pub fn set_bulk_receive(&mut self, bytes: u32) {
        if self.bulk.armed {
            self.set_low_watermark(1);
        }
        let tcp = matches!(self.stream, Stream::Tcp(_) | Stream::Tls(_));
        self.bulk = BulkReceive {
            low_watermark: if tcp { bytes } else { 0 },
            armed: false,
        };
    }

    fn set_low_watermark(&self, bytes: u32) {
        let fd = match &self.stream {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Tls(s) => s.get_ref().0.as_raw_fd(),
            Stream::Unix(_) => return,
        };
        let value = bytes.min(i32::MAX as u32) as libc::c_int;
        // A failure only means more wake-ups.
        let _ = set_int_option(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, value);
    }

    fn deliver_notice(&self, notice: &Notice) {
        match &self.notice_handler {
            Some(handler) => handler(notice),
            None => tracing::info!(server = %self.target, "server notice: {notice}"),
        }
    }

    /// Delivers a notice received by a caller that reads raw messages.
    pub fn handle_notice(&self, notice: &Notice) {
        self.deliver_notice(notice);
    }

    /// Sends Terminate and closes the socket.
    pub async fn close(mut self) -> Result<()> {
        frontend::terminate(&mut self.write_buf);
        let _ = self.flush().await;
        let _ = self.stream.shutdown().await;
        Ok(())
    }
}

/// Reads one message (used before the connection is set up).
async fn read_message<S: AsyncRead + Unpin>(
    stream: &mut S,
    read_buf: &mut BytesMut,
    limits: &DecodeLimits,
    target: &str,
) -> Result<BackendMessage> {
    loop {
        if let Some(message) = backend::decode(read_buf, limits)? {
            return Ok(message);
        }
        read_some(stream, read_buf, target).await?;
    }
}

/// One read from the socket into `read_buf`; end of stream is an error.
async fn read_some<S: AsyncRead + Unpin>(
    stream: &mut S,
    read_buf: &mut BytesMut,
    target: &str,
) -> Result<usize> {
    let want = backend::frame_len(read_buf).map_or(READ_CHUNK, |total| {
        total.saturating_sub(read_buf.len()).max(READ_CHUNK)
    });
    read_buf.reserve(want);
    let n = stream
        .read_buf(read_buf)
        .await
        .map_err(|e| Error::io(format!("reading from {target}"), e))?;
    if n == 0 {
        return Err(Error::closed(format!(
            "reading from {target}{}",
            if read_buf.is_empty() {
                ""
            } else {
                " (in the middle of a message)"
            }
        )));
    }
    Ok(n)
}

fn describe(host: &Host, port: u16) -> String {
    match host {
        Host::Tcp(name) => format!("host={name} port={port}"),
        Host::Unix(dir) => format!("socket {}/.s.PGSQL.{port}", dir.display()),
    }
}

/// How a connection attempt to one host ended, when it did not succeed.
enum Attempt {
    /// Try the next host (libpq's `try_next_host`).
    Next(Error),
    /// The server is not of the kind `target_session_attrs` asks for: try the next host.
    WrongKind(Error),
    /// Give up on every host (libpq's `error_return`).
    Final(Error),
}

/// One address of a host.
#[derive(Debug, Clone)]
enum Address {
    Tcp(std::net::SocketAddr),
    Unix(std::path::PathBuf),
}

/// Tries every address of one host, as libpq does for one `connhost` entry.
#[allow(clippy::too_many_arguments)]
async fn connect_target(
    config: &Config,
    replication: ReplicationMode,
    options: &ConnectOptions,
    host: &Host,
    host_addr: Option<&str>,
    port: u16,
    wanted: TargetSessionAttrs,
    shuffler: Option<&mut Shuffler>,
) -> std::result::Result<Connection, Attempt> {
    let target = describe(host, port);
    let mut addresses = match host {
        Host::Unix(dir) => vec![Address::Unix(dir.join(format!(".s.PGSQL.{port}")))],
        Host::Tcp(name) => {
            let lookup = host_addr.unwrap_or(name);
            match tokio::net::lookup_host((lookup, port)).await {
                Ok(found) => found.map(Address::Tcp).collect(),
                Err(e) => {
                    let what = if host_addr.is_some() {
                        format!("could not parse network address \"{lookup}\"")
                    } else {
                        format!("could not translate host name \"{lookup}\" to address")
                    };
                    return Err(Attempt::Next(Error::io(what, e).with_advice(
                        "check the spelling of the host name and the DNS (or /etc/hosts) of this machine",
                    )));
                }
            }
        }
    };
    if addresses.is_empty() {
        return Err(Attempt::Next(Error::config(
            format!("host name \"{}\" resolved to no address", host_text(host)),
            "check the DNS (or /etc/hosts) of this machine",
        )));
    }
    if let Some(shuffler) = shuffler {
        shuffler.shuffle(&mut addresses);
    }
    let mut last_error = None;
    for address in &addresses {
        let attempt = connect_address(config, replication, options, host, address, port, wanted);
        let result = match config.connect_timeout {
            Some(limit) => match tokio::time::timeout(limit, attempt).await {
                Ok(result) => result,
                // libpq gives up on this address and tries the next one.
                Err(_) => Err(AddressAttempt::Unreachable(Error::timeout(
                    format!("connecting to {target}{} did not finish within connect_timeout ({} s)", describe_address(host, address), limit.as_secs()),
                    "check that the server is up and reachable (host, port, firewall); raise connect_timeout for slow links",
                ))),
            },
            None => attempt.await,
        };
        match result {
            Ok(mut connection) => {
                connection.host_addr = host_addr.map(str::to_string);
                return Ok(connection);
            }
            Err(AddressAttempt::Unreachable(error)) => {
                tracing::debug!(target = %target, address = ?address, error = %error, "address unreachable");
                last_error = Some(error);
            }
            Err(AddressAttempt::Host(attempt)) => return Err(attempt),
        }
    }
    Err(Attempt::Next(last_error.unwrap_or_else(|| {
        Error::config(
            format!("no address to connect to for {target}"),
            "check host and hostaddr",
        )
    })))
}

/// How an attempt at one address ended, when it did not succeed.
enum AddressAttempt {
    /// The address could not be reached: try the next one.
    Unreachable(Error),
    /// Decided for the whole host.
    Host(Attempt),
}

/// Connects to one address: encryption as `sslmode` says (retrying the other way for
/// `allow` and `prefer`), authentication, then the `target_session_attrs` check.
#[allow(clippy::too_many_arguments)]
async fn connect_address(
    config: &Config,
    replication: ReplicationMode,
    options: &ConnectOptions,
    host: &Host,
    address: &Address,
    port: u16,
    wanted: TargetSessionAttrs,
) -> std::result::Result<Connection, AddressAttempt> {
    let plan: &[Encryption] = match (host, config.ssl_mode, config.ssl_negotiation) {
        // TLS is never used over Unix sockets; libpq ignores sslmode there.
        (Host::Unix(_), _, _) => &[Encryption::None],
        (_, SslMode::Disable, _) => &[Encryption::None],
        (_, SslMode::Allow, _) => &[Encryption::None, Encryption::Negotiated { required: true }],
        (_, SslMode::Prefer, _) => &[Encryption::Negotiated { required: false }, Encryption::None],
        (_, _, SslNegotiation::Direct) => &[Encryption::Direct],
        (_, _, SslNegotiation::Postgres) => &[Encryption::Negotiated { required: true }],
    };
    let mut first_error: Option<Error> = None;
    for (index, &encryption) in plan.iter().enumerate() {
        let stream = open_socket(config, host, address, port)
            .await
            .map_err(AddressAttempt::Unreachable)?;
        match connect_once(config, replication, options, host, stream, port, encryption).await {
            Ok(connection) => {
                return check_session(connection, wanted)
                    .await
                    .map_err(AddressAttempt::Host)
            }
            Err(error) => {
                if error.sqlstate() == Some(CANNOT_CONNECT_NOW) {
                    // "the database system is starting up" and the like: libpq moves on
                    // to the next host (not the next address or encryption).
                    return Err(AddressAttempt::Host(Attempt::Next(error)));
                }
                let retryable = index + 1 < plan.len() && may_retry_with_other_encryption(&error);
                if !retryable {
                    // Report the first attempt's error: it is the one the user asked for.
                    return Err(AddressAttempt::Host(Attempt::Final(
                        first_error.unwrap_or(error),
                    )));
                }
                tracing::debug!(error = %error, "retrying with the other sslmode choice");
                first_error.get_or_insert(error);
            }
        }
    }
    Err(AddressAttempt::Host(Attempt::Final(
        first_error
            .unwrap_or_else(|| Error::usage("empty connection plan", "report this as a bug")),
    )))
}

/// SQLSTATE 57P03, `cannot_connect_now`.
const CANNOT_CONNECT_NOW: &str = "57P03";

/// Checks `target_session_attrs` on a new connection as libpq's
/// `CONNECTION_CHECK_TARGET` state does; a server of the wrong kind is closed politely
/// and the next host is tried.
async fn check_session(
    mut connection: Connection,
    wanted: TargetSessionAttrs,
) -> std::result::Result<Connection, Attempt> {
    let target = connection.target.clone();
    let reported = |name: &str| connection.parameter(name).map(|value| value == "on");
    let mismatch = match wanted {
        TargetSessionAttrs::Any => None,
        TargetSessionAttrs::ReadWrite | TargetSessionAttrs::ReadOnly => {
            let read_only = match (
                reported("default_transaction_read_only"),
                reported("in_hot_standby"),
            ) {
                (Some(read_only), Some(hot_standby)) => read_only || hot_standby,
                _ => {
                    let sql = "SHOW transaction_read_only";
                    match session_probe(&mut connection, sql, sql).await? {
                        Ok(value) => value.starts_with("on"),
                        Err(error) => return Err(Attempt::Next(error)),
                    }
                }
            };
            match (wanted, read_only) {
                (TargetSessionAttrs::ReadWrite, true) => Some("session is read-only"),
                (TargetSessionAttrs::ReadOnly, false) => Some("session is not read-only"),
                _ => None,
            }
        }
        TargetSessionAttrs::Primary
        | TargetSessionAttrs::Standby
        | TargetSessionAttrs::PreferStandby => {
            let hot_standby = match reported("in_hot_standby") {
                Some(hot_standby) => hot_standby,
                None => {
                    let sql = "SELECT pg_catalog.pg_is_in_recovery()";
                    match session_probe(&mut connection, sql, "SELECT pg_is_in_recovery()").await? {
                        Ok(value) => value.starts_with('t'),
                        Err(error) => return Err(Attempt::Next(error)),
                    }
                }
            };
            match (wanted, hot_standby) {
                (TargetSessionAttrs::Primary, true) => Some("server is in hot standby mode"),
                (TargetSessionAttrs::Primary, false) => None,
                (_, false) => Some("server is not in hot standby mode"),
                (_, true) => None,
            }
        }
    };
    let Some(reason) = mismatch else {
        return Ok(connection);
    };
    // Close politely, then try the next host.
    let _ = connection.close().await;
    Err(Attempt::WrongKind(Error::config(
        format!("{target}: {reason}"),
        format!(
            "target_session_attrs={} skips this server; list a host that qualifies, or change target_session_attrs",
            wanted.as_str()
        ),
    )))
}

/// Runs one of libpq's target-checking queries: the outer error ends the whole attempt
/// (the connection broke), the inner one skips the host (the query failed).
async fn session_probe(
    connection: &mut Connection,
    sql: &str,
    shown: &str,
) -> std::result::Result<std::result::Result<String, Error>, Attempt> {
    let target = connection.target.clone();
    let replication = connection.replication;
    let major = connection.server_major;
    let result = probe_value(connection, sql).await.map_err(Attempt::Final)?;
    let failure = match result {
        Ok(Some(value)) => return Ok(Ok(value)),
        Ok(None) => format!("\"{shown}\" failed on {target}: it did not return one value"),
        Err(db) => format!("\"{shown}\" failed on {target}: {db}"),
    };
    let advice = if replication == ReplicationMode::Physical {
        format!(
            "PostgreSQL {major} does not report in_hot_standby, and a physical replication connection cannot run SQL, so primary, standby and prefer-standby cannot be checked on this server (libpq fails the same way); use target_session_attrs=read-write (checked with SHOW, which replication connections allow), list only the wanted host, or upgrade the server to PostgreSQL 14 or later"
        )
    } else {
        "check that the role can run this query on that server, and the server's log".to_string()
    };
    Ok(Err(Error::config(failure, advice)))
}

/// Sends one simple query and returns the first value of its one row: `Ok(Err(db))`
/// when the server answered with an error, `Ok(Ok(None))` for any other shape.
async fn probe_value(
    connection: &mut Connection,
    sql: &str,
) -> Result<std::result::Result<Option<String>, crate::error::DbError>> {
    frontend::query(sql, connection.write_buf())?;
    connection.flush().await?;
    let mut rows: Vec<Option<String>> = Vec::new();
    let mut error = None;
    loop {
        match connection.read_message().await? {
            BackendMessage::DataRow(values) => rows.push(
                values
                    .into_iter()
                    .next()
                    .flatten()
                    .map(|value| String::from_utf8_lossy(&value).into_owned()),
            ),
            BackendMessage::ErrorResponse(db) => error = Some(db),
            BackendMessage::ReadyForQuery { .. } => break,
            BackendMessage::RowDescription(_)
            | BackendMessage::CommandComplete { .. }
            | BackendMessage::EmptyQueryResponse => {}
            other => {
                return Err(Error::protocol(format!(
                    "unexpected {} in reply to {sql:?}",
                    other.name()
                )))
            }
        }
    }
    Ok(match error {
        Some(db) => Err(db),
        None if rows.len() == 1 => Ok(rows.into_iter().next().flatten()),
        None => Ok(None),
    })
}

/// A host that was tried and skipped.
struct Failure {
    target: String,
    error: Error,
    /// Skipped for `target_session_attrs` (the server works, but is of the wrong kind).
    wrong_kind: bool,
}

/// Puts the failures of several hosts into one error, as libpq lists every host's.
fn combine_failures(config: &Config, mut failures: Vec<Failure>, last: Option<Error>) -> Error {
    if let Some(last) = last {
        if failures.is_empty() {
            return last;
        }
        failures.push(Failure {
            target: String::new(),
            error: last,
            wrong_kind: false,
        });
    }
    if failures.len() <= 1 {
        return failures
            .pop()
            .map(|failure| failure.error)
            .unwrap_or_else(|| Error::config("no host to connect to", "set host (or PGHOST)"));
    }
    let lines: Vec<String> = failures
        .iter()
        .map(|failure| {
            let error = &failure.error;
            let text = match error.db_error() {
                Some(db) => format!("{}: {db}", error.message()),
                None => error.message().to_string(),
            };
            if failure.target.is_empty() || text.contains(failure.target.as_str()) {
                text
            } else {
                format!("{}: {text}", failure.target)
            }
        })
        .collect();
    let attrs = match config.target_session_attrs {
        TargetSessionAttrs::Any => String::new(),
        other => format!(" with target_session_attrs={}", other.as_str()),
    };
    // The advice of the last real failure; if every server worked but was of the wrong
    // kind, say so.
    let (kind, advice) = match failures.iter().rev().find(|failure| !failure.wrong_kind) {
        Some(failure) => (
            failure.error.kind(),
            failure.error.advice().map(str::to_string),
        ),
        None => (
            ErrorKind::Config,
            Some(format!(
                "no host qualified for target_session_attrs={}; check which server is the primary now (SELECT pg_is_in_recovery() on each), list it in host, or change target_session_attrs",
                config.target_session_attrs.as_str()
            )),
        ),
    };
    Error::from_parts(
        kind,
        format!(
            "could not connect to any host{attrs} ({} attempts): {}",
            failures.len(),
            lines.join("; ")
        ),
        advice,
    )
}

/// A small pseudo-random generator for `load_balance_hosts=random` (libpq uses its own
/// PRNG for this too): seeded from the standard library's per-process random hash keys
/// and the clock, so every connection gets a new order.
struct Shuffler(u64);

impl Shuffler {
    fn new() -> Shuffler {
        use std::hash::{BuildHasher, Hasher};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        hasher.write_u128(nanos);
        Shuffler(hasher.finish())
    }

    /// splitmix64.
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `0..=max`.
    fn up_to(&mut self, max: usize) -> usize {
        let span = max as u64 + 1;
        (self.next() % span) as usize
    }

    /// The "inside-out" Fisher-Yates shuffle libpq uses.
    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in 1..items.len() {
            let j = self.up_to(i);
            items.swap(i, j);
        }
    }
}

/// libpq's allow/prefer retry the other way after a TLS failure or a server rejection.
fn may_retry_with_other_encryption(error: &Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::Tls | ErrorKind::Server | ErrorKind::Io
    )
}

/// libpq's `requirepeer`: the server at the other end of a Unix socket must run as
/// the OS user `expected`, checked before anything is sent to it.
fn check_peer(socket: &UnixStream, expected: &str, path: &std::path::Path) -> Result<()> {
    let credentials = socket.peer_cred().map_err(|e| {
        Error::io(
            format!(
                "reading the peer credentials of socket {} (requirepeer)",
                path.display()
            ),
            e,
        )
    })?;
    let uid = credentials.uid();
    let Some(actual) = user_name(uid) else {
        return Err(Error::auth(
            format!("requirepeer: the server process runs as user ID {uid}, which has no user name on this machine ({})", path.display()),
            format!("check which server listens on {}; requirepeer={expected} expects user {expected:?}", path.display()),
        ));
    };
    if actual != expected {
        return Err(Error::auth(
            format!(
                "requirepeer specifies \"{expected}\", but actual peer user name is \"{actual}\" ({})",
                path.display()
            ),
            "the socket is served by a process of another user: check that the socket directory is the real server's, or fix requirepeer",
        ));
    }
    Ok(())
}

/// The name of the OS user `uid`, if it has one.
fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: an all-zero passwd is a valid out-parameter for getpwuid_r.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the duration of the call; buf's length is passed.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
        return None;
    }
    // SAFETY: getpwuid_r succeeded, so pw_name is a NUL-terminated string inside buf.
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
    Some(name.to_string_lossy().into_owned())
}

async fn open_socket(config: &Config, host: &Host, address: &Address, port: u16) -> Result<Stream> {
    match address {
        Address::Unix(path) => {
            let socket = UnixStream::connect(path)
                .await
                .map_err(|e| Error::io(format!("connecting to socket {}", path.display()), e))?;
            if let Some(expected) = &config.require_peer {
                check_peer(&socket, expected, path)?;
            }
            Ok(Stream::Unix(socket))
        }
        Address::Tcp(address) => {
            let socket = TcpStream::connect(address).await.map_err(|e| {
                Error::io(
                    format!(
                        "connecting to {}{}",
                        describe(host, port),
                        describe_address(host, &Address::Tcp(*address))
                    ),
                    e,
                )
            })?;
            let _ = socket.set_nodelay(true);
            if config.keepalives {
                let socket_ref = socket2_keepalive(&socket, config.keepalives_idle);
                if let Err(e) = socket_ref {
                    tracing::debug!("cannot enable TCP keepalive: {e}");
                }
            }
            Ok(Stream::Tcp(socket))
        }
    }
}

/// ` (address)` when the address is not already the host's text.
fn describe_address(host: &Host, address: &Address) -> String {
    match (host, address) {
        (Host::Tcp(name), Address::Tcp(socket)) if *name != socket.ip().to_string() => {
            format!(" ({})", socket.ip())
        }
        _ => String::new(),
    }
}

fn host_text(host: &Host) -> String {
    match host {
        Host::Tcp(name) => name.clone(),
        Host::Unix(dir) => dir.display().to_string(),
    }
}

/// Enables TCP keepalive through setsockopt (tokio exposes no setter).
fn socket2_keepalive(socket: &TcpStream, idle: Option<Duration>) -> io::Result<()> {
    let fd = socket.as_raw_fd();
    set_int_option(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    if let Some(idle) = idle {
        let secs = libc::c_int::try_from(idle.as_secs())
            .unwrap_or(libc::c_int::MAX)
            .max(1);
        set_int_option(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, secs)?;
    }
    Ok(())
}

/// Sets one integer socket option.
fn set_int_option(
    fd: std::os::fd::RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: setsockopt reads one c_int through a valid pointer; a bad descriptor or
    // option is reported as an error, not undefined behaviour.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

async fn start_tls(
    config: &Config,
    socket: TcpStream,
    host: &Host,
    direct: bool,
) -> Result<Stream> {
    let Host::Tcp(name) = host else {
        return Err(Error::usage(
            "TLS over a Unix socket",
            "report this as a bug",
        ));
    };
    let setup = crate::tls::prepare(config, name)?;
    let connector = tokio_rustls::TlsConnector::from(setup.client_config.clone());
    let stream = connector
        .connect(setup.server_name.clone(), socket)
        .await
        .map_err(|e| crate::tls::handshake_error(config, name, direct, &e))?;
    setup.check_client_cert_mode(config, &format!("host={name}"))?;
    Ok(Stream::Tls(Box::new(stream)))
}

async fn connect_once(
    config: &Config,
    replication: ReplicationMode,
    options: &ConnectOptions,
    host: &Host,
    mut stream: Stream,
    port: u16,
    encryption: Encryption,
) -> Result<Connection> {
    let target = describe(host, port);
    let mut direct = false;
    match encryption {
        Encryption::None => {}
        Encryption::Direct => {
            let Stream::Tcp(socket) = stream else {
                return Err(Error::usage(
                    "direct TLS over a Unix socket",
                    "report this as a bug",
                ));
            };
            stream = start_tls(config, socket, host, true).await?;
            direct = true;
        }
        Encryption::Negotiated { required } => {
            let Stream::Tcp(mut socket) = stream else {
                return Err(Error::usage(
                    "TLS over a Unix socket",
                    "report this as a bug",
                ));
            };
            let mut request = BytesMut::new();
            frontend::ssl_request(&mut request);
            socket
                .write_all(&request)
                .await
                .map_err(|e| Error::io(format!("sending SSLRequest to {target}"), e))?;
            let mut answer = [0u8; 1];
            socket.read_exact(&mut answer).await.map_err(|e| {
                Error::io(format!("reading the SSLRequest answer from {target}"), e)
            })?;
            match answer[0] {
                b'S' => {
                    // Bytes after 'S' but before the handshake could be injected by a
                    // man in the middle (CVE-2021-23222): refuse them.
                    let mut extra = [0u8; 1];
                    if let Ok(n) = socket.try_read(&mut extra) {
                        if n > 0 {
                            return Err(Error::protocol(format!("{target} sent unencrypted data after accepting TLS")));
                        }
                    }
                    stream = start_tls(config, socket, host, false).await?;
                }
                b'N' if required => {
                    return Err(Error::tls(
                        format!("{target} does not support TLS, but sslmode={} requires it", crate::config::ssl_mode_name(config.ssl_mode)),
                        "enable ssl=on (with ssl_cert_file and ssl_key_file) on the server, or lower sslmode to prefer or disable",
                    ));
                }
                b'N' => stream = Stream::Tcp(socket),
                b'E' => {
                    return Err(Error::protocol(format!("{target} answered the SSLRequest with an error; is it PostgreSQL older than 7.0?")))
                }
                other => {
                    return Err(Error::protocol(format!("{target} answered the SSLRequest with byte 0x{other:02x}, expected 'S' or 'N'")))
                }
            }
        }
    }

    if !matches!(stream, Stream::Tls(_)) {
        crate::tls::check_client_cert_mode_without_tls(config, &target)?;
    }
    let tls = match &stream {
        Stream::Tls(tls) => {
            let (_, session) = tls.get_ref();
            Some(TlsInfo {
                version: session
                    .protocol_version()
                    .map(|v| format!("{v:?}").replace("TLSv1_", "TLSv1."))
                    .unwrap_or_default(),
                cipher: session
                    .negotiated_cipher_suite()
                    .map(|c| format!("{:?}", c.suite()))
                    .unwrap_or_default(),
                direct,
            })
        }
        _ => None,
    };
    let server_cert_hash = match &stream {
        Stream::Tls(tls) => tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|cert| crate::tls::tls_server_end_point(cert.as_ref())),
        _ => None,
    };

    let user = config.effective_user()?;
    let mut parameters: Vec<(&str, &str)> = vec![("user", &user)];
    let replication_value = match replication {
        ReplicationMode::Off => None,
        ReplicationMode::Physical => Some("true"),
        ReplicationMode::Database => Some("database"),
    };
    if let Some(value) = replication_value {
        parameters.push(("replication", value));
    }
    let dbname = config.dbname.clone();
    if let Some(db) = &dbname {
        parameters.push(("database", db));
    }
    if replication == ReplicationMode::Off {
        parameters.push(("client_encoding", "UTF8"));
    }
    let application_name = config
        .application_name
        .as_ref()
        .or(config.fallback_application_name.as_ref());
    if let Some(name) = application_name {
        parameters.push(("application_name", name));
    }
    if let Some(opts) = &config.options {
        parameters.push(("options", opts));
    }
    let mut write_buf = BytesMut::with_capacity(8 * 1024);
    frontend::startup(&parameters, &mut write_buf)?;
    stream
        .write_all(&write_buf)
        .await
        .map_err(|e| Error::io(format!("sending the startup message to {target}"), e))?;
    write_buf.clear();

    // pgpass matching uses "replication" as the database of physical connections.
    let pgpass_db = match (replication, &dbname) {
        (ReplicationMode::Physical, _) => "replication".to_string(),
        (_, Some(db)) => db.clone(),
        (_, None) => user.clone(),
    };
    let mut read_buf = BytesMut::with_capacity(READ_CHUNK);
    let mut auth = Authenticator::new(AuthSettings {
        user: user.clone(),
        password: config.password_for(host, port, &pgpass_db, &user),
        channel_binding: config.channel_binding,
        tls_in_use: tls.is_some(),
        server_cert_hash,
        target: target.clone(),
    })
    .with_require_auth(config.require_auth.clone());
    let mut parameters_seen = HashMap::new();
    let mut process_id = 0;
    loop {
        let message = read_message(&mut stream, &mut read_buf, &options.limits, &target)
            .await
            .map_err(|e| {
                if e.kind() == ErrorKind::Io && auth.method() != AuthMethod::None {
                    e.with_advice(
                        "the server closed the connection during authentication; its log says why",
                    )
                } else {
                    e
                }
            })?;
        match message {
            BackendMessage::Authentication(request) => {
                if let Some(reply) = auth.respond(request)? {
                    stream.write_all(&reply).await.map_err(|e| {
                        Error::io(format!("sending authentication data to {target}"), e)
                    })?;
                }
            }
            BackendMessage::ErrorResponse(db) => {
                let context = if auth.method() == AuthMethod::None {
                    format!("connecting to {target} as {user}")
                } else {
                    format!("authenticating to {target} as {user}")
                };
                return Err(Error::server(context, db));
            }
            BackendMessage::NoticeResponse(notice) => match &options.notice_handler {
                Some(handler) => handler(&notice),
                None => tracing::info!(server = %target, "server notice: {notice}"),
            },
            BackendMessage::ParameterStatus { name, value } => {
                parameters_seen.insert(name, value);
            }
            BackendMessage::BackendKeyData {
                process_id: pid, ..
            } => process_id = pid,
            BackendMessage::NegotiateProtocolVersion {
                newest_minor,
                unrecognized_options,
            } => {
                tracing::debug!(
                    newest_minor,
                    ?unrecognized_options,
                    "server negotiated the protocol version down"
                );
            }
            BackendMessage::ReadyForQuery { .. } => break,
            other => {
                return Err(Error::protocol(format!(
                    "{target} sent {} during connection start-up",
                    other.name()
                )))
            }
        }
    }
    auth.finish()?;
    let version = parameters_seen
        .get("server_version")
        .cloned()
        .unwrap_or_default();
    let server_major = parse_server_major(&version).ok_or_else(|| {
        Error::protocol(format!(
            "{target} reported server_version {version:?}, which is not a PostgreSQL version"
        ))
    })?;
    if server_major < 10 {
        return Err(Error::unsupported("this client", 13, server_major));
    }
    if parameters_seen.get("integer_datetimes").map(String::as_str) == Some("off") {
        return Err(Error::unsupported(
            "a server built with integer_datetimes=off",
            13,
            server_major,
        ));
    }
    read_buf.reserve(READ_CHUNK);
    Ok(Connection {
        stream,
        read_buf,
        write_buf,
        limits: options.limits,
        notice_handler: options.notice_handler.clone(),
        parameters: parameters_seen,
        server_major,
        process_id,
        tls,
        auth_method: auth.method(),
        target,
        replication,
        host: host.clone(),
        host_addr: None,
        port,
        bulk: BulkReceive::default(),
    })
}

/// Takes the major version from `server_version` (`15.18 (Debian …)`, `17beta1`, `18devel`).
pub fn parse_server_major(version: &str) -> Option<u32> {
    let digits: String = version
        .trim()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok().filter(|&major: &u32| major > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shuffle_reaches_every_order() {
        // Every one of the 6 orders of 3 hosts comes up, each roughly equally often.
        let mut counts = HashMap::new();
        for _ in 0..6000 {
            let mut items = [1, 2, 3];
            Shuffler::new().shuffle(&mut items);
            *counts.entry(items).or_insert(0u32) += 1;
        }
        assert_eq!(counts.len(), 6, "{counts:?}");
        assert!(
            counts.values().all(|&n| (700..1300).contains(&n)),
            "{counts:?}"
        );
        let mut one = [7];
        Shuffler::new().shuffle(&mut one);
        let mut none: [u8; 0] = [];
        Shuffler::new().shuffle(&mut none);
        assert_eq!(one, [7]);
    }

    #[test]
    fn server_major_forms() {
        assert_eq!(
            parse_server_major("15.18 (Debian 15.18-0+deb12u1)"),
            Some(15)
        );
        assert_eq!(parse_server_major("17beta1"), Some(17));
        assert_eq!(parse_server_major("18devel"), Some(18));
        assert_eq!(parse_server_major("13.23"), Some(13));
        assert_eq!(parse_server_major(""), None);
        assert_eq!(parse_server_major("x"), None);
    }
}
