//! The crate's one error type.
//!
//! [`Error`] is opaque (a boxed inner value, cheap to move) and is queried through
//! [`Error::kind`], [`Error::db_error`], [`Error::is_retryable`] and friends, in the
//! style of tokio-postgres. Every error carries an advice line saying what to do next;
//! `Display` prints it.
//!
//! The same [`ErrorKind`]s mean the same thing in `walstream` and `basebackup`, whose
//! errors keep this one (with its SQLSTATE, detail and hint) when a connection fails.
//! Errors are classified by where they arose and by SQLSTATE, never by message text.

use std::fmt;

/// What went wrong, at the level a caller can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The server sent an `ErrorResponse`; see [`Error::db_error`].
    Server,
    /// The peer broke the protocol: an unexpected, malformed or oversized message.
    Protocol,
    /// A socket or file operation failed, or the connection closed unexpectedly.
    Io,
    /// An operation did not finish within its configured time.
    Timeout,
    /// The TLS handshake or TLS configuration failed.
    Tls,
    /// Authentication failed on the client side (a missing password, a refused
    /// method, a bad server signature). Server-side rejections are [`ErrorKind::Server`]
    /// with SQLSTATE class 28.
    Auth,
    /// The connection string, an environment variable or a referenced file is invalid.
    Config,
    /// The server is too old (or too new) for the requested operation.
    Unsupported,
    /// The caller used the API wrongly.
    Usage,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            ErrorKind::Server => "server error",
            ErrorKind::Protocol => "protocol violation",
            ErrorKind::Io => "I/O error",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Tls => "TLS error",
            ErrorKind::Auth => "authentication error",
            ErrorKind::Config => "configuration error",
            ErrorKind::Unsupported => "unsupported by this server",
            ErrorKind::Usage => "usage error",
        };
        f.write_str(name)
    }
}

/// The fields of a server `ErrorResponse` or `NoticeResponse`.
///
/// Unknown field codes are ignored, as the protocol asks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DbError {
    /// Non-localized severity (`ERROR`, `FATAL`, `PANIC`, `WARNING`, `NOTICE`, …).
    pub severity: String,
    /// The five-character SQLSTATE code, for example `28P01`.
    pub code: String,
    /// The primary message.
    pub message: String,
    /// Optional detail.
    pub detail: Option<String>,
    /// Optional hint from the server.
    pub hint: Option<String>,
    /// Optional context (`W` field).
    pub context: Option<String>,
    /// Source file, line and routine in the server, when sent.
    pub source_location: Option<String>,
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} (SQLSTATE {})",
            self.severity, self.message, self.code
        )?;
        if let Some(detail) = &self.detail {
            write!(f, "; detail: {detail}")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "; server hint: {hint}")?;
        }
        Ok(())
    }
}

/// A notice (`NoticeResponse`) from the server. Same fields as an error.
pub type Notice = DbError;

/// The error type of this crate.
///
/// ```
/// use pgwire_repl::{Error, ErrorKind};
/// let err = Error::usage("slot names may only contain a-z, 0-9 and _", "choose another slot name");
/// assert_eq!(err.kind(), ErrorKind::Usage);
/// assert!(err.to_string().contains("choose another slot name"));
/// ```
pub struct Error(Box<Inner>);

struct Inner {
    kind: ErrorKind,
    message: String,
    advice: Option<String>,
    db: Option<DbError>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    /// Retryable although its kind usually is not (a TLS handshake cut by the transport).
    transient: bool,
    /// `db` is already part of `message` (an error summing up several hosts).
    db_in_message: bool,
}

impl Error {
    fn new(kind: ErrorKind, message: impl Into<String>, advice: Option<String>) -> Error {
        Error(Box::new(Inner {
            kind,
            message: message.into(),
            advice,
            db: None,
            source: None,
            transient: false,
            db_in_message: false,
        }))
    }

    /// A protocol violation by the peer: `message` says what was expected and what came.
    pub fn protocol(message: impl Into<String>) -> Error {
        Error::new(
            ErrorKind::Protocol,
            message,
            Some("the server (or something between us and it) sent bytes that are not valid PostgreSQL protocol; check that the address points at PostgreSQL 13-18 and not at a proxy or another service".into()),
        )
    }

    /// A configuration error, with advice on how to fix it.
    pub fn config(message: impl Into<String>, advice: impl Into<String>) -> Error {
        Error::new(ErrorKind::Config, message, Some(advice.into()))
    }

    /// A caller-misuse error, with advice.
    pub fn usage(message: impl Into<String>, advice: impl Into<String>) -> Error {
        Error::new(ErrorKind::Usage, message, Some(advice.into()))
    }

    /// An authentication error detected on the client side, with advice.
    pub fn auth(message: impl Into<String>, advice: impl Into<String>) -> Error {
        Error::new(ErrorKind::Auth, message, Some(advice.into()))
    }

    /// A TLS error, with advice.
    pub fn tls(message: impl Into<String>, advice: impl Into<String>) -> Error {
        Error::new(ErrorKind::Tls, message, Some(advice.into()))
    }

    /// A timeout, with advice.
    pub fn timeout(message: impl Into<String>, advice: impl Into<String>) -> Error {
        Error::new(ErrorKind::Timeout, message, Some(advice.into()))
    }

    /// An operation that needs at least PostgreSQL `required_major`.
    pub fn unsupported(what: &str, required_major: u32, server_major: u32) -> Error {
        Error::new(
            ErrorKind::Unsupported,
            format!("{what} needs PostgreSQL {required_major} or later, but the server is PostgreSQL {server_major}"),
            Some(format!("upgrade the server to PostgreSQL {required_major}+ or use an alternative that works on {server_major}")),
        )
    }

    /// An I/O error while doing `context`.
    pub fn io(context: impl Into<String>, err: std::io::Error) -> Error {
        let advice = match err.kind() {
            std::io::ErrorKind::ConnectionRefused => {
                "is the server running and accepting connections on that host and port? Check listen_addresses, port and any firewall"
            }
            std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe => {
                "the server closed the connection; its log says why (a crash, a restart, wal_sender_timeout or an administrator's pg_terminate_backend)"
            }
            std::io::ErrorKind::NotFound => "check that the path exists",
            std::io::ErrorKind::PermissionDenied => "check the file permissions and the user this runs as",
            _ => "check the network and the server log",
        };
        let mut error = Error::new(
            ErrorKind::Io,
            format!("{}: {}", context.into(), err),
            Some(advice.into()),
        );
        error.0.source = Some(Box::new(err));
        error
    }

    /// The connection closed when more data was expected, while doing `context`.
    pub fn closed(context: impl Into<String>) -> Error {
        Error::io(
            context,
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ),
        )
    }

    /// A server `ErrorResponse` received while doing `context`.
    pub fn server(context: impl Into<String>, db: DbError) -> Error {
        let advice = advice_for_server_error(&db);
        let mut error = Error::new(ErrorKind::Server, context, advice);
        error.0.db = Some(db);
        error
    }

    /// Attaches an underlying cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Error {
        self.0.source = Some(Box::new(source));
        self
    }

    /// Replaces the advice line (used where the caller knows the situation better).
    pub fn with_advice(mut self, advice: impl Into<String>) -> Error {
        self.0.advice = Some(advice.into());
        self
    }

    /// An error of `kind` built from parts (used to report the failures of several
    /// hosts as one error).
    pub(crate) fn from_parts(kind: ErrorKind, message: String, advice: Option<String>) -> Error {
        Error::new(kind, message, advice)
    }

    /// Takes the server fields and retryability of `decisive`, whose text `self`'s
    /// message already includes (an error summing up several hosts keeps the SQLSTATE,
    /// detail and hint of the failure that decided it).
    pub(crate) fn with_db_of(mut self, decisive: &Error) -> Error {
        self.0.db = decisive.0.db.clone();
        self.0.db_in_message = self.0.db.is_some();
        self.0.transient = decisive.0.transient;
        self
    }

    /// Marks a failure as retryable although its kind usually is not.
    pub(crate) fn retryable(mut self) -> Error {
        self.0.transient = true;
        self
    }

    /// The kind of error.
    pub fn kind(&self) -> ErrorKind {
        self.0.kind
    }

    /// The server's error fields, when the server sent an `ErrorResponse`.
    pub fn db_error(&self) -> Option<&DbError> {
        self.0.db.as_ref()
    }

    /// The SQLSTATE, when the server sent an `ErrorResponse`.
    pub fn sqlstate(&self) -> Option<&str> {
        self.0.db.as_ref().map(|db| db.code.as_str())
    }

    /// What to do about it.
    pub fn advice(&self) -> Option<&str> {
        self.0.advice.as_deref()
    }

    /// The message without the advice line.
    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// True when trying again, on a new connection and without changing anything, may
    /// succeed: the connection failed or was lost ([`ErrorKind::Io`]), something timed
    /// out ([`ErrorKind::Timeout`]), a TLS handshake was cut off by the transport before
    /// any TLS verdict, or the server said it is shutting down, starting up or full
    /// (SQLSTATE 57P01, 57P02, 57P03 or 53300; see [`is_retryable_sqlstate`]).
    ///
    /// Everything else needs a change first: a server error about the request (a
    /// missing slot, a refused password), a refused certificate, an authentication
    /// requirement, a protocol violation, a bad configuration, misuse.
    /// `walstream::Error::is_retryable` applies this same rule to connection errors.
    ///
    /// ```
    /// use pgwire_repl::Error;
    /// let lost = Error::closed("reading from host=db1 port=5432");
    /// assert!(lost.is_retryable());
    /// let misuse = Error::usage("slot name too long", "use at most 63 characters");
    /// assert!(!misuse.is_retryable());
    /// ```
    pub fn is_retryable(&self) -> bool {
        match self.0.kind {
            ErrorKind::Io | ErrorKind::Timeout => true,
            ErrorKind::Server => self.sqlstate().is_some_and(is_retryable_sqlstate),
            _ => self.0.transient,
        }
    }

    /// True for errors that mean the connection can no longer be used.
    pub fn is_fatal(&self) -> bool {
        match self.0.kind {
            ErrorKind::Server => self
                .0
                .db
                .as_ref()
                .is_some_and(|db| db.severity == "FATAL" || db.severity == "PANIC"),
            ErrorKind::Usage | ErrorKind::Unsupported | ErrorKind::Config => false,
            _ => true,
        }
    }
}

/// Whether a server error with this SQLSTATE is about the server's state rather than
/// the request, so that a new connection may succeed later: `57P01` (admin_shutdown,
/// also `pg_terminate_backend`), `57P02` (crash_shutdown), `57P03` (cannot_connect_now:
/// starting up, shutting down, in recovery without hot standby) and `53300`
/// (too_many_connections, also `max_wal_senders` reached).
///
/// ```
/// use pgwire_repl::error::is_retryable_sqlstate;
/// assert!(is_retryable_sqlstate("57P03"));
/// assert!(!is_retryable_sqlstate("42704")); // undefined_object: a missing slot
/// ```
pub fn is_retryable_sqlstate(code: &str) -> bool {
    matches!(code, "57P01" | "57P02" | "57P03" | "53300")
}

/// Advice for well-known server errors: the exact line or statement that fixes them.
///
/// This is the one place that reads a server message's text, and only to word the
/// advice (the `pg_hba.conf` line to add names the host and user the server printed).
/// It never decides a kind or retryability: a server whose messages are translated
/// (`lc_messages`) gets the generic advice of the SQLSTATE instead.
fn advice_for_server_error(db: &DbError) -> Option<String> {
    let msg = db.message.as_str();
    if db.code == "28000" && msg.contains("no pg_hba.conf entry") {
        let user = between(msg, "user \"", "\"").unwrap_or("<user>");
        let host = between(msg, "host \"", "\"");
        // 14+ say "no encryption", 13 says "SSL off".
        let ssl = if msg.contains("no encryption") || msg.contains("SSL off") {
            "host"
        } else {
            "hostssl"
        };
        let line = match host {
            Some(addr) if msg.contains("replication connection") => {
                let mask = if addr.contains(':') { "/128" } else { "/32" };
                format!("{ssl}  replication  {user}  {addr}{mask}  scram-sha-256")
            }
            Some(addr) => {
                let db_name = between(msg, "database \"", "\"").unwrap_or("all");
                let mask = if addr.contains(':') { "/128" } else { "/32" };
                format!("{ssl}  {db_name}  {user}  {addr}{mask}  scram-sha-256")
            }
            None if msg.contains("replication connection") => {
                format!("local  replication  {user}  scram-sha-256")
            }
            None => format!("local  all  {user}  scram-sha-256"),
        };
        return Some(format!(
            "add this line to the server's pg_hba.conf (a physical replication connection only matches the keyword `replication`, not `all`), then reload with `SELECT pg_reload_conf();`:\n    {line}"
        ));
    }
    let advice = match db.code.as_str() {
        "28P01" => "check the password (the `password` option, PGPASSWORD or ~/.pgpass) and that the role exists".to_string(),
        "28000" if msg.contains("certificate") => {
            "check sslcert/sslkey and that the certificate's CN matches the user name".to_string()
        }
        "28000" => "the server's pg_hba.conf rejected this connection; check its method for this user and address".to_string(),
        "42501" if msg.contains("replication") || msg.contains("WAL sender") => {
            let user = db
                .detail
                .as_deref()
                .and_then(|d| between(d, "role \"", "\""))
                .unwrap_or("<user>");
            format!("grant the role the REPLICATION attribute on the server: ALTER ROLE {user} REPLICATION;")
        }
        "53300" if msg.contains("max_wal_senders") => {
            "raise max_wal_senders in postgresql.conf (each base backup with streamed WAL needs 2) and restart the server, or stop other replication clients".to_string()
        }
        "53300" => "too many connections: raise max_connections or close other sessions".to_string(),
        "55000" if msg.contains("max_replication_slots") => {
            "set max_replication_slots > 0 (and wal_level = replica) in postgresql.conf and restart the server".to_string()
        }
        "42710" => "a replication slot with that name already exists: pick another name, reuse it, or drop it with DROP_REPLICATION_SLOT".to_string(),
        "42704" => "the replication slot does not exist: create it first (CREATE_REPLICATION_SLOT) or check its name".to_string(),
        "57P03" => "the server is starting up or shutting down; wait and try again".to_string(),
        "0A000" if msg.contains("cannot execute SQL commands in WAL sender") => {
            "this is a physical replication connection: only replication commands (upper case, e.g. IDENTIFY_SYSTEM) are allowed; use a SQL connection for SQL".to_string()
        }
        "58P01" if msg.contains("has already been removed") => {
            "the server recycled WAL this client needs: use a replication slot created before the backup/stream starts, or raise wal_keep_size".to_string()
        }
        _ => return None,
    };
    Some(advice)
}

fn between<'a>(haystack: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let from = haystack.find(start)? + start.len();
    let len = haystack[from..].find(end)?;
    Some(&haystack[from..from + len])
}

impl Error {
    /// What failed, with the server's fields or the cause, but without the advice line:
    /// one failure's own words, for an error that sums up several.
    pub(crate) fn without_advice(&self) -> String {
        let mut text = self.0.message.clone();
        if let Some(db) = self.0.db.as_ref().filter(|_| !self.0.db_in_message) {
            text.push_str(&format!(": {db}"));
        } else if let Some(source) = &self.0.source {
            // Io errors already include their source in the message.
            if self.0.kind != ErrorKind::Io {
                text.push_str(&format!(": {source}"));
            }
        }
        text
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.without_advice())?;
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
            .field("db", &self.0.db)
            .field("advice", &self.0.advice)
            .field("source", &self.0.source)
            .field("transient", &self.0.transient)
            .finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0
            .source
            .as_ref()
            .map(|s| s.as_ref() as &(dyn std::error::Error + 'static))
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn db(code: &str, message: &str) -> DbError {
        DbError {
            severity: "FATAL".into(),
            code: code.into(),
            message: message.into(),
            ..DbError::default()
        }
    }

    #[test]
    fn missing_hba_entry_gets_the_line_to_add() {
        let err = Error::server(
            "connecting",
            db(
                "28000",
                "no pg_hba.conf entry for replication connection from host \"10.1.2.3\", user \"repl\", no encryption",
            ),
        );
        let advice = err.advice().unwrap();
        assert!(
            advice.contains("host  replication  repl  10.1.2.3/32  scram-sha-256"),
            "{advice}"
        );
        assert!(err.is_fatal());
        let pg13 = Error::server(
            "connecting",
            db("28000", "no pg_hba.conf entry for replication connection from host \"::1\", user \"r\", SSL off"),
        );
        assert!(pg13
            .advice()
            .unwrap()
            .contains("host  replication  r  ::1/128  scram-sha-256"));
    }

    #[test]
    fn missing_replication_attribute_gets_alter_role() {
        let mut e = db("42501", "permission denied to start WAL sender");
        e.detail = Some(
            "Only roles with the REPLICATION attribute may start a WAL sender process.".into(),
        );
        let err = Error::server("connecting", e);
        assert!(err.advice().unwrap().contains("ALTER ROLE"));
    }

    #[test]
    fn display_includes_sqlstate_and_advice() {
        let err = Error::server(
            "authenticating",
            db("28P01", "password authentication failed for user \"x\""),
        );
        let text = err.to_string();
        assert!(text.contains("28P01"), "{text}");
        assert!(text.contains("what to do"), "{text}");
        assert_eq!(err.sqlstate(), Some("28P01"));
    }
}
