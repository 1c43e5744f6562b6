//! The crate's one error type.
//!
//! [`Error`] is opaque and queried through [`Error::kind`]. Connection-level failures
//! keep the underlying [`pgwire_repl::Error`] (with its SQLSTATE and advice); WAL that
//! fails verification is [`ErrorKind::Verify`] and names the LSN; local file problems
//! are [`ErrorKind::Io`] and name the path.

use std::fmt;
use std::path::Path;

use pgwire_repl::Lsn;

use crate::decode::WalVerifyError;

/// What went wrong, at the level a caller can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The server sent an `ErrorResponse`; see [`Error::sqlstate`].
    Server,
    /// The server broke the protocol (an unexpected or malformed message).
    Protocol,
    /// The connection failed or was lost (including the server closing it).
    Connection,
    /// The server sent nothing for longer than the configured limit.
    Timeout,
    /// WAL failed verification (bad CRC, page header, gap); see [`Error::lsn`].
    Verify,
    /// A local file or directory operation failed; the message names the path.
    Io,
    /// The server is too old or too new for what was asked.
    Unsupported,
    /// The caller used the API wrongly, or the options contradict each other.
    Usage,
    /// The WAL directory or the server is not in a state we can continue from (a
    /// different system, a timeline that goes backwards, a file of the wrong size).
    State,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Server => "server error",
            ErrorKind::Protocol => "protocol violation",
            ErrorKind::Connection => "connection error",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Verify => "WAL verification failed",
            ErrorKind::Io => "I/O error",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Usage => "usage error",
            ErrorKind::State => "inconsistent state",
        })
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
        }))
    }

    /// Wraps a connection-layer error, keeping its kind, SQLSTATE and advice.
    pub fn connection(err: pgwire_repl::Error) -> Error {
        use pgwire_repl::ErrorKind as K;
        let kind = match err.kind() {
            K::Server => ErrorKind::Server,
            K::Protocol => ErrorKind::Protocol,
            K::Timeout => ErrorKind::Timeout,
            K::Unsupported => ErrorKind::Unsupported,
            K::Usage | K::Config => ErrorKind::Usage,
            _ => ErrorKind::Connection,
        };
        let mut error = Error::new(kind, String::new(), None);
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

    /// The peer broke the protocol.
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

    /// True when a new connection may succeed where this one failed: the connection
    /// was lost or timed out, or the server is shutting down or starting up. Server
    /// errors about our request, verification errors and local I/O errors are not
    /// retryable.
    pub fn is_retryable(&self) -> bool {
        match self.0.kind {
            ErrorKind::Connection | ErrorKind::Timeout => true,
            ErrorKind::Server => matches!(
                self.sqlstate(),
                // admin_shutdown, crash_shutdown, cannot_connect_now, too many connections
                Some("57P01" | "57P02" | "57P03" | "53300")
            ),
            _ => false,
        }
    }
}

impl From<pgwire_repl::Error> for Error {
    fn from(err: pgwire_repl::Error) -> Error {
        Error::connection(err)
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
