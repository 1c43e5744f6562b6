//! Starting a cloned data directory as a standby with `pg_ctl`, and waiting until it
//! streams and has caught up with its upstream.

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use pgwire_repl::Config;

use crate::error::{Error, Result};
use crate::status::{self, Status};

/// How long [`start_standby`] waits for the standby to catch up by default.
pub const DEFAULT_START_WAIT: Duration = Duration::from_secs(120);

/// How to start a cloned data directory.
#[derive(Debug, Clone)]
pub struct StartOptions {
    /// The data directory.
    pub pgdata: PathBuf,
    /// `pg_ctl` to use; `None` looks for it with [`find_pg_ctl`].
    pub pg_ctl: Option<PathBuf>,
    /// The port the standby listens on (appended to `postgresql.auto.conf`).
    pub port: Option<u16>,
    /// When running as root: the OS user that owns and runs the standby (PostgreSQL
    /// refuses to run as root); `postgres` when `None`.
    pub owner: Option<String>,
    /// How long to wait for the standby to catch up.
    pub timeout: Duration,
    /// The caller's name for the timeout option, named in the timeout error's advice.
    pub timeout_option: String,
}

impl StartOptions {
    /// Defaults for `pgdata`: `pg_ctl` looked up, the port of the copied configuration,
    /// [`DEFAULT_START_WAIT`].
    pub fn new(pgdata: impl Into<PathBuf>) -> StartOptions {
        StartOptions {
            pgdata: pgdata.into(),
            pg_ctl: None,
            port: None,
            owner: None,
            timeout: DEFAULT_START_WAIT,
            timeout_option: "the start timeout".into(),
        }
    }
}

/// Finds `pg_ctl` for a server of major version `major` as an operator would: the
/// explicit path, then `PATH`, then `pg_config --bindir`, then Debian's
/// `/usr/lib/postgresql/<major>/bin`. A `pg_ctl` of another major version is passed
/// over (it could not start this data directory).
///
/// ```no_run
/// let pg_ctl = standby::start::find_pg_ctl(None, 16)?;
/// # Ok::<(), standby::Error>(())
/// ```
pub fn find_pg_ctl(explicit: Option<&Path>, major: u32) -> Result<PathBuf> {
    if let Some(path) = explicit {
        return Ok(path.to_path_buf());
    }
    let mut tried = Vec::new();
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("pg_ctl"))
                .collect()
        })
        .unwrap_or_default();
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output() {
        if output.status.success() {
            let dir = String::from_utf8_lossy(&output.stdout).trim().to_string();
            candidates.push(PathBuf::from(dir).join("pg_ctl"));
        }
    }
    candidates.push(PathBuf::from(format!(
        "/usr/lib/postgresql/{major}/bin/pg_ctl"
    )));
    for candidate in candidates {
        if !candidate.is_file() {
            continue;
        }
        match pg_ctl_major(&candidate) {
            Some(found) if found == major => return Ok(candidate),
            found => tried.push(format!(
                "{} ({})",
                candidate.display(),
                found.map_or("version unknown".to_string(), |m| format!("PostgreSQL {m}"))
            )),
        }
    }
    Err(Error::usage(
        format!(
            "no pg_ctl of PostgreSQL {major} was found{}",
            if tried.is_empty() {
                String::new()
            } else {
                format!(" (passed over: {})", tried.join(", "))
            }
        ),
        format!("install the PostgreSQL {major} server, put its bin directory on PATH, or name pg_ctl with --pg-ctl"),
    ))
}

/// The major version `pg_ctl --version` reports.
fn pg_ctl_major(pg_ctl: &Path) -> Option<u32> {
    let output = Command::new(pg_ctl).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    // "pg_ctl (PostgreSQL) 16.4 (Debian 16.4-1)"
    let version = text.split(')').nth(1)?.split_whitespace().next()?;
    version.split('.').next()?.parse().ok()
}

/// Starts the clone in `options.pgdata` with `pg_ctl` (as `options.owner` when running
/// as root, after giving it the directory) and waits until it streams from `upstream`
/// and has replayed what `upstream` had when waiting began.
pub async fn start_standby(
    options: &StartOptions,
    upstream: &Config,
    major: u32,
) -> Result<Status> {
    let pgdata = &options.pgdata;
    if let Some(port) = options.port {
        let auto_conf = pgdata.join("postgresql.auto.conf");
        let mut file = fs::OpenOptions::new()
            .append(true)
            .open(&auto_conf)
            .map_err(|e| Error::io("opening", &auto_conf, e))?;
        writeln!(file, "port = {port}").map_err(|e| Error::io("writing", &auto_conf, e))?;
    }
    let pg_ctl = find_pg_ctl(options.pg_ctl.as_deref(), major)?;
    let log = pgdata.join("clone-standby-start.log");
    let mut command = Command::new(&pg_ctl);
    command
        .args(["start", "-w", "-t", "120", "-D"])
        .arg(pgdata)
        .arg("-l")
        .arg(&log);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let owner = options.owner.clone().unwrap_or_else(|| "postgres".into());
        let (uid, gid, home) = lookup_user(&owner).ok_or_else(|| {
            Error::usage(
                format!("no OS user {owner:?} to run the standby as (PostgreSQL refuses to run as root)"),
                "create that user, or name another with --owner",
            )
        })?;
        chown_tree(pgdata, uid, gid)?;
        // The standby's walreceiver reads ~/.postgresql and ~/.pgpass of its own user.
        command.uid(uid).gid(gid).env("HOME", home);
    }
    let output = command
        .output()
        .map_err(|e| Error::io("running", &pg_ctl, e))?;
    if !output.status.success() {
        return Err(Error::usage(
            format!(
                "{} start failed: {}{}\n  the standby's log ({}) ends with:\n{}",
                pg_ctl.display(),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                log.display(),
                log_tail(&log)
            ),
            "fix what the log says (a port in use, a missing directory), then start it with pg_ctl",
        ));
    }
    let standby = standby_connection(pgdata, upstream)?;
    status::wait_caught_up(upstream, &standby, options.timeout, &options.timeout_option)
        .await
        .map_err(|e| {
            Error::from(e).context(format!(
                "the standby's log ({}) ends with:\n{}",
                log.display(),
                log_tail(&log)
            ))
        })
}

/// A SQL connection to the server running on `pgdata` (its port and socket directory
/// from `postmaster.pid`), as the role of `upstream`.
fn standby_connection(pgdata: &Path, upstream: &Config) -> Result<Config> {
    let pid_path = pgdata.join("postmaster.pid");
    let pid_file = fs::read_to_string(&pid_path).map_err(|e| Error::io("reading", &pid_path, e))?;
    // Line 4 is the port, line 5 the socket directory.
    let lines: Vec<&str> = pid_file.lines().collect();
    let port = lines.get(3).map(|s| s.trim()).unwrap_or("5432");
    let socket_dir = lines
        .get(4)
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .unwrap_or("/var/run/postgresql");
    let mut standby = Config::parse(&format!("host={socket_dir} port={port} dbname=postgres"))?;
    standby.user = upstream.user.clone();
    standby.password = upstream.password.clone();
    standby.passfile = upstream.passfile.clone();
    Ok(standby)
}

/// Changes the owner of `dir` and everything below it, following tablespace links
/// (used before starting the standby as its OS user when running as root).
pub fn chown_tree(dir: &Path, uid: u32, gid: u32) -> Result<()> {
    fn walk(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
        let meta = fs::symlink_metadata(path)?;
        if meta.is_dir() {
            for entry in fs::read_dir(path)? {
                walk(&entry?.path(), uid, gid)?;
            }
        } else if meta.file_type().is_symlink() {
            // Tablespace links: chown their targets too.
            if let Ok(target) = fs::canonicalize(path) {
                if fs::metadata(&target).is_ok_and(|m| m.is_dir()) {
                    walk(&target, uid, gid)?;
                }
            }
        }
        Ok(())
    }
    walk(dir, uid, gid).map_err(|e| Error::io("changing the owner of", dir, e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io("setting the mode of", dir, e))
}

/// The uid, gid and home directory of an OS user.
fn lookup_user(name: &str) -> Option<(u32, u32, PathBuf)> {
    let c_name = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: an all-zero passwd is a valid out-parameter for getpwnam_r.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the duration of the call; buf's length is passed.
    let rc = unsafe {
        libc::getpwnam_r(
            c_name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return None;
    }
    let home = if pwd.pw_dir.is_null() {
        PathBuf::from("/")
    } else {
        // SAFETY: getpwnam_r succeeded, so pw_dir is a NUL-terminated string inside buf.
        let dir = unsafe { std::ffi::CStr::from_ptr(pwd.pw_dir) };
        PathBuf::from(OsStr::from_bytes(dir.to_bytes()))
    };
    Some((pwd.pw_uid, pwd.pw_gid, home))
}

/// The last lines of a log file, indented, for error messages.
pub fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..]
        .iter()
        .map(|l| format!("    {l}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_explicit_pg_ctl_wins_and_a_missing_one_names_the_fix() {
        assert_eq!(
            find_pg_ctl(Some(Path::new("/opt/pg/bin/pg_ctl")), 16).unwrap(),
            PathBuf::from("/opt/pg/bin/pg_ctl")
        );
        // No PostgreSQL 99 anywhere.
        let err = find_pg_ctl(None, 99).unwrap_err();
        assert!(err.to_string().contains("--pg-ctl"), "{err}");
    }
}
