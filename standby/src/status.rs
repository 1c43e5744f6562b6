//! `status`: the upstream's WAL position against the standby's receive and replay
//! positions, with the least privilege.
//!
//! The upstream is the server the standby streams from: the primary, or another
//! standby (cascading). Its position comes from a replication connection
//! (`IDENTIFY_SYSTEM`: the flush position on a primary, the greater of the receive and
//! replay positions on a standby), with SQL as the fallback. On the standby only what
//! a role with LOGIN can see is used: `pg_is_in_recovery()`,
//! `pg_last_wal_receive_lsn()`, `pg_last_wal_replay_lsn()`, and `pg_stat_wal_receiver`,
//! whose `pid` everybody sees but whose `status` needs `pg_read_all_stats` (or
//! `pg_monitor`). Without it, streaming is inferred and reported as such.

use std::time::{Duration, Instant};

use pgwire_repl::config::{Config, ReplicationMode};
use pgwire_repl::{Error, ErrorKind, Lsn, ReplicationClient, SqlClient};

/// How the upstream's position was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamSource {
    /// `IDENTIFY_SYSTEM` over a replication connection.
    Replication,
    /// SQL (`pg_current_wal_flush_lsn()`, or on a standby the greater of
    /// `pg_last_wal_receive_lsn()` and `pg_last_wal_replay_lsn()`), used when the
    /// replication connection failed.
    Sql,
}

impl UpstreamSource {
    /// `replication` or `sql`, for output.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamSource::Replication => "replication",
            UpstreamSource::Sql => "sql",
        }
    }
}

/// The upstream's WAL position and role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamPosition {
    /// The flush position on a primary; the greater of the receive and replay
    /// positions on a standby.
    pub lsn: Lsn,
    /// Whether the upstream is itself a standby (cascading); `None` when unknown (a
    /// replication connection to PostgreSQL 13, which does not report `in_hot_standby`).
    pub in_recovery: Option<bool>,
    /// How it was read.
    pub source: UpstreamSource,
}

/// One observation of an upstream and a standby that streams from it.
#[derive(Debug, Clone)]
pub struct Status {
    /// The upstream's WAL position (see [`UpstreamPosition::lsn`]).
    pub upstream_lsn: Lsn,
    /// Whether the upstream is itself a standby (cascading); `None` when unknown.
    pub upstream_in_recovery: Option<bool>,
    /// How the upstream's position was read.
    pub upstream_source: UpstreamSource,
    /// Whether the standby streams: its WAL receiver reports `streaming`, or (when that
    /// state is hidden from the role, see [`Status::streaming_inferred`]) a WAL
    /// receiver runs and has a receive position.
    pub streaming: bool,
    /// True when `streaming` was inferred because `pg_stat_wal_receiver.status` is not
    /// visible to the role (it needs `pg_read_all_stats`, e.g. through `pg_monitor`).
    pub streaming_inferred: bool,
    /// Whether a WAL receiver process runs on the standby (`pg_stat_wal_receiver` has
    /// a row; its `pid` is visible to every role).
    pub wal_receiver_running: bool,
    /// `pg_stat_wal_receiver.status` when visible (`streaming`, `waiting`, …).
    pub wal_receiver_status: Option<String>,
    /// The standby's last received (flushed) position.
    pub receive_lsn: Option<Lsn>,
    /// The standby's last replayed position.
    pub replay_lsn: Option<Lsn>,
}

impl Status {
    /// Bytes the standby has yet to receive.
    pub fn receive_lag(&self) -> Option<u64> {
        self.receive_lsn
            .map(|lsn| self.upstream_lsn.bytes_since(lsn).unwrap_or(0))
    }

    /// Bytes the standby has yet to replay.
    pub fn replay_lag(&self) -> Option<u64> {
        self.replay_lsn
            .map(|lsn| self.upstream_lsn.bytes_since(lsn).unwrap_or(0))
    }
}

/// The statement that lets `role` see the WAL receiver's exact state (and
/// `pg_stat_replication`'s details), for hints when streaming was inferred.
pub fn exact_state_grant(role: &str) -> String {
    format!("GRANT pg_monitor TO {};", quote_ident(role))
}

/// `name` as an SQL identifier: as is when it needs no quotes, else double-quoted.
pub fn quote_ident(name: &str) -> String {
    let plain = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$');
    // Reserved words that are plausible role names must be quoted too.
    const RESERVED: [&str; 8] = [
        "all",
        "user",
        "public",
        "group",
        "current_user",
        "session_user",
        "none",
        "role",
    ];
    if plain && !RESERVED.contains(&name) {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

fn sql_config(config: &Config) -> Config {
    let mut config = config.clone();
    config.replication = ReplicationMode::Off;
    config
}

fn parse_lsn(value: Option<String>) -> Option<Lsn> {
    value.and_then(|v| v.parse().ok())
}

/// `in_hot_standby` as reported at connection start (PostgreSQL 14+).
fn in_hot_standby(value: Option<&str>) -> Option<bool> {
    match value {
        Some("on") => Some(true),
        Some("off") => Some(false),
        _ => None,
    }
}

/// Reads the upstream's WAL position: over a replication connection, or over SQL when
/// that fails. Fails with the replication connection's error when both fail.
pub async fn upstream_position(upstream: &Config) -> Result<UpstreamPosition, Error> {
    let replication_error = match ReplicationClient::connect(upstream).await {
        Ok(mut client) => {
            let in_recovery = in_hot_standby(client.connection().parameter("in_hot_standby"));
            let identified = client.identify_system().await;
            let _ = client.close().await;
            match identified {
                Ok(id) => {
                    return Ok(UpstreamPosition {
                        lsn: id.xlog_pos,
                        in_recovery,
                        source: UpstreamSource::Replication,
                    })
                }
                Err(e) => e,
            }
        }
        Err(e) => e,
    };
    match upstream_position_sql(upstream).await {
        Ok(position) => Ok(position),
        Err(sql_error) => {
            let advice = format!(
                "{} (a SQL connection to read the position failed too: {})",
                replication_error
                    .advice()
                    .unwrap_or("check the upstream's log"),
                sql_error.message()
            );
            Err(replication_error.with_advice(advice))
        }
    }
}

async fn upstream_position_sql(upstream: &Config) -> Result<UpstreamPosition, Error> {
    let mut client = SqlClient::connect(&sql_config(upstream)).await?;
    let result = async {
        let in_recovery = client
            .query_value("SELECT pg_is_in_recovery()::text")
            .await?;
        let in_recovery = in_recovery.as_deref() == Some("true");
        let sql = if in_recovery {
            "SELECT greatest(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::text"
        } else {
            "SELECT pg_current_wal_flush_lsn()::text"
        };
        let lsn = parse_lsn(client.query_value(sql).await?)
            .ok_or_else(|| Error::protocol(format!("{sql} returned no LSN")))?;
        Ok(UpstreamPosition {
            lsn,
            in_recovery: Some(in_recovery),
            source: UpstreamSource::Sql,
        })
    }
    .await;
    let _ = client.close().await;
    result
}

/// The standby's side of an observation.
struct StandbySide {
    streaming: bool,
    streaming_inferred: bool,
    wal_receiver_running: bool,
    wal_receiver_status: Option<String>,
    receive_lsn: Option<Lsn>,
    replay_lsn: Option<Lsn>,
}

async fn observe_standby(standby: &Config) -> Result<StandbySide, Error> {
    let mut s = SqlClient::connect(&sql_config(standby)).await?;
    // pg_stat_wal_receiver has a row only while a WAL receiver runs; its pid is
    // visible to every role, its status only with pg_read_all_stats.
    let row = s
        .query(
            "SELECT pg_is_in_recovery()::text, pg_last_wal_receive_lsn()::text, \
             pg_last_wal_replay_lsn()::text, \
             (SELECT pid FROM pg_stat_wal_receiver)::text, \
             (SELECT status FROM pg_stat_wal_receiver)",
        )
        .await;
    let _ = s.close().await;
    let values = row?.rows.into_iter().next().unwrap_or_default();
    let value = |i: usize| values.get(i).cloned().flatten();
    if value(0).as_deref() != Some("true") {
        return Err(Error::usage(
            "the --standby server is not in recovery: it is a primary, not a standby",
            "point --standby at the standby, or re-clone it if it was promoted",
        ));
    }
    let receive_lsn = parse_lsn(value(1));
    let wal_receiver_running = value(3).is_some();
    let wal_receiver_status = value(4);
    let (streaming, streaming_inferred) = match &wal_receiver_status {
        Some(status) => (status == "streaming", false),
        None if wal_receiver_running => (receive_lsn.is_some(), true),
        None => (false, false),
    };
    Ok(StandbySide {
        streaming,
        streaming_inferred,
        wal_receiver_running,
        wal_receiver_status,
        receive_lsn,
        replay_lsn: parse_lsn(value(2)),
    })
}

/// Takes one observation: the upstream's position first, then the standby's.
pub async fn observe(upstream: &Config, standby: &Config) -> Result<Status, Error> {
    let position = upstream_position(upstream).await?;
    let side = observe_standby(standby).await?;
    Ok(Status {
        upstream_lsn: position.lsn,
        upstream_in_recovery: position.in_recovery,
        upstream_source: position.source,
        streaming: side.streaming,
        streaming_inferred: side.streaming_inferred,
        wal_receiver_running: side.wal_receiver_running,
        wal_receiver_status: side.wal_receiver_status,
        receive_lsn: side.receive_lsn,
        replay_lsn: side.replay_lsn,
    })
}

/// Polls until the standby streams (as reported, or inferred) and has replayed
/// everything the upstream had when waiting began, or until `timeout`.
///
/// `timeout_option` is the caller's option that sets `timeout` (e.g. `--timeout`), named
/// in the advice of the timeout error. A `standby` that is not in recovery fails at
/// once.
pub async fn wait_caught_up(
    upstream: &Config,
    standby: &Config,
    timeout: Duration,
    timeout_option: &str,
) -> Result<Status, Error> {
    let started = Instant::now();
    // The goal is fixed when waiting begins (or at the first observation, if the
    // upstream cannot be read yet), so a busy upstream cannot keep it out of reach.
    let mut goal = upstream_position(upstream).await.ok().map(|p| p.lsn);
    let mut last = None;
    loop {
        match observe(upstream, standby).await {
            Ok(status) => {
                let goal = *goal.get_or_insert(status.upstream_lsn);
                if status.streaming && status.replay_lsn.is_some_and(|replayed| replayed >= goal) {
                    return Ok(status);
                }
                last = Some(status);
            }
            Err(e) if e.kind() == ErrorKind::Usage => return Err(e),
            Err(e) if started.elapsed() >= timeout => return Err(e),
            Err(_) => {}
        }
        if started.elapsed() >= timeout {
            let goal = goal.map_or("unknown".to_string(), |g| g.to_string());
            let detail = match last {
                Some(s) => format!(
                    "goal {goal}, streaming={}{}, received {}, replayed {}",
                    s.streaming,
                    if s.streaming_inferred {
                        " (inferred)"
                    } else {
                        ""
                    },
                    s.receive_lsn.map_or("none".to_string(), |l| l.to_string()),
                    s.replay_lsn.map_or("none".to_string(), |l| l.to_string()),
                ),
                None => "no observation succeeded".into(),
            };
            return Err(Error::timeout(
                format!(
                    "the standby did not catch up within {} s ({detail})",
                    timeout.as_secs()
                ),
                format!(
                    "check the standby's log (primary_conninfo, pg_hba.conf on the upstream, network), or wait longer with {timeout_option}"
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_only_when_needed() {
        assert_eq!(quote_ident("repl"), "repl");
        assert_eq!(quote_ident("repl_2"), "repl_2");
        assert_eq!(quote_ident("Repl"), "\"Repl\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_ident("2x"), "\"2x\"");
        assert_eq!(quote_ident("user"), "\"user\"");
        assert_eq!(exact_state_grant("repl"), "GRANT pg_monitor TO repl;");
    }

    #[test]
    fn in_hot_standby_maps_on_off_and_absent() {
        assert_eq!(in_hot_standby(Some("on")), Some(true));
        assert_eq!(in_hot_standby(Some("off")), Some(false));
        assert_eq!(in_hot_standby(None), None);
    }
}
