//! The options this client accepts: libpq's keyword table with the environment
//! variable of each option, how each value is checked and stored, and how the
//! environment fills the options left unset.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{
    default_socket_dir, home_dir, ChannelBinding, Config, Host, LoadBalanceHosts, ReplicationMode,
    RequireAuth, SslCertMode, SslMode, SslNegotiation, SslProtocolVersion, TargetSessionAttrs,
    DEFAULT_PORT,
};
use crate::error::{Error, Result};

impl Config {
    pub(super) fn apply_env_unvalidated(
        &mut self,
        getenv: &dyn Fn(&str) -> Option<String>,
    ) -> Result<()> {
        self.apply_service(getenv)?;
        for info in KEYS {
            let Some(var) = info.env else { continue };
            if info.key == Keyword::Service {
                // Handled by apply_service, before every other variable.
                continue;
            }
            if self.explicitly_set.contains(info.key) || !self.is_unset(info.key) {
                continue;
            }
            if let Some(value) = getenv(var) {
                self.set_option(info.key, &value, Source::Env(var))?;
            }
        }
        if !self.explicitly_set.contains(Keyword::SslMode)
            && self.is_unset(Keyword::SslMode)
            && getenv("PGREQUIRESSL").is_some_and(|v| v.starts_with('1'))
        {
            self.ssl_mode = SslMode::Require;
            self.explicitly_set.insert(Keyword::SslMode);
        }
        if self.passfile.is_none() {
            self.passfile = home_dir(getenv).map(|home| home.join(".pgpass"));
        }
        self.apply_derived_defaults();
        Ok(())
    }

    /// Whether the field behind `key` still holds its default (so the environment may
    /// fill it). Options that are not stored always count as unset.
    pub(super) fn is_unset(&self, key: Keyword) -> bool {
        match key {
            Keyword::Host => self.hosts.is_empty(),
            Keyword::HostAddr => self.host_addrs.is_empty(),
            Keyword::Port => self.ports.is_empty(),
            Keyword::User => self.user.is_none(),
            Keyword::Password => self.password.is_none(),
            Keyword::Passfile => self.passfile.is_none(),
            Keyword::Dbname => self.dbname.is_none(),
            Keyword::ApplicationName => self.application_name.is_none(),
            Keyword::FallbackApplicationName => self.fallback_application_name.is_none(),
            Keyword::Options => self.options.is_none(),
            Keyword::ConnectTimeout => self.connect_timeout.is_none(),
            Keyword::SslMode => {
                self.ssl_mode == SslMode::Prefer
                    || (self.ssl_mode == SslMode::VerifyFull && self.ssl_root_cert_is_system())
            }
            Keyword::SslRootCert => self.ssl_root_cert.is_none(),
            Keyword::SslCert => self.ssl_cert.is_none(),
            Keyword::SslKey => self.ssl_key.is_none(),
            Keyword::SslNegotiation => self.ssl_negotiation == SslNegotiation::default(),
            Keyword::SslCrl => self.ssl_crl.is_none(),
            Keyword::SslCrlDir => self.ssl_crl_dir.is_none(),
            Keyword::SslSni => self.ssl_sni,
            Keyword::SslMinProtocolVersion => {
                self.ssl_min_protocol_version == SslProtocolVersion::default()
            }
            Keyword::SslMaxProtocolVersion => self.ssl_max_protocol_version.is_none(),
            Keyword::SslCertMode => self.ssl_cert_mode == SslCertMode::default(),
            Keyword::SslPassword => self.ssl_password.is_none(),
            Keyword::ChannelBinding => self.channel_binding == ChannelBinding::default(),
            Keyword::Replication => self.replication == ReplicationMode::default(),
            Keyword::Keepalives => self.keepalives,
            Keyword::KeepalivesIdle => self.keepalives_idle.is_none(),
            Keyword::KeepalivesInterval => self.keepalives_interval.is_none(),
            Keyword::KeepalivesCount => self.keepalives_count.is_none(),
            Keyword::TcpUserTimeout => self.tcp_user_timeout.is_none(),
            Keyword::Service => self.service.is_none(),
            Keyword::TargetSessionAttrs => self.target_session_attrs == TargetSessionAttrs::Any,
            Keyword::LoadBalanceHosts => self.load_balance_hosts == LoadBalanceHosts::Disable,
            Keyword::RequireAuth => self.require_auth.is_none(),
            Keyword::RequirePeer => self.require_peer.is_none(),
            _ => true,
        }
    }

    /// Stores one option, checking its value.
    pub(super) fn set_option(
        &mut self,
        key: Keyword,
        value: &str,
        source: Source<'_>,
    ) -> Result<()> {
        let name = key.name();
        if value.contains('\0') {
            return Err(bad_value(
                source,
                format!("the value of connection option \"{name}\" contains a NUL character"),
                "remove the NUL character; PostgreSQL cannot transmit it",
            ));
        }
        self.explicitly_set.insert(key);
        let text = || (!value.is_empty()).then(|| value.to_string());
        let path = || (!value.is_empty()).then(|| PathBuf::from(value));
        match key {
            Keyword::Host => self.hosts = parse_hosts(value, source)?,
            Keyword::HostAddr => self.host_addrs = parse_host_addrs(value, source)?,
            Keyword::Port => self.ports = parse_ports(value, source)?,
            Keyword::User => self.user = text(),
            Keyword::Password => self.password = text(),
            Keyword::Passfile => self.passfile = path(),
            Keyword::Dbname => self.dbname = text(),
            Keyword::ApplicationName => self.application_name = text(),
            Keyword::FallbackApplicationName => self.fallback_application_name = text(),
            Keyword::Options => self.options = text(),
            Keyword::ConnectTimeout => {
                let seconds = parse_int_option(key, value, source)?;
                self.connect_timeout = match seconds {
                    i32::MIN..=0 => None,
                    1 => Some(Duration::from_secs(2)),
                    n => Some(Duration::from_secs(u64::from(n.unsigned_abs()))),
                };
            }
            Keyword::SslMode => {
                self.ssl_mode = match value {
                    "disable" => SslMode::Disable,
                    "allow" => SslMode::Allow,
                    "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    _ => {
                        return Err(invalid_choice(
                            key,
                            value,
                            source,
                            "disable, allow, prefer, require, verify-ca, verify-full",
                        ))
                    }
                }
            }
            Keyword::SslRootCert => self.ssl_root_cert = path(),
            Keyword::SslCert => self.ssl_cert = path(),
            Keyword::SslKey => self.ssl_key = path(),
            Keyword::SslNegotiation => {
                self.ssl_negotiation = match value {
                    "postgres" => SslNegotiation::Postgres,
                    "direct" => SslNegotiation::Direct,
                    _ => return Err(invalid_choice(key, value, source, "postgres, direct")),
                }
            }
            Keyword::ChannelBinding => {
                self.channel_binding = match value {
                    "disable" => ChannelBinding::Disable,
                    "prefer" => ChannelBinding::Prefer,
                    "require" => ChannelBinding::Require,
                    _ => {
                        return Err(invalid_choice(key, value, source, "disable, prefer, require"))
                    }
                }
            }
            Keyword::Replication => {
                self.replication = match value {
                    "database" => ReplicationMode::Database,
                    _ => match parse_pg_bool(value) {
                        Some(true) => ReplicationMode::Physical,
                        Some(false) => ReplicationMode::Off,
                        None => {
                            return Err(invalid_choice(
                                key,
                                value,
                                source,
                                "true, on, yes, 1 (physical), database (logical), false, off, no, 0",
                            ))
                        }
                    },
                }
            }
            Keyword::Keepalives => self.keepalives = parse_int_option(key, value, source)? != 0,
            // libpq reads these as integers and turns a negative value into 0 (which
            // the socket layer then hands to setsockopt, as libpq does). An empty
            // value is not an integer to libpq either.
            Keyword::KeepalivesIdle => {
                self.keepalives_idle = Some(Duration::from_secs(non_negative(key, value, source)?));
            }
            Keyword::KeepalivesInterval => {
                self.keepalives_interval =
                    Some(Duration::from_secs(non_negative(key, value, source)?));
            }
            Keyword::KeepalivesCount => {
                let count = non_negative(key, value, source)?;
                self.keepalives_count = Some(u32::try_from(count).unwrap_or(u32::MAX));
            }
            Keyword::TcpUserTimeout => {
                self.tcp_user_timeout =
                    Some(Duration::from_millis(non_negative(key, value, source)?));
            }
            // This client always asks for UTF-8 and decodes UTF-8: another encoding is
            // refused rather than ignored.
            Keyword::ClientEncoding => {
                let normalized: String = value
                    .chars()
                    .filter(|c| *c != '-' && *c != '_')
                    .collect::<String>()
                    .to_ascii_lowercase();
                if !matches!(normalized.as_str(), "" | "utf8" | "unicode" | "auto") {
                    return Err(bad_value(
                        source,
                        format!("client_encoding={value} is not supported: this client always uses UTF8"),
                        "remove client_encoding (or set it to UTF8); replication and status queries do not depend on it",
                    ));
                }
            }
            // Only meaningful for GSSAPI, which is refused where it would be used
            // (gssencmode=require, a server asking for GSS authentication); and
            // sslcompression, which libpq itself ignores since TLS compression was removed.
            Keyword::KrbSrvName | Keyword::SslCompression | Keyword::GssDelegation => {}
            // As in libpq: SNI is on only when the value starts with '1'.
            Keyword::SslSni => self.ssl_sni = value.starts_with('1'),
            Keyword::SslCrl => self.ssl_crl = path(),
            Keyword::SslCrlDir => self.ssl_crl_dir = path(),
            Keyword::RequirePeer => self.require_peer = text(),
            Keyword::RequireAuth => {
                // Kept even when empty: libpq's require_auth='' still checks (and then
                // allows only servers that ask for no authentication).
                let policy = RequireAuth::parse(value).map_err(|message| {
                    bad_value(
                        source,
                        message,
                        "set require_auth to a comma-separated list of password, md5, gss, sspi, scram-sha-256, oauth and none, either all prefixed with ! (methods to refuse) or none (methods to allow), each named once",
                    )
                })?;
                self.require_auth = Some(policy);
            }
            Keyword::SslMinProtocolVersion | Keyword::SslMaxProtocolVersion => {
                // Case-insensitive, as libpq's sslVerifyProtocolVersion().
                const VERSIONS: [SslProtocolVersion; 4] = [
                    SslProtocolVersion::Tls1_0,
                    SslProtocolVersion::Tls1_1,
                    SslProtocolVersion::Tls1_2,
                    SslProtocolVersion::Tls1_3,
                ];
                let version = match VERSIONS.iter().find(|v| v.name().eq_ignore_ascii_case(value)) {
                    Some(version) => Some(*version),
                    None if value.is_empty() => None,
                    None => return Err(invalid_choice(key, value, source, "TLSv1, TLSv1.1, TLSv1.2, TLSv1.3")),
                };
                if key == Keyword::SslMinProtocolVersion {
                    self.ssl_min_protocol_version = version.unwrap_or_default();
                } else {
                    self.ssl_max_protocol_version = version;
                }
            }
            Keyword::TargetSessionAttrs => {
                self.target_session_attrs = match value {
                    "any" => TargetSessionAttrs::Any,
                    "read-write" => TargetSessionAttrs::ReadWrite,
                    "read-only" => TargetSessionAttrs::ReadOnly,
                    "primary" => TargetSessionAttrs::Primary,
                    "standby" => TargetSessionAttrs::Standby,
                    "prefer-standby" => TargetSessionAttrs::PreferStandby,
                    _ => {
                        return Err(invalid_choice(
                            key,
                            value,
                            source,
                            "any, read-write, read-only, primary, standby, prefer-standby",
                        ))
                    }
                }
            }
            Keyword::GssEncMode => match value {
                "disable" | "prefer" => {}
                "require" => {
                    return Err(bad_value(
                        source,
                        "gssencmode=require is not supported: this client does not implement GSSAPI",
                        "use gssencmode=disable or prefer, and sslmode=require (or stronger) for an encrypted connection",
                    ))
                }
                _ => return Err(invalid_choice(key, value, source, "disable, prefer")),
            },
            Keyword::LoadBalanceHosts => {
                self.load_balance_hosts = match value {
                    "disable" => LoadBalanceHosts::Disable,
                    "random" => LoadBalanceHosts::Random,
                    _ => return Err(invalid_choice(key, value, source, "disable, random")),
                }
            }
            Keyword::SslCertMode => match value {
                "disable" => self.ssl_cert_mode = SslCertMode::Disable,
                "allow" => self.ssl_cert_mode = SslCertMode::Allow,
                "require" => self.ssl_cert_mode = SslCertMode::Require,
                _ => return Err(invalid_choice(key, value, source, "disable, allow, require")),
            },
            Keyword::SslPassword => {
                self.ssl_password = text();
            }
            Keyword::Service => {
                // Kept even when empty: libpq looks up the service named "" then.
                self.service = Some(value.to_string());
                self.service_applied = false;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Option names

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Keyword {
    Host,
    HostAddr,
    Port,
    User,
    Password,
    Passfile,
    Dbname,
    ApplicationName,
    FallbackApplicationName,
    Options,
    ConnectTimeout,
    SslMode,
    SslRootCert,
    SslCert,
    SslKey,
    SslNegotiation,
    ChannelBinding,
    Replication,
    Keepalives,
    KeepalivesIdle,
    ClientEncoding,
    TargetSessionAttrs,
    GssEncMode,
    KrbSrvName,
    SslCompression,
    SslCrl,
    SslCrlDir,
    SslSni,
    SslPassword,
    SslMinProtocolVersion,
    SslMaxProtocolVersion,
    KeepalivesInterval,
    KeepalivesCount,
    TcpUserTimeout,
    RequirePeer,
    LoadBalanceHosts,
    RequireAuth,
    Service,
    SslCertMode,
    GssDelegation,
}

struct KeyInfo {
    key: Keyword,
    name: &'static str,
    env: Option<&'static str>,
}

const fn k(key: Keyword, name: &'static str, env: Option<&'static str>) -> KeyInfo {
    KeyInfo { key, name, env }
}

/// Every option this client accepts, with libpq's environment variable for it.
const KEYS: &[KeyInfo] = &[
    k(Keyword::Host, "host", Some("PGHOST")),
    k(Keyword::HostAddr, "hostaddr", Some("PGHOSTADDR")),
    k(Keyword::Port, "port", Some("PGPORT")),
    k(Keyword::User, "user", Some("PGUSER")),
    k(Keyword::Password, "password", Some("PGPASSWORD")),
    k(Keyword::Passfile, "passfile", Some("PGPASSFILE")),
    k(Keyword::Dbname, "dbname", Some("PGDATABASE")),
    k(
        Keyword::ApplicationName,
        "application_name",
        Some("PGAPPNAME"),
    ),
    k(
        Keyword::FallbackApplicationName,
        "fallback_application_name",
        None,
    ),
    k(Keyword::Options, "options", Some("PGOPTIONS")),
    k(
        Keyword::ConnectTimeout,
        "connect_timeout",
        Some("PGCONNECT_TIMEOUT"),
    ),
    k(Keyword::SslMode, "sslmode", Some("PGSSLMODE")),
    k(Keyword::SslRootCert, "sslrootcert", Some("PGSSLROOTCERT")),
    k(Keyword::SslCert, "sslcert", Some("PGSSLCERT")),
    k(Keyword::SslKey, "sslkey", Some("PGSSLKEY")),
    k(
        Keyword::SslNegotiation,
        "sslnegotiation",
        Some("PGSSLNEGOTIATION"),
    ),
    k(
        Keyword::ChannelBinding,
        "channel_binding",
        Some("PGCHANNELBINDING"),
    ),
    k(Keyword::Replication, "replication", None),
    k(Keyword::Keepalives, "keepalives", None),
    k(Keyword::KeepalivesIdle, "keepalives_idle", None),
    k(
        Keyword::ClientEncoding,
        "client_encoding",
        Some("PGCLIENTENCODING"),
    ),
    k(
        Keyword::TargetSessionAttrs,
        "target_session_attrs",
        Some("PGTARGETSESSIONATTRS"),
    ),
    k(Keyword::GssEncMode, "gssencmode", Some("PGGSSENCMODE")),
    k(Keyword::KrbSrvName, "krbsrvname", Some("PGKRBSRVNAME")),
    k(
        Keyword::SslCompression,
        "sslcompression",
        Some("PGSSLCOMPRESSION"),
    ),
    k(Keyword::SslCrl, "sslcrl", Some("PGSSLCRL")),
    k(Keyword::SslCrlDir, "sslcrldir", Some("PGSSLCRLDIR")),
    k(Keyword::SslSni, "sslsni", Some("PGSSLSNI")),
    k(Keyword::SslPassword, "sslpassword", None),
    k(
        Keyword::SslMinProtocolVersion,
        "ssl_min_protocol_version",
        Some("PGSSLMINPROTOCOLVERSION"),
    ),
    k(
        Keyword::SslMaxProtocolVersion,
        "ssl_max_protocol_version",
        Some("PGSSLMAXPROTOCOLVERSION"),
    ),
    k(Keyword::KeepalivesInterval, "keepalives_interval", None),
    k(Keyword::KeepalivesCount, "keepalives_count", None),
    k(Keyword::TcpUserTimeout, "tcp_user_timeout", None),
    k(Keyword::RequirePeer, "requirepeer", Some("PGREQUIREPEER")),
    k(
        Keyword::LoadBalanceHosts,
        "load_balance_hosts",
        Some("PGLOADBALANCEHOSTS"),
    ),
    k(Keyword::RequireAuth, "require_auth", Some("PGREQUIREAUTH")),
    k(Keyword::Service, "service", Some("PGSERVICE")),
    k(Keyword::SslCertMode, "sslcertmode", Some("PGSSLCERTMODE")),
    k(
        Keyword::GssDelegation,
        "gssdelegation",
        Some("PGGSSDELEGATION"),
    ),
];

impl Keyword {
    pub(super) fn from_name(name: &str) -> Option<Keyword> {
        KEYS.iter()
            .find(|info| info.name == name)
            .map(|info| info.key)
    }

    pub(super) fn name(self) -> &'static str {
        KEYS.iter()
            .find(|info| info.key == self)
            .map_or("?", |info| info.name)
    }
}

/// A set of [`Keyword`]s (there are fewer than 64).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct KeySet(u64);

impl KeySet {
    fn bit(key: Keyword) -> u64 {
        1u64 << (key as u32)
    }

    pub(super) fn contains(self, key: Keyword) -> bool {
        self.0 & KeySet::bit(key) != 0
    }

    pub(super) fn insert(&mut self, key: Keyword) {
        self.0 |= KeySet::bit(key);
    }
}

fn known_options() -> String {
    KEYS.iter()
        .map(|info| info.name)
        .collect::<Vec<_>>()
        .join(", ")
}

pub(super) fn unknown_option(name: &str, in_uri: bool) -> Error {
    let message = if in_uri {
        format!("invalid URI query parameter: \"{name}\"")
    } else {
        format!("invalid connection option \"{name}\"")
    };
    Error::config(
        message,
        format!(
            "check the spelling and remove options this client does not know; it accepts: {}",
            known_options()
        ),
    )
}

// ---------------------------------------------------------------------------------------
// Values

/// Where a value came from, for error messages.
#[derive(Debug, Clone, Copy)]
pub(super) enum Source<'a> {
    ConnInfo,
    Env(&'a str),
    Service {
        name: &'a str,
        file: &'a Path,
        line: usize,
    },
}

pub(super) fn bad_value(source: Source<'_>, message: impl Into<String>, advice: &str) -> Error {
    let message = message.into();
    match source {
        Source::ConnInfo => Error::config(message, advice),
        Source::Env(var) => Error::config(
            format!("{message} (from environment variable {var})"),
            format!("{advice}; or unset {var}"),
        ),
        Source::Service { name, file, line } => Error::config(
            format!(
                "{message} (from service \"{name}\" in service file \"{}\", line {line})",
                file.display()
            ),
            format!("{advice}: fix that line of the service file"),
        ),
    }
}

fn invalid_choice(key: Keyword, value: &str, source: Source<'_>, choices: &str) -> Error {
    bad_value(
        source,
        format!("invalid {} value: \"{value}\"", key.name()),
        &format!("set {} to one of: {choices}", key.name()),
    )
}

/// libpq's `isspace` in the C locale.
pub(super) fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\u{0b}' | '\u{0c}' | '\r')
}

/// An integer as libpq's `pqParseIntParam` reads it: surrounding white space and a sign
/// allowed, 32-bit range.
fn parse_libpq_int(value: &str) -> Option<i32> {
    value.trim_matches(is_space).parse::<i32>().ok()
}

fn parse_int_option(key: Keyword, value: &str, source: Source<'_>) -> Result<i32> {
    parse_libpq_int(value).ok_or_else(|| {
        bad_value(
            source,
            format!(
                "invalid integer value \"{value}\" for connection option \"{}\"",
                key.name()
            ),
            &format!(
                "give {} as a whole number, for example {}=10",
                key.name(),
                key.name()
            ),
        )
    })
}

/// An integer option that libpq clamps at 0 (`keepalives_*`, `tcp_user_timeout`).
fn non_negative(key: Keyword, value: &str, source: Source<'_>) -> Result<u64> {
    Ok(u64::from(
        parse_int_option(key, value, source)?.max(0).unsigned_abs(),
    ))
}

/// PostgreSQL's `parse_bool`: case-insensitive, unique prefixes allowed.
fn parse_pg_bool(value: &str) -> Option<bool> {
    let lower = value.to_ascii_lowercase();
    let is_prefix = |word: &str, min: usize| lower.len() >= min && word.starts_with(&lower);
    if is_prefix("true", 1) || is_prefix("yes", 1) || is_prefix("on", 2) || lower == "1" {
        Some(true)
    } else if is_prefix("false", 1) || is_prefix("no", 1) || is_prefix("off", 2) || lower == "0" {
        Some(false)
    } else {
        None
    }
}

fn parse_hosts(value: &str, source: Source<'_>) -> Result<Vec<Host>> {
    if value.is_empty() {
        return Ok(Vec::new());
    }
    value
        .split(',')
        .map(|host| {
            if host.is_empty() {
                Ok(Host::Unix(default_socket_dir()))
            } else if host.starts_with('/') {
                Ok(Host::Unix(PathBuf::from(host)))
            } else if host.starts_with('@') {
                Err(bad_value(
                    source,
                    format!("host \"{host}\": abstract Unix sockets are not supported"),
                    "give a socket directory starting with / or a TCP host name in host",
                ))
            } else {
                Ok(Host::Tcp(host.to_string()))
            }
        })
        .collect()
}

fn parse_host_addrs(value: &str, source: Source<'_>) -> Result<Vec<Option<String>>> {
    if value.is_empty() {
        return Ok(Vec::new());
    }
    value
        .split(',')
        .map(|addr| {
            if addr.is_empty() {
                return Ok(None);
            }
            let numeric = addr.parse::<std::net::IpAddr>().is_ok()
                || addr.split_once('%').is_some_and(|(ip, zone)| {
                    !zone.is_empty() && ip.parse::<std::net::Ipv6Addr>().is_ok()
                });
            if numeric {
                Ok(Some(addr.to_string()))
            } else {
                Err(bad_value(
                    source,
                    format!("could not parse network address \"{addr}\" in hostaddr"),
                    "hostaddr takes numeric IPv4 or IPv6 addresses only; put host names in host",
                ))
            }
        })
        .collect()
}

fn parse_ports(value: &str, source: Source<'_>) -> Result<Vec<u16>> {
    if value.is_empty() {
        return Ok(Vec::new());
    }
    value
        .split(',')
        .map(|port| {
            if port.is_empty() {
                return Ok(DEFAULT_PORT);
            }
            let number = parse_int_option(Keyword::Port, port, source)?;
            u16::try_from(number)
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| {
                    bad_value(
                        source,
                        format!("invalid port number: \"{port}\" in port"),
                        "use a port between 1 and 65535 (PostgreSQL listens on 5432 by default)",
                    )
                })
        })
        .collect()
}

/// The libpq spelling of an sslmode, e.g. `verify-full`.
pub(crate) fn ssl_mode_name(mode: SslMode) -> &'static str {
    match mode {
        SslMode::Disable => "disable",
        SslMode::Allow => "allow",
        SslMode::Prefer => "prefer",
        SslMode::Require => "require",
        SslMode::VerifyCa => "verify-ca",
        SslMode::VerifyFull => "verify-full",
    }
}

pub(super) fn channel_binding_name(binding: ChannelBinding) -> &'static str {
    match binding {
        ChannelBinding::Disable => "disable",
        ChannelBinding::Prefer => "prefer",
        ChannelBinding::Require => "require",
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    #[test]
    fn invalid_values_name_the_problem() {
        check_errors(&[
            ("password=a\0b", &["password", "NUL"]),
            ("sslmode=bogus", &["invalid sslmode value: \"bogus\""]),
            ("sslmode=", &["invalid sslmode value: \"\""]),
            ("sslmode=Require", &["sslmode"]),
            ("channel_binding=maybe", &["invalid channel_binding value"]),
            ("sslnegotiation=fast", &["invalid sslnegotiation value"]),
            ("replication=maybe", &["invalid replication value"]),
            (
                "connect_timeout=abc",
                &["invalid integer value \"abc\"", "connect_timeout"],
            ),
            ("connect_timeout=", &["connect_timeout"]),
            ("connect_timeout=99999999999", &["connect_timeout"]),
            ("keepalives=yes", &["keepalives"]),
            ("keepalives_idle=1.5", &["keepalives_idle"]),
            (
                "keepalives_count=x",
                &["invalid integer value \"x\" for connection option \"keepalives_count\""],
            ),
            // libpq reads an empty value as a bad integer too.
            (
                "keepalives_interval=",
                &["invalid integer value \"\" for connection option \"keepalives_interval\""],
            ),
            (
                "tcp_user_timeout=10ms",
                &["invalid integer value \"10ms\" for connection option \"tcp_user_timeout\""],
            ),
            ("keepalives_idle=2147483648", &["keepalives_idle"]),
            ("port=0", &["invalid port number", "port"]),
            ("port=65536", &["invalid port number"]),
            ("port=-1", &["invalid port number"]),
            ("port=5432x", &["invalid integer value", "port"]),
            ("host=@abstract", &["abstract", "@abstract"]),
            (
                "hostaddr=db.example.com",
                &["could not parse network address", "hostaddr"],
            ),
            ("gssencmode=require", &["gssencmode", "GSSAPI"]),
            ("gssencmode=bogus", &["invalid gssencmode value"]),
            (
                "client_encoding=LATIN1",
                &["client_encoding=LATIN1", "UTF8"],
            ),
            (
                "target_session_attrs=bogus",
                &["invalid target_session_attrs value"],
            ),
            (
                "load_balance_hosts=bogus",
                &["invalid load_balance_hosts value"],
            ),
            ("sslcertmode=always", &["invalid sslcertmode value"]),
            ("require_auth=bogus", &["require_auth"]),
            ("require_auth=!md5,password", &["require_auth", "negative"]),
            (
                "ssl_min_protocol_version=SSLv3",
                &["ssl_min_protocol_version"],
            ),
        ]);
    }

    #[test]
    fn accepted_and_ignored_options() {
        let ignored = "client_encoding=utf-8 target_session_attrs=any gssencmode=disable \
            gssencmode=prefer krbsrvname=postgres sslcompression=0 sslcrl='' sslcrldir='' \
            sslsni=1 sslpassword='' ssl_min_protocol_version=TLSv1.2 \
            ssl_max_protocol_version='' requirepeer='' load_balance_hosts=disable \
            sslcertmode=allow gssdelegation=0";
        assert_eq!(Config::parse(ignored).unwrap(), Config::default());

        // What pg_basebackup -R writes as primary_conninfo.
        let primary = "user=repl passfile='/var/lib/postgresql/.pgpass' channel_binding=prefer \
            host=primary port=5432 sslmode=prefer sslnegotiation=postgres sslcompression=0 \
            sslcertmode=allow sslsni=1 ssl_min_protocol_version=TLSv1.2 gssencmode=prefer \
            krbsrvname=postgres gssdelegation=0 target_session_attrs=any load_balance_hosts=disable";
        let config = Config::parse(primary).unwrap();
        assert_eq!(config.user.as_deref(), Some("repl"));
        assert_eq!(config.hosts, vec![tcp("primary")]);
        assert_eq!(
            config.passfile,
            Some(PathBuf::from("/var/lib/postgresql/.pgpass"))
        );
    }

    #[test]
    fn tcp_options_read_integers_as_libpq_does() {
        // pqParseIntParam: white space around, a sign, 32 bits; negatives count as 0.
        for (text, value) in [
            ("0", 0),
            ("7", 7),
            (" 7\t", 7),
            ("+7", 7),
            ("-7", 0),
            ("2147483647", 2_147_483_647u64),
        ] {
            let c = Config::parse(&format!(
                "keepalives_idle='{text}' keepalives_interval='{text}' keepalives_count='{text}' tcp_user_timeout='{text}'"
            ))
            .unwrap();
            assert_eq!(
                c.keepalives_idle,
                Some(Duration::from_secs(value)),
                "{text:?}"
            );
            assert_eq!(
                c.keepalives_interval,
                Some(Duration::from_secs(value)),
                "{text:?}"
            );
            assert_eq!(
                c.keepalives_count,
                Some(u32::try_from(value).unwrap()),
                "{text:?}"
            );
            assert_eq!(
                c.tcp_user_timeout,
                Some(Duration::from_millis(value)),
                "{text:?}"
            );
        }
        for (text, on) in [
            ("1", true),
            ("0", false),
            ("-1", true),
            (" 0 ", false),
            ("42", true),
        ] {
            assert_eq!(
                Config::parse(&format!("keepalives='{text}'"))
                    .unwrap()
                    .keepalives,
                on,
                "{text:?}"
            );
        }
        // Unset means the system's defaults, and keepalives on.
        let c = Config::parse("").unwrap();
        assert!(c.keepalives);
        assert_eq!(
            (
                c.keepalives_idle,
                c.keepalives_interval,
                c.keepalives_count,
                c.tcp_user_timeout
            ),
            (None, None, None, None)
        );
        // libpq has no environment variable for them; a service file may set them.
        let c =
            Config::parse_with_getenv("", &env(&[("PGKEEPALIVES", "0"), ("HOME", "/h")])).unwrap();
        assert!(c.keepalives);
    }

    proptest::proptest! {
        #[test]
        fn any_int_is_read_like_strtol(n in proptest::prelude::any::<i32>(), pad in "[ \t]{0,2}") {
            let c = Config::parse(&format!("keepalives_count='{pad}{n}{pad}' tcp_user_timeout={n}")).unwrap();
            proptest::prop_assert_eq!(c.keepalives_count, Some(n.max(0).unsigned_abs()));
            proptest::prop_assert_eq!(c.tcp_user_timeout, Some(Duration::from_millis(u64::from(n.max(0).unsigned_abs()))));
            let text = c.to_conninfo_string();
            proptest::prop_assert_eq!(Config::parse(&text).unwrap(), c);
        }

        #[test]
        fn anything_else_is_refused(text in "[0-9a-z.+-]{0,12}") {
            let libpq_accepts = text.trim_matches(' ').parse::<i32>().is_ok();
            let parsed = Config::parse(&format!("keepalives_interval='{text}'"));
            proptest::prop_assert_eq!(parsed.is_ok(), libpq_accepts, "{:?}", text);
        }
    }

    #[test]
    fn session_attrs_load_balancing_and_require_auth_values() {
        for (value, expected) in [
            ("any", TargetSessionAttrs::Any),
            ("read-write", TargetSessionAttrs::ReadWrite),
            ("read-only", TargetSessionAttrs::ReadOnly),
            ("primary", TargetSessionAttrs::Primary),
            ("standby", TargetSessionAttrs::Standby),
            ("prefer-standby", TargetSessionAttrs::PreferStandby),
        ] {
            let config = Config::parse(&format!("target_session_attrs={value}")).unwrap();
            assert_eq!(config.target_session_attrs, expected);
            assert_eq!(expected.as_str(), value);
        }
        // As in libpq: exact spelling, and an empty value is invalid too.
        for bad in ["Primary", "read_write", "", "master"] {
            let err = parse_err(&format!("target_session_attrs='{bad}'"));
            assert_eq!(
                err.message(),
                format!("invalid target_session_attrs value: \"{bad}\"")
            );
        }
        assert_eq!(
            Config::parse("load_balance_hosts=random")
                .unwrap()
                .load_balance_hosts,
            LoadBalanceHosts::Random
        );
        for bad in ["RANDOM", "", "round-robin", "enable"] {
            let err = parse_err(&format!("load_balance_hosts='{bad}'"));
            assert_eq!(
                err.message(),
                format!("invalid load_balance_hosts value: \"{bad}\"")
            );
            assert!(err.advice().unwrap().contains("disable, random"), "{err}");
        }
        let config = Config::parse("require_auth=!password,!md5").unwrap();
        assert_eq!(config.require_auth.unwrap().as_str(), "!password,!md5");
        // require_auth='' is kept: libpq then refuses every authentication request.
        let config = Config::parse("require_auth=''").unwrap();
        assert_eq!(config.require_auth.unwrap().as_str(), "");
        let err = parse_err("require_auth=password,!md5");
        assert_eq!(
            err.message(),
            "negative require_auth method \"!md5\" cannot be mixed with non-negative methods"
        );
        let err = Config::parse_with_getenv("", &env(&[("PGREQUIREAUTH", "md5,md5")])).unwrap_err();
        assert!(
            err.message().contains("is specified more than once"),
            "{err}"
        );
        assert!(err.message().contains("PGREQUIREAUTH"), "{err}");
    }

    #[test]
    fn replication_values() {
        let cases: &[(&str, Option<ReplicationMode>)] = &[
            ("true", Some(ReplicationMode::Physical)),
            ("on", Some(ReplicationMode::Physical)),
            ("yes", Some(ReplicationMode::Physical)),
            ("1", Some(ReplicationMode::Physical)),
            ("TRUE", Some(ReplicationMode::Physical)),
            ("t", Some(ReplicationMode::Physical)),
            ("y", Some(ReplicationMode::Physical)),
            ("database", Some(ReplicationMode::Database)),
            ("false", Some(ReplicationMode::Off)),
            ("off", Some(ReplicationMode::Off)),
            ("no", Some(ReplicationMode::Off)),
            ("0", Some(ReplicationMode::Off)),
            ("f", Some(ReplicationMode::Off)),
            ("OFF", Some(ReplicationMode::Off)),
            ("o", None),
            ("Database", None),
            ("2", None),
            ("", None),
            ("truex", None),
        ];
        for (value, expected) in cases {
            let result = Config::parse(&format!("replication='{value}'"));
            match expected {
                Some(mode) => assert_eq!(result.unwrap().replication, *mode, "{value:?}"),
                None => {
                    let err = result.unwrap_err();
                    assert!(err.message().contains("replication"), "{value:?}: {err}");
                }
            }
        }
    }

    #[test]
    fn connect_timeout_rules() {
        let cases: &[(&str, Option<u64>)] = &[
            ("0", None),
            ("-5", None),
            ("1", Some(2)),
            ("2", Some(2)),
            ("10", Some(10)),
            (" 10 ", Some(10)),
            ("+3", Some(3)),
            ("2147483647", Some(2_147_483_647)),
        ];
        for (value, expected) in cases {
            let config = Config::parse(&format!("connect_timeout='{value}'")).unwrap();
            assert_eq!(
                config.connect_timeout,
                expected.map(Duration::from_secs),
                "{value:?}"
            );
        }
        for bad in ["", "abc", "1.5", "10s", "2147483648", "1 0"] {
            let err = parse_err(&format!("connect_timeout='{bad}'"));
            assert!(err.message().contains("connect_timeout"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn environment_fills_unset_fields() {
        let getenv = env(&[
            ("PGHOST", "db9"),
            ("PGHOSTADDR", "10.0.0.9"),
            ("PGPORT", "6543"),
            ("PGUSER", "envuser"),
            ("PGPASSWORD", "envpw"),
            ("PGDATABASE", "envdb"),
            ("PGSSLMODE", "require"),
            ("PGSSLROOTCERT", "/r"),
            ("PGSSLCERT", "/c"),
            ("PGSSLKEY", "/k"),
            ("PGSSLNEGOTIATION", "direct"),
            ("PGCHANNELBINDING", "require"),
            ("PGAPPNAME", "envapp"),
            ("PGCONNECT_TIMEOUT", "1"),
            ("PGOPTIONS", "-c x=y"),
            ("HOME", "/home/u"),
        ]);
        let config = Config::parse_with_getenv("", &getenv).unwrap();
        let expected = Config {
            hosts: vec![tcp("db9")],
            host_addrs: vec![some("10.0.0.9")],
            ports: vec![6543],
            user: some("envuser"),
            password: some("envpw"),
            passfile: Some(PathBuf::from("/home/u/.pgpass")),
            dbname: some("envdb"),
            application_name: some("envapp"),
            options: some("-c x=y"),
            connect_timeout: Some(Duration::from_secs(2)),
            ssl_mode: SslMode::Require,
            ssl_root_cert: Some(PathBuf::from("/r")),
            ssl_cert: Some(PathBuf::from("/c")),
            ssl_key: Some(PathBuf::from("/k")),
            ssl_negotiation: SslNegotiation::Direct,
            channel_binding: ChannelBinding::Require,
            ..Config::default()
        };
        assert_eq!(config, expected);

        // apply_env on an already parsed configuration does the same.
        let mut config = Config::parse("").unwrap();
        config.apply_env(&getenv).unwrap();
        assert_eq!(config, expected);
    }

    #[test]
    fn explicit_options_beat_the_environment() {
        let getenv = env(&[
            ("PGHOST", "envhost"),
            ("PGPORT", "6543"),
            ("PGUSER", "envuser"),
            ("PGDATABASE", "envdb"),
            ("PGSSLMODE", "disable"),
            ("PGCHANNELBINDING", "disable"),
            ("PGAPPNAME", "envapp"),
            ("PGPASSFILE", "/env/pgpass"),
            ("PGTARGETSESSIONATTRS", "read-write"),
            ("HOME", "/home/u"),
        ]);
        let config = Config::parse_with_getenv(
            "host=a port=1 user=u sslmode=verify-ca channel_binding=require application_name=x \
             passfile=/explicit target_session_attrs=any",
            &getenv,
        )
        .unwrap();
        assert_eq!(config.hosts, vec![tcp("a")]);
        assert_eq!(config.ports, vec![1]);
        assert_eq!(config.user.as_deref(), Some("u"));
        assert_eq!(config.dbname.as_deref(), Some("envdb"));
        assert_eq!(config.ssl_mode, SslMode::VerifyCa);
        assert_eq!(config.channel_binding, ChannelBinding::Require);
        assert_eq!(config.application_name.as_deref(), Some("x"));
        assert_eq!(config.passfile, Some(PathBuf::from("/explicit")));
        assert_eq!(config.target_session_attrs, TargetSessionAttrs::Any);

        // An explicit default value still wins, and so does an explicit empty value
        // (as in libpq).
        let config = Config::parse_with_getenv(
            "sslmode=prefer channel_binding=prefer host='' dbname='' target_session_attrs=any",
            &getenv,
        )
        .unwrap();
        assert_eq!(config.ssl_mode, SslMode::Prefer);
        assert_eq!(config.channel_binding, ChannelBinding::Prefer);
        assert!(config.hosts.is_empty());
        assert_eq!(config.dbname, None);

        // Fields set in code (not parsed) are not overridden either.
        let mut config = Config {
            ssl_mode: SslMode::VerifyFull,
            user: some("coded"),
            ..Config::default()
        };
        config
            .apply_env(env(&[("PGSSLMODE", "disable"), ("PGUSER", "envuser")]))
            .unwrap();
        assert_eq!(config.ssl_mode, SslMode::VerifyFull);
        assert_eq!(config.user.as_deref(), Some("coded"));
    }

    #[test]
    fn environment_errors_name_the_variable() {
        let cases: &[(&str, &str, &str)] = &[
            ("PGSSLMODE", "bogus", "sslmode"),
            ("PGPORT", "abc", "port"),
            ("PGCONNECT_TIMEOUT", "soon", "connect_timeout"),
            ("PGHOSTADDR", "db.example.com", "hostaddr"),
            ("PGTARGETSESSIONATTRS", "read_write", "target_session_attrs"),
            ("PGGSSENCMODE", "require", "gssencmode"),
            ("PGLOADBALANCEHOSTS", "shuffle", "load_balance_hosts"),
            ("PGREQUIREAUTH", "scram", "require_auth"),
            ("PGCHANNELBINDING", "sometimes", "channel_binding"),
        ];
        for (var, value, key) in cases {
            let err =
                Config::parse_with_getenv("", &env(&[(var, value), ("HOME", "/h")])).unwrap_err();
            assert!(err.message().contains(var), "{var}: {err}");
            assert!(err.message().contains(key), "{var}: {err}");
            assert!(err.advice().unwrap().contains(var), "{var}: {err}");
        }
        // An invalid variable is not even looked at when the option was given.
        Config::parse_with_getenv("sslmode=require", &env(&[("PGSSLMODE", "bogus")])).unwrap();
    }

    #[test]
    fn environment_special_cases() {
        // PGPASSFILE, else $HOME/.pgpass; an empty PGPASSFILE means the default.
        let config =
            Config::parse_with_getenv("", &env(&[("PGPASSFILE", "/pw"), ("HOME", "/h")])).unwrap();
        assert_eq!(config.passfile, Some(PathBuf::from("/pw")));
        let config =
            Config::parse_with_getenv("", &env(&[("PGPASSFILE", ""), ("HOME", "/h")])).unwrap();
        assert_eq!(config.passfile, Some(PathBuf::from("/h/.pgpass")));
        let config = Config::parse_with_getenv(
            "passfile=''",
            &env(&[("PGPASSFILE", "/pw"), ("HOME", "/h")]),
        )
        .unwrap();
        assert_eq!(config.passfile, Some(PathBuf::from("/h/.pgpass")));

        // PGREQUIRESSL=1 means sslmode=require unless PGSSLMODE is set.
        let config =
            Config::parse_with_getenv("", &env(&[("PGREQUIRESSL", "1"), ("HOME", "/h")])).unwrap();
        assert_eq!(config.ssl_mode, SslMode::Require);
        let config = Config::parse_with_getenv(
            "",
            &env(&[
                ("PGREQUIRESSL", "1"),
                ("PGSSLMODE", "verify-ca"),
                ("HOME", "/h"),
            ]),
        )
        .unwrap();
        assert_eq!(config.ssl_mode, SslMode::VerifyCa);

        // Lists are matched after the environment is applied, as in libpq.
        let config =
            Config::parse_with_getenv("port=1,2", &env(&[("PGHOST", "a,b"), ("HOME", "/h")]))
                .unwrap();
        assert_eq!(config.hosts, vec![tcp("a"), tcp("b")]);
        assert!(Config::parse("port=1,2").is_err());

        // sslnegotiation=direct is checked against the final sslmode.
        let config = Config::parse_with_getenv(
            "sslnegotiation=direct",
            &env(&[("PGSSLMODE", "require"), ("HOME", "/h")]),
        )
        .unwrap();
        assert_eq!(config.ssl_negotiation, SslNegotiation::Direct);
        let mut config = Config::parse("").unwrap();
        let err = config
            .apply_env(env(&[("PGSSLNEGOTIATION", "direct"), ("HOME", "/h")]))
            .unwrap_err();
        assert!(err.message().contains("sslnegotiation=direct"), "{err}");

        // sslrootcert=system defaults to verify-full; a weaker PGSSLMODE is an error.
        let config =
            Config::parse_with_getenv("", &env(&[("PGSSLROOTCERT", "system"), ("HOME", "/h")]))
                .unwrap();
        assert_eq!(config.ssl_mode, SslMode::VerifyFull);
        let err = Config::parse_with_getenv(
            "sslrootcert=system",
            &env(&[("PGSSLMODE", "verify-ca"), ("HOME", "/h")]),
        )
        .unwrap_err();
        assert!(err.message().contains("sslrootcert=system"), "{err}");
    }

    #[test]
    fn tls_options_are_stored_and_round_trip() {
        let config = Config::parse(
            "sslcrl=/c.crl sslcrldir=/crls sslsni=0 ssl_min_protocol_version=tlsv1.3 \
             ssl_max_protocol_version=TLSv1.3 sslcertmode=require sslpassword='s3 cret'",
        )
        .unwrap();
        assert_eq!(config.ssl_crl, Some(PathBuf::from("/c.crl")));
        assert_eq!(config.ssl_crl_dir, Some(PathBuf::from("/crls")));
        assert!(!config.ssl_sni);
        assert_eq!(config.ssl_min_protocol_version, SslProtocolVersion::Tls1_3);
        assert_eq!(
            config.ssl_max_protocol_version,
            Some(SslProtocolVersion::Tls1_3)
        );
        assert_eq!(config.ssl_cert_mode, SslCertMode::Require);
        assert_eq!(config.ssl_password.as_deref(), Some("s3 cret"));
        assert!(!format!("{config:?}").contains("s3 cret"));
        let text = config.to_conninfo_string();
        assert_eq!(Config::parse(&text).unwrap(), config, "{text}");

        // libpq turns SNI on only for values starting with '1'.
        for (value, sni) in [("1", true), ("0", false), ("yes", false), ("10", true)] {
            let parsed = Config::parse(&format!("sslsni={value}")).unwrap();
            assert_eq!(parsed.ssl_sni, sni, "sslsni={value}");
        }
        // A floor below TLS 1.2 is met by every version this client speaks.
        let low = Config::parse("ssl_min_protocol_version=TLSv1").unwrap();
        assert_eq!(low.ssl_min_protocol_version, SslProtocolVersion::Tls1_0);
        let disable = Config::parse("sslcertmode=disable").unwrap();
        assert_eq!(disable.ssl_cert_mode, SslCertMode::Disable);
        assert!(disable.to_conninfo_string().contains("sslcertmode=disable"));

        // The environment fills them like any other option.
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(key, _)| *key == name)
                    .map(|(_, value)| value.to_string())
            }
        };
        let mut from_env = Config::parse("sslsni=1").unwrap();
        from_env
            .apply_env(env(&[
                ("PGSSLCRL", "/e.crl"),
                ("PGSSLSNI", "0"),
                ("PGSSLMAXPROTOCOLVERSION", "TLSv1.2"),
                ("PGSSLCERTMODE", "disable"),
                ("HOME", "/h"),
            ]))
            .unwrap();
        assert_eq!(from_env.ssl_crl, Some(PathBuf::from("/e.crl")));
        assert!(from_env.ssl_sni, "the string's sslsni=1 wins over PGSSLSNI");
        assert_eq!(
            from_env.ssl_max_protocol_version,
            Some(SslProtocolVersion::Tls1_2)
        );
        assert_eq!(from_env.ssl_cert_mode, SslCertMode::Disable);
    }
}
