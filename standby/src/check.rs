//! `check`: can this server (a primary, or a standby for a cascading standby) serve a
//! standby, and what risks does it run?
//!
//! The old recipe's "Master" section, done over the protocol: every problem comes with
//! the exact configuration line or SQL that fixes it, and every missing privilege with
//! the feature it costs and the `GRANT` that restores it.

use pgwire_repl::config::{Config, Host, ReplicationMode};
use pgwire_repl::connection::AuthMethod;
use pgwire_repl::{ReplicationClient, SqlClient};

use crate::status::quote_ident;

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Fine.
    Ok,
    /// Informational: everything works, with less detail or with a consequence worth
    /// knowing (a missing monitoring privilege, a standby as the source).
    Note,
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
    fn note(what: impl Into<String>, fix: Option<String>) -> Finding {
        Finding {
            level: Level::Note,
            what: what.into(),
            fix,
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

/// The outcome of [`report`]: the findings, and what the source is.
#[derive(Debug, Clone)]
pub struct Report {
    /// Every finding, in the order checked.
    pub findings: Vec<Finding>,
    /// Whether the source is a standby (in recovery), so that a clone from it is a
    /// cascading standby; `None` when it could not be told (PostgreSQL 13 without a
    /// SQL login).
    pub source_in_recovery: Option<bool>,
}

impl Report {
    /// The most serious level among the findings ([`Level::Ok`] when there are none).
    pub fn worst(&self) -> Level {
        self.findings
            .iter()
            .map(|f| f.level)
            .max()
            .unwrap_or(Level::Ok)
    }
}

/// Runs every check against `source` and returns the findings.
pub async fn check(source: &Config) -> Vec<Finding> {
    report(source).await.findings
}

/// Privileges of the connected role, from `pg_roles` and `pg_has_role`.
struct Privileges {
    role: String,
    superuser: bool,
    replication: bool,
    read_all_stats: bool,
    read_all_settings: bool,
}

async fn privileges(sql: &mut SqlClient) -> Option<Privileges> {
    let result = sql
        .query(
            "SELECT current_user::text, r.rolsuper::text, r.rolreplication::text, \
             pg_has_role(current_user, 'pg_read_all_stats', 'USAGE')::text, \
             pg_has_role(current_user, 'pg_read_all_settings', 'USAGE')::text \
             FROM pg_roles r WHERE r.rolname = current_user",
        )
        .await
        .ok()?;
    let row = result.rows.into_iter().next()?;
    let flag = |i: usize| row.get(i).cloned().flatten().as_deref() == Some("true");
    Some(Privileges {
        role: row.first().cloned().flatten()?,
        superuser: flag(1),
        replication: flag(2),
        read_all_stats: flag(3),
        read_all_settings: flag(4),
    })
}

/// Findings for each privilege the tool's features use.
fn privilege_findings(p: &Privileges, findings: &mut Vec<Finding>) {
    let role = quote_ident(&p.role);
    if p.superuser {
        findings.push(Finding::note(
            format!("role {role} is a superuser: every feature works (a role with LOGIN REPLICATION, plus pg_monitor for detail, is enough)"),
            None,
        ));
        return;
    }
    if !p.replication {
        findings.push(Finding::problem(
            format!("role {role} has no REPLICATION attribute: replication connections, and so the clone, fail"),
            format!("ALTER ROLE {role} REPLICATION;"),
        ));
    }
    if p.read_all_stats {
        findings.push(Finding::ok(format!(
            "role {role} has the privileges of pg_read_all_stats: the WAL receiver's exact state and pg_stat_replication's details are visible"
        )));
    } else {
        findings.push(Finding::note(
            format!("role {role} lacks pg_read_all_stats (e.g. through pg_monitor): `status` and `clone --start` still work, but infer streaming from a running WAL receiver and its receive position instead of reading its exact state, and pg_stat_replication shows no details"),
            Some(format!("GRANT pg_monitor TO {role};")),
        ));
    }
    if p.read_all_settings {
        findings.push(Finding::ok(format!(
            "role {role} has the privileges of pg_read_all_settings: clone reads data_directory to refuse a target inside it"
        )));
    } else {
        findings.push(Finding::note(
            format!("role {role} lacks pg_read_all_settings: SHOW data_directory is refused, so clone cannot refuse a target inside the source's data directory by its path (it still checks the file system)"),
            Some(format!("GRANT pg_read_all_settings TO {role};  (or GRANT pg_monitor TO {role};)")),
        ));
    }
}

/// The finding for a SQL login that fails, with the fix that fits the error.
fn sql_login_finding(source: &Config, error: &pgwire_repl::Error) -> Finding {
    let database = source.dbname.clone().unwrap_or_else(|| "postgres".into());
    let role = quote_ident(&source.effective_user().unwrap_or_else(|_| "<role>".into()));
    let general = format!(
        "allow the role a SQL login: a pg_hba.conf line for database {database} (e.g. host {database} {role} <address> scram-sha-256), then SELECT pg_reload_conf(); and GRANT CONNECT ON DATABASE {} TO {role};",
        quote_ident(&database)
    );
    let server_message = error.db_error().map_or("", |db| db.message.as_str());
    let fix = match error.sqlstate() {
        Some("28000") if server_message.contains("no pg_hba.conf entry") => {
            // The server names the client's address, or [local] for a Unix socket.
            let line = match server_message
                .split_once("host \"")
                .and_then(|(_, rest)| rest.split_once('"'))
                .map(|(host, _)| host)
            {
                Some(address) if address != "[local]" => {
                    let mask = if address.contains(':') { "128" } else { "32" };
                    format!("host  {database}  {role}  {address}/{mask}  scram-sha-256")
                }
                _ => format!("local  {database}  {role}  scram-sha-256"),
            };
            format!("add this line to the server's pg_hba.conf, then reload with `SELECT pg_reload_conf();`:\n    {line}")
        }
        Some("28000") => error.advice().map_or(general.clone(), |a| a.to_string()),
        Some("42501") => format!(
            "GRANT CONNECT ON DATABASE {} TO {role};",
            quote_ident(&database)
        ),
        Some("3D000") => {
            "name an existing database in the connection string (dbname=postgres)".to_string()
        }
        _ => general,
    };
    Finding::warning(
        format!(
            "a SQL login to database {database} fails: {}. `status` and `clone --start` log in to the standby (which has this server's pg_hba.conf and roles) to read its positions; the role's privileges could not be checked either",
            message_with_server_text(error)
        ),
        fix,
    )
}

/// Runs every check against `source` and returns the findings, with whether the
/// source is a standby.
pub async fn report(source: &Config) -> Report {
    let mut findings = Vec::new();
    let mut settings: Vec<(String, String)> = Vec::new();
    let mut in_recovery = None;

    match ReplicationClient::connect(source).await {
        Ok(mut repl) => {
            // Reported at connection start by PostgreSQL 14+.
            in_recovery = match repl.connection().parameter("in_hot_standby") {
                Some("on") => Some(true),
                Some("off") => Some(false),
                _ => None,
            };
            findings.push(Finding::ok(format!(
                "replication connection as {:?} works (the role has REPLICATION or is a superuser)",
                source.effective_user().unwrap_or_default()
            )));
            let connection = repl.connection();
            let over_network = source
                .targets()
                .iter()
                .any(|(host, _, _)| matches!(host, Host::Tcp(_)));
            match connection.tls() {
                Some(tls) => findings.push(Finding::ok(format!("TLS in use: {} {}", tls.version, tls.cipher))),
                None if !over_network => findings.push(Finding::ok(
                    "connected over a Unix socket: nothing crosses the network, TLS is not needed",
                )),
                None => findings.push(Finding::warning(
                    "the connection does not use TLS: WAL and data cross the network in clear text",
                    "on the server: ssl = on, ssl_cert_file, ssl_key_file in postgresql.conf, a hostssl pg_hba line; connect with sslmode=verify-full sslrootcert=<CA file>",
                )),
            }
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

    // A SQL session tells how many senders are busy, whether the server is in
    // recovery, the role's privileges, and reads settings when the replication
    // connection failed.
    let mut sql_config = source.clone();
    sql_config.replication = ReplicationMode::Off;
    let mut senders_in_use = None;
    match SqlClient::connect(&sql_config).await {
        Ok(mut sql) => {
            findings.push(Finding::ok(format!(
                "a SQL login to database {} works (`status` and `clone --start` log in to the standby, which has this server's pg_hba.conf and roles)",
                sql_config.dbname.as_deref().unwrap_or("postgres")
            )));
            if let Ok(Some(value)) = sql.query_value("SELECT pg_is_in_recovery()::text").await {
                in_recovery = Some(value == "true");
            }
            if let Some(p) = privileges(&mut sql).await {
                privilege_findings(&p, &mut findings);
            }
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
        Err(error) => findings.push(sql_login_finding(source, &error)),
    }
    if in_recovery == Some(true) {
        findings.push(Finding::note(
            "this server is a standby (in recovery): cascading works, a clone from it streams from this standby rather than from the primary; the new standby can fall behind this upstream as well as the primary (it gets only the WAL this standby has received) and follows its upstream's timeline",
            None,
        ));
    }
    if settings.is_empty() {
        findings.push(Finding::problem(
            "cannot read the server's settings over a replication or a SQL connection",
            "fix the connection problem above first",
        ));
        return Report {
            findings,
            source_in_recovery: in_recovery,
        };
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
    Report {
        findings,
        source_in_recovery: in_recovery,
    }
}

/// The error's message followed by the server's own message, when it sent one.
fn message_with_server_text(error: &pgwire_repl::Error) -> String {
    match error.db_error() {
        Some(db) => format!("{}: {}", error.message(), db.message),
        None => error.message().to_string(),
    }
}
