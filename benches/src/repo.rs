//! The object-storage benchmark (`compare --cases repo-backup,repo-restore`): backups
//! into an S3-compatible store and restores from it, our `clone-standby backup` /
//! `restore` against pgBackRest and barman-cloud, on one local Garage store.
//!
//! Everything the run needs is started here and stopped at the end: a single-node Garage
//! (its own small launcher, [`Garage`]), optionally with a TCP_NODELAY shim
//! ([`nodelay_shim`]), and an haproxy TLS terminator in TCP mode in front of it for
//! pgBackRest, which speaks only https to S3 ([`TlsProxy`]). Peer tools come from
//! `scripts/install-bench-peers.sh` ([`Peers`]).
//!
//! Per round, every contender (tool × settings: its fastest sensible settings, and its
//! defaults) runs once, in an order rotated by the round: set the server's
//! `archive_command` for that tool (untimed), back up into a fresh prefix of the bucket
//! (measured), wait until the server has archived every ready WAL segment, list the
//! prefix (bytes stored), restore into a fresh directory (measured), check that
//! `PG_VERSION` and `backup_label` are there, then delete the directory and the prefix.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::cluster::{server_user, OsUser, Result, SourceCluster};
use crate::harness::{display_command, OursTool, Sides};
use crate::measure::{self, Usage};
use crate::stats::{pair_ratios, summarize, Summary};

/// The bucket every contender writes into (each run under a prefix of its own).
pub const BUCKET: &str = "pgrepl-bench";
/// Garage's S3 region name (set in its configuration).
pub const REGION: &str = "garage";
/// The name pgBackRest's stanza and barman-cloud's server get.
const SERVER_NAME: &str = "bench";
/// The install script that provides the peers.
pub const INSTALL_SCRIPT: &str = "scripts/install-bench-peers.sh";

/// The cache directory of the install scripts: `$PGREPL_CACHE_DIR`, else
/// `/var/cache/pgrepl` as root, else `${XDG_CACHE_HOME:-$HOME/.cache}/pgrepl`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PGREPL_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/cache/pgrepl");
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join("pgrepl")
}

/// Where the store and the peer tools are on this machine.
#[derive(Debug, Clone, Serialize)]
pub struct Peers {
    /// The Garage binary (`$PGREPL_GARAGE_BIN`, else `<cache>/garage/bin/garage`).
    pub garage: PathBuf,
    /// `pgbackrest`.
    pub pgbackrest: PathBuf,
    /// `haproxy`.
    pub haproxy: PathBuf,
    /// The barman-cloud venv (its python also lists and deletes prefixes with boto3).
    pub barman_venv: PathBuf,
    /// `garage --version`, `pgbackrest version`, `haproxy -v`, `barman-cloud-backup
    /// --version`, as found.
    pub versions: Vec<String>,
}

pub(crate) fn first_line_of(program: &Path, args: &[&str]) -> Option<String> {
    let output = Command::new(program).args(args).output().ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
        .status
        .success()
        .then(|| text.lines().next().unwrap_or("").trim().to_string())
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

impl Peers {
    /// Finds the Garage binary alone (what the synchronous-commit case needs: its
    /// reference is pg_receivewal, and it lists nothing in the store).
    pub fn locate_store_only() -> Result<Peers> {
        let cache = cache_dir();
        let garage = std::env::var_os("PGREPL_GARAGE_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| cache.join("garage/bin/garage"));
        match first_line_of(&garage, &["--version"]) {
            Some(v) => Ok(Peers {
                garage,
                pgbackrest: "pgbackrest".into(),
                haproxy: "haproxy".into(),
                barman_venv: cache.join("bench-peers/barman-venv"),
                versions: vec![v],
            }),
            None => Err(format!(
                "the Garage binary {} is missing (build it with scripts/install-garage.sh, \
                 or set PGREPL_GARAGE_BIN)",
                garage.display()
            )),
        }
    }

    /// Finds the store and, when `need_peers`, pgBackRest, haproxy, openssl and the
    /// barman-cloud venv. The venv's python is needed on every side (it lists the bytes
    /// stored). The error names what is missing and the script that installs it.
    pub fn locate(need_peers: bool) -> Result<Peers> {
        let cache = cache_dir();
        let garage = std::env::var_os("PGREPL_GARAGE_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| cache.join("garage/bin/garage"));
        let barman_venv = cache.join("bench-peers/barman-venv");
        let mut missing = Vec::new();
        let mut versions = Vec::new();
        match first_line_of(&garage, &["--version"]) {
            Some(v) => versions.push(v),
            None => missing.push(format!(
                "the Garage binary {} (build it with `{INSTALL_SCRIPT} --with-garage`, or set PGREPL_GARAGE_BIN)",
                garage.display()
            )),
        }
        let python = barman_venv.join("bin/python");
        if first_line_of(&python, &["-c", "import boto3"]).is_none() {
            missing.push(format!(
                "the barman-cloud venv with boto3 at {}",
                barman_venv.display()
            ));
        } else if let Some(v) =
            first_line_of(&barman_venv.join("bin/barman-cloud-backup"), &["--version"])
        {
            versions.push(v);
        }
        let pgbackrest = find_in_path("pgbackrest").unwrap_or_else(|| "pgbackrest".into());
        let haproxy = find_in_path("haproxy").unwrap_or_else(|| "haproxy".into());
        if need_peers {
            match first_line_of(&pgbackrest, &["version"]) {
                Some(v) => versions.push(v),
                None => missing.push("pgbackrest".into()),
            }
            match first_line_of(&haproxy, &["-v"]) {
                Some(v) => versions.push(v),
                None => missing.push("haproxy".into()),
            }
            if find_in_path("openssl").is_none() {
                missing.push("openssl".into());
            }
        }
        if missing.is_empty() {
            Ok(Peers {
                garage,
                pgbackrest,
                haproxy,
                barman_venv,
                versions,
            })
        } else {
            Err(format!(
                "the object-storage benchmark needs {}; run {INSTALL_SCRIPT} (as root)",
                missing.join(", ")
            ))
        }
    }
}

pub(crate) fn random_hex(bytes: usize) -> Result<String> {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| format!("/dev/urandom: {e}"))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

pub(crate) fn run_ok(cmd: &mut Command, what: &str) -> Result<String> {
    let output = cmd
        .output()
        .map_err(|e| format!("{what}: could not start: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        Ok(text)
    } else {
        Err(format!(
            "{what} failed ({}): {}",
            output.status,
            text.trim()
        ))
    }
}

pub(crate) fn write_private(path: &Path, text: &str, owner: Option<OsUser>) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    chown(path, owner)
}

pub(crate) fn chown(path: &Path, owner: Option<OsUser>) -> Result<()> {
    if let Some(user) = owner {
        std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
            .map_err(|e| format!("chown {}: {e}", path.display()))?;
    }
    Ok(())
}

/// A process this run started; killed (by its own pid) and reaped on drop.
pub(crate) struct Owned {
    pub(crate) child: Child,
    what: &'static str,
}

impl Owned {
    pub(crate) fn spawn(cmd: &mut Command, log: &Path, what: &'static str) -> Result<Owned> {
        let out = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .map_err(|e| format!("starting {what}: {e}"))?;
        Ok(Owned { child, what })
    }

    pub(crate) fn check_alive(&mut self, log: &Path) -> Result<()> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(format!(
                "{} exited ({status}): {}",
                self.what,
                measure::last_line(log)
            )),
            _ => Ok(()),
        }
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The C source of the TCP_NODELAY shim (our own): wraps `accept`, `accept4` and
/// `connect` and sets TCP_NODELAY on every TCP socket going through them.
///
/// Garage 2.5 does not set TCP_NODELAY; on loopback a GET of 3–64 KiB then waits for
/// the peer's delayed ACK (about 44 ms per request, reference doc section 3). Real S3
/// has no such delay.
const NODELAY_C: &str = r#"/* pgrepl benches: set TCP_NODELAY on accepted and connected TCP sockets. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

static void set_nodelay(int fd)
{
    struct sockaddr_storage addr;
    socklen_t len = sizeof addr;
    int type = 0, one = 1, saved = errno;
    socklen_t tlen = sizeof type;
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tlen) == 0 && type == SOCK_STREAM &&
        getsockname(fd, (struct sockaddr *)&addr, &len) == 0 &&
        (addr.ss_family == AF_INET || addr.ss_family == AF_INET6))
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    errno = saved;
}

int accept(int fd, struct sockaddr *addr, socklen_t *len)
{
    static int (*real)(int, struct sockaddr *, socklen_t *);
    if (!real)
        real = (int (*)(int, struct sockaddr *, socklen_t *))dlsym(RTLD_NEXT, "accept");
    int r = real(fd, addr, len);
    if (r >= 0)
        set_nodelay(r);
    return r;
}

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
    static int (*real)(int, struct sockaddr *, socklen_t *, int);
    if (!real)
        real = (int (*)(int, struct sockaddr *, socklen_t *, int))dlsym(RTLD_NEXT, "accept4");
    int r = real(fd, addr, len, flags);
    if (r >= 0)
        set_nodelay(r);
    return r;
}

int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
    static int (*real)(int, const struct sockaddr *, socklen_t);
    if (!real)
        real = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "connect");
    set_nodelay(fd);
    return real(fd, addr, len);
}
"#;

/// Compiles the TCP_NODELAY shim into `dir` with `cc` and returns the library's path.
pub fn nodelay_shim(dir: &Path) -> Result<PathBuf> {
    let source = dir.join("nodelay.c");
    let library = dir.join("libnodelay.so");
    std::fs::write(&source, NODELAY_C).map_err(|e| format!("{}: {e}", source.display()))?;
    run_ok(
        Command::new("cc")
            .args(["-O2", "-shared", "-fPIC", "-Wall", "-o"])
            .arg(&library)
            .arg(&source)
            .arg("-ldl"),
        "cc (the TCP_NODELAY shim)",
    )?;
    Ok(library)
}

/// A single-node Garage store started by this run (stopped on drop).
pub struct Garage {
    process: Owned,
    /// The S3 endpoint, `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The S3 port.
    pub s3_port: u16,
    /// The access key id.
    pub key_id: String,
    /// The secret key.
    pub secret: String,
    /// `garage --version`.
    pub version: String,
    /// True when the TCP_NODELAY shim is preloaded.
    pub nodelay: bool,
    /// True when Garage fsyncs data blocks and metadata before it acknowledges a write
    /// (`data_fsync`, `metadata_fsync`; both off by default in Garage).
    pub fsync: bool,
    dir: PathBuf,
    admin_port: u16,
    admin_token: String,
}

impl Garage {
    /// Starts Garage in `dir` (emptied first) on `base_port` (S3), `base_port + 1` (RPC)
    /// and `base_port + 3` (admin), makes its layout, a key and [`BUCKET`].
    pub fn start(
        binary: &Path,
        dir: &Path,
        base_port: u16,
        nodelay: Option<&Path>,
        log: &dyn Fn(&str),
    ) -> Result<Garage> {
        Garage::start_with(binary, dir, base_port, nodelay, false, log)
    }

    /// [`Garage::start`], and with `fsync` Garage syncs data blocks and metadata to disk
    /// before it acknowledges a write.
    pub fn start_with(
        binary: &Path,
        dir: &Path,
        base_port: u16,
        nodelay: Option<&Path>,
        fsync: bool,
        log: &dyn Fn(&str),
    ) -> Result<Garage> {
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| format!("removing {}: {e}", dir.display()))?;
        }
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let config = dir.join("garage.toml");
        let (s3_port, rpc_port, admin_port) = (base_port, base_port + 1, base_port + 3);
        let admin_token = random_hex(16)?;
        let text = format!(
            "metadata_dir = \"{dir}/meta\"\n\
             data_dir = \"{dir}/data\"\n\
             db_engine = \"sqlite\"\n\
             replication_factor = 1\n\
             compression_level = \"none\"\n\
             data_fsync = {fsync}\n\
             metadata_fsync = {fsync}\n\
             rpc_bind_addr = \"127.0.0.1:{rpc_port}\"\n\
             rpc_public_addr = \"127.0.0.1:{rpc_port}\"\n\
             rpc_secret = \"{secret}\"\n\n\
             [s3_api]\n\
             s3_region = \"{REGION}\"\n\
             api_bind_addr = \"127.0.0.1:{s3_port}\"\n\
             root_domain = \".s3.garage.localhost\"\n\n\
             [admin]\n\
             api_bind_addr = \"127.0.0.1:{admin_port}\"\n\
             admin_token = \"{token}\"\n",
            dir = dir.display(),
            secret = random_hex(32)?,
            token = admin_token,
        );
        write_private(&config, &text, None)?;
        let server_log = dir.join("garage.log");
        let mut cmd = Command::new(binary);
        cmd.arg("-c")
            .arg(&config)
            .arg("server")
            .env("RUST_LOG", "warn");
        if let Some(lib) = nodelay {
            cmd.env("LD_PRELOAD", lib);
        }
        let mut process = Owned::spawn(&mut cmd, &server_log, "garage server")?;
        let cli = |args: &[&str]| -> Result<String> {
            run_ok(
                Command::new(binary).arg("-c").arg(&config).args(args),
                &format!("garage {}", args.join(" ")),
            )
        };
        let started = Instant::now();
        let node = loop {
            process.check_alive(&server_log)?;
            match cli(&["node", "id", "-q"]) {
                Ok(id) => break id.trim().split('@').next().unwrap_or("").to_string(),
                Err(e) if started.elapsed() > Duration::from_secs(60) => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        // `node id` reads the key from disk and can answer before the RPC port listens;
        // the layout commands need the server itself.
        let started = Instant::now();
        loop {
            match cli(&["layout", "assign", "-z", "dc1", "-c", "10G", &node]) {
                Ok(_) => break,
                Err(e) if started.elapsed() > Duration::from_secs(60) => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
        cli(&["layout", "apply", "--version", "1"])?;
        let key = cli(&["key", "create", "pgrepl-bench"])?;
        let field = |name: &str| {
            key.lines()
                .find_map(|l| l.trim().strip_prefix(name))
                .map(|v| v.trim().to_string())
                .ok_or_else(|| format!("no `{name}` in garage key create's output: {key}"))
        };
        let (key_id, secret) = (field("Key ID:")?, field("Secret key:")?);
        // The layout takes a moment to be usable for bucket creation.
        let started = Instant::now();
        loop {
            match cli(&["bucket", "create", BUCKET]) {
                Ok(_) => break,
                Err(e) if started.elapsed() > Duration::from_secs(30) => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(300)),
            }
        }
        cli(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            BUCKET,
            "--key",
            "pgrepl-bench",
        ])?;
        let version = first_line_of(binary, &["--version"]).unwrap_or_default();
        log(&format!(
            "garage started: {version}, S3 on 127.0.0.1:{s3_port}, TCP_NODELAY shim {}, fsync {}",
            if nodelay.is_some() { "on" } else { "off" },
            if fsync { "on" } else { "off" }
        ));
        Ok(Garage {
            process,
            endpoint: format!("http://127.0.0.1:{s3_port}"),
            s3_port,
            key_id,
            secret,
            version,
            nodelay: nodelay.is_some(),
            fsync,
            dir: dir.to_path_buf(),
            admin_port,
            admin_token,
        })
    }

    /// Sets the S3 credentials and endpoint of this store (`AWS_*`) on `cmd`.
    pub fn s3_env(&self, cmd: &mut Command) {
        cmd.env("AWS_ACCESS_KEY_ID", &self.key_id)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret)
            .env("AWS_REGION", REGION)
            .env("AWS_DEFAULT_REGION", REGION)
            .env("AWS_ENDPOINT_URL", &self.endpoint)
            .env("AWS_ALLOW_HTTP", "true");
    }

    /// The bytes and objects [`BUCKET`] holds, from Garage's own counters (admin API
    /// `GetBucketInfo`; exact and current on a single node).
    pub fn bucket_usage(&self) -> Result<(u64, u64)> {
        use std::io::{Read, Write};
        let what = "Garage admin API GetBucketInfo";
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.admin_port))
            .map_err(|e| format!("{what}: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| format!("{what}: {e}"))?;
        write!(
            stream,
            "GET /v2/GetBucketInfo?globalAlias={BUCKET} HTTP/1.1\r\nHost: 127.0.0.1\r\n\
             Authorization: Bearer {}\r\nConnection: close\r\n\r\n",
            self.admin_token
        )
        .map_err(|e| format!("{what}: {e}"))?;
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .map_err(|e| format!("{what}: {e}"))?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("{what}: no HTTP body in {response:?}"))?;
        if !head.starts_with("HTTP/1.1 200") {
            return Err(format!("{what}: {}", head.lines().next().unwrap_or("")));
        }
        // Garage answers with a length, not chunks; tolerate chunks all the same.
        let json =
            &body[body.find('{').unwrap_or(0)..body.rfind('}').map_or(body.len(), |i| i + 1)];
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| format!("{what}: {e}: {body:?}"))?;
        match (value["bytes"].as_u64(), value["objects"].as_u64()) {
            (Some(bytes), Some(objects)) => Ok((bytes, objects)),
            _ => Err(format!("{what}: no bytes or objects in {json}")),
        }
    }

    /// Stops the store and deletes its directory.
    pub fn stop(self) {
        let dir = self.dir.clone();
        drop(self.process);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Copies the server's log (`garage.log`) to `to`, so it outlives [`Garage::stop`].
    pub fn keep_log(&self, to: &Path) -> Result<()> {
        std::fs::copy(self.dir.join("garage.log"), to)
            .map(drop)
            .map_err(|e| format!("copying the Garage log to {}: {e}", to.display()))
    }
}

/// haproxy in TCP mode terminating TLS in front of Garage, for pgBackRest (stopped on
/// drop). The CA and server certificate are made here with the openssl CLI.
pub struct TlsProxy {
    _process: Owned,
    /// The port haproxy listens on (127.0.0.1).
    pub port: u16,
    /// The CA certificate that signed the server's (for `repo1-storage-ca-file`).
    pub ca_file: PathBuf,
}

impl TlsProxy {
    /// Starts haproxy on `port`, forwarding to `backend_port`, with a fresh CA and a
    /// certificate for `localhost` / 127.0.0.1 in `dir`.
    pub fn start(haproxy: &Path, dir: &Path, port: u16, backend_port: u16) -> Result<TlsProxy> {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
        let openssl = |args: &[&str], what: &str| run_ok(Command::new("openssl").args(args), what);
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=pgrepl bench CA",
                "-keyout",
                &p("ca.key"),
                "-out",
                &p("ca.pem"),
            ],
            "openssl (CA)",
        )?;
        openssl(
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=localhost",
                "-keyout",
                &p("server.key"),
                "-out",
                &p("server.csr"),
            ],
            "openssl (server key)",
        )?;
        std::fs::write(
            dir.join("server.ext"),
            // pgBackRest 2.45 matches the host it connects to only against the CN and
            // DNS-type names (not IP addresses), so 127.0.0.1 is listed as a DNS name too.
            "subjectAltName = DNS:localhost, DNS:127.0.0.1, IP:127.0.0.1\n",
        )
        .map_err(|e| e.to_string())?;
        openssl(
            &[
                "x509",
                "-req",
                "-days",
                "2",
                "-in",
                &p("server.csr"),
                "-CA",
                &p("ca.pem"),
                "-CAkey",
                &p("ca.key"),
                "-CAcreateserial",
                "-extfile",
                &p("server.ext"),
                "-out",
                &p("server.crt"),
            ],
            "openssl (server certificate)",
        )?;
        let pem = format!(
            "{}{}",
            std::fs::read_to_string(p("server.crt")).map_err(|e| e.to_string())?,
            std::fs::read_to_string(p("server.key")).map_err(|e| e.to_string())?
        );
        write_private(&dir.join("server.pem"), &pem, None)?;
        let config = format!(
            "global\n  maxconn 256\n\
             defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 600s\n  timeout server 600s\n\
             frontend s3_tls\n  bind 127.0.0.1:{port} ssl crt {pem}\n  default_backend garage\n\
             backend garage\n  server garage1 127.0.0.1:{backend_port}\n",
            pem = p("server.pem")
        );
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(&cfg, config).map_err(|e| format!("{}: {e}", cfg.display()))?;
        let log = dir.join("haproxy.log");
        let mut process = Owned::spawn(
            Command::new(haproxy).arg("-db").arg("-f").arg(&cfg),
            &log,
            "haproxy",
        )?;
        let started = Instant::now();
        loop {
            process.check_alive(&log)?;
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            if started.elapsed() > Duration::from_secs(20) {
                return Err(format!("haproxy did not listen on {port} within 20 s"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let ca_file = dir.join("ca.pem");
        // pgBackRest runs as the postgres user and must read the CA.
        let _ = std::fs::set_permissions(
            &ca_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        );
        Ok(TlsProxy {
            _process: process,
            port,
            ca_file,
        })
    }
}

/// Which tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RepoTool {
    /// `clone-standby backup` / `restore`.
    Ours,
    /// pgBackRest.
    PgBackRest,
    /// barman-cloud-backup / barman-cloud-restore.
    Barman,
}

impl RepoTool {
    fn id(self) -> &'static str {
        match self {
            RepoTool::Ours => "ours",
            RepoTool::PgBackRest => "pgbackrest",
            RepoTool::Barman => "barman",
        }
    }

    fn name(self) -> &'static str {
        match self {
            RepoTool::Ours => "clone-standby",
            RepoTool::PgBackRest => "pgBackRest",
            RepoTool::Barman => "barman-cloud",
        }
    }
}

/// Which settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Settings {
    /// The tool's fastest sensible settings (parallelism 2, lz4).
    Fast,
    /// The tool's defaults (fast checkpoint aside).
    Defaults,
}

impl Settings {
    fn id(self) -> &'static str {
        match self {
            Settings::Fast => "fast",
            Settings::Defaults => "defaults",
        }
    }
}

/// One tool with one set of settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Contender {
    /// The tool.
    pub tool: RepoTool,
    /// Its settings.
    pub settings: Settings,
}

impl Contender {
    /// `ours-fast`, `pgbackrest-defaults`, …
    pub fn id(self) -> String {
        format!("{}-{}", self.tool.id(), self.settings.id())
    }

    /// The settings in words, for the report.
    pub fn describe(self) -> &'static str {
        match (self.tool, self.settings) {
            (RepoTool::Ours, Settings::Fast) => "--compress lz4",
            (RepoTool::Ours, Settings::Defaults) => "no options (its default compression)",
            (RepoTool::PgBackRest, Settings::Fast) => {
                "process-max=2, compress-type=lz4, start-fast=y"
            }
            (RepoTool::PgBackRest, Settings::Defaults) => {
                "defaults (process-max=1, compress-type=gz level 6), start-fast=y"
            }
            (RepoTool::Barman, Settings::Fast) => "-J 2 --lz4 (WAL --lz4), --immediate-checkpoint",
            (RepoTool::Barman, Settings::Defaults) => {
                "defaults (-J 2, no compression), --immediate-checkpoint"
            }
        }
    }
}

/// Backup or restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Backup into the store.
    Backup,
    /// Restore from the store into a fresh directory.
    Restore,
}

impl Phase {
    fn id(self) -> &'static str {
        match self {
            Phase::Backup => "repo-backup",
            Phase::Restore => "repo-restore",
        }
    }
}

/// One measured run.
#[derive(Debug, Clone, Serialize)]
pub struct RepoRun {
    /// Round, from 0.
    pub round: u32,
    /// Who ran.
    pub contender: Contender,
    /// Backup or restore.
    pub phase: Phase,
    /// Exit 0 and (restore) the checks passed.
    pub ok: bool,
    /// The failure, in one line.
    pub error: Option<String>,
    /// Wall, CPU, peak RSS of the client's process tree.
    pub usage: Usage,
    /// Backup: bytes stored under the run's prefix (backup + archived WAL + metadata);
    /// restore: bytes in the restored directory.
    pub bytes: u64,
    /// Backup: objects under the prefix.
    pub objects: u64,
    /// The log of the run.
    pub log: PathBuf,
}

/// Summary of one contender's runs of one phase.
#[derive(Debug, Clone, Serialize)]
pub struct RepoRow {
    /// Backup or restore.
    pub phase: Phase,
    /// Who.
    pub contender: Contender,
    /// The command (round 0).
    pub command: String,
    /// Successful runs.
    pub ok_runs: usize,
    /// All runs.
    pub runs: usize,
    /// The first failure.
    pub first_error: Option<String>,
    /// Wall s.
    pub wall_s: Option<Summary>,
    /// CPU s (user + sys of the client's tree).
    pub cpu_s: Option<Summary>,
    /// Peak RSS MiB.
    pub rss_mib: Option<Summary>,
    /// Database MB per second of wall time.
    pub mb_per_s: Option<Summary>,
    /// MB stored (backup) or restored (restore).
    pub mb: Option<Summary>,
    /// Objects stored (backup).
    pub objects: Option<Summary>,
}

/// Ours ÷ a peer with the same kind of settings, pair by pair (per round).
#[derive(Debug, Clone, Serialize)]
pub struct RepoRatio {
    /// Backup or restore.
    pub phase: Phase,
    /// Our contender.
    pub ours: Contender,
    /// The peer.
    pub peer: Contender,
    /// Wall.
    pub wall: Option<Summary>,
    /// CPU.
    pub cpu: Option<Summary>,
    /// Peak RSS.
    pub rss: Option<Summary>,
    /// Bytes stored (backup only).
    pub bytes: Option<Summary>,
}

/// The object-storage part of the report.
#[derive(Debug, Clone, Serialize)]
pub struct RepoReport {
    /// Store, proxy and peer versions.
    pub versions: Vec<String>,
    /// TCP_NODELAY shim on Garage.
    pub nodelay: bool,
    /// Database size (data directory without pg_wal), bytes: the payload of MB/s.
    pub database_bytes: u64,
    /// Share of the database that is random text, percent (measured).
    pub random_text_percent: f64,
    /// Phases reported.
    pub phases: Vec<Phase>,
    /// Per phase and contender.
    pub rows: Vec<RepoRow>,
    /// Ours ÷ peers.
    pub ratios: Vec<RepoRatio>,
    /// Checks and notes.
    pub checks: Vec<String>,
    /// Every run.
    pub runs: Vec<RepoRun>,
}

/// What the object-storage runs need.
pub struct RepoBench<'a> {
    /// The source cluster (the objstore variant: archive_mode on).
    pub cluster: &'a SourceCluster,
    /// Our binary.
    pub ours: &'a OursTool,
    /// The peers.
    pub peers: &'a Peers,
    /// Which sides run.
    pub sides: Sides,
    /// Rounds.
    pub rounds: u32,
    /// Phases to report.
    pub phases: Vec<Phase>,
    /// Work directory.
    pub work_dir: PathBuf,
    /// First port: Garage S3 (+1 RPC, +3 admin), haproxy +4.
    pub base_port: u16,
    /// Preload the TCP_NODELAY shim into Garage.
    pub nodelay: bool,
    /// Per-run time limit.
    pub timeout_s: u64,
    /// Progress lines.
    pub log: &'a dyn Fn(&str),
}

/// The store as the runs see it.
struct Store {
    garage: Garage,
    tls: Option<TlsProxy>,
    s3tool: PathBuf,
    run_dir: PathBuf,
    user: Option<OsUser>,
}

/// Lists (and optionally deletes) a prefix with boto3; our own helper, written at run
/// time next to the store. Prints `{"bytes": N, "objects": M}`.
pub(crate) const S3TOOL_PY: &str = r#"import json, os, sys
import boto3
from botocore.config import Config

command, bucket, prefix = sys.argv[1:4]
s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT"], region_name="garage",
                  config=Config(s3={"addressing_style": "path"}))
total = count = 0
keys = []
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
    for obj in page.get("Contents", []):
        total += obj["Size"]
        count += 1
        keys.append(obj["Key"])
if command == "delete":
    for key in keys:
        s3.delete_object(Bucket=bucket, Key=key)
print(json.dumps({"bytes": total, "objects": count}))
"#;

impl RepoBench<'_> {
    fn contenders(&self) -> Vec<Contender> {
        let tools: &[RepoTool] = match self.sides {
            Sides::Both => &[RepoTool::Ours, RepoTool::PgBackRest, RepoTool::Barman],
            Sides::Ours => &[RepoTool::Ours],
            Sides::Reference => &[RepoTool::PgBackRest, RepoTool::Barman],
        };
        tools
            .iter()
            .flat_map(|&tool| {
                [Settings::Fast, Settings::Defaults].map(|settings| Contender { tool, settings })
            })
            .collect()
    }

    fn prefix(&self, contender: Contender, round: u32) -> String {
        format!("r{round}-{}", contender.id())
    }

    fn s3_env(&self, store: &Store, cmd: &mut Command) {
        store.garage.s3_env(cmd);
    }

    fn as_server_user(&self, store: &Store, cmd: &mut Command) {
        if let Some(user) = store.user {
            cmd.uid(user.uid).gid(user.gid);
        }
        cmd.current_dir(&store.run_dir).env("HOME", &store.run_dir);
    }

    fn pgbackrest_conf(&self, store: &Store, contender: Contender, round: u32) -> PathBuf {
        store
            .run_dir
            .join(format!("pgbackrest-{}-r{round}.conf", contender.id()))
    }

    fn write_pgbackrest_conf(
        &self,
        store: &Store,
        contender: Contender,
        round: u32,
    ) -> Result<PathBuf> {
        let tls = store.tls.as_ref().ok_or("no TLS proxy for pgBackRest")?;
        let path = self.pgbackrest_conf(store, contender, round);
        let fast = if contender.settings == Settings::Fast {
            "process-max=2\ncompress-type=lz4\n"
        } else {
            ""
        };
        let text = format!(
            "[global]\nrepo1-type=s3\nrepo1-s3-endpoint=localhost\nrepo1-storage-host=127.0.0.1\n\
             repo1-storage-port={port}\nrepo1-storage-ca-file={ca}\nrepo1-s3-uri-style=path\n\
             repo1-s3-bucket={BUCKET}\nrepo1-s3-region={REGION}\nrepo1-s3-key={key}\n\
             repo1-s3-key-secret={secret}\nrepo1-path=/{prefix}\nrepo1-retention-full=9999\n\
             start-fast=y\nlog-level-console=warn\nlog-level-file=off\n\
             lock-path={run}/pgbackrest-lock\n{fast}\n\
             [{SERVER_NAME}]\npg1-path={data}\npg1-port={pgport}\npg1-socket-path={socket}\npg1-user=postgres\n",
            port = tls.port,
            ca = tls.ca_file.display(),
            key = store.garage.key_id,
            secret = store.garage.secret,
            prefix = self.prefix(contender, round),
            run = store.run_dir.display(),
            data = self.cluster.data.display(),
            pgport = self.cluster.port,
            socket = self.cluster.base.display(),
        );
        write_private(&path, &text, store.user)?;
        Ok(path)
    }

    fn barman_wal_script(
        &self,
        store: &Store,
        contender: Contender,
        round: u32,
    ) -> Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let path = store
            .run_dir
            .join(format!("barman-wal-archive-{}-r{round}.sh", contender.id()));
        let compress = if contender.settings == Settings::Fast {
            "--lz4 "
        } else {
            ""
        };
        let text = format!(
            "#!/bin/sh\n# archive_command of the barman-cloud runs: %p is $1\n\
             export AWS_ACCESS_KEY_ID='{key}' AWS_SECRET_ACCESS_KEY='{secret}' AWS_DEFAULT_REGION={REGION}\n\
             exec '{venv}/bin/barman-cloud-wal-archive' --endpoint-url {endpoint} {compress}\
             s3://{BUCKET}/{prefix} {SERVER_NAME} \"$1\"\n",
            key = store.garage.key_id,
            secret = store.garage.secret,
            venv = self.peers.barman_venv.display(),
            endpoint = store.garage.endpoint,
            prefix = self.prefix(contender, round),
        );
        write_private(&path, &text, store.user)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| e.to_string())?;
        Ok(path)
    }

    /// The program, arguments and whether it runs as the server's OS user.
    fn command(
        &self,
        contender: Contender,
        phase: Phase,
        endpoint: &str,
        pgbackrest_conf: &Path,
        prefix: &str,
        target: &Path,
    ) -> (PathBuf, Vec<String>, bool) {
        let url = format!("s3://{BUCKET}/{prefix}");
        let target = target.to_string_lossy().into_owned();
        let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<String>>();
        let fast = contender.settings == Settings::Fast;
        match (contender.tool, phase) {
            (RepoTool::Ours, Phase::Backup) => {
                let mut args = s(&[
                    "backup",
                    "--source",
                    &self.cluster.conninfo(),
                    "--repo",
                    &url,
                ]);
                if fast {
                    args.extend(s(&["--compress", "lz4"]));
                }
                (self.ours.path.clone(), args, false)
            }
            (RepoTool::Ours, Phase::Restore) => (
                self.ours.path.clone(),
                s(&[
                    "restore", "--repo", &url, "--pgdata", &target, "--backup", "latest",
                ]),
                false,
            ),
            (RepoTool::PgBackRest, phase) => {
                let mut args = vec![
                    format!("--config={}", pgbackrest_conf.display()),
                    format!("--stanza={SERVER_NAME}"),
                ];
                match phase {
                    Phase::Backup => args.extend(s(&["--type=full", "backup"])),
                    Phase::Restore => {
                        args.push(format!("--pg1-path={target}"));
                        args.push("restore".into());
                    }
                }
                (self.peers.pgbackrest.clone(), args, true)
            }
            (RepoTool::Barman, Phase::Backup) => {
                let mut args = s(&[
                    "--endpoint-url",
                    endpoint,
                    "--immediate-checkpoint",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.cluster.port.to_string(),
                    "-U",
                    "postgres",
                ]);
                if fast {
                    args.extend(s(&["-J", "2", "--lz4"]));
                }
                args.extend(s(&[&url, SERVER_NAME]));
                (
                    self.peers.barman_venv.join("bin/barman-cloud-backup"),
                    args,
                    true,
                )
            }
            (RepoTool::Barman, Phase::Restore) => (
                self.peers.barman_venv.join("bin/barman-cloud-restore"),
                s(&[
                    "--endpoint-url",
                    endpoint,
                    &url,
                    SERVER_NAME,
                    "latest",
                    &target,
                ]),
                true,
            ),
        }
    }

    fn s3tool(&self, store: &Store, command: &str, prefix: &str) -> Result<(u64, u64)> {
        let mut cmd = Command::new(self.peers.barman_venv.join("bin/python"));
        cmd.arg(&store.s3tool)
            .args([command, BUCKET, &format!("{prefix}/")])
            .env("S3_ENDPOINT", &store.garage.endpoint);
        self.s3_env(store, &mut cmd);
        let text = run_ok(&mut cmd, &format!("listing s3://{BUCKET}/{prefix}/"))?;
        let value: serde_json::Value =
            serde_json::from_str(text.trim().lines().last().unwrap_or(""))
                .map_err(|e| format!("s3tool output {text:?}: {e}"))?;
        Ok((
            value["bytes"].as_u64().unwrap_or(0),
            value["objects"].as_u64().unwrap_or(0),
        ))
    }

    /// Sets the server's archive_command (reload) and returns it.
    fn set_archive_command(&self, command: &str) -> Result<()> {
        self.cluster.sql(&format!(
            "ALTER SYSTEM SET archive_command = '{}'",
            command.replace('\'', "''")
        ))?;
        self.cluster.sql("SELECT pg_reload_conf()")?;
        // The archiver picks the new command up on its next cycle; give the reload a moment.
        std::thread::sleep(Duration::from_millis(300));
        Ok(())
    }

    /// Waits until no WAL segment is waiting for the archiver (no `.ready` file).
    fn wait_archived(&self, within: Duration) -> Result<()> {
        let status = self.cluster.data.join("pg_wal/archive_status");
        let started = Instant::now();
        loop {
            let ready: Vec<String> = std::fs::read_dir(&status)
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|n| n.ends_with(".ready"))
                        .collect()
                })
                .unwrap_or_default();
            if ready.is_empty() {
                return Ok(());
            }
            if started.elapsed() > within {
                return Err(format!(
                    "the archiver still has {} segment(s) waiting after {} s ({}); see the server log",
                    ready.len(),
                    within.as_secs(),
                    ready.join(" ")
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Untimed preparation of a contender's backup: its archive_command, and for
    /// pgBackRest its configuration and stanza.
    fn prepare_backup(&self, store: &Store, contender: Contender, round: u32) -> Result<()> {
        self.wait_archived(Duration::from_secs(120))?;
        match contender.tool {
            RepoTool::Ours => self.set_archive_command("/bin/true"),
            RepoTool::PgBackRest => {
                let conf = self.write_pgbackrest_conf(store, contender, round)?;
                let mut cmd = Command::new(&self.peers.pgbackrest);
                cmd.arg(format!("--config={}", conf.display()))
                    .arg(format!("--stanza={SERVER_NAME}"))
                    .arg("stanza-create");
                self.as_server_user(store, &mut cmd);
                run_ok(&mut cmd, "pgbackrest stanza-create")?;
                self.set_archive_command(&format!(
                    "{} --config={} --stanza={SERVER_NAME} archive-push %p",
                    self.peers.pgbackrest.display(),
                    conf.display()
                ))
            }
            RepoTool::Barman => {
                let script = self.barman_wal_script(store, contender, round)?;
                self.set_archive_command(&format!("{} %p", script.display()))
            }
        }
    }

    fn measure(
        &self,
        store: &Store,
        contender: Contender,
        phase: Phase,
        round: u32,
        target: &Path,
    ) -> RepoRun {
        let log = self.work_dir.join("logs").join(format!(
            "{}-{}-r{round}.log",
            phase.id(),
            contender.id()
        ));
        let mut run = RepoRun {
            round,
            contender,
            phase,
            ok: false,
            error: None,
            usage: Usage::default(),
            bytes: 0,
            objects: 0,
            log: log.clone(),
        };
        if contender.tool == RepoTool::Ours {
            let sub = match phase {
                Phase::Backup => "backup",
                Phase::Restore => "restore",
            };
            if let Some(why) = &self.ours.unavailable {
                run.error = Some(why.clone());
                return run;
            }
            if !self.ours.subcommands.iter().any(|s| s == sub) {
                run.error = Some(format!("clone-standby has no {sub} command yet"));
                return run;
            }
        }
        let (program, args, as_user) = self.command(
            contender,
            phase,
            &store.garage.endpoint,
            &self.pgbackrest_conf(store, contender, round),
            &self.prefix(contender, round),
            target,
        );
        let mut cmd = Command::new(&program);
        cmd.args(&args)
            .env_remove("PGDATA")
            .env_remove("PGPASSWORD")
            .env("LC_ALL", "C");
        if contender.tool != RepoTool::PgBackRest {
            self.s3_env(store, &mut cmd);
        }
        if as_user {
            self.as_server_user(store, &mut cmd);
        }
        let _ = std::fs::write(&log, format!("$ {}\n", display_command(&program, &args)));
        // SAFETY: sync has no preconditions.
        unsafe { libc::sync() };
        let (usage, error) =
            measure::run_logged(&mut cmd, &log, Duration::from_secs(self.timeout_s));
        run.ok = error.is_none();
        run.error = error;
        run.usage = usage;
        run
    }

    fn one_contender(
        &self,
        store: &Store,
        contender: Contender,
        round: u32,
        checks: &mut Vec<String>,
    ) -> Vec<RepoRun> {
        let prefix = self.prefix(contender, round);
        let target = self
            .work_dir
            .join("targets")
            .join(format!("repo-restore-{}", contender.id()));
        let mut runs = Vec::new();
        let mut backup = match self.prepare_backup(store, contender, round) {
            Ok(()) => self.measure(store, contender, Phase::Backup, round, &target),
            Err(e) => {
                let mut run = self.measure_skipped(contender, Phase::Backup, round);
                run.error = Some(format!("preparing: {e}"));
                run
            }
        };
        if backup.ok {
            // Segments finished during the backup reach the store before the listing.
            if let Err(e) = self.wait_archived(Duration::from_secs(120)) {
                checks.push(format!("{}: {e}", contender.id()));
            }
            match self.s3tool(store, "list", &prefix) {
                Ok((bytes, objects)) => {
                    backup.bytes = bytes;
                    backup.objects = objects;
                }
                Err(e) => checks.push(format!("{}: {e}", contender.id())),
            }
        }
        (self.log)(&line(&backup));
        let backup_ok = backup.ok;
        runs.push(backup);
        let restore = if backup_ok {
            let _ = std::fs::remove_dir_all(&target);
            let prepared = if contender.tool == RepoTool::Ours {
                Ok(())
            } else {
                std::fs::create_dir_all(&target)
                    .map_err(|e| format!("creating {}: {e}", target.display()))
                    .and_then(|()| {
                        use std::os::unix::fs::PermissionsExt;
                        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o700))
                            .map_err(|e| e.to_string())
                    })
                    .and_then(|()| chown(&target, store.user))
            };
            let mut run = match prepared {
                Ok(()) => self.measure(store, contender, Phase::Restore, round, &target),
                Err(e) => {
                    let mut run = self.measure_skipped(contender, Phase::Restore, round);
                    run.error = Some(e);
                    run
                }
            };
            if run.ok {
                let missing: Vec<&str> = ["PG_VERSION", "backup_label", "global/pg_control"]
                    .into_iter()
                    .filter(|f| !target.join(f).is_file())
                    .collect();
                if !missing.is_empty() {
                    run.ok = false;
                    run.error = Some(format!(
                        "exit 0 but the restored directory lacks {}",
                        missing.join(", ")
                    ));
                }
                run.bytes = measure::tree_size(&target);
            }
            let _ = std::fs::remove_dir_all(&target);
            (self.log)(&line(&run));
            Some(run)
        } else {
            let mut run = self.measure_skipped(contender, Phase::Restore, round);
            run.error = Some("not run: the backup failed".into());
            Some(run)
        };
        runs.extend(restore);
        if let Err(e) = self.s3tool(store, "delete", &prefix) {
            checks.push(format!("{}: deleting the prefix: {e}", contender.id()));
        }
        runs
    }

    fn measure_skipped(&self, contender: Contender, phase: Phase, round: u32) -> RepoRun {
        RepoRun {
            round,
            contender,
            phase,
            ok: false,
            error: None,
            usage: Usage::default(),
            bytes: 0,
            objects: 0,
            log: PathBuf::new(),
        }
    }

    /// Freezes and analyses the database and checkpoints, so no stray WAL (hint bits,
    /// autovacuum) lands in one tool's run; returns (database bytes, random-text %).
    fn settle(&self) -> Result<(u64, f64)> {
        (self.log)("VACUUM (FREEZE, ANALYZE) and CHECKPOINT before measuring");
        self.cluster.sql("VACUUM (FREEZE, ANALYZE)")?;
        self.cluster.sql("CHECKPOINT")?;
        let db = measure::tree_size(&self.cluster.data)
            .saturating_sub(measure::tree_size(&self.cluster.data.join("pg_wal")));
        let text: f64 = self
            .cluster
            .sql_value(
                "SELECT coalesce(pg_total_relation_size(to_regclass('bench_random_text')), 0)",
            )?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        Ok((
            db,
            if db > 0 {
                100.0 * text / db as f64
            } else {
                0.0
            },
        ))
    }

    /// Starts the store, runs every round, stops the store.
    pub fn run(&self) -> Result<RepoReport> {
        let log = self.log;
        let user = server_user()?;
        let root = self.work_dir.join("repo");
        let run_dir = root.join("run");
        let _ = std::fs::remove_dir_all(&run_dir);
        std::fs::create_dir_all(&run_dir).map_err(|e| format!("{}: {e}", run_dir.display()))?;
        chown(&run_dir, user)?;
        let _ = std::fs::create_dir_all(self.work_dir.join("logs"));
        let _ = std::fs::create_dir_all(self.work_dir.join("targets"));
        let shim = if self.nodelay {
            Some(nodelay_shim(&root)?)
        } else {
            None
        };
        let garage = Garage::start(
            &self.peers.garage,
            &root.join("garage"),
            self.base_port,
            shim.as_deref(),
            log,
        )?;
        let contenders = self.contenders();
        let tls = if contenders.iter().any(|c| c.tool == RepoTool::PgBackRest) {
            let proxy = TlsProxy::start(
                &self.peers.haproxy,
                &root.join("tls"),
                self.base_port + 4,
                garage.s3_port,
            )?;
            log(&format!(
                "haproxy terminates TLS on 127.0.0.1:{} for pgBackRest",
                proxy.port
            ));
            Some(proxy)
        } else {
            None
        };
        let s3tool = root.join("s3tool.py");
        std::fs::write(&s3tool, S3TOOL_PY).map_err(|e| format!("{}: {e}", s3tool.display()))?;
        let store = Store {
            garage,
            tls,
            s3tool,
            run_dir,
            user,
        };
        // A run that was cut short may have left an archive_command pointing at a
        // deleted prefix or script; start from the no-op.
        self.set_archive_command("/bin/true")?;
        let (database_bytes, random_text_percent) = self.settle()?;
        log(&format!(
            "database {:.0} MB, {random_text_percent:.0} % random text",
            database_bytes as f64 / 1e6
        ));
        let mut runs = Vec::new();
        let mut checks = Vec::new();
        for round in 0..self.rounds {
            log(&format!(
                "object storage round {}/{}",
                round + 1,
                self.rounds
            ));
            let mut order = contenders.clone();
            let shift = round as usize % order.len().max(1);
            order.rotate_left(shift);
            for contender in order {
                runs.extend(self.one_contender(&store, contender, round, &mut checks));
            }
        }
        if let Err(e) = self.set_archive_command("/bin/true") {
            checks.push(format!("resetting archive_command: {e}"));
        }
        let versions = self.peers.versions.clone();
        let nodelay = store.garage.nodelay;
        drop(store.tls);
        store.garage.stop();
        Ok(self.report(
            versions,
            nodelay,
            database_bytes,
            random_text_percent,
            &contenders,
            runs,
            checks,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn report(
        &self,
        versions: Vec<String>,
        nodelay: bool,
        database_bytes: u64,
        random_text_percent: f64,
        contenders: &[Contender],
        runs: Vec<RepoRun>,
        checks: Vec<String>,
    ) -> RepoReport {
        let mut rows = Vec::new();
        // The command lines with placeholders for what exists only during a run (the
        // round's prefix and pgBackRest configuration, the restore target). No secret is
        // ever on a command line.
        let endpoint = format!("http://127.0.0.1:{}", self.base_port);
        let dummy_store_cmd = |c: Contender, p: Phase| -> String {
            let (program, args, _) = self.command(
                c,
                p,
                &endpoint,
                Path::new(&format!("RUN_DIR/pgbackrest-{}-rN.conf", c.id())),
                &format!("rN-{}", c.id()),
                Path::new("TARGET"),
            );
            display_command(&program, &args)
        };
        for &phase in &self.phases {
            for &c in contenders {
                let mine: Vec<&RepoRun> = runs
                    .iter()
                    .filter(|r| r.phase == phase && r.contender == c)
                    .collect();
                let ok: Vec<&RepoRun> = mine.iter().copied().filter(|r| r.ok).collect();
                let of = |f: &dyn Fn(&RepoRun) -> f64| {
                    summarize(&ok.iter().map(|r| f(r)).collect::<Vec<_>>())
                };
                rows.push(RepoRow {
                    phase,
                    contender: c,
                    command: dummy_store_cmd(c, phase),
                    ok_runs: ok.len(),
                    runs: mine.len(),
                    first_error: mine.iter().find_map(|r| r.error.clone()),
                    wall_s: of(&|r| r.usage.wall_s),
                    cpu_s: of(&|r| r.usage.cpu_s()),
                    rss_mib: of(&|r| r.usage.max_rss_kib as f64 / 1024.0),
                    mb_per_s: of(&|r| database_bytes as f64 / 1e6 / r.usage.wall_s),
                    mb: of(&|r| r.bytes as f64 / 1e6),
                    objects: if phase == Phase::Backup {
                        of(&|r| r.objects as f64)
                    } else {
                        None
                    },
                });
            }
        }
        let per_round = |c: Contender, phase: Phase, f: &dyn Fn(&RepoRun) -> f64| {
            (0..self.rounds)
                .map(|round| {
                    runs.iter()
                        .find(|r| r.contender == c && r.phase == phase && r.round == round && r.ok)
                        .map(f)
                })
                .collect::<Vec<_>>()
        };
        let mut ratios = Vec::new();
        for &phase in &self.phases {
            for &ours in contenders.iter().filter(|c| c.tool == RepoTool::Ours) {
                for &peer in contenders
                    .iter()
                    .filter(|c| c.tool != RepoTool::Ours && c.settings == ours.settings)
                {
                    let ratio = |f: &dyn Fn(&RepoRun) -> f64| {
                        pair_ratios(&per_round(ours, phase, f), &per_round(peer, phase, f))
                    };
                    ratios.push(RepoRatio {
                        phase,
                        ours,
                        peer,
                        wall: ratio(&|r| r.usage.wall_s),
                        cpu: ratio(&|r| r.usage.cpu_s()),
                        rss: ratio(&|r| r.usage.max_rss_kib as f64),
                        bytes: if phase == Phase::Backup {
                            ratio(&|r| r.bytes as f64)
                        } else {
                            None
                        },
                    });
                }
            }
        }
        RepoReport {
            versions,
            nodelay,
            database_bytes,
            random_text_percent,
            phases: self.phases.clone(),
            rows,
            ratios,
            checks,
            runs,
        }
    }
}

fn line(run: &RepoRun) -> String {
    match &run.error {
        None => format!(
            "  {:<12} {:<20} {:7.2} s wall, {:6.2} s CPU, {:5.0} MiB RSS, {:6.0} MB{}",
            run.phase.id(),
            run.contender.id(),
            run.usage.wall_s,
            run.usage.cpu_s(),
            run.usage.max_rss_kib as f64 / 1024.0,
            run.bytes as f64 / 1e6,
            if run.phase == Phase::Backup {
                format!(" stored in {} objects", run.objects)
            } else {
                " restored".into()
            }
        ),
        Some(e) => format!(
            "  {:<12} {:<20} FAILED: {e}",
            run.phase.id(),
            run.contender.id()
        ),
    }
}

/// The markdown section of the object-storage runs.
pub fn markdown(report: &RepoReport, rounds: u32) -> String {
    use std::fmt::Write;
    let med_range = |s: Option<Summary>, d: usize| match s {
        Some(s) if s.n > 1 => format!("{:.d$} ({:.d$}–{:.d$})", s.median, s.min, s.max),
        Some(s) => format!("{:.d$}", s.median),
        None => "–".into(),
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "### Object storage: backup to and restore from S3 (Garage)\n"
    );
    let _ = writeln!(
        out,
        "Store: {}; single node on loopback, TCP_NODELAY shim {}; pgBackRest through haproxy \
         (TLS, TCP mode). Database {:.0} MB (data directory without pg_wal), {:.0} % of it a \
         table of random base64 text; frozen, analysed and checkpointed before the rounds; \
         {rounds} round(s), contenders in an order rotated per round.\n",
        report.versions.join("; "),
        if report.nodelay {
            "on"
        } else {
            "off (stock Garage)"
        },
        report.database_bytes as f64 / 1e6,
        report.random_text_percent
    );
    let _ = writeln!(
        out,
        "| case | tool | settings | ok | wall s | CPU s (user+sys) | peak RSS MiB | DB MB/s | MB stored / restored | objects |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
    for row in &report.rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.phase.id(),
            row.contender.tool.name(),
            row.contender.describe(),
            if row.runs == 0 {
                "not run".into()
            } else {
                format!("{}/{}", row.ok_runs, row.runs)
            },
            med_range(row.wall_s, 2),
            med_range(row.cpu_s, 2),
            med_range(row.rss_mib, 0),
            med_range(row.mb_per_s, 0),
            med_range(row.mb, 0),
            med_range(row.objects, 0),
        );
    }
    if !report.ratios.is_empty() {
        let _ = writeln!(
            out,
            "\n#### Ours ÷ peer, same kind of settings, pair by pair (< 1 is better)\n"
        );
        let _ = writeln!(
            out,
            "| case | ours | peer | wall | CPU | peak RSS | bytes stored | pairs |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
        for r in &report.ratios {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                r.phase.id(),
                r.ours.id(),
                r.peer.id(),
                med_range(r.wall, 2),
                med_range(r.cpu, 2),
                med_range(r.rss, 2),
                med_range(r.bytes, 2),
                r.wall.map(|s| s.n).unwrap_or(0)
            );
        }
    }
    let _ = writeln!(out, "\n#### Commands, failures and checks\n");
    for row in &report.rows {
        let _ = writeln!(
            out,
            "- {} {}: `{}`",
            row.phase.id(),
            row.contender.id(),
            row.command
        );
        if let Some(e) = &row.first_error {
            let _ = writeln!(out, "  - failure: {e}");
        }
    }
    for check in &report.checks {
        let _ = writeln!(out, "- check: {check}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contender_names_and_prefixes_are_distinct() {
        let mut ids = Vec::new();
        for tool in [RepoTool::Ours, RepoTool::PgBackRest, RepoTool::Barman] {
            for settings in [Settings::Fast, Settings::Defaults] {
                ids.push(Contender { tool, settings }.id());
            }
        }
        let mut unique = ids.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 6, "{ids:?}");
        assert!(ids.contains(&"pgbackrest-fast".to_string()));
    }

    #[test]
    fn the_shim_source_wraps_the_socket_calls() {
        for name in ["int accept(", "int accept4(", "int connect(", "TCP_NODELAY"] {
            assert!(NODELAY_C.contains(name), "{name}");
        }
    }
}
