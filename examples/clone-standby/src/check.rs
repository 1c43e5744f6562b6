//! `check`: can this primary serve a standby, and what risks does it run?
//!
//! The old recipe's "Master" section, done over the protocol: every problem comes with
//! the exact configuration line or SQL that fixes it.

use pgwire_repl::config::{Config, Host, ReplicationMode};
use pgwire_repl::connection::AuthMethod;
use pgwire_repl::{ReplicationClient, SqlClient};

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Fine.
    Ok,
    /// Works, but risky or not recommended.
    Warning,
    /// A clone would fail.
    Problem,
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Finding {
    /// Severity.
    pub level: Level,
    /// What was found.
    pub what: String,
    /// The line or statement that fixes it.
    pub fix: Option<String>,
}

impl Finding {
    fn ok(what: impl Into<String>) -> Finding {
        Finding {
            level: Level::Ok,
            what: what.into(),
            fix: None,
        }
    }
    fn warning(what: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding {
            level: Level::Warning,
            what: what.into(),
            fix: Some(fix.into()),
        }
    }
    fn problem(what: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding {
            level: Level::Problem,
            what: what.into(),
            fix: Some(fix.into()),
        }
    }
}

const SETTINGS: [&str; 9] = [
    "wal_level",
    "max_wal_senders",
    "max_replication_slots",
    "wal_keep_size",
    "fsync",
    "full_page_writes",
    "synchronous_commit",
    "data_checksums",
    "server_version",
];

/// Runs every check against `source` and returns the findings.
pub async fn check(source: &Config) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut settings: Vec<(String, String)> = Vec::new();

    match ReplicationClient::connect(source).await {
        Ok(mut repl) => {
            findings.push(Finding::ok(format!(
                "replication connection as {:?} works (the role has REPLICATION or is a superuser)",
                source.effective_user().unwrap_or_default()
            )));
            let connection = repl.connection();
            match connection.tls() {
                Some(tls) => findings.push(Finding::ok(format!("TLS in use: {} {}", tls.version, tls.cipher))),
                None => findings.push(Finding::warning(
                    "the connection does not use TLS: WAL and data cross the network in clear text",
                    "on the primary: ssl = on, ssl_cert_file, ssl_key_file in postgresql.conf, a hostssl pg_hba line; connect with sslmode=verify-full sslrootcert=<CA file>",
                )),
            }
            let over_network = source
                .targets()
                .iter()
                .any(|(host, _, _)| matches!(host, Host::Tcp(_)));
            if connection.auth_method() == AuthMethod::None && over_network {
                findings.push(Finding::warning(
                    "no password was asked for over the network (trust)",
                    "in pg_hba.conf use scram-sha-256 (or cert) instead of trust for replication lines, e.g. hostssl replication <user> <address> scram-sha-256",
                ));
            } else {
                findings.push(Finding::ok(format!(
                    "authentication: {:?}",
                    connection.auth_method()
                )));
            }
            for name in SETTINGS {
                if let Ok(value) = repl.show(name).await {
                    settings.push((name.to_string(), value));
                }
            }
            let _ = repl.close().await;
        }
        Err(error) => findings.push(Finding::problem(
            format!(
                "a replication connection fails: {}",
                message_with_server_text(&error)
            ),
            error.advice().unwrap_or("see the server log").to_string(),
        )),
    }

    // A SQL session tells how many senders are busy, and reads settings when the
    // replication connection failed.
    let mut sql_config = source.clone();
    sql_config.replication = ReplicationMode::Off;
    let mut senders_in_use = None;
    if let Ok(mut sql) = SqlClient::connect(&sql_config).await {
        if settings.is_empty() {
            for name in SETTINGS {
                if let Ok(Some(value)) = sql.query_value(&format!("SHOW {name}")).await {
                    settings.push((name.to_string(), value));
                }
            }
        }
        if let Ok(Some(count)) = sql
            .query_value("SELECT count(*) FROM pg_stat_replication")
            .await
        {
            senders_in_use = count.parse::<u32>().ok();
        }
        let _ = sql.close().await;
    }
    if settings.is_empty() {
        findings.push(Finding::problem(
            "cannot read the server's settings over a replication or a SQL connection",
            "fix the connection problem above first",
        ));
        return findings;
    }
    let get = |name: &str| {
        settings
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };

    if let Some(version) = get("server_version") {
        findings.push(Finding::ok(format!("server version {version}")));
    }
    match get("wal_level") {
        Some("minimal") => findings.push(Finding::problem(
            "wal_level = minimal: the server writes too little WAL for a standby",
            "ALTER SYSTEM SET wal_level = replica; ALTER SYSTEM SET max_wal_senders = 10; then restart the server",
        )),
        Some(level) => findings.push(Finding::ok(format!("wal_level = {level}"))),
        None => {}
    }
    if let Some(max) = get("max_wal_senders").and_then(|v| v.parse::<u32>().ok()) {
        let free = senders_in_use.map(|used| max.saturating_sub(used));
        let in_use = senders_in_use.map_or(String::new(), |used| format!(", {used} in use"));
        if max < 2 || free.is_some_and(|free| free < 2) {
            findings.push(Finding::problem(
                format!("max_wal_senders = {max}{in_use}: a clone with streamed WAL needs 2 free WAL senders"),
                "ALTER SYSTEM SET max_wal_senders = 10; then restart the server",
            ));
        } else {
            findings.push(Finding::ok(format!("max_wal_senders = {max}{in_use}")));
        }
    }
    if let Some(slots) = get("max_replication_slots").and_then(|v| v.parse::<u32>().ok()) {
        if slots == 0 {
            findings.push(Finding::problem(
                "max_replication_slots = 0: no slot (not even a temporary one) can keep the WAL the clone needs",
                "ALTER SYSTEM SET max_replication_slots = 10; then restart the server",
            ));
        } else {
            findings.push(Finding::ok(format!("max_replication_slots = {slots}")));
        }
    }
    match get("wal_keep_size") {
        Some(size) if size.starts_with('0') => findings.push(Finding::warning(
            "wal_keep_size = 0: without a replication slot a standby that falls behind needs WAL the primary has recycled",
            "clone with --slot NAME --create-slot (the standby then uses that slot), or ALTER SYSTEM SET wal_keep_size = '1GB'; SELECT pg_reload_conf();",
        )),
        Some(size) => findings.push(Finding::ok(format!("wal_keep_size = {size}"))),
        None => {}
    }
    if get("fsync") == Some("off") {
        findings.push(Finding::warning(
            "fsync = off: a crash of the primary can corrupt it beyond repair, and every standby cloned from it",
            "ALTER SYSTEM SET fsync = on; SELECT pg_reload_conf();",
        ));
    }
    if get("full_page_writes") == Some("off") {
        findings.push(Finding::warning(
            "full_page_writes = off: a crash can leave torn pages that WAL replay cannot repair",
            "ALTER SYSTEM SET full_page_writes = on; SELECT pg_reload_conf();",
        ));
    }
    if get("synchronous_commit") == Some("off") {
        findings.push(Finding::warning(
            "synchronous_commit = off: commits are acknowledged before they are on disk; a crash loses the last moments of transactions (without corruption)",
            "ALTER SYSTEM SET synchronous_commit = on; SELECT pg_reload_conf();  (or set it per transaction where the loss is acceptable)",
        ));
    }
    match get("data_checksums") {
        Some("off") => findings.push(Finding::warning(
            "data checksums are off: corrupted pages are copied to the standby undetected",
            "stop the server and run pg_checksums --enable -D <datadir> (or initdb --data-checksums for new clusters)",
        )),
        Some("on") => findings.push(Finding::ok("data checksums are on")),
        _ => {}
    }
    findings
}

/// The error's message followed by the server's own message, when it sent one.
fn message_with_server_text(error: &pgwire_repl::Error) -> String {
    match error.db_error() {
        Some(db) => format!("{}: {}", error.message(), db.message),
        None => error.message().to_string(),
    }
}
