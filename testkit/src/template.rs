//! Pristine initdb'd data directories, made once per binary directory and copied per
//! cluster (initdb takes seconds on a small machine; a copy takes milliseconds).
//!
//! Templates live in `<cache>/templates/<key>`, created under an exclusive `flock` and
//! published with an atomic rename, so parallel test processes neither race nor see a
//! half-written template. When the cache is unusable the template is made in a
//! per-process temporary directory removed at exit.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use crate::env::{self, ServerUser};

/// Bumped whenever the way templates are made changes, to ignore older ones.
const FORMAT: &str = "testkit-template-v2";

/// What distinguishes one template from another.
pub(crate) struct TemplateKey<'a> {
    pub(crate) bin_dir: &'a Path,
    pub(crate) version: &'a str,
    pub(crate) checksums: bool,
}

impl TemplateKey<'_> {
    fn hash(&self) -> String {
        let canonical = fs::canonicalize(self.bin_dir).unwrap_or_else(|_| self.bin_dir.into());
        let stamp = fs::metadata(self.bin_dir.join("postgres"))
            .map(|m| format!("{}:{}", m.size(), m.mtime()))
            .unwrap_or_default();
        let text = format!(
            "{FORMAT}\0{}\0{}\0{}\0{stamp}",
            canonical.display(),
            self.version,
            self.checksums
        );
        // FNV-1a, 64 bits: stable across Rust versions, unlike DefaultHasher.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in text.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let major = crate::env::parse_major(self.version).unwrap_or(0);
        let sums = if self.checksums { "k" } else { "nok" };
        format!("pg{major}-{sums}-{hash:016x}")
    }
}

fn memo() -> &'static Mutex<HashMap<String, PathBuf>> {
    static MEMO: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    MEMO.get_or_init(Default::default)
}

/// True when `PGREPL_TEST_NO_TEMPLATE=1`: run initdb for every cluster.
pub(crate) fn disabled() -> bool {
    std::env::var("PGREPL_TEST_NO_TEMPLATE").is_ok_and(|v| v == "1")
}

/// Returns the directory of a pristine template for `key`, creating it if needed.
pub(crate) fn template_for(key: &TemplateKey<'_>, user: Option<&ServerUser>) -> PathBuf {
    let hash = key.hash();
    // Holding the lock while creating serialises threads of this process; other
    // processes are serialised by the flock.
    let mut memo = memo().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = memo.get(&hash) {
        if path.join("PG_VERSION").is_file() {
            return path.clone();
        }
    }
    let cache_root = env::cache_dir().join("templates");
    let path = match cached_template(&cache_root, &hash, key, user) {
        Ok(path) => path,
        Err(cache_err) => match process_template(key, user) {
            Ok(path) => path,
            Err(err) => panic!(
                "testkit: could not create a template data directory: {err}\n\
                 (the shared template cache in {} failed first: {cache_err})",
                cache_root.display()
            ),
        },
    };
    memo.insert(hash, path.clone());
    path
}

fn cached_template(
    root: &Path,
    hash: &str,
    key: &TemplateKey<'_>,
    user: Option<&ServerUser>,
) -> io::Result<PathBuf> {
    let final_path = root.join(hash);
    if final_path.join("PG_VERSION").is_file() {
        return Ok(final_path);
    }
    fs::create_dir_all(root)?;
    let lock_path = root.join(format!("{hash}.lock"));
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)?;
    // SAFETY: flock on a file descriptor we own; the lock is released when `lock` closes.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if final_path.join("PG_VERSION").is_file() {
        return Ok(final_path);
    }
    // A leftover from a crashed run (no PG_VERSION): move it out of the way.
    if final_path.exists() {
        fs::remove_dir_all(&final_path)?;
    }
    // We hold the lock, so any staging directory for this key is a crashed run's.
    let staging_prefix = format!(".{hash}.tmp-");
    for entry in fs::read_dir(root)?.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(&staging_prefix)
        {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    let staging = root.join(format!("{staging_prefix}{}", std::process::id()));
    fs::create_dir(&staging)?;
    let result = (|| {
        fs::set_permissions(&staging, fs::Permissions::from_mode(0o700))?;
        env::give_to(user, &staging)?;
        run_initdb(key, &staging, user)?;
        sync_tree(&staging)?;
        fs::rename(&staging, &final_path)
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    result?;
    drop(lock);
    Ok(final_path)
}

fn process_template(key: &TemplateKey<'_>, user: Option<&ServerUser>) -> io::Result<PathBuf> {
    let dir = tempfile::Builder::new()
        .prefix("pgrepl-template-")
        .tempdir_in("/tmp")?
        .keep();
    register_cleanup(dir.clone());
    let data = dir.join("data");
    fs::create_dir(&data)?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
    fs::set_permissions(&data, fs::Permissions::from_mode(0o700))?;
    env::give_to(user, &data)?;
    run_initdb(key, &data, user)?;
    Ok(data)
}

/// Runs initdb into `data` (an empty directory owned by the server user).
pub(crate) fn run_initdb(
    key: &TemplateKey<'_>,
    data: &Path,
    user: Option<&ServerUser>,
) -> io::Result<()> {
    let initdb = key.bin_dir.join("initdb");
    let mut cmd = env::server_command(user, &initdb);
    cmd.arg("-D").arg(data).args([
        "-N",
        "-U",
        "postgres",
        "-A",
        "trust",
        "-E",
        "UTF8",
        "--locale=C",
    ]);
    if key.checksums {
        cmd.arg("-k");
    } else if crate::env::parse_major(key.version).is_some_and(|major| major >= 18) {
        // PostgreSQL 18's initdb enables checksums by default.
        cmd.arg("--no-data-checksums");
    }
    let output = cmd.output().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "could not run {}{}: {e}",
                initdb.display(),
                user.map(|u| format!(" as OS user {}", u.name))
                    .unwrap_or_default()
            ),
        )
    })?;
    if !output.status.success() {
        return Err(io::Error::other(format!(
            "{} -D {} failed ({}):\n{}{}",
            initdb.display(),
            data.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    Ok(())
}

/// Flushes the file system holding `path`, so a crash cannot leave a torn template.
fn sync_tree(path: &Path) -> io::Result<()> {
    let dir = fs::File::open(path)?;
    // SAFETY: syncfs on a descriptor we own.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Copies the template into `dest` (which must not exist), preserving modes, and gives
/// every entry to the server user.
pub(crate) fn copy_template(
    template: &Path,
    dest: &Path,
    user: Option<&ServerUser>,
) -> io::Result<()> {
    copy_tree(template, dest, user)?;
    fs::set_permissions(dest, fs::Permissions::from_mode(0o700))
}

fn copy_tree(src: &Path, dest: &Path, user: Option<&ServerUser>) -> io::Result<()> {
    let meta = fs::symlink_metadata(src)?;
    fs::create_dir(dest)?;
    fs::set_permissions(dest, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    env::give_to(user, dest)?;
    for entry in fs::read_dir(src)? {
        let entry = entry?;
        let from = entry.path();
        let to = dest.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_tree(&from, &to, user)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&from)?, &to)?;
            env::give_to(user, &to)?;
        } else {
            // fs::copy keeps the permission bits (and uses copy_file_range, which
            // reflinks where the file system can).
            fs::copy(&from, &to)?;
            env::give_to(user, &to)?;
        }
    }
    Ok(())
}

fn cleanup_list() -> &'static Mutex<Vec<PathBuf>> {
    static LIST: OnceLock<Mutex<Vec<PathBuf>>> = OnceLock::new();
    LIST.get_or_init(Default::default)
}

extern "C" fn cleanup_at_exit() {
    if let Ok(list) = cleanup_list().lock() {
        for path in list.iter() {
            let _ = fs::remove_dir_all(path);
        }
    }
}

fn register_cleanup(path: PathBuf) {
    static REGISTERED: OnceLock<()> = OnceLock::new();
    REGISTERED.get_or_init(|| {
        // SAFETY: registering a plain extern "C" function with no arguments.
        unsafe {
            libc::atexit(cleanup_at_exit);
        }
    });
    cleanup_list()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(path);
}
