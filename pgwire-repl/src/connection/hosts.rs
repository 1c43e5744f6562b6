//! The host list, as libpq walks it: hosts in order (or shuffled with
//! `load_balance_hosts=random`), every address of each host, the `sslmode` retries of
//! `allow` and `prefer`, and the `target_session_attrs` check, with the failures of
//! every host summed up in one error when none qualifies.

use super::encryption::{self, Encryption};
use super::socket::{self, describe, describe_address, Address};
use super::{establish, ConnectOptions, Connection};
use crate::config::{Config, Host, LoadBalanceHosts, ReplicationMode, TargetSessionAttrs};
use crate::error::{Error, ErrorKind, Result};
use crate::proto::backend::BackendMessage;
use crate::proto::frontend;

/// Tries the hosts of `config` as libpq does; see [`Connection::connect`].
pub(super) async fn connect_hosts(
    config: &Config,
    replication: ReplicationMode,
    options: &ConnectOptions,
) -> Result<Connection> {
    let mut targets = config.targets();
    let mut shuffler = match config.load_balance_hosts {
        LoadBalanceHosts::Random => Some(Shuffler::new()),
        LoadBalanceHosts::Disable => None,
    };
    if let Some(shuffler) = shuffler.as_mut() {
        shuffler.shuffle(&mut targets);
    }
    let passes: Vec<TargetSessionAttrs> = match config.target_session_attrs {
        TargetSessionAttrs::PreferStandby => {
            vec![TargetSessionAttrs::PreferStandby, TargetSessionAttrs::Any]
        }
        other => vec![other],
    };
    let mut failures: Vec<Failure> = Vec::new();
    for wanted in passes {
        for (host, host_addr, port) in &targets {
            let result = connect_target(
                config,
                replication,
                options,
                host,
                host_addr.as_deref(),
                *port,
                wanted,
                shuffler.as_mut(),
                &mut failures,
            )
            .await;
            match result {
                Ok(connection) => return Ok(connection),
                Err(Attempt::Next(error)) => {
                    tracing::debug!(target = %describe(host, *port), error = %error, "connection attempt failed; trying the next host");
                    failures.push(Failure {
                        target: describe(host, *port),
                        error,
                        wrong_kind: false,
                    });
                }
                Err(Attempt::WrongKind(error)) => {
                    tracing::debug!(target = %describe(host, *port), error = %error, "server of the wrong kind; trying the next host");
                    failures.push(Failure {
                        target: describe(host, *port),
                        error,
                        wrong_kind: true,
                    });
                }
                Err(Attempt::Final(error)) => {
                    return Err(combine_failures(config, failures, Some(error)))
                }
            }
        }
    }
    Err(combine_failures(config, failures, None))
}

/// How a connection attempt to one host ended, when it did not succeed.
pub(super) enum Attempt {
    /// Try the next host (libpq's `try_next_host`).
    Next(Error),
    /// The server is not of the kind `target_session_attrs` asks for: try the next host.
    WrongKind(Error),
    /// Give up on every host (libpq's `error_return`).
    Final(Error),
}

impl Attempt {
    /// The error, when there is no other host to try.
    pub(super) fn into_error(self) -> Error {
        match self {
            Attempt::Next(error) | Attempt::WrongKind(error) | Attempt::Final(error) => error,
        }
    }
}

/// Tries every address of one host, as libpq does for one `connhost` entry. Every
/// unreachable address but the last is added to `failures` (libpq reports each
/// address); the last one is the host's own result.
#[allow(clippy::too_many_arguments)]
async fn connect_target(
    config: &Config,
    replication: ReplicationMode,
    options: &ConnectOptions,
    host: &Host,
    host_addr: Option<&str>,
    port: u16,
    wanted: TargetSessionAttrs,
    shuffler: Option<&mut Shuffler>,
    failures: &mut Vec<Failure>,
) -> std::result::Result<Connection, Attempt> {
    let target = describe(host, port);
    let mut addresses = socket::resolve(host, host_addr, port)
        .await
        .map_err(Attempt::Next)?;
    if let Some(shuffler) = shuffler {
        shuffler.shuffle(&mut addresses);
    }
    let mut last_error = None;
    for address in &addresses {
        let attempt = connect_address(config, replication, options, host, address, port, wanted);
        let result = match config.connect_timeout {
            Some(limit) => match tokio::time::timeout(limit, attempt).await {
                Ok(result) => result,
                // libpq gives up on this address and tries the next one.
                Err(_) => Err(AddressAttempt::Unreachable(Error::timeout(
                    format!("connecting to {target}{} did not finish within connect_timeout ({} s)", describe_address(host, address), limit.as_secs()),
                    "check that the server is up and reachable (host, port, firewall); raise connect_timeout for slow links",
                ))),
            },
            None => attempt.await,
        };
        match result {
            Ok(mut connection) => {
                connection.host_addr = host_addr.map(str::to_string);
                return Ok(connection);
            }
            Err(AddressAttempt::Unreachable(error)) => {
                tracing::debug!(target = %target, address = ?address, error = %error, "address unreachable");
                if let Some(earlier) = last_error.replace(error) {
                    failures.push(Failure {
                        target: target.clone(),
                        error: earlier,
                        wrong_kind: false,
                    });
                }
            }
            Err(AddressAttempt::Host(attempt)) => return Err(attempt),
        }
    }
    Err(Attempt::Next(last_error.unwrap_or_else(|| {
        Error::config(
            format!("no address to connect to for {target}"),
            "check host and hostaddr",
        )
    })))
}

/// How an attempt at one address ended, when it did not succeed.
enum AddressAttempt {
    /// The address could not be reached: try the next one.
    Unreachable(Error),
    /// Decided for the whole host.
    Host(Attempt),
}

/// Connects to one address: encryption as `sslmode` says (retrying the other way for
/// `allow` and `prefer`), authentication, then the `target_session_attrs` check.
#[allow(clippy::too_many_arguments)]
async fn connect_address(
    config: &Config,
    replication: ReplicationMode,
    options: &ConnectOptions,
    host: &Host,
    address: &Address,
    port: u16,
    wanted: TargetSessionAttrs,
) -> std::result::Result<Connection, AddressAttempt> {
    let plan: &[Encryption] = encryption::plan(config, host);
    let mut first_error: Option<Error> = None;
    for (index, &encryption) in plan.iter().enumerate() {
        let stream = socket::open(config, host, address, port)
            .await
            .map_err(AddressAttempt::Unreachable)?;
        match establish(config, replication, options, host, port, stream, encryption).await {
            Ok(connection) => {
                return check_session(connection, wanted)
                    .await
                    .map_err(AddressAttempt::Host)
            }
            Err(error) => {
                if error.sqlstate() == Some(CANNOT_CONNECT_NOW) {
                    // "the database system is starting up" and the like: libpq moves on
                    // to the next host (not the next address or encryption).
                    return Err(AddressAttempt::Host(Attempt::Next(error)));
                }
                let retryable = index + 1 < plan.len() && may_retry_with_other_encryption(&error);
                if !retryable {
                    // Report the first attempt's error: it is the one the user asked for.
                    return Err(AddressAttempt::Host(Attempt::Final(
                        first_error.unwrap_or(error),
                    )));
                }
                tracing::debug!(error = %error, "retrying with the other sslmode choice");
                first_error.get_or_insert(error);
            }
        }
    }
    Err(AddressAttempt::Host(Attempt::Final(
        first_error
            .unwrap_or_else(|| Error::usage("empty connection plan", "report this as a bug")),
    )))
}

/// SQLSTATE 57P03, `cannot_connect_now`.
const CANNOT_CONNECT_NOW: &str = "57P03";

/// Checks `target_session_attrs` on a new connection as libpq's
/// `CONNECTION_CHECK_TARGET` state does; a server of the wrong kind is closed politely
/// and the next host is tried.
pub(super) async fn check_session(
    mut connection: Connection,
    wanted: TargetSessionAttrs,
) -> std::result::Result<Connection, Attempt> {
    let target = connection.target.clone();
    let reported = |name: &str| connection.parameter(name).map(|value| value == "on");
    let mismatch = match wanted {
        TargetSessionAttrs::Any => None,
        TargetSessionAttrs::ReadWrite | TargetSessionAttrs::ReadOnly => {
            let read_only = match (
                reported("default_transaction_read_only"),
                reported("in_hot_standby"),
            ) {
                (Some(read_only), Some(hot_standby)) => read_only || hot_standby,
                _ => {
                    let sql = "SHOW transaction_read_only";
                    match session_probe(&mut connection, sql, sql).await? {
                        Ok(value) => value.starts_with("on"),
                        Err(error) => return Err(Attempt::Next(error)),
                    }
                }
            };
            match (wanted, read_only) {
                (TargetSessionAttrs::ReadWrite, true) => Some("session is read-only"),
                (TargetSessionAttrs::ReadOnly, false) => Some("session is not read-only"),
                _ => None,
            }
        }
        TargetSessionAttrs::Primary
        | TargetSessionAttrs::Standby
        | TargetSessionAttrs::PreferStandby => {
            let hot_standby = match reported("in_hot_standby") {
                Some(hot_standby) => hot_standby,
                None => {
                    let sql = "SELECT pg_catalog.pg_is_in_recovery()";
                    match session_probe(&mut connection, sql, "SELECT pg_is_in_recovery()").await? {
                        Ok(value) => value.starts_with('t'),
                        Err(error) => return Err(Attempt::Next(error)),
                    }
                }
            };
            match (wanted, hot_standby) {
                (TargetSessionAttrs::Primary, true) => Some("server is in hot standby mode"),
                (TargetSessionAttrs::Primary, false) => None,
                (_, false) => Some("server is not in hot standby mode"),
                (_, true) => None,
            }
        }
    };
    let Some(reason) = mismatch else {
        return Ok(connection);
    };
    // Close politely, then try the next host.
    let _ = connection.close().await;
    Err(Attempt::WrongKind(Error::config(
        format!("{target}: {reason}"),
        format!(
            "target_session_attrs={} skips a server of this kind; list a host that qualifies, or change target_session_attrs",
            wanted.as_str()
        ),
    )))
}

/// Runs one of libpq's target-checking queries: the outer error ends the whole attempt
/// (the connection broke), the inner one skips the host (the query failed).
async fn session_probe(
    connection: &mut Connection,
    sql: &str,
    shown: &str,
) -> std::result::Result<std::result::Result<String, Error>, Attempt> {
    let target = connection.target.clone();
    let replication = connection.replication;
    let major = connection.server_major;
    let result = probe_value(connection, sql).await.map_err(Attempt::Final)?;
    let failure = match result {
        Ok(Some(value)) => return Ok(Ok(value)),
        Ok(None) => format!("\"{shown}\" failed on {target}: it did not return one value"),
        Err(db) => format!("\"{shown}\" failed on {target}: {db}"),
    };
    let advice = if replication == ReplicationMode::Physical {
        format!(
            "PostgreSQL {major} does not report in_hot_standby, and a physical replication connection cannot run SQL, so primary, standby and prefer-standby cannot be checked on this server (libpq fails the same way); use target_session_attrs=read-write (checked with SHOW, which replication connections allow), list only the wanted host, or upgrade the server to PostgreSQL 14 or later"
        )
    } else {
        "check that the role can run this query on that server, and the server's log".to_string()
    };
    Ok(Err(Error::config(failure, advice)))
}

/// Sends one simple query and returns the first value of its one row: `Ok(Err(db))`
/// when the server answered with an error, `Ok(Ok(None))` for any other shape.
async fn probe_value(
    connection: &mut Connection,
    sql: &str,
) -> Result<std::result::Result<Option<String>, crate::error::DbError>> {
    frontend::query(sql, connection.write_buf())?;
    connection.flush().await?;
    let mut rows: Vec<Option<String>> = Vec::new();
    let mut error = None;
    loop {
        match connection.read_message().await? {
            BackendMessage::DataRow(values) => rows.push(
                values
                    .into_iter()
                    .next()
                    .flatten()
                    .map(|value| String::from_utf8_lossy(&value).into_owned()),
            ),
            BackendMessage::ErrorResponse(db) => error = Some(db),
            BackendMessage::ReadyForQuery { .. } => break,
            BackendMessage::RowDescription(_)
            | BackendMessage::CommandComplete { .. }
            | BackendMessage::EmptyQueryResponse => {}
            other => {
                return Err(Error::protocol(format!(
                    "unexpected {} in reply to {sql:?}",
                    other.name()
                )))
            }
        }
    }
    Ok(match error {
        Some(db) => Err(db),
        None if rows.len() == 1 => Ok(rows.into_iter().next().flatten()),
        None => Ok(None),
    })
}

/// A host that was tried and skipped.
struct Failure {
    target: String,
    error: Error,
    /// Skipped for `target_session_attrs` (the server works, but is of the wrong kind).
    wrong_kind: bool,
}

/// Puts the failures of several hosts into one error, as libpq lists every host's:
/// one line per failed host (and per address of a host), each with its own error, and
/// the advice of every kind of failure with the hosts it applies to.
fn combine_failures(config: &Config, mut failures: Vec<Failure>, last: Option<Error>) -> Error {
    if let Some(last) = last {
        if failures.is_empty() {
            return last;
        }
        failures.push(Failure {
            target: String::new(),
            error: last,
            wrong_kind: false,
        });
    }
    if failures.len() <= 1 {
        return failures
            .pop()
            .map(|failure| failure.error)
            .unwrap_or_else(|| Error::config("no host to connect to", "set host (or PGHOST)"));
    }
    let lines: Vec<String> = failures
        .iter()
        .map(|failure| {
            let text = failure.error.without_advice();
            if failure.target.is_empty() || text.contains(failure.target.as_str()) {
                format!("  {text}")
            } else {
                format!("  {}: {text}", failure.target)
            }
        })
        .collect();
    let attrs = match config.target_session_attrs {
        TargetSessionAttrs::Any => String::new(),
        other => format!(" with target_session_attrs={}", other.as_str()),
    };
    let message = format!(
        "could not connect to any host{attrs} ({} attempts):\n{}",
        failures.len(),
        lines.join("\n")
    );
    // The kind, SQLSTATE and retryability of the last real failure; if every server
    // worked but was of the wrong kind, say so.
    let decisive = failures.iter().rev().find(|failure| !failure.wrong_kind);
    match decisive {
        Some(failure) => Error::from_parts(
            failure.error.kind(),
            message,
            Some(combined_advice(&failures)),
        )
        .with_db_of(&failure.error),
        None => Error::from_parts(
            ErrorKind::Config,
            message,
            Some(format!(
                "no host qualified for target_session_attrs={}; check which server is the primary now (SELECT pg_is_in_recovery() on each), list it in host, or change target_session_attrs",
                config.target_session_attrs.as_str()
            )),
        ),
    }
}

/// The advice of each failure, once per distinct advice, naming the hosts it is for
/// (a down server and a standby skipped for `target_session_attrs` need different
/// fixes, and the first one alone would hide the second).
fn combined_advice(failures: &[Failure]) -> String {
    let mut groups: Vec<(&str, Vec<&str>)> = Vec::new();
    for failure in failures {
        let Some(advice) = failure.error.advice() else {
            continue;
        };
        let target = failure.target.as_str();
        match groups.iter_mut().find(|(text, _)| *text == advice) {
            Some((_, targets)) => {
                if !target.is_empty() && !targets.contains(&target) {
                    targets.push(target);
                }
            }
            None => groups.push((
                advice,
                [target].into_iter().filter(|t| !t.is_empty()).collect(),
            )),
        }
    }
    if let [(advice, _)] = groups.as_slice() {
        return advice.to_string();
    }
    groups
        .iter()
        .map(|(advice, targets)| match targets.as_slice() {
            [] => advice.to_string(),
            targets => format!("for {}: {advice}", targets.join(", ")),
        })
        .collect::<Vec<_>>()
        .join("\n  ")
}

/// A small pseudo-random generator for `load_balance_hosts=random` (libpq uses its own
/// PRNG for this too): seeded from the standard library's per-process random hash keys
/// and the clock, so every connection gets a new order.
struct Shuffler(u64);

impl Shuffler {
    fn new() -> Shuffler {
        use std::hash::{BuildHasher, Hasher};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        hasher.write_u128(nanos);
        Shuffler(hasher.finish())
    }

    /// splitmix64.
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `0..=max`.
    fn up_to(&mut self, max: usize) -> usize {
        let span = max as u64 + 1;
        (self.next() % span) as usize
    }

    /// The "inside-out" Fisher-Yates shuffle libpq uses.
    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in 1..items.len() {
            let j = self.up_to(i);
            items.swap(i, j);
        }
    }
}

/// libpq's allow/prefer retry the other way after a TLS failure or a server rejection.
fn may_retry_with_other_encryption(error: &Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::Tls | ErrorKind::Server | ErrorKind::Io
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn the_shuffle_reaches_every_order() {
        // Every one of the 6 orders of 3 hosts comes up, each roughly equally often.
        let mut counts = HashMap::new();
        for _ in 0..6000 {
            let mut items = [1, 2, 3];
            Shuffler::new().shuffle(&mut items);
            *counts.entry(items).or_insert(0u32) += 1;
        }
        assert_eq!(counts.len(), 6, "{counts:?}");
        assert!(
            counts.values().all(|&n| (700..1300).contains(&n)),
            "{counts:?}"
        );
        let mut one = [7];
        Shuffler::new().shuffle(&mut one);
        let mut none: [u8; 0] = [];
        Shuffler::new().shuffle(&mut none);
        assert_eq!(one, [7]);
    }
}
