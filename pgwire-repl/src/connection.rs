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

use crate::config::{Config, Host, ReplicationMode, SslMode, SslNegotiation};
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
    /// Connects and authenticates, trying each configured host in turn, as libpq does.
    pub async fn connect(
        config: &Config,
        replication: ReplicationMode,
        options: &ConnectOptions,
    ) -> Result<Connection> {
        let targets = config.targets();
        let mut last_error = None;
        for (host, host_addr, port) in targets {
            let attempt = connect_host(
                config,
                replication,
                options,
                &host,
                host_addr.as_deref(),
                port,
            );
            let result = match config.connect_timeout {
                Some(limit) => match tokio::time::timeout(limit, attempt).await {
                    Ok(result) => result,
                    Err(_) => Err(Error::timeout(
                        format!("connecting to {} did not finish within connect_timeout ({} s)", describe(&host, port), limit.as_secs()),
                        "check that the server is up and reachable (host, port, firewall); raise connect_timeout for slow links",
                    )),
                },
                None => attempt.await,
            };
            match result {
                Ok(connection) => return Ok(connection),
                // A server error for an existing role is final; other hosts would say the same.
                Err(e) => {
                    tracing::debug!(target = %describe(&host, port), error = %e, "connection attempt failed");
                    last_error = Some(e);
                }
            }
        }
        Err(last_error
            .unwrap_or_else(|| Error::config("no host to connect to", "set host (or PGHOST)")))
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

async fn connect_host(
    config: &Config,
    replication: ReplicationMode,
    options: &ConnectOptions,
    host: &Host,
    host_addr: Option<&str>,
    port: u16,
) -> Result<Connection> {
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
        match connect_once(
            config,
            replication,
            options,
            host,
            host_addr,
            port,
            encryption,
        )
        .await
        {
            Ok(connection) => return Ok(connection),
            Err(error) => {
                let retryable = index + 1 < plan.len() && may_retry_with_other_encryption(&error);
                if !retryable {
                    // Report the first attempt's error: it is the one the user asked for.
                    return Err(first_error.unwrap_or(error));
                }
                tracing::debug!(error = %error, "retrying with the other sslmode choice");
                first_error.get_or_insert(error);
            }
        }
    }
    Err(first_error
        .unwrap_or_else(|| Error::usage("empty connection plan", "report this as a bug")))
}

/// libpq's allow/prefer retry the other way after a TLS failure or a server rejection.
fn may_retry_with_other_encryption(error: &Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::Tls | ErrorKind::Server | ErrorKind::Io
    )
}

async fn open_socket(
    config: &Config,
    host: &Host,
    host_addr: Option<&str>,
    port: u16,
) -> Result<Stream> {
    match host {
        Host::Unix(dir) => {
            let path = dir.join(format!(".s.PGSQL.{port}"));
            let socket = UnixStream::connect(&path)
                .await
                .map_err(|e| Error::io(format!("connecting to socket {}", path.display()), e))?;
            Ok(Stream::Unix(socket))
        }
        Host::Tcp(name) => {
            let address = host_addr.unwrap_or(name);
            let socket = TcpStream::connect((address, port))
                .await
                .map_err(|e| Error::io(format!("connecting to {address}:{port}"), e))?;
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

#[allow(clippy::too_many_arguments)]
async fn connect_once(
    config: &Config,
    replication: ReplicationMode,
    options: &ConnectOptions,
    host: &Host,
    host_addr: Option<&str>,
    port: u16,
    encryption: Encryption,
) -> Result<Connection> {
    let target = describe(host, port);
    let mut stream = open_socket(config, host, host_addr, port).await?;
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
    });
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
