//! `status`: the old recipe's check — the primary's `pg_current_wal_lsn()` against the
//! standby's receive and replay positions.

use std::time::{Duration, Instant};

use pgwire_repl::config::{Config, ReplicationMode};
use pgwire_repl::{Error, Lsn, SqlClient};

/// One observation of a primary and its standby.
#[derive(Debug, Clone)]
pub struct Status {
    /// The primary's current WAL write position.
    pub primary_lsn: Lsn,
    /// Whether the standby's WAL receiver reports `streaming`.
    pub streaming: bool,
    /// The standby's last received (flushed) position.
    pub receive_lsn: Option<Lsn>,
    /// The standby's last replayed position.
    pub replay_lsn: Option<Lsn>,
}

impl Status {
    /// Bytes the standby has yet to receive.
    pub fn receive_lag(&self) -> Option<u64> {
        self.receive_lsn
            .map(|lsn| self.primary_lsn.bytes_since(lsn).unwrap_or(0))
    }

    /// Bytes the standby has yet to replay.
    pub fn replay_lag(&self) -> Option<u64> {
        self.replay_lsn
            .map(|lsn| self.primary_lsn.bytes_since(lsn).unwrap_or(0))
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

/// Takes one observation.
pub async fn observe(primary: &Config, standby: &Config) -> Result<Status, Error> {
    let mut p = SqlClient::connect(&sql_config(primary)).await?;
    let row = p
        .query("SELECT pg_is_in_recovery()::text, pg_current_wal_lsn()::text")
        .await;
    // pg_current_wal_lsn() fails on a server in recovery.
    let row = row.map_err(|e| {
        e.with_advice("--primary must be the primary: pg_current_wal_lsn() fails on a standby")
    })?;
    let primary_lsn = row
        .rows
        .first()
        .and_then(|r| parse_lsn(r.get(1).cloned().flatten()))
        .ok_or_else(|| Error::protocol("pg_current_wal_lsn() returned no LSN"))?;
    let _ = p.close().await;

    let mut s = SqlClient::connect(&sql_config(standby)).await?;
    let row = s
        .query(
            "SELECT pg_is_in_recovery()::text, pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text, \
             (SELECT status FROM pg_stat_wal_receiver)",
        )
        .await?;
    let _ = s.close().await;
    let values = row.rows.into_iter().next().unwrap_or_default();
    let value = |i: usize| values.get(i).cloned().flatten();
    let in_recovery = value(0).as_deref() == Some("true");
    if !in_recovery {
        return Err(Error::usage(
            "the --standby server is not in recovery: it is a primary, not a standby",
            "point --standby at the standby, or re-clone it if it was promoted",
        ));
    }
    Ok(Status {
        primary_lsn,
        streaming: value(3).as_deref() == Some("streaming"),
        receive_lsn: parse_lsn(value(1)),
        replay_lsn: parse_lsn(value(2)),
    })
}

/// Polls until the standby streams and has replayed everything the primary had written
/// when waiting began, or until `timeout`.
pub async fn wait_caught_up(
    primary: &Config,
    standby: &Config,
    timeout: Duration,
) -> Result<Status, Error> {
    let started = Instant::now();
    let target = observe(primary, standby).await.map(|s| s.primary_lsn);
    let mut last = None;
    loop {
        match observe(primary, standby).await {
            Ok(status) => {
                let goal = match &target {
                    Ok(lsn) => *lsn,
                    Err(_) => status.primary_lsn,
                };
                if status.streaming && status.replay_lsn.is_some_and(|replayed| replayed >= goal) {
                    return Ok(status);
                }
                last = Some(status);
            }
            Err(e) if started.elapsed() >= timeout => return Err(e),
            Err(_) => {}
        }
        if started.elapsed() >= timeout {
            let detail = match last {
                Some(s) => format!(
                    "streaming={}, receive lag {:?} bytes, replay lag {:?} bytes",
                    s.streaming,
                    s.receive_lag(),
                    s.replay_lag()
                ),
                None => "no observation succeeded".into(),
            };
            return Err(Error::timeout(
                format!("the standby did not catch up within {} s ({detail})", timeout.as_secs()),
                "check the standby's log (primary_conninfo, pg_hba on the primary, network), or wait longer with --timeout",
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
