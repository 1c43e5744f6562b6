//! Helpers shared by the end-to-end tests of the `clone-standby` binary.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use std::time::{Duration, Instant};

use pgwire_repl::{Config, SqlClient};
use testkit::Cluster;

pub mod repo;

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_clone-standby")
}

/// Runs the binary to completion (blocking).
pub fn run(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("run clone-standby")
}

/// Runs the binary on a blocking thread, so the async test keeps its runtime free.
pub async fn run_async(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || Command::new(bin()).args(&args).output().unwrap())
        .await
        .unwrap()
}

/// Standard output and standard error together.
pub fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

/// A scratch directory the server's OS user can traverse.
pub fn scratch() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("pgrepl-clone-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// A TCP port nobody listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `count:sum of row hashes` of a table: equal digests mean equal contents.
pub async fn table_digest(config: &Config, table: &str) -> String {
    let mut sql = SqlClient::connect(config).await.expect("digest connection");
    let value = sql
        .query_value(&format!(
            "SELECT count(*) || ':' || coalesce(sum(hashtext(t::text)::bigint), 0) FROM {table} t"
        ))
        .await
        .expect("digest query");
    value.unwrap_or_default()
}

/// Stops a standby started by `clone --start` when the test ends, pass or fail.
pub struct StandbyGuard {
    /// The pg_ctl of the server version under test.
    pub pg_ctl: PathBuf,
    /// The standby's data directory.
    pub pgdata: PathBuf,
}

impl Drop for StandbyGuard {
    fn drop(&mut self) {
        if !self.pgdata.join("postmaster.pid").exists() {
            return;
        }
        // SAFETY: geteuid has no preconditions.
        let mut command = if unsafe { libc::geteuid() } == 0 {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&self.pg_ctl);
            command
        } else {
            Command::new(&self.pg_ctl)
        };
        let _ = command
            .args(["stop", "-m", "immediate", "-D"])
            .arg(&self.pgdata)
            .output();
    }
}

/// A SQL connection to a server started on `pgdata`, read from its `postmaster.pid`.
pub fn standby_config(pgdata: &Path, user: &str) -> Config {
    let pid = std::fs::read_to_string(pgdata.join("postmaster.pid")).expect("postmaster.pid");
    let lines: Vec<&str> = pid.lines().collect();
    Config::parse(&format!(
        "host={} port={} user={user} dbname=postgres sslmode=disable",
        lines[4].trim(),
        lines[3].trim()
    ))
    .unwrap()
}

/// Every file below `dir` with its bytes, and every directory and link: equal snapshots
/// mean nothing was changed, added or removed.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                out.insert(path.clone(), b"<dir>".to_vec());
                walk(&path, out);
            } else if kind.is_symlink() {
                let target = std::fs::read_link(&path).unwrap();
                out.insert(path, target.into_os_string().into_encoded_bytes());
            } else {
                out.insert(path.clone(), std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, &mut out);
    out
}

/// Gives `path` to the owner of `like` (the server's OS user when tests run as root).
pub fn give_like(path: &Path, like: &Path) {
    let meta = std::fs::metadata(like).unwrap();
    std::os::unix::fs::chown(path, Some(meta.uid()), Some(meta.gid())).unwrap();
}

/// Stops a server at once (`pg_ctl stop -m immediate`: SIGQUIT to the postmaster) and
/// waits until it has exited. The postmaster is the test's child, so once it exits it is
/// a zombie until the cluster reaps it: "gone" means no such process or state `Z`.
pub fn stop_immediately(cluster: &Cluster) {
    let pid = cluster.pid().expect("running") as i32;
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid, libc::SIGQUIT) };
    let started = Instant::now();
    let running = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                // The state follows the parenthesised command name.
                let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
                Some(state != 'Z')
            })
            .unwrap_or(false)
    };
    while running() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the postmaster ignored SIGQUIT for 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until a restored server has finished recovery (promoted).
pub async fn wait_promoted(cluster: &Cluster) {
    let started = Instant::now();
    loop {
        if cluster
            .query_value("SELECT pg_is_in_recovery()::text")
            .await
            .as_deref()
            == Some("false")
        {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "recovery did not end:\n{}",
            cluster.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
