//! Running a child process and measuring it: wall time, user and system CPU of the
//! whole process tree, and peak resident set size.
//!
//! The child is reaped with `wait4`, whose `rusage` on Linux covers the child and
//! every descendant it waited for (pg_basebackup's forked WAL streamer included), and
//! whose `ru_maxrss` is the largest resident set among them.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Serialize;

/// What one measured run of a command cost.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Usage {
    /// Wall time from spawn to reaping, in seconds.
    pub wall_s: f64,
    /// User CPU of the process tree, in seconds.
    pub user_s: f64,
    /// System CPU of the process tree, in seconds.
    pub sys_s: f64,
    /// Peak resident set size of the largest process in the tree, in KiB.
    pub max_rss_kib: u64,
    /// Exit code, or `None` when a signal ended the process.
    pub exit_code: Option<i32>,
    /// The signal that ended the process, if any.
    pub signal: Option<i32>,
    /// True when the watchdog killed the process for running too long.
    pub timed_out: bool,
}

impl Usage {
    /// User plus system CPU, in seconds.
    pub fn cpu_s(&self) -> f64 {
        self.user_s + self.sys_s
    }

    /// True when the process exited with status 0.
    pub fn success(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out
    }
}

fn timeval_s(tv: libc::timeval) -> f64 {
    tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6
}

/// Runs `cmd` to completion with its stdout and stderr appended to `log`, and measures it.
///
/// The child runs in its own process group; after `timeout` the whole group is killed
/// with SIGKILL and [`Usage::timed_out`] is set. Only a failure to start the process or
/// to reap it is an `Err`.
pub fn run_measured(cmd: &mut Command, log: &Path, timeout: Duration) -> std::io::Result<Usage> {
    let out = File::options().create(true).append(true).open(log)?;
    let err = out.try_clone()?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .process_group(0);
    let started = Instant::now();
    let child = cmd.spawn()?;
    let pid = child.id() as libc::pid_t;
    // The watchdog: kills the process group unless told the child is reaped.
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(timeout) {
            // SAFETY: kill has no memory-safety preconditions; the group is the child's
            // own (process_group(0)) and the child is not reaped yet, so its pid is ours.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            true
        } else {
            false
        }
    });
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is a plain C struct; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let result = loop {
        // SAFETY: both pointers are valid for the duration of the call.
        let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if rc == pid {
            break Ok(());
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::Interrupted {
            break Err(error);
        }
    };
    let wall_s = started.elapsed().as_secs_f64();
    let _ = done_tx.send(());
    let timed_out = watchdog.join().unwrap_or(false);
    // The child is reaped by wait4; std's Child does not wait on drop.
    drop(child);
    result?;
    let (exit_code, signal) = if libc::WIFEXITED(status) {
        (Some(libc::WEXITSTATUS(status)), None)
    } else if libc::WIFSIGNALED(status) {
        (None, Some(libc::WTERMSIG(status)))
    } else {
        (None, None)
    };
    Ok(Usage {
        wall_s,
        user_s: timeval_s(ru.ru_utime),
        sys_s: timeval_s(ru.ru_stime),
        max_rss_kib: ru.ru_maxrss.max(0) as u64,
        exit_code,
        signal,
        timed_out,
    })
}

/// [`run_measured`], with the outcome in one line: the usage, and why the run failed
/// when it did not exit 0 within `timeout` (the log's last line, the time limit, or the
/// failure to start).
pub fn run_logged(cmd: &mut Command, log: &Path, timeout: Duration) -> (Usage, Option<String>) {
    match run_measured(cmd, log, timeout) {
        Ok(usage) if usage.success() => (usage, None),
        Ok(usage) => {
            let why = if usage.timed_out {
                format!("timed out after {} s", timeout.as_secs())
            } else {
                last_line(log)
            };
            (usage, Some(why))
        }
        Err(e) => (
            Usage::default(),
            Some(format!(
                "could not run {}: {e}",
                Path::new(cmd.get_program()).display()
            )),
        ),
    }
}

/// The total size in bytes of the regular files under `path` (symlinks not followed).
pub fn tree_size(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if meta.is_file() {
        return meta.len();
    }
    if !meta.is_dir() {
        return 0;
    }
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .filter_map(|entry| entry.ok())
        .map(|entry| tree_size(&entry.path()))
        .sum()
}

/// The last non-empty line of a log file, for one-line failure messages.
pub fn last_line(log: &Path) -> String {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .unwrap_or("(no output)")
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_a_child_tree() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        // A child that forks a grandchild which burns CPU, then waits for it.
        let usage = run_measured(
            Command::new("sh").args([
                "-c",
                "(i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done) & wait; echo done",
            ]),
            &log,
            Duration::from_secs(60),
        )
        .unwrap();
        assert!(usage.success(), "{usage:?}");
        assert!(usage.cpu_s() > 0.0, "{usage:?}");
        assert!(usage.max_rss_kib > 0);
        assert_eq!(last_line(&log), "done");
    }

    #[test]
    fn reports_failure_and_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let usage = run_measured(
            Command::new("sh").args(["-c", "exit 3"]),
            &log,
            Duration::from_secs(60),
        )
        .unwrap();
        assert_eq!(usage.exit_code, Some(3));
        let usage = run_measured(
            Command::new("sleep").arg("30"),
            &log,
            Duration::from_millis(200),
        )
        .unwrap();
        assert!(usage.timed_out && !usage.success());
        assert_eq!(usage.signal, Some(libc::SIGKILL));
    }
}
