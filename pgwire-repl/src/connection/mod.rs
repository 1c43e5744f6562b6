//! A connected, authenticated session: the thin tokio layer over [`crate::proto`].
//!
//! [`Connection`] owns the stream, a large reused receive buffer and a send buffer. It
//! reads whole messages with [`Connection::read_message`], handing out `CopyData`
//! payloads as slices of the receive buffer. Notices are delivered to the configured
//! handler (and logged), never dropped silently.
//!
//! # Connecting, step by step
//!
//! A connection is made in four steps, each in its own module:
//!
//! 1. **socket**: resolve the host and open a TCP or Unix socket (`connect_timeout`,
//!    keepalives, `requirepeer`). [`Connection::connect_over`] skips this step: the
//!    caller supplies the stream.
//! 2. **encryption**: an SSLRequest and the server's answer, or a direct TLS handshake
//!    (`sslmode`, `sslnegotiation`), with the libpq-compatible TLS setup of
//!    [`crate::tls`] or the caller's own `rustls::ClientConfig`
//!    ([`ConnectOptions::tls_config`]).
//! 3. **startup**: the startup packet (user, database, replication, application name,
//!    options).
//! 4. **authentication**: the server's requests answered by the sans-IO
//!    [`crate::proto::startup::Startup`] machine (which uses
//!    [`crate::proto::auth::Authenticator`]), up to ReadyForQuery.
//!
//! [`Connection::connect`] runs them for every host and address libpq would try, with
//! the `sslmode` retries of `allow` and `prefer` and the `target_session_attrs` check.

mod encryption;
mod hosts;
mod socket;
mod startup;
mod stream;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::config::{Config, Host, ReplicationMode};
use crate::error::{Error, Notice, Result};
pub use crate::proto::auth::AuthMethod;
use crate::proto::backend::{self, BackendMessage, DecodeLimits};
use crate::proto::frontend;
pub use crate::proto::startup::parse_server_major;
use encryption::Encryption;
pub use stream::AsyncStream;
use stream::{set_int_option, Exclusive, Stream};

/// Receive-buffer growth step. Large enough that one read usually takes several
/// 128 KiB XLogData messages at once.
const READ_CHUNK: usize = 256 * 1024;

/// A callback that receives every notice the server sends.
pub type NoticeHandler = Arc<dyn Fn(&Notice) + Send + Sync>;

/// Options that are not part of a libpq connection string.
///
/// ```
/// use std::sync::Arc;
/// use pgwire_repl::ConnectOptions;
///
/// let options = ConnectOptions {
///     notice_handler: Some(Arc::new(|notice: &pgwire_repl::Notice| eprintln!("server: {notice}"))),
///     ..ConnectOptions::default()
/// };
/// assert!(options.tls_config.is_none());
/// ```
#[derive(Clone, Default)]
pub struct ConnectOptions {
    /// Message length limits.
    pub limits: DecodeLimits,
    /// Receives notices. Without one, notices are logged through `tracing` at info level.
    pub notice_handler: Option<NoticeHandler>,
    /// A TLS configuration of the caller's own, used for every TLS handshake instead of
    /// the one this crate builds from the connection options.
    ///
    /// **With it, the libpq-compatible verifier of [`crate::tls`] is not used.** What
    /// is trusted is what this configuration's certificate verifier trusts, and nothing
    /// else. Concretely:
    ///
    /// * `sslmode` still decides *whether* TLS is used (`disable`, `allow`, `prefer`,
    ///   `require`, with libpq's fallbacks), and `sslnegotiation` how it starts, but
    ///   `verify-ca` and `verify-full` add nothing to `require`: the chain, the host
    ///   name, revocation and expiry are checked exactly as far as the configuration's
    ///   verifier checks them. rustls' default `WebPkiServerVerifier` checks the chain
    ///   to its root store and the host name (`host`, never `hostaddr`, given to rustls
    ///   as the server name), which is roughly `verify-full` with WebPKI's stricter
    ///   rules: no CN-only host names, no CA or X.509 v1 certificate as the server's,
    ///   and revocation only through CRLs given to the verifier. A verifier that accepts
    ///   everything makes every `sslmode` as weak as `require` without a root
    ///   certificate.
    /// * `sslrootcert`, `sslcert`, `sslkey`, `sslpassword`, `sslcrl`, `sslcrldir`,
    ///   `sslcertmode`, `ssl_min_protocol_version`, `ssl_max_protocol_version` and
    ///   `sslsni` are decided by the configuration (root store, client certificate
    ///   resolver, protocol versions, `enable_sni`). Setting any of them as well is
    ///   refused with [`crate::ErrorKind::Usage`] rather than silently ignored, and the
    ///   default files (`~/.postgresql/root.crt`, `postgresql.crt`, `postgresql.key`,
    ///   `root.crl`) are not read.
    /// * ALPN: a configuration that offers no ALPN protocol is given `postgresql`, which
    ///   PostgreSQL 17+ requires for `sslnegotiation=direct`; one that offers protocols
    ///   is used as it is.
    /// * SCRAM channel binding (`channel_binding`) still works: it uses the certificate
    ///   the server presented, whatever verified it.
    pub tls_config: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("limits", &self.limits)
            .field(
                "notice_handler",
                &self.notice_handler.as_ref().map(|_| "<fn>"),
            )
            .field("tls_config", &self.tls_config.as_ref().map(|_| "<custom>"))
            .finish()
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

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("target", &self.target)
            .field("server_major", &self.server_major)
            .field("process_id", &self.process_id)
            .field("replication", &self.replication)
            .field("tls", &self.tls)
            .field("auth_method", &self.auth_method)
            .finish_non_exhaustive()
    }
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
    ///
    /// ```no_run
    /// # async fn demo() -> pgwire_repl::Result<()> {
    /// use pgwire_repl::config::ReplicationMode;
    /// use pgwire_repl::{Config, ConnectOptions, Connection};
    ///
    /// let config = Config::parse_with_env("host=db1,db2 target_session_attrs=primary user=repl")?;
    /// let conn = Connection::connect(&config, ReplicationMode::Physical, &ConnectOptions::default()).await?;
    /// println!("connected to {} (PostgreSQL {})", conn.target(), conn.server_major());
    /// # Ok(()) }
    /// ```
    ///
    /// # Cancel safety
    ///
    /// Dropping the future closes whatever socket it had opened; nothing is left
    /// behind. Bound it with `connect_timeout` (per address, as libpq) or
    /// `tokio::time::timeout` (overall).
    pub async fn connect(
        config: &Config,
        replication: ReplicationMode,
        options: &ConnectOptions,
    ) -> Result<Connection> {
        config.check_service_applied()?;
        encryption::check_custom_tls(config, options)?;
        hosts::connect_hosts(config, replication, options).await
    }

    /// Runs the connection over a stream the caller opened (a tunnel, a proxy's
    /// socket, an in-memory pipe in a test): encryption as `sslmode` says, the startup
    /// packet, authentication and the `target_session_attrs` check, exactly as
    /// [`Connection::connect`] does them after opening a socket itself.
    ///
    /// The configuration must name one server (a host list is refused: pick one entry
    /// with [`Config::for_host`]). Its `host` and `port` stand for the server at the
    /// other end of the stream: the host name is the TLS server name (SNI, and the name
    /// `verify-full` checks), and both select the password-file line. As libpq never
    /// uses TLS over a Unix socket, a configuration whose host is a socket directory,
    /// or that names no host at all (the default socket directory), runs without TLS
    /// whatever `sslmode` says: set `host` to the server's name to use TLS.
    ///
    /// One stream allows one attempt, so the `sslmode` retries that need a new
    /// connection are not made: with `prefer`, a server that answers the SSLRequest
    /// with `N` is used without TLS, but a failed TLS handshake is an error; `allow`
    /// does not retry with TLS after a refusal. `connect_timeout` bounds the whole
    /// start-up. `requirepeer` is refused, since the peer of a stream the caller opened
    /// cannot be checked here (check it before handing the stream over); keepalives and
    /// other socket options are the caller's.
    ///
    /// With [`ConnectOptions::tls_config`], the caller's rustls configuration is used
    /// for the handshake (see there what that changes).
    ///
    /// ```no_run
    /// # async fn demo() -> pgwire_repl::Result<()> {
    /// use pgwire_repl::config::ReplicationMode;
    /// use pgwire_repl::{Config, ConnectOptions, Connection};
    ///
    /// // A stream opened by other means, e.g. through a bastion's port forward.
    /// let stream = tokio::net::TcpStream::connect("127.0.0.1:15432").await.map_err(|e| {
    ///     pgwire_repl::Error::io("connecting to the tunnel", e)
    /// })?;
    /// let config = Config::parse_with_env("host=db1.internal user=repl sslmode=verify-full")?;
    /// let conn = Connection::connect_over(stream, &config, ReplicationMode::Physical, &ConnectOptions::default()).await?;
    /// assert!(conn.tls().is_some());
    /// # Ok(()) }
    /// ```
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the stream; a start-up cannot be resumed.
    pub async fn connect_over(
        stream: impl AsyncStream,
        config: &Config,
        replication: ReplicationMode,
        options: &ConnectOptions,
    ) -> Result<Connection> {
        config.check_service_applied()?;
        encryption::check_custom_tls(config, options)?;
        if config.require_peer.is_some() {
            return Err(Error::usage(
                "requirepeer cannot be checked on a stream the caller opened",
                "check the peer of the stream before handing it over (UnixStream::peer_cred), and leave requirepeer unset",
            ));
        }
        let targets = config.targets();
        let [(host, host_addr, port)] = targets.as_slice() else {
            return Err(Error::usage(
                format!(
                    "Connection::connect_over reaches the one server at the other end of the stream, but the configuration lists {} hosts ({})",
                    targets.len(),
                    config.display_target()
                ),
                "make a configuration for that server alone with Config::for_host",
            ));
        };
        let encryption = encryption::plan(config, host)
            .first()
            .copied()
            .unwrap_or(Encryption::None);
        let stream = Stream::Custom(Exclusive::new(stream));
        let target = socket::describe(host, *port);
        let attempt = async {
            let connection = establish(
                config,
                replication,
                options,
                host,
                *port,
                stream,
                encryption,
            )
            .await?;
            hosts::check_session(connection, config.target_session_attrs)
                .await
                .map_err(hosts::Attempt::into_error)
        };
        let mut connection = match config.connect_timeout {
            Some(limit) => tokio::time::timeout(limit, attempt).await.map_err(|_| {
                Error::timeout(
                    format!(
                        "starting a session with {target} over the given stream did not finish within connect_timeout ({} s)",
                        limit.as_secs()
                    ),
                    "check that the stream reaches a PostgreSQL server and that it answers; raise connect_timeout for slow links",
                )
            })??,
            None => attempt.await?,
        };
        connection.host_addr = host_addr.clone();
        Ok(connection)
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

    /// Bytes in the send buffer not yet written to the socket: messages appended since
    /// the last [`Connection::flush`], or what remains of a flush that was cancelled.
    ///
    /// ```no_run
    /// # async fn demo(conn: &mut pgwire_repl::Connection) -> pgwire_repl::Result<()> {
    /// use std::time::Duration;
    /// pgwire_repl::proto::frontend::query("IDENTIFY_SYSTEM", conn.write_buf())?;
    /// if tokio::time::timeout(Duration::from_millis(10), conn.flush()).await.is_err() {
    ///     // Cancelled: the rest is still queued, and the next flush sends it.
    ///     assert!(conn.unsent() > 0);
    /// }
    /// conn.flush().await?;
    /// assert_eq!(conn.unsent(), 0);
    /// # Ok(()) }
    /// ```
    pub fn unsent(&self) -> usize {
        self.write_buf.len()
    }

    /// Writes out everything in the send buffer.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe. Bytes leave the send buffer only once the socket has taken them, so
    /// if the future is dropped (a `select!` branch or a timeout that fires first), what
    /// was not written stays in the buffer, in order, and the next `flush` sends it
    /// before anything appended later: no message is cut or sent twice. A message
    /// appended meanwhile simply follows.
    pub async fn flush(&mut self) -> Result<()> {
        while !self.write_buf.is_empty() {
            // `write` is cancel-safe: when it does not complete, nothing was written.
            match self.stream.write(&self.write_buf).await {
                Ok(0) => {
                    self.write_buf.clear();
                    return Err(Error::closed(format!("sending to {}", self.target)));
                }
                Ok(n) => self.write_buf.advance(n),
                Err(e) => {
                    self.write_buf.clear();
                    return Err(Error::io(format!("sending to {}", self.target), e));
                }
            }
        }
        self.stream
            .flush()
            .await
            .map_err(|e| Error::io(format!("sending to {}", self.target), e))
    }

    /// Reads the next message, delivering notices and parameter changes on the way.
    ///
    /// NoticeResponse and ParameterStatus are handled here and never returned.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe. Bytes are read into the connection's receive buffer, and a message
    /// is taken out of it only when it is returned; if the future is dropped, every
    /// byte read so far stays in the buffer and the next call returns the same message
    /// it would have returned. So it can be a branch of `tokio::select!` or be wrapped
    /// in `tokio::time::timeout` (as [`Connection::read_message_timeout`] does).
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

    /// Reads the next message with a time limit; [`crate::ErrorKind::Timeout`] when
    /// nothing complete arrived in time.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe, as [`Connection::read_message`]; after a timeout, the connection is
    /// still usable and the next read returns the message that was on its way.
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
        let tcp = self.stream.tcp_fd().is_some();
        self.bulk = BulkReceive {
            low_watermark: if tcp { bytes } else { 0 },
            armed: false,
        };
    }

    fn set_low_watermark(&self, bytes: u32) {
        let Some(fd) = self.stream.tcp_fd() else {
            return;
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

    /// Sends Terminate and closes the socket (a stream given to
    /// [`Connection::connect_over`] is shut down for writing, then dropped).
    pub async fn close(mut self) -> Result<()> {
        frontend::terminate(&mut self.write_buf);
        let _ = self.flush().await;
        let _ = self.stream.shutdown().await;
        Ok(())
    }
}

/// Steps 2 to 4 over an open stream: encryption, the startup packet, authentication.
async fn establish(
    config: &Config,
    replication: ReplicationMode,
    options: &ConnectOptions,
    host: &Host,
    port: u16,
    stream: Stream,
    encryption: Encryption,
) -> Result<Connection> {
    let target = socket::describe(host, port);
    let secured = encryption::negotiate(config, options, host, &target, stream, encryption).await?;
    startup::start_session(config, replication, options, host, port, secured).await
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_and_clients_are_send_and_sync() {
        // A caller's stream need only be Send; the connection stays Send + Sync, so it
        // can be held across `.await` in futures spawned on a multi-threaded runtime.
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Connection>();
        send_sync::<crate::ReplicationClient>();
        send_sync::<crate::SqlClient>();
        send_sync::<ConnectOptions>();
    }
}
