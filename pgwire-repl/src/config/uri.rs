//! `postgresql://` and `postgres://` URIs, split into (keyword, value) pairs as libpq
//! splits them.

use super::keywords::{unknown_option, Keyword};
use crate::error::{Error, Result};

pub(super) fn strip_uri_prefix(conninfo: &str) -> Option<&str> {
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
pub(super) fn parse_uri(rest: &str) -> Result<Vec<(Keyword, String)>> {
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

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::*;
    use proptest::prelude::*;

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
    fn uri_errors_name_the_problem() {
        check_errors(&[
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
        ]);
    }

    #[test]
    fn uri_errors_do_not_show_the_password() {
        let err = parse_err("postgresql://u:sec%ZZret@h");
        assert!(err.message().contains("password"), "{}", err.message());
        assert!(!err.to_string().contains("sec"), "{err}");
        let err = parse_err("postgresql://h?password=sec%ZZret");
        assert!(!err.to_string().contains("sec"), "{err}");
    }

    proptest! {
        #[test]
        fn uri_parse_never_panics(input in "postgres(ql)?://[a-z@:/?&=%,\\[\\]0-9A-F.\u{e9}]*") {
            let _ = Config::parse(&input);
        }
    }
}
