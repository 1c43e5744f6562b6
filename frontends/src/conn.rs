//! The connection options the PostgreSQL replication tools share (`-d`, `-h`, `-p`,
//! `-U`, `-w`, `-W`), turned into a [`pgwire_repl::Config`] as PostgreSQL's
//! `streamutil.c : GetConnection()` does:
//!
//! * `-d` is a connection string or URI; its `dbname` is dropped (a physical
//!   walsender has no database), but remembered for `-R` on PostgreSQL 17+;
//! * `-h`, `-p` and `-U` override what the string says;
//! * the session is a physical walsender (`replication=true`, `dbname=replication`),
//!   and `fallback_application_name` is the program name, so that `PGAPPNAME` or an
//!   `application_name` in `-d` still wins;
//! * the service file and the `PG*` variables fill everything else, as in libpq;
//! * `-W` asks for a password before connecting; without `-w`, a server that asks for
//!   a password nobody gave gets one typed at the terminal, then the connection is
//!   tried again.

use std::io::{BufRead, Write};

use pgwire_repl::config::ReplicationMode;
use pgwire_repl::{Config, ConnectOptions, ErrorKind, ReplicationClient};

/// Whether and when to ask for a password (`-w`, `-W`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PasswordPrompt {
    /// Ask only when the server wants a password and none was given (the default).
    #[default]
    IfNeeded,
    /// Never ask (`-w`, `--no-password`).
    Never,
    /// Ask before connecting (`-W`, `--password`).
    Always,
}

/// The connection options given on the command line.
///
/// ```
/// use pg_frontends::conn::ConnOptions;
/// let mut opts = ConnOptions::default();
/// assert!(opts.take("host", Some("/tmp/sockets")));
/// assert!(opts.take("port", Some("5433")));
/// assert!(!opts.take("pgdata", Some("/x")));
/// let config = opts.config_with("pg_basebackup", |_| None).unwrap();
/// assert_eq!(config.ports, vec![5433]);
/// assert_eq!(config.fallback_application_name.as_deref(), Some("pg_basebackup"));
/// ```
#[derive(Debug, Clone, Default)]
pub struct ConnOptions {
    /// `-d`, `--dbname`: a connection string or URI.
    pub conninfo: Option<String>,
    /// `-h`, `--host`: host name(s) or socket directory.
    pub host: Option<String>,
    /// `-p`, `--port`.
    pub port: Option<String>,
    /// `-U`, `--username`.
    pub user: Option<String>,
    /// `-w` / `-W`.
    pub prompt: PasswordPrompt,
}

/// The getopt ids this module handles, for a tool's option table: `dbname` (`-d`),
/// `host` (`-h`), `port` (`-p`), `username` (`-U`), `no-password` (`-w`), `password`
/// (`-W`).
pub const OPTION_IDS: [&str; 6] = [
    "dbname",
    "host",
    "port",
    "username",
    "no-password",
    "password",
];

/// Quotes a value for a `key=value` connection string.
fn quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

impl ConnOptions {
    /// Takes one parsed option if it is a connection option (see [`OPTION_IDS`]);
    /// returns false for any other option.
    pub fn take(&mut self, id: &str, value: Option<&str>) -> bool {
        let value = value.map(str::to_string);
        match id {
            "dbname" => self.conninfo = value,
            "host" => self.host = value,
            "port" => self.port = value,
            "username" => self.user = value,
            "no-password" => self.prompt = PasswordPrompt::Never,
            "password" => self.prompt = PasswordPrompt::Always,
            _ => return false,
        }
        true
    }

    /// The `dbname` given in `-d`, if any (PostgreSQL 17+'s `pg_basebackup -R` writes
    /// it into `primary_conninfo`).
    pub fn explicit_dbname(&self) -> Option<String> {
        let conninfo = self.conninfo.as_deref()?;
        Config::parse(conninfo).ok()?.dbname
    }

    /// The configuration for a physical walsender session of `progname`, with the
    /// environment read from the process.
    pub fn config(&self, progname: &str) -> Result<Config, String> {
        self.config_with(progname, |name| std::env::var(name).ok())
    }

    /// [`ConnOptions::config`] with the environment read through `getenv`.
    pub fn config_with(
        &self,
        progname: &str,
        getenv: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, String> {
        let mut config = match self.conninfo.as_deref() {
            Some(conninfo) => Config::parse(conninfo).map_err(|e| e.to_string())?,
            None => Config::default(),
        };
        let mut overrides = Vec::new();
        if let Some(host) = &self.host {
            overrides.push(format!("host={}", quote(host)));
        }
        if let Some(port) = &self.port {
            overrides.push(format!("port={}", quote(port)));
        }
        if let Some(user) = &self.user {
            overrides.push(format!("user={}", quote(user)));
        }
        if !overrides.is_empty() {
            let given = Config::parse(&overrides.join(" ")).map_err(|e| e.to_string())?;
            if self.host.is_some() {
                config.hosts = given.hosts;
                // A hostaddr list from -d belongs to the hosts -h replaced.
                config.host_addrs.clear();
            }
            if self.port.is_some() {
                config.ports = given.ports;
            }
            if self.user.is_some() {
                config.user = given.user;
            }
        }
        config.dbname = Some("replication".into());
        config.replication = ReplicationMode::Physical;
        config.fallback_application_name = Some(progname.to_string());
        config.apply_env(getenv).map_err(|e| e.to_string())?;
        Ok(config)
    }

    /// Connects a physical walsender session, asking for a password as the options say
    /// (on the terminal, as libpq's `simple_prompt`). On success `config` holds the
    /// password that worked, for further connections of the same run.
    pub async fn connect(
        &self,
        config: &mut Config,
        options: &ConnectOptions,
    ) -> Result<ReplicationClient, pgwire_repl::Error> {
        if self.prompt == PasswordPrompt::Always && config.password.is_none() {
            config.password = Some(prompt_password()?);
        }
        match ReplicationClient::connect_with(config, options).await {
            Err(e)
                if self.prompt != PasswordPrompt::Never
                    && config.password.is_none()
                    && needs_password(&e) =>
            {
                config.password = Some(prompt_password()?);
                ReplicationClient::connect_with(config, options).await
            }
            other => other,
        }
    }
}

/// Whether a failed connection failed only for want of a password.
pub fn needs_password(error: &pgwire_repl::Error) -> bool {
    error.kind() == ErrorKind::Auth && error.to_string().contains("asked for a password")
}

/// Reads a password from the terminal without echo (`Password: `).
pub fn prompt_password() -> Result<String, pgwire_repl::Error> {
    let io = |e: std::io::Error| {
        pgwire_repl::Error::auth(
            format!("could not read a password from the terminal: {e}"),
            "give the password in PGPASSWORD or ~/.pgpass instead",
        )
    };
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty");
    let mut line = String::new();
    match tty {
        Ok(tty) => {
            use std::os::fd::AsRawFd;
            let fd = tty.as_raw_fd();
            let mut writer = &tty;
            let _ = writer.write_all(b"Password: ");
            let _ = writer.flush();
            // SAFETY: termios calls on a descriptor we own, with a zeroed struct that
            // tcgetattr fills in.
            let saved = unsafe {
                let mut t: libc::termios = std::mem::zeroed();
                if libc::tcgetattr(fd, &mut t) == 0 {
                    let saved = t;
                    t.c_lflag &= !libc::ECHO;
                    libc::tcsetattr(fd, libc::TCSAFLUSH, &t);
                    Some(saved)
                } else {
                    None
                }
            };
            let read = std::io::BufReader::new(&tty).read_line(&mut line);
            if let Some(saved) = saved {
                // SAFETY: restores the settings read above on the same descriptor.
                unsafe {
                    libc::tcsetattr(fd, libc::TCSAFLUSH, &saved);
                }
            }
            let _ = writer.write_all(b"\n");
            read.map_err(io)?;
        }
        Err(_) => {
            eprint!("Password: ");
            std::io::stdin().lock().read_line(&mut line).map_err(io)?;
        }
    }
    while line.ends_with(['\n', '\r']) {
        line.pop();
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgwire_repl::config::Host;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn environment_fills_what_the_options_leave_open() {
        let opts = ConnOptions::default();
        let config = opts
            .config_with(
                "pg_basebackup",
                env(&[
                    ("PGHOST", "/tmp/sock"),
                    ("PGPORT", "5999"),
                    ("PGAPPNAME", "x"),
                ]),
            )
            .unwrap();
        assert_eq!(config.hosts, vec![Host::Unix("/tmp/sock".into())]);
        assert_eq!(config.ports, vec![5999]);
        assert_eq!(config.application_name.as_deref(), Some("x"));
        assert_eq!(config.replication, ReplicationMode::Physical);
        assert_eq!(config.dbname.as_deref(), Some("replication"));
    }

    #[test]
    fn options_override_the_connection_string_and_the_environment() {
        let mut opts = ConnOptions::default();
        opts.take("dbname", Some("host=a port=1 user=u dbname=db1"));
        opts.take("host", Some("b"));
        opts.take("port", Some("2"));
        let config = opts
            .config_with("pg_receivewal", env(&[("PGUSER", "envuser")]))
            .unwrap();
        assert_eq!(config.hosts, vec![Host::Tcp("b".into())]);
        assert_eq!(config.ports, vec![2]);
        assert_eq!(config.user.as_deref(), Some("u"));
        assert_eq!(config.dbname.as_deref(), Some("replication"));
        assert_eq!(opts.explicit_dbname().as_deref(), Some("db1"));
        assert_eq!(
            config.fallback_application_name.as_deref(),
            Some("pg_receivewal")
        );
    }

    #[test]
    fn uri_and_quoting() {
        let mut opts = ConnOptions::default();
        opts.take("dbname", Some("postgresql://h:7/db?application_name=app"));
        opts.take("username", Some("it's"));
        let config = opts.config_with("t", env(&[])).unwrap();
        assert_eq!(config.ports, vec![7]);
        assert_eq!(config.user.as_deref(), Some("it's"));
        assert_eq!(config.application_name.as_deref(), Some("app"));
        assert!(opts.config_with("t", env(&[])).is_ok());
        opts.take("dbname", Some("nonsense=1"));
        assert!(opts.config_with("t", env(&[])).is_err());
    }

    #[test]
    fn password_flags() {
        let mut opts = ConnOptions::default();
        assert_eq!(opts.prompt, PasswordPrompt::IfNeeded);
        opts.take("no-password", None);
        assert_eq!(opts.prompt, PasswordPrompt::Never);
        opts.take("password", None);
        assert_eq!(opts.prompt, PasswordPrompt::Always);
    }
}
