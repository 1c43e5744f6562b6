//! Where the PostgreSQL binaries and the cache live, and which OS user runs the server.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The major version used when `PGREPL_TEST_PG` is unset.
pub const DEFAULT_MAJOR: u32 = 15;

/// The oldest and newest majors the project supports.
const SUPPORTED: std::ops::RangeInclusive<u32> = 13..=18;

const INSTALL_HINT: &str = "run scripts/install-postgres.sh";

/// What `PGREPL_TEST_PG` asks for.
enum PgSpec {
    Major(u32),
    Dir(PathBuf),
}

fn pg_spec() -> PgSpec {
    match std::env::var("PGREPL_TEST_PG") {
        Err(std::env::VarError::NotPresent) => PgSpec::Major(DEFAULT_MAJOR),
        Err(std::env::VarError::NotUnicode(raw)) => PgSpec::Dir(PathBuf::from(raw)),
        Ok(value) => {
            let value = value.trim();
            if value.is_empty() {
                return PgSpec::Major(DEFAULT_MAJOR);
            }
            if value.bytes().all(|b| b.is_ascii_digit()) {
                let major: u32 = value.parse().unwrap_or(0);
                if !SUPPORTED.contains(&major) {
                    panic!(
                        "testkit: PGREPL_TEST_PG={value} is not a supported PostgreSQL major \
                         version (13 to 18) nor a binary directory"
                    );
                }
                PgSpec::Major(major)
            } else {
                PgSpec::Dir(PathBuf::from(value))
            }
        }
    }
}

/// The PostgreSQL major version the tests run against.
///
/// `PGREPL_TEST_PG` is either a major version (`13` to `18`) or a directory holding
/// `initdb`, `pg_ctl` and `postgres`; unset means 15. For a directory, the major is read
/// from `postgres --version`. Panics when the binaries are missing.
pub fn pg_major_from_env() -> u32 {
    match pg_spec() {
        PgSpec::Major(major) => major,
        PgSpec::Dir(dir) => {
            ensure_binaries(&dir, None);
            server_version(&dir).0
        }
    }
}

/// The directory holding the PostgreSQL server binaries the tests use.
///
/// For a major version `N` (from `PGREPL_TEST_PG`, default 15) this is
/// `<cache>/postgres/N/bin` (see [`cache_dir`]), falling back to
/// `/usr/lib/postgresql/N/bin`. For a directory, that directory. Panics, naming
/// `scripts/install-postgres.sh`, when the binaries are missing.
pub fn bin_dir_from_env() -> PathBuf {
    match pg_spec() {
        PgSpec::Dir(dir) => {
            ensure_binaries(&dir, None);
            dir
        }
        PgSpec::Major(major) => {
            let cached = cache_dir()
                .join("postgres")
                .join(major.to_string())
                .join("bin");
            let system = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"));
            for candidate in [&cached, &system] {
                if has_binaries(candidate) {
                    return candidate.clone();
                }
            }
            panic!(
                "testkit: PostgreSQL binaries for major {major} not found at {} nor at {}; \
                 {INSTALL_HINT} {major} (or set PGREPL_TEST_PG to a binary directory)",
                cached.display(),
                system.display()
            );
        }
    }
}

/// The per-machine cache directory: `$PGREPL_CACHE_DIR`, else `/var/cache/pgrepl` when
/// running as root, else `${XDG_CACHE_HOME:-$HOME/.cache}/pgrepl`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PGREPL_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if is_root() {
        return PathBuf::from("/var/cache/pgrepl");
    }
    if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(xdg).join("pgrepl");
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "/tmp".into());
    PathBuf::from(home).join(".cache").join("pgrepl")
}

const REQUIRED: [&str; 3] = ["initdb", "pg_ctl", "postgres"];

fn has_binaries(dir: &Path) -> bool {
    REQUIRED.iter().all(|name| dir.join(name).is_file())
}

/// Panics with an install hint unless `dir` holds `initdb`, `pg_ctl` and `postgres`.
pub(crate) fn ensure_binaries(dir: &Path, major: Option<u32>) {
    let missing: Vec<&str> = REQUIRED
        .iter()
        .copied()
        .filter(|name| !dir.join(name).is_file())
        .collect();
    if !missing.is_empty() {
        let which = match major {
            Some(major) => format!("for major {major} "),
            None => String::new(),
        };
        panic!(
            "testkit: PostgreSQL binaries {which}not found at {} (missing: {}); {INSTALL_HINT}",
            dir.display(),
            missing.join(", ")
        );
    }
}

/// Runs `postgres --version` and returns the major version and the full output line.
pub(crate) fn server_version(bin_dir: &Path) -> (u32, String) {
    let postgres = bin_dir.join("postgres");
    let output = Command::new(&postgres)
        .arg("--version")
        .env("LC_ALL", "C")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "testkit: could not run {} --version: {e}; {INSTALL_HINT}",
                postgres.display()
            )
        });
    let text = String::from_utf8_lossy(&output.stdout).trim().to_string();
    if !output.status.success() {
        panic!(
            "testkit: {} --version failed ({}): {text}{}",
            postgres.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    match parse_major(&text) {
        Some(major) => (major, text),
        None => panic!(
            "testkit: cannot read the major version from `{text}` ({} --version)",
            postgres.display()
        ),
    }
}

/// Parses `postgres (PostgreSQL) 15.13 (Debian ...)` into 15.
pub(crate) fn parse_major(version_line: &str) -> Option<u32> {
    let rest = version_line
        .split_once("(PostgreSQL)")
        .map(|(_, r)| r)
        .unwrap_or(version_line);
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// True when the process runs with effective uid 0.
pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The unprivileged OS user that runs initdb and postgres when the tests run as root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServerUser {
    pub(crate) name: String,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    /// Its home directory: the server's own libpq (the walreceiver of a standby) looks
    /// for `~/.postgresql/*` there, never in root's home.
    pub(crate) home: std::path::PathBuf,
}

/// `None` when not root (run as the current user); otherwise the user named by
/// `PGREPL_TEST_OS_USER` (default `postgres`). Panics if that user does not exist.
pub(crate) fn server_user() -> Option<ServerUser> {
    if !is_root() {
        return None;
    }
    let name = std::env::var("PGREPL_TEST_OS_USER")
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "postgres".to_string());
    let Some((uid, gid, home)) = lookup_user(&name) else {
        panic!(
            "testkit: running as root, so PostgreSQL must run as an unprivileged OS user, \
             but user `{name}` does not exist; {INSTALL_HINT} (it creates `postgres`) or set \
             PGREPL_TEST_OS_USER to an existing unprivileged user"
        );
    };
    if uid == 0 {
        panic!(
            "testkit: PGREPL_TEST_OS_USER={name} has uid 0; PostgreSQL refuses to run as root, \
             pick an unprivileged user"
        );
    }
    Some(ServerUser {
        name,
        uid,
        gid,
        home,
    })
}

fn lookup_user(name: &str) -> Option<(u32, u32, std::path::PathBuf)> {
    let cname = CString::new(name).ok()?;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: passwd is a plain C struct; all-zero is a valid (empty) value.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call and buf's length is passed along.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return None;
    }
    let home = if pwd.pw_dir.is_null() {
        std::path::PathBuf::from("/")
    } else {
        // SAFETY: getpwnam_r succeeded, so pw_dir points to a NUL-terminated string in buf.
        let dir = unsafe { std::ffi::CStr::from_ptr(pwd.pw_dir) };
        std::path::PathBuf::from(std::ffi::OsStr::from_bytes(dir.to_bytes()))
    };
    Some((pwd.pw_uid, pwd.pw_gid, home))
}

/// A command that runs as the server user (when root) with a predictable environment.
pub(crate) fn server_command(user: Option<&ServerUser>, program: &Path) -> Command {
    let mut cmd = Command::new(program);
    if let Some(user) = user {
        use std::os::unix::process::CommandExt;
        // std calls setgroups(0, NULL) before setuid when running as root and no
        // supplementary groups were given, so root's groups are dropped too.
        cmd.uid(user.uid).gid(user.gid).env("HOME", &user.home);
    }
    cmd.current_dir("/")
        .env("LC_ALL", "C")
        .env("LANG", "C")
        .env_remove("PGDATA")
        .env_remove("PGPORT")
        .env_remove("PGHOST")
        .env_remove("PGOPTIONS");
    cmd
}

/// Gives `path` (not following symlinks) to the server user, when there is one.
pub(crate) fn give_to(user: Option<&ServerUser>, path: &Path) -> std::io::Result<()> {
    match user {
        Some(user) => std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_version_lines() {
        assert_eq!(
            parse_major("postgres (PostgreSQL) 15.13 (Debian 15.13-0+deb12u1)"),
            Some(15)
        );
        assert_eq!(parse_major("postgres (PostgreSQL) 18beta1"), Some(18));
        assert_eq!(parse_major("postgres (PostgreSQL) 13.22"), Some(13));
        assert_eq!(parse_major("nonsense"), None);
    }

    #[test]
    #[should_panic(expected = "run scripts/install-postgres.sh")]
    fn missing_binaries_name_the_install_script() {
        ensure_binaries(Path::new("/nonexistent/pgrepl/bin"), Some(17));
    }
}
