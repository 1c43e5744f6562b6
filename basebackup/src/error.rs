//! The crate's one error type.

use std::fmt;

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
        })
    }
}

/// The error type of this crate: opaque, with a [`kind`](Error::kind), the file or entry it
/// concerns (if any) and advice on what to do.
///
/// ```
/// use basebackup::{Error, ErrorKind};
/// let err = Error::verify("base/5/1259", "CRC32C checksum mismatch");
/// assert_eq!(err.kind(), ErrorKind::Verify);
/// assert_eq!(err.path(), Some("base/5/1259"));
/// assert!(err.to_string().contains("base/5/1259"));
/// ```
pub struct Error(Box<Inner>);

struct Inner {
    kind: ErrorKind,
    message: String,
    path: Option<String>,
    advice: Option<String>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    sqlstate: Option<String>,
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
            sqlstate: None,
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
        e.0.source = Some(Box::new(err));
        e
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
        self.0.sqlstate.as_deref()
    }

    /// What to do about it.
    pub fn advice(&self) -> Option<&str> {
        self.0.advice.as_deref()
    }

    /// The message without the advice.
    pub fn message(&self) -> &str {
        &self.0.message
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
        let mut e = Error::new(kind, message, None, None);
        e.0.advice = err.advice().map(str::to_owned);
        e.0.sqlstate = err.sqlstate().map(str::to_owned);
        e.0.source = Some(Box::new(err));
        e
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.0.kind)
            .field("message", &self.0.message)
            .field("path", &self.0.path)
            .field("sqlstate", &self.0.sqlstate)
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
