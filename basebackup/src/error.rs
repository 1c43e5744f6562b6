//! The crate's one error type.

use std::fmt;
use std::sync::Arc;

use pgwire_repl::DbError;

/// What went wrong, at the level a caller can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The server sent an `ErrorResponse`; see [`Error::sqlstate`].
    Server,
    /// The server broke the protocol (an unexpected message or a malformed archive).
    Protocol,
    /// A socket or file operation failed.
    Io,
    /// Nothing arrived in time.
    Timeout,
    /// TLS failed.
    Tls,
    /// Authentication failed.
    Auth,
    /// A configuration value is invalid.
    Config,
    /// The server is too old for the requested option.
    Unsupported,
    /// The caller used the API wrongly (bad option, non-empty target directory…).
    Usage,
    /// A checksum or size did not match, or a file is missing or unexpected; names the file.
    Verify,
    /// The archive holds a hostile entry (absolute path, `..`, escaping link…); names it.
    Unsafe,
    /// The destination failed: a [`BackupSink`](crate::BackupSink) or
    /// [`AsyncBackupSink`](crate::AsyncBackupSink) reported an error of its own
    /// ([`Error::sink`]), or the writer thread stopped unexpectedly.
    Sink,
    /// The backup was stopped by its caller before it ended (the future of
    /// [`BaseBackup::receive`](crate::BaseBackup::receive) was dropped or its task
    /// aborted). Only a sink's `abort` sees this reason.
    Cancelled,
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
            ErrorKind::Verify => "verification failed",
            ErrorKind::Unsafe => "unsafe archive entry",
            ErrorKind::Sink => "destination error",
            ErrorKind::Cancelled => "cancelled",
        })
    }
}

/// The error type of this crate: opaque, with a [`kind`](Error::kind), the file or entry it
/// concerns (if any), the server's error fields (if the server sent one), whether trying
/// again may help, and advice on what to do.
///
/// Errors are classified when they are made, never by their text. `Clone` is cheap
/// enough for the error path (a sink's `abort` gets a copy of the reason).
///
/// Where error types meet: a [`pgwire_repl::Error`] converts into this one (`?` works),
/// keeping its kind, the server's fields, its advice and whether it is retryable, and
/// stays reachable as [`connection_error`](Error::connection_error) and as the
/// [`source`](std::error::Error::source). An application's own error type takes this one
/// with a `From<basebackup::Error>` of its own; `Box<dyn Error + Send + Sync>` and the
/// like take it as it is.
///
/// ```
/// use basebackup::{Error, ErrorKind};
/// let err = Error::verify("base/5/1259", "CRC32C checksum mismatch");
/// assert_eq!(err.kind(), ErrorKind::Verify);
/// assert_eq!(err.path(), Some("base/5/1259"));
/// assert!(err.to_string().contains("base/5/1259"));
/// assert!(!err.is_retryable());
///
/// fn parse(conninfo: &str) -> basebackup::Result<pgwire_repl::Config> {
///     Ok(pgwire_repl::Config::parse(conninfo)?)
/// }
/// let err = parse("port=notanumber").unwrap_err();
/// assert_eq!(err.kind(), ErrorKind::Config);
/// let original = err.connection_error().unwrap();
/// assert_eq!(original.kind(), pgwire_repl::ErrorKind::Config);
/// let source = std::error::Error::source(&err).unwrap();
/// assert!(source.downcast_ref::<pgwire_repl::Error>().is_some());
/// let boxed: Box<dyn std::error::Error + Send + Sync> = err.into();
/// assert!(boxed.to_string().contains("notanumber"));
/// ```
#[derive(Clone)]
pub struct Error(Box<Inner>);

#[derive(Clone)]
struct Inner {
    kind: ErrorKind,
    message: String,
    path: Option<String>,
    advice: Option<String>,
    source: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
    db: Option<DbError>,
    retryable: bool,
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    fn new(kind: ErrorKind, message: String, path: Option<String>, advice: Option<&str>) -> Error {
        Error(Box::new(Inner {
            kind,
            message,
            path,
            advice: advice.map(str::to_owned),
            source: None,
            db: None,
            retryable: false,
        }))
    }

    /// A verification failure concerning `path` (as named in the manifest).
    pub fn verify(path: impl Into<String>, what: impl fmt::Display) -> Error {
        let path = path.into();
        Error::new(
            ErrorKind::Verify,
            format!("{path}: {what}"),
            Some(path),
            Some("the backup is damaged or incomplete; do not use it — take a new backup, and check the network, the disks and the server log if it happens again"),
        )
    }

    /// A hostile or unsupported archive entry `entry`.
    pub fn unsafe_entry(entry: impl Into<String>, why: impl fmt::Display) -> Error {
        let entry = entry.into();
        Error::new(
            ErrorKind::Unsafe,
            format!("refusing archive entry {entry:?}: {why}"),
            Some(entry),
            Some("the server (or something between us and it) sent an archive entry that would write outside the backup; make sure you are talking to a genuine PostgreSQL server"),
        )
    }

    /// The server sent something that is not a valid base-backup stream.
    pub fn protocol(message: impl Into<String>) -> Error {
        Error::new(
            ErrorKind::Protocol,
            message.into(),
            None,
            Some("the server sent an invalid base-backup stream; check that the address points at PostgreSQL 13-18 and not at a proxy"),
        )
    }

    /// Caller misuse, with advice.
    pub fn usage(message: impl Into<String>, advice: impl Into<String>) -> Error {
        let mut e = Error::new(ErrorKind::Usage, message.into(), None, None);
        e.0.advice = Some(advice.into());
        e
    }

    /// An option that needs a newer server.
    pub fn unsupported(what: &str, required_major: u32, server_major: u32) -> Error {
        Error::new(
            ErrorKind::Unsupported,
            format!("{what} needs PostgreSQL {required_major} or later, but the server is PostgreSQL {server_major}"),
            None,
            Some("leave the option out for this server (for compression, compress on the client side instead)"),
        )
    }

    /// An I/O error while doing `context` on `path`.
    pub fn io(context: impl fmt::Display, path: &std::path::Path, err: std::io::Error) -> Error {
        let advice = match err.kind() {
            std::io::ErrorKind::PermissionDenied => {
                "check the permissions of the target directory and the user this runs as"
            }
            std::io::ErrorKind::NotFound => "check that the parent directory exists",
            _ if err.raw_os_error() == Some(libc::ENOSPC) => {
                "the disk is full; free space or choose another target"
            }
            _ => "check the target file system",
        };
        let mut e = Error::new(
            ErrorKind::Io,
            format!("{context} {}: {err}", path.display()),
            Some(path.display().to_string()),
            Some(advice),
        );
        e.0.source = Some(Arc::new(err));
        e
    }

    /// A failure of a [`BackupSink`](crate::BackupSink) or
    /// [`AsyncBackupSink`](crate::AsyncBackupSink) of its own (an object store that
    /// refused a write, a full remote disk…): `message` says what failed and why,
    /// `advice` what to do. Not retryable unless marked with
    /// [`retryable`](Error::retryable); attach the underlying error with
    /// [`with_source`](Error::with_source).
    ///
    /// ```
    /// use basebackup::{Error, ErrorKind};
    /// let io = std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in 30 s");
    /// let err = Error::sink(
    ///     "uploading base.tar to s3://backups/2026-11-26/",
    ///     "check the object store's availability, then take the backup again",
    /// )
    /// .with_source(io)
    /// .retryable(true);
    /// assert_eq!(err.kind(), ErrorKind::Sink);
    /// assert!(err.is_retryable());
    /// assert!(std::error::Error::source(&err).is_some());
    /// ```
    pub fn sink(message: impl Into<String>, advice: impl Into<String>) -> Error {
        Error::usage(message, advice).with_kind(ErrorKind::Sink)
    }

    /// Attaches the underlying cause (returned by [`std::error::Error::source`]).
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Error {
        self.0.source = Some(Arc::new(source));
        self
    }

    /// Marks whether taking the backup again, unchanged, may succeed (see
    /// [`is_retryable`](Error::is_retryable)); for a sink that knows its failure is
    /// transient (a timeout, HTTP 503) or permanent.
    pub fn retryable(mut self, retryable: bool) -> Error {
        self.0.retryable = retryable;
        self
    }

    fn with_kind(mut self, kind: ErrorKind) -> Error {
        self.0.kind = kind;
        self
    }

    /// The backup stopped because its caller dropped the receiving future (the reason a
    /// sink's `abort` gets then).
    pub(crate) fn cancelled() -> Error {
        Error::new(
            ErrorKind::Cancelled,
            "the backup was cancelled before it ended (the receiving future was dropped or its task aborted)".into(),
            None,
            Some("nothing to do unless this was not meant to happen; what the backup wrote is removed unless the sink keeps it on failure"),
        )
    }

    /// The writer thread panicked (a bug in a sink or in this crate).
    pub(crate) fn writer_panicked(err: impl fmt::Display) -> Error {
        Error::new(
            ErrorKind::Sink,
            format!("the backup's writer thread panicked: {err}"),
            None,
            Some("this is a bug in the sink or in the basebackup crate; report it with this message. The target may hold partial files"),
        )
    }

    /// The kind of error.
    pub fn kind(&self) -> ErrorKind {
        self.0.kind
    }

    /// The file or archive entry concerned, when there is one.
    pub fn path(&self) -> Option<&str> {
        self.0.path.as_deref()
    }

    /// The SQLSTATE when the server sent an error (e.g. `XX001` for page checksum failures).
    pub fn sqlstate(&self) -> Option<&str> {
        self.0.db.as_ref().map(|db| db.code.as_str())
    }

    /// The server's error (severity, SQLSTATE, message, detail, hint) when the server
    /// sent an `ErrorResponse`.
    ///
    /// ```
    /// use pgwire_repl::DbError;
    /// let db = DbError {
    ///     severity: "ERROR".into(),
    ///     code: "XX001".into(),
    ///     message: "checksum verification failure during base backup".into(),
    ///     hint: Some("see the server log".into()),
    ///     ..DbError::default()
    /// };
    /// let err: basebackup::Error = pgwire_repl::Error::server("BASE_BACKUP failed", db).into();
    /// assert_eq!(err.kind(), basebackup::ErrorKind::Server);
    /// let db = err.db_error().unwrap();
    /// assert_eq!((db.code.as_str(), db.hint.as_deref()), ("XX001", Some("see the server log")));
    /// assert_eq!(err.sqlstate(), Some("XX001"));
    /// ```
    pub fn db_error(&self) -> Option<&DbError> {
        self.0.db.as_ref()
    }

    /// The connection-layer error this one was made from (a lost connection, a server
    /// error, a refused login…), when there is one.
    pub fn connection_error(&self) -> Option<&pgwire_repl::Error> {
        self.0
            .source
            .as_deref()
            .and_then(|source| source.downcast_ref::<pgwire_repl::Error>())
    }

    /// True when taking the backup again, unchanged, may succeed: the connection was
    /// lost, refused or timed out, or the server is shutting down, starting up or has too
    /// many connections (SQLSTATE 57P01, 57P02, 57P03, 53300), or a sink marked its error
    /// so. False for everything that would fail the same way again or needs a person:
    /// other server errors, protocol violations, verification failures, hostile entries,
    /// local file errors, bad options.
    ///
    /// ```
    /// let err = basebackup::Error::verify("base/1/1259", "size 8192, manifest says 16384");
    /// assert!(!err.is_retryable());
    /// let lost: basebackup::Error = pgwire_repl::Error::closed("reading from host=db1").into();
    /// assert!(lost.is_retryable());
    /// ```
    pub fn is_retryable(&self) -> bool {
        self.0.retryable
    }

    /// What to do about it.
    pub fn advice(&self) -> Option<&str> {
        self.0.advice.as_deref()
    }

    /// The message without the advice.
    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// Replaces the advice line (where the caller knows the situation better).
    pub(crate) fn with_advice(mut self, advice: impl Into<String>) -> Error {
        self.0.advice = Some(advice.into());
        self
    }

    /// Prefixes the message with `context`.
    pub(crate) fn context(mut self, context: impl fmt::Display) -> Error {
        self.0.message = format!("{context}: {}", self.0.message);
        self
    }
}

impl From<pgwire_repl::Error> for Error {
    fn from(err: pgwire_repl::Error) -> Error {
        use pgwire_repl::ErrorKind as K;
        let kind = match err.kind() {
            K::Server => ErrorKind::Server,
            K::Protocol => ErrorKind::Protocol,
            K::Io => ErrorKind::Io,
            K::Timeout => ErrorKind::Timeout,
            K::Tls => ErrorKind::Tls,
            K::Auth => ErrorKind::Auth,
            K::Config => ErrorKind::Config,
            K::Unsupported => ErrorKind::Unsupported,
            _ => ErrorKind::Usage,
        };
        let message = match err.db_error() {
            Some(db) => format!("{}: {db}", err.message()),
            None => err.message().to_owned(),
        };
        let retryable = match kind {
            // Connection-level I/O: refused, reset, closed by the server.
            ErrorKind::Io | ErrorKind::Timeout => true,
            // admin_shutdown, crash_shutdown, cannot_connect_now, too_many_connections
            // (the same list as walstream's).
            ErrorKind::Server => {
                matches!(err.sqlstate(), Some("57P01" | "57P02" | "57P03" | "53300"))
            }
            _ => false,
        };
        let mut e = Error::new(kind, message, None, None);
        e.0.advice = err.advice().map(str::to_owned);
        e.0.db = err.db_error().cloned();
        e.0.retryable = retryable;
        e.0.source = Some(Arc::new(err));
        e
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.0.kind)
            .field("message", &self.0.message)
            .field("path", &self.0.path)
            .field("db", &self.0.db)
            .field("retryable", &self.0.retryable)
            .finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.message)?;
        if let Some(advice) = &self.0.advice {
            write!(f, "\n  what to do: {advice}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0
            .source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}
