//! libpq `key=value` connection strings: read into (keyword, value) pairs, and written
//! back from a [`Config`] with libpq's quoting.

use std::path::Path;
use std::time::Duration;

use super::keywords::{channel_binding_name, is_space, ssl_mode_name, unknown_option, Keyword};
use super::{
    ChannelBinding, Config, Host, LoadBalanceHosts, ReplicationMode, SslCertMode, SslMode,
    SslNegotiation, SslProtocolVersion, TargetSessionAttrs,
};
use crate::error::{Error, Result};

impl Config {
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
        if let Some(interval) = self.keepalives_interval {
            out.push("keepalives_interval", &whole_seconds(interval).to_string());
        }
        if let Some(count) = self.keepalives_count {
            out.push("keepalives_count", &count.to_string());
        }
        if let Some(timeout) = self.tcp_user_timeout {
            out.push("tcp_user_timeout", &whole_millis(timeout).to_string());
        }
        out.finish()
    }
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
pub(super) fn parse_key_value(conninfo: &str) -> Result<Vec<(Keyword, String)>> {
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
pub(super) fn quote_for_display(value: &str) -> String {
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

pub(super) fn host_text(host: &Host) -> String {
    match host {
        Host::Tcp(name) => name.clone(),
        Host::Unix(dir) => dir.to_string_lossy().into_owned(),
    }
}

/// Milliseconds, rounded up so that a non-zero duration stays non-zero.
pub(crate) fn whole_millis(duration: Duration) -> u64 {
    let millis = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    if duration.subsec_nanos() % 1_000_000 > 0 {
        millis.saturating_add(1)
    } else {
        millis
    }
}

/// Whole seconds, rounded up so that a non-zero duration stays non-zero.
pub(crate) fn whole_seconds(duration: Duration) -> u64 {
    let seconds = duration.as_secs();
    if duration.subsec_nanos() > 0 {
        seconds.saturating_add(1)
    } else {
        seconds
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::*;
    use proptest::prelude::*;

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
            // As libpq: any non-zero integer turns keepalives on, and a negative
            // value counts as 0 (which the kernel then refuses, as libpq's does).
            ("keepalives=7 keepalives_idle=0", |c| {
                c.keepalives_idle = Some(Duration::ZERO)
            }),
            ("keepalives_idle=-3", |c| {
                c.keepalives_idle = Some(Duration::ZERO)
            }),
            (
                "keepalives_interval=' 5 ' keepalives_count=+4 tcp_user_timeout=1500",
                |c| {
                    c.keepalives_interval = Some(Duration::from_secs(5));
                    c.keepalives_count = Some(4);
                    c.tcp_user_timeout = Some(Duration::from_millis(1500));
                },
            ),
            ("keepalives_count=-1 tcp_user_timeout=-9", |c| {
                c.keepalives_count = Some(0);
                c.tcp_user_timeout = Some(Duration::ZERO);
            }),
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
    fn syntax_errors_name_the_problem() {
        check_errors(&[
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
        ]);
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
            "keepalives_idle=0 keepalives_interval=3 keepalives_count=2 tcp_user_timeout=250",
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

    fn non_empty(value: String) -> Option<String> {
        (!value.is_empty()).then_some(value)
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
    }
}
