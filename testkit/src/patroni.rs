//! Throwaway Patroni clusters for tests: one etcd and N Patroni nodes running
//! PostgreSQL on loopback, each node with its own data directory, PostgreSQL port and
//! REST API port, all in one temporary directory, torn down on drop.
//!
//! The programs are Debian's `patroni` (3.0.2, with `patronictl`) and `etcd-server`
//! (3.4), which `scripts/install-test-tools.sh` installs; a missing one makes the test
//! panic naming that script (tests fail, they never skip). `$PGREPL_PATRONI`,
//! `$PGREPL_PATRONICTL` and `$PGREPL_ETCD` name other binaries.
//!
//! Patroni talks to etcd through its v3 API (`etcd3:`, Patroni's etcd3 module over
//! python3-etcd). Its `bin_dir` is a directory of symbolic links to the server's
//! binaries, where [`PatroniOptions::replace_tool`] puts another program in place of
//! one (our drop-in `pg_basebackup`). PostgreSQL and Patroni run as the OS user that
//! runs the test clusters (`postgres` when the tests run as root).
//!
//! ```no_run
//! use testkit::patroni::{PatroniCluster, PatroniOptions, ReplicaMethod};
//! let mut ha = PatroniCluster::start(
//!     PatroniOptions::new(testkit::bin_dir_from_env()).permanent_slot("walarchive"),
//! );
//! let first = ha.add_node(&[ReplicaMethod::Basebackup]);
//! # async {
//! assert_eq!(ha.wait_for_leader(std::time::Duration::from_secs(60)).await, first);
//! # };
//! ```

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::cluster::free_port;
use crate::env::{self, ServerUser};

/// What to run when a Patroni program is missing.
pub const INSTALL_HINT: &str =
    "run scripts/install-test-tools.sh (it installs Debian's patroni, etcd-server and python3-etcd)";

/// The database superuser and its password.
pub const SUPERUSER: (&str, &str) = ("postgres", "pgrepl-super-secret");
/// The replication role Patroni creates, and its password.
pub const REPLICATION_USER: (&str, &str) = ("replicator", "pgrepl-repl-secret");

/// How long etcd may take to answer its health check.
const ETCD_START_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts at starting etcd on free ports.
const PORT_ATTEMPTS: usize = 5;
/// Lines of each log printed when a test panics.
const LOG_TAIL_LINES: usize = 120;

fn program(var: &str, default: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(var).filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let path = PathBuf::from(default);
    if !path.is_file() {
        panic!(
            "testkit: {} not found (set {var} to another binary); {INSTALL_HINT}",
            path.display()
        );
    }
    path
}

/// The etcd binary: `$PGREPL_ETCD`, else `/usr/bin/etcd`.
pub fn etcd_bin() -> PathBuf {
    program("PGREPL_ETCD", "/usr/bin/etcd")
}

/// The patroni binary: `$PGREPL_PATRONI`, else `/usr/bin/patroni`.
pub fn patroni_bin() -> PathBuf {
    program("PGREPL_PATRONI", "/usr/bin/patroni")
}

/// The patronictl binary: `$PGREPL_PATRONICTL`, else `/usr/bin/patronictl`.
pub fn patronictl_bin() -> PathBuf {
    program("PGREPL_PATRONICTL", "/usr/bin/patronictl")
}

/// How a node makes its data directory when it joins as a replica
/// (`create_replica_methods` in its `patroni.yml`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaMethod {
    /// Patroni's built-in method: `<bin_dir>/pg_basebackup --pgdata=… -X stream
    /// --dbname=… --checkpoint=fast`.
    Basebackup,
    /// A custom method: Patroni runs `command --scope=… --role=replica --datadir=…
    /// --connstring=…` plus `--KEY=VALUE` for each option (`keep_data: false`,
    /// `no_params: false`).
    Custom {
        /// The method's name (its section in `patroni.yml`).
        name: String,
        /// The program Patroni runs.
        command: PathBuf,
        /// Further keys of the method's section, passed as `--KEY=VALUE`.
        options: Vec<(String, String)>,
    },
}

/// How to set up a [`PatroniCluster`]; a builder.
#[derive(Debug, Clone)]
pub struct PatroniOptions {
    pg_bin_dir: PathBuf,
    replace: Vec<(String, PathBuf)>,
    slots: Vec<String>,
    parameters: Vec<(String, String)>,
    synchronous_mode: bool,
    ttl: u32,
    loop_wait: u32,
    retry_timeout: u32,
}

impl PatroniOptions {
    /// PostgreSQL from `pg_bin_dir`; ttl 10 s, loop_wait 1 s, retry_timeout 4 s (a
    /// failover within about 10 s); synchronous mode off; no permanent slots.
    pub fn new(pg_bin_dir: impl Into<PathBuf>) -> PatroniOptions {
        PatroniOptions {
            pg_bin_dir: pg_bin_dir.into(),
            replace: Vec::new(),
            slots: Vec::new(),
            parameters: Vec::new(),
            synchronous_mode: false,
            ttl: 10,
            loop_wait: 1,
            retry_timeout: 4,
        }
    }

    /// Puts `program` in Patroni's `bin_dir` under the name `tool` (e.g. our
    /// `pg_basebackup`) instead of the server's binary of that name.
    pub fn replace_tool(mut self, tool: impl Into<String>, program: impl Into<PathBuf>) -> Self {
        self.replace.push((tool.into(), program.into()));
        self
    }

    /// Declares a permanent physical replication slot in the DCS configuration
    /// (`slots: {name: {type: physical}}`): the leader keeps it, and Patroni drops any
    /// physical slot it does not know.
    pub fn permanent_slot(mut self, name: impl Into<String>) -> Self {
        self.slots.push(name.into());
        self
    }

    /// A PostgreSQL parameter in the DCS configuration (every node), after testkit's.
    pub fn parameter(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.parameters.push((name.into(), value.into()));
        self
    }

    /// Patroni's `synchronous_mode`: a COMMIT waits for one synchronous standby, and only
    /// that standby may be promoted, so no acknowledged commit is lost in a failover.
    pub fn synchronous_mode(mut self, on: bool) -> Self {
        self.synchronous_mode = on;
        self
    }

    /// Patroni's `ttl`, `loop_wait` and `retry_timeout`, in seconds.
    pub fn timing(mut self, ttl: u32, loop_wait: u32, retry_timeout: u32) -> Self {
        self.ttl = ttl;
        self.loop_wait = loop_wait;
        self.retry_timeout = retry_timeout;
        self
    }
}

/// One Patroni node.
#[derive(Debug)]
pub struct PatroniNode {
    name: String,
    dir: PathBuf,
    data_dir: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    pg_port: u16,
    api_port: u16,
    child: Option<Child>,
}

impl PatroniNode {
    /// The member name (`n1`, `n2`, …), also the `application_name` of its WAL receiver.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The PostgreSQL data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The node's `patroni.yml` (usable with `patronictl -c`).
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The log of Patroni and of its PostgreSQL (both write to it).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// PostgreSQL's TCP port on 127.0.0.1 (and its socket's port number).
    pub fn pg_port(&self) -> u16 {
        self.pg_port
    }

    /// The REST API's port on 127.0.0.1.
    pub fn api_port(&self) -> u16 {
        self.api_port
    }

    /// The directory holding PostgreSQL's Unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the node's Patroni process runs (it is not after [`PatroniCluster::kill_hard`]).
    pub fn patroni_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// A superuser SQL connection over the Unix socket (trusted there).
    pub fn sql_config(&self) -> pgwire_repl::Config {
        let conninfo = format!(
            "host={} port={} user={} dbname=postgres sslmode=disable connect_timeout=5",
            self.dir.display(),
            self.pg_port,
            SUPERUSER.0
        );
        pgwire_repl::Config::parse(&conninfo)
            .unwrap_or_else(|e| panic!("testkit: could not parse `{conninfo}`: {e}"))
    }

    /// A superuser SQL session over the Unix socket, or the error (the node may be down).
    pub async fn sql(&self) -> pgwire_repl::Result<pgwire_repl::SqlClient> {
        pgwire_repl::SqlClient::connect(&self.sql_config()).await
    }

    /// Runs a one-value query; `None` when the node cannot be reached or the query fails.
    pub async fn try_query(&self, sql: &str) -> Option<Option<String>> {
        let mut client = self.sql().await.ok()?;
        let value = client.query_value(sql).await.ok();
        let _ = client.close().await;
        value
    }

    /// The postmaster's pid, from `postmaster.pid`, when that process exists.
    pub fn postmaster_pid(&self) -> Option<i32> {
        let text = fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        let pid: i32 = text.lines().next()?.trim().parse().ok()?;
        alive(pid).then_some(pid)
    }
}

/// A member as Patroni's REST API (`GET /cluster`) reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The member name.
    pub name: String,
    /// `leader`, `sync_standby`, `replica`, …
    pub role: String,
    /// `running`, `starting`, `creating replica`, `stopped`, …
    pub state: String,
    /// PostgreSQL's port.
    pub port: u16,
    /// The timeline, when Patroni reports it.
    pub timeline: Option<u64>,
}

/// A running etcd and the Patroni nodes added to it; everything is killed and removed on
/// drop (kept with `PGREPL_TEST_KEEP=1`).
pub struct PatroniCluster {
    opts: PatroniOptions,
    root: Option<TempDir>,
    root_path: PathBuf,
    bin_dir: PathBuf,
    user: Option<ServerUser>,
    etcd: Option<Child>,
    etcd_port: u16,
    etcd_log: PathBuf,
    nodes: Vec<PatroniNode>,
    scope: String,
    client_pgpass: PathBuf,
}

impl std::fmt::Debug for PatroniCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PatroniCluster")
            .field("root", &self.root_path)
            .field("etcd_port", &self.etcd_port)
            .field("nodes", &self.nodes)
            .finish_non_exhaustive()
    }
}

fn yaml_str(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Whether a process exists and is not a zombie.
fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z'),
        Err(_) => false,
    }
}

/// Every live process (pid, parent pid, command line).
fn processes() -> Vec<(i32, i32, String)> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().unwrap_or("Z");
        let ppid: i32 = fields.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        if state == "Z" {
            continue;
        }
        let cmdline = fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        out.push((pid, ppid, cmdline));
    }
    out
}

/// SIGKILLs `pids` and waits (up to 10 s) until none of them is alive.
fn kill_and_wait(pids: &[i32]) {
    for &pid in pids {
        // SAFETY: kill(2) has no memory-safety preconditions; every pid was read from
        // /proc just before and belongs to a process of this test (see the callers).
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|&pid| alive(pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A minimal HTTP/1.0 request to 127.0.0.1:`port`; returns the status and the body.
fn http(port: u16, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl PatroniCluster {
    /// Starts etcd on free loopback ports and prepares Patroni's `bin_dir`; no node runs
    /// yet ([`PatroniCluster::add_node`]). Panics, naming
    /// `scripts/install-test-tools.sh`, when etcd or Patroni is missing.
    pub fn start(opts: PatroniOptions) -> PatroniCluster {
        let etcd = etcd_bin();
        patroni_bin();
        patronictl_bin();
        env::ensure_binaries(&opts.pg_bin_dir, None);
        let user = env::server_user();
        let root = crate::cluster::scratch_dir("pgrepl-ha-");
        let root_path = root.path().to_path_buf();
        if root_path.as_os_str().len() > 70 {
            panic!(
                "testkit: {} is too long for a Unix socket path; set PGREPL_TEST_TMPDIR to a shorter directory",
                root_path.display()
            );
        }
        fs::set_permissions(&root_path, fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("testkit: chmod {}: {e}", root_path.display()));

        let bin_dir = root_path.join("bin");
        build_bin_dir(&opts, &bin_dir, user.as_ref());

        // The clients' password file (receivers, patronictl-free checks): root's, 0600.
        let client_pgpass = root_path.join("client.pgpass");
        let pgpass = format!(
            "*:*:*:{}:{}\n*:*:*:{}:{}\n",
            SUPERUSER.0, SUPERUSER.1, REPLICATION_USER.0, REPLICATION_USER.1
        );
        fs::write(&client_pgpass, pgpass)
            .and_then(|()| fs::set_permissions(&client_pgpass, fs::Permissions::from_mode(0o600)))
            .unwrap_or_else(|e| panic!("testkit: writing {}: {e}", client_pgpass.display()));

        let mut cluster = PatroniCluster {
            opts,
            root: Some(root),
            etcd_log: root_path.join("etcd.log"),
            root_path,
            bin_dir,
            user,
            etcd: None,
            etcd_port: 0,
            nodes: Vec::new(),
            scope: "pgrepl-ha".to_string(),
            client_pgpass,
        };
        cluster.start_etcd(&etcd);
        cluster
    }

    fn start_etcd(&mut self, etcd: &Path) {
        let data = self.root_path.join("etcd");
        for attempt in 1..=PORT_ATTEMPTS {
            let client = free_port();
            let peer = free_port();
            let log = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.etcd_log)
                .unwrap_or_else(|e| panic!("testkit: {}: {e}", self.etcd_log.display()));
            let log2 = log.try_clone().expect("clone a file handle");
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let mut cmd = Command::new(etcd);
            cmd.arg("--name")
                .arg("etcd0")
                .arg("--data-dir")
                .arg(&data)
                .args(["--listen-client-urls", &client_url])
                .args(["--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &format!("etcd0={peer_url}")])
                .args(["--logger", "zap", "--log-outputs", "stderr"])
                .current_dir(&self.root_path)
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log2)
                .process_group(0);
            let mut child = cmd.spawn().unwrap_or_else(|e| {
                panic!(
                    "testkit: could not run {}: {e}; {INSTALL_HINT}",
                    etcd.display()
                )
            });
            let deadline = Instant::now() + ETCD_START_TIMEOUT;
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    let log = fs::read_to_string(&self.etcd_log).unwrap_or_default();
                    if log.contains("address already in use") && attempt < PORT_ATTEMPTS {
                        let _ = fs::remove_dir_all(&data);
                        break;
                    }
                    panic!(
                        "testkit: etcd exited at start ({status}):\n{}",
                        tail(&log, LOG_TAIL_LINES)
                    );
                }
                if let Ok((200, body)) = http(client, "GET", "/health", "") {
                    if body.contains("true") {
                        self.etcd = Some(child);
                        self.etcd_port = client;
                        return;
                    }
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "testkit: etcd did not become healthy within {} s:\n{}",
                        ETCD_START_TIMEOUT.as_secs(),
                        tail(
                            &fs::read_to_string(&self.etcd_log).unwrap_or_default(),
                            LOG_TAIL_LINES
                        )
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("testkit: no free ports for etcd after {PORT_ATTEMPTS} attempts");
    }

    /// The cluster's name in the DCS (Patroni's `scope`).
    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// etcd's client endpoint, `127.0.0.1:PORT`.
    pub fn etcd_endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.etcd_port)
    }

    /// Patroni's `bin_dir`.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The temporary directory holding everything.
    pub fn base_dir(&self) -> &Path {
        &self.root_path
    }

    /// A password file (mode 0600, owned by the test's user) with the superuser's and the
    /// replication role's passwords, for clients: set `PGPASSFILE` to it.
    pub fn client_pgpass(&self) -> &Path {
        &self.client_pgpass
    }

    /// The nodes, in the order they were added.
    pub fn nodes(&self) -> &[PatroniNode] {
        &self.nodes
    }

    /// One node.
    pub fn node(&self, index: usize) -> &PatroniNode {
        &self.nodes[index]
    }

    /// The index of the node named `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// A TCP connection string naming every node, in order:
    /// `host=127.0.0.1,127.0.0.1,… port=P1,P2,… user=USER dbname=postgres`.
    pub fn multi_host_conninfo(&self, user: &str) -> String {
        let hosts: Vec<&str> = self.nodes.iter().map(|_| "127.0.0.1").collect();
        let ports: Vec<String> = self.nodes.iter().map(|n| n.pg_port.to_string()).collect();
        format!(
            "host={} port={} user={user} dbname=postgres",
            hosts.join(","),
            ports.join(",")
        )
    }

    /// Adds a node: writes its `patroni.yml` and starts its Patroni (which bootstraps the
    /// cluster when there is no leader yet, else makes a replica with `methods`, in
    /// order). Returns its index.
    pub fn add_node(&mut self, methods: &[ReplicaMethod]) -> usize {
        let index = self.nodes.len();
        let name = format!("n{}", index + 1);
        let dir = self.root_path.join(&name);
        fs::create_dir(&dir)
            .and_then(|()| fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)))
            .and_then(|()| env::give_to(self.user.as_ref(), &dir))
            .unwrap_or_else(|e| panic!("testkit: could not create {}: {e}", dir.display()));
        let mut node = PatroniNode {
            data_dir: dir.join("data"),
            config_path: dir.join("patroni.yml"),
            log_path: dir.join("patroni.log"),
            name,
            dir,
            pg_port: free_port(),
            api_port: free_port(),
            child: None,
        };
        let config = self.node_config(&node, methods);
        fs::write(&node.config_path, config)
            .and_then(|()| {
                fs::set_permissions(&node.config_path, fs::Permissions::from_mode(0o600))
            })
            .and_then(|()| env::give_to(self.user.as_ref(), &node.config_path))
            .unwrap_or_else(|e| panic!("testkit: writing {}: {e}", node.config_path.display()));
        node.child = Some(spawn_patroni(self.user.as_ref(), &node));
        self.nodes.push(node);
        index
    }

    fn node_config(&self, node: &PatroniNode, methods: &[ReplicaMethod]) -> String {
        let o = &self.opts;
        let mut y = String::new();
        let mut line = |s: &str| {
            y.push_str(s);
            y.push('\n');
        };
        line("# Generated by testkit::patroni.");
        line(&format!("scope: {}", yaml_str(&self.scope)));
        line(&format!("name: {}", yaml_str(&node.name)));
        line("log:\n  level: INFO");
        line("watchdog:\n  mode: 'off'");
        line(&format!(
            "restapi:\n  listen: '127.0.0.1:{0}'\n  connect_address: '127.0.0.1:{0}'",
            node.api_port
        ));
        line(&format!("etcd3:\n  hosts: '{}'", self.etcd_endpoint()));
        line("bootstrap:\n  dcs:");
        line(&format!(
            "    ttl: {}\n    loop_wait: {}\n    retry_timeout: {}",
            o.ttl, o.loop_wait, o.retry_timeout
        ));
        // With synchronous mode only the synchronous standby is promoted; without it,
        // any replica lagging less than this.
        line("    maximum_lag_on_failover: 1073741824");
        line(&format!("    synchronous_mode: {}", o.synchronous_mode));
        line(
            "    postgresql:\n      use_pg_rewind: true\n      use_slots: true\n      parameters:",
        );
        let mut parameters: Vec<(String, String)> = [
            ("wal_level", "replica"),
            ("hot_standby", "on"),
            ("max_connections", "40"),
            ("max_wal_senders", "16"),
            ("max_replication_slots", "16"),
            ("wal_keep_size", "1GB"),
            ("max_wal_size", "1GB"),
            ("shared_buffers", "32MB"),
            ("wal_log_hints", "on"),
            ("log_line_prefix", "%m [%p] %q%u@%d %a "),
            ("log_connections", "on"),
            ("log_disconnections", "on"),
            ("log_replication_commands", "on"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        parameters.extend(o.parameters.iter().cloned());
        for (name, value) in &parameters {
            line(&format!("        {name}: {}", yaml_str(value)));
        }
        if !o.slots.is_empty() {
            line("    slots:");
            for slot in &o.slots {
                line(&format!("      {slot}:\n        type: physical"));
            }
        }
        line("  initdb:\n    - encoding: UTF8\n    - data-checksums");
        line("postgresql:");
        line(&format!(
            "  listen: '127.0.0.1:{0}'\n  connect_address: '127.0.0.1:{0}'",
            node.pg_port
        ));
        line(&format!(
            "  data_dir: {}",
            yaml_str(&node.data_dir.display().to_string())
        ));
        line(&format!(
            "  bin_dir: {}",
            yaml_str(&self.bin_dir.display().to_string())
        ));
        line(&format!(
            "  pgpass: {}",
            yaml_str(&node.dir.join("pgpass").display().to_string())
        ));
        line("  authentication:");
        line(&format!(
            "    superuser:\n      username: {}\n      password: {}",
            yaml_str(SUPERUSER.0),
            yaml_str(SUPERUSER.1)
        ));
        line(&format!(
            "    replication:\n      username: {}\n      password: {}",
            yaml_str(REPLICATION_USER.0),
            yaml_str(REPLICATION_USER.1)
        ));
        line("  parameters:");
        line(&format!(
            "    unix_socket_directories: {}",
            yaml_str(&node.dir.display().to_string())
        ));
        line("  pg_hba:");
        for hba in [
            "local all all trust",
            "local replication all trust",
            "host all all 127.0.0.1/32 scram-sha-256",
            "host replication all 127.0.0.1/32 scram-sha-256",
        ] {
            line(&format!("    - {}", yaml_str(hba)));
        }
        let names: Vec<String> = methods
            .iter()
            .map(|m| match m {
                ReplicaMethod::Basebackup => "basebackup".to_string(),
                ReplicaMethod::Custom { name, .. } => name.clone(),
            })
            .collect();
        if !names.is_empty() {
            line(&format!("  create_replica_methods: [{}]", names.join(", ")));
        }
        for method in methods {
            match method {
                // PostgreSQL's pg_basebackup waits for a spread checkpoint by default.
                ReplicaMethod::Basebackup => line("  basebackup:\n    checkpoint: 'fast'"),
                ReplicaMethod::Custom {
                    name,
                    command,
                    options,
                } => {
                    line(&format!("  {name}:"));
                    line(&format!(
                        "    command: {}",
                        yaml_str(&command.display().to_string())
                    ));
                    line("    keep_data: false\n    no_params: false");
                    for (key, value) in options {
                        line(&format!("    {key}: {}", yaml_str(value)));
                    }
                }
            }
        }
        y
    }

    /// Starts a node's Patroni again after [`PatroniCluster::kill_hard`] (same
    /// configuration and data directory). Panics if it runs.
    pub fn restart_node(&mut self, index: usize) {
        if self.nodes[index].patroni_running() {
            panic!(
                "testkit: restart_node({index}): {}'s Patroni still runs",
                self.nodes[index].name
            );
        }
        let child = spawn_patroni(self.user.as_ref(), &self.nodes[index]);
        self.nodes[index].child = Some(child);
    }

    /// The members as the REST API of the first node that answers reports them (empty
    /// when none answers).
    pub fn members(&self) -> Vec<Member> {
        for node in &self.nodes {
            let Ok((200, body)) = http(node.api_port, "GET", "/cluster", "") else {
                continue;
            };
            let Ok(value) = serde_json::from_str::<serde_json::Value>(&body) else {
                continue;
            };
            let Some(members) = value["members"].as_array() else {
                continue;
            };
            return members
                .iter()
                .map(|m| Member {
                    name: m["name"].as_str().unwrap_or_default().to_string(),
                    role: m["role"].as_str().unwrap_or_default().to_string(),
                    state: m["state"].as_str().unwrap_or_default().to_string(),
                    port: m["port"].as_u64().unwrap_or(0) as u16,
                    timeline: m["timeline"].as_u64(),
                })
                .collect();
        }
        Vec::new()
    }

    /// The index of the running leader, if the REST API names one.
    pub fn leader(&self) -> Option<usize> {
        self.members()
            .iter()
            .find(|m| m.role == "leader" && m.state == "running")
            .and_then(|m| self.index_of(&m.name))
    }

    /// Waits until a leader runs and accepts writes (not in recovery); returns its index.
    /// Panics with every node's log after `timeout`.
    pub async fn wait_for_leader(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(index) = self.leader() {
                let writable = self.nodes[index]
                    .try_query("SELECT pg_is_in_recovery()::text")
                    .await;
                if writable == Some(Some("false".to_string())) {
                    return index;
                }
            }
            if Instant::now() >= deadline {
                self.fail(&format!(
                    "no leader accepting writes within {} s",
                    timeout.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until node `index` is a replica whose WAL receiver streams
    /// (`pg_stat_wal_receiver.status = 'streaming'`). Panics with the logs after `timeout`.
    pub async fn wait_streaming(&self, index: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.nodes[index]
                .try_query("SELECT status FROM pg_stat_wal_receiver")
                .await;
            if status == Some(Some("streaming".to_string())) {
                return;
            }
            if Instant::now() >= deadline {
                self.fail(&format!(
                    "{} is not a streaming replica within {} s (members: {:?})",
                    self.nodes[index].name,
                    timeout.as_secs(),
                    self.members()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs `patronictl -c <first node's patroni.yml> ARGS` and returns its output.
    pub fn patronictl(&self, args: &[&str]) -> Output {
        let config = &self.nodes.first().expect("a node was added").config_path;
        Command::new(patronictl_bin())
            .arg("-c")
            .arg(config)
            .args(args)
            .env("LC_ALL", "C.UTF-8")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("testkit: could not run patronictl: {e}; {INSTALL_HINT}"))
    }

    /// A planned switchover to `candidate`: `patronictl switchover --leader L --candidate
    /// C --force`. Panics when patronictl reports a failure. Returns its output.
    pub fn switchover(&self, candidate: usize) -> String {
        let leader = self
            .leader()
            .unwrap_or_else(|| self.fail("switchover: no leader"));
        let output = self.patronictl(&[
            "switchover",
            "--leader",
            &self.nodes[leader].name,
            "--candidate",
            &self.nodes[candidate].name,
            "--force",
        ]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        // patronictl exits 0 even when the API refused ("Switchover failed, details: …").
        if !output.status.success() || text.contains("failed") {
            self.fail(&format!(
                "patronictl switchover failed ({}):\n{text}",
                output.status
            ));
        }
        text
    }

    /// A crash of node `index`: SIGKILL to its Patroni (its whole process group), its
    /// postmaster and every child of the postmaster, as if the machine had died. Waits
    /// until they are gone.
    pub fn kill_hard(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        let postmaster = node.postmaster_pid();
        if let Some(child) = &mut node.child {
            let pgid = child.id() as i32;
            // SAFETY: kill(2) on the process group of our own child, which has not been
            // reaped yet, so the group id cannot have been reused.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
            let _ = child.wait();
        }
        node.child = None;
        if let Some(pid) = postmaster {
            let mut pids = vec![pid];
            pids.extend(
                processes()
                    .iter()
                    .filter(|(_, ppid, _)| *ppid == pid)
                    .map(|(p, _, _)| *p),
            );
            kill_and_wait(&pids);
        }
    }

    /// Kills every process whose command line names this cluster's directory (Patroni,
    /// postmasters, replica methods, pg_rewind…), then etcd.
    fn kill_everything(&mut self) {
        for index in 0..self.nodes.len() {
            self.kill_hard(index);
        }
        let root = self.root_path.display().to_string();
        let me = std::process::id() as i32;
        // Postmaster children show their title, not the data directory: take the
        // children of every matching process too.
        let all = processes();
        let mut pids: Vec<i32> = all
            .iter()
            .filter(|(pid, _, cmd)| *pid != me && cmd.contains(&root))
            .map(|(pid, _, _)| *pid)
            .collect();
        let parents = pids.clone();
        pids.extend(
            all.iter()
                .filter(|(pid, ppid, _)| parents.contains(ppid) && !parents.contains(pid))
                .map(|(pid, _, _)| *pid),
        );
        kill_and_wait(&pids);
        if let Some(mut etcd) = self.etcd.take() {
            let _ = etcd.kill();
            let _ = etcd.wait();
        }
    }

    /// Panics with `message` and the tail of every log.
    fn fail(&self, message: &str) -> ! {
        panic!("testkit: {message}\n{}", self.logs_tail());
    }

    /// The last lines of every node's log and of etcd's.
    pub fn logs_tail(&self) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            out.push_str(&format!(
                "--- {} ({}) ---\n{}\n",
                node.name,
                node.log_path.display(),
                tail(&node.log(), LOG_TAIL_LINES)
            ));
        }
        out.push_str(&format!(
            "--- etcd ({}) ---\n{}\n",
            self.etcd_log.display(),
            tail(&fs::read_to_string(&self.etcd_log).unwrap_or_default(), 30)
        ));
        out
    }
}

impl Drop for PatroniCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- testkit: Patroni cluster logs ---\n{}",
                self.logs_tail()
            );
        }
        self.kill_everything();
        let Some(root) = self.root.take() else {
            return;
        };
        if std::env::var("PGREPL_TEST_KEEP").is_ok_and(|v| v == "1") {
            let path = root.keep();
            eprintln!(
                "testkit: PGREPL_TEST_KEEP=1, kept the Patroni cluster in {}",
                path.display()
            );
        } else if let Err(err) = root.close() {
            eprintln!(
                "testkit: could not remove {}: {err}",
                self.root_path.display()
            );
        }
    }
}

/// Starts a node's Patroni in a process group of its own, so that killing the group
/// reaches its helpers too (the postmaster makes its own session).
fn spawn_patroni(user: Option<&ServerUser>, node: &PatroniNode) -> Child {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&node.log_path)
        .unwrap_or_else(|e| panic!("testkit: {}: {e}", node.log_path.display()));
    let log2 = log.try_clone().expect("clone a file handle");
    let mut cmd = env::server_command(user, &patroni_bin());
    cmd.arg(&node.config_path)
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0);
    cmd.spawn()
        .unwrap_or_else(|e| panic!("testkit: could not run patroni: {e}; {INSTALL_HINT}"))
}

/// Builds Patroni's `bin_dir`: a link to every program of the server's binary directory,
/// except the replaced tools, which link to their replacements. Checks that the server's
/// OS user can run each replacement.
fn build_bin_dir(opts: &PatroniOptions, bin_dir: &Path, user: Option<&ServerUser>) {
    fs::create_dir(bin_dir)
        .and_then(|()| fs::set_permissions(bin_dir, fs::Permissions::from_mode(0o755)))
        .unwrap_or_else(|e| panic!("testkit: could not create {}: {e}", bin_dir.display()));
    let entries = fs::read_dir(&opts.pg_bin_dir)
        .unwrap_or_else(|e| panic!("testkit: reading {}: {e}", opts.pg_bin_dir.display()));
    for entry in entries.flatten() {
        let name = entry.file_name();
        if opts.replace.iter().any(|(tool, _)| name == tool.as_str()) {
            continue;
        }
        std::os::unix::fs::symlink(entry.path(), bin_dir.join(&name))
            .unwrap_or_else(|e| panic!("testkit: linking {}: {e}", entry.path().display()));
    }
    for (tool, program) in &opts.replace {
        let program = program
            .canonicalize()
            .unwrap_or_else(|e| panic!("testkit: {} (to replace {tool}): {e}", program.display()));
        let link = bin_dir.join(tool);
        std::os::unix::fs::symlink(&program, &link)
            .unwrap_or_else(|e| panic!("testkit: linking {}: {e}", link.display()));
        let output = env::server_command(user, &link)
            .arg("--version")
            .output()
            .unwrap_or_else(|e| panic!("testkit: could not run {}: {e}", link.display()));
        if !output.status.success() {
            panic!(
                "testkit: {} --version fails as the server's OS user ({}): {}{}; its directories \
                 must be searchable by that user",
                program.display(),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "run scripts/install-test-tools.sh")]
    fn a_missing_program_names_the_install_script() {
        program("PGREPL_TEST_UNSET_PROGRAM", "/nonexistent/pgrepl/etcd");
    }

    #[test]
    fn yaml_strings_are_quoted() {
        assert_eq!(yaml_str("it's: a"), "'it''s: a'");
    }
}
