//! The receiver lease (`locks/receiver.json`): one WAL receiver per repository.
//!
//! Object stores such as Garage ignore conditional writes, so the lease is written,
//! read back after a pause and renewed; it detects a second receiver started by mistake
//! rather than proving exclusion (see `LAYOUT.md`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use object_store::ObjectStoreExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::layout::FORMAT;
use crate::repository::Repository;
use crate::walnames::RECEIVER_LEASE;

/// The lease's largest size read.
const LEASE_LIMIT: u64 = 64 << 10;

/// `locks/receiver.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// The record's format.
    pub format: u32,
    /// A random identifier of the holder (one per process and repository).
    pub owner: String,
    /// The holder's host name.
    pub host: String,
    /// The holder's process id.
    pub pid: u32,
    /// When it was last renewed (RFC 3339).
    pub renewed_at: String,
    /// When it lapses unless renewed (RFC 3339).
    pub expires_at: String,
}

/// A lease held by this process, renewed in the background until dropped or released.
#[derive(Debug)]
pub struct Lease {
    repo: Repository,
    owner: String,
    valid: Arc<LeaseState>,
    renewer: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Default)]
struct LeaseState {
    /// Another owner replaced the lease: never write again.
    taken: AtomicBool,
    /// Unix seconds of the last successful renewal.
    renewed: AtomicU64,
}

/// How long a lease lasts without renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(30);
/// How often it is renewed.
const RENEW_EVERY: Duration = Duration::from_secs(5);
/// The pause between writing the lease and reading it back.
const SETTLE: Duration = Duration::from_millis(1500);

impl Lease {
    /// Takes the repository's receiver lease, or explains who holds it.
    pub async fn acquire(repo: &Repository) -> Result<Lease> {
        let owner = new_owner_id();
        let path = repo.path(RECEIVER_LEASE);
        if let Some(current) = read(repo).await? {
            if let Some(why) = held_by_another(&current, &owner) {
                return Err(Error::unsafe_op(
                    format!("another WAL receiver holds {}: {why}", repo.describe(&path)),
                    "stop the other receiver (one receiver per repository); if it is gone, \
                     wait until its lease expires (30 s after its last renewal)",
                ));
            }
        }
        write(repo, &owner).await?;
        tokio::time::sleep(SETTLE).await;
        match read(repo).await? {
            Some(current) if current.owner == owner => {}
            Some(current) => {
                return Err(Error::unsafe_op(
                    format!(
                        "another WAL receiver (pid {} on {}) took {} at the same moment",
                        current.pid,
                        current.host,
                        repo.describe(&path)
                    ),
                    "run one receiver per repository",
                ))
            }
            None => {
                return Err(Error::unsafe_op(
                    format!(
                        "{} vanished right after it was written",
                        repo.describe(&path)
                    ),
                    "another process is deleting the lease; run one receiver per repository",
                ))
            }
        }
        let valid = Arc::new(LeaseState::default());
        valid.renewed.store(unix_now(), Ordering::Release);
        let renewer = tokio::spawn(renew(repo.clone(), owner.clone(), valid.clone()));
        Ok(Lease {
            repo: repo.clone(),
            owner,
            valid,
            renewer,
        })
    }

    /// `Ok` while the lease is ours and fresh; an error once another owner took it
    /// (not retryable) or renewals have failed for too long (retryable: the store did
    /// not answer, and taking the lease again may work).
    pub fn check(&self) -> Result<()> {
        if self.valid.taken.load(Ordering::Acquire) {
            return Err(Error::unsafe_op(
                format!(
                    "another WAL receiver took over {}",
                    self.repo.describe(&self.repo.path(RECEIVER_LEASE))
                ),
                "run one receiver per repository; this one stopped without writing more",
            ));
        }
        let age = unix_now().saturating_sub(self.valid.renewed.load(Ordering::Acquire));
        if age + RENEW_EVERY.as_secs() >= LEASE_TTL.as_secs() {
            let mut error = Error::unsafe_op(
                format!(
                    "the receiver lease in {} could not be renewed for {age} s",
                    self.repo.url()
                ),
                "check that the object store is reachable; the receiver takes the lease again when it is",
            );
            error.set_retryable();
            return Err(error);
        }
        Ok(())
    }

    /// Stops renewing and deletes the lease if it is still ours, so that the next
    /// receiver can start at once.
    pub async fn release(self) -> Result<()> {
        self.renewer.abort();
        if let Some(current) = read(&self.repo).await? {
            if current.owner == self.owner {
                let path = self.repo.path(RECEIVER_LEASE);
                match self.repo.store().delete(&path).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => {
                        return Err(Error::store(
                            format!("deleting {}", self.repo.describe(&path)),
                            e,
                        ))
                    }
                }
            }
        }
        Ok(())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

async fn renew(repo: Repository, owner: String, state: Arc<LeaseState>) {
    loop {
        tokio::time::sleep(RENEW_EVERY).await;
        match read(&repo).await {
            Ok(Some(current)) if current.owner != owner => {
                tracing::error!(host = %current.host, pid = current.pid, "another WAL receiver took the lease");
                state.taken.store(true, Ordering::Release);
                return;
            }
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(error = %err, "reading the receiver lease failed; retrying");
                continue;
            }
        }
        match write(&repo, &owner).await {
            Ok(()) => state.renewed.store(unix_now(), Ordering::Release),
            Err(err) => {
                tracing::warn!(error = %err, "renewing the receiver lease failed; retrying")
            }
        }
    }
}

/// Why `current` (not ours) still holds the lease, or `None` when it may be taken over.
fn held_by_another(current: &LeaseRecord, ours: &str) -> Option<String> {
    if current.owner == ours {
        return None;
    }
    let expires = chrono::DateTime::parse_from_rfc3339(&current.expires_at).ok()?;
    let left = expires.timestamp() - chrono::Utc::now().timestamp();
    if left <= 0 {
        return None;
    }
    if current.host == host_name() && !process_exists(current.pid) {
        // kill -9 on this host: the holder is gone, no need to wait for expiry.
        return None;
    }
    Some(format!(
        "pid {} on host {}, renewed at {}, expires in {left} s",
        current.pid, current.host, current.renewed_at
    ))
}

async fn read(repo: &Repository) -> Result<Option<LeaseRecord>> {
    let path = repo.path(RECEIVER_LEASE);
    let Some(bytes) = repo.get_optional(&path, LEASE_LIMIT).await? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| Error::verify(repo.describe(&path), format!("not a receiver lease: {e}")))
}

async fn write(repo: &Repository, owner: &str) -> Result<()> {
    let now = chrono::Utc::now();
    let expires = now + chrono::Duration::seconds(LEASE_TTL.as_secs() as i64);
    let record = LeaseRecord {
        format: FORMAT,
        owner: owner.to_string(),
        host: host_name(),
        pid: std::process::id(),
        renewed_at: now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        expires_at: expires.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    };
    let json = serde_json::to_string_pretty(&record).unwrap_or_default() + "\n";
    repo.put_bytes(&repo.path(RECEIVER_LEASE), Bytes::from(json))
        .await
}

fn new_owner_id() -> String {
    let mut hash = Sha256::new();
    hash.update(std::process::id().to_le_bytes());
    hash.update(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
            .to_le_bytes(),
    );
    hash.update(host_name().as_bytes());
    // A stack address varies between runs (ASLR).
    let marker = 0u8;
    hash.update((&marker as *const u8 as usize).to_le_bytes());
    hash.finalize()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn process_exists(pid: u32) -> bool {
    std::path::Path::new("/proc").join(pid.to_string()).exists()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(owner: &str, host: String, pid: u32, expires_in: i64) -> LeaseRecord {
        let now = chrono::Utc::now();
        LeaseRecord {
            format: 1,
            owner: owner.into(),
            host,
            pid,
            renewed_at: now.to_rfc3339(),
            expires_at: (now + chrono::Duration::seconds(expires_in)).to_rfc3339(),
        }
    }

    #[test]
    fn who_may_take_the_lease() {
        // A live process elsewhere, not expired: held.
        assert!(held_by_another(&record("a", "elsewhere".into(), 1, 20), "b").is_some());
        // Expired: free.
        assert!(held_by_another(&record("a", "elsewhere".into(), 1, -1), "b").is_none());
        // Ours: free.
        assert!(held_by_another(&record("b", "elsewhere".into(), 1, 20), "b").is_none());
        // This host, a live process (ourselves): held.
        assert!(held_by_another(&record("a", host_name(), std::process::id(), 20), "b").is_some());
        // This host, a process that does not exist: free.
        assert!(held_by_another(&record("a", host_name(), u32::MAX - 1, 20), "b").is_none());
    }

    #[tokio::test]
    async fn a_second_receiver_is_refused_and_release_frees_it() {
        let repo = Repository::open("memory://lease", &Default::default()).unwrap();
        let first = Lease::acquire(&repo).await.unwrap();
        first.check().unwrap();
        let refused = Lease::acquire(&repo).await.unwrap_err();
        assert!(
            refused.to_string().contains("another WAL receiver holds"),
            "{refused}"
        );
        first.release().await.unwrap();
        let second = Lease::acquire(&repo).await.unwrap();
        second.check().unwrap();
    }
}
