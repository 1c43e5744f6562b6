//! libpq's `require_auth` (libpq 16+): which authentication requests the client answers.
//!
//! The value is a comma-separated list of `password`, `md5`, `gss`, `sspi`,
//! `scram-sha-256`, `oauth` and `none`. Either every element is negated with `!` (then
//! the listed methods are refused and everything else is allowed) or none is (then only
//! the listed methods are allowed). `none` allows a server that lets the client in
//! without asking for anything (`trust`, `peer`, `cert`); `!none` refuses that.
//!
//! The rules are libpq's, read from `fe-connect.c` (`pqConnectOptions2`) and `fe-auth.c`
//! (`check_expected_areq`, `pg_SASL_init`):
//!
//! * elements are split at every comma, without trimming white space;
//! * naming a method twice is an error ("is specified more than once");
//! * a request is checked before anything is sent back, so a refused method never
//!   sees the password;
//! * when the allowed set does not include `none`, an AuthenticationOk that is not
//!   preceded by a completed exchange (a password sent, or a SCRAM exchange whose server
//!   signature verified) fails with "server did not complete authentication";
//! * SCRAM-SHA-256 with channel binding (SCRAM-SHA-256-PLUS) is `scram-sha-256`;
//! * an explicitly empty value (`require_auth=''`) allows no authentication request at
//!   all but accepts a server that asks for none, exactly as libpq does (it keeps its
//!   zeroed defaults but still checks).
//!
//! ```
//! use pgwire_repl::config::RequireAuth;
//!
//! let policy = RequireAuth::parse("scram-sha-256,none").unwrap();
//! assert_eq!(policy.as_str(), "scram-sha-256,none");
//!
//! let err = RequireAuth::parse("password,!md5").unwrap_err();
//! assert_eq!(
//!     err,
//!     "negative require_auth method \"!md5\" cannot be mixed with non-negative methods"
//! );
//! ```

use std::fmt;

/// PostgreSQL's `AuthRequest` codes (`src/include/libpq/pqcomm.h`), as bit positions.
const AUTH_REQ_OK: u32 = 0;
const AUTH_REQ_PASSWORD: u32 = 3;
const AUTH_REQ_MD5: u32 = 5;
const AUTH_REQ_GSS: u32 = 7;
const AUTH_REQ_GSS_CONT: u32 = 8;
const AUTH_REQ_SSPI: u32 = 9;
const AUTH_REQ_SASL: u32 = 10;
const AUTH_REQ_SASL_CONT: u32 = 11;
const AUTH_REQ_SASL_FIN: u32 = 12;

const fn bit(code: u32) -> u32 {
    1 << code
}

const SASL_BITS: u32 = bit(AUTH_REQ_SASL) | bit(AUTH_REQ_SASL_CONT) | bit(AUTH_REQ_SASL_FIN);

/// The SASL mechanisms `require_auth` can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SaslMechanism {
    ScramSha256,
    OAuthBearer,
}

/// A parsed `require_auth` value.
///
/// Built with [`RequireAuth::parse`]; [`crate::proto::auth::Authenticator`] consults it
/// for every authentication request the server sends.
#[derive(Clone, PartialEq, Eq)]
pub struct RequireAuth {
    text: String,
    /// The server must complete an exchange before AuthenticationOk (no `none`).
    auth_required: bool,
    /// Allowed `AuthRequest` codes, as bits.
    allowed: u32,
    /// Allowed SASL mechanisms.
    sasl: Vec<SaslMechanism>,
}

impl fmt::Debug for RequireAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequireAuth({:?})", self.text)
    }
}

impl fmt::Display for RequireAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Why an authentication request was refused: libpq's reason text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// libpq's reason, e.g. `server requested a cleartext password`.
    pub(crate) reason: String,
    /// What the server asked for, in pg_hba.conf terms (`password`, `trust`, …).
    pub(crate) server_method: &'static str,
}

impl RequireAuth {
    /// Parses a `require_auth` value as libpq 16+ does; the error is libpq's message.
    ///
    /// An empty value gives libpq's degenerate policy for `require_auth=''`: no
    /// authentication request is allowed, but a server that asks for none is accepted.
    pub fn parse(text: &str) -> std::result::Result<RequireAuth, String> {
        let mut policy = RequireAuth {
            text: text.to_string(),
            auth_required: false,
            allowed: 0,
            sasl: Vec::new(),
        };
        if text.is_empty() {
            return Ok(policy);
        }
        // Start from nothing allowed and add to it (or, for a negated list, from
        // everything and subtract).
        policy.auth_required = true;
        let mut negated = false;
        for (index, part) in text.split(',').enumerate() {
            let method = match part.strip_prefix('!') {
                Some(rest) => {
                    if index == 0 {
                        policy.auth_required = false;
                        policy.allowed = u32::MAX;
                        policy.sasl = vec![SaslMechanism::ScramSha256, SaslMechanism::OAuthBearer];
                    } else if !negated {
                        return Err(format!("negative require_auth method \"{part}\" cannot be mixed with non-negative methods"));
                    }
                    negated = true;
                    rest
                }
                None => {
                    if negated {
                        return Err(format!(
                            "require_auth method \"{part}\" cannot be mixed with negative methods"
                        ));
                    }
                    part
                }
            };
            let duplicate =
                || format!("require_auth method \"{part}\" is specified more than once");
            let bits = match method {
                "password" => bit(AUTH_REQ_PASSWORD),
                "md5" => bit(AUTH_REQ_MD5),
                "gss" => bit(AUTH_REQ_GSS) | bit(AUTH_REQ_GSS_CONT),
                "sspi" => bit(AUTH_REQ_SSPI) | bit(AUTH_REQ_GSS_CONT),
                "scram-sha-256" | "oauth" => {
                    let mechanism = if method == "oauth" {
                        SaslMechanism::OAuthBearer
                    } else {
                        SaslMechanism::ScramSha256
                    };
                    let present = policy.sasl.contains(&mechanism);
                    if negated {
                        if !present {
                            return Err(duplicate());
                        }
                        policy.sasl.retain(|m| *m != mechanism);
                    } else {
                        if present {
                            return Err(duplicate());
                        }
                        policy.sasl.push(mechanism);
                    }
                    continue;
                }
                "none" => {
                    // "none" lets the server skip authentication; "!none" forbids it.
                    if negated == policy.auth_required {
                        return Err(duplicate());
                    }
                    policy.auth_required = negated;
                    continue;
                }
                _ => return Err(format!("invalid require_auth value: \"{method}\"")),
            };
            if negated {
                if policy.allowed & bits == 0 {
                    return Err(duplicate());
                }
                policy.allowed &= !bits;
            } else {
                if policy.allowed & bits == bits {
                    return Err(duplicate());
                }
                policy.allowed |= bits;
            }
        }
        // SASL requests are allowed exactly when some SASL mechanism is.
        let any_sasl = !policy.sasl.is_empty();
        if !negated && any_sasl {
            policy.allowed |= SASL_BITS;
        } else if negated && !any_sasl {
            policy.allowed &= !SASL_BITS;
        }
        Ok(policy)
    }

    /// The value as given, e.g. `scram-sha-256,none`.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the server may let the client in without an authentication exchange
    /// (`none` is allowed).
    pub fn allows_no_authentication(&self) -> bool {
        !self.auth_required
    }

    /// Checks one authentication request by its code, before anything is answered.
    /// `exchange_finished` says whether the client has completed an exchange (sent a
    /// password, or verified a SCRAM server signature); it matters for AuthenticationOk.
    pub(crate) fn check_request(
        &self,
        code: u32,
        exchange_finished: bool,
    ) -> std::result::Result<(), Refusal> {
        let (allowed, reason, server_method) = match code {
            AUTH_REQ_OK => (
                !self.auth_required || exchange_finished,
                "server did not complete authentication",
                "trust",
            ),
            AUTH_REQ_PASSWORD => (
                self.allows(code),
                "server requested a cleartext password",
                "password",
            ),
            AUTH_REQ_MD5 => (
                self.allows(code),
                "server requested a hashed password",
                "md5",
            ),
            AUTH_REQ_GSS | AUTH_REQ_GSS_CONT => (
                self.allows(code),
                "server requested GSSAPI authentication",
                "gss",
            ),
            AUTH_REQ_SSPI => (
                self.allows(code),
                "server requested SSPI authentication",
                "sspi",
            ),
            AUTH_REQ_SASL | AUTH_REQ_SASL_CONT | AUTH_REQ_SASL_FIN => (
                self.allows(code),
                "server requested SASL authentication",
                "scram-sha-256",
            ),
            _ => (
                false,
                "server requested an unknown authentication type",
                "an unknown method",
            ),
        };
        if allowed {
            Ok(())
        } else {
            Err(Refusal {
                reason: reason.to_string(),
                server_method,
            })
        }
    }

    /// Checks the SASL mechanism the client chose (libpq 18's `allowed_sasl_mechs`).
    pub(crate) fn check_sasl_mechanism(&self, name: &str) -> std::result::Result<(), Refusal> {
        let mechanism = if name.starts_with("SCRAM-SHA-256") {
            Some(SaslMechanism::ScramSha256)
        } else if name == "OAUTHBEARER" {
            Some(SaslMechanism::OAuthBearer)
        } else {
            None
        };
        match mechanism {
            Some(m) if self.sasl.contains(&m) => Ok(()),
            _ => Err(Refusal {
                reason: format!("server requested {name} authentication"),
                server_method: if name == "OAUTHBEARER" {
                    "oauth"
                } else {
                    "scram-sha-256"
                },
            }),
        }
    }

    fn allows(&self, code: u32) -> bool {
        code < 32 && self.allowed & bit(code) != 0
    }

    /// The methods this policy allows, in pg_hba.conf terms, for advice.
    pub(crate) fn allowed_methods(&self) -> Vec<&'static str> {
        let mut methods = Vec::new();
        for (name, code) in [
            ("password", AUTH_REQ_PASSWORD),
            ("md5", AUTH_REQ_MD5),
            ("gss", AUTH_REQ_GSS),
            ("sspi", AUTH_REQ_SSPI),
        ] {
            if self.allows(code) {
                methods.push(name);
            }
        }
        if self.allows(AUTH_REQ_SASL) {
            if self.sasl.contains(&SaslMechanism::ScramSha256) {
                methods.push("scram-sha-256");
            }
            if self.sasl.contains(&SaslMechanism::OAuthBearer) {
                methods.push("oauth");
            }
        }
        if !self.auth_required {
            methods.push("trust (none)");
        }
        methods
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(policy: &str, code: u32, finished: bool) -> bool {
        RequireAuth::parse(policy)
            .unwrap()
            .check_request(code, finished)
            .is_ok()
    }

    #[test]
    fn parse_errors_are_libpqs() {
        let cases = [
            ("bogus", "invalid require_auth value: \"bogus\""),
            ("!bogus", "invalid require_auth value: \"bogus\""),
            ("password,", "invalid require_auth value: \"\""),
            ("password, md5", "invalid require_auth value: \" md5\""),
            (
                "SCRAM-SHA-256",
                "invalid require_auth value: \"SCRAM-SHA-256\"",
            ),
            (
                "password,!md5",
                "negative require_auth method \"!md5\" cannot be mixed with non-negative methods",
            ),
            (
                "!password,md5",
                "require_auth method \"md5\" cannot be mixed with negative methods",
            ),
            (
                "md5,md5",
                "require_auth method \"md5\" is specified more than once",
            ),
            (
                "!md5,!md5",
                "require_auth method \"!md5\" is specified more than once",
            ),
            (
                "none,none",
                "require_auth method \"none\" is specified more than once",
            ),
            (
                "!none,!none",
                "require_auth method \"!none\" is specified more than once",
            ),
            (
                "scram-sha-256,scram-sha-256",
                "require_auth method \"scram-sha-256\" is specified more than once",
            ),
            (
                "gss,gss",
                "require_auth method \"gss\" is specified more than once",
            ),
        ];
        for (text, message) in cases {
            assert_eq!(RequireAuth::parse(text).unwrap_err(), message, "{text:?}");
        }
        // gss and sspi share GSS_CONT but are distinct methods.
        RequireAuth::parse("gss,sspi").unwrap();
        RequireAuth::parse("!gss,!sspi").unwrap();
    }

    #[test]
    fn positive_lists_allow_only_what_they_name() {
        assert!(allowed("password", AUTH_REQ_PASSWORD, false));
        assert!(!allowed("password", AUTH_REQ_MD5, false));
        assert!(!allowed("password", AUTH_REQ_SASL, false));
        assert!(allowed("md5,scram-sha-256", AUTH_REQ_SASL_CONT, false));
        assert!(allowed("md5,scram-sha-256", AUTH_REQ_SASL_FIN, false));
        assert!(!allowed("md5,scram-sha-256", AUTH_REQ_PASSWORD, false));
        assert!(!allowed("scram-sha-256", 2, false));
        assert!(!allowed("scram-sha-256", 99, false));
        // The server must have authenticated the client...
        assert!(!allowed("scram-sha-256", AUTH_REQ_OK, false));
        assert!(allowed("scram-sha-256", AUTH_REQ_OK, true));
        // ...unless none is allowed.
        assert!(allowed("scram-sha-256,none", AUTH_REQ_OK, false));
        assert!(allowed("none", AUTH_REQ_OK, false));
        assert!(!allowed("none", AUTH_REQ_PASSWORD, false));
        // oauth alone allows SASL requests but not the SCRAM mechanism.
        let oauth = RequireAuth::parse("oauth").unwrap();
        assert!(oauth.check_request(AUTH_REQ_SASL, false).is_ok());
        assert_eq!(
            oauth
                .check_sasl_mechanism("SCRAM-SHA-256")
                .unwrap_err()
                .reason,
            "server requested SCRAM-SHA-256 authentication"
        );
        let scram = RequireAuth::parse("scram-sha-256").unwrap();
        scram.check_sasl_mechanism("SCRAM-SHA-256-PLUS").unwrap();
    }

    #[test]
    fn negative_lists_refuse_what_they_name() {
        assert!(!allowed("!password", AUTH_REQ_PASSWORD, false));
        assert!(allowed("!password", AUTH_REQ_MD5, false));
        assert!(allowed("!password", AUTH_REQ_OK, false));
        assert!(!allowed("!password,!none", AUTH_REQ_OK, false));
        assert!(allowed("!password,!none", AUTH_REQ_OK, true));
        // Refusing one SASL mechanism keeps SASL requests for the other (libpq 18), and
        // refuses the mechanism itself.
        let policy = RequireAuth::parse("!scram-sha-256").unwrap();
        assert!(policy.check_request(AUTH_REQ_SASL, false).is_ok());
        assert_eq!(
            policy
                .check_sasl_mechanism("SCRAM-SHA-256")
                .unwrap_err()
                .reason,
            "server requested SCRAM-SHA-256 authentication"
        );
        let policy = RequireAuth::parse("!oauth").unwrap();
        assert!(policy.check_request(AUTH_REQ_SASL, false).is_ok());
        policy.check_sasl_mechanism("SCRAM-SHA-256").unwrap();
        assert!(!allowed("!scram-sha-256,!oauth", AUTH_REQ_SASL, false));
    }

    #[test]
    fn empty_value_allows_only_no_authentication() {
        assert!(allowed("", AUTH_REQ_OK, false));
        assert!(!allowed("", AUTH_REQ_PASSWORD, false));
        assert!(!allowed("", AUTH_REQ_SASL, false));
    }

    #[test]
    fn reasons_are_libpqs() {
        let policy = RequireAuth::parse("scram-sha-256").unwrap();
        let reason = |code| policy.check_request(code, false).unwrap_err().reason;
        assert_eq!(
            reason(AUTH_REQ_PASSWORD),
            "server requested a cleartext password"
        );
        assert_eq!(reason(AUTH_REQ_MD5), "server requested a hashed password");
        assert_eq!(
            reason(AUTH_REQ_GSS),
            "server requested GSSAPI authentication"
        );
        assert_eq!(
            reason(AUTH_REQ_SSPI),
            "server requested SSPI authentication"
        );
        assert_eq!(
            reason(AUTH_REQ_OK),
            "server did not complete authentication"
        );
        assert_eq!(reason(2), "server requested an unknown authentication type");
        let policy = RequireAuth::parse("password").unwrap();
        assert_eq!(
            policy
                .check_request(AUTH_REQ_SASL, false)
                .unwrap_err()
                .reason,
            "server requested SASL authentication"
        );
    }
}
