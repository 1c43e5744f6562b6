//! The start-up and authentication exchange, without I/O.
//!
//! Once the transport is open (and TLS, if any, is up), the client sends a startup
//! packet and the server answers with authentication requests, then ParameterStatus,
//! BackendKeyData and ReadyForQuery. [`Startup`] is that exchange as a state machine:
//! feed it each [`BackendMessage`] with [`Startup::handle`] and do what the returned
//! [`StartupStep`] says (send bytes, deliver a notice, read on), until it returns
//! [`StartupStep::Ready`] with the [`Session`]. It reads no socket, no file and no
//! clock, so it can be driven from byte fixtures, property tests and fuzzers; the tokio
//! layer in [`crate::connection`] drives it over a real connection.
//!
//! ```
//! use pgwire_repl::config::ChannelBinding;
//! use pgwire_repl::proto::auth::{AuthMethod, AuthSettings, Authenticator};
//! use pgwire_repl::proto::backend::{AuthRequest, BackendMessage};
//! use pgwire_repl::proto::startup::{Startup, StartupStep};
//!
//! let auth = Authenticator::new(AuthSettings {
//!     user: "repl".into(),
//!     password: Some("secret".into()),
//!     channel_binding: ChannelBinding::Prefer,
//!     tls_in_use: false,
//!     server_cert_hash: None,
//!     target: "host=db1 port=5432".into(),
//! });
//! let mut startup = Startup::new(auth, "host=db1 port=5432", "repl");
//!
//! // The server asks for an MD5 password: the machine answers.
//! let step = startup
//!     .handle(BackendMessage::Authentication(AuthRequest::Md5Password { salt: [1, 2, 3, 4] }))
//!     .unwrap();
//! assert!(matches!(step, StartupStep::Send(ref bytes) if bytes[0] == b'p'));
//! startup.handle(BackendMessage::Authentication(AuthRequest::Ok)).unwrap();
//! startup
//!     .handle(BackendMessage::ParameterStatus {
//!         name: "server_version".into(),
//!         value: "16.4".into(),
//!     })
//!     .unwrap();
//! match startup.handle(BackendMessage::ReadyForQuery { status: b'I' }).unwrap() {
//!     StartupStep::Ready(session) => {
//!         assert_eq!(session.server_major, 16);
//!         assert_eq!(session.auth_method, AuthMethod::Md5);
//!     }
//!     other => panic!("{other:?}"),
//! }
//! ```

use std::collections::HashMap;

use bytes::BytesMut;

use crate::error::{Error, Notice, Result};
use crate::proto::auth::{AuthMethod, Authenticator};
use crate::proto::backend::BackendMessage;

/// What the driver of a [`Startup`] does next.
#[derive(Debug)]
#[non_exhaustive]
pub enum StartupStep {
    /// Send these bytes to the server (a password or a SCRAM message), then read on.
    Send(BytesMut),
    /// Deliver this notice (the server sent a NoticeResponse), then read on.
    Notice(Notice),
    /// Read the next message.
    Continue,
    /// The server is ready for queries: the session is established.
    Ready(Session),
}

/// What the server told the client during start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Session {
    /// Every ParameterStatus received (`server_version`, `in_hot_standby`, …).
    pub parameters: HashMap<String, String>,
    /// The backend's process ID, from BackendKeyData (0 if none was sent).
    pub process_id: i32,
    /// The server's major version, from `server_version`.
    pub server_major: u32,
    /// How the client authenticated.
    pub auth_method: AuthMethod,
}

/// The start-up exchange as a state machine; see the [module documentation](self).
pub struct Startup {
    auth: Authenticator,
    target: String,
    user: String,
    parameters: HashMap<String, String>,
    process_id: i32,
    finished: bool,
}

impl std::fmt::Debug for Startup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Startup")
            .field("target", &self.target)
            .field("user", &self.user)
            .field("auth_method", &self.auth.method())
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl Startup {
    /// Starts the exchange after the startup packet was sent: `auth` answers the
    /// authentication requests, `target` (`host=… port=…`) and `user` name the server
    /// and the role in messages.
    pub fn new(auth: Authenticator, target: impl Into<String>, user: impl Into<String>) -> Startup {
        Startup {
            auth,
            target: target.into(),
            user: user.into(),
            parameters: HashMap::new(),
            process_id: 0,
            finished: false,
        }
    }

    /// The authentication method used so far ([`AuthMethod::None`] until the server
    /// asks for one).
    pub fn auth_method(&self) -> AuthMethod {
        self.auth.method()
    }

    /// Handles one message from the server.
    ///
    /// Errors: the server's ErrorResponse (kind [`crate::ErrorKind::Server`], with its
    /// SQLSTATE), a refused authentication request (`require_auth`,
    /// `channel_binding`, a missing password: [`crate::ErrorKind::Auth`]), a message
    /// that has no place in start-up or a `server_version` that is not PostgreSQL's
    /// ([`crate::ErrorKind::Protocol`]), and a server older than PostgreSQL 10 or built
    /// with `integer_datetimes=off` ([`crate::ErrorKind::Unsupported`]). After an error
    /// or [`StartupStep::Ready`], the exchange is over and further messages are a
    /// [`crate::ErrorKind::Usage`] error.
    pub fn handle(&mut self, message: BackendMessage) -> Result<StartupStep> {
        if self.finished {
            return Err(Error::usage(
                format!("the start-up exchange with {} is already over", self.target),
                "read further messages through the Connection",
            ));
        }
        let result = self.step(message);
        if !matches!(
            result,
            Ok(StartupStep::Send(_) | StartupStep::Notice(_) | StartupStep::Continue)
        ) {
            self.finished = true;
        }
        result
    }

    fn step(&mut self, message: BackendMessage) -> Result<StartupStep> {
        match message {
            BackendMessage::Authentication(request) => Ok(match self.auth.respond(request)? {
                Some(reply) => StartupStep::Send(reply),
                None => StartupStep::Continue,
            }),
            BackendMessage::ErrorResponse(db) => {
                let context = if self.auth.method() == AuthMethod::None {
                    format!("connecting to {} as {}", self.target, self.user)
                } else {
                    format!("authenticating to {} as {}", self.target, self.user)
                };
                Err(Error::server(context, db))
            }
            BackendMessage::NoticeResponse(notice) => Ok(StartupStep::Notice(notice)),
            BackendMessage::ParameterStatus { name, value } => {
                self.parameters.insert(name, value);
                Ok(StartupStep::Continue)
            }
            BackendMessage::BackendKeyData { process_id, .. } => {
                self.process_id = process_id;
                Ok(StartupStep::Continue)
            }
            BackendMessage::NegotiateProtocolVersion {
                newest_minor,
                unrecognized_options,
            } => {
                tracing::debug!(
                    newest_minor,
                    ?unrecognized_options,
                    "server negotiated the protocol version down"
                );
                Ok(StartupStep::Continue)
            }
            BackendMessage::ReadyForQuery { .. } => self.ready().map(StartupStep::Ready),
            other => Err(Error::protocol(format!(
                "{} sent {} during connection start-up",
                self.target,
                other.name()
            ))),
        }
    }

    fn ready(&mut self) -> Result<Session> {
        self.auth.finish()?;
        let version = self
            .parameters
            .get("server_version")
            .cloned()
            .unwrap_or_default();
        let server_major = parse_server_major(&version).ok_or_else(|| {
            Error::protocol(format!(
                "{} reported server_version {version:?}, which is not a PostgreSQL version",
                self.target
            ))
        })?;
        if server_major < 10 {
            return Err(Error::unsupported("this client", 13, server_major));
        }
        if self.parameters.get("integer_datetimes").map(String::as_str) == Some("off") {
            return Err(Error::unsupported(
                "a server built with integer_datetimes=off",
                13,
                server_major,
            ));
        }
        Ok(Session {
            parameters: std::mem::take(&mut self.parameters),
            process_id: self.process_id,
            server_major,
            auth_method: self.auth.method(),
        })
    }
}

/// Takes the major version from `server_version` (`15.18 (Debian …)`, `17beta1`, `18devel`).
///
/// ```
/// use pgwire_repl::proto::startup::parse_server_major;
/// assert_eq!(parse_server_major("15.18 (Debian 15.18-0+deb12u1)"), Some(15));
/// assert_eq!(parse_server_major("18devel"), Some(18));
/// assert_eq!(parse_server_major("unknown"), None);
/// ```
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
    use crate::config::{ChannelBinding, RequireAuth};
    use crate::error::{DbError, ErrorKind};
    use crate::proto::auth::AuthSettings;
    use crate::proto::backend::{self, AuthRequest, DecodeLimits};
    use proptest::prelude::*;

    fn startup(password: Option<&str>) -> Startup {
        let auth = Authenticator::new(AuthSettings {
            user: "repl".into(),
            password: password.map(str::to_string),
            channel_binding: ChannelBinding::Prefer,
            tls_in_use: false,
            server_cert_hash: None,
            target: "host=db1 port=5432".into(),
        });
        Startup::new(auth, "host=db1 port=5432", "repl")
    }

    fn parameter(name: &str, value: &str) -> BackendMessage {
        BackendMessage::ParameterStatus {
            name: name.into(),
            value: value.into(),
        }
    }

    fn ready() -> BackendMessage {
        BackendMessage::ReadyForQuery { status: b'I' }
    }

    #[test]
    fn trust_login_reports_the_session() {
        let mut s = startup(None);
        assert!(matches!(
            s.handle(BackendMessage::Authentication(AuthRequest::Ok))
                .unwrap(),
            StartupStep::Continue
        ));
        s.handle(parameter("server_version", "13.23")).unwrap();
        s.handle(parameter("in_hot_standby", "off")).unwrap();
        s.handle(BackendMessage::BackendKeyData {
            process_id: 4242,
            secret_key: bytes::Bytes::from_static(&[1, 2, 3, 4]),
        })
        .unwrap();
        let notice = DbError {
            severity: "NOTICE".into(),
            message: "hello".into(),
            ..DbError::default()
        };
        match s.handle(BackendMessage::NoticeResponse(notice.clone())) {
            Ok(StartupStep::Notice(got)) => assert_eq!(got, notice),
            other => panic!("{other:?}"),
        }
        let StartupStep::Ready(session) = s.handle(ready()).unwrap() else {
            panic!("not ready")
        };
        assert_eq!(session.server_major, 13);
        assert_eq!(session.process_id, 4242);
        assert_eq!(session.auth_method, AuthMethod::None);
        assert_eq!(
            session.parameters.get("in_hot_standby").map(String::as_str),
            Some("off")
        );
        // The exchange is over.
        let err = s.handle(ready()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Usage);
    }

    #[test]
    fn server_errors_keep_their_fields_and_say_which_phase() {
        let db = DbError {
            severity: "FATAL".into(),
            code: "28P01".into(),
            message: "password authentication failed for user \"repl\"".into(),
            detail: Some("d".into()),
            hint: Some("h".into()),
            ..DbError::default()
        };
        let mut before = startup(Some("pw"));
        let err = before
            .handle(BackendMessage::ErrorResponse(db.clone()))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Server);
        assert_eq!(err.db_error(), Some(&db));
        assert!(err.message().starts_with("connecting to"), "{err}");

        let mut during = startup(Some("pw"));
        during
            .handle(BackendMessage::Authentication(
                AuthRequest::CleartextPassword,
            ))
            .unwrap();
        let err = during
            .handle(BackendMessage::ErrorResponse(db.clone()))
            .unwrap_err();
        assert!(err.message().starts_with("authenticating to"), "{err}");
        assert_eq!(err.sqlstate(), Some("28P01"));
    }

    #[test]
    fn refusals_and_bad_servers() {
        // A missing password is the client's refusal.
        let mut s = startup(None);
        let err = s
            .handle(BackendMessage::Authentication(
                AuthRequest::CleartextPassword,
            ))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Auth, "{err}");

        // require_auth refuses before anything is sent.
        let auth = Authenticator::new(AuthSettings {
            user: "repl".into(),
            password: Some("pw".into()),
            channel_binding: ChannelBinding::Prefer,
            tls_in_use: false,
            server_cert_hash: None,
            target: "t".into(),
        })
        .with_require_auth(Some(RequireAuth::parse("scram-sha-256").unwrap()));
        let mut s = Startup::new(auth, "t", "repl");
        let err = s
            .handle(BackendMessage::Authentication(AuthRequest::Md5Password {
                salt: [0; 4],
            }))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Auth, "{err}");

        for (version, kind) in [
            ("", ErrorKind::Protocol),
            ("banana", ErrorKind::Protocol),
            ("9.6.24", ErrorKind::Unsupported),
        ] {
            let mut s = startup(None);
            s.handle(BackendMessage::Authentication(AuthRequest::Ok))
                .unwrap();
            if !version.is_empty() {
                s.handle(parameter("server_version", version)).unwrap();
            }
            let err = s.handle(ready()).unwrap_err();
            assert_eq!(err.kind(), kind, "{version:?}: {err}");
        }
        let mut s = startup(None);
        s.handle(parameter("server_version", "15.1")).unwrap();
        s.handle(parameter("integer_datetimes", "off")).unwrap();
        assert_eq!(
            s.handle(ready()).unwrap_err().kind(),
            ErrorKind::Unsupported
        );

        let mut s = startup(None);
        let err = s.handle(BackendMessage::CopyDone).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Protocol);
        assert!(err.message().contains("CopyDone"), "{err}");
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

    proptest! {
        /// Whatever a server sends during start-up, the machine answers with a step or
        /// an error, never a panic, and refuses everything after its first error.
        #[test]
        fn arbitrary_server_messages_never_panic(
            frames in proptest::collection::vec(
                (
                    proptest::sample::select(b"RSKZENvdcTDCIW".to_vec()),
                    proptest::collection::vec(any::<u8>(), 0..40),
                ),
                0..12,
            ),
        ) {
            // Well-framed messages with arbitrary bodies: most decode, so the machine
            // sees every kind of message in every order.
            let mut buf = BytesMut::new();
            for (tag, body) in &frames {
                buf.extend_from_slice(&[*tag]);
                buf.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
                buf.extend_from_slice(body);
            }
            let mut s = startup(Some("pw"));
            let mut over = false;
            while let Ok(Some(message)) = backend::decode(&mut buf, &DecodeLimits::default()) {
                let result = s.handle(message);
                if over {
                    prop_assert!(result.is_err());
                }
                if !matches!(result, Ok(StartupStep::Send(_) | StartupStep::Notice(_) | StartupStep::Continue)) {
                    over = true;
                }
            }
        }
    }
}
