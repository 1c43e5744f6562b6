//! A throwaway PostgreSQL cluster: initdb (from a cached template), configure, run the
//! postmaster directly, tear everything down on drop.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::env::{self, ServerUser};
use crate::template::{self, TemplateKey};
use crate::tls::{KeyAlgorithm, TlsFiles};

/// `Cluster::start_on_data_dir` (a child module, to build a `Cluster`).
#[path = "restore.rs"]
mod restore;

/// How long the postmaster may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a fast shutdown may take before escalating to an immediate one.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an immediate shutdown may take before SIGKILL.
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts at finding a free TCP port.
const PORT_ATTEMPTS: usize = 5;

/// The database superuser created by initdb.
const SUPERUSER: &str = "postgres";

/// How to set up a [`Cluster`]; a builder.
///
/// ```no_run
/// use testkit::{Cluster, ClusterOptions};
/// let cluster = Cluster::start(
///     ClusterOptions::new()
///         .tls(true)
///         .hba("hostssl all certuser 127.0.0.1/32 cert")
///         .setting("wal_sender_timeout", "5s"),
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterOptions {
    tls: bool,
    key_algorithm: KeyAlgorithm,
    hba: Vec<String>,
    settings: Vec<(String, String)>,
    data_checksums: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions::new()
    }
}

impl ClusterOptions {
    /// The defaults: no TLS, ECDSA P-256 keys (when TLS is turned on), data checksums
    /// on, no extra `pg_hba.conf` lines or settings.
    pub fn new() -> Self {
        ClusterOptions {
            tls: false,
            key_algorithm: KeyAlgorithm::default(),
            hba: Vec::new(),
            settings: Vec::new(),
            data_checksums: true,
        }
    }

    /// Turns TLS on: a CA, a server certificate for `localhost` / `127.0.0.1` and its
    /// key are generated at start, and the server gets `ssl = on` and the CA as
    /// `ssl_ca_file` (for `cert` authentication). See [`Cluster::tls_files`].
    pub fn tls(mut self, on: bool) -> Self {
        self.tls = on;
        self
    }

    /// The key algorithm of the generated certificates (default ECDSA P-256).
    pub fn tls_key_algorithm(mut self, alg: KeyAlgorithm) -> Self {
        self.key_algorithm = alg;
        self
    }

    /// Adds a `pg_hba.conf` line. Added lines come first, in order, before the defaults
    /// (which trust the `postgres` superuser over the socket and from 127.0.0.1, for
    /// both SQL and replication), so they take precedence.
    pub fn hba(mut self, line: impl Into<String>) -> Self {
        self.hba.push(line.into());
        self
    }

    /// Adds a `postgresql.conf` setting, written after testkit's own settings (so it
    /// wins). The value is quoted for you: pass `"5s"`, not `"'5s'"`.
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((name.into(), value.into()));
        self
    }

    /// Whether initdb enables data checksums (`-k`); default on.
    pub fn data_checksums(mut self, on: bool) -> Self {
        self.data_checksums = on;
        self
    }
}

/// A running throwaway PostgreSQL cluster.
///
/// The server binaries come from `PGREPL_TEST_PG` (see [`crate::bin_dir_from_env`]).
/// Everything lives in one temporary directory under `/tmp` (or
/// `$PGREPL_TEST_TMPDIR`): the data directory, the
/// Unix socket directory, the certificates and the server log. Dropping the cluster
/// stops the server at once (immediate shutdown), prints the server log if the thread
/// is panicking, and removes the directory (kept when `PGREPL_TEST_KEEP=1`).
///
/// When the tests run as root, initdb, postgres and pg_ctl run as the OS user
/// `$PGREPL_TEST_OS_USER` (default `postgres`), which owns the cluster's files.
pub struct Cluster {
    bin_dir: PathBuf,
    major: u32,
    version: String,
    root: Option<TempDir>,
    root_path: PathBuf,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    log_path: PathBuf,
    port: u16,
    user: Option<ServerUser>,
    child: Option<Child>,
    tls: Option<TlsFiles>,
    base_conf: String,
    opts: ClusterOptions,
    log_dumped: bool,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("version", &self.version)
            .field("bin_dir", &self.bin_dir)
            .field("data_dir", &self.data_dir)
            .field("socket_dir", &self.socket_dir)
            .field("port", &self.port)
            .field("pid", &self.pid())
            .finish_non_exhaustive()
    }
}

/// Why a start attempt failed.
enum StartFailure {
    PortInUse,
    Exited(ExitStatus),
    Timeout,
    Io(std::io::Error),
}

fn mkdir(path: &Path, mode: u32, owner: Option<&ServerUser>) {
    let result = fs::create_dir(path)
        .and_then(|()| fs::set_permissions(path, fs::Permissions::from_mode(mode)))
        .and_then(|()| env::give_to(owner, path));
    if let Err(err) = result {
        panic!("testkit: could not create {}: {err}", path.display());
    }
}

/// Where cluster directories are made: `$PGREPL_TEST_TMPDIR`, else `/tmp` (not
/// `$TMPDIR`, which may be too long for a Unix socket path).
pub(crate) fn base_tmp_dir() -> PathBuf {
    std::env::var_os("PGREPL_TEST_TMPDIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"))
}

/// A fresh temporary directory named `<prefix>…` under [`base_tmp_dir`]; panics
/// with the reason when it cannot be made.
pub(crate) fn scratch_dir(prefix: &str) -> tempfile::TempDir {
    let base = base_tmp_dir();
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&base)
        .unwrap_or_else(|e| {
            panic!(
                "testkit: could not create a directory in {}: {e}",
                base.display()
            )
        })
}

fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

pub(crate) fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap_or_else(|e| panic!("testkit: could not bind 127.0.0.1:0 to pick a port: {e}"));
    listener
        .local_addr()
        .unwrap_or_else(|e| panic!("testkit: local_addr of a fresh listener: {e}"))
        .port()
}

impl Cluster {
    /// Creates and starts a cluster; blocks until it accepts connections.
    ///
    /// Panics with a clear message (and the server log, when there is one) if the
    /// binaries are missing or initdb or the server fails.
    pub fn start(opts: ClusterOptions) -> Cluster {
        let bin_dir = env::bin_dir_from_env();
        let (major, version) = env::server_version(&bin_dir);
        env::ensure_binaries(&bin_dir, Some(major));
        let user = env::server_user();
        let user_ref = user.as_ref();

        let root = scratch_dir("pgrepl-");
        let root_path = root.path().to_path_buf();
        // sun_path holds 108 bytes; leave room for "/sock/.s.PGSQL.65535.lock".
        if root_path.as_os_str().len() > 70 {
            panic!(
                "testkit: {} is too long for a Unix socket path; set PGREPL_TEST_TMPDIR to a \
                 shorter directory",
                root_path.display()
            );
        }
        let result = fs::set_permissions(&root_path, fs::Permissions::from_mode(0o755))
            .and_then(|()| env::give_to(user_ref, &root_path));
        if let Err(err) = result {
            panic!("testkit: could not prepare {}: {err}", root_path.display());
        }

        let data_dir = root_path.join("data");
        let key = TemplateKey {
            bin_dir: &bin_dir,
            version: &version,
            checksums: opts.data_checksums,
        };
        if template::disabled() {
            mkdir(&data_dir, 0o700, user_ref);
            if let Err(err) = template::run_initdb(&key, &data_dir, user_ref) {
                panic!("testkit: {err}");
            }
        } else {
            let template = template::template_for(&key, user_ref);
            if let Err(err) = template::copy_template(&template, &data_dir, user_ref) {
                panic!(
                    "testkit: could not copy the template data directory {} to {}: {err}",
                    template.display(),
                    data_dir.display()
                );
            }
        }

        let socket_dir = root_path.join("sock");
        mkdir(&socket_dir, 0o755, user_ref);
        let client_dir = root_path.join("client");
        mkdir(&client_dir, 0o755, None);
        let tls = opts.tls.then(|| {
            let server_dir = root_path.join("tls");
            mkdir(&server_dir, 0o700, user_ref);
            TlsFiles::generate(opts.key_algorithm, &server_dir, &client_dir, user_ref)
        });

        let base_conf = fs::read_to_string(data_dir.join("postgresql.conf")).unwrap_or_else(|e| {
            panic!(
                "testkit: could not read {}: {e}",
                data_dir.join("postgresql.conf").display()
            )
        });

        let mut cluster = Cluster {
            bin_dir,
            major,
            version,
            root: Some(root),
            log_path: root_path.join("server.log"),
            root_path,
            data_dir,
            socket_dir,
            port: 0,
            user,
            child: None,
            tls,
            base_conf,
            opts,
            log_dumped: false,
        };
        cluster.write_hba();
        cluster.launch(true);
        cluster
    }

    /// The server's major version (13–18), from `postgres --version`.
    pub fn major(&self) -> u32 {
        self.major
    }

    /// The full `postgres --version` line, e.g. `postgres (PostgreSQL) 15.13 (...)`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The directory holding the server binaries.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The path of one server binary, e.g. `bin("pg_basebackup")`.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The directory holding the Unix socket `.s.PGSQL.<port>`.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The temporary directory holding everything else (data, socket, certificates, log).
    pub fn base_dir(&self) -> &Path {
        &self.root_path
    }

    /// The TCP port (on 127.0.0.1), also the Unix socket's port number.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The postmaster's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The superuser role, always `postgres`.
    pub fn superuser(&self) -> &str {
        SUPERUSER
    }

    /// The certificate files, when the cluster was started with TLS.
    pub fn tls_files(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// A connection string for the Unix socket, without TLS:
    /// `host=<socket_dir> port=<port> user=<user> dbname=postgres sslmode=disable`.
    pub fn unix_conninfo(&self, user: &str) -> String {
        format!(
            "host={} port={} user={user} dbname=postgres sslmode=disable",
            self.socket_dir.display(),
            self.port
        )
    }

    /// A TCP connection string, `host=127.0.0.1 port=<port> user=<user> dbname=postgres`,
    /// with no `sslmode`: append what the test needs.
    pub fn tcp_conninfo(&self, user: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} dbname=postgres",
            self.port
        )
    }

    /// [`Cluster::unix_conninfo`] parsed into a [`pgwire_repl::Config`].
    pub fn config(&self, user: &str) -> pgwire_repl::Config {
        let conninfo = self.unix_conninfo(user);
        pgwire_repl::Config::parse(&conninfo)
            .unwrap_or_else(|e| panic!("testkit: could not parse `{conninfo}`: {e}"))
    }

    /// A superuser SQL session over the Unix socket, through `pgwire_repl::SqlClient`.
    /// Panics if it cannot connect.
    pub async fn sql(&self) -> pgwire_repl::SqlClient {
        let config = self.config(SUPERUSER);
        match pgwire_repl::SqlClient::connect(&config).await {
            Ok(client) => client,
            Err(err) => panic!(
                "testkit: could not connect to the test cluster ({}): {err}",
                self.unix_conninfo(SUPERUSER)
            ),
        }
    }

    /// Runs one or more SQL statements as the superuser; panics (naming the SQL) on error.
    pub async fn execute(&self, sql: &str) {
        let mut client = self.sql().await;
        if let Err(err) = client.batch(sql).await {
            panic!("testkit: SQL failed: {err}\n  SQL: {sql}");
        }
        let _ = client.close().await;
    }

    /// Runs a one-row, one-column query as the superuser and returns the value (`None`
    /// for NULL); panics (naming the SQL) on error.
    pub async fn query_value(&self, sql: &str) -> Option<String> {
        let mut client = self.sql().await;
        let value = match client.query_value(sql).await {
            Ok(value) => value,
            Err(err) => panic!("testkit: query failed: {err}\n  SQL: {sql}"),
        };
        let _ = client.close().await;
        value
    }

    /// Replaces the server's certificate (a PEM chain, server certificate first) and
    /// private key (PEM) with these, for tests of certificates made elsewhere (with the
    /// `openssl` command, by another CA). They take effect at the next
    /// [`Cluster::reload`] or restart; [`Cluster::tls_files`] keeps naming the same
    /// paths. Panics if the cluster was started without TLS.
    pub fn set_server_certificate(&self, cert_pem: &str, key_pem: &str) {
        let tls = self.tls.as_ref().unwrap_or_else(|| {
            panic!("testkit: set_server_certificate() needs ClusterOptions::tls(true)")
        });
        tls.replace_server_files(cert_pem, key_pem, self.user.as_ref());
    }

    /// Reloads the server's configuration files, certificates included
    /// (`pg_reload_conf()`), and waits until the postmaster has applied them: new
    /// sessions then see a later `pg_conf_load_time()`, so the next connection uses the
    /// new settings. Panics (with the server log) if that takes more than 30 seconds.
    pub async fn reload(&self) {
        let load_time = "SELECT pg_conf_load_time()::text";
        let before = self.query_value(load_time).await;
        self.execute("SELECT pg_reload_conf()").await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.query_value(load_time).await == before {
            if Instant::now() >= deadline {
                panic!(
                    "testkit: the server did not reload its configuration within 30 s\n--- server log ---\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops the server with a fast shutdown and starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// Stops the server with a fast shutdown (SIGINT) and waits for it to exit
    /// (escalating to an immediate shutdown, then SIGKILL, if it hangs).
    /// Does nothing when the server is not running.
    pub fn stop(&mut self) {
        self.terminate(libc::SIGINT, STOP_TIMEOUT);
    }

    /// Starts the server again after [`Cluster::stop`], on the same port.
    /// Panics if it is already running.
    pub fn start_again(&mut self) {
        if self.child.is_some() {
            panic!("testkit: start_again() on a cluster that is already running");
        }
        self.launch(false);
    }

    /// Promotes a standby: `pg_ctl promote -w`. Panics with the server log on failure.
    pub fn promote(&self) {
        let mut cmd = env::server_command(self.user.as_ref(), &self.bin("pg_ctl"));
        cmd.args(["promote", "-w", "-t", "60", "-D"])
            .arg(&self.data_dir);
        match cmd.output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => panic!(
                "testkit: pg_ctl promote failed ({}):\n{}{}\n--- server log ({}) ---\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log_path.display(),
                self.log()
            ),
            Err(err) => panic!("testkit: could not run pg_ctl promote: {err}"),
        }
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        match fs::read(&self.log_path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(_) => String::new(),
        }
    }

    /// The path of the server log (the postmaster's stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    fn write_hba(&self) {
        let mut hba = String::from("# Generated by testkit.\n");
        if !self.opts.hba.is_empty() {
            hba.push_str("# Lines from the test:\n");
            for line in &self.opts.hba {
                hba.push_str(line.trim_end());
                hba.push('\n');
            }
        }
        hba.push_str(
            "# testkit defaults:\n\
             local all postgres trust\n\
             local replication postgres trust\n\
             host all postgres 127.0.0.1/32 trust\n\
             host replication postgres 127.0.0.1/32 trust\n",
        );
        self.write_server_file("pg_hba.conf", &hba);
    }

    fn write_conf(&self) {
        let mut conf = self.base_conf.clone();
        if !conf.ends_with('\n') {
            conf.push('\n');
        }
        conf.push_str("\n# Added by testkit (settings from the test come last):\n");
        let mut set = |name: &str, value: &str| {
            conf.push_str(&format!("{name} = {}\n", quote(value)));
        };
        set("listen_addresses", "127.0.0.1");
        set("port", &self.port.to_string());
        set(
            "unix_socket_directories",
            &self.socket_dir.display().to_string(),
        );
        set("wal_level", "replica");
        set("max_wal_senders", "10");
        set("max_replication_slots", "10");
        set("log_line_prefix", "%m [%p] %q%u@%d ");
        set("log_connections", "on");
        set("shared_buffers", "32MB");
        if let Some(tls) = &self.tls {
            set("ssl", "on");
            set("ssl_cert_file", &tls.server_cert.display().to_string());
            set("ssl_key_file", &tls.server_key.display().to_string());
            set("ssl_ca_file", &tls.ca_cert.display().to_string());
        }
        for (name, value) in &self.opts.settings {
            set(name, value);
        }
        self.write_server_file("postgresql.conf", &conf);
    }

    /// Writes a file in the data directory, readable only by the server user.
    fn write_server_file(&self, name: &str, contents: &str) {
        let path = self.data_dir.join(name);
        let result = fs::write(&path, contents)
            .and_then(|()| fs::set_permissions(&path, fs::Permissions::from_mode(0o600)))
            .and_then(|()| env::give_to(self.user.as_ref(), &path));
        if let Err(err) = result {
            panic!("testkit: could not write {}: {err}", path.display());
        }
    }

    /// Starts the postmaster and waits until it is ready; with `pick_port`, chooses a
    /// free port first and retries with another one if the port was taken meanwhile.
    fn launch(&mut self, pick_port: bool) {
        for attempt in 1..=PORT_ATTEMPTS {
            if pick_port {
                self.port = free_port();
            }
            self.write_conf();
            let log_offset = fs::metadata(&self.log_path).map(|m| m.len()).unwrap_or(0);
            if let Err(err) = self.spawn_postmaster() {
                self.fail(&format!(
                    "could not start {}: {err}",
                    self.bin("postgres").display()
                ));
            }
            match self.wait_ready(log_offset) {
                Ok(()) => return,
                Err(StartFailure::PortInUse) if pick_port && attempt < PORT_ATTEMPTS => continue,
                Err(StartFailure::PortInUse) => {
                    self.fail(&format!("port {} is in use", self.port));
                }
                Err(StartFailure::Exited(status)) => {
                    self.fail(&format!("PostgreSQL exited during startup ({status})"));
                }
                Err(StartFailure::Timeout) => self.fail(&format!(
                    "PostgreSQL did not become ready within {} s",
                    START_TIMEOUT.as_secs()
                )),
                Err(StartFailure::Io(err)) => {
                    self.fail(&format!("waiting for PostgreSQL to start: {err}"));
                }
            }
        }
    }

    fn spawn_postmaster(&mut self) -> std::io::Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let log2 = log.try_clone()?;
        let mut cmd = env::server_command(self.user.as_ref(), &self.bin("postgres"));
        cmd.arg("-D")
            .arg(&self.data_dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        self.child = Some(cmd.spawn()?);
        Ok(())
    }

    fn wait_ready(&mut self, log_offset: u64) -> Result<(), StartFailure> {
        let deadline = Instant::now() + START_TIMEOUT;
        let socket = self.socket_dir.join(format!(".s.PGSQL.{}", self.port));
        loop {
            let child = self.child.as_mut().expect("postmaster was spawned");
            let pid = child.id();
            if let Some(status) = child.try_wait().map_err(StartFailure::Io)? {
                self.child = None;
                let log = self.log_since(log_offset);
                let port_taken = log.contains("could not bind IPv4 address")
                    && log.contains("Address already in use");
                return Err(if port_taken {
                    StartFailure::PortInUse
                } else {
                    StartFailure::Exited(status)
                });
            }
            if self.pid_file_says_ready(pid)
                && socket.exists()
                && UnixStream::connect(&socket).is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(StartFailure::Timeout);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// postmaster.pid: line 1 is the pid, line 8 the status (`starting`, `ready`,
    /// `standby`, `stopping`) since PostgreSQL 10.
    fn pid_file_says_ready(&self, pid: u32) -> bool {
        let Ok(text) = fs::read_to_string(self.data_dir.join("postmaster.pid")) else {
            return false;
        };
        let lines: Vec<&str> = text.lines().collect();
        lines.first().map(|l| l.trim()) == Some(pid.to_string().as_str())
            && matches!(lines.get(7).map(|l| l.trim()), Some("ready" | "standby"))
    }

    fn log_since(&self, offset: u64) -> String {
        let mut text = String::new();
        if let Ok(mut file) = fs::File::open(&self.log_path) {
            let mut bytes = Vec::new();
            if file.seek(SeekFrom::Start(offset)).is_ok() && file.read_to_end(&mut bytes).is_ok() {
                text = String::from_utf8_lossy(&bytes).into_owned();
            }
        }
        text
    }

    /// Kills the server (if running) and panics with `message` and the server log.
    fn fail(&mut self, message: &str) -> ! {
        self.terminate(libc::SIGQUIT, QUIT_TIMEOUT);
        self.log_dumped = true;
        panic!(
            "testkit: {message}\n  binaries: {}\n  data directory: {}\n--- server log ({}) ---\n{}--- end of server log ---",
            self.bin_dir.display(),
            self.data_dir.display(),
            self.log_path.display(),
            self.log()
        );
    }

    /// Sends `signal` to the postmaster and waits up to `timeout`; escalates to SIGQUIT
    /// and then SIGKILL if it does not exit.
    fn terminate(&mut self, signal: libc::c_int, timeout: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let mut steps = vec![(signal, timeout)];
        if signal != libc::SIGQUIT {
            steps.push((libc::SIGQUIT, QUIT_TIMEOUT));
        }
        steps.push((libc::SIGKILL, QUIT_TIMEOUT));
        for (sig, wait) in steps {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            // SAFETY: kill(2) on the pid of our own child, which has not been reaped
            // (try_wait above returned None), so the pid cannot have been reused.
            unsafe {
                libc::kill(child.id() as libc::pid_t, sig);
            }
            let deadline = Instant::now() + wait;
            while Instant::now() < deadline {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => return,
                    Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
        let _ = child.wait();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.terminate(libc::SIGQUIT, QUIT_TIMEOUT);
        if std::thread::panicking() && !self.log_dumped {
            eprintln!(
                "--- testkit: server log ({}) ---\n{}--- end of server log ---",
                self.log_path.display(),
                self.log()
            );
        }
        let Some(root) = self.root.take() else {
            return;
        };
        if std::env::var("PGREPL_TEST_KEEP").is_ok_and(|v| v == "1") {
            let path = root.keep();
            eprintln!(
                "testkit: PGREPL_TEST_KEEP=1, kept the cluster files in {} (data: {}, log: {})",
                path.display(),
                self.data_dir.display(),
                self.log_path.display()
            );
        } else if let Err(err) = root.close() {
            eprintln!(
                "testkit: could not remove {}: {err}",
                self.root_path.display()
            );
        }
    }
}
