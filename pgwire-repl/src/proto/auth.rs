//! The client side of the authentication exchange, without I/O: fed the server's
//! authentication requests, it returns the bytes to send (cleartext, MD5, SCRAM-SHA-256
//! and SCRAM-SHA-256-PLUS with `tls-server-end-point` channel binding).
//!
//! ```
//! use pgwire_repl::config::ChannelBinding;
//! use pgwire_repl::proto::auth::{AuthMethod, AuthSettings, Authenticator};
//! use pgwire_repl::proto::backend::AuthRequest;
//!
//! let mut auth = Authenticator::new(AuthSettings {
//!     user: "repl".into(),
//!     password: Some("secret".into()),
//!     channel_binding: ChannelBinding::Prefer,
//!     tls_in_use: false,
//!     server_cert_hash: None,
//!     target: "db1".into(),
//! });
//! let reply = auth.respond(AuthRequest::Md5Password { salt: [1, 2, 3, 4] }).unwrap().unwrap();
//! assert_eq!(reply[0], b'p');
//! assert_eq!(auth.method(), AuthMethod::Md5);
//! ```

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{
    ChannelBinding as ScramBinding, ScramSha256, SCRAM_SHA_256, SCRAM_SHA_256_PLUS,
};

use crate::config::{ChannelBinding, RequireAuth};
use crate::error::{Error, Result};
use crate::proto::backend::AuthRequest;
use crate::proto::frontend;

/// How the client authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthMethod {
    /// No password was asked for (`trust`, `peer`, or `cert`).
    None,
    /// Clear-text password.
    Cleartext,
    /// MD5.
    Md5,
    /// SCRAM-SHA-256.
    ScramSha256,
    /// SCRAM-SHA-256-PLUS with `tls-server-end-point` channel binding.
    ScramSha256Plus,
}

/// The client side of the authentication exchange.
pub struct Authenticator {
    settings: AuthSettings,
    method: AuthMethod,
    scram: Option<ScramSha256>,
    /// libpq's `require_auth`, when given.
    require_auth: Option<RequireAuth>,
}

/// What the authentication exchange needs to know.
#[derive(Clone)]
pub struct AuthSettings {
    /// The role name sent in the startup packet.
    pub user: String,
    /// The password, if one is known (from the connection string, PGPASSWORD or the
    /// password file).
    pub password: Option<String>,
    /// libpq's `channel_binding`.
    pub channel_binding: ChannelBinding,
    /// Whether the connection uses TLS.
    pub tls_in_use: bool,
    /// The `tls-server-end-point` hash of the server certificate: `None` without TLS,
    /// `Some(None)` when the certificate's algorithm has no usable digest.
    pub server_cert_hash: Option<Option<Vec<u8>>>,
    /// The server, for messages.
    pub target: String,
}

impl std::fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthSettings")
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("channel_binding", &self.channel_binding)
            .field("tls_in_use", &self.tls_in_use)
            .field("target", &self.target)
            .finish()
    }
}

impl Authenticator {
    /// Starts an exchange.
    pub fn new(settings: AuthSettings) -> Authenticator {
        Authenticator {
            settings,
            method: AuthMethod::None,
            scram: None,
            require_auth: None,
        }
    }

    /// Enforces libpq's `require_auth`: every authentication request is checked against
    /// `policy` before it is answered (so a refused method never sees the password), and
    /// an AuthenticationOk without a completed exchange is refused unless the policy
    /// allows `none`.
    ///
    /// ```
    /// use pgwire_repl::config::{ChannelBinding, RequireAuth};
    /// use pgwire_repl::proto::auth::{AuthSettings, Authenticator};
    /// use pgwire_repl::proto::backend::AuthRequest;
    ///
    /// let settings = AuthSettings {
    ///     user: "repl".into(),
    ///     password: Some("secret".into()),
    ///     channel_binding: ChannelBinding::Prefer,
    ///     tls_in_use: false,
    ///     server_cert_hash: None,
    ///     target: "db1".into(),
    /// };
    /// let policy = RequireAuth::parse("scram-sha-256").unwrap();
    /// let mut auth = Authenticator::new(settings).with_require_auth(Some(policy));
    /// let err = auth.respond(AuthRequest::CleartextPassword).unwrap_err();
    /// assert!(err.message().contains(
    ///     "authentication method requirement \"scram-sha-256\" failed: server requested a cleartext password"
    /// ));
    /// ```
    pub fn with_require_auth(mut self, policy: Option<RequireAuth>) -> Authenticator {
        self.require_auth = policy;
        self
    }

    /// Whether the client has completed an exchange: sent a password, or verified the
    /// server's SCRAM signature.
    fn exchange_finished(&self) -> bool {
        match self.method {
            AuthMethod::None => false,
            AuthMethod::Cleartext | AuthMethod::Md5 => true,
            AuthMethod::ScramSha256 | AuthMethod::ScramSha256Plus => self.scram.is_none(),
        }
    }

    /// libpq's `check_expected_areq` for `require_auth`.
    fn check_required(&self, request: &AuthRequest) -> Result<()> {
        let Some(policy) = &self.require_auth else {
            return Ok(());
        };
        let code: u32 = match request {
            AuthRequest::Ok => 0,
            AuthRequest::KerberosV5 => 2,
            AuthRequest::CleartextPassword => 3,
            AuthRequest::Md5Password { .. } => 5,
            AuthRequest::ScmCredential => 6,
            AuthRequest::Gss => 7,
            AuthRequest::GssContinue(_) => 8,
            AuthRequest::Sspi => 9,
            AuthRequest::Sasl { .. } => 10,
            AuthRequest::SaslContinue(_) => 11,
            AuthRequest::SaslFinal(_) => 12,
            // Negative codes are as unknown as large ones.
            AuthRequest::Other { code } => u32::try_from(*code).unwrap_or(u32::MAX),
        };
        policy
            .check_request(code, self.exchange_finished())
            .map_err(|refusal| self.refused(policy, refusal))
    }

    fn refused(
        &self,
        policy: &RequireAuth,
        refusal: crate::config::require_auth::Refusal,
    ) -> Error {
        let allowed = policy.allowed_methods();
        let allowed = if allowed.is_empty() {
            "no method at all".to_string()
        } else {
            allowed.join(", ")
        };
        let advice = if refusal.server_method == "trust" {
            format!(
                "the server let this role in without asking for a password (trust, peer, ident or cert in its pg_hba.conf), which require_auth={} does not allow (it allows {allowed}); add none to require_auth if that is intended, or change the server's pg_hba.conf entry to a method that authenticates",
                quote_policy(policy)
            )
        } else {
            format!(
                "the server's pg_hba.conf entry for this connection uses {}, which require_auth={} does not allow (it allows {allowed}); nothing was sent to the server. Change the pg_hba.conf entry to an allowed method, or allow {} in require_auth if you trust it",
                refusal.server_method,
                quote_policy(policy),
                refusal.server_method
            )
        };
        Error::auth(
            format!(
                "authentication method requirement \"{}\" failed: {} ({})",
                policy.as_str(),
                refusal.reason,
                self.settings.target
            ),
            advice,
        )
    }

    /// How the client has authenticated so far.
    pub fn method(&self) -> AuthMethod {
        self.method
    }

    /// Checks, after AuthenticationOk, that the exchange met the requirements
    /// (`channel_binding=require` needs SCRAM-SHA-256-PLUS; a SCRAM exchange must have
    /// reached its final message).
    pub fn finish(&self) -> Result<()> {
        if self.scram.is_some() {
            return Err(Error::protocol(format!(
                "{} ended SCRAM authentication before its final message",
                self.settings.target
            )));
        }
        if self.settings.channel_binding == ChannelBinding::Require
            && self.method != AuthMethod::ScramSha256Plus
        {
            return Err(Error::auth(
                format!("channel binding is required, but {} authenticated the client without it", self.settings.target),
                "use an scram-sha-256 pg_hba entry over TLS (hostssl) with a password stored as SCRAM, or drop channel_binding=require",
            ));
        }
        Ok(())
    }

    fn password(&self, method: &str) -> Result<String> {
        self.settings.password.clone().ok_or_else(|| {
            Error::auth(
                format!("{} asked for a password ({method}) for user {:?}, but none was given", self.settings.target, self.settings.user),
                "set the password in the connection string, in PGPASSWORD, or in ~/.pgpass (mode 0600)",
            )
        })
    }

    fn refuse_without_binding(&self, what: &str) -> Result<()> {
        if self.settings.channel_binding == ChannelBinding::Require {
            return Err(Error::auth(
                format!("channel binding is required, but {} asked for {what}", self.settings.target),
                "configure the server's pg_hba.conf with scram-sha-256 over hostssl, or drop channel_binding=require",
            ));
        }
        Ok(())
    }

    /// Handles one authentication request; returns the bytes to send, if any.
    pub fn respond(&mut self, request: AuthRequest) -> Result<Option<BytesMut>> {
        self.check_required(&request)?;
        let mut out = BytesMut::new();
        match request {
            AuthRequest::Ok => {
                if self.scram.is_some() {
                    return Err(Error::protocol(format!(
                        "{} ended SCRAM authentication before its final message",
                        self.settings.target
                    )));
                }
                return Ok(None);
            }
            AuthRequest::CleartextPassword => {
                self.refuse_without_binding("a clear-text password")?;
                let password = self.password("password")?;
                frontend::password(password.as_bytes(), &mut out)?;
                self.method = AuthMethod::Cleartext;
            }
            AuthRequest::Md5Password { salt } => {
                self.refuse_without_binding("MD5 authentication")?;
                let password = self.password("md5")?;
                let hashed = postgres_protocol::authentication::md5_hash(
                    self.settings.user.as_bytes(),
                    password.as_bytes(),
                    salt,
                );
                frontend::password(hashed.as_bytes(), &mut out)?;
                self.method = AuthMethod::Md5;
            }
            AuthRequest::Sasl { mechanisms } => {
                let offers_plus = mechanisms.iter().any(|m| m == SCRAM_SHA_256_PLUS);
                let offers_plain = mechanisms.iter().any(|m| m == SCRAM_SHA_256);
                let binding_wanted = self.settings.channel_binding != ChannelBinding::Disable;
                let (mechanism, binding, method) = if self.settings.tls_in_use
                    && offers_plus
                    && binding_wanted
                {
                    match &self.settings.server_cert_hash {
                        Some(Some(hash)) => (
                            SCRAM_SHA_256_PLUS,
                            ScramBinding::tls_server_end_point(hash.clone()),
                            AuthMethod::ScramSha256Plus,
                        ),
                        _ if self.settings.channel_binding == ChannelBinding::Require => {
                            return Err(Error::auth(
                                "channel binding is required, but the server certificate's signature algorithm has no hash usable for tls-server-end-point (e.g. Ed25519)",
                                "give the server a certificate signed with RSA or ECDSA and SHA-2, or drop channel_binding=require",
                            ));
                        }
                        // No usable digest: take plain SCRAM and tell the server we cannot bind.
                        _ => (
                            SCRAM_SHA_256,
                            ScramBinding::unsupported(),
                            AuthMethod::ScramSha256,
                        ),
                    }
                } else if offers_plain {
                    if self.settings.channel_binding == ChannelBinding::Require {
                        return Err(Error::auth(
                            format!("channel binding is required, but {} did not offer SCRAM-SHA-256-PLUS{}", self.settings.target, if self.settings.tls_in_use { "" } else { " (the connection does not use TLS)" }),
                            "connect with TLS (sslmode=require or stricter) to a server with ssl=on and an scram-sha-256 pg_hba entry",
                        ));
                    }
                    let binding = if self.settings.tls_in_use && binding_wanted {
                        // We could bind, but the server did not offer it.
                        ScramBinding::unrequested()
                    } else {
                        ScramBinding::unsupported()
                    };
                    (SCRAM_SHA_256, binding, AuthMethod::ScramSha256)
                } else {
                    return Err(Error::auth(
                        format!("{} offered only the SASL mechanisms {mechanisms:?}, none of which this client supports", self.settings.target),
                        "configure the server's pg_hba.conf with scram-sha-256 for this user",
                    ));
                };
                if let Some(policy) = &self.require_auth {
                    policy
                        .check_sasl_mechanism(mechanism)
                        .map_err(|refusal| self.refused(policy, refusal))?;
                }
                let password = self.password(mechanism)?;
                let scram = ScramSha256::new(password.as_bytes(), binding);
                frontend::sasl_initial_response(mechanism, scram.message(), &mut out)?;
                self.scram = Some(scram);
                self.method = method;
            }
            AuthRequest::SaslContinue(data) => {
                let scram = self.scram.as_mut().ok_or_else(|| {
                    Error::protocol("SASL continue message without a SASL exchange")
                })?;
                scram.update(&data).map_err(|e| {
                    Error::auth(
                        format!(
                            "invalid SCRAM server-first-message from {}: {e}",
                            self.settings.target
                        ),
                        "the server's SCRAM data is malformed; check for a proxy in between",
                    )
                })?;
                frontend::sasl_response(scram.message(), &mut out)?;
            }
            AuthRequest::SaslFinal(data) => {
                let mut scram = self
                    .scram
                    .take()
                    .ok_or_else(|| Error::protocol("SASL final message without a SASL exchange"))?;
                scram.finish(&data).map_err(|e| {
                    Error::auth(
                        format!("the server's SCRAM signature did not verify: {e}"),
                        "the server does not know the password, or something between client and server altered the exchange; do not trust this connection",
                    )
                })?;
                return Ok(None);
            }
            AuthRequest::Gss | AuthRequest::GssContinue(_) => {
                return Err(unsupported_method(&self.settings.target, "GSSAPI"))
            }
            AuthRequest::Sspi => return Err(unsupported_method(&self.settings.target, "SSPI")),
            AuthRequest::KerberosV5 => {
                return Err(unsupported_method(&self.settings.target, "Kerberos V5"))
            }
            AuthRequest::ScmCredential => {
                return Err(unsupported_method(&self.settings.target, "SCM credentials"))
            }
            AuthRequest::Other { code } => {
                return Err(unsupported_method(
                    &self.settings.target,
                    &format!("authentication request code {code}"),
                ))
            }
        }
        Ok(Some(out))
    }
}

fn unsupported_method(target: &str, method: &str) -> Error {
    Error::auth(
        format!("{target} asked for {method} authentication, which this client does not support"),
        "change the server's pg_hba.conf entry for this user to scram-sha-256, md5, password, cert or trust",
    )
}

fn quote_policy(policy: &RequireAuth) -> String {
    if policy.as_str().is_empty() {
        "''".to_string()
    } else {
        policy.as_str().to_string()
    }
}
