//! Connection service files (`pg_service.conf`), looked up as libpq does.
//!
//! A service named by the `service` option (or, when the connection string has none, by
//! the `PGSERVICE` environment variable) is searched for in:
//!
//! 1. the file named by `PGSERVICEFILE`, if set (it must exist), else
//!    `~/.pg_service.conf` (when it exists);
//! 2. then, if the service was not found there, `pg_service.conf` in the directory named
//!    by `PGSYSCONFDIR`, or else in [`DEFAULT_SYSCONFDIR`].
//!
//! A file is read as libpq's `parseServiceFile` reads it: lines of at most 1023 bytes,
//! white space trimmed at both ends, `#` comments and empty lines skipped, `[name]`
//! starting a group (anything after the `]` is ignored), and `keyword=value` lines whose
//! keyword is taken verbatim up to the first `=` and whose value is the rest of the
//! line, without quoting. The first value of a keyword in the group wins; `service`
//! inside a service is an error, as is an unknown keyword.
//!
//! ```
//! # use std::io::Write;
//! let dir = tempfile::tempdir().unwrap();
//! let file = dir.path().join("services.conf");
//! std::fs::write(&file, "[mydb]\nhost=db1\nport=5433\n").unwrap();
//! let file_text = file.to_str().unwrap().to_string();
//! let getenv = move |name: &str| match name {
//!     "PGSERVICEFILE" => Some(file_text.clone()),
//!     "HOME" => Some("/nonexistent".to_string()),
//!     _ => None,
//! };
//! let mut config = pgwire_repl::Config::parse("service=mydb port=6000").unwrap();
//! config.apply_env(getenv).unwrap();
//! assert_eq!(config.hosts, vec![pgwire_repl::config::Host::Tcp("db1".into())]);
//! // Options in the connection string win over the service's.
//! assert_eq!(config.ports, vec![6000]);
//! ```

use std::path::{Path, PathBuf};

use super::keywords::{Keyword, Source};
use super::{home_dir, Config};
use crate::error::{Error, Result};

/// The directory searched for `pg_service.conf` when `PGSYSCONFDIR` is not set.
///
/// libpq uses the `sysconfdir` it was built with. This client uses Debian's and
/// Ubuntu's (`pg_config --sysconfdir` of their libpq), the platform it is built for;
/// set `PGSYSCONFDIR` to use another directory, for example `/usr/local/pgsql/etc` for
/// a libpq built from source with the default prefix.
pub const DEFAULT_SYSCONFDIR: &str = "/etc/postgresql-common";

/// libpq reads service files with a 1024-byte line buffer.
const MAX_LINE: usize = 1023;

/// One `keyword=value` line of a service group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServiceEntry {
    pub(crate) keyword: String,
    pub(crate) value: String,
    pub(crate) file: PathBuf,
    pub(crate) line: usize,
}

/// Finds service `name` and returns its lines, in file order.
///
/// `getenv` supplies `PGSERVICEFILE`, `PGSYSCONFDIR` and (through `home`) the home
/// directory. `is_keyword` says whether a keyword is a connection option.
pub(crate) fn lookup(
    name: &str,
    getenv: &dyn Fn(&str) -> Option<String>,
    home: Option<PathBuf>,
    is_keyword: &dyn Fn(&str) -> bool,
) -> Result<Vec<ServiceEntry>> {
    let mut searched = Vec::new();
    let first = match getenv("PGSERVICEFILE") {
        Some(file) => Some(PathBuf::from(file)),
        None => home
            .map(|home| home.join(".pg_service.conf"))
            .filter(|file| std::fs::metadata(file).is_ok()),
    };
    if let Some(file) = first {
        if let Some(entries) = read_group(&file, name, is_keyword)? {
            return Ok(entries);
        }
        searched.push(file);
    }
    let sysconfdir = getenv("PGSYSCONFDIR").unwrap_or_else(|| DEFAULT_SYSCONFDIR.to_string());
    let system = Path::new(&sysconfdir).join("pg_service.conf");
    if std::fs::metadata(&system).is_ok() {
        if let Some(entries) = read_group(&system, name, is_keyword)? {
            return Ok(entries);
        }
        searched.push(system.clone());
    }
    let looked = if searched.is_empty() {
        format!(
            "no service file exists (PGSERVICEFILE is not set, and neither ~/.pg_service.conf nor {} exists)",
            system.display()
        )
    } else {
        let files: Vec<String> = searched
            .iter()
            .map(|f| format!("\"{}\"", f.display()))
            .collect();
        format!("searched {}", files.join(" and "))
    };
    Err(Error::config(
        format!("definition of service \"{name}\" not found ({looked})"),
        format!(
            "add a [{name}] section to the service file (PGSERVICEFILE, ~/.pg_service.conf or {}), or point PGSERVICEFILE or PGSYSCONFDIR at the file that has it",
            system.display()
        ),
    ))
}

/// Reads the group `[name]` of one file: `Ok(None)` when the file has no such group.
fn read_group(
    file: &Path,
    name: &str,
    is_keyword: &dyn Fn(&str) -> bool,
) -> Result<Option<Vec<ServiceEntry>>> {
    let bytes = std::fs::read(file).map_err(|e| {
        let message = if e.kind() == std::io::ErrorKind::NotFound {
            format!("service file \"{}\" not found", file.display())
        } else {
            format!("service file \"{}\" cannot be read: {e}", file.display())
        };
        Error::config(
            message,
            "create the file, fix its permissions, or unset PGSERVICEFILE so that ~/.pg_service.conf and the system pg_service.conf are used",
        )
    })?;
    let syntax = |line: usize, why: String| {
        Error::config(
            format!(
                "syntax error in service file \"{}\", line {line}: {why}",
                file.display()
            ),
            "write service entries as [name] lines followed by keyword=value lines (no spaces around =, no quotes), one per line",
        )
    };
    let mut entries: Option<Vec<ServiceEntry>> = None;
    for (index, (raw, newline)) in split_lines(&bytes).enumerate() {
        let number = index + 1;
        // fgets() with a 1024-byte buffer: a line that fills it (newline included) is
        // too long.
        if raw.len() + usize::from(newline) >= MAX_LINE {
            return Err(Error::config(
                format!(
                    "line {number} too long in service file \"{}\"",
                    file.display()
                ),
                "keep service file lines shorter than 1023 bytes",
            ));
        }
        let line = trim_c_space(raw);
        if line.is_empty() || line.first() == Some(&b'#') {
            continue;
        }
        if line.first() == Some(&b'[') {
            if entries.is_some() {
                // The end of the wanted group.
                break;
            }
            let rest = line.get(1..).unwrap_or_default();
            if rest.starts_with(name.as_bytes()) && rest.get(name.len()) == Some(&b']') {
                entries = Some(Vec::new());
            }
            continue;
        }
        let Some(group) = entries.as_mut() else {
            continue;
        };
        let text = String::from_utf8(line.to_vec())
            .map_err(|_| syntax(number, "the line is not valid UTF-8".into()))?;
        if text.starts_with("ldap") {
            return Err(Error::config(
                format!(
                    "service file \"{}\", line {number}: LDAP service lookups are not supported by this client",
                    file.display()
                ),
                "write the connection options of the service into the file as keyword=value lines",
            ));
        }
        let Some((keyword, value)) = text.split_once('=') else {
            return Err(syntax(number, "expected keyword=value".into()));
        };
        if keyword == "service" {
            return Err(Error::config(
                format!(
                    "nested service specifications not supported in service file \"{}\", line {number}",
                    file.display()
                ),
                "a service cannot name another service; copy that service's options into this one",
            ));
        }
        if !is_keyword(keyword) {
            return Err(syntax(
                number,
                format!("\"{keyword}\" is not a connection option"),
            ));
        }
        group.push(ServiceEntry {
            keyword: keyword.to_string(),
            value: value.to_string(),
            file: file.to_path_buf(),
            line: number,
        });
    }
    Ok(entries)
}

/// Lines as `fgets` returns them, without their newline, and whether one ended them.
fn split_lines(bytes: &[u8]) -> impl Iterator<Item = (&[u8], bool)> {
    let mut rest = Some(bytes);
    std::iter::from_fn(move || {
        let current = rest?;
        if current.is_empty() {
            rest = None;
            return None;
        }
        match current.iter().position(|&b| b == b'\n') {
            Some(end) => {
                rest = current.get(end + 1..);
                current.get(..end).map(|line| (line, true))
            }
            None => {
                rest = None;
                Some((current, false))
            }
        }
    })
}

/// Trims C `isspace` characters at both ends.
fn trim_c_space(mut line: &[u8]) -> &[u8] {
    let space = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\x0b' | b'\x0c' | b'\r');
    while let Some((first, rest)) = line.split_first() {
        if !space(first) {
            break;
        }
        line = rest;
    }
    while let Some((last, rest)) = line.split_last() {
        if !space(last) {
            break;
        }
        line = rest;
    }
    line
}

impl Config {
    /// Looks up the service (from `service`, else PGSERVICE) and fills the options not
    /// given explicitly from it, as libpq's `parseServiceInfo` does.
    pub(super) fn apply_service(&mut self, getenv: &dyn Fn(&str) -> Option<String>) -> Result<()> {
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
        let entries = lookup(&name, getenv, home_dir(getenv), &|keyword| {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyword(k: &str) -> bool {
        matches!(k, "host" | "port" | "user" | "dbname" | "sslmode")
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn env(vars: Vec<(&'static str, String)>) -> impl Fn(&str) -> Option<String> {
        move |name: &str| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.clone())
        }
    }

    fn pairs(entries: &[ServiceEntry]) -> Vec<(&str, &str)> {
        entries
            .iter()
            .map(|e| (e.keyword.as_str(), e.value.as_str()))
            .collect()
    }

    #[test]
    fn reads_the_group_as_libpq_does() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            dir.path(),
            "s.conf",
            "# comment\n[other]\nhost=nothere\n  [a] trailing words\n  host=db1  \r\n\n# c\nport=5433\nuser= spaced value\ndbname=\n[a]\nhost=second\n",
        );
        let entries = read_group(&file, "a", &keyword).unwrap().unwrap();
        assert_eq!(
            pairs(&entries),
            [
                ("host", "db1"),
                ("port", "5433"),
                ("user", " spaced value"),
                ("dbname", "")
            ]
        );
        assert_eq!(entries[0].line, 5);
        // A prefix of a group name is not that group.
        assert!(read_group(&file, "oth", &keyword).unwrap().is_none());
        assert!(read_group(&file, "missing", &keyword).unwrap().is_none());
        // The last line may lack its newline.
        let file = write(dir.path(), "t.conf", "[b]\nhost=x");
        assert_eq!(
            pairs(&read_group(&file, "b", &keyword).unwrap().unwrap()),
            [("host", "x")]
        );
    }

    #[test]
    fn syntax_errors_name_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("[a]\nhost db1\n", "syntax error in service file", "line 2"),
            ("[a]\nhost =db1\n", "syntax error in service file", "line 2"),
            ("[a]\nbogus=1\n", "syntax error in service file", "line 2"),
            (
                "[a]\n\nservice=b\n",
                "nested service specifications not supported",
                "line 3",
            ),
            ("[a]\nldap://h/x?y\n", "LDAP", "line 2"),
        ];
        for (text, what, line) in cases {
            let file = write(dir.path(), "bad.conf", text);
            let err = read_group(&file, "a", &keyword).unwrap_err();
            assert!(err.message().contains(what), "{text:?}: {err}");
            assert!(err.message().contains(line), "{text:?}: {err}");
            assert!(
                err.message().contains(&file.display().to_string()),
                "{text:?}: {err}"
            );
        }
        // Errors outside the wanted group do not matter.
        let file = write(dir.path(), "ok.conf", "[x]\nnonsense\n[a]\nhost=h\n");
        read_group(&file, "a", &keyword).unwrap().unwrap();
        // 1022 bytes and a newline fill libpq's buffer; 1021 do not.
        let fits = format!("[a]\nhost={}\n", "h".repeat(1021 - 5));
        let file = write(dir.path(), "fits.conf", &fits);
        read_group(&file, "a", &keyword).unwrap().unwrap();
        let long = format!("[a]\nhost={}\n", "h".repeat(1022 - 5));
        let file = write(dir.path(), "long.conf", &long);
        let err = read_group(&file, "a", &keyword).unwrap_err();
        assert!(err.message().contains("line 2 too long"), "{err}");
    }

    #[test]
    fn look_up_order() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let sys = dir.path().join("sys");
        std::fs::create_dir_all(&home).unwrap();
        std::fs::create_dir_all(&sys).unwrap();
        let explicit = write(
            dir.path(),
            "explicit.conf",
            "[both]\nhost=explicit\n[only_explicit]\nhost=e\n",
        );
        write(
            &home,
            ".pg_service.conf",
            "[both]\nhost=home\n[only_home]\nhost=h\n",
        );
        write(
            &sys,
            "pg_service.conf",
            "[both]\nhost=sys\n[only_sys]\nhost=s\n",
        );
        let host = |name: &str, vars: Vec<(&'static str, String)>| {
            lookup(name, &env(vars), Some(home.clone()), &keyword)
                .map(|entries| entries[0].value.clone())
        };
        let sysdir = ("PGSYSCONFDIR", sys.display().to_string());
        let file = ("PGSERVICEFILE", explicit.display().to_string());
        // PGSERVICEFILE first, then PGSYSCONFDIR; ~/.pg_service.conf is not read then.
        assert_eq!(
            host("both", vec![file.clone(), sysdir.clone()]).unwrap(),
            "explicit"
        );
        assert_eq!(
            host("only_sys", vec![file.clone(), sysdir.clone()]).unwrap(),
            "s"
        );
        let err = host("only_home", vec![file.clone(), sysdir.clone()]).unwrap_err();
        assert!(
            err.message()
                .contains("definition of service \"only_home\" not found"),
            "{err}"
        );
        // Without PGSERVICEFILE: ~/.pg_service.conf, then the system file.
        assert_eq!(host("both", vec![sysdir.clone()]).unwrap(), "home");
        assert_eq!(host("only_sys", vec![sysdir.clone()]).unwrap(), "s");
        // A PGSERVICEFILE that does not exist is an error, not skipped.
        let missing = (
            "PGSERVICEFILE",
            dir.path().join("nope").display().to_string(),
        );
        let err = host("both", vec![missing, sysdir.clone()]).unwrap_err();
        assert!(err.message().contains("service file \""), "{err}");
        assert!(err.message().contains("nope\" not found"), "{err}");
        // A missing system file is skipped.
        let err = host(
            "both",
            vec![(
                "PGSYSCONFDIR",
                dir.path().join("none").display().to_string(),
            )],
        );
        assert_eq!(err.unwrap(), "home");
        let err = lookup(
            "x",
            &env(vec![(
                "PGSYSCONFDIR",
                dir.path().join("none").display().to_string(),
            )]),
            None,
            &keyword,
        )
        .unwrap_err();
        assert!(
            err.message()
                .contains("definition of service \"x\" not found (no service file exists"),
            "{err}"
        );
    }
}

#[cfg(test)]
mod config_tests {
    use super::super::test_util::*;
    use super::super::*;
    use crate::error::ErrorKind;

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
}
