//! libpq-compatible connection configuration.
//!
//! Accepts `key=value` connection strings and `postgresql://` URIs, applies the PG*
//! environment variables and looks passwords up in the password file, as libpq does.
//!
//! The code is split by concern:
//!
//! * `keywords`: the table of options with their environment variables, how each value
//!   is checked and stored, and how the environment fills unset options;
//! * `conninfo`: `key=value` strings, read and written;
//! * `uri`: `postgresql://` URIs;
//! * `passfile`: the password file (`~/.pgpass`);
//! * `service`: service files (`pg_service.conf`);
//! * `require_auth`: the `require_auth` policy.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};

mod conninfo;
mod keywords;
mod passfile;
pub(crate) mod require_auth;
mod service;
#[cfg(test)]
mod test_util;
mod uri;

use conninfo::{host_text, parse_key_value, quote_for_display};
pub(crate) use conninfo::{whole_millis, whole_seconds};
pub(crate) use keywords::ssl_mode_name;
use keywords::{KeySet, Keyword, Source};
pub use require_auth::RequireAuth;
pub use service::DEFAULT_SYSCONFDIR;
use uri::{parse_uri, strip_uri_prefix};

/// Where to connect: a TCP host name or address, or a Unix-socket directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// A host name or IP address, reached over TCP.
    Tcp(String),
    /// A directory holding the server's socket `.s.PGSQL.<port>`.
    Unix(PathBuf),
}

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Never use TLS.
    Disable,
    /// Try without TLS first; use TLS if the server insists.
    Allow,
    /// Try TLS first; fall back to no TLS (the libpq default). As in libpq, a TLS
    /// attempt verifies the chain like `VerifyCa` when a root certificate file is given
    /// (or `~/.postgresql/root.crt` exists), and a failed verification falls back too.
    #[default]
    Prefer,
    /// Use TLS without verifying the server's certificate (unless a root certificate
    /// file is given, in which case it behaves like `VerifyCa`, as libpq does).
    Require,
    /// Use TLS and verify the certificate chain, but not the host name.
    VerifyCa,
    /// Use TLS and verify the chain and that the certificate matches the host name.
    VerifyFull,
}

/// libpq's `channel_binding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChannelBinding {
    /// Never use channel binding.
    Disable,
    /// Use it when the server offers it over TLS (the default).
    #[default]
    Prefer,
    /// Fail unless SCRAM-SHA-256-PLUS with channel binding is used.
    Require,
}

/// libpq's `sslnegotiation` (PostgreSQL 17+ servers understand `direct`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslNegotiation {
    /// Send an SSLRequest and start TLS when the server answers `S`.
    #[default]
    Postgres,
    /// Start the TLS handshake at once, with ALPN `postgresql` (PG17+ only).
    Direct,
}

/// A TLS protocol version, for libpq's `ssl_min_protocol_version` and
/// `ssl_max_protocol_version`.
///
/// This client speaks TLS 1.2 and 1.3. A minimum of `TLSv1` or `TLSv1.1` is honoured
/// (every version it offers is newer); a maximum below `TLSv1.2` is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum SslProtocolVersion {
    /// `TLSv1` (TLS 1.0).
    Tls1_0,
    /// `TLSv1.1`.
    Tls1_1,
    /// `TLSv1.2`, libpq's default minimum.
    #[default]
    Tls1_2,
    /// `TLSv1.3`.
    Tls1_3,
}

impl SslProtocolVersion {
    /// libpq's spelling, e.g. `TLSv1.2`.
    pub fn name(self) -> &'static str {
        match self {
            SslProtocolVersion::Tls1_0 => "TLSv1",
            SslProtocolVersion::Tls1_1 => "TLSv1.1",
            SslProtocolVersion::Tls1_2 => "TLSv1.2",
            SslProtocolVersion::Tls1_3 => "TLSv1.3",
        }
    }
}

/// libpq's `sslcertmode` (libpq 16+).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslCertMode {
    /// Never send a client certificate, even when one is configured.
    Disable,
    /// Send the configured client certificate when the server asks for one.
    #[default]
    Allow,
    /// Fail unless the server asked for a client certificate and one was sent.
    Require,
}

/// What kind of session the startup packet asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReplicationMode {
    /// A normal SQL session.
    #[default]
    Off,
    /// A physical walsender (`replication=true`).
    Physical,
    /// A logical walsender tied to a database (`replication=database`).
    Database,
}

/// libpq's `target_session_attrs`: which kind of server a connection must reach. With
/// several hosts, hosts that do not qualify are skipped, as libpq skips them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TargetSessionAttrs {
    /// Any server (the default).
    #[default]
    Any,
    /// A server whose sessions are read-write by default (not in hot standby and
    /// `default_transaction_read_only` off).
    ReadWrite,
    /// A server whose sessions are read-only by default.
    ReadOnly,
    /// A server that is not in hot standby (a primary).
    Primary,
    /// A server in hot standby.
    Standby,
    /// A standby if any host is one; otherwise, in a second pass over the hosts, any.
    PreferStandby,
}

impl TargetSessionAttrs {
    /// The libpq spelling, e.g. `prefer-standby`.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetSessionAttrs::Any => "any",
            TargetSessionAttrs::ReadWrite => "read-write",
            TargetSessionAttrs::ReadOnly => "read-only",
            TargetSessionAttrs::Primary => "primary",
            TargetSessionAttrs::Standby => "standby",
            TargetSessionAttrs::PreferStandby => "prefer-standby",
        }
    }
}

/// libpq's `load_balance_hosts` (libpq 16+).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadBalanceHosts {
    /// Try the hosts, and the addresses of each host, in order (the default).
    #[default]
    Disable,
    /// Try the hosts in a random order, and the addresses of each host in a random
    /// order, chosen anew for every connection.
    Random,
}

/// The port libpq uses when none is given.
pub const DEFAULT_PORT: u16 = 5432;

/// A parsed, validated connection configuration.
///
/// ```
/// use pgwire_repl::config::{Config, Host, SslMode};
/// let config = Config::parse("host=db1 port=5433 user=repl sslmode=verify-full").unwrap();
/// assert_eq!(config.hosts, vec![Host::Tcp("db1".into())]);
/// assert_eq!(config.ports, vec![5433]);
/// assert_eq!(config.ssl_mode, SslMode::VerifyFull);
/// ```
///
/// Equality compares the public fields only (not which of them were given explicitly).
#[derive(Clone)]
pub struct Config {
    /// Hosts to try in order (libpq's comma-separated `host`). Empty means the default
    /// Unix-socket directory, as libpq does on Unix; see [`Config::targets`].
    pub hosts: Vec<Host>,
    /// `hostaddr` values, parallel to `hosts` when given (numeric addresses that skip DNS).
    pub host_addrs: Vec<Option<String>>,
    /// Ports, one per host, or one for all. Empty means 5432.
    pub ports: Vec<u16>,
    /// The role name. Defaults to the operating-system user name, as libpq does.
    pub user: Option<String>,
    /// The password, when given in the string or in PGPASSWORD.
    pub password: Option<String>,
    /// The password file (`passfile`, PGPASSFILE, default `~/.pgpass`).
    pub passfile: Option<PathBuf>,
    /// The database name (used by SQL sessions and `replication=database`).
    pub dbname: Option<String>,
    /// `application_name`.
    pub application_name: Option<String>,
    /// `fallback_application_name`, used when `application_name` is not set.
    pub fallback_application_name: Option<String>,
    /// Command-line options sent to the server (`options`, e.g. `-c wal_sender_timeout=0`).
    pub options: Option<String>,
    /// `connect_timeout`; libpq treats values below 2 seconds as 2 seconds and 0 as none.
    pub connect_timeout: Option<Duration>,
    /// `sslmode`.
    pub ssl_mode: SslMode,
    /// `sslrootcert`: a PEM file with trusted root certificates. The special value
    /// `system` means the system's trusted roots (and then `sslmode` defaults to
    /// `verify-full` and must be `verify-full`, as in libpq 16+).
    pub ssl_root_cert: Option<PathBuf>,
    /// `sslcert`: the client certificate (PEM).
    pub ssl_cert: Option<PathBuf>,
    /// `sslkey`: the client certificate's private key (PEM).
    pub ssl_key: Option<PathBuf>,
    /// `sslnegotiation`.
    pub ssl_negotiation: SslNegotiation,
    /// `sslcrl`: a PEM file of certificate revocation lists. When the server's
    /// certificate is verified (a root certificate is configured), every certificate of
    /// the chain must be covered by a current CRL from its issuer and not be revoked, as
    /// libpq (OpenSSL) checks it. Defaults to `~/.postgresql/root.crl` when that exists.
    pub ssl_crl: Option<PathBuf>,
    /// `sslcrldir`: a directory of CRLs named by OpenSSL's issuer hash (`<hash>.r0`, as
    /// `openssl rehash` names them); checked like [`Config::ssl_crl`].
    pub ssl_crl_dir: Option<PathBuf>,
    /// `sslsni`: send the host name as TLS Server Name Indication (default on; as in
    /// libpq, any value not starting with `1` turns it off). Never sent for IP
    /// addresses.
    pub ssl_sni: bool,
    /// `ssl_min_protocol_version` (default `TLSv1.2`, as in libpq).
    pub ssl_min_protocol_version: SslProtocolVersion,
    /// `ssl_max_protocol_version` (default: no maximum).
    pub ssl_max_protocol_version: Option<SslProtocolVersion>,
    /// `sslcertmode`.
    pub ssl_cert_mode: SslCertMode,
    /// `sslpassword`: the pass phrase of an encrypted (PKCS#8) `sslkey`.
    pub ssl_password: Option<String>,
    /// `requirepeer`: over a Unix socket, the OS user the server process must run as
    /// (checked with the socket's peer credentials before anything is sent).
    pub require_peer: Option<String>,
    /// `channel_binding`.
    pub channel_binding: ChannelBinding,
    /// `replication`.
    pub replication: ReplicationMode,
    /// `service`: the name of a section in a service file (`pg_service.conf`). It is
    /// looked up, and its options applied to every option not given explicitly, by
    /// [`Config::parse_with_env`] and [`Config::apply_env`], in libpq's order:
    /// `PGSERVICEFILE` (else `~/.pg_service.conf`), then `pg_service.conf` in
    /// `PGSYSCONFDIR` (else [`DEFAULT_SYSCONFDIR`]). A configuration whose service was
    /// never looked up (one made by [`Config::parse`] alone) refuses to connect.
    pub service: Option<String>,
    /// `target_session_attrs`.
    pub target_session_attrs: TargetSessionAttrs,
    /// `load_balance_hosts`.
    pub load_balance_hosts: LoadBalanceHosts,
    /// `require_auth`: the authentication methods the server may ask for.
    pub require_auth: Option<RequireAuth>,
    /// TCP keepalives (`keepalives`, default on; libpq's `keepalives=0`, any integer
    /// that is 0, turns them off).
    ///
    /// This and the four options below are applied as libpq applies them: to TCP
    /// sockets only (over a Unix socket they are ignored), before the socket connects,
    /// and with libpq's quirks: `tcp_user_timeout` is not applied when keepalives are
    /// off, a negative value counts as 0, and a value the operating system refuses
    /// (Linux refuses 0 for the three `keepalives_*` settings) fails that address as
    /// `setsockopt(…) failed: …`, and the next address or host is tried. Unset options
    /// leave the system's defaults (`net.ipv4.tcp_keepalive_*`).
    pub keepalives: bool,
    /// `keepalives_idle`, in whole seconds: how long the connection is idle before the
    /// first probe (`TCP_KEEPIDLE`). A fraction of a second counts as a whole one.
    pub keepalives_idle: Option<Duration>,
    /// `keepalives_interval`, in whole seconds: the time between unanswered probes
    /// (`TCP_KEEPINTVL`).
    pub keepalives_interval: Option<Duration>,
    /// `keepalives_count`: how many unanswered probes make the connection dead
    /// (`TCP_KEEPCNT`).
    pub keepalives_count: Option<u32>,
    /// `tcp_user_timeout`, in whole milliseconds: how long sent data may stay
    /// unacknowledged before the connection is dead (`TCP_USER_TIMEOUT`; 0 means the
    /// system default).
    pub tcp_user_timeout: Option<Duration>,
    /// Which options were given explicitly (in the string or the environment), so that
    /// [`Config::apply_env`] does not override them, as libpq does.
    explicitly_set: KeySet,
    /// Whether `service` has been looked up and its options applied.
    service_applied: bool,
}

impl PartialEq for Config {
    fn eq(&self, other: &Config) -> bool {
        self.hosts == other.hosts
            && self.host_addrs == other.host_addrs
            && self.ports == other.ports
            && self.user == other.user
            && self.password == other.password
            && self.passfile == other.passfile
            && self.dbname == other.dbname
            && self.application_name == other.application_name
            && self.fallback_application_name == other.fallback_application_name
            && self.options == other.options
            && self.connect_timeout == other.connect_timeout
            && self.ssl_mode == other.ssl_mode
            && self.ssl_root_cert == other.ssl_root_cert
            && self.ssl_cert == other.ssl_cert
            && self.ssl_key == other.ssl_key
            && self.ssl_negotiation == other.ssl_negotiation
            && self.ssl_crl == other.ssl_crl
            && self.ssl_crl_dir == other.ssl_crl_dir
            && self.ssl_sni == other.ssl_sni
            && self.ssl_min_protocol_version == other.ssl_min_protocol_version
            && self.ssl_max_protocol_version == other.ssl_max_protocol_version
            && self.ssl_cert_mode == other.ssl_cert_mode
            && self.ssl_password == other.ssl_password
            && self.require_peer == other.require_peer
            && self.channel_binding == other.channel_binding
            && self.replication == other.replication
            && self.service == other.service
            && self.target_session_attrs == other.target_session_attrs
            && self.load_balance_hosts == other.load_balance_hosts
            && self.require_auth == other.require_auth
            && self.keepalives == other.keepalives
            && self.keepalives_idle == other.keepalives_idle
            && self.keepalives_interval == other.keepalives_interval
            && self.keepalives_count == other.keepalives_count
            && self.tcp_user_timeout == other.tcp_user_timeout
    }
}

impl Eq for Config {}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password.
        f.debug_struct("Config")
            .field("hosts", &self.hosts)
            .field("host_addrs", &self.host_addrs)
            .field("ports", &self.ports)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("passfile", &self.passfile)
            .field("dbname", &self.dbname)
            .field("application_name", &self.application_name)
            .field("fallback_application_name", &self.fallback_application_name)
            .field("options", &self.options)
            .field("connect_timeout", &self.connect_timeout)
            .field("ssl_mode", &self.ssl_mode)
            .field("ssl_root_cert", &self.ssl_root_cert)
            .field("ssl_cert", &self.ssl_cert)
            .field("ssl_key", &self.ssl_key)
            .field("ssl_negotiation", &self.ssl_negotiation)
            .field("ssl_crl", &self.ssl_crl)
            .field("ssl_crl_dir", &self.ssl_crl_dir)
            .field("ssl_sni", &self.ssl_sni)
            .field("ssl_min_protocol_version", &self.ssl_min_protocol_version)
            .field("ssl_max_protocol_version", &self.ssl_max_protocol_version)
            .field("ssl_cert_mode", &self.ssl_cert_mode)
            .field(
                "ssl_password",
                &self.ssl_password.as_ref().map(|_| "<redacted>"),
            )
            .field("require_peer", &self.require_peer)
            .field("channel_binding", &self.channel_binding)
            .field("replication", &self.replication)
            .field("service", &self.service)
            .field("target_session_attrs", &self.target_session_attrs)
            .field("load_balance_hosts", &self.load_balance_hosts)
            .field("require_auth", &self.require_auth)
            .field("keepalives", &self.keepalives)
            .field("keepalives_idle", &self.keepalives_idle)
            .field("keepalives_interval", &self.keepalives_interval)
            .field("keepalives_count", &self.keepalives_count)
            .field("tcp_user_timeout", &self.tcp_user_timeout)
            .finish()
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            hosts: Vec::new(),
            host_addrs: Vec::new(),
            ports: Vec::new(),
            user: None,
            password: None,
            passfile: None,
            dbname: None,
            application_name: None,
            fallback_application_name: None,
            options: None,
            connect_timeout: None,
            ssl_mode: SslMode::Prefer,
            ssl_root_cert: None,
            ssl_cert: None,
            ssl_key: None,
            ssl_negotiation: SslNegotiation::Postgres,
            ssl_crl: None,
            ssl_crl_dir: None,
            ssl_sni: true,
            ssl_min_protocol_version: SslProtocolVersion::Tls1_2,
            ssl_max_protocol_version: None,
            ssl_cert_mode: SslCertMode::Allow,
            ssl_password: None,
            require_peer: None,
            channel_binding: ChannelBinding::Prefer,
            replication: ReplicationMode::Off,
            service: None,
            target_session_attrs: TargetSessionAttrs::Any,
            load_balance_hosts: LoadBalanceHosts::Disable,
            require_auth: None,
            keepalives: true,
            keepalives_idle: None,
            keepalives_interval: None,
            keepalives_count: None,
            tcp_user_timeout: None,
            explicitly_set: KeySet::default(),
            service_applied: false,
        }
    }
}
impl Config {
    /// Parses a `key=value` connection string or a `postgresql://` / `postgres://` URI,
    /// without looking at the environment, and [validates](Config::validate) the result.
    ///
    /// Unknown options are an error, duplicate options keep the last value, and an empty
    /// value means "not set" for string options (as in libpq).
    ///
    /// No file is read: a `service` is only recorded, and a configuration with a service
    /// that was never looked up refuses to connect. Use [`Config::parse_with_env`] (or
    /// [`Config::apply_env`]) for the service file, as libpq does.
    pub fn parse(conninfo: &str) -> Result<Config> {
        let config = Config::parse_unvalidated(conninfo)?;
        config.validate()?;
        Ok(config)
    }

    /// Parses like [`Config::parse`], then applies the service file (`service=` or
    /// PGSERVICE) and fills the remaining unset fields from the PG* environment
    /// variables, as libpq does (see [`Config::apply_env`]), and validates the result
    /// (so that, as in libpq, a port list in the string may be matched by a host list
    /// from PGHOST).
    pub fn parse_with_env(conninfo: &str) -> Result<Config> {
        Config::parse_with_getenv(conninfo, &|name: &str| std::env::var(name).ok())
    }

    /// [`Config::parse_with_env`] with the environment read through `getenv`.
    fn parse_with_getenv(
        conninfo: &str,
        getenv: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config> {
        let mut config = Config::parse_unvalidated(conninfo)?;
        config.apply_env_unvalidated(getenv)?;
        config.validate()?;
        Ok(config)
    }

    /// Applies the service file and the environment, as libpq does before connecting,
    /// then [validates](Config::validate) the result.
    ///
    /// First the service named by `service` (or, when that was not given, by
    /// `PGSERVICE`) is looked up (see [`Config::service`]) and its options fill the
    /// options not given explicitly. Then unset fields are filled from the environment
    /// variables read through `getenv` (PGHOST, PGHOSTADDR, PGPORT, PGUSER, PGPASSWORD,
    /// PGPASSFILE, PGDATABASE, PGSSLMODE, PGSSLROOTCERT, PGSSLCERT, PGSSLKEY,
    /// PGSSLNEGOTIATION, PGCHANNELBINDING, PGAPPNAME, PGCONNECT_TIMEOUT, PGOPTIONS,
    /// PGTARGETSESSIONATTRS, PGLOADBALANCEHOSTS, PGREQUIREAUTH, …).
    ///
    /// Values already set win: options given in the connection string (even as an empty
    /// value, as in libpq), then the service's, and fields that differ from their
    /// defaults. The variables of the libpq options this client does not implement
    /// (PGGSSENCMODE=require, …) are checked the same way as in a connection string, so
    /// that a value this client cannot honour is an error rather than silently ignored.
    /// The deprecated PGREQUIRESSL=1 means `sslmode=require`.
    ///
    /// When no password file is configured, it becomes `$HOME/.pgpass` (the home
    /// directory from `getenv("HOME")`, else from the password database).
    pub fn apply_env(&mut self, getenv: impl Fn(&str) -> Option<String>) -> Result<()> {
        self.apply_env_unvalidated(&getenv)?;
        self.validate()
    }

    /// Checks the combinations of options that libpq refuses before connecting:
    /// host, hostaddr and port list lengths, `sslnegotiation=direct` with a weak
    /// `sslmode`, `channel_binding=require` with `sslmode=disable`, and
    /// `sslrootcert=system` with anything but `sslmode=verify-full`.
    pub fn validate(&self) -> Result<()> {
        self.validate_tls_versions()?;
        if !self.hosts.is_empty()
            && !self.host_addrs.is_empty()
            && self.hosts.len() != self.host_addrs.len()
        {
            return Err(Error::config(
                format!(
                    "could not match {} host names to {} hostaddr values",
                    self.hosts.len(),
                    self.host_addrs.len()
                ),
                "give host and hostaddr lists with the same number of comma-separated entries (or drop hostaddr)",
            ));
        }
        let slots = self.slot_count();
        if self.ports.len() > 1 && self.ports.len() != slots {
            return Err(Error::config(
                format!(
                    "could not match {} port numbers to {} hosts",
                    self.ports.len(),
                    slots
                ),
                "give either one port for all hosts or exactly one port per host, in the same order",
            ));
        }
        if self.ports.contains(&0) {
            return Err(Error::config(
                "invalid port number: \"0\"",
                "use a port between 1 and 65535 (PostgreSQL listens on 5432 by default)",
            ));
        }
        if self.ssl_negotiation == SslNegotiation::Direct
            && !matches!(
                self.ssl_mode,
                SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
            )
        {
            return Err(Error::config(
                format!(
                    "weak sslmode \"{}\" may not be used with sslnegotiation=direct",
                    ssl_mode_name(self.ssl_mode)
                ),
                "use sslmode=require, verify-ca or verify-full with sslnegotiation=direct, or use sslnegotiation=postgres",
            ));
        }
        if self.channel_binding == ChannelBinding::Require && self.ssl_mode == SslMode::Disable {
            return Err(Error::config(
                "channel_binding=require cannot be used with sslmode=disable",
                "channel binding needs TLS: use sslmode=require (or verify-ca/verify-full), or lower channel_binding to prefer",
            ));
        }
        if self.ssl_root_cert_is_system() && self.ssl_mode != SslMode::VerifyFull {
            return Err(Error::config(
                format!(
                    "weak sslmode \"{}\" may not be used with sslrootcert=system",
                    ssl_mode_name(self.ssl_mode)
                ),
                "use sslmode=verify-full with sslrootcert=system (or use sslrootcert=./system for a file named system)",
            ));
        }
        Ok(())
    }

    /// libpq's `ssl_min_protocol_version` / `ssl_max_protocol_version` range check,
    /// plus this client's floor: a maximum below TLS 1.2 cannot be honoured.
    pub(crate) fn validate_tls_versions(&self) -> Result<()> {
        let Some(max) = self.ssl_max_protocol_version else {
            return Ok(());
        };
        if max < SslProtocolVersion::Tls1_2 {
            return Err(Error::config(
                format!(
                    "ssl_max_protocol_version={} is not supported: this client speaks TLS 1.2 and TLS 1.3 only",
                    max.name()
                ),
                "raise ssl_max_protocol_version to TLSv1.2 or TLSv1.3 (or remove it), and enable TLS 1.2 or later on the server",
            ));
        }
        if max < self.ssl_min_protocol_version {
            return Err(Error::config(
                format!(
                    "invalid SSL protocol version range: ssl_min_protocol_version={} is above ssl_max_protocol_version={}",
                    self.ssl_min_protocol_version.name(),
                    max.name()
                ),
                "make ssl_min_protocol_version lower than or equal to ssl_max_protocol_version",
            ));
        }
        Ok(())
    }

    /// The user name to log in as: the configured one, else the operating-system user
    /// (from the password database, else the `USER` environment variable).
    pub fn effective_user(&self) -> Result<String> {
        if let Some(user) = self.user.as_ref().filter(|user| !user.is_empty()) {
            return Ok(user.clone());
        }
        if let Some((name, _)) = passwd_entry() {
            return Ok(name);
        }
        if let Some(name) = std::env::var("USER").ok().filter(|name| !name.is_empty()) {
            return Ok(name);
        }
        Err(Error::config(
            "could not determine the user name: no user option or PGUSER, and the operating-system user has no name",
            "set user=<role> in the connection string or the PGUSER environment variable",
        ))
    }

    /// A short description of where this configuration connects, for messages, such as
    /// `host=db1 port=5432 user=repl`. Never includes the password.
    pub fn display_target(&self) -> String {
        let targets = self.targets();
        let hosts: Vec<String> = targets.iter().map(|(host, _, _)| host_text(host)).collect();
        let mut parts = vec![format!("host={}", quote_for_display(&hosts.join(",")))];
        if targets.iter().any(|(_, addr, _)| addr.is_some()) {
            let addrs: Vec<&str> = targets
                .iter()
                .map(|(_, addr, _)| addr.as_deref().unwrap_or(""))
                .collect();
            parts.push(format!("hostaddr={}", quote_for_display(&addrs.join(","))));
        }
        let ports: Vec<String> = targets
            .iter()
            .map(|(_, _, port)| port.to_string())
            .collect();
        let port = if ports.windows(2).all(|w| w.first() == w.get(1)) {
            ports
                .first()
                .cloned()
                .unwrap_or_else(|| DEFAULT_PORT.to_string())
        } else {
            ports.join(",")
        };
        parts.push(format!("port={port}"));
        if let Some(user) = &self.user {
            parts.push(format!("user={}", quote_for_display(user)));
        }
        if let Some(dbname) = &self.dbname {
            parts.push(format!("dbname={}", quote_for_display(dbname)));
        }
        parts.join(" ")
    }

    /// The connection targets to try in order, as `(host, hostaddr, port)`, with libpq's
    /// defaults filled in: no host means the default Unix-socket directory
    /// (`/var/run/postgresql` if it exists, else `/tmp`); no port means 5432; a single
    /// port applies to every host.
    ///
    /// When the hostaddr is `Some`, connect over TCP to that numeric address and use the
    /// host (then always [`Host::Tcp`]: the configured name, or the address itself when
    /// no name was given) for TLS host-name checks and the password file.
    pub fn targets(&self) -> Vec<(Host, Option<String>, u16)> {
        (0..self.slot_count())
            .map(|i| {
                let addr = self.host_addrs.get(i).cloned().flatten();
                let host = match (self.hosts.get(i), &addr) {
                    (Some(Host::Tcp(name)), _) if !name.is_empty() => Host::Tcp(name.clone()),
                    (Some(Host::Unix(dir)), None) => Host::Unix(dir.clone()),
                    (_, Some(addr)) => Host::Tcp(addr.clone()),
                    (_, None) => Host::Unix(default_socket_dir()),
                };
                let port = match self.ports.as_slice() {
                    [port] => *port,
                    ports => ports.get(i).copied().unwrap_or(DEFAULT_PORT),
                };
                (host, addr, port)
            })
            .collect()
    }

    /// A copy that connects only to one entry of the host list, such as the one a
    /// connection reached ([`crate::Connection::endpoint`]): every later connection of
    /// a multi-connection job (a base backup and its WAL stream) then talks to the same
    /// server. `target_session_attrs` is kept, so a server that changed role meanwhile
    /// is refused rather than used.
    ///
    /// ```
    /// use pgwire_repl::config::{Config, Host};
    /// let config = Config::parse("host=a,b port=5432,5433 load_balance_hosts=random").unwrap();
    /// let pinned = config.for_host(&Host::Tcp("b".into()), None, 5433);
    /// assert_eq!(pinned.targets(), vec![(Host::Tcp("b".into()), None, 5433)]);
    /// ```
    pub fn for_host(&self, host: &Host, host_addr: Option<&str>, port: u16) -> Config {
        let mut config = self.clone();
        config.hosts = vec![host.clone()];
        config.host_addrs = host_addr
            .map(|addr| vec![Some(addr.to_string())])
            .unwrap_or_default();
        config.ports = vec![port];
        config.load_balance_hosts = LoadBalanceHosts::Disable;
        config
    }

    fn slot_count(&self) -> usize {
        if !self.host_addrs.is_empty() {
            self.host_addrs.len()
        } else {
            self.hosts.len().max(1)
        }
    }

    fn ssl_root_cert_is_system(&self) -> bool {
        self.ssl_root_cert
            .as_deref()
            .is_some_and(|path| path == Path::new("system"))
    }

    fn parse_unvalidated(conninfo: &str) -> Result<Config> {
        let pairs = match strip_uri_prefix(conninfo) {
            Some(rest) => parse_uri(rest)?,
            None => parse_key_value(conninfo)?,
        };
        // Duplicate keys: the last one wins, as in libpq.
        let mut seen = KeySet::default();
        let mut latest = Vec::with_capacity(pairs.len());
        for (key, value) in pairs.into_iter().rev() {
            if !seen.contains(key) {
                seen.insert(key);
                latest.push((key, value));
            }
        }
        latest.reverse();
        let mut config = Config::default();
        for (key, value) in latest {
            config.set_option(key, &value, Source::ConnInfo)?;
        }
        config.apply_derived_defaults();
        Ok(config)
    }

    /// Defaults that depend on other options: `sslrootcert=system` makes `verify-full`
    /// the default `sslmode`.
    fn apply_derived_defaults(&mut self) {
        if !self.explicitly_set.contains(Keyword::SslMode)
            && self.ssl_mode == SslMode::Prefer
            && self.ssl_root_cert_is_system()
        {
            self.ssl_mode = SslMode::VerifyFull;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Environment and operating system

fn default_socket_dir() -> PathBuf {
    let debian = Path::new("/var/run/postgresql");
    if debian.is_dir() {
        debian.to_path_buf()
    } else {
        PathBuf::from("/tmp")
    }
}

fn home_dir(getenv: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if let Some(home) = getenv("HOME").filter(|home| !home.is_empty()) {
        return Some(PathBuf::from(home));
    }
    passwd_entry().and_then(|(_, dir)| dir)
}

/// The effective user's name and home directory from the password database.
#[cfg(unix)]
fn passwd_entry() -> Option<(String, Option<PathBuf>)> {
    use std::ffi::CStr;
    use std::os::unix::ffi::OsStrExt;

    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    let mut buf_len = 1024usize;
    loop {
        let mut buf: Vec<libc::c_char> = vec![0; buf_len];
        // SAFETY: `passwd` is a plain C struct of integers and pointers, for which all
        // zero bytes is a valid value.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the duration of the call and `buf` really
        // has `buf.len()` bytes.
        let rc =
            unsafe { libc::getpwuid_r(uid, &mut entry, buf.as_mut_ptr(), buf.len(), &mut result) };
        if rc == libc::ERANGE && buf_len < (1 << 20) {
            buf_len *= 2;
            continue;
        }
        if rc != 0 || result.is_null() || entry.pw_name.is_null() {
            return None;
        }
        // SAFETY: on success `pw_name` and `pw_dir` (checked for null) point to
        // NUL-terminated strings inside `buf`, which is still alive.
        let name = unsafe { CStr::from_ptr(entry.pw_name) };
        let dir = (!entry.pw_dir.is_null())
            // SAFETY: as above.
            .then(|| unsafe { CStr::from_ptr(entry.pw_dir) })
            .map(|dir| PathBuf::from(std::ffi::OsStr::from_bytes(dir.to_bytes())))
            .filter(|dir| !dir.as_os_str().is_empty());
        let name = name.to_str().ok().filter(|name| !name.is_empty())?;
        return Some((name.to_string(), dir));
    }
}

#[cfg(not(unix))]
fn passwd_entry() -> Option<(String, Option<PathBuf>)> {
    None
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn invalid_combinations_name_the_problem() {
        check_errors(&[
            (
                "ssl_max_protocol_version=TLSv1.1 ssl_min_protocol_version=TLSv1",
                &["ssl_max_protocol_version=TLSv1.1", "TLS 1.2"],
            ),
            (
                "ssl_min_protocol_version=TLSv1.3 ssl_max_protocol_version=TLSv1.2",
                &["invalid SSL protocol version range"],
            ),
            (
                "host=a,b,c port=1,2",
                &["could not match 2 port numbers to 3 hosts"],
            ),
            (
                "hostaddr=10.0.0.1,10.0.0.2 port=1,2,3",
                &["could not match 3 port numbers to 2 hosts"],
            ),
            (
                "host=a,b hostaddr=10.0.0.1",
                &["could not match 2 host names to 1 hostaddr values"],
            ),
            (
                "sslnegotiation=direct",
                &["sslnegotiation=direct", "prefer"],
            ),
            (
                "sslnegotiation=direct sslmode=allow",
                &["sslnegotiation=direct", "allow"],
            ),
            (
                "channel_binding=require sslmode=disable",
                &["channel_binding=require", "sslmode=disable"],
            ),
            (
                "sslrootcert=system sslmode=require",
                &["sslrootcert=system", "require"],
            ),
        ]);
    }

    #[test]
    fn targets_expand_defaults() {
        let socket = Host::Unix(default_socket_dir());
        type Target = (Host, Option<String>, u16);
        let cases: &[(&str, Vec<Target>)] = &[
            ("", vec![(socket.clone(), None, 5432)]),
            ("port=6000", vec![(socket.clone(), None, 6000)]),
            (
                "host=a,b port=6000",
                vec![(tcp("a"), None, 6000), (tcp("b"), None, 6000)],
            ),
            (
                "host=a,/tmp port=1,2",
                vec![(tcp("a"), None, 1), (unix("/tmp"), None, 2)],
            ),
            (
                "hostaddr=10.0.0.1",
                vec![(tcp("10.0.0.1"), some("10.0.0.1"), 5432)],
            ),
            (
                "host=db1,db2 hostaddr=10.0.0.1,",
                vec![
                    (tcp("db1"), some("10.0.0.1"), 5432),
                    (tcp("db2"), None, 5432),
                ],
            ),
            (
                "host=/tmp hostaddr=10.0.0.1",
                vec![(tcp("10.0.0.1"), some("10.0.0.1"), 5432)],
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(
                &Config::parse(input).unwrap().targets(),
                expected,
                "{input:?}"
            );
        }
    }

    #[test]
    fn display_target_never_shows_the_password() {
        let config =
            Config::parse("host=db1,db2 port=5433 user=repl password=secret dbname=x").unwrap();
        assert_eq!(
            config.display_target(),
            "host=db1,db2 port=5433 user=repl dbname=x"
        );
        let config = Config::parse("host=a,b port=1,2 user='odd user'").unwrap();
        assert_eq!(config.display_target(), "host=a,b port=1,2 user='odd user'");
        let config = Config::parse("").unwrap();
        assert_eq!(
            config.display_target(),
            format!("host={} port=5432", default_socket_dir().display())
        );
        let config = Config::parse("password=secret").unwrap();
        assert!(!format!("{config:?}").contains("secret"));
    }

    #[test]
    fn effective_user_prefers_the_configured_user() {
        let config = Config::parse("user=repl").unwrap();
        assert_eq!(config.effective_user().unwrap(), "repl");
        match Config::default().effective_user() {
            Ok(name) => assert!(!name.is_empty()),
            Err(err) => assert_eq!(err.kind(), ErrorKind::Config),
        }
    }
}
