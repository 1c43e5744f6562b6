//! libpq-compatible connection configuration.
//!
//! Accepts `key=value` connection strings and `postgresql://` URIs, applies the PG*
//! environment variables and looks passwords up in the password file, as libpq does.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};

pub(crate) mod require_auth;
mod service;

pub use require_auth::RequireAuth;
pub use service::DEFAULT_SYSCONFDIR;

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
    /// TCP keepalives (`keepalives`, default on).
    pub keepalives: bool,
    /// `keepalives_idle`, when set.
    pub keepalives_idle: Option<Duration>,
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

    /// The password for one connection attempt: the configured one, else the first
    /// matching line of the password file (`hostname:port:database:username:password`).
    ///
    /// `host` is the host as configured (a socket directory matches either its path or
    /// `localhost`), `dbname` is the database the startup packet names (`replication` for
    /// physical replication connections). As in libpq, a missing password file is
    /// silently ignored and a password file that is not a plain file or that is
    /// accessible by group or others is ignored with a warning.
    pub fn password_for(&self, host: &Host, port: u16, dbname: &str, user: &str) -> Option<String> {
        if let Some(password) = self.password.as_ref().filter(|p| !p.is_empty()) {
            return Some(password.clone());
        }
        let passfile = self.passfile.as_deref()?;
        password_from_file(passfile, host, port, dbname, user)
    }

    /// The configuration as a libpq `key=value` string that [`Config::parse`] reads back
    /// to an equal configuration (for `primary_conninfo`, for example).
    ///
    /// Unset fields and fields at their defaults are left out; the password is included
    /// when set. Values are quoted as libpq's own tools quote them: anything but a
    /// non-empty run of ASCII letters, digits, `_` and `.` is put in single quotes, with
    /// `'` and `\` escaped by a backslash.
    pub fn to_conninfo_string(&self) -> String {
        let mut out = ConnInfoWriter::default();
        out.opt("user", self.user.as_deref());
        out.opt("password", self.password.as_deref());
        out.opt_path("passfile", self.passfile.as_deref());
        if self.channel_binding != ChannelBinding::default() {
            out.push(
                "channel_binding",
                channel_binding_name(self.channel_binding),
            );
        }
        if !self.hosts.is_empty() {
            let hosts: Vec<String> = self.hosts.iter().map(host_text).collect();
            out.push("host", &hosts.join(","));
        }
        if !self.host_addrs.is_empty() {
            let addrs: Vec<&str> = self
                .host_addrs
                .iter()
                .map(|addr| addr.as_deref().unwrap_or(""))
                .collect();
            out.push("hostaddr", &addrs.join(","));
        }
        if !self.ports.is_empty() {
            let ports: Vec<String> = self.ports.iter().map(u16::to_string).collect();
            out.push("port", &ports.join(","));
        }
        out.opt("dbname", self.dbname.as_deref());
        out.opt("application_name", self.application_name.as_deref());
        out.opt(
            "fallback_application_name",
            self.fallback_application_name.as_deref(),
        );
        out.opt("options", self.options.as_deref());
        if let Some(timeout) = self.connect_timeout {
            out.push("connect_timeout", &whole_seconds(timeout).to_string());
        }
        if self.ssl_mode != SslMode::default() {
            out.push("sslmode", ssl_mode_name(self.ssl_mode));
        }
        if self.ssl_negotiation != SslNegotiation::default() {
            out.push("sslnegotiation", "direct");
        }
        out.opt_path("sslrootcert", self.ssl_root_cert.as_deref());
        out.opt_path("sslcert", self.ssl_cert.as_deref());
        out.opt_path("sslkey", self.ssl_key.as_deref());
        out.opt("sslpassword", self.ssl_password.as_deref());
        out.opt_path("sslcrl", self.ssl_crl.as_deref());
        out.opt_path("sslcrldir", self.ssl_crl_dir.as_deref());
        if !self.ssl_sni {
            out.push("sslsni", "0");
        }
        if self.ssl_min_protocol_version != SslProtocolVersion::default() {
            out.push(
                "ssl_min_protocol_version",
                self.ssl_min_protocol_version.name(),
            );
        }
        if let Some(max) = self.ssl_max_protocol_version {
            out.push("ssl_max_protocol_version", max.name());
        }
        match self.ssl_cert_mode {
            SslCertMode::Allow => {}
            SslCertMode::Disable => out.push("sslcertmode", "disable"),
            SslCertMode::Require => out.push("sslcertmode", "require"),
        }
        if let Some(peer) = &self.require_peer {
            out.push("requirepeer", peer);
        }
        match self.replication {
            ReplicationMode::Off => {}
            ReplicationMode::Physical => out.push("replication", "true"),
            ReplicationMode::Database => out.push("replication", "database"),
        }
        if !self.service_applied {
            // Not looked up yet: keep the name (once applied, its options are above).
            if let Some(service) = &self.service {
                out.push("service", service);
            }
        }
        if self.target_session_attrs != TargetSessionAttrs::Any {
            out.push("target_session_attrs", self.target_session_attrs.as_str());
        }
        if self.load_balance_hosts == LoadBalanceHosts::Random {
            out.push("load_balance_hosts", "random");
        }
        if let Some(policy) = &self.require_auth {
            out.push("require_auth", policy.as_str());
        }
        if !self.keepalives {
            out.push("keepalives", "0");
        }
        if let Some(idle) = self.keepalives_idle {
            out.push("keepalives_idle", &whole_seconds(idle).to_string());
        }
        out.finish()
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

    fn apply_env_unvalidated(&mut self, getenv: &dyn Fn(&str) -> Option<String>) -> Result<()> {
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

    /// Looks up the service (from `service`, else PGSERVICE) and fills the options not
    /// given explicitly from it, as libpq's `parseServiceInfo` does.
    fn apply_service(&mut self, getenv: &dyn Fn(&str) -> Option<String>) -> Result<()> {
        if self.service_applied {
            return Ok(());
        }
        let from_env = self.service.is_none();
        let name = match &self.service {
            Some(name) => Some(name.clone()),
            None => getenv("PGSERVICE"),
        };
        let Some(name) = name else {
            self.service_applied = true;
            return Ok(());
        };
        let entries = service::lookup(&name, getenv, home_dir(getenv), &|keyword| {
            Keyword::from_name(keyword).is_some()
        })
        .map_err(|e| {
            if from_env {
                let advice = e.advice().unwrap_or_default().to_string();
                e.with_advice(format!(
                    "{advice}; the service name came from the environment variable PGSERVICE: unset it if it is not meant for this connection"
                ))
            } else {
                e
            }
        })?;
        for entry in &entries {
            let Some(key) = Keyword::from_name(&entry.keyword) else {
                continue;
            };
            if self.explicitly_set.contains(key) || !self.is_unset(key) {
                continue;
            }
            self.set_option(
                key,
                &entry.value,
                Source::Service {
                    name: &name,
                    file: &entry.file,
                    line: entry.line,
                },
            )?;
        }
        self.service = Some(name);
        self.explicitly_set.insert(Keyword::Service);
        self.service_applied = true;
        Ok(())
    }

    /// An error unless the service (if any) has been looked up: a configuration from
    /// [`Config::parse`] alone never read the service file, and connecting with it would
    /// silently ignore the service's options.
    pub(crate) fn check_service_applied(&self) -> Result<()> {
        match &self.service {
            Some(name) if !self.service_applied => Err(Error::usage(
                format!("service \"{name}\" was never looked up: this configuration was made with Config::parse, which reads neither service files nor the environment"),
                "make the configuration with Config::parse_with_env (or call apply_env on it), so that the service file is read as libpq reads it",
            )),
            _ => Ok(()),
        }
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

    /// Whether the field behind `key` still holds its default (so the environment may
    /// fill it). Options that are not stored always count as unset.
    fn is_unset(&self, key: Keyword) -> bool {
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
            Keyword::Service => self.service.is_none(),
            Keyword::TargetSessionAttrs => self.target_session_attrs == TargetSessionAttrs::Any,
            Keyword::LoadBalanceHosts => self.load_balance_hosts == LoadBalanceHosts::Disable,
            Keyword::RequireAuth => self.require_auth.is_none(),
            Keyword::RequirePeer => self.require_peer.is_none(),
            _ => true,
        }
    }

    /// Stores one option, checking its value.
    fn set_option(&mut self, key: Keyword, value: &str, source: Source<'_>) -> Result<()> {
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
            Keyword::KeepalivesIdle => {
                let seconds = parse_int_option(key, value, source)?;
                self.keepalives_idle = (seconds > 0)
                    .then(|| Duration::from_secs(u64::from(seconds.unsigned_abs())));
            }
            // Accepted and ignored.
            Keyword::ClientEncoding | Keyword::KrbSrvName | Keyword::SslCompression | Keyword::GssDelegation => {}
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
            Keyword::KeepalivesInterval | Keyword::KeepalivesCount | Keyword::TcpUserTimeout => {
                if !value.is_empty() {
                    parse_int_option(key, value, source)?;
                }
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
enum Keyword {
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
    fn from_name(name: &str) -> Option<Keyword> {
        KEYS.iter()
            .find(|info| info.name == name)
            .map(|info| info.key)
    }

    fn name(self) -> &'static str {
        KEYS.iter()
            .find(|info| info.key == self)
            .map_or("?", |info| info.name)
    }
}

/// A set of [`Keyword`]s (there are fewer than 64).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct KeySet(u64);

impl KeySet {
    fn bit(key: Keyword) -> u64 {
        1u64 << (key as u32)
    }

    fn contains(self, key: Keyword) -> bool {
        self.0 & KeySet::bit(key) != 0
    }

    fn insert(&mut self, key: Keyword) {
        self.0 |= KeySet::bit(key);
    }
}

fn known_options() -> String {
    KEYS.iter()
        .map(|info| info.name)
        .collect::<Vec<_>>()
        .join(", ")
}

fn unknown_option(name: &str, in_uri: bool) -> Error {
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
enum Source<'a> {
    ConnInfo,
    Env(&'a str),
    Service {
        name: &'a str,
        file: &'a Path,
        line: usize,
    },
}

fn bad_value(source: Source<'_>, message: impl Into<String>, advice: &str) -> Error {
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
fn is_space(c: char) -> bool {
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

// ---------------------------------------------------------------------------------------
// key=value strings

fn missing_equals(name: &str) -> Error {
    Error::config(
        format!("missing \"=\" after \"{name}\" in connection info string"),
        "write options as key=value pairs separated by spaces, e.g. host=db1 port=5432 user=repl; put values containing spaces in single quotes",
    )
}

/// Splits a libpq `key=value` string into (key, value) pairs, in order.
fn parse_key_value(conninfo: &str) -> Result<Vec<(Keyword, String)>> {
    let mut pairs = Vec::new();
    let mut chars = conninfo.chars().peekable();
    loop {
        while chars.next_if(|&c| is_space(c)).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut name = String::new();
        while let Some(c) = chars.next_if(|&c| c != '=' && !is_space(c)) {
            name.push(c);
        }
        while chars.next_if(|&c| is_space(c)).is_some() {}
        if chars.next() != Some('=') {
            return Err(missing_equals(&name));
        }
        while chars.next_if(|&c| is_space(c)).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => {
                        return Err(Error::config(
                            format!("unterminated quoted string in connection info string (value of \"{name}\")"),
                            "close the quoted value with ' and write a quote inside a value as \\' and a backslash as \\\\",
                        ))
                    }
                    Some('\\') => {
                        if let Some(c) = chars.next() {
                            value.push(c);
                        }
                    }
                    Some('\'') => break,
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next() {
                if is_space(c) {
                    break;
                }
                if c == '\\' {
                    if let Some(escaped) = chars.next() {
                        value.push(escaped);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        let key = Keyword::from_name(&name).ok_or_else(|| unknown_option(&name, false))?;
        pairs.push((key, value));
    }
}

/// Quotes a value as libpq's `appendConnStrVal` does.
fn quote_conninfo_value(value: &str) -> String {
    let plain = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    if plain {
        return value.to_string();
    }
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('\'');
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('\'');
    quoted
}

/// Quotes a value for a message only when a reader could not tell where it ends.
fn quote_for_display(value: &str) -> String {
    if value.is_empty() || value.chars().any(|c| is_space(c) || c == '\'' || c == '\\') {
        quote_conninfo_value(value)
    } else {
        value.to_string()
    }
}

#[derive(Default)]
struct ConnInfoWriter {
    parts: Vec<String>,
}

impl ConnInfoWriter {
    fn push(&mut self, key: &str, value: &str) {
        self.parts
            .push(format!("{key}={}", quote_conninfo_value(value)));
    }

    fn opt(&mut self, key: &str, value: Option<&str>) {
        if let Some(value) = value.filter(|v| !v.is_empty()) {
            self.push(key, value);
        }
    }

    fn opt_path(&mut self, key: &str, value: Option<&Path>) {
        self.opt(key, value.map(|p| p.to_string_lossy()).as_deref());
    }

    fn finish(self) -> String {
        self.parts.join(" ")
    }
}

fn host_text(host: &Host) -> String {
    match host {
        Host::Tcp(name) => name.clone(),
        Host::Unix(dir) => dir.to_string_lossy().into_owned(),
    }
}

/// Whole seconds, rounded up so that a non-zero duration stays non-zero.
fn whole_seconds(duration: Duration) -> u64 {
    let seconds = duration.as_secs();
    if duration.subsec_nanos() > 0 {
        seconds.saturating_add(1)
    } else {
        seconds
    }
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

fn channel_binding_name(binding: ChannelBinding) -> &'static str {
    match binding {
        ChannelBinding::Disable => "disable",
        ChannelBinding::Prefer => "prefer",
        ChannelBinding::Require => "require",
    }
}

// ---------------------------------------------------------------------------------------
// URIs

fn strip_uri_prefix(conninfo: &str) -> Option<&str> {
    conninfo
        .strip_prefix("postgresql://")
        .or_else(|| conninfo.strip_prefix("postgres://"))
}

/// The first character and the rest.
fn split_first_char(s: &str) -> (Option<char>, &str) {
    let mut chars = s.chars();
    let first = chars.next();
    (first, chars.as_str())
}

fn uri_error(message: impl Into<String>) -> Error {
    Error::config(
        message,
        "write the URI as postgresql://[user[:password]@][host][:port][,host[:port]...][/dbname][?key=value&...], percent-encoding reserved characters (%40 for @, %2F for /, %3A for :)",
    )
}

/// Decodes `%XX` escapes; `what` names the URI part for error messages.
fn uri_decode(value: &str, what: &str, show: bool) -> Result<String> {
    let shown = if show {
        format!(": \"{value}\"")
    } else {
        String::new()
    };
    let mut out = Vec::with_capacity(value.len());
    let mut bytes = value.bytes();
    while let Some(b) = bytes.next() {
        if b != b'%' {
            out.push(b);
            continue;
        }
        let hex = |b: Option<u8>| b.and_then(|b| char::from(b).to_digit(16));
        match (hex(bytes.next()), hex(bytes.next())) {
            (Some(hi), Some(lo)) => {
                let byte = (hi * 16 + lo) as u8;
                if byte == 0 {
                    return Err(uri_error(format!(
                        "forbidden value %00 in percent-encoded {what} in URI{shown}"
                    )));
                }
                out.push(byte);
            }
            _ => {
                return Err(uri_error(format!(
                    "invalid percent-encoded token in {what} in URI{shown}"
                )))
            }
        }
    }
    String::from_utf8(out).map_err(|_| {
        uri_error(format!(
            "percent-decoded {what} in URI is not valid UTF-8{shown}"
        ))
    })
}

/// Splits a URI (after `postgresql://`) into (key, value) pairs, as libpq's
/// `conninfo_uri_parse_options` does.
fn parse_uri(rest: &str) -> Result<Vec<(Keyword, String)>> {
    let mut pairs = Vec::new();
    let mut p = rest;

    // [user[:password]@]: libpq looks for '@' before the first '/'.
    if let Some(at) = p.find(['@', '/']).filter(|&i| p[i..].starts_with('@')) {
        let (credentials, after) = p.split_at(at);
        let (user, password) = match credentials.split_once(':') {
            Some((user, password)) => (user, Some(password)),
            None => (credentials, None),
        };
        if !user.is_empty() {
            pairs.push((Keyword::User, uri_decode(user, "user name", true)?));
        }
        if let Some(password) = password.filter(|p| !p.is_empty()) {
            pairs.push((Keyword::Password, uri_decode(password, "password", false)?));
        }
        p = split_first_char(after).1;
    }

    // host[:port][,host[:port]...]
    let mut hosts = String::new();
    let mut ports = String::new();
    let terminator = loop {
        let host;
        if let Some(after) = p.strip_prefix('[') {
            let close = after.find(']').ok_or_else(|| {
                uri_error("end of string reached when looking for matching \"]\" in IPv6 host address in URI")
            })?;
            if close == 0 {
                return Err(uri_error("IPv6 host address may not be empty in URI"));
            }
            let (address, tail) = after.split_at(close);
            host = address;
            p = split_first_char(tail).1;
            match p.chars().next() {
                None | Some(':' | '/' | '?' | ',') => {}
                Some(c) => {
                    return Err(uri_error(format!(
                        "unexpected character \"{c}\" after IPv6 host address in URI (expected \":\", \"/\", \"?\" or \",\")"
                    )))
                }
            }
        } else {
            let end = p.find([':', '/', '?', ',']).unwrap_or(p.len());
            let (name, tail) = p.split_at(end);
            host = name;
            p = tail;
        }
        hosts.push_str(host);
        let (mut term, tail) = split_first_char(p);
        p = tail;
        if term == Some(':') {
            let end = p.find(['/', '?', ',']).unwrap_or(p.len());
            let (port, tail) = p.split_at(end);
            ports.push_str(port);
            let (next, tail) = split_first_char(tail);
            term = next;
            p = tail;
        }
        if term != Some(',') {
            break term;
        }
        hosts.push(',');
        ports.push(',');
    };
    if !hosts.is_empty() {
        pairs.push((Keyword::Host, uri_decode(&hosts, "host", true)?));
    }
    if !ports.is_empty() {
        pairs.push((Keyword::Port, uri_decode(&ports, "port", true)?));
    }

    // [/dbname]
    let mut terminator = terminator;
    if terminator.is_some() && terminator != Some('?') {
        let end = p.find('?').unwrap_or(p.len());
        let (dbname, tail) = p.split_at(end);
        // An empty dbname is left unset so that PGDATABASE still applies, as in libpq.
        if !dbname.is_empty() {
            pairs.push((Keyword::Dbname, uri_decode(dbname, "database name", true)?));
        }
        let (next, tail) = split_first_char(tail);
        terminator = next;
        p = tail;
    }

    // [?key=value&...]
    if terminator.is_some() {
        let mut params = p;
        while !params.is_empty() {
            let (param, next) = params.split_once('&').unwrap_or((params, ""));
            params = next;
            let Some((name, value)) = param.split_once('=') else {
                return Err(uri_error(format!(
                    "missing key/value separator \"=\" in URI query parameter: \"{param}\""
                )));
            };
            if value.contains('=') {
                return Err(uri_error(format!(
                    "extra key/value separator \"=\" in URI query parameter: \"{name}\""
                )));
            }
            let name = uri_decode(name, "query parameter name", true)?;
            let value = uri_decode(
                value,
                &format!("value of query parameter \"{name}\""),
                name != "password",
            )?;
            // JDBC compatibility, as in libpq.
            if name == "ssl" && value == "true" {
                pairs.push((Keyword::SslMode, "require".to_string()));
                continue;
            }
            let key = Keyword::from_name(&name).ok_or_else(|| unknown_option(&name, true))?;
            pairs.push((key, value));
        }
    }
    Ok(pairs)
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

// ---------------------------------------------------------------------------------------
// Password file

fn password_from_file(
    path: &Path,
    host: &Host,
    port: u16,
    dbname: &str,
    user: &str,
) -> Option<String> {
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return None,
        Err(err) => {
            tracing::warn!("password file \"{}\" cannot be read: {err}", path.display());
            return None;
        }
    };
    if !metadata.is_file() {
        tracing::warn!(
            "password file \"{}\" is not a plain file; ignoring it",
            path.display()
        );
        return None;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if metadata.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                "password file \"{}\" has group or world access; permissions should be u=rw (0600) or less; ignoring it",
                path.display()
            );
            return None;
        }
    }
    let contents = match std::fs::read(path) {
        Ok(contents) => contents,
        Err(err) => {
            tracing::warn!("password file \"{}\" cannot be read: {err}", path.display());
            return None;
        }
    };
    let hostnames: Vec<String> = match host {
        Host::Tcp(name) if name.is_empty() => vec!["localhost".to_string()],
        Host::Tcp(name) => vec![name.clone()],
        Host::Unix(dir) => vec![dir.to_string_lossy().into_owned(), "localhost".to_string()],
    };
    let port = port.to_string();
    let password = find_password(&contents, &hostnames, &port, dbname, user)?;
    match String::from_utf8(password) {
        Ok(password) if password.is_empty() => None,
        Ok(password) => Some(password),
        Err(_) => {
            tracing::warn!(
                "password file \"{}\": the matching password is not valid UTF-8; ignoring it",
                path.display()
            );
            None
        }
    }
}

/// The password of the first line of a password file that matches, de-escaped.
fn find_password(
    contents: &[u8],
    hostnames: &[String],
    port: &str,
    dbname: &str,
    user: &str,
) -> Option<Vec<u8>> {
    for line in contents.split(|&b| b == b'\n') {
        let mut line = line;
        while let Some(rest) = line
            .strip_suffix(b"\r")
            .or_else(|| line.strip_suffix(b"\n"))
        {
            line = rest;
        }
        if line.is_empty() || line.starts_with(b"#") {
            continue;
        }
        let rest = hostnames
            .iter()
            .find_map(|host| match_passfile_field(line, host.as_bytes()))
            .and_then(|rest| match_passfile_field(rest, port.as_bytes()))
            .and_then(|rest| match_passfile_field(rest, dbname.as_bytes()))
            .and_then(|rest| match_passfile_field(rest, user.as_bytes()));
        let Some(rest) = rest else { continue };
        let mut password = Vec::with_capacity(rest.len());
        let mut bytes = rest.iter().copied();
        while let Some(b) = bytes.next() {
            match b {
                b'\\' => match bytes.next() {
                    Some(escaped) => password.push(escaped),
                    None => password.push(b'\\'),
                },
                b':' => break,
                _ => password.push(b),
            }
        }
        return Some(password);
    }
    None
}

/// libpq's `pwdfMatchesString`: when the first field of `line` is `*` or equals `token`
/// (with `\:` and `\\` escapes), returns the rest of the line after its `:`.
fn match_passfile_field<'a>(line: &'a [u8], token: &[u8]) -> Option<&'a [u8]> {
    if let Some(rest) = line.strip_prefix(b"*:") {
        return Some(rest);
    }
    let mut i = 0;
    let mut t = 0;
    while let Some(&byte) = line.get(i) {
        let (c, escaped) = if byte == b'\\' {
            i += 1;
            (*line.get(i)?, true)
        } else {
            (byte, false)
        };
        if c == b':' && !escaped && t == token.len() {
            return line.get(i + 1..);
        }
        if token.get(t) != Some(&c) {
            return None;
        }
        i += 1;
        t += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::io::Write;

    fn tcp(name: &str) -> Host {
        Host::Tcp(name.to_string())
    }

    fn unix(dir: &str) -> Host {
        Host::Unix(PathBuf::from(dir))
    }

    fn some(value: &str) -> Option<String> {
        Some(value.to_string())
    }

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name: &str| map.get(name).cloned()
    }

    fn parse_err(conninfo: &str) -> Error {
        match Config::parse(conninfo) {
            Ok(config) => panic!("{conninfo:?} parsed to {config:?}, expected an error"),
            Err(err) => err,
        }
    }

    type Build = fn(&mut Config);

    fn check_cases(cases: &[(&str, Build)]) {
        for (input, build) in cases {
            let mut expected = Config::default();
            build(&mut expected);
            match Config::parse(input) {
                Ok(config) => assert_eq!(config, expected, "input: {input:?}"),
                Err(err) => panic!("input {input:?} failed: {err}"),
            }
        }
    }

    #[test]
    fn key_value_strings() {
        let cases: &[(&str, Build)] = &[
            ("", |_| {}),
            ("   \t\n ", |_| {}),
            ("host=db1", |c| c.hosts = vec![tcp("db1")]),
            ("host = db1   port =5433\tuser= repl", |c| {
                c.hosts = vec![tcp("db1")];
                c.ports = vec![5433];
                c.user = some("repl");
            }),
            ("\thost=db1\n\u{0b}user=u\r\u{0c}", |c| {
                c.hosts = vec![tcp("db1")];
                c.user = some("u");
            }),
            ("application_name='my app'", |c| {
                c.application_name = some("my app")
            }),
            (r"password='it\'s'", |c| c.password = some("it's")),
            (r"password='a\\b'", |c| c.password = some(r"a\b")),
            (r"password=a\ b\'c", |c| c.password = some("a b'c")),
            (r"password='\x'", |c| c.password = some("x")),
            ("password='é ü 日本'", |c| c.password = some("é ü 日本")),
            ("password=a'b", |c| c.password = some("a'b")),
            ("application_name=''", |_| {}),
            ("application_name= ", |_| {}),
            // As in libpq, blanks after '=' are skipped, so the next word is the value.
            ("application_name= user=bob", |c| {
                c.application_name = some("user=bob")
            }),
            ("host='a'port=5433", |c| {
                c.hosts = vec![tcp("a")];
                c.ports = vec![5433];
            }),
            ("options='-c wal_sender_timeout=0'", |c| {
                c.options = some("-c wal_sender_timeout=0")
            }),
            ("dbname=postgres fallback_application_name=tool", |c| {
                c.dbname = some("postgres");
                c.fallback_application_name = some("tool");
            }),
            ("passfile=/p sslrootcert=/r sslcert=/c sslkey=/k", |c| {
                c.passfile = Some(PathBuf::from("/p"));
                c.ssl_root_cert = Some(PathBuf::from("/r"));
                c.ssl_cert = Some(PathBuf::from("/c"));
                c.ssl_key = Some(PathBuf::from("/k"));
            }),
            ("sslmode=disable channel_binding=disable", |c| {
                c.ssl_mode = SslMode::Disable;
                c.channel_binding = ChannelBinding::Disable;
            }),
            ("sslmode=allow", |c| c.ssl_mode = SslMode::Allow),
            ("sslmode=prefer", |_| {}),
            ("sslmode=require channel_binding=require", |c| {
                c.ssl_mode = SslMode::Require;
                c.channel_binding = ChannelBinding::Require;
            }),
            ("sslmode=verify-ca sslnegotiation=direct", |c| {
                c.ssl_mode = SslMode::VerifyCa;
                c.ssl_negotiation = SslNegotiation::Direct;
            }),
            ("sslmode=verify-full sslnegotiation=postgres", |c| {
                c.ssl_mode = SslMode::VerifyFull
            }),
            ("sslrootcert=system", |c| {
                c.ssl_root_cert = Some(PathBuf::from("system"));
                c.ssl_mode = SslMode::VerifyFull;
            }),
            ("keepalives=0 keepalives_idle=30", |c| {
                c.keepalives = false;
                c.keepalives_idle = Some(Duration::from_secs(30));
            }),
            ("keepalives=7 keepalives_idle=0", |_| {}),
            ("keepalives_idle=-3", |_| {}),
            // Duplicates: the last one wins, and only the last one is checked.
            ("host=a host=b", |c| c.hosts = vec![tcp("b")]),
            ("sslmode=bogus sslmode=require", |c| {
                c.ssl_mode = SslMode::Require
            }),
            ("port=1 port=", |_| {}),
        ];
        check_cases(cases);
    }

    #[test]
    fn host_and_port_lists() {
        let cases: &[(&str, Build)] = &[
            ("host=/tmp", |c| c.hosts = vec![unix("/tmp")]),
            ("host=/tmp,db1,,db2 port=5433", |c| {
                c.hosts = vec![
                    unix("/tmp"),
                    tcp("db1"),
                    Host::Unix(default_socket_dir()),
                    tcp("db2"),
                ];
                c.ports = vec![5433];
            }),
            ("host=a,b port=1,", |c| {
                c.hosts = vec![tcp("a"), tcp("b")];
                c.ports = vec![1, 5432];
            }),
            ("host=a,b port=' 6000 ,+6001'", |c| {
                c.hosts = vec![tcp("a"), tcp("b")];
                c.ports = vec![6000, 6001];
            }),
            ("hostaddr=127.0.0.1,::1,fe80::1%eth0", |c| {
                c.host_addrs = vec![some("127.0.0.1"), some("::1"), some("fe80::1%eth0")];
            }),
            ("host=a,b hostaddr=10.0.0.1, port=1,2", |c| {
                c.hosts = vec![tcp("a"), tcp("b")];
                c.host_addrs = vec![some("10.0.0.1"), None];
                c.ports = vec![1, 2];
            }),
            ("hostaddr=10.0.0.1,10.0.0.2 port=1,2", |c| {
                c.host_addrs = vec![some("10.0.0.1"), some("10.0.0.2")];
                c.ports = vec![1, 2];
            }),
        ];
        check_cases(cases);
    }

    #[test]
    fn uris() {
        let cases: &[(&str, Build)] = &[
            ("postgresql://", |_| {}),
            ("postgres://db1", |c| c.hosts = vec![tcp("db1")]),
            ("postgresql://db1:5433/", |c| {
                c.hosts = vec![tcp("db1")];
                c.ports = vec![5433];
            }),
            (
                "postgresql://u%40x:p%3Aw%2Fd%20%25@db1:5433/my%20db?application_name=a%26b%3Dc",
                |c| {
                    c.user = some("u@x");
                    c.password = some("p:w/d %");
                    c.hosts = vec![tcp("db1")];
                    c.ports = vec![5433];
                    c.dbname = some("my db");
                    c.application_name = some("a&b=c");
                },
            ),
            ("postgresql://u:@db1", |c| {
                c.user = some("u");
                c.hosts = vec![tcp("db1")];
            }),
            ("postgresql://:pw@db1", |c| {
                c.password = some("pw");
                c.hosts = vec![tcp("db1")];
            }),
            ("postgresql://user@", |c| c.user = some("user")),
            ("postgresql://a+b@h", |c| {
                c.user = some("a+b");
                c.hosts = vec![tcp("h")];
            }),
            ("postgresql://[::1]:5433/db", |c| {
                c.hosts = vec![tcp("::1")];
                c.ports = vec![5433];
                c.dbname = some("db");
            }),
            ("postgresql://[fe80::1%25eth0]", |c| {
                c.hosts = vec![tcp("fe80::1%eth0")]
            }),
            ("postgresql://[2001:db8::1]?sslmode=require", |c| {
                c.hosts = vec![tcp("2001:db8::1")];
                c.ssl_mode = SslMode::Require;
            }),
            ("postgresql://h1:5432,h2,[::1]:5434/db", |c| {
                c.hosts = vec![tcp("h1"), tcp("h2"), tcp("::1")];
                c.ports = vec![5432, 5432, 5434];
                c.dbname = some("db");
            }),
            ("postgresql://h1,h2:6000", |c| {
                c.hosts = vec![tcp("h1"), tcp("h2")];
                c.ports = vec![5432, 6000];
            }),
            ("postgresql://h1,h2:1,h3:2", |c| {
                c.hosts = vec![tcp("h1"), tcp("h2"), tcp("h3")];
                c.ports = vec![5432, 1, 2];
            }),
            // As in libpq, the port list is "," here: two empty entries (default ports).
            ("postgresql://h1,h2", |c| {
                c.hosts = vec![tcp("h1"), tcp("h2")];
                c.ports = vec![5432, 5432];
            }),
            ("postgresql://%2Fvar%2Frun%2Fpostgresql/db", |c| {
                c.hosts = vec![unix("/var/run/postgresql")];
                c.dbname = some("db");
            }),
            ("postgresql:///db?host=/tmp&port=5433", |c| {
                c.hosts = vec![unix("/tmp")];
                c.ports = vec![5433];
                c.dbname = some("db");
            }),
            ("postgresql://?host=%2Ftmp", |c| {
                c.hosts = vec![unix("/tmp")]
            }),
            ("postgresql://user@db1/db?host=db2", |c| {
                c.user = some("user");
                c.hosts = vec![tcp("db2")];
                c.dbname = some("db");
            }),
            (
                "postgresql://db1/?sslmode=verify-full&replication=database&",
                |c| {
                    c.hosts = vec![tcp("db1")];
                    c.ssl_mode = SslMode::VerifyFull;
                    c.replication = ReplicationMode::Database;
                },
            ),
            ("postgresql://db1?ssl=true", |c| {
                c.hosts = vec![tcp("db1")];
                c.ssl_mode = SslMode::Require;
            }),
            ("postgresql://h/db/with/slash", |c| {
                c.hosts = vec![tcp("h")];
                c.dbname = some("db/with/slash");
            }),
            ("postgresql://h?application_name=", |c| {
                c.hosts = vec![tcp("h")]
            }),
            ("postgresql://h?", |c| c.hosts = vec![tcp("h")]),
        ];
        check_cases(cases);
    }

    #[test]
    fn errors_name_the_problem() {
        let cases: &[(&str, &[&str])] = &[
            ("foo=bar", &["invalid connection option \"foo\""]),
            ("=bar", &["invalid connection option \"\""]),
            ("host", &["missing \"=\" after \"host\""]),
            ("host=db1 port", &["missing \"=\" after \"port\""]),
            (
                "user='unterminated",
                &["unterminated quoted string", "user"],
            ),
            (
                r"user='ends with backslash\'",
                &["unterminated quoted string"],
            ),
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
            ("keepalives_count=x", &["keepalives_count"]),
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
                "target_session_attrs=bogus",
                &["invalid target_session_attrs value"],
            ),
            (
                "load_balance_hosts=bogus",
                &["invalid load_balance_hosts value"],
            ),
            ("sslcertmode=always", &["invalid sslcertmode value"]),
            (
                "ssl_max_protocol_version=TLSv1.1 ssl_min_protocol_version=TLSv1",
                &["ssl_max_protocol_version=TLSv1.1", "TLS 1.2"],
            ),
            (
                "ssl_min_protocol_version=TLSv1.3 ssl_max_protocol_version=TLSv1.2",
                &["invalid SSL protocol version range"],
            ),
            ("require_auth=bogus", &["require_auth"]),
            ("require_auth=!md5,password", &["require_auth", "negative"]),
            (
                "ssl_min_protocol_version=SSLv3",
                &["ssl_min_protocol_version"],
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
            (
                "postgresql://h/db?foo=bar",
                &["invalid URI query parameter: \"foo\""],
            ),
            (
                "postgresql://h/db?sslmode",
                &["missing key/value separator"],
            ),
            (
                "postgresql://h/db?&sslmode=require",
                &["missing key/value separator"],
            ),
            ("postgresql://h/db?a=b=c", &["extra key/value separator"]),
            (
                "postgresql://h/db?sslmode=bogus",
                &["invalid sslmode value"],
            ),
            (
                "postgresql://%zz",
                &["invalid percent-encoded token", "host"],
            ),
            (
                "postgresql://h/%4",
                &["invalid percent-encoded token", "database name"],
            ),
            ("postgresql://h/%00", &["forbidden value %00"]),
            ("postgresql://h/%FF", &["UTF-8"]),
            ("postgresql://[::1", &["matching \"]\""]),
            ("postgresql://[]", &["IPv6 host address may not be empty"]),
            ("postgresql://[::1]x", &["unexpected character \"x\""]),
            (
                "postgresql://h:abc",
                &["invalid integer value \"abc\"", "port"],
            ),
            ("postgresql://h:70000", &["invalid port number"]),
        ];
        for (input, needles) in cases {
            let err = match Config::parse(input) {
                Ok(config) => panic!("{input:?} parsed to {config:?}, expected an error"),
                Err(err) => err,
            };
            assert_eq!(err.kind(), ErrorKind::Config, "{input:?}");
            for needle in *needles {
                assert!(
                    err.message().contains(needle),
                    "{input:?}: {:?} lacks {needle:?}",
                    err.message()
                );
            }
            assert!(
                err.advice().is_some_and(|a| !a.is_empty()),
                "{input:?} has no advice"
            );
        }
    }

    #[test]
    fn uri_errors_do_not_show_the_password() {
        let err = parse_err("postgresql://u:sec%ZZret@h");
        assert!(err.message().contains("password"), "{}", err.message());
        assert!(!err.to_string().contains("sec"), "{err}");
        let err = parse_err("postgresql://h?password=sec%ZZret");
        assert!(!err.to_string().contains("sec"), "{err}");
    }

    #[test]
    fn accepted_and_ignored_options() {
        let ignored = "client_encoding=UTF8 target_session_attrs=any gssencmode=disable \
            gssencmode=prefer krbsrvname=postgres sslcompression=0 sslcrl='' sslcrldir='' \
            sslsni=1 sslpassword='' ssl_min_protocol_version=TLSv1.2 \
            ssl_max_protocol_version='' keepalives_interval=10 keepalives_count=3 \
            tcp_user_timeout=0 requirepeer='' load_balance_hosts=disable \
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
    fn new_options_round_trip_through_conninfo_strings() {
        let config = Config::parse(
            "host=a,b port=1,2 target_session_attrs=prefer-standby load_balance_hosts=random \
             require_auth='scram-sha-256,none' service=svc",
        )
        .unwrap();
        let text = config.to_conninfo_string();
        assert!(
            text.contains("target_session_attrs='prefer-standby'"),
            "{text}"
        );
        assert!(text.contains("load_balance_hosts=random"), "{text}");
        assert!(text.contains("require_auth='scram-sha-256,none'"), "{text}");
        assert!(text.contains("service=svc"), "{text}");
        assert_eq!(Config::parse(&text).unwrap(), config);
    }

    fn service_file(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("pg_service.conf");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn service_options_sit_between_the_string_and_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = service_file(
            dir.path(),
            "[svc]\nhost=svchost\nport=5555\nuser=svcuser\nsslmode=require\nport=6666\n\
             target_session_attrs=primary\n[other]\nhost=otherhost\n[]\nhost=emptyname\n",
        );
        let file = file.display().to_string();
        let vars = [
            ("PGSERVICEFILE", file.as_str()),
            ("PGHOST", "envhost"),
            ("PGUSER", "envuser"),
            ("PGDATABASE", "envdb"),
            ("PGSSLMODE", "disable"),
            ("HOME", "/nonexistent"),
        ];
        let config = Config::parse_with_getenv("service=svc user=explicit", &env(&vars)).unwrap();
        // The string beats the service, the service beats the environment, and the
        // environment fills what neither set.
        assert_eq!(config.user.as_deref(), Some("explicit"));
        assert_eq!(config.hosts, vec![tcp("svchost")]);
        assert_eq!(config.ssl_mode, SslMode::Require);
        assert_eq!(config.dbname.as_deref(), Some("envdb"));
        // The first value of a keyword in the service wins, as in libpq.
        assert_eq!(config.ports, vec![5555]);
        assert_eq!(config.target_session_attrs, TargetSessionAttrs::Primary);
        assert_eq!(config.service.as_deref(), Some("svc"));
        // Once applied, the service's options are written out, not its name.
        let text = config.to_conninfo_string();
        assert!(!text.contains("service"), "{text}");
        assert!(text.contains("host=svchost"), "{text}");

        // PGSERVICE names the service when the string does not.
        let mut with_pgservice = vars.to_vec();
        with_pgservice.push(("PGSERVICE", "other"));
        let config = Config::parse_with_getenv("", &env(&with_pgservice)).unwrap();
        assert_eq!(config.hosts, vec![tcp("otherhost")]);
        let config = Config::parse_with_getenv("service=svc", &env(&with_pgservice)).unwrap();
        assert_eq!(config.hosts, vec![tcp("svchost")]);
        // An empty service name is looked up as "" (the [] group), as libpq does.
        let config = Config::parse_with_getenv("service=''", &env(&vars)).unwrap();
        assert_eq!(config.hosts, vec![tcp("emptyname")]);

        // A missing service, named by the string or by PGSERVICE.
        let err = Config::parse_with_getenv("service=nope", &env(&vars)).unwrap_err();
        assert!(
            err.message()
                .starts_with("definition of service \"nope\" not found"),
            "{err}"
        );
        let mut missing = vars.to_vec();
        missing.push(("PGSERVICE", "nope"));
        let err = Config::parse_with_getenv("", &env(&missing)).unwrap_err();
        assert!(err.advice().unwrap().contains("PGSERVICE"), "{err}");
    }

    #[test]
    fn service_errors_name_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = service_file(dir.path(), "[svc]\nhost=h\nport=notaport\n");
        let vars = [("PGSERVICEFILE", file.to_str().unwrap()), ("HOME", "/h")];
        let err = Config::parse_with_getenv("service=svc", &env(&vars)).unwrap_err();
        assert!(err.message().contains("port"), "{err}");
        assert!(err.message().contains("line 3"), "{err}");
        assert!(err.message().contains(file.to_str().unwrap()), "{err}");
        // A bad value the string overrides is never looked at.
        Config::parse_with_getenv("service=svc port=5432", &env(&vars)).unwrap();
        let file = service_file(dir.path(), "[svc]\nhost=h\nnot an option\n");
        let vars = [("PGSERVICEFILE", file.to_str().unwrap()), ("HOME", "/h")];
        let err = Config::parse_with_getenv("service=svc", &env(&vars)).unwrap_err();
        assert!(
            err.message().starts_with(&format!(
                "syntax error in service file \"{}\", line 3",
                file.display()
            )),
            "{err}"
        );
    }

    #[test]
    fn an_unapplied_service_refuses_to_connect() {
        let config = Config::parse("service=svc host=h").unwrap();
        let err = config.check_service_applied().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Usage);
        assert!(err.message().contains("svc"), "{err}");
        assert!(err.advice().unwrap().contains("parse_with_env"), "{err}");
        Config::parse("host=h")
            .unwrap()
            .check_service_applied()
            .unwrap();
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
    fn to_conninfo_string_quotes_like_libpq() {
        let config = Config::parse(
            r"host=db1 port=5433 user=repl password='se cr\'et\\' sslmode=verify-full application_name=x",
        )
        .unwrap();
        assert_eq!(
            config.to_conninfo_string(),
            r"user=repl password='se cr\'et\\' host=db1 port=5433 application_name=x sslmode='verify-full'"
        );
        assert_eq!(Config::default().to_conninfo_string(), "");
        let config = Config::parse("host=/tmp application_name=a-b").unwrap();
        assert_eq!(
            config.to_conninfo_string(),
            "host='/tmp' application_name='a-b'"
        );
    }

    #[test]
    fn to_conninfo_string_round_trips() {
        let cases = [
            "",
            "host=db1,/tmp,::1 port=1,2,3 user=u password='p w' dbname=d",
            "host=a,b hostaddr=10.0.0.1, port=5432",
            "hostaddr=10.0.0.1,10.0.0.2",
            "application_name='x y' fallback_application_name=z options='-c a=b'",
            "connect_timeout=1 keepalives=0 keepalives_idle=15",
            "sslmode=verify-full sslrootcert=/r sslcert=/c sslkey=/k sslnegotiation=direct channel_binding=require",
            "sslmode=disable channel_binding=disable replication=true",
            "replication=database passfile=/p",
            "sslrootcert=system",
            "postgresql://u%40x:p%3Aw@[::1]:5433,h2/my%20db?application_name=%27q%27",
        ];
        for input in cases {
            let config = Config::parse(input).unwrap();
            let text = config.to_conninfo_string();
            let reparsed =
                Config::parse(&text).unwrap_or_else(|e| panic!("{input:?} -> {text:?}: {e}"));
            assert_eq!(reparsed, config, "{input:?} -> {text:?}");
        }
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

    fn write_passfile(dir: &Path, contents: &str, mode: u32) -> PathBuf {
        let path = dir.join("pgpass");
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(contents.as_bytes()).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        #[cfg(not(unix))]
        let _ = mode;
        path
    }

    const PASSFILE: &str = "# comment line\n\
        #db1:5432:appdb:alice:commented\n\
        db1:5432:appdb:alice:alicepw\n\
        db1:*:*:bob:bob\\:pw\\\\x\n\
        *:*:replication:repl:replpw\n\
        localhost:5432:*:sock:localpw\n\
        /custom/dir:5432:*:sock2:dirpw\n\
        h\\:colon:5432:*:*:colonpw\n\
        db2:5432:*:*:first\n\
        db2:5432:*:*:second\n\
        db3:5432:*:carol:pw:with:extra\n\
        db4:5432:*:empty:\n\
        db5:5432:*:*:crlfpw\r\n\
        db6:5432:*\n\
        \\*:5432:*:*:literalstar\n";

    #[test]
    fn password_file_matching() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_passfile(dir.path(), PASSFILE, 0o600);
        let config = Config {
            passfile: Some(path),
            ..Config::default()
        };
        let custom = unix("/custom/dir");
        let default = Host::Unix(default_socket_dir());
        let cases: &[(&Host, u16, &str, &str, Option<&str>)] = &[
            (&tcp("db1"), 5432, "appdb", "alice", Some("alicepw")),
            (&tcp("db1"), 5433, "appdb", "alice", None),
            (&tcp("db1"), 9999, "x", "bob", Some("bob:pw\\x")),
            (
                &tcp("elsewhere"),
                5432,
                "replication",
                "repl",
                Some("replpw"),
            ),
            (&default, 5432, "x", "sock", Some("localpw")),
            (&tcp("localhost"), 5432, "x", "sock", Some("localpw")),
            (&custom, 5432, "x", "sock2", Some("dirpw")),
            (&custom, 5432, "x", "sock", Some("localpw")),
            (&tcp("h:colon"), 5432, "x", "y", Some("colonpw")),
            (&tcp("db2"), 5432, "x", "y", Some("first")),
            (&tcp("db3"), 5432, "x", "carol", Some("pw")),
            (&tcp("db4"), 5432, "x", "empty", None),
            (&tcp("db5"), 5432, "x", "y", Some("crlfpw")),
            (&tcp("db6"), 5432, "x", "y", None),
            (&tcp("*"), 5432, "x", "y", Some("literalstar")),
            (&tcp("db"), 5432, "x", "y", None),
            (&tcp("db11"), 5432, "appdb", "alice", None),
        ];
        for (host, port, dbname, user, expected) in cases {
            assert_eq!(
                config.password_for(host, *port, dbname, user).as_deref(),
                *expected,
                "{host:?} {port} {dbname} {user}"
            );
        }

        // A configured password wins; without a passfile there is nothing to read.
        let with_password = Config {
            password: some("given"),
            ..config.clone()
        };
        assert_eq!(
            with_password
                .password_for(&tcp("db1"), 5432, "appdb", "alice")
                .as_deref(),
            Some("given")
        );
        assert_eq!(
            Config::default().password_for(&tcp("db1"), 5432, "appdb", "alice"),
            None
        );
    }

    #[test]
    fn password_file_is_ignored_when_unsafe_or_missing() {
        let dir = tempfile::tempdir().unwrap();
        let lookup = |path: PathBuf| {
            Config {
                passfile: Some(path),
                ..Config::default()
            }
            .password_for(&tcp("db1"), 5432, "appdb", "alice")
        };
        #[cfg(unix)]
        {
            let path = write_passfile(dir.path(), PASSFILE, 0o644);
            assert_eq!(lookup(path.clone()), None);
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
            assert_eq!(lookup(path).as_deref(), Some("alicepw"));
        }
        assert_eq!(lookup(dir.path().join("missing")), None);
        assert_eq!(lookup(dir.path().to_path_buf()), None);
    }

    fn non_empty(value: String) -> Option<String> {
        (!value.is_empty()).then_some(value)
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

    proptest! {
        #[test]
        fn conninfo_round_trips_arbitrary_values(
            app in "[^\\x00]*",
            password in "[^\\x00]*",
            user in "[^\\x00]*",
        ) {
            let config = Config {
                application_name: non_empty(app),
                password: non_empty(password),
                user: non_empty(user),
                ..Config::default()
            };
            let text = config.to_conninfo_string();
            let parsed = Config::parse(&text);
            prop_assert!(parsed.is_ok(), "{:?}: {:?}", text, parsed);
            prop_assert_eq!(parsed.ok(), Some(config));
        }

        #[test]
        fn parse_never_panics(input in any::<String>()) {
            let _ = Config::parse(&input);
        }

        #[test]
        fn uri_parse_never_panics(input in "postgres(ql)?://[a-z@:/?&=%,\\[\\]0-9A-F.\u{e9}]*") {
            let _ = Config::parse(&input);
        }

        #[test]
        fn passfile_matching_never_panics(
            contents in proptest::collection::vec(any::<u8>(), 0..200),
            host in "[a-z*:\\\\]{0,4}",
        ) {
            let _ = find_password(&contents, &[host], "5432", "db", "u");
        }
    }
}
