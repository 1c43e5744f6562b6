//! The crate's error type: opaque, queried by kind, keeping the error of the layer below
//! (a server error keeps its SQLSTATE). No credential ever reaches a message: the store
//! is named by its URL only, and object-store errors name objects, not requests.

use std::fmt;

/// What went wrong, at the level a caller acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The options cannot work (a bad URL, an unknown backup label, …).
    Usage,
    /// Refused to protect data: the repository belongs to another cluster, a label is
    /// taken, a restore target is not empty.
    Unsafe,
    /// The object store failed or refused a request (after the retries of transient
    /// errors).
    Store,
    /// Data in the repository did not pass verification, or is missing.
    Verify,
    /// The backup itself failed (the server, the connection, or its verification).
    Backup,
    /// Connecting to or talking with the server failed.
    Connection,
    /// A local file operation failed.
    Io,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Usage => "usage error",
            ErrorKind::Unsafe => "refused for safety",
            ErrorKind::Store => "object store error",
            ErrorKind::Verify => "verification failed",
            ErrorKind::Backup => "backup failed",
            ErrorKind::Connection => "connection error",
            ErrorKind::Io => "I/O error",
        })
    }
}

#[derive(Debug)]
enum Source {
    Store(object_store::Error),
    Backup(basebackup::Error),
    Connection(pgwire_repl::Error),
    Standby(standby::Error),
    Io(std::io::Error),
}

/// The error type of this crate.
///
/// ```
/// use pgrepo::{Error, ErrorKind};
/// let err = Error::usage("no backup named x", "run `clone-standby list` to see the labels");
/// assert_eq!(err.kind(), ErrorKind::Usage);
/// assert!(err.to_string().contains("what to do: run"));
/// ```
pub struct Error(Box<Inner>);

#[derive(Debug)]
struct Inner {
    kind: ErrorKind,
    message: String,
    advice: Option<String>,
    source: Option<Source>,
    retryable: bool,
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    fn new(kind: ErrorKind, message: impl Into<String>, advice: Option<String>) -> Error {
        Error(Box::new(Inner {
            kind,
            message: message.into(),
            advice,
            source: None,
            retryable: false,
        }))
    }

    /// Options that cannot work.
    pub fn usage(message: impl Into<String>, advice: impl Into<String>) -> Error {
        Error::new(ErrorKind::Usage, message, Some(advice.into()))
    }

    /// Refused to protect data.
    pub fn unsafe_op(message: impl Into<String>, advice: impl Into<String>) -> Error {
        Error::new(ErrorKind::Unsafe, message, Some(advice.into()))
    }

    /// Repository data that failed verification; `object` names it.
    pub fn verify(object: impl fmt::Display, what: impl fmt::Display) -> Error {
        Error::new(
            ErrorKind::Verify,
            format!("{object}: {what}"),
            Some(
                "the backup in the repository is damaged or incomplete: do not restore it; \
                 take a new backup"
                    .into(),
            ),
        )
    }

    /// A failed object-store request, while doing `what`.
    pub fn store(what: impl fmt::Display, err: object_store::Error) -> Error {
        let (message, advice) = match &err {
            object_store::Error::NotFound { .. } => (
                format!("{what}: the object does not exist"),
                "check the repository URL and that the backup is complete",
            ),
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => (
                format!("{what}: {err}"),
                "check the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and the \
                 bucket's permissions",
            ),
            _ => (
                format!("{what}: {err}"),
                "check that the object store is reachable (AWS_ENDPOINT_URL) and try again; \
                 transient errors were already retried",
            ),
        };
        let retryable = !matches!(
            err,
            object_store::Error::NotFound { .. }
                | object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. }
                | object_store::Error::NotSupported { .. }
                | object_store::Error::NotImplemented { .. }
        );
        let mut e = Error::new(ErrorKind::Store, message, Some(advice.into()));
        e.0.source = Some(Source::Store(err));
        e.0.retryable = retryable;
        e
    }

    /// A local file operation on `path` failed.
    pub fn io(what: impl fmt::Display, path: &std::path::Path, err: std::io::Error) -> Error {
        let mut e = Error::new(
            ErrorKind::Io,
            format!("{what} {}: {err}", path.display()),
            Some("check the path, its permissions and the free space".into()),
        );
        e.0.source = Some(Source::Io(err));
        e
    }

    /// Replaces the advice (what to do).
    pub fn with_advice(mut self, advice: impl Into<String>) -> Error {
        self.0.advice = Some(advice.into());
        self
    }

    /// Adds what this layer was doing in front of the message.
    pub fn context(mut self, context: impl fmt::Display) -> Error {
        self.0.message = format!("{context}: {}", self.0.message);
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.0.kind
    }

    /// The message, without the advice.
    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// What to do about it.
    pub fn advice(&self) -> Option<&str> {
        self.0.advice.as_deref()
    }

    /// The server's SQLSTATE, when the server reported the error.
    pub fn sqlstate(&self) -> Option<&str> {
        match &self.0.source {
            Some(Source::Backup(e)) => e.sqlstate(),
            Some(Source::Connection(e)) => e.sqlstate(),
            Some(Source::Standby(e)) => e.sqlstate(),
            _ => None,
        }
    }

    /// The backup layer's error, if that is where it came from.
    pub fn backup_error(&self) -> Option<&basebackup::Error> {
        match &self.0.source {
            Some(Source::Backup(e)) => Some(e),
            _ => None,
        }
    }

    pub(crate) fn set_retryable(&mut self) {
        self.0.retryable = true;
    }

    /// Converts into the error a [`walstream::WalDestination`] returns, keeping the
    /// message, the advice and whether retrying may help.
    pub fn into_wal_error(self) -> walstream::Error {
        let retryable = self.is_retryable();
        let advice = self.advice().unwrap_or("see the message").to_string();
        walstream::Error::destination(self.message().to_string(), advice, retryable)
    }

    /// True when trying again later may succeed (a lost connection, an object store
    /// that was unreachable), false for what will fail again the same way.
    pub fn is_retryable(&self) -> bool {
        match &self.0.source {
            Some(Source::Backup(e)) => e.is_retryable(),
            Some(Source::Connection(e)) => e.is_retryable(),
            Some(Source::Standby(e)) => e.is_retryable(),
            _ => self.0.retryable,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
            .finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.0.source {
            Some(Source::Store(e)) => Some(e),
            Some(Source::Backup(e)) => Some(e),
            Some(Source::Connection(e)) => Some(e),
            Some(Source::Standby(e)) => Some(e),
            Some(Source::Io(e)) => Some(e),
            None => None,
        }
    }
}

impl From<basebackup::Error> for Error {
    fn from(err: basebackup::Error) -> Error {
        let kind = match err.kind() {
            basebackup::ErrorKind::Verify => ErrorKind::Verify,
            basebackup::ErrorKind::Unsafe => ErrorKind::Unsafe,
            basebackup::ErrorKind::Usage => ErrorKind::Usage,
            basebackup::ErrorKind::Io => ErrorKind::Io,
            _ => ErrorKind::Backup,
        };
        // The layer below already said what to do.
        let mut e = Error::new(kind, err.to_string(), None);
        e.0.source = Some(Source::Backup(err));
        e
    }
}

impl From<pgwire_repl::Error> for Error {
    fn from(err: pgwire_repl::Error) -> Error {
        let mut e = Error::new(ErrorKind::Connection, err.to_string(), None);
        e.0.source = Some(Source::Connection(err));
        e
    }
}

impl From<standby::Error> for Error {
    fn from(err: standby::Error) -> Error {
        let kind = match err.kind() {
            standby::ErrorKind::Usage => ErrorKind::Usage,
            standby::ErrorKind::Unsafe => ErrorKind::Unsafe,
            standby::ErrorKind::Verify => ErrorKind::Verify,
            standby::ErrorKind::Io => ErrorKind::Io,
            _ => ErrorKind::Connection,
        };
        let mut e = Error::new(kind, err.to_string(), None);
        e.0.source = Some(Source::Standby(err));
        e
    }
}
