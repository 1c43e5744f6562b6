//! Where a plain-format backup may write, decided before the first byte: every directory
//! must be new or empty, and none may be, or lie inside, a directory of the source
//! server (its data directory or a tablespace) on this host.
//!
//! The danger is real: an unmapped tablespace is written to the path the server reports,
//! which on the same host *is* the source's live tablespace.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};
use crate::sink::{Tablespace, TablespaceMapping};

/// One directory a plain-format backup writes into, as found before the backup wrote
/// anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetDir {
    /// The directory.
    pub path: PathBuf,
    /// The tablespace it receives; `None` for the data directory.
    pub tablespace: Option<u32>,
    /// The highest directory that did not exist yet and that creating `path` will create
    /// (`path` itself or one of its parents); `None` when `path` already existed (empty).
    /// This is what removing "what this run created" removes.
    pub creates: Option<PathBuf>,
}

/// Checks every directory a plain-format backup of `tablespaces` into `target` would
/// write, and returns them, data directory first.
///
/// Refused, with the option that fixes it:
/// - a tablespace directory (mapped or not) that exists and is not empty; the data
///   directory too, unless `allow_non_empty_target`;
/// - a directory that lies inside one of `source_dirs` (the source's data directory,
///   when known) or one of the source's tablespace locations as they exist on this
///   host, compared by device and inode so that links and bind mounts do not hide it
///   (the same path on another host is another directory, so paths alone decide
///   nothing);
/// - a directory that lies inside any PostgreSQL data directory or tablespace on this
///   host (an ancestor holding `PG_VERSION` and `global/pg_control`, or a
///   `PG_<major>_<catversion>` directory), whatever the source could report.
///
/// ```
/// use basebackup::{Tablespace, TablespaceMapping};
/// let dir = tempfile::tempdir().unwrap();
/// let live = dir.path().join("live_ts");
/// std::fs::create_dir_all(live.join("PG_16_202307071")).unwrap();
/// let tablespaces = [Tablespace {
///     oid: Some(16385),
///     location: Some(live.to_str().unwrap().to_string()),
///     size_estimate: None,
/// }];
/// // Unmapped, the tablespace would be written into the live one: refused.
/// let target = dir.path().join("clone");
/// let err = basebackup::plain_target_dirs(&target, &tablespaces, &TablespaceMapping::default(), &[], false)
///     .unwrap_err();
/// assert!(err.to_string().contains("not empty"), "{err}");
/// // Mapped to a new directory: fine.
/// let mut mapping = TablespaceMapping::default();
/// mapping.add(live.to_str().unwrap(), dir.path().join("new_ts"));
/// let dirs = basebackup::plain_target_dirs(&target, &tablespaces, &mapping, &[], false).unwrap();
/// assert_eq!(dirs.len(), 2);
/// ```
pub fn plain_target_dirs(
    target: &Path,
    tablespaces: &[Tablespace],
    mapping: &TablespaceMapping,
    source_dirs: &[PathBuf],
    allow_non_empty_target: bool,
) -> Result<Vec<TargetDir>> {
    let mut sources: Vec<PathBuf> = source_dirs.to_vec();
    sources.extend(
        tablespaces
            .iter()
            .filter_map(|ts| ts.location.as_deref())
            .filter(|location| location.starts_with('/'))
            .map(PathBuf::from),
    );
    let mut dirs = vec![TargetDir {
        path: target.to_path_buf(),
        tablespace: None,
        creates: None,
    }];
    for ts in tablespaces {
        let (Some(oid), Some(location)) = (ts.oid, ts.location.as_deref()) else {
            continue;
        };
        // In-place tablespaces (a relative location) live inside the data directory.
        if !location.starts_with('/') {
            continue;
        }
        dirs.push(TargetDir {
            path: mapping.apply(location),
            tablespace: Some(oid),
            creates: None,
        });
    }
    let mut seen = HashSet::new();
    for dir in &mut dirs {
        let resolved = resolve(&dir.path);
        if !seen.insert(resolved.clone()) {
            return Err(Error::usage(
                format!(
                    "{} would receive two parts of the backup",
                    describe(dir, &dir.path)
                ),
                "map each tablespace to its own directory with --tablespace-mapping OLDDIR=NEWDIR",
            ));
        }
        check_not_source(dir, &resolved, &sources)?;
        check_not_inside_a_cluster(dir, &resolved)?;
        dir.creates = match fs::read_dir(&dir.path) {
            Ok(mut entries) => {
                let may_be_full = dir.tablespace.is_none() && allow_non_empty_target;
                if !may_be_full && entries.next().is_some() {
                    return Err(not_empty(dir));
                }
                None
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(highest_missing(&dir.path)),
            Err(e) => return Err(Error::io("reading directory", &dir.path, e)),
        };
    }
    Ok(dirs)
}

fn describe(dir: &TargetDir, path: &Path) -> String {
    match dir.tablespace {
        Some(oid) => format!("tablespace {oid}'s directory {}", path.display()),
        None => format!("the target directory {}", path.display()),
    }
}

fn not_empty(dir: &TargetDir) -> Error {
    match dir.tablespace {
        Some(oid) => Error::usage(
            format!(
                "tablespace {oid} would be written to {}, which exists and is not empty \
                 (on the source's host this is the source's own tablespace)",
                dir.path.display()
            ),
            format!(
                "relocate it to a new or empty directory with --tablespace-mapping {}=/new/dir \
                 (pg_basebackup: -T); nothing was written",
                dir.path.display()
            ),
        ),
        None => Error::usage(
            format!("the target directory {} is not empty", dir.path.display()),
            "choose a new or empty directory, or empty this one; nothing was written",
        ),
    }
}

/// The path with every existing part resolved (links followed), the rest kept as given.
fn resolve(path: &Path) -> PathBuf {
    let lexical = lexical(path);
    let mut existing = lexical.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = fs::canonicalize(existing) {
            let mut out = real;
            out.extend(rest.iter().rev());
            return out;
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent;
            }
            _ => return lexical,
        }
    }
}

/// `.` and `..` and repeated slashes removed without touching the file system.
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

fn identity(path: &Path) -> Option<(u64, u64)> {
    fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

fn check_not_source(dir: &TargetDir, resolved: &Path, sources: &[PathBuf]) -> Result<()> {
    // Only strict ancestors, and only by identity: the same path on another host is a
    // different directory (an unmapped tablespace, or the usual data directory path),
    // and a directory at the very path is refused by the emptiness check when it is live.
    for source in sources {
        let Some(id) = identity(source) else { continue };
        let inside = resolved
            .ancestors()
            .skip(1)
            .any(|ancestor| identity(ancestor) == Some(id));
        if inside {
            return Err(Error::usage(
                format!(
                    "{} lies inside the source server's directory {}",
                    describe(dir, &dir.path),
                    source.display()
                ),
                match dir.tablespace {
                    Some(_) => format!(
                        "relocate the tablespace outside the source's directories with --tablespace-mapping {}=/new/dir; nothing was written",
                        dir.path.display()
                    ),
                    None => "choose a target outside the source's data directory and tablespaces; nothing was written".into(),
                },
            ));
        }
    }
    Ok(())
}

/// Refuses a directory inside a data directory or tablespace on this host, whichever
/// server it belongs to.
fn check_not_inside_a_cluster(dir: &TargetDir, resolved: &Path) -> Result<()> {
    for ancestor in resolved.ancestors().skip(1) {
        let what = if ancestor.join("PG_VERSION").is_file()
            && ancestor.join("global/pg_control").is_file()
        {
            "a PostgreSQL data directory"
        } else if holds_tablespace_version_dir(ancestor) {
            "a PostgreSQL tablespace"
        } else {
            continue;
        };
        return Err(Error::usage(
            format!(
                "{} lies inside {what}, {}",
                describe(dir, &dir.path),
                ancestor.display()
            ),
            "choose a directory outside every data directory and tablespace; nothing was written",
        ));
    }
    Ok(())
}

/// Whether `dir` holds a `PG_<major>_<catversion>` directory, as every tablespace does.
fn holds_tablespace_version_dir(dir: &Path) -> bool {
    let Ok(entries) = fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|entry| {
        entry.file_name().to_str().is_some_and(|name| {
            let mut parts = name.splitn(3, '_');
            parts.next() == Some("PG")
                && parts
                    .next()
                    .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                && parts
                    .next()
                    .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        }) && entry.file_type().is_ok_and(|t| t.is_dir())
    })
}

/// The highest ancestor of `path` (or `path` itself) that does not exist.
fn highest_missing(path: &Path) -> PathBuf {
    let mut highest = path.to_path_buf();
    for ancestor in path.ancestors().skip(1) {
        if ancestor.as_os_str().is_empty() || fs::symlink_metadata(ancestor).is_ok() {
            break;
        }
        highest = ancestor.to_path_buf();
    }
    highest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(oid: u32, location: &Path) -> Tablespace {
        Tablespace {
            oid: Some(oid),
            location: Some(location.to_str().unwrap().to_string()),
            size_estimate: None,
        }
    }

    fn fake_data_dir(dir: &Path) {
        fs::create_dir_all(dir.join("global")).unwrap();
        fs::write(dir.join("PG_VERSION"), "16\n").unwrap();
        fs::write(dir.join("global/pg_control"), [0u8; 16]).unwrap();
    }

    #[test]
    fn new_and_empty_directories_are_accepted_and_what_is_created_is_known() {
        let root = tempfile::tempdir().unwrap();
        let empty_ts = root.path().join("empty_ts");
        fs::create_dir(&empty_ts).unwrap();
        let mut mapping = TablespaceMapping::default();
        mapping.add("/srv/ts1", root.path().join("a/b/ts1"));
        let dirs = plain_target_dirs(
            &root.path().join("new/data"),
            &[ts(1, Path::new("/srv/ts1")), ts(2, &empty_ts)],
            &mapping,
            &[],
            false,
        )
        .unwrap();
        assert_eq!(dirs[0].creates, Some(root.path().join("new")));
        assert_eq!(dirs[1].creates, Some(root.path().join("a")));
        assert_eq!(
            dirs[2].creates, None,
            "an empty directory is used, not created"
        );
    }

    #[test]
    fn a_non_empty_tablespace_directory_is_refused_even_when_the_target_may_be_full() {
        let root = tempfile::tempdir().unwrap();
        let live = root.path().join("live");
        fs::create_dir_all(live.join("some_file_dir")).unwrap();
        let err = plain_target_dirs(
            &root.path().join("data"),
            &[ts(7, &live)],
            &TablespaceMapping::default(),
            &[],
            true,
        )
        .unwrap_err();
        assert!(err.to_string().contains("tablespace 7"), "{err}");
        assert!(
            err.advice().unwrap().contains("--tablespace-mapping"),
            "{err}"
        );
    }

    #[test]
    fn targets_inside_the_source_or_any_cluster_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let source_data = root.path().join("pgdata");
        fake_data_dir(&source_data);
        // Inside a data directory: refused whether or not the source reported it.
        for sources in [vec![], vec![source_data.clone()]] {
            let err = plain_target_dirs(
                &source_data.join("clone"),
                &[],
                &TablespaceMapping::default(),
                &sources,
                false,
            )
            .unwrap_err();
            assert!(err.to_string().contains("inside"), "{err}");
        }
        // Inside a tablespace of the source, reached through a link: refused by inode.
        let live_ts = root.path().join("ts");
        fs::create_dir_all(live_ts.join("PG_16_202307071")).unwrap();
        let link = root.path().join("alias");
        std::os::unix::fs::symlink(&live_ts, &link).unwrap();
        let mut mapping = TablespaceMapping::default();
        mapping.add(live_ts.to_str().unwrap(), link.join("sub"));
        let err = plain_target_dirs(
            &root.path().join("clone"),
            &[ts(9, &live_ts)],
            &mapping,
            &[],
            false,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("source server's directory"),
            "{err}"
        );
        // A data directory named by the source but empty of markers is still the source.
        let bare = root.path().join("bare");
        fs::create_dir(&bare).unwrap();
        let err = plain_target_dirs(
            &bare.join("x"),
            &[],
            &TablespaceMapping::default(),
            std::slice::from_ref(&bare),
            false,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("source server's directory"),
            "{err}"
        );
    }

    #[test]
    fn two_parts_in_one_directory_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let mut mapping = TablespaceMapping::default();
        mapping.add("/srv/a", root.path().join("same"));
        mapping.add("/srv/b", root.path().join("same"));
        let err = plain_target_dirs(
            &root.path().join("data"),
            &[ts(1, Path::new("/srv/a")), ts(2, Path::new("/srv/b"))],
            &mapping,
            &[],
            false,
        )
        .unwrap_err();
        assert!(err.to_string().contains("two parts"), "{err}");
    }
}
