//! The persistent source cluster: a PostgreSQL data directory with a pgbench database
//! under the work directory, keyed by pgbench scale, so repeated runs skip `pgbench -i`.
//!
//! Layout: `<work>/pg<major>-scale-<N>/{data,server.log,READY}`. `READY` is written only
//! after `pgbench -i` and a checkpoint succeeded; a directory without it is rebuilt.
//! When running as root, initdb and the server run as the `postgres` OS user.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::Command;

use pgwire_repl::{Config, QueryResult, SqlClient};

/// Everything that fails here is reported as one line of text.
pub type Result<T> = std::result::Result<T, String>;

/// An unprivileged OS user (uid, gid) to run server processes as.
#[derive(Debug, Clone, Copy)]
pub struct OsUser {
    /// The user id.
    pub uid: u32,
    /// The primary group id.
    pub gid: u32,
}

/// `None` when not root; otherwise the `postgres` user (an error if it does not exist).
pub fn server_user() -> Result<Option<OsUser>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = CString::new("postgres").expect("no NUL");
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: passwd is a plain C struct; all-zero is a valid value.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call and buf's length is passed along.
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return Err(
            "running as root, so PostgreSQL must run as the `postgres` OS user, which \
                    does not exist; run scripts/install-postgres.sh (it creates it)"
                .into(),
        );
    }
    Ok(Some(OsUser {
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
    }))
}

/// Where and how to build the source cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The directory with initdb, pg_ctl, postgres and pgbench.
    pub bin_dir: PathBuf,
    /// The work directory holding every cluster.
    pub work_dir: PathBuf,
    /// pgbench scale factor.
    pub scale: u32,
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// Add a table of random base64 text making up about this share of the database,
    /// in percent (0: none), so that backups do not compress to nothing. A separate
    /// cluster (`…-text<N>`), so cached plain clusters stay as they are.
    pub random_text_pct: u32,
    /// The object-storage variant (`…-objstore`): `archive_mode = on` (with
    /// `archive_command = '/bin/true'` until a peer's run sets its own),
    /// `autovacuum = off`, `wal_recycle = off`.
    pub object_store: bool,
    /// The incremental-backup variant (`…-walsum`, PostgreSQL 17+): `summarize_wal = on`,
    /// `autovacuum = off` (so that nothing but the benchmark's own change lands in an
    /// incremental backup).
    pub summarize_wal: bool,
    /// The directory of the client tools (`pgbench`) when `bin_dir` has only the server
    /// (the PostgreSQL 18 build of `scripts/install-postgres.sh`); `None`: `bin_dir`.
    pub client_bin_dir: Option<PathBuf>,
}

impl ClusterOptions {
    /// The cluster's directory name under the work directory.
    pub fn dir_name(&self, major: u32) -> String {
        let mut name = format!("pg{major}-scale-{}", self.scale);
        if self.random_text_pct > 0 {
            name.push_str(&format!("-text{}", self.random_text_pct));
        }
        if self.object_store {
            name.push_str("-objstore");
        }
        if self.summarize_wal {
            name.push_str("-walsum");
        }
        name
    }
}

/// A running source cluster.
#[derive(Debug)]
pub struct SourceCluster {
    /// The directory with the PostgreSQL binaries.
    pub bin_dir: PathBuf,
    /// `<work>/pg<major>-scale-<N>`.
    pub base: PathBuf,
    /// The data directory.
    pub data: PathBuf,
    /// The port the server listens on, on 127.0.0.1.
    pub port: u16,
    /// The pgbench scale.
    pub scale: u32,
    /// `postgres --version`.
    pub version: String,
    /// Random text share asked for, percent.
    pub random_text_pct: u32,
    /// The object-storage variant.
    pub object_store: bool,
    /// The incremental-backup variant (`summarize_wal = on`).
    pub summarize_wal: bool,
    /// The directory of `pgbench` (and the other client tools).
    pub client_bin_dir: PathBuf,
    user: Option<OsUser>,
    started_here: bool,
    runtime: tokio::runtime::Runtime,
}

fn run_ok(cmd: &mut Command, what: &str) -> Result<String> {
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

/// `postgres --version` of the binaries in `bin_dir`.
pub fn postgres_version(bin_dir: &Path) -> Result<String> {
    run_ok(
        Command::new(bin_dir.join("postgres")).arg("--version"),
        "postgres --version",
    )
    .map(|s| s.trim().to_string())
}

pub(crate) fn major_of(version: &str) -> u32 {
    version
        .split_once("(PostgreSQL)")
        .map(|(_, rest)| rest)
        .unwrap_or(version)
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap_or(0)
}

impl SourceCluster {
    /// Reuses the cluster for this scale if it is complete (starting it if needed), or
    /// builds it: initdb with data checksums, settings for replication over loopback,
    /// `pgbench -i`, a checkpoint. `log` receives progress lines.
    pub fn prepare(opts: &ClusterOptions, log: &dyn Fn(&str)) -> Result<SourceCluster> {
        let version = postgres_version(&opts.bin_dir)?;
        let major = major_of(&version);
        let base = opts.work_dir.join(opts.dir_name(major));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        let mut cluster = SourceCluster {
            client_bin_dir: opts
                .client_bin_dir
                .clone()
                .unwrap_or_else(|| opts.bin_dir.clone()),
            summarize_wal: opts.summarize_wal,
            bin_dir: opts.bin_dir.clone(),
            data: base.join("data"),
            base,
            port: opts.port,
            scale: opts.scale,
            version,
            random_text_pct: opts.random_text_pct,
            object_store: opts.object_store,
            user: server_user()?,
            started_here: false,
            runtime,
        };
        let ready = cluster.base.join("READY");
        if ready.is_file() {
            log(&format!(
                "reusing the source cluster at {}",
                cluster.data.display()
            ));
            if let Some(port) = cluster.running_port() {
                cluster.port = port;
                log(&format!("it is already running on port {port}"));
            } else {
                cluster.start()?;
            }
            return Ok(cluster);
        }
        cluster.build(log)?;
        std::fs::write(
            &ready,
            format!(
                "scale {}\nrandom text {} %\nobject store variant {}\nsummarize_wal {}\n",
                cluster.scale, cluster.random_text_pct, cluster.object_store, cluster.summarize_wal
            ),
        )
        .map_err(|e| format!("writing {}: {e}", ready.display()))?;
        Ok(cluster)
    }

    fn server_cmd(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(program));
        if let Some(user) = self.user {
            use std::os::unix::process::CommandExt;
            cmd.uid(user.uid).gid(user.gid);
        }
        cmd.current_dir("/")
            .env("LC_ALL", "C")
            .env("LANG", "C")
            .env_remove("PGDATA")
            .env_remove("PGPORT")
            .env_remove("PGHOST");
        cmd
    }

    fn give(&self, path: &Path) -> Result<()> {
        if let Some(user) = self.user {
            std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
                .map_err(|e| format!("chown {}: {e}", path.display()))?;
        }
        Ok(())
    }

    fn build(&mut self, log: &dyn Fn(&str)) -> Result<()> {
        if self.base.exists() {
            log(&format!(
                "removing the incomplete cluster at {}",
                self.base.display()
            ));
            if self.data.join("postmaster.pid").exists() {
                let _ = run_ok(
                    self.server_cmd("pg_ctl")
                        .arg("stop")
                        .arg("-D")
                        .arg(&self.data)
                        .args(["-m", "immediate", "-w"]),
                    "pg_ctl stop",
                );
            }
            std::fs::remove_dir_all(&self.base)
                .map_err(|e| format!("removing {}: {e}", self.base.display()))?;
        }
        std::fs::create_dir_all(&self.base)
            .map_err(|e| format!("creating {}: {e}", self.base.display()))?;
        self.give(&self.base)?;
        log(&format!(
            "initdb (data checksums on) at {}",
            self.data.display()
        ));
        run_ok(
            self.server_cmd("initdb")
                .arg("-D")
                .arg(&self.data)
                .args(["-k", "-U", "postgres", "-A", "trust", "-E", "UTF8"]),
            "initdb",
        )?;
        let conf = format!(
            "\n# pgrepl benches\nwal_level = replica\nmax_wal_senders = 10\n\
             max_replication_slots = 10\nlisten_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\nmax_wal_size = '16GB'\n\
             checkpoint_timeout = '1h'\nshared_buffers = '256MB'\nlogging_collector = off\n",
            self.base.display()
        );
        append(&self.data.join("postgresql.conf"), &conf)?;
        if self.object_store {
            // Peers archive WAL with archive_command (each run sets its own); no
            // autovacuum or recycled segments landing inside one tool's run.
            append(
                &self.data.join("postgresql.conf"),
                "archive_mode = on\narchive_command = '/bin/true'\nautovacuum = off\n\
                 wal_recycle = off\n",
            )?;
        }
        if self.summarize_wal {
            append(
                &self.data.join("postgresql.conf"),
                "summarize_wal = on\nautovacuum = off\n",
            )?;
        }
        std::fs::write(
            self.data.join("pg_hba.conf"),
            "local all all trust\nlocal replication all trust\n\
             host replication all 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 trust\n",
        )
        .map_err(|e| format!("writing pg_hba.conf: {e}"))?;
        self.start()?;
        log(&format!(
            "pgbench -i -s {} (about {} MB)",
            self.scale,
            self.scale * 15
        ));
        let started = std::time::Instant::now();
        run_ok(
            Command::new(self.client_bin_dir.join("pgbench"))
                .args(["-i", "-q", "-s", &self.scale.to_string()])
                .args(self.client_args())
                .arg("postgres"),
            "pgbench -i",
        )?;
        log(&format!(
            "pgbench -i took {:.1} s",
            started.elapsed().as_secs_f64()
        ));
        if self.random_text_pct > 0 {
            self.add_random_text(log)?;
        }
        self.sql("CHECKPOINT")?;
        Ok(())
    }

    /// Adds `bench_random_text` until it is about `random_text_pct` % of the database:
    /// rows of 1 KiB of base64 text of random bytes (48 MD5s of `random()`), below the
    /// TOAST threshold so they stay uncompressed in the heap. gzip gets such text to
    /// about 3/4, lz4 hardly at all.
    fn add_random_text(&self, log: &dyn Fn(&str)) -> Result<()> {
        let size = |sql: &str| -> Result<u64> {
            Ok(self
                .sql_value(sql)?
                .and_then(|v| v.parse().ok())
                .unwrap_or(0))
        };
        let base = size("SELECT pg_database_size('postgres')")?;
        let pct = u64::from(self.random_text_pct.min(95));
        let want = base * pct / (100 - pct);
        log(&format!(
            "adding about {:.0} MB of random text ({pct} % of the database)",
            want as f64 / 1e6
        ));
        let started = std::time::Instant::now();
        self.sql("CREATE TABLE bench_random_text (id bigint, body text NOT NULL)")?;
        let mut next = 0u64;
        loop {
            let have = size("SELECT pg_total_relation_size('bench_random_text')")?;
            if have >= want {
                break;
            }
            // About 1.2 kB per row on disk; at most 20000 rows per statement.
            let rows = ((want - have) / 1200).clamp(1, 20_000);
            self.sql(&format!(
                "INSERT INTO bench_random_text \
                 SELECT g, encode(decode((SELECT string_agg(md5(random()::text || i::text || g::text), '') \
                 FROM generate_series(1, 48) AS i), 'hex'), 'base64') \
                 FROM generate_series({}, {}) AS g",
                next + 1,
                next + rows
            ))?;
            next += rows;
        }
        log(&format!(
            "random text: {next} rows in {:.1} s",
            started.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    /// The port from `postmaster.pid` when a server is running on this data directory.
    fn running_port(&self) -> Option<u16> {
        let pid_file = std::fs::read_to_string(self.data.join("postmaster.pid")).ok()?;
        let mut lines = pid_file.lines();
        let pid: i32 = lines.next()?.trim().parse().ok()?;
        // SAFETY: signal 0 only checks that the process exists.
        if unsafe { libc::kill(pid, 0) } != 0 {
            return None;
        }
        lines.nth(2)?.trim().parse().ok()
    }

    fn start(&mut self) -> Result<()> {
        let log_file = self.base.join("server.log");
        run_ok(
            self.server_cmd("pg_ctl")
                .arg("start")
                .arg("-D")
                .arg(&self.data)
                .arg("-l")
                .arg(&log_file)
                .args(["-w", "-t", "120", "-o"])
                .arg(format!("-p {}", self.port)),
            "pg_ctl start",
        )
        .map_err(|e| format!("{e} (see {})", log_file.display()))?;
        self.started_here = true;
        Ok(())
    }

    /// Starts a server on a restored data directory `data` (a backup: it recovers to
    /// the end of its WAL and opens), listening on 127.0.0.1:`port`, with its log in
    /// `base`. The directory is handed to the server's OS user first. The server is
    /// stopped when the value is dropped.
    pub fn start_restored(
        bin_dir: &Path,
        base: &Path,
        data: &Path,
        port: u16,
    ) -> Result<SourceCluster> {
        let version = postgres_version(bin_dir)?;
        let user = server_user()?;
        if let Some(u) = user {
            run_ok(
                Command::new("chown")
                    .arg("-R")
                    .arg(format!("{}:{}", u.uid, u.gid))
                    .arg(data)
                    .arg(base),
                "chown -R (restored directory)",
            )?;
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        let mut server = SourceCluster {
            bin_dir: bin_dir.to_path_buf(),
            base: base.to_path_buf(),
            data: data.to_path_buf(),
            port,
            scale: 0,
            version,
            random_text_pct: 0,
            object_store: false,
            summarize_wal: false,
            client_bin_dir: bin_dir.to_path_buf(),
            user,
            started_here: false,
            runtime,
        };
        if let Err(e) = server.start() {
            // pg_ctl may have given up waiting on a server that did start: stop it on drop.
            server.started_here = true;
            return Err(e);
        }
        Ok(server)
    }

    /// Stops the server if this process started it.
    pub fn stop_if_started_here(&mut self) -> Result<()> {
        if !self.started_here {
            return Ok(());
        }
        self.started_here = false;
        run_ok(
            self.server_cmd("pg_ctl")
                .arg("stop")
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "fast", "-w"]),
            "pg_ctl stop",
        )
        .map(drop)
    }

    /// Leaves the server running when this value is dropped.
    pub fn keep_running(&mut self) {
        self.started_here = false;
    }

    /// `-h 127.0.0.1 -p PORT -U postgres`, for the PostgreSQL client tools.
    pub fn client_args(&self) -> Vec<String> {
        vec![
            "-h".into(),
            "127.0.0.1".into(),
            "-p".into(),
            self.port.to_string(),
            "-U".into(),
            "postgres".into(),
        ]
    }

    /// The libpq connection string for loopback TCP.
    pub fn conninfo(&self) -> String {
        format!("host=127.0.0.1 port={} user=postgres", self.port)
    }

    /// The connection settings for loopback TCP.
    pub fn config(&self) -> Result<Config> {
        Config::parse(&self.conninfo()).map_err(|e| format!("conninfo: {e}"))
    }

    /// Runs one SQL statement on database `postgres` and returns its last result set.
    pub fn sql(&self, sql: &str) -> Result<QueryResult> {
        let config = self.config()?;
        self.runtime.block_on(async {
            let mut client = SqlClient::connect(&config)
                .await
                .map_err(|e| format!("connecting: {e}"))?;
            let result = client.query(sql).await.map_err(|e| format!("{sql}: {e}"))?;
            let _ = client.close().await;
            Ok(result)
        })
    }

    /// Runs a query returning one value.
    pub fn sql_value(&self, sql: &str) -> Result<Option<String>> {
        let result = self.sql(sql)?;
        Ok(result
            .rows
            .into_iter()
            .next()
            .and_then(|row| row.into_iter().next())
            .flatten())
    }

    /// The tokio runtime the cluster's SQL helpers use, for other async work.
    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.runtime
    }

    /// The server's major version.
    pub fn major(&self) -> u32 {
        major_of(&self.version)
    }
}

impl Drop for SourceCluster {
    fn drop(&mut self) {
        let _ = self.stop_if_started_here();
    }
}

fn append(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| format!("appending to {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn variants_get_their_own_directory() {
        let mut opts = super::ClusterOptions {
            bin_dir: "/x".into(),
            work_dir: "/w".into(),
            scale: 10,
            port: 1,
            random_text_pct: 0,
            object_store: false,
            summarize_wal: false,
            client_bin_dir: None,
        };
        assert_eq!(opts.dir_name(15), "pg15-scale-10");
        opts.random_text_pct = 30;
        opts.object_store = true;
        assert_eq!(opts.dir_name(15), "pg15-scale-10-text30-objstore");
        opts.random_text_pct = 0;
        opts.object_store = false;
        opts.summarize_wal = true;
        assert_eq!(opts.dir_name(18), "pg18-scale-10-walsum");
    }

    #[test]
    fn reads_majors() {
        assert_eq!(
            super::major_of("postgres (PostgreSQL) 15.13 (Debian 15.13-0+deb12u1)"),
            15
        );
        assert_eq!(super::major_of("postgres (PostgreSQL) 18beta1"), 18);
    }
}
