//! The crate's error type: opaque, queried by kind, with the advice of every layer
//! below kept (a server error keeps its SQLSTATE, detail and hint).

use std::fmt;

use pgwire_repl::DbError;

/// What went wrong, at the level a caller acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The options cannot work (a missing slot name, a tar clone asked to start, …).
    Usage,
    /// Refused to protect data: a target that is not empty, or lies inside a data
    /// directory or tablespace. Nothing was written.
    Unsafe,
    /// The server answered with an error; see [`Error::db_error`].
    Server,
    /// Connecting or talking to a server failed (network, TLS, authentication,
    /// protocol).
    Connection,
    /// Data did not pass verification (manifest checksums, WAL record CRCs).
    Verify,
    /// A local file operation failed.
    Io,
    /// Something did not happen in time (the standby did not catch up, …).
    Timeout,
    /// The caller interrupted the operation.
    Interrupted,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Usage => "usage error",
            ErrorKind::Unsafe => "refused for safety",
            ErrorKind::Server => "server error",
            ErrorKind::Connection => "connection error",
            ErrorKind::Verify => "verification failed",
            ErrorKind::Io => "I/O error",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Interrupted => "interrupted",
        })
    }
}

/// The error of a layer below, kept whole.
#[derive(Debug)]
enum Source {
    Connection(pgwire_repl::Error),
    Backup(basebackup::Error),
    Wal(walstream::Error),
    Io(std::io::Error),
}

/// The error type of this crate.
///
/// ```
/// use standby::{Error, ErrorKind};
/// let err = Error::usage("--create-slot needs a slot name", "name the slot with --slot NAME");
/// assert_eq!(err.kind(), ErrorKind::Usage);
/// assert!(err.to_string().contains("what to do: name the slot"));
/// ```
pub struct Error(Box<Inner>);

#[derive(Debug)]
struct Inner {
    kind: ErrorKind,
    /// What this layer was doing, or the whole message when there is no source.
    message: String,
    advice: Option<String>,
    source: Option<Source>,
}

impl Error {
    fn new(kind: ErrorKind, message: impl Into<String>, advice: Option<String>) -> Error {
        Error(Box::new(Inner {
            kind,
            message: message.into(),
            advice,
            source: None,
        }))
    }

    /// Options that cannot work.
    pub fn usage(message: impl Into<String>, advice: impl Into<String>) -> Error {
        Error::new(ErrorKind::Usage, message, Some(advice.into()))
    }

    /// Something did not happen in time.
    pub fn timeout(message: impl Into<String>, advice: impl Into<String>) -> Error {
        Error::new(ErrorKind::Timeout, message, Some(advice.into()))
    }

    /// The caller interrupted the operation.
    pub fn interrupted(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Interrupted, message, None)
    }

    /// Data that did not pass a check.
    pub fn verify(message: impl Into<String>, advice: impl Into<String>) -> Error {
        Error::new(ErrorKind::Verify, message, Some(advice.into()))
    }

    /// A local file operation on `path` failed.
    pub fn io(what: impl fmt::Display, path: &std::path::Path, err: std::io::Error) -> Error {
        let mut e = Error::new(
            ErrorKind::Io,
            format!("{what} {}", path.display()),
            Some(match err.kind() {
                std::io::ErrorKind::PermissionDenied => {
                    "check the permissions of that path and the user this runs as".into()
                }
                std::io::ErrorKind::StorageFull => "free space on that file system".into(),
                _ => "check the path and the file system".into(),
            }),
        );
        e.0.source = Some(Source::Io(err));
        e
    }

    /// Puts `context` (what this layer was doing) in front of the message.
    pub fn context(mut self, context: impl fmt::Display) -> Error {
        self.0.message = if self.0.message.is_empty() {
            context.to_string()
        } else {
            format!("{context}: {}", self.0.message)
        };
        self
    }

    /// The kind.
    pub fn kind(&self) -> ErrorKind {
        self.0.kind
    }

    /// This layer's message (without the layer below and without advice).
    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// What to do, from the layer that knows best.
    pub fn advice(&self) -> Option<&str> {
        self.0.advice.as_deref().or(match &self.0.source {
            Some(Source::Connection(e)) => e.advice(),
            Some(Source::Backup(e)) => e.advice(),
            Some(Source::Wal(e)) => e.advice(),
            _ => None,
        })
    }

    /// The server's error, with its SQLSTATE, detail and hint, when a server sent one.
    pub fn db_error(&self) -> Option<&DbError> {
        match &self.0.source {
            Some(Source::Connection(e)) => e.db_error(),
            Some(Source::Backup(e)) => e.db_error(),
            Some(Source::Wal(e)) => e.db_error(),
            _ => None,
        }
    }

    /// The server's SQLSTATE, when a server sent an error.
    pub fn sqlstate(&self) -> Option<&str> {
        match &self.0.source {
            Some(Source::Connection(e)) => e.sqlstate(),
            Some(Source::Backup(e)) => e.sqlstate(),
            Some(Source::Wal(e)) => e.sqlstate(),
            _ => None,
        }
    }

    /// True when trying again later may succeed (a lost connection, a timeout, a
    /// server shutting down); false for what needs a change first.
    pub fn is_retryable(&self) -> bool {
        match &self.0.source {
            Some(Source::Wal(e)) => e.is_retryable(),
            Some(Source::Connection(e)) => e.is_retryable(),
            Some(Source::Backup(e)) => e.is_retryable(),
            _ => matches!(self.0.kind, ErrorKind::Timeout),
        }
    }

    /// The connection error below, if this came from one.
    pub fn connection_error(&self) -> Option<&pgwire_repl::Error> {
        match &self.0.source {
            Some(Source::Connection(e)) => Some(e),
            Some(Source::Wal(e)) => e.connection_error(),
            _ => None,
        }
    }

    /// The backup error below, if this came from one.
    pub fn backup_error(&self) -> Option<&basebackup::Error> {
        match &self.0.source {
            Some(Source::Backup(e)) => Some(e),
            _ => None,
        }
    }

    /// The WAL error below, if this came from one.
    pub fn wal_error(&self) -> Option<&walstream::Error> {
        match &self.0.source {
            Some(Source::Wal(e)) => Some(e),
            _ => None,
        }
    }
}

/// This crate's kind for a connection error: the server's refusals are `Server`, bad
/// options `Usage`, and everything else about reaching or talking to the server
/// (network, TLS, authentication, protocol, timeouts) `Connection`.
fn connection_kind(err: &pgwire_repl::Error) -> ErrorKind {
    match err.kind() {
        pgwire_repl::ErrorKind::Server => ErrorKind::Server,
        pgwire_repl::ErrorKind::Usage | pgwire_repl::ErrorKind::Config => ErrorKind::Usage,
        _ => ErrorKind::Connection,
    }
}

impl From<pgwire_repl::Error> for Error {
    fn from(err: pgwire_repl::Error) -> Error {
        let kind = connection_kind(&err);
        Error(Box::new(Inner {
            kind,
            message: String::new(),
            advice: None,
            source: Some(Source::Connection(err)),
        }))
    }
}

impl From<basebackup::Error> for Error {
    fn from(err: basebackup::Error) -> Error {
        let kind = match err.kind() {
            basebackup::ErrorKind::Server => ErrorKind::Server,
            basebackup::ErrorKind::Usage => ErrorKind::Usage,
            basebackup::ErrorKind::Unsafe => ErrorKind::Unsafe,
            basebackup::ErrorKind::Verify => ErrorKind::Verify,
            basebackup::ErrorKind::Io => ErrorKind::Io,
            _ => ErrorKind::Connection,
        };
        Error(Box::new(Inner {
            kind,
            message: String::new(),
            advice: None,
            source: Some(Source::Backup(err)),
        }))
    }
}

impl From<walstream::Error> for Error {
    fn from(err: walstream::Error) -> Error {
        // A connection error is classified as one from pgwire-repl directly; walstream's
        // own errors by their kind (a local file error is Io, not Connection).
        let kind = match err.connection_error() {
            Some(conn) => connection_kind(conn),
            None => match err.kind() {
                walstream::ErrorKind::Verify => ErrorKind::Verify,
                walstream::ErrorKind::Timeout => ErrorKind::Timeout,
                walstream::ErrorKind::Io => ErrorKind::Io,
                // Options that contradict each other, or a directory or server that
                // cannot be continued from: either way the caller must change something.
                walstream::ErrorKind::Usage | walstream::ErrorKind::State => ErrorKind::Usage,
                _ => ErrorKind::Connection,
            },
        };
        Error(Box::new(Inner {
            kind,
            message: String::new(),
            advice: None,
            source: Some(Source::Wal(err)),
        }))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A wrapped error prints itself (with its own advice); this layer adds context.
        let below: Option<&dyn fmt::Display> = match &self.0.source {
            Some(Source::Connection(e)) => Some(e),
            Some(Source::Backup(e)) => Some(e),
            Some(Source::Wal(e)) => Some(e),
            Some(Source::Io(e)) => {
                write!(f, "{}: {e}", self.0.message)?;
                None
            }
            None => {
                f.write_str(&self.0.message)?;
                None
            }
        };
        if let Some(below) = below {
            if self.0.message.is_empty() {
                write!(f, "{below}")?;
            } else {
                write!(f, "{}: {below}", self.0.message)?;
            }
        }
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
            .field("advice", &self.0.advice)
            .field("source", &self.0.source)
            .finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.0.source {
            Some(Source::Connection(e)) => Some(e),
            Some(Source::Backup(e)) => Some(e),
            Some(Source::Wal(e)) => Some(e),
            Some(Source::Io(e)) => Some(e),
            None => None,
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
