//! A repository: an object store, a prefix inside it, and the records in it.

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::error::{Error, Result};
use crate::layout::{
    CommitRecord, RepositoryRecord, BACKUPS_DIR, COMMIT_RECORD, FORMAT, REPOSITORY_RECORD,
};
use crate::store::{open_store, RepoUrl, StoreOptions};

/// The largest repository or commit record read (they are a few KiB).
const RECORD_LIMIT: u64 = 16 << 20;

/// The largest frame index read: a few hundred bytes per file of an archive.
pub(crate) const INDEX_LIMIT: u64 = 1 << 30;

/// A backup repository in an object store.
///
/// ```
/// # async fn demo() -> pgrepo::Result<()> {
/// let repo = pgrepo::Repository::open("memory://demo", &pgrepo::StoreOptions::default())?;
/// assert!(repo.backups().await?.is_empty());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Repository {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    url: RepoUrl,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL only: the store's configuration holds credentials.
        f.debug_struct("Repository")
            .field("url", &self.url.to_string())
            .finish()
    }
}

impl Repository {
    /// Opens the repository at `url` (see [`RepoUrl::parse`]). Nothing is read yet.
    pub fn open(url: &str, options: &StoreOptions) -> Result<Repository> {
        let url = RepoUrl::parse(url)?;
        let (store, prefix) = open_store(&url, options)?;
        Ok(Repository { store, prefix, url })
    }

    /// A repository in a store built by the caller (any `object_store` backend), under
    /// `prefix`; `url` is only for messages.
    pub fn with_store(store: Arc<dyn ObjectStore>, prefix: &str, url: RepoUrl) -> Repository {
        Repository {
            store,
            prefix: Path::from(prefix),
            url,
        }
    }

    /// The repository's URL (never with credentials).
    pub fn url(&self) -> &RepoUrl {
        &self.url
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The path of `relative` (slash-separated) inside the repository.
    pub fn path(&self, relative: &str) -> Path {
        let mut path = self.prefix.clone();
        for part in relative.split('/').filter(|p| !p.is_empty()) {
            path = path.clone().join(part);
        }
        path
    }

    /// The path of an object of backup `label`.
    pub fn backup_path(&self, label: &str, object: &str) -> Path {
        self.path(&format!("{BACKUPS_DIR}/{label}/{object}"))
    }

    /// Reads a whole (small) object of at most `limit` bytes; the size is checked before
    /// the body is read, so a damaged or hostile store cannot make this allocate more.
    pub async fn get_bytes(&self, path: &Path, limit: u64) -> Result<Bytes> {
        self.get_optional(path, limit).await?.ok_or_else(|| {
            Error::store(
                format!("reading {}", self.describe(path)),
                object_store::Error::NotFound {
                    path: path.to_string(),
                    source: "no such object".into(),
                },
            )
        })
    }

    /// [`get_bytes`](Repository::get_bytes), with `None` for an object that does not
    /// exist.
    pub async fn get_optional(&self, path: &Path, limit: u64) -> Result<Option<Bytes>> {
        let what = format!("reading {}", self.describe(path));
        let result = match self.store.get(path).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(Error::store(&what, e)),
        };
        if result.meta.size > limit {
            return Err(Error::verify(
                self.describe(path),
                format!(
                    "holds {} bytes, more than the {limit} such an object can have",
                    result.meta.size
                ),
            ));
        }
        result
            .bytes()
            .await
            .map(Some)
            .map_err(|e| Error::store(&what, e))
    }

    /// Writes a whole (small) object.
    pub async fn put_bytes(&self, path: &Path, bytes: Bytes) -> Result<()> {
        self.store
            .put(path, PutPayload::from_bytes(bytes))
            .await
            .map_err(|e| Error::store(format!("writing {}", self.describe(path)), e))?;
        Ok(())
    }

    /// The name of `path` relative to the repository's prefix (`wal/00000001/…`), or
    /// `None` for a path outside it.
    pub fn relative(&self, path: &Path) -> Option<String> {
        let full = path.as_ref();
        let prefix = self.prefix.as_ref();
        if prefix.is_empty() {
            return Some(full.to_string());
        }
        full.strip_prefix(prefix)?
            .strip_prefix('/')
            .map(str::to_string)
    }

    /// `url/relative` for messages.
    pub fn describe(&self, path: &Path) -> String {
        let full = path.as_ref();
        let relative = full
            .strip_prefix(self.prefix.as_ref())
            .unwrap_or(full)
            .trim_start_matches('/');
        format!("{}/{relative}", self.url.to_string().trim_end_matches('/'))
    }

    /// The repository record, if the repository was initialised.
    pub async fn record(&self) -> Result<Option<RepositoryRecord>> {
        let path = self.path(REPOSITORY_RECORD);
        let Some(bytes) = self.get_optional(&path, RECORD_LIMIT).await? else {
            return Ok(None);
        };
        let record: RepositoryRecord = serde_json::from_slice(&bytes).map_err(|e| {
            Error::verify(
                self.describe(&path),
                format!("not a repository record: {e}"),
            )
        })?;
        if record.format > FORMAT {
            return Err(Error::usage(
                format!(
                    "{} has format {}, newer than this tool's {FORMAT}",
                    self.describe(&path),
                    record.format
                ),
                "use a newer version of this tool",
            ));
        }
        Ok(Some(record))
    }

    /// Makes sure the repository belongs to the cluster `system_id`: creates the record in
    /// an empty repository, refuses one of another cluster. (Object stores such as Garage
    /// ignore conditional writes, so two clusters initialising the same empty prefix at
    /// the same instant are not told apart; the commit records still name each backup's
    /// own cluster, and restore checks them.)
    pub async fn ensure_system(&self, system_id: u64) -> Result<RepositoryRecord> {
        if let Some(record) = self.record().await? {
            return self.same_system(record, system_id);
        }
        self.create_record(system_id).await
    }

    /// [`ensure_system`](Repository::ensure_system) once no record was found.
    async fn create_record(&self, system_id: u64) -> Result<RepositoryRecord> {
        // A prefix holding other things is not taken over; a WAL archive or a receiver
        // lease (a receiver started before the first backup) are ours.
        let top = self
            .store
            .list_with_delimiter(Some(&self.prefix))
            .await
            .map_err(|e| Error::store(format!("listing {}", self.url), e))?;
        let record_path = self.path(REPOSITORY_RECORD);
        let foreign = top
            .objects
            .iter()
            .map(|o| o.location.clone())
            .filter(|location| *location != record_path)
            .chain(
                top.common_prefixes
                    .iter()
                    .filter(|p| {
                        !matches!(
                            p.filename(),
                            Some(crate::walnames::WAL_DIR) | Some(crate::walnames::LOCKS_DIR)
                        )
                    })
                    .cloned(),
            )
            .next();
        if let Some(object) = foreign {
            return Err(Error::unsafe_op(
                format!(
                    "{} is not empty (it holds {}) and is not a repository",
                    self.url,
                    self.describe(&object)
                ),
                "choose an empty prefix for a new repository",
            ));
        }
        // Another process (a receiver and a backup started together) may have written
        // the record since it was read above.
        if top.objects.iter().any(|o| o.location == record_path) {
            if let Some(record) = self.record().await? {
                return self.same_system(record, system_id);
            }
        }
        let record = RepositoryRecord {
            format: FORMAT,
            system_identifier: system_id.to_string(),
            created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        };
        let json = serde_json::to_string_pretty(&record).unwrap_or_default() + "\n";
        self.put_bytes(&self.path(REPOSITORY_RECORD), Bytes::from(json))
            .await?;
        Ok(record)
    }

    fn same_system(&self, record: RepositoryRecord, system_id: u64) -> Result<RepositoryRecord> {
        if record.system_identifier != system_id.to_string() {
            return Err(Error::unsafe_op(
                format!(
                    "repository {} belongs to the cluster with system identifier {}, \
                     not to this one ({system_id})",
                    self.url, record.system_identifier
                ),
                "use a repository (or prefix) of its own for each cluster",
            ));
        }
        Ok(record)
    }

    /// The committed backups, oldest first (by start LSN, then label). Labels without a
    /// commit record (interrupted uploads) are not backups and are left out.
    pub async fn backups(&self) -> Result<Vec<CommitRecord>> {
        let dir = self.path(BACKUPS_DIR);
        let listing = self
            .store
            .list_with_delimiter(Some(&dir))
            .await
            .map_err(|e| Error::store(format!("listing {}", self.describe(&dir)), e))?;
        let mut records = Vec::new();
        for label_dir in listing.common_prefixes {
            let Some(label) = label_dir.filename() else {
                continue;
            };
            let path = self.backup_path(label, COMMIT_RECORD);
            if let Some(bytes) = self.get_optional(&path, RECORD_LIMIT).await? {
                records.push(CommitRecord::from_json(&bytes, &self.describe(&path))?);
            }
        }
        records.sort_by_key(|r| (r.start().map(|l| l.0).unwrap_or(0), r.label.clone()));
        Ok(records)
    }

    /// The committed backup `label`, or the newest with `latest`.
    pub async fn backup(&self, label: &str) -> Result<CommitRecord> {
        if label == "latest" {
            return self.backups().await?.pop().ok_or_else(|| {
                Error::usage(
                    format!("repository {} holds no committed backup", self.url),
                    "take one with `clone-standby backup`",
                )
            });
        }
        crate::layout::check_label(label)?;
        let path = self.backup_path(label, COMMIT_RECORD);
        match self.get_optional(&path, RECORD_LIMIT).await? {
            Some(bytes) => CommitRecord::from_json(&bytes, &self.describe(&path)),
            None => Err(Error::usage(
                format!("repository {} has no committed backup {label:?}", self.url),
                "run `clone-standby list --repo URL` to see the backups",
            )),
        }
    }

    /// True if any object exists under backup `label` (committed or not).
    pub async fn label_taken(&self, label: &str) -> Result<bool> {
        let dir = self.path(&format!("{BACKUPS_DIR}/{label}"));
        let mut listing = self.store.list(Some(&dir));
        Ok(listing
            .try_next()
            .await
            .map_err(|e| Error::store(format!("listing {}", self.describe(&dir)), e))?
            .is_some())
    }

    /// Deletes every object under backup `label`, the commit record first so that the
    /// backup stops existing before any of its data goes. Returns the objects deleted.
    pub async fn delete_backup_objects(&self, label: &str) -> Result<usize> {
        let commit = self.backup_path(label, COMMIT_RECORD);
        match self.store.delete(&commit).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => {
                return Err(Error::store(
                    format!("deleting {}", self.describe(&commit)),
                    e,
                ))
            }
        }
        let dir = self.path(&format!("{BACKUPS_DIR}/{label}"));
        let objects: Vec<_> = self
            .store
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(|e| Error::store(format!("listing {}", self.describe(&dir)), e))?;
        let mut deleted = 0;
        for object in objects {
            match self.store.delete(&object.location).await {
                Ok(()) => deleted += 1,
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => {
                    return Err(Error::store(
                        format!("deleting {}", self.describe(&object.location)),
                        e,
                    ))
                }
            }
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_record_written_by_another_process_meanwhile_is_used() {
        // A receiver and a backup started together: both read no record, one writes it,
        // then the other lists the prefix and finds it.
        let repo = Repository::open("memory://together", &StoreOptions::default()).unwrap();
        let first = repo.create_record(7).await.unwrap();
        repo.put_bytes(&repo.path("wal/archive.json"), Bytes::from_static(b"{}"))
            .await
            .unwrap();
        let second = repo.create_record(7).await.unwrap();
        assert_eq!(first, second);
        assert!(repo.create_record(8).await.is_err(), "another cluster");
        assert!(repo.ensure_system(8).await.is_err(), "another cluster");
    }

    #[tokio::test]
    async fn a_prefix_with_other_things_is_refused() {
        let repo = Repository::open("memory://other", &StoreOptions::default()).unwrap();
        repo.put_bytes(&repo.path("somebody/else"), Bytes::from_static(b"x"))
            .await
            .unwrap();
        let refused = repo.ensure_system(7).await.unwrap_err();
        assert!(refused.to_string().contains("is not empty"), "{refused}");
    }
}
