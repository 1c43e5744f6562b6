//! The password file (`passfile`, `PGPASSFILE`, `~/.pgpass`), read as libpq reads it.

use std::path::Path;

use super::{Config, Host};

impl Config {
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
}

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
    use super::super::test_util::*;
    use super::super::*;
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;

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

    proptest! {
        #[test]
        fn passfile_matching_never_panics(
            contents in proptest::collection::vec(any::<u8>(), 0..200),
            host in "[a-z*:\\\\]{0,4}",
        ) {
            let _ = find_password(&contents, &[host], "5432", "db", "u");
        }
    }
}
