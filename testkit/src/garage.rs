//! A throwaway Garage S3-compatible object store for tests: one node or a small
//! replicated cluster on loopback, with an access key and a bucket ready to use.
//!
//! [Garage](https://garagehq.deuxfleurs.fr/) (AGPL) is run as an external program, never
//! linked. The binary comes from `$PGREPL_GARAGE` (a path), else
//! `<cache>/garage/bin/garage` (see [`crate::cache_dir`]; `scripts/install-garage.sh`
//! builds it there), else `garage` on `PATH`. A missing binary makes the test panic,
//! naming `scripts/install-garage.sh`: tests fail, they never skip.
//!
//! Every node lives in one temporary directory under `/tmp` (or `$PGREPL_TEST_TMPDIR`),
//! with its `garage.toml`, metadata (SQLite), data blocks and log. Dropping the store
//! kills every node, prints the logs if the thread is panicking, and removes the
//! directory (kept when `PGREPL_TEST_KEEP=1`).
//!
//! ```no_run
//! let store = testkit::Garage::start();
//! let url = store.url("cluster-1/"); // s3://pgrepl-test/cluster-1/
//! let mut cmd = std::process::Command::new("some-backup-tool");
//! cmd.envs(store.env()).arg(url);
//! ```

use std::ffi::OsString;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::cluster::free_port;

const INSTALL_HINT: &str = "run scripts/install-garage.sh";

/// The S3 region every store answers to.
pub const REGION: &str = "garage";
/// The bucket [`Garage::start`] and [`Garage::start_cluster`] create.
pub const DEFAULT_BUCKET: &str = "pgrepl-test";
/// The name of the access key the store creates.
const KEY_NAME: &str = "pgrepl-test";
/// The zone every node is assigned to.
const ZONE: &str = "dc1";
/// The capacity every node declares in the layout.
const CAPACITY: &str = "1G";

/// How long the nodes may take to come up and form the cluster.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one `garage` command-line call may take before it is killed.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts at finding free TCP ports for a node.
const PORT_ATTEMPTS: usize = 5;

/// The Garage binary the tests use: `$PGREPL_GARAGE` when set (it must exist), else
/// `<cache>/garage/bin/garage` (see [`crate::cache_dir`]), else `garage` on `PATH`.
///
/// Panics, naming `scripts/install-garage.sh`, when there is none.
pub fn bin_from_env() -> PathBuf {
    let explicit = std::env::var_os("PGREPL_GARAGE").filter(|p| !p.is_empty());
    let cached = crate::cache_dir().join("garage").join("bin").join("garage");
    match locate(explicit, &cached, std::env::var_os("PATH")) {
        Ok(path) => path,
        Err(message) => panic!("testkit: {message}"),
    }
}

/// The lookup of [`bin_from_env`], with its inputs passed in.
fn locate(
    explicit: Option<OsString>,
    cached: &Path,
    path_var: Option<OsString>,
) -> Result<PathBuf, String> {
    if let Some(explicit) = explicit {
        let path = PathBuf::from(explicit);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "PGREPL_GARAGE={} is not a file; {INSTALL_HINT} (it builds Garage into {}) or \
                 point PGREPL_GARAGE at a garage binary",
                path.display(),
                cached.display()
            ))
        };
    }
    if cached.is_file() {
        return Ok(cached.to_path_buf());
    }
    let on_path = path_var
        .iter()
        .flat_map(std::env::split_paths)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join("garage"))
        .find(|candidate| candidate.is_file());
    on_path.ok_or_else(|| {
        format!(
            "the Garage binary was not found at {} nor on PATH; {INSTALL_HINT} (or set \
             PGREPL_GARAGE to a garage binary)",
            cached.display()
        )
    })
}

/// Runs `garage --version` and returns its output line.
fn garage_version(bin: &Path) -> String {
    let output = Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "testkit: could not run {} --version: {e}; {INSTALL_HINT}",
                bin.display()
            )
        });
    let text = String::from_utf8_lossy(&output.stdout).trim().to_string();
    if !output.status.success() || text.is_empty() {
        panic!(
            "testkit: {} --version failed ({}): {text}{}; {INSTALL_HINT}",
            bin.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    text
}

/// One Garage server process and its files.
struct Node {
    dir: PathBuf,
    config: PathBuf,
    log_path: PathBuf,
    rpc_port: u16,
    s3_port: u16,
    admin_port: u16,
    /// The full node id (64 hex digits), once known.
    id: String,
    child: Option<Child>,
    /// The length of the log when the server was last spawned.
    log_offset: u64,
}

/// A running throwaway Garage store: one node ([`Garage::start`]) or a replicated
/// cluster ([`Garage::start_cluster`]), with an access key allowed to read, write and
/// own the bucket [`DEFAULT_BUCKET`].
///
/// Every node listens on 127.0.0.1 only, on free ports: RPC, the S3 API and the admin
/// API. Clients talk to the S3 API of node 0 ([`Garage::endpoint`]) with path-style
/// requests over plain http, in region [`REGION`]. The store keeps its metadata in
/// SQLite and runs as the current user (root is fine).
pub struct Garage {
    bin: PathBuf,
    version: String,
    root: Option<TempDir>,
    root_path: PathBuf,
    replication_factor: usize,
    rpc_secret: String,
    admin_token: String,
    nodes: Vec<Node>,
    access_key_id: String,
    secret_access_key: String,
    log_dumped: bool,
}

impl std::fmt::Debug for Garage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let nodes: Vec<(u16, Option<u32>)> = self
            .nodes
            .iter()
            .map(|n| (n.s3_port, n.child.as_ref().map(Child::id)))
            .collect();
        f.debug_struct("Garage")
            .field("version", &self.version)
            .field("base_dir", &self.root_path)
            .field("replication_factor", &self.replication_factor)
            .field("nodes (s3 port, pid)", &nodes)
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

/// Why a node failed to come up.
enum StartFailure {
    PortInUse,
    Exited(ExitStatus),
    Timeout,
    Io(std::io::Error),
}

impl Garage {
    /// Starts a single-node store (`replication_factor = 1`) with an access key and the
    /// bucket [`DEFAULT_BUCKET`]; blocks until it serves S3 requests.
    ///
    /// Panics with a clear message (and the server log) if the binary is missing or the
    /// node fails to start.
    pub fn start() -> Garage {
        Garage::start_cluster(1)
    }

    /// Starts a cluster of `nodes` nodes with `replication_factor = nodes` (so every
    /// object is on every node), all in zone `dc1` of one layout, with an access key
    /// and the bucket [`DEFAULT_BUCKET`]; blocks until every node reports the cluster
    /// healthy. Garage needs a quorum of `nodes / 2 + 1` nodes for reads and writes.
    ///
    /// Panics with a clear message (and the server logs) if the binary is missing or a
    /// node fails to start or join; panics if `nodes` is 0.
    pub fn start_cluster(nodes: usize) -> Garage {
        assert!(
            nodes >= 1,
            "testkit: a Garage cluster needs at least one node"
        );
        let bin = bin_from_env();
        let version = garage_version(&bin);

        let root = crate::cluster::scratch_dir("pgrepl-garage-");
        let root_path = root.path().to_path_buf();

        let mut node_list = Vec::with_capacity(nodes);
        for index in 0..nodes {
            let dir = root_path.join(format!("node{index}"));
            for path in [dir.clone(), dir.join("meta"), dir.join("data")] {
                if let Err(err) = fs::create_dir(&path) {
                    panic!("testkit: could not create {}: {err}", path.display());
                }
            }
            node_list.push(Node {
                config: dir.join("garage.toml"),
                log_path: dir.join("garage.log"),
                dir,
                rpc_port: 0,
                s3_port: 0,
                admin_port: 0,
                id: String::new(),
                child: None,
                log_offset: 0,
            });
        }

        let mut garage = Garage {
            bin,
            version,
            root: Some(root),
            root_path,
            replication_factor: nodes,
            rpc_secret: random_hex(32),
            admin_token: random_hex(32),
            nodes: node_list,
            access_key_id: String::new(),
            secret_access_key: String::new(),
            log_dumped: false,
        };
        garage.launch_all();
        garage.form_cluster();
        garage
    }

    /// The `garage --version` line, e.g. `garage cargo:2.5.0 [features: ...]`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The Garage binary in use (see [`bin_from_env`]).
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// The temporary directory holding every node's files (`node<i>/garage.toml`,
    /// `meta/`, `data/`, `garage.log`).
    pub fn base_dir(&self) -> &Path {
        &self.root_path
    }

    /// How many nodes the store has (stopped ones included).
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// The S3 endpoint of node 0, `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        self.node_endpoint(0)
    }

    /// The S3 endpoint of node `index`, `http://127.0.0.1:<port>`: any node serves the
    /// whole store, which matters once node 0 is stopped. Panics if there is no such
    /// node.
    pub fn node_endpoint(&self, index: usize) -> String {
        format!("http://127.0.0.1:{}", self.node(index).s3_port)
    }

    /// The TCP port of node 0's S3 API (on 127.0.0.1).
    pub fn s3_port(&self) -> u16 {
        self.nodes[0].s3_port
    }

    /// The access key id (`GK` and 24 hex digits).
    pub fn access_key_id(&self) -> &str {
        &self.access_key_id
    }

    /// The secret access key.
    pub fn secret_access_key(&self) -> &str {
        &self.secret_access_key
    }

    /// The S3 region, always [`REGION`] (`garage`).
    pub fn region(&self) -> &str {
        REGION
    }

    /// The bucket created at start, always [`DEFAULT_BUCKET`] (`pgrepl-test`).
    pub fn bucket(&self) -> &str {
        DEFAULT_BUCKET
    }

    /// Creates another bucket and lets the access key read, write and own it, through
    /// the first running node. Panics (with the command's output) if Garage refuses,
    /// e.g. for an invalid or existing name.
    pub fn create_bucket(&self, name: &str) {
        let node = self.live_node();
        self.cli(node, &["bucket", "create", name]);
        if let Err(err) = self.try_allow_bucket(node, name) {
            panic!("testkit: `garage bucket allow` on {name} failed: {err}");
        }
    }

    /// The variables a child process needs to reach the bucket with the AWS
    /// conventions: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION` (and
    /// `AWS_DEFAULT_REGION`, for tools that read only that), `AWS_ENDPOINT_URL` (node 0)
    /// and `AWS_ALLOW_HTTP=true` (the endpoint is plain http).
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", self.access_key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_access_key.clone()),
            ("AWS_REGION", REGION.to_string()),
            ("AWS_DEFAULT_REGION", REGION.to_string()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect()
    }

    /// `s3://<bucket>/<prefix>`, for the default bucket; a leading `/` of `prefix` is
    /// dropped.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{DEFAULT_BUCKET}/{}", prefix.trim_start_matches('/'))
    }

    /// Kills node `index` at once (SIGKILL) and waits for it to exit, as a crash
    /// would; the other nodes go on. Stopping node 0 also stops [`Garage::endpoint`]:
    /// use [`Garage::node_endpoint`] of another node then. Does nothing if the node is
    /// already stopped; panics if there is no such node.
    pub fn stop_node(&mut self, index: usize) {
        self.node(index);
        kill_child(&mut self.nodes[index].child);
    }

    /// Freezes every running node (SIGSTOP) and waits until all their threads have
    /// stopped: requests then hang, as with a store that stopped answering, until
    /// [`Garage::resume`]. Panics if a node does not stop within 10 seconds.
    pub fn pause(&self) {
        self.signal_all(libc::SIGSTOP);
        // kill(2) only queues the signal: wait for the group stop to complete, or a
        // request sent right after pause() may still be answered.
        let deadline = Instant::now() + Duration::from_secs(10);
        for (index, node) in self.nodes.iter().enumerate() {
            let Some(child) = &node.child else { continue };
            while !all_threads_stopped(child.id()) {
                if Instant::now() >= deadline {
                    panic!("testkit: Garage node {index} did not stop within 10 s of SIGSTOP");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// Lets every node run again after [`Garage::pause`] (SIGCONT).
    pub fn resume(&self) {
        self.signal_all(libc::SIGCONT);
    }

    /// The full id (64 hex digits) of node `index`; panics if there is no such node.
    pub fn node_id(&self, index: usize) -> &str {
        &self.node(index).id
    }

    /// The log of node `index` so far; panics if there is no such node.
    pub fn log(&self, index: usize) -> String {
        read_lossy(&self.node(index).log_path)
    }

    /// The path of node `index`'s log (the server's stdout and stderr); panics if
    /// there is no such node.
    pub fn log_path(&self, index: usize) -> &Path {
        &self.node(index).log_path
    }

    /// Runs `garage -c <node's garage.toml> <args>` against node `index` and returns
    /// its standard output, e.g. `cli(0, &["bucket", "info", "pgrepl-test"])`. Panics
    /// (with the output) if the command fails or takes more than 30 seconds.
    pub fn cli(&self, index: usize, args: &[&str]) -> String {
        match self.try_cli(index, args) {
            Ok(stdout) => stdout,
            Err(err) => panic!("testkit: `garage {}` failed: {err}", args.join(" ")),
        }
    }

    fn node(&self, index: usize) -> &Node {
        self.nodes.get(index).unwrap_or_else(|| {
            panic!(
                "testkit: node {index} does not exist (the store has {} nodes)",
                self.nodes.len()
            )
        })
    }

    fn signal_all(&self, signal: libc::c_int) {
        for child in self.nodes.iter().filter_map(|n| n.child.as_ref()) {
            // SAFETY: kill(2) on the pid of our own child, which is only reaped (in
            // kill_child) after its Child is taken out of the node, so the pid cannot
            // have been reused.
            unsafe {
                libc::kill(child.id() as libc::pid_t, signal);
            }
        }
    }

    /// A `garage` command for node `index`, with an environment that cannot redirect
    /// it elsewhere (no `GARAGE_*` variables, Garage's default log levels).
    fn command(&self, index: usize) -> Command {
        let node = &self.nodes[index];
        let mut cmd = Command::new(&self.bin);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("GARAGE_") {
                cmd.env_remove(name);
            }
        }
        cmd.arg("-c")
            .arg(&node.config)
            .current_dir(&node.dir)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs a `garage` command against node `index`: its standard output, or what went
    /// wrong (status, stderr and stdout).
    fn try_cli(&self, index: usize, args: &[&str]) -> Result<String, String> {
        let mut cmd = self.command(index);
        cmd.args(args);
        let (status, stdout, stderr) = run_with_timeout(cmd, CLI_TIMEOUT)
            .map_err(|e| format!("could not run {}: {e}", self.bin.display()))?;
        let stdout = String::from_utf8_lossy(&stdout).into_owned();
        match status {
            Some(status) if status.success() => Ok(stdout),
            Some(status) => Err(format!(
                "{status}\n{}{stdout}",
                String::from_utf8_lossy(&stderr)
            )),
            None => Err(format!(
                "no answer within {} s (killed)\n{}{stdout}",
                CLI_TIMEOUT.as_secs(),
                String::from_utf8_lossy(&stderr)
            )),
        }
    }

    fn write_config(&self, index: usize) {
        let node = &self.nodes[index];
        let config = format!(
            "# Generated by testkit.\n\
             metadata_dir = {meta}\n\
             data_dir = {data}\n\
             db_engine = \"sqlite\"\n\
             replication_factor = {rf}\n\
             disable_scrub = true\n\
             rpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
             rpc_public_addr = \"127.0.0.1:{rpc}\"\n\
             rpc_secret = \"{secret}\"\n\
             \n\
             [s3_api]\n\
             s3_region = \"{REGION}\"\n\
             api_bind_addr = \"127.0.0.1:{s3}\"\n\
             root_domain = \".s3.garage.localhost\"\n\
             \n\
             [admin]\n\
             api_bind_addr = \"127.0.0.1:{admin}\"\n\
             admin_token = \"{token}\"\n",
            meta = toml_string(&node.dir.join("meta")),
            data = toml_string(&node.dir.join("data")),
            rf = self.replication_factor,
            rpc = node.rpc_port,
            secret = self.rpc_secret,
            s3 = node.s3_port,
            admin = node.admin_port,
            token = self.admin_token,
        );
        let result = fs::write(&node.config, config)
            .and_then(|()| fs::set_permissions(&node.config, fs::Permissions::from_mode(0o600)));
        if let Err(err) = result {
            panic!("testkit: could not write {}: {err}", node.config.display());
        }
    }

    /// Starts every node, then waits for each, moving a node to other ports when one
    /// of its ports was taken meanwhile.
    fn launch_all(&mut self) {
        for index in 0..self.nodes.len() {
            self.pick_ports(index);
            self.spawn(index);
        }
        for index in 0..self.nodes.len() {
            let mut attempt = 1;
            loop {
                match self.wait_listening(index) {
                    Ok(()) => break,
                    Err(StartFailure::PortInUse) if attempt < PORT_ATTEMPTS => {
                        kill_child(&mut self.nodes[index].child);
                        attempt += 1;
                        self.pick_ports(index);
                        self.spawn(index);
                    }
                    Err(StartFailure::PortInUse) => {
                        self.fail(&format!("node {index}: its ports were in use"))
                    }
                    Err(StartFailure::Exited(status)) => self.fail(&format!(
                        "node {index}: Garage exited during startup ({status})"
                    )),
                    Err(StartFailure::Timeout) => self.fail(&format!(
                        "node {index}: Garage did not listen on its ports within {} s",
                        START_TIMEOUT.as_secs()
                    )),
                    Err(StartFailure::Io(err)) => {
                        self.fail(&format!("node {index}: waiting for Garage to start: {err}"))
                    }
                }
            }
        }
    }

    fn pick_ports(&mut self, index: usize) {
        let mut ports = Vec::with_capacity(3);
        while ports.len() < 3 {
            let port = free_port();
            let taken = ports.contains(&port)
                || self
                    .nodes
                    .iter()
                    .any(|n| [n.rpc_port, n.s3_port, n.admin_port].contains(&port));
            if !taken {
                ports.push(port);
            }
        }
        let node = &mut self.nodes[index];
        node.rpc_port = ports[0];
        node.s3_port = ports[1];
        node.admin_port = ports[2];
        self.write_config(index);
    }

    fn spawn(&mut self, index: usize) {
        let log_path = self.nodes[index].log_path.clone();
        let files = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .and_then(|log| Ok((log.try_clone()?, log)));
        let (stdout, stderr) = match files {
            Ok(files) => files,
            Err(err) => self.fail(&format!("could not open {}: {err}", log_path.display())),
        };
        self.nodes[index].log_offset = fs::metadata(&log_path).map_or(0, |m| m.len());
        let mut cmd = self.command(index);
        cmd.arg("server").stdout(stdout).stderr(stderr);
        match cmd.spawn() {
            Ok(child) => self.nodes[index].child = Some(child),
            Err(err) => self.fail(&format!("could not start {}: {err}", self.bin.display())),
        }
    }

    /// Waits until node `index` accepts connections on its S3 and admin ports.
    fn wait_listening(&mut self, index: usize) -> Result<(), StartFailure> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let node = &mut self.nodes[index];
            let child = node.child.as_mut().expect("the node was spawned");
            let exited = child.try_wait().map_err(StartFailure::Io)?;
            let port_taken =
                log_since(&node.log_path, node.log_offset).contains("Address already in use");
            if let Some(status) = exited {
                node.child = None;
                return Err(if port_taken {
                    StartFailure::PortInUse
                } else {
                    StartFailure::Exited(status)
                });
            }
            if port_taken {
                return Err(StartFailure::PortInUse);
            }
            // Garage listens for RPC before it binds the S3 and admin ports. (A probe of
            // the RPC port would log a failed handshake.)
            if can_connect(node.s3_port) && can_connect(node.admin_port) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(StartFailure::Timeout);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Joins the nodes, lays them out, waits until every node sees the cluster healthy,
    /// and creates the access key and the default bucket.
    fn form_cluster(&mut self) {
        for index in 0..self.nodes.len() {
            let line = self.retry(&format!("reading node {index}'s id"), |g| {
                g.try_cli(index, &["node", "id", "-q"])
            });
            let id = parse_node_id(&line).unwrap_or_else(|| {
                self.fail(&format!("`garage node id -q` printed no node id: {line:?}"))
            });
            self.nodes[index].id = id;
        }
        for index in 1..self.nodes.len() {
            let peer = format!(
                "{}@127.0.0.1:{}",
                self.nodes[index].id, self.nodes[index].rpc_port
            );
            self.retry(&format!("connecting node 0 to node {index}"), |g| {
                g.try_cli(0, &["node", "connect", &peer])
            });
        }
        let ids: Vec<String> = self.nodes.iter().map(|n| n.id.clone()).collect();
        let mut assign = vec!["layout", "assign", "-z", ZONE, "-c", CAPACITY];
        assign.extend(ids.iter().map(String::as_str));
        self.retry("assigning the layout roles", |g| g.try_cli(0, &assign));
        self.retry("applying layout version 1", |g| {
            g.try_cli(0, &["layout", "apply", "--version", "1"])
                .or_else(|err| match g.layout_version() {
                    // An earlier attempt went through after all.
                    Some(version) if version >= 1 => Ok(String::new()),
                    _ => Err(err),
                })
        });
        for index in 0..self.nodes.len() {
            let port = self.nodes[index].admin_port;
            self.retry(
                &format!("waiting for node {index} to see the cluster healthy"),
                |_| match http_get(port, "/health") {
                    Some((200, body)) if body.contains("fully operational") => Ok(()),
                    Some((_, body)) => Err(body),
                    None => Err("no answer".to_string()),
                },
            );
        }

        let created = self.retry("creating the access key", |g| {
            g.try_cli(0, &["key", "create", KEY_NAME])
        });
        let Some((id, secret)) = parse_key(&created) else {
            self.fail(&format!(
                "could not read the key id and secret from `garage key create`:\n{created}"
            ));
        };
        self.access_key_id = id;
        self.secret_access_key = secret;

        self.retry("creating the default bucket", |g| {
            g.try_cli(0, &["bucket", "create", DEFAULT_BUCKET])
                .or_else(|err| {
                    // An earlier attempt went through after all.
                    g.try_cli(0, &["bucket", "info", DEFAULT_BUCKET])
                        .map_err(|_| err)
                })
        });
        self.retry("allowing the key on the default bucket", |g| {
            g.try_allow_bucket(0, DEFAULT_BUCKET)
        });
    }

    fn try_allow_bucket(&self, node: usize, bucket: &str) -> Result<String, String> {
        self.try_cli(
            node,
            &[
                "bucket",
                "allow",
                "--read",
                "--write",
                "--owner",
                bucket,
                "--key",
                &self.access_key_id,
            ],
        )
    }

    /// The first node that has not been stopped; panics when every node was.
    fn live_node(&self) -> usize {
        self.nodes
            .iter()
            .position(|n| n.child.is_some())
            .unwrap_or_else(|| panic!("testkit: every Garage node has been stopped"))
    }

    /// The current layout version as node 0 sees it, from `garage layout show`.
    fn layout_version(&self) -> Option<u64> {
        let shown = self.try_cli(0, &["layout", "show"]).ok()?;
        shown.lines().find_map(|line| {
            line.trim()
                .strip_prefix("Current cluster layout version:")
                .and_then(|v| v.trim().parse().ok())
        })
    }

    /// Runs `attempt` until it succeeds, while every node runs; fails the start (with
    /// the logs) when a node exits or after [`START_TIMEOUT`].
    fn retry<T>(&mut self, what: &str, mut attempt: impl FnMut(&Self) -> Result<T, String>) -> T {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut pause = Duration::from_millis(20);
        loop {
            let last_error = match attempt(self) {
                Ok(value) => return value,
                Err(err) => err,
            };
            for index in 0..self.nodes.len() {
                let child = self.nodes[index]
                    .child
                    .as_mut()
                    .expect("nodes run at start");
                if let Ok(Some(status)) = child.try_wait() {
                    self.nodes[index].child = None;
                    self.fail(&format!(
                        "node {index} exited ({status}) while {what}; last error: {last_error}"
                    ));
                }
            }
            if Instant::now() >= deadline {
                self.fail(&format!(
                    "{what} did not succeed within {} s; last error: {last_error}",
                    START_TIMEOUT.as_secs()
                ));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(250));
        }
    }

    /// Kills every node and panics with `message` and the server logs.
    fn fail(&mut self, message: &str) -> ! {
        for node in &mut self.nodes {
            kill_child(&mut node.child);
        }
        self.log_dumped = true;
        panic!(
            "testkit: Garage: {message}\n  binary: {} ({})\n  directory: {}\n{}",
            self.bin.display(),
            self.version,
            self.root_path.display(),
            self.all_logs()
        );
    }

    fn all_logs(&self) -> String {
        let mut text = String::new();
        for (index, node) in self.nodes.iter().enumerate() {
            text.push_str(&format!(
                "--- Garage node {index} log ({}) ---\n{}--- end of node {index} log ---\n",
                node.log_path.display(),
                read_lossy(&node.log_path)
            ));
        }
        text
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            kill_child(&mut node.child);
        }
        if std::thread::panicking() && !self.log_dumped {
            eprintln!("testkit: Garage logs:\n{}", self.all_logs());
        }
        let Some(root) = self.root.take() else {
            return;
        };
        if std::env::var("PGREPL_TEST_KEEP").is_ok_and(|v| v == "1") {
            let path = root.keep();
            eprintln!(
                "testkit: PGREPL_TEST_KEEP=1, kept the Garage files in {}",
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

/// SIGKILLs the child (stopped or not) and reaps it.
fn kill_child(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        // Child::kill sends SIGKILL, which also ends a stopped process.
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Whether every thread of process `pid` is stopped (state `T` in
/// `/proc/<pid>/task/*/stat`); a process that is gone counts as stopped.
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    tasks.flatten().all(|task| {
        // `<tid> (<comm>) <state> ...`, where comm may hold spaces and parentheses.
        let Ok(stat) = fs::read_to_string(task.path().join("stat")) else {
            return true;
        };
        let state = stat
            .rfind(')')
            .and_then(|end| stat[end + 1..].trim_start().chars().next());
        matches!(state, Some('T' | 't' | 'Z' | 'X'))
    })
}

/// Runs `cmd` with its output captured; kills it after `timeout` (status `None`).
fn run_with_timeout(
    mut cmd: Command,
    timeout: Duration,
) -> std::io::Result<(Option<ExitStatus>, Vec<u8>, Vec<u8>)> {
    fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    }
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    Ok((status, stdout, stderr))
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
fn can_connect(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// A plain HTTP/1.1 GET on 127.0.0.1:`port`: the status code and the whole response.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, response))
}

fn read_lossy(path: &Path) -> String {
    match fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => String::new(),
    }
}

fn log_since(path: &Path, offset: u64) -> String {
    let mut bytes = Vec::new();
    if let Ok(mut file) = fs::File::open(path) {
        if file.seek(SeekFrom::Start(offset)).is_err() || file.read_to_end(&mut bytes).is_err() {
            bytes.clear();
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `n` random bytes from the kernel, as lowercase hex.
fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    if let Err(err) = fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)) {
        panic!("testkit: could not read /dev/urandom: {err}");
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A TOML basic string holding `path`.
fn toml_string(path: &Path) -> String {
    let text = path.display().to_string();
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The node id in `garage node id -q`'s output, `<64 hex digits>@<address>`.
fn parse_node_id(output: &str) -> Option<String> {
    let id = output.trim().split('@').next()?.trim();
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_string())
}

/// The key id and secret in `garage key create`'s output (`Key ID:` and `Secret key:`
/// lines).
fn parse_key(output: &str) -> Option<(String, String)> {
    let field = |name: &str| {
        output.lines().find_map(|line| {
            let value = line.trim().strip_prefix(name)?.trim();
            (!value.is_empty()).then(|| value.to_string())
        })
    };
    let id = field("Key ID:")?;
    let secret = field("Secret key:")?;
    (secret != "(redacted)").then_some((id, secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binary_names_the_install_script() {
        let err = locate(
            None,
            Path::new("/nonexistent/pgrepl/garage/bin/garage"),
            Some(OsString::from("/nonexistent/pgrepl/bin")),
        )
        .unwrap_err();
        assert!(err.contains("run scripts/install-garage.sh"), "{err}");
        let err = locate(
            Some(OsString::from("/nonexistent/garage")),
            Path::new("/nonexistent/pgrepl/garage/bin/garage"),
            None,
        )
        .unwrap_err();
        assert!(err.contains("PGREPL_GARAGE=/nonexistent/garage"), "{err}");
        assert!(err.contains("run scripts/install-garage.sh"), "{err}");
    }

    #[test]
    fn parses_node_ids() {
        let id = "a".repeat(64);
        assert_eq!(
            parse_node_id(&format!("{id}@127.0.0.1:3901\n")),
            Some(id.clone())
        );
        assert_eq!(parse_node_id(&format!("{id}\n")), Some(id));
        assert_eq!(parse_node_id("not an id@127.0.0.1:1"), None);
    }

    #[test]
    fn parses_key_create_output() {
        let output = "==== ACCESS KEY INFORMATION ====\n\
                      Key ID:              GK31c2f218a2e44f485b94239e\n\
                      Key name:            pgrepl-test\n\
                      Secret key:          b892c0665f0ada8a4755dae98baa3b133590e11dae3bcc1f9d769d67f16c3835\n\
                      Created:             2026-01-01 00:00:00 +00:00\n\
                      \n\
                      ==== BUCKETS FOR THIS KEY ====\n\
                      Permissions  ID  Global aliases  Local aliases\n";
        assert_eq!(
            parse_key(output),
            Some((
                "GK31c2f218a2e44f485b94239e".to_string(),
                "b892c0665f0ada8a4755dae98baa3b133590e11dae3bcc1f9d769d67f16c3835".to_string()
            ))
        );
        assert_eq!(parse_key("Key ID: GK1\nSecret key: (redacted)\n"), None);
    }
}
