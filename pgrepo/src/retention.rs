//! Retention: deleting old backups, then the WAL no remaining backup needs (the rules of
//! `LAYOUT.md`, "Retention").
//!
//! - A backup is kept when it is among the newest `N` ([`RetentionRule::Retain`]) or
//!   started at or after a time ([`RetentionRule::Before`]), or is the parent of a kept
//!   backup (transitively). Every other committed backup is deleted whole, its commit
//!   record first, so it stops existing before any of its data goes.
//! - WAL segments and partial pieces of every timeline whose segment number is below
//!   the start segment of the oldest kept backup are deleted after the backups. History
//!   files and `wal/archive.json` are kept. With no committed backup left, no WAL is
//!   deleted.
//! - Labels without a commit record are not backups and are not touched.

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;

use crate::error::{Error, Result};
use crate::layout::Timestamp;
use crate::repository::Repository;
use crate::walnames::{self, WalObject};

/// Which backups to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetentionRule {
    /// The newest `N` (at least 1).
    Retain(usize),
    /// Those started at or after this time.
    Before(Timestamp),
}

/// What retention deletes, computed without changing anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionPlan {
    /// Labels of the backups kept, oldest first.
    pub keep: Vec<String>,
    /// Labels of the backups deleted, oldest first.
    pub delete: Vec<String>,
    /// WAL below this segment number (every timeline) is deleted; `None`: no WAL is.
    pub wal_below_segment: Option<u64>,
    /// The WAL segment name of that bound on the oldest kept backup's timeline.
    pub wal_below_name: Option<String>,
    /// The WAL objects deleted, relative to the repository (`wal/<TLI>/<name>`).
    pub wal_objects: Vec<String>,
}

/// What [`apply_retention`] deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionSummary {
    /// Backups deleted.
    pub backups_deleted: usize,
    /// Objects of those backups deleted.
    pub backup_objects_deleted: usize,
    /// WAL objects deleted.
    pub wal_objects_deleted: usize,
}

/// Parses a time for [`RetentionRule::Before`]: RFC 3339, or the label form
/// `20261130T101500Z` (UTC).
///
/// ```
/// let a = pgrepo::retention::parse_time("2026-11-30T10:15:00Z").unwrap();
/// let b = pgrepo::retention::parse_time("20261130T101500Z").unwrap();
/// assert_eq!(a, b);
/// assert!(pgrepo::retention::parse_time("yesterday").is_err());
/// ```
pub fn parse_time(text: &str) -> Result<Timestamp> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    chrono::NaiveDateTime::parse_from_str(text, "%Y%m%dT%H%M%SZ")
        .map(|t| t.and_utc())
        .map_err(|_| {
            Error::usage(
                format!("{text:?} is not a time"),
                "write it as 2026-11-30T10:15:00Z (RFC 3339) or 20261130T101500Z",
            )
        })
}

/// Works out what `rule` deletes in `repo`. Nothing is changed.
///
/// ```
/// # async fn demo() -> pgrepo::Result<()> {
/// use pgrepo::retention::{plan_retention, RetentionRule};
/// let repo = pgrepo::Repository::open("memory://demo", &Default::default())?;
/// let plan = plan_retention(&repo, RetentionRule::Retain(2)).await?;
/// assert!(plan.delete.is_empty() && plan.wal_objects.is_empty());
/// # Ok(()) }
/// ```
pub async fn plan_retention(repo: &Repository, rule: RetentionRule) -> Result<RetentionPlan> {
    if rule == RetentionRule::Retain(0) {
        return Err(Error::usage(
            "retaining 0 backups would delete every backup and leave the WAL without one",
            "keep at least one backup (--retain 1 or more)",
        ));
    }
    let backups = repo.backups().await?; // oldest first
    let mut kept: Vec<bool> = match rule {
        RetentionRule::Retain(n) => {
            let first_kept = backups.len().saturating_sub(n);
            (0..backups.len()).map(|i| i >= first_kept).collect()
        }
        RetentionRule::Before(time) => backups
            .iter()
            .map(|b| {
                // A start time that does not parse is kept: never delete on a guess.
                chrono::DateTime::parse_from_rfc3339(&b.started_at)
                    .map(|t| t.with_timezone(&chrono::Utc) >= time)
                    .unwrap_or(true)
            })
            .collect(),
    };
    // Parents of kept backups are kept, transitively.
    loop {
        let mut changed = false;
        for i in 0..backups.len() {
            if !kept[i] {
                continue;
            }
            if let Some(parent) = &backups[i].parent {
                if let Some(j) = backups.iter().position(|b| &b.label == parent) {
                    if !kept[j] {
                        kept[j] = true;
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    let mut plan = RetentionPlan::default();
    for (backup, keep) in backups.iter().zip(&kept) {
        if *keep {
            plan.keep.push(backup.label.clone());
        } else {
            plan.delete.push(backup.label.clone());
        }
    }
    let oldest_kept = backups
        .iter()
        .zip(&kept)
        .filter(|(_, k)| **k)
        .map(|(b, _)| b.start().map(|lsn| (lsn, b.start_timeline)))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .min();
    let Some((start, timeline)) = oldest_kept else {
        return Ok(plan); // no committed backup left: no WAL is deleted
    };
    let Some(params) = crate::walfetch::archive_params(repo).await? else {
        return Ok(plan); // no WAL archive
    };
    let bound = start.segment_number(params.segment_size);
    plan.wal_below_segment = Some(bound);
    plan.wal_below_name = Some(pgwire_repl::types::wal_file_name(
        pgwire_repl::TimelineId(timeline),
        bound,
        params.segment_size,
    ));
    let dir = repo.path(walnames::WAL_DIR);
    let prefix = repo.path("");
    let objects: Vec<_> = repo
        .store()
        .list(Some(&dir))
        .try_collect()
        .await
        .map_err(|e| Error::store(format!("listing {}", repo.describe(&dir)), e))?;
    for meta in objects {
        let full = meta.location.as_ref();
        let relative = full
            .strip_prefix(prefix.as_ref())
            .unwrap_or(full)
            .trim_start_matches('/');
        let below = match walnames::parse_wal_object(relative, params.segment_size) {
            Some(WalObject::Complete { segment, .. } | WalObject::Partial { segment, .. }) => {
                segment < bound
            }
            _ => false,
        };
        if below {
            plan.wal_objects.push(relative.to_string());
        }
    }
    plan.wal_objects.sort();
    Ok(plan)
}

/// Carries out a plan from [`plan_retention`]: the backups first (each commit record
/// before the rest of its objects), then the WAL.
pub async fn apply_retention(repo: &Repository, plan: &RetentionPlan) -> Result<RetentionSummary> {
    let mut summary = RetentionSummary::default();
    for label in &plan.delete {
        summary.backup_objects_deleted += repo.delete_backup_objects(label).await.map_err(|e| {
            e.context(format!(
                "deleting backup {label} (its commit record goes first, so it is no longer listed as a backup)"
            ))
        })?;
        summary.backups_deleted += 1;
    }
    let paths: Vec<ObjectPath> = plan.wal_objects.iter().map(|o| repo.path(o)).collect();
    let stream = futures::stream::iter(paths.into_iter().map(Ok)).boxed();
    let mut results = repo.store().delete_stream(stream);
    while let Some(result) = results.next().await {
        match result {
            Ok(_) => summary.wal_objects_deleted += 1,
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => {
                return Err(Error::store("deleting old WAL", e).context(format!(
                    "{} backups were deleted and {} WAL objects before this failure; run the \
                     command again to finish",
                    summary.backups_deleted, summary.wal_objects_deleted
                )))
            }
        }
    }
    Ok(summary)
}
