//! libpq-compatible connection configuration.
//!
//! Accepts `key=value` connection strings and `postgresql://` URIs, applies the PG*
//! environment variables and looks passwords up in the password file, as libpq does.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};

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
    /// Try TLS first; fall back to no TLS (the libpq default).
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

/// A parsed, validated connection configuration.
///
/// ```
/// use pgwire_repl::config::{Config, Host, SslMode};
/// let config = Config::parse("host=db1 port=5433 user=repl sslmode=verify-full").unwrap();
/// assert_eq!(config.hosts, vec![Host::Tcp("db1".into())]);
/// assert_eq!(config.ports, vec![5433]);
/// assert_eq!(config.ssl_mode, SslMode::VerifyFull);
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Config {
    /// Hosts to try in order (libpq's comma-separated `host`). Empty means the default
    /// Unix-socket directory, then `localhost`, as libpq does on Unix.
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
    /// `sslrootcert`: a PEM file with trusted root certificates.
    pub ssl_root_cert: Option<PathBuf>,
    /// `sslcert`: the client certificate (PEM).
    pub ssl_cert: Option<PathBuf>,
    /// `sslkey`: the client certificate's private key (PEM).
    pub ssl_key: Option<PathBuf>,
    /// `sslnegotiation`.
    pub ssl_negotiation: SslNegotiation,
    /// `channel_binding`.
    pub channel_binding: ChannelBinding,
    /// `replication`.
    pub replication: ReplicationMode,
    /// TCP keepalives (`keepalives`, default on).
    pub keepalives: bool,
    /// `keepalives_idle`, when set.
    pub keepalives_idle: Option<Duration>,
}

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
            .field("options", &self.options)
            .field("connect_timeout", &self.connect_timeout)
            .field("ssl_mode", &self.ssl_mode)
            .field("ssl_root_cert", &self.ssl_root_cert)
            .field("ssl_cert", &self.ssl_cert)
            .field("ssl_key", &self.ssl_key)
            .field("ssl_negotiation", &self.ssl_negotiation)
            .field("channel_binding", &self.channel_binding)
            .field("replication", &self.replication)
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
            channel_binding: ChannelBinding::Prefer,
            replication: ReplicationMode::Off,
            keepalives: true,
            keepalives_idle: None,
        }
    }
}

impl Config {
    /// Parses a `key=value` connection string or a `postgresql://` / `postgres://` URI,
    /// without looking at the environment.
    pub fn parse(conninfo: &str) -> Result<Config> {
        let _ = conninfo;
        Err(Error::config("not yet implemented", "wait"))
    }

    /// Parses like [`Config::parse`], then fills unset fields from the PG* environment
    /// variables, as libpq does.
    pub fn parse_with_env(conninfo: &str) -> Result<Config> {
        let mut config = Config::parse(conninfo)?;
        config.apply_env(|name| std::env::var(name).ok());
        Ok(config)
    }

    /// Fills unset fields from environment variables read through `getenv`
    /// (PGHOST, PGHOSTADDR, PGPORT, PGUSER, PGPASSWORD, PGPASSFILE, PGDATABASE, PGSSLMODE,
    /// PGSSLROOTCERT, PGSSLCERT, PGSSLKEY, PGSSLNEGOTIATION, PGCHANNELBINDING, PGAPPNAME,
    /// PGCONNECT_TIMEOUT, PGOPTIONS). Values already set win.
    pub fn apply_env(&mut self, getenv: impl Fn(&str) -> Option<String>) {
        let _ = getenv;
    }

    /// The user name to log in as: the configured one, else the operating-system user.
    pub fn effective_user(&self) -> Result<String> {
        Err(Error::config("not yet implemented", "wait"))
    }

    /// The password for one connection attempt: the configured one, else the first
    /// matching line of the password file (`hostname:port:database:username:password`).
    ///
    /// `host` is the host as configured (a socket directory matches `localhost`, as in libpq),
    /// `dbname` is the database the startup packet names (`replication` for physical
    /// replication connections).
    pub fn password_for(&self, host: &Host, port: u16, dbname: &str, user: &str) -> Option<String> {
        let _ = (host, port, dbname, user);
        self.password.clone()
    }
}
