//! The crate's one error type.
//!
//! [`Error`] is opaque and queried through [`Error::kind`]. Connection-level failures
//! keep the underlying [`pgwire_repl::Error`] (with its SQLSTATE, detail, hint and
//! advice) and take its kind one to one: a refused connection is [`ErrorKind::Io`] here
//! as in `pgwire-repl` and `basebackup`, a refused certificate [`ErrorKind::Tls`], a
//! server's `ErrorResponse` [`ErrorKind::Server`]. WAL that fails verification is
//! [`ErrorKind::Verify`] and names the LSN; local file problems are [`ErrorKind::Io`]
//! and name the path. Nothing is classified by message text.

use std::fmt;
use std::path::Path;

use pgwire_repl::Lsn;

use crate::decode::WalVerifyError;

/// What went wrong, at the level a caller can act on.
///
/// The kinds shared with [`pgwire_repl::ErrorKind`] (and `basebackup::ErrorKind`) mean
/// the same thing in every crate; a connection error keeps its kind here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The server sent an `ErrorResponse`; see [`Error::db_error`] and
    /// [`Error::sqlstate`].
    Server,
    /// The server broke the protocol (an unexpected or malformed message).
    Protocol,
    /// A socket or file operation failed, or the connection closed unexpectedly. The
    /// message names the server or the path; [`Error::connection_error`] is `Some` for
    /// the network side.
    Io,
    /// Something did not finish in time: connecting (`connect_timeout`), or the server
    /// sent nothing for longer than the idle timeout while streaming.
    Timeout,
    /// The TLS handshake or TLS configuration failed (a refused certificate, no common
    /// protocol version, TLS required but not offered).
    Tls,
    /// Authentication failed on the client side (a missing password, a method
    /// `require_auth` refuses, a bad server signature, `requirepeer`). A server's
    /// refusal is [`ErrorKind::Server`] with SQLSTATE class 28.
    Auth,
    /// The connection string, an environment variable or a file it names is invalid.
    Config,
    /// The server is too old or too new for what was asked.
    Unsupported,
    /// The caller used the API wrongly, or the options contradict each other.
    Usage,
    /// WAL failed verification (bad CRC, page header, gap); see [`Error::lsn`].
    Verify,
    /// The WAL directory or the server is not in a state we can continue from (a
    /// different system, a timeline that goes backwards, a file of the wrong size).
    State,
    /// A [`WalDestination`](crate::WalDestination) other than a local directory failed
    /// (an object store refused or did not answer); [`Error::is_retryable`] says
    /// whether reconnecting may help.
    Destination,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Server => "server error",
            ErrorKind::Protocol => "protocol violation",
            ErrorKind::Io => "I/O error",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Tls => "TLS error",
            ErrorKind::Auth => "authentication error",
            ErrorKind::Config => "configuration error",
            ErrorKind::Unsupported => "unsupported by this server",
            ErrorKind::Usage => "usage error",
            ErrorKind::Verify => "WAL verification failed",
            ErrorKind::State => "inconsistent state",
            ErrorKind::Destination => "WAL destination error",
        })
    }
}

impl From<pgwire_repl::ErrorKind> for ErrorKind {
    /// The same kind: every kind of `pgwire-repl` has a namesake here.
    fn from(kind: pgwire_repl::ErrorKind) -> ErrorKind {
        use pgwire_repl::ErrorKind as K;
        match kind {
            K::Server => ErrorKind::Server,
            K::Protocol => ErrorKind::Protocol,
            K::Io => ErrorKind::Io,
            K::Timeout => ErrorKind::Timeout,
            K::Tls => ErrorKind::Tls,
            K::Auth => ErrorKind::Auth,
            K::Config => ErrorKind::Config,
            K::Unsupported => ErrorKind::Unsupported,
            K::Usage => ErrorKind::Usage,
            // A kind added to pgwire-repl later (its enum is non-exhaustive): the peer's
            // or the setup's fault rather than this crate's, until it gets a namesake.
            _ => ErrorKind::Protocol,
        }
    }
}

/// The error type of this crate.
///
/// ```
/// use walstream::{Error, ErrorKind};
/// let err = Error::usage("endpos 0/0 is invalid", "pass an LSN above 0/0");
/// assert_eq!(err.kind(), ErrorKind::Usage);
/// assert!(err.to_string().contains("what to do"));
/// ```
pub struct Error(Box<Inner>);

struct Inner {
    kind: ErrorKind,
    message: String,
    advice: Option<String>,
    lsn: Option<Lsn>,
    connection: Option<pgwire_repl::Error>,
    verify: Option<WalVerifyError>,
    source: Option<std::io::Error>,
    retryable: bool,
    missing_slot: bool,
}

impl Error {
    fn new(kind: ErrorKind, message: impl Into<String>, advice: Option<String>) -> Error {
        Error(Box::new(Inner {
            kind,
            message: message.into(),
            advice,
            lsn: None,
            connection: None,
            verify: None,
            source: None,
            retryable: false,
            missing_slot: false,
        }))
    }

    /// The replication slot `slot` does not exist on `server` (as
    /// `READ_REPLICATION_SLOT` found). See [`Error::is_missing_slot`].
    ///
    /// ```
    /// let err = walstream::Error::missing_slot("archive", "db1:5432");
    /// assert!(err.is_missing_slot());
    /// assert_eq!(err.kind(), walstream::ErrorKind::State);
    /// ```
    pub fn missing_slot(slot: &str, server: &str) -> Error {
        let mut error = Error::new(
            ErrorKind::State,
            format!("replication slot \"{slot}\" does not exist on {server}"),
            Some("create it (CREATE_REPLICATION_SLOT, or let the receiver create it), or fix the name; in an HA stack, declare it permanent so that the HA manager creates it on every new leader".into()),
        );
        error.0.missing_slot = true;
        error
    }

    /// A destination's failure (an object store, say): `retryable` when streaming again
    /// later may succeed (the store did not answer), so that
    /// [`receive_wal_into`](crate::receive_wal_into) reconnects and resumes from what the
    /// destination holds.
    ///
    /// ```
    /// let err = walstream::Error::destination("storing wal/00000001/… failed: timed out", "check the store", true);
    /// assert_eq!(err.kind(), walstream::ErrorKind::Destination);
    /// assert!(err.is_retryable());
    /// ```
    pub fn destination(
        message: impl Into<String>,
        advice: impl Into<String>,
        retryable: bool,
    ) -> Error {
        let mut error = Error::new(ErrorKind::Destination, message, Some(advice.into()));
        error.0.retryable = retryable;
        error
    }

    /// Wraps a connection-layer error, keeping its kind, SQLSTATE, detail, hint,
    /// advice and retryability. `From<pgwire_repl::Error>` does the same, so `?` works.
    ///
    /// ```
    /// let refused = pgwire_repl::Error::io(
    ///     "connecting to host=db1 port=5432",
    ///     std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
    /// );
    /// let err = walstream::Error::from(refused);
    /// assert_eq!(err.kind(), walstream::ErrorKind::Io);
    /// assert!(err.is_retryable());
    /// assert!(err.connection_error().is_some());
    /// ```
    pub fn connection(err: pgwire_repl::Error) -> Error {
        let mut error = Error::new(err.kind().into(), String::new(), None);
        error.0.connection = Some(err);
        error
    }

    /// WAL at `err.lsn` failed verification.
    pub fn verify(err: WalVerifyError, context: impl Into<String>) -> Error {
        let mut error = Error::new(
            ErrorKind::Verify,
            format!("{}: {err}", context.into()),
            Some("the WAL received is not what the server wrote (corruption on the server, in the network or in a proxy); the segment was left as .partial and nothing after the bad record was written; check the server with pg_waldump and the network path, then start again".into()),
        );
        error.0.lsn = Some(err.lsn);
        error.0.verify = Some(err);
        error
    }

    /// A local file operation `context` (which names the path) failed.
    pub fn io(context: impl Into<String>, err: std::io::Error) -> Error {
        let advice = match err.kind() {
            std::io::ErrorKind::PermissionDenied => "check the directory's owner and permissions",
            std::io::ErrorKind::NotFound => "check that the directory exists",
            _ if err.raw_os_error() == Some(libc::ENOSPC) => {
                "the disk is full: free space or move the WAL directory"
            }
            _ => "check the file system (space, permissions, errors in the kernel log)",
        };
        let mut error = Error::new(
            ErrorKind::Io,
            format!("{}: {err}", context.into()),
            Some(advice.into()),
        );
        error.0.source = Some(err);
        error
    }

    /// An I/O error on `path` while doing `what` (e.g. "fsyncing").
    pub(crate) fn file(what: &str, path: &Path, err: std::io::Error) -> Error {
        Error::io(format!("{what} {}", path.display()), err)
    }

    /// The peer broke the protocol (kind [`ErrorKind::Protocol`]).
    pub fn protocol(message: impl Into<String>) -> Error {
        Error::connection(pgwire_repl::Error::protocol(message))
    }

    /// Caller misuse, with advice.
    pub fn usage(message: impl Into<String>, advice: impl Into<String>) -> Error {
        Error::new(ErrorKind::Usage, message, Some(advice.into()))
    }

    /// An inconsistent directory or server state, with advice.
    pub fn state(message: impl Into<String>, advice: impl Into<String>) -> Error {
        Error::new(ErrorKind::State, message, Some(advice.into()))
    }

    /// A timeout, with advice.
    pub fn timeout(message: impl Into<String>, advice: impl Into<String>) -> Error {
        Error::new(ErrorKind::Timeout, message, Some(advice.into()))
    }

    /// The kind of error.
    pub fn kind(&self) -> ErrorKind {
        self.0.kind
    }

    /// For [`ErrorKind::Verify`]: the LSN of the bad record or page.
    pub fn lsn(&self) -> Option<Lsn> {
        self.0.lsn
    }

    /// For [`ErrorKind::Verify`]: the verifier's error.
    pub fn verify_error(&self) -> Option<&WalVerifyError> {
        self.0.verify.as_ref()
    }

    /// The connection-layer error, for errors that came from the connection.
    pub fn connection_error(&self) -> Option<&pgwire_repl::Error> {
        self.0.connection.as_ref()
    }

    /// The server's error fields (SQLSTATE, severity, message, detail, hint), when the
    /// server sent an `ErrorResponse`.
    ///
    /// ```
    /// use pgwire_repl::DbError;
    /// let db = DbError {
    ///     severity: "ERROR".into(),
    ///     code: "42704".into(),
    ///     message: "replication slot \"s1\" does not exist".into(),
    ///     hint: Some("create it first".into()),
    ///     ..DbError::default()
    /// };
    /// let err = walstream::Error::from(pgwire_repl::Error::server("starting to stream", db));
    /// assert_eq!(err.kind(), walstream::ErrorKind::Server);
    /// assert_eq!(err.db_error().unwrap().hint.as_deref(), Some("create it first"));
    /// assert_eq!(err.sqlstate(), Some("42704"));
    /// assert!(!err.is_retryable());
    /// ```
    pub fn db_error(&self) -> Option<&pgwire_repl::DbError> {
        self.0.connection.as_ref().and_then(|e| e.db_error())
    }

    /// The SQLSTATE, when the server sent an `ErrorResponse`.
    pub fn sqlstate(&self) -> Option<&str> {
        self.0.connection.as_ref().and_then(|e| e.sqlstate())
    }

    /// What to do about it.
    pub fn advice(&self) -> Option<&str> {
        match &self.0.connection {
            Some(conn) => conn.advice(),
            None => self.0.advice.as_deref(),
        }
    }

    /// True when the replication slot streamed from does not exist: the server said so
    /// (SQLSTATE 42704 from `START_REPLICATION`) or `READ_REPLICATION_SLOT` found none.
    ///
    /// Right after a failover this is transient (an HA manager such as Patroni creates
    /// its permanent slots on the new leader a moment after promoting it), so
    /// [`receive_wal_into`](crate::receive_wal_into) keeps retrying through its
    /// [`ReconnectPolicy`](crate::ReconnectPolicy) instead of returning it.
    pub fn is_missing_slot(&self) -> bool {
        self.0.missing_slot || self.sqlstate() == Some("42704")
    }

    /// True when the replication slot streamed from is in use by another connection
    /// (SQLSTATE 55006, "replication slot … is active for PID …"). Right after a lost
    /// connection that is usually this receiver's previous walsender, which the server
    /// has not yet seen go, so [`receive_wal_into`](crate::receive_wal_into) retries.
    pub fn is_slot_in_use(&self) -> bool {
        self.sqlstate() == Some("55006")
    }

    /// True when a new connection may succeed where this one failed.
    ///
    /// A connection error answers with [`pgwire_repl::Error::is_retryable`], the one
    /// rule of every crate: the connection failed, was lost or timed out, a TLS
    /// handshake was cut off, or the server is shutting down, starting up or full
    /// (SQLSTATE 57P01, 57P02, 57P03, 53300). Of this crate's own errors, only the idle
    /// timeout ([`ErrorKind::Timeout`]) is retryable; server errors about the request,
    /// verification errors, local file errors and inconsistent states need a change
    /// first. [`crate::receive_wal`] reconnects exactly when this is true.
    pub fn is_retryable(&self) -> bool {
        match &self.0.connection {
            Some(conn) => conn.is_retryable(),
            None => self.0.kind == ErrorKind::Timeout || self.0.retryable,
        }
    }
}

impl From<pgwire_repl::Error> for Error {
    fn from(err: pgwire_repl::Error) -> Error {
        Error::connection(err)
    }
}

impl From<WalVerifyError> for Error {
    /// A verification failure, named by its LSN (use [`Error::verify`] to say where the
    /// WAL came from).
    fn from(err: WalVerifyError) -> Error {
        Error::verify(err, "verifying WAL")
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(conn) = &self.0.connection {
            return fmt::Display::fmt(conn, f);
        }
        f.write_str(&self.0.message)?;
        if let Some(advice) = &self.0.advice {
            write!(f, "\n  what to do: {advice}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.0.kind)
            .field("message", &self.0.message)
            .field("lsn", &self.0.lsn)
            .field("connection", &self.0.connection)
            .field("verify", &self.0.verify)
            .finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        if let Some(conn) = &self.0.connection {
            return Some(conn);
        }
        if let Some(verify) = &self.0.verify {
            return Some(verify);
        }
        self.0
            .source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use pgwire_repl::ErrorKind as K;

    fn refused() -> pgwire_repl::Error {
        pgwire_repl::Error::io(
            "connecting to host=db1 port=5432",
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        )
    }

    fn server(code: &str) -> pgwire_repl::Error {
        pgwire_repl::Error::server(
            "streaming",
            pgwire_repl::DbError {
                severity: "FATAL".into(),
                code: code.into(),
                message: "m".into(),
                detail: Some("d".into()),
                hint: Some("h".into()),
                ..pgwire_repl::DbError::default()
            },
        )
    }

    #[test]
    fn connection_kinds_map_one_to_one() {
        // Every kind of pgwire-repl has a namesake here, with the same name.
        for kind in [
            K::Server,
            K::Protocol,
            K::Io,
            K::Timeout,
            K::Tls,
            K::Auth,
            K::Config,
            K::Unsupported,
            K::Usage,
        ] {
            let ours = ErrorKind::from(kind);
            assert_eq!(format!("{ours:?}"), format!("{kind:?}"));
            assert_eq!(ours.to_string(), kind.to_string());
        }
        // A refused connection is Io here as in pgwire-repl, not a catch-all.
        assert_eq!(Error::from(refused()).kind(), ErrorKind::Io);
        let tls = pgwire_repl::Error::tls("certificate refused", "fix sslrootcert");
        assert_eq!(Error::from(tls).kind(), ErrorKind::Tls);
        let config = pgwire_repl::Error::config("bad option", "fix it");
        assert_eq!(Error::from(config).kind(), ErrorKind::Config);
    }

    #[test]
    fn retryable_follows_the_connection_rule() {
        for (err, retryable) in [
            (Error::from(refused()), true),
            (Error::from(server("57P01")), true),
            (Error::from(server("53300")), true),
            (Error::from(server("42704")), false),
            (Error::from(server("28P01")), false),
            (
                Error::from(pgwire_repl::Error::auth("no password", "set one")),
                false,
            ),
            (Error::timeout("idle", "raise the idle timeout"), true),
            (
                Error::io(
                    "writing /wal/000000010000000000000001.partial",
                    std::io::Error::from(std::io::ErrorKind::PermissionDenied),
                ),
                false,
            ),
            (Error::state("another system", "use a new directory"), false),
            (Error::usage("bad options", "fix them"), false),
        ] {
            assert_eq!(err.is_retryable(), retryable, "{err:?}");
            if let Some(conn) = err.connection_error() {
                assert_eq!(conn.is_retryable(), retryable, "{err:?}");
            }
        }
        // Local Io and connection Io share the kind; retryability tells them apart.
        let local = Error::io("fsyncing /wal", std::io::Error::other("EIO"));
        assert_eq!(local.kind(), ErrorKind::Io);
        assert!(local.connection_error().is_none());
    }

    #[test]
    fn server_fields_survive() {
        let err = Error::from(server("57P01"));
        let db = err.db_error().unwrap();
        assert_eq!(db.code, "57P01");
        assert_eq!(db.detail.as_deref(), Some("d"));
        assert_eq!(db.hint.as_deref(), Some("h"));
        assert_eq!(err.sqlstate(), Some("57P01"));
        assert!(err.to_string().contains("SQLSTATE 57P01"), "{err}");
    }
}
