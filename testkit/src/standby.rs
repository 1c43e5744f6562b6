//! A streaming standby of a running [`Cluster`], made without pg_basebackup (which only
//! PostgreSQL 15's Debian package ships here): the non-exclusive low-level backup API
//! over one SQL session, a file-system copy of the data directory, then `backup_label`,
//! `standby.signal` and `primary_conninfo`.

use std::fs;
use std::io;
use std::ops::{Deref, DerefMut};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tempfile::TempDir;

use crate::{Cluster, ClusterOptions};

/// A standby streaming from a primary [`Cluster`]; dereferences to its own [`Cluster`]
/// (so `promote()`, `data_dir()`, `config()` … work). Its data directory is removed on
/// drop, after the server is stopped.
///
/// ```no_run
/// # async fn demo() {
/// use testkit::{Cluster, ClusterOptions, Standby};
/// let primary = Cluster::start(ClusterOptions::new().setting("wal_keep_size", "256MB"));
/// let standby = Standby::start(&primary, ClusterOptions::new()).await;
/// standby.promote();
/// # }
/// ```
pub struct Standby {
    // Field order matters: the server stops before its directory is removed.
    cluster: Cluster,
    _data: TempDir,
}

impl Standby {
    /// Backs up `primary` with `pg_backup_start`/`pg_backup_stop` (15+) or
    /// `pg_start_backup`/`pg_stop_backup` (13, 14) in non-exclusive mode, copies its
    /// data directory (without `postmaster.pid` and the contents of `pg_wal` and
    /// `pg_replslot`), and starts the copy as a standby that streams from `primary`
    /// over its Unix socket. `opts` adds settings and `pg_hba.conf` lines. The WAL
    /// from the backup's start must still be on the primary (set `wal_keep_size`).
    ///
    /// Panics (with the reason) on any failure.
    pub async fn start(primary: &Cluster, opts: ClusterOptions) -> Standby {
        let base = std::env::var_os("PGREPL_TEST_TMPDIR")
            .filter(|d| !d.is_empty())
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| "/tmp".into());
        let dir = tempfile::Builder::new()
            .prefix("pgrepl-sb-")
            .tempdir_in(&base)
            .unwrap_or_else(|e| panic!("testkit: could not create a standby directory: {e}"));
        // The server's OS user must be able to reach the data directory inside.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("testkit: chmod {}: {e}", dir.path().display()));
        let data = dir.path().join("data");

        let mut sql = primary.sql().await;
        let new_api = primary.major() >= 15;
        let start = if new_api {
            "SELECT pg_backup_start('testkit standby', true)"
        } else {
            "SELECT pg_start_backup('testkit standby', true, false)"
        };
        if let Err(err) = sql.query(start).await {
            panic!("testkit: {start} failed: {err}");
        }
        if let Err(err) = copy_data_dir(primary.data_dir(), &data, true) {
            panic!(
                "testkit: copying {} to {} failed: {err}",
                primary.data_dir().display(),
                data.display()
            );
        }
        let stop = if new_api {
            "SELECT labelfile, spcmapfile FROM pg_backup_stop(false)"
        } else {
            "SELECT labelfile, spcmapfile FROM pg_stop_backup(false, false)"
        };
        let result = match sql.query(stop).await {
            Ok(result) => result,
            Err(err) => panic!("testkit: {stop} failed: {err}"),
        };
        let _ = sql.close().await;
        let row = result.rows.into_iter().next().unwrap_or_default();
        let label = row.first().cloned().flatten().unwrap_or_default();
        let map = row.get(1).cloned().flatten().unwrap_or_default();
        if label.is_empty() {
            panic!("testkit: {stop} returned no backup label");
        }
        let write = |name: &str, text: &str| {
            let path = data.join(name);
            fs::write(&path, text)
                .and_then(|()| fs::set_permissions(&path, fs::Permissions::from_mode(0o600)))
                .unwrap_or_else(|e| panic!("testkit: could not write {}: {e}", path.display()));
        };
        write("backup_label", &label);
        if !map.is_empty() {
            write("tablespace_map", &map);
        }
        write("standby.signal", "");
        let opts = opts.setting(
            "primary_conninfo",
            format!(
                "{} application_name=testkit_standby",
                primary.unix_conninfo(primary.superuser())
            ),
        );
        let cluster = Cluster::start_on_data_dir(&data, opts);
        Standby {
            cluster,
            _data: dir,
        }
    }
}

impl Deref for Standby {
    type Target = Cluster;

    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

impl DerefMut for Standby {
    fn deref_mut(&mut self) -> &mut Cluster {
        &mut self.cluster
    }
}

/// Entries of a data directory that a backup leaves out (as pg_basebackup does), and
/// the directories whose contents it leaves out.
const SKIP_FILES: &[&str] = &[
    "postmaster.pid",
    "postmaster.opts",
    "backup_label",
    "tablespace_map",
    "standby.signal",
    "recovery.signal",
];
const EMPTY_DIRS: &[&str] = &["pg_wal", "pg_replslot", "pg_stat_tmp"];

/// Copies a live data directory. Files that vanish meanwhile (temporary files) are
/// skipped; the backup's WAL replay repairs torn pages.
fn copy_data_dir(src: &Path, dest: &Path, top: bool) -> io::Result<()> {
    fs::create_dir(dest)?;
    fs::set_permissions(dest, fs::Permissions::from_mode(0o700))?;
    let dir_name = src.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if !top && EMPTY_DIRS.contains(&dir_name) {
        if dir_name == "pg_wal" {
            fs::create_dir(dest.join("archive_status"))?;
        }
        return Ok(());
    }
    for entry in fs::read_dir(src)? {
        let entry = entry?;
        let name = entry.file_name();
        if top && name.to_str().is_some_and(|n| SKIP_FILES.contains(&n)) {
            continue;
        }
        let from = entry.path();
        let to = dest.join(&name);
        let kind = match entry.file_type() {
            Ok(kind) => kind,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let result = if kind.is_dir() {
            copy_data_dir(&from, &to, false)
        } else if kind.is_symlink() {
            fs::read_link(&from).and_then(|target| std::os::unix::fs::symlink(target, &to))
        } else {
            fs::copy(&from, &to).map(drop)
        };
        match result {
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            other => other?,
        }
    }
    Ok(())
}
