//! `pg_verifybackup`: checks a plain-format base backup against its `backup_manifest`
//! with PostgreSQL 15–17's options, messages and exit statuses: every file present with
//! the manifest's size and checksum, nothing unexpected, and the WAL the backup needs
//! present and parseable. It reports every problem (unless `-e`), prints
//! `backup successfully verified` when there is none, and exits 1 otherwise.
//!
//! Tar-format backups (`-F t`, or detected: a `base.tar…` and no `PG_VERSION`) are read
//! as streams, compressed or not, as PostgreSQL 18's tool reads them (WAL parsing needs
//! `-n` there, as in PostgreSQL).
//!
//! Differences from PostgreSQL's tool, on purpose: the WAL is checked in-process by
//! walstream's record verifier (page headers, record headers and each record's CRC-32C
//! from the range's start to its end) instead of by running `pg_waldump`, so no
//! `pg_waldump` needs to sit next to the binary.

pub mod manifest;
mod tar;
mod wal;

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use basebackup::manifest::FileChecksum;
use basebackup::ChecksumAlgorithm;

use crate::getopt::{self, HasArg, Opt};
use crate::report;

const OPTIONS: [Opt; 9] = [
    Opt::both('e', "exit-on-error", HasArg::No),
    Opt::both('i', "ignore", HasArg::Required),
    Opt::both('m', "manifest-path", HasArg::Required),
    Opt::both('n', "no-parse-wal", HasArg::No),
    Opt::both('P', "progress", HasArg::No),
    Opt::both('q', "quiet", HasArg::No),
    Opt::both('s', "skip-checksums", HasArg::No),
    Opt::both('w', "wal-directory", HasArg::Required),
    Opt::both('F', "format", HasArg::Required),
];

/// The parsed command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// Stop at the first problem (`-e`).
    pub exit_on_error: bool,
    /// Paths (relative to the backup) to ignore, besides the built-in ones (`-i`).
    pub ignore: Vec<Vec<u8>>,
    /// The manifest (`-m`; default `<backup>/backup_manifest`).
    pub manifest_path: Option<PathBuf>,
    /// Don't check the WAL (`-n`).
    pub no_parse_wal: bool,
    /// Report progress on standard error (`-P`).
    pub progress: bool,
    /// Print nothing on success (`-q`).
    pub quiet: bool,
    /// Check sizes only (`-s`).
    pub skip_checksums: bool,
    /// Where the WAL is (`-w`; default `<backup>/pg_wal`).
    pub wal_directory: Option<PathBuf>,
    /// The backup directory.
    pub backup_directory: PathBuf,
    /// `-F`: `Some(true)` for tar, `Some(false)` for plain, `None` to detect it.
    pub tar_format: Option<bool>,
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `--help`.
    Help,
    /// `--version`.
    Version,
    /// Verify.
    Verify(Options),
}

/// A command-line mistake: the message and whether the `Try … --help` hint follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError {
    /// The message without the `pg_verifybackup: error: ` prefix (or, for getopt's
    /// own complaints, the full glibc text).
    pub message: String,
    /// True for getopt's complaints, which carry their own prefix.
    pub from_getopt: bool,
}

/// Parses the arguments (without `argv[0]`). Pure.
pub fn parse_args(prog: &str, args: &[OsString]) -> Result<Command, UsageError> {
    let args: Vec<String> = args
        .iter()
        .map(|a| String::from_utf8_lossy(a.as_bytes()).into_owned())
        .collect();
    if let Some(first) = args.first() {
        match first.as_str() {
            "--help" | "-?" => return Ok(Command::Help),
            "--version" | "-V" => return Ok(Command::Version),
            _ => {}
        }
    }
    let parsed = getopt::parse(prog, &args, &OPTIONS).map_err(|message| UsageError {
        message,
        from_getopt: true,
    })?;
    let usage = |message: String| UsageError {
        message,
        from_getopt: false,
    };
    let mut o = Options::default();
    for (id, value) in parsed.options {
        let value = value.unwrap_or_default();
        match id {
            "exit-on-error" => o.exit_on_error = true,
            "ignore" => o.ignore.push(canonicalize(&value).into_bytes()),
            "manifest-path" => o.manifest_path = Some(canonicalize(&value).into()),
            "no-parse-wal" => o.no_parse_wal = true,
            "progress" => o.progress = true,
            "quiet" => o.quiet = true,
            "skip-checksums" => o.skip_checksums = true,
            "wal-directory" => o.wal_directory = Some(canonicalize(&value).into()),
            "format" => match value.as_str() {
                "p" | "plain" => o.tar_format = Some(false),
                "t" | "tar" => o.tar_format = Some(true),
                _ => {
                    return Err(usage(format!(
                        "invalid backup format \"{value}\", must be \"plain\" or \"tar\""
                    )))
                }
            },
            _ => {}
        }
    }
    let mut operands = parsed.operands.into_iter();
    let Some(dir) = operands.next() else {
        return Err(usage("no backup directory specified".into()));
    };
    if let Some(extra) = operands.next() {
        return Err(usage(format!(
            "too many command-line arguments (first is \"{extra}\")"
        )));
    }
    if o.progress && o.quiet {
        return Err(usage(
            "cannot specify both -P/--progress and -q/--quiet".into(),
        ));
    }
    o.backup_directory = canonicalize(&dir).into();
    Ok(Command::Verify(o))
}

/// PostgreSQL's `canonicalize_path` for the cases that matter here: repeated and
/// trailing slashes and `.` components go.
fn canonicalize(path: &str) -> String {
    let absolute = path.starts_with('/');
    let parts: Vec<&str> = path
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    let joined = parts.join("/");
    match (absolute, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".into(),
        (false, false) => joined,
    }
}

fn usage(prog: &str) {
    println!("{prog} verifies a backup against the backup manifest.\n");
    println!("Usage:\n  {prog} [OPTION]... BACKUPDIR\n");
    println!("Options:");
    println!("  -e, --exit-on-error         exit immediately on error");
    println!("  -F, --format=p|t            backup format (plain, tar)");
    println!("  -i, --ignore=RELATIVE_PATH  ignore indicated path");
    println!("  -m, --manifest-path=PATH    use specified path for manifest");
    println!("  -n, --no-parse-wal          do not try to parse WAL files");
    println!("  -P, --progress              show progress information");
    println!("  -q, --quiet                 do not print any output, except for errors");
    println!("  -s, --skip-checksums        skip checksum verification");
    println!("  -w, --wal-directory=PATH    use specified path for WAL files");
    println!("  -V, --version               output version information, then exit");
    println!("  -?, --help                  show this help, then exit");
    println!("\nThe WAL is checked in-process (no pg_waldump needed).");
}

/// The `strerror` text of an I/O error (`%m`), without Rust's `(os error N)` suffix.
pub fn strerror(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.rfind(" (os error ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// Runs the tool; returns the exit status.
pub fn main(argv: Vec<OsString>) -> i32 {
    let prog = argv
        .first()
        .map(report::progname)
        .unwrap_or_else(|| "pg_verifybackup".into());
    let args = argv.get(1..).unwrap_or_default();
    let options = match parse_args(&prog, args) {
        Ok(Command::Help) => {
            usage(&prog);
            return 0;
        }
        Ok(Command::Version) => {
            println!("{}", report::version_line(&prog));
            return 0;
        }
        Ok(Command::Verify(o)) => o,
        Err(e) => return report::usage_failed(&prog, &e.message, e.from_getopt, true),
    };
    let tar = options
        .tar_format
        .unwrap_or_else(|| tar::looks_like_tar(&options.backup_directory));
    if tar && !options.no_parse_wal {
        report::error(&prog, "pg_waldump cannot read tar files");
        report::hint(
            &prog,
            "You must use -n/--no-parse-wal when verifying a tar-format backup.",
        );
        return 1;
    }
    let mut v = Verifier::new(&prog, &options);
    match v.run() {
        Ok(()) | Err(Stop) => {}
    }
    if v.saw_error {
        return 1;
    }
    if !options.quiet {
        println!("backup successfully verified");
    }
    0
}

/// The verification stopped (a fatal error, or `-e` after the first).
struct Stop;

struct FileState {
    entry: manifest::Entry,
    matched: bool,
    bad: bool,
}

struct Verifier<'a> {
    prog: &'a str,
    options: &'a Options,
    ignore: Vec<Vec<u8>>,
    saw_error: bool,
    files: Vec<FileState>,
    index: HashMap<Vec<u8>, usize>,
}

impl<'a> Verifier<'a> {
    fn new(prog: &'a str, options: &'a Options) -> Verifier<'a> {
        let mut ignore: Vec<Vec<u8>> = [
            "backup_manifest",
            "pg_wal",
            "postgresql.auto.conf",
            "recovery.signal",
            "standby.signal",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
        ignore.extend(options.ignore.iter().cloned());
        Verifier {
            prog,
            options,
            ignore,
            saw_error: false,
            files: Vec::new(),
            index: HashMap::new(),
        }
    }

    /// A problem with the backup: reported, and fatal with `-e`.
    fn problem(&mut self, message: impl std::fmt::Display) -> Result<(), Stop> {
        report::error(self.prog, message);
        self.saw_error = true;
        if self.options.exit_on_error {
            return Err(Stop);
        }
        Ok(())
    }

    fn fatal(&mut self, message: impl std::fmt::Display) -> Stop {
        report::error(self.prog, message);
        self.saw_error = true;
        Stop
    }

    fn ignored(&self, rel: &[u8]) -> bool {
        self.ignore
            .iter()
            .any(|i| rel == i.as_slice() || (rel.starts_with(i) && rel.get(i.len()) == Some(&b'/')))
    }

    fn run(&mut self) -> Result<(), Stop> {
        let backup = self.options.backup_directory.clone();
        let manifest_path = self
            .options
            .manifest_path
            .clone()
            .unwrap_or_else(|| backup.join("backup_manifest"));
        let bytes = match fs::read(&manifest_path) {
            Ok(b) => b,
            Err(e) => {
                let verb = if e.kind() == std::io::ErrorKind::NotFound
                    || e.kind() == std::io::ErrorKind::PermissionDenied
                {
                    "open"
                } else {
                    "read"
                };
                return Err(self.fatal(format_args!(
                    "could not {verb} file \"{}\": {}",
                    manifest_path.display(),
                    strerror(&e)
                )));
            }
        };
        let parsed = manifest::parse(&bytes).map_err(|m| self.fatal(m))?;
        let tar = self
            .options
            .tar_format
            .unwrap_or_else(|| tar::looks_like_tar(&backup));
        for entry in parsed.files.iter().cloned() {
            self.index.insert(entry.path.clone(), self.files.len());
            self.files.push(FileState {
                entry,
                matched: false,
                bad: false,
            });
        }
        if let Err(e) = fs::read_dir(&backup) {
            return Err(self.fatal(format_args!(
                "could not open directory \"{}\": {}",
                backup.display(),
                strerror(&e)
            )));
        }
        let control = if tar {
            self.verify_tar(&backup)?
        } else {
            self.scan_directory(&backup, &[])?;
            None
        };
        for i in 0..self.files.len() {
            if !self.files[i].matched && !self.ignored(&self.files[i].entry.path) {
                let path = String::from_utf8_lossy(&self.files[i].entry.path).into_owned();
                self.problem(format_args!(
                    "\"{path}\" is present in the manifest but not on disk"
                ))?;
            }
        }
        if let Some(sysid) = parsed.system_identifier {
            match control {
                _ if !tar => self.check_system_identifier(&backup, sysid)?,
                Some(raw) => {
                    let found = u64::from_le_bytes(raw);
                    if found != sysid {
                        return Err(self.fatal(format_args!(
                            "{}: global/pg_control: manifest system identifier is {sysid}, but control file has {found}",
                            backup.display()
                        )));
                    }
                }
                None => {}
            }
        }
        if tar {
            // Checksums were computed while reading the archives; the WAL is in
            // pg_wal.tar, which is not parsed (see main).
            return Ok(());
        }
        if !self.options.skip_checksums {
            self.verify_checksums(&backup)?;
        }
        if !self.options.no_parse_wal {
            let wal_dir = self
                .options
                .wal_directory
                .clone()
                .unwrap_or_else(|| backup.join("pg_wal"));
            for range in &parsed.wal_ranges {
                if let Err(detail) = wal::check_range(&wal_dir, range) {
                    eprintln!("{}: detail: {detail}", self.prog);
                    self.problem(format_args!(
                        "WAL parsing failed for timeline {}",
                        range.timeline.0
                    ))?;
                }
            }
        }
        Ok(())
    }

    fn scan_directory(&mut self, full: &Path, rel: &[u8]) -> Result<(), Stop> {
        let entries = match fs::read_dir(full) {
            Ok(entries) => entries,
            Err(e) => {
                self.problem(format_args!(
                    "could not open directory \"{}\": {}",
                    full.display(),
                    strerror(&e)
                ))?;
                self.ignore.push(rel.to_vec());
                return Ok(());
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    self.problem(format_args!(
                        "could not read directory \"{}\": {}",
                        full.display(),
                        strerror(&e)
                    ))?;
                    return Ok(());
                }
            };
            let name = entry.file_name();
            let mut child_rel = rel.to_vec();
            if !child_rel.is_empty() {
                child_rel.push(b'/');
            }
            child_rel.extend_from_slice(name.as_bytes());
            if self.ignored(&child_rel) {
                continue;
            }
            self.verify_entry(&full.join(&name), child_rel)?;
        }
        Ok(())
    }

    fn verify_entry(&mut self, full: &Path, rel: Vec<u8>) -> Result<(), Stop> {
        let shown = String::from_utf8_lossy(&rel).into_owned();
        let meta = match fs::metadata(full) {
            Ok(meta) => meta,
            Err(e) => {
                self.problem(format_args!(
                    "could not stat file or directory \"{shown}\": {}",
                    strerror(&e)
                ))?;
                self.ignore.push(rel);
                return Ok(());
            }
        };
        if meta.is_dir() {
            return self.scan_directory(full, &rel);
        }
        if !meta.is_file() {
            return self.problem(format_args!("\"{shown}\" is not a file or directory"));
        }
        let Some(&i) = self.index.get(&rel) else {
            return self.problem(format_args!(
                "\"{shown}\" is present on disk but not in the manifest"
            ));
        };
        self.files[i].matched = true;
        if self.files[i].entry.size != meta.len() {
            self.files[i].bad = true;
            let want = self.files[i].entry.size;
            self.problem(format_args!(
                "\"{shown}\" has size {} on disk but size {want} in the manifest",
                meta.len()
            ))?;
        }
        Ok(())
    }

    fn check_system_identifier(&mut self, backup: &Path, sysid: u64) -> Result<(), Stop> {
        let control = backup.join("global/pg_control");
        let mut raw = [0u8; 8];
        let read = fs::File::open(&control).and_then(|mut f| f.read_exact(&mut raw));
        match read {
            Ok(()) => {
                let found = u64::from_le_bytes(raw);
                if found != sysid {
                    return Err(self.fatal(format_args!(
                        "{}: manifest system identifier is {sysid}, but control file has {found}",
                        control.display()
                    )));
                }
                Ok(())
            }
            Err(e) => Err(self.fatal(format_args!(
                "could not open file \"{}\": {}",
                control.display(),
                strerror(&e)
            ))),
        }
    }

    fn verify_checksums(&mut self, backup: &Path) -> Result<(), Stop> {
        let todo: Vec<usize> = (0..self.files.len())
            .filter(|&i| {
                let f = &self.files[i];
                f.matched
                    && !f.bad
                    && f.entry.algorithm != ChecksumAlgorithm::None
                    && !self.ignored(&f.entry.path)
            })
            .collect();
        let total: u64 = todo.iter().map(|&i| self.files[i].entry.size).sum();
        let mut progress = Progress::new(self.options.progress, total);
        let mut buf = vec![0u8; 128 * 1024];
        for i in todo {
            let entry = self.files[i].entry.clone();
            let shown = String::from_utf8_lossy(&entry.path).into_owned();
            let full = backup.join(std::ffi::OsStr::from_bytes(&entry.path));
            let mut file = match fs::File::open(&full) {
                Ok(f) => f,
                Err(e) => {
                    self.problem(format_args!(
                        "could not open file \"{shown}\": {}",
                        strerror(&e)
                    ))?;
                    continue;
                }
            };
            let mut sum = FileChecksum::new(entry.algorithm);
            let mut read = 0u64;
            let mut failed = None;
            loop {
                match file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        read += n as u64;
                        sum.update(&buf[..n]);
                        progress.add(n as u64);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            if let Some(e) = failed {
                self.problem(format_args!(
                    "could not read file \"{shown}\": {}",
                    strerror(&e)
                ))?;
                continue;
            }
            if read != entry.size {
                self.problem(format_args!(
                    "file \"{shown}\" should contain {} bytes, but read {read} bytes",
                    entry.size
                ))?;
                continue;
            }
            let computed = sum.finish().unwrap_or_default();
            let expected_len = basebackup::manifest::digest_len(entry.algorithm);
            if entry.checksum.len() != expected_len {
                self.problem(format_args!(
                    "file \"{shown}\" has checksum of length {}, but expected {expected_len}",
                    entry.checksum.len()
                ))?;
            } else if basebackup::manifest::hex(&entry.checksum) != computed {
                self.problem(format_args!("checksum mismatch for file \"{shown}\""))?;
            }
        }
        progress.finish();
        Ok(())
    }
}

/// `-P`: `done/total kB (P%) verified` on standard error, at most once a second.
struct Progress {
    enabled: bool,
    total: u64,
    done: u64,
    last: Option<Instant>,
}

impl Progress {
    fn new(enabled: bool, total: u64) -> Progress {
        let mut p = Progress {
            enabled,
            total,
            done: 0,
            last: None,
        };
        p.print(false);
        p
    }

    fn add(&mut self, n: u64) {
        self.done += n;
        if self.enabled
            && self
                .last
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            self.print(false);
        }
    }

    fn finish(&mut self) {
        self.print(true);
    }

    fn print(&mut self, last: bool) {
        if !self.enabled {
            return;
        }
        self.last = Some(Instant::now());
        let total_kb = self.total / 1024;
        let done_kb = self.done / 1024;
        let percent = self
            .done
            .saturating_mul(100)
            .checked_div(self.total)
            .unwrap_or(100)
            .min(100);
        let width = total_kb.to_string().len();
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "{done_kb:>width$}/{total_kb} kB ({percent}%) verified{}",
            if last { "\n" } else { "\r" }
        );
        let _ = err.flush();
    }
}

#[cfg(test)]
fn os_args(words: &[&str]) -> Vec<OsString> {
    use std::os::unix::ffi::OsStringExt;
    words
        .iter()
        .map(|w| OsString::from_vec(w.as_bytes().to_vec()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(words: &[&str]) -> Result<Command, UsageError> {
        parse_args("pg_verifybackup", &os_args(words))
    }

    #[test]
    fn command_lines() {
        assert_eq!(parse(&["--help", "x"]), Ok(Command::Help));
        assert_eq!(parse(&["-V"]), Ok(Command::Version));
        let Ok(Command::Verify(o)) = parse(&["-e", "-i", "pg_xact/", "-i", "x", "-sn", "dir//"])
        else {
            panic!()
        };
        assert!(o.exit_on_error && o.skip_checksums && o.no_parse_wal);
        assert_eq!(o.ignore, [b"pg_xact".to_vec(), b"x".to_vec()]);
        assert_eq!(o.backup_directory, PathBuf::from("dir"));
        assert_eq!(
            parse(&[]).unwrap_err().message,
            "no backup directory specified"
        );
        assert_eq!(
            parse(&["a", "b"]).unwrap_err().message,
            "too many command-line arguments (first is \"b\")"
        );
        assert_eq!(
            parse(&["-P", "-q", "a"]).unwrap_err().message,
            "cannot specify both -P/--progress and -q/--quiet"
        );
        assert!(parse(&["--bogus"]).unwrap_err().from_getopt);
    }

    #[test]
    fn canonical_paths() {
        assert_eq!(canonicalize("/a//b/./c/"), "/a/b/c");
        assert_eq!(canonicalize("./"), ".");
        assert_eq!(canonicalize("/"), "/");
    }
}
