//! `pg_basebackup`: PostgreSQL's base-backup tool as a thin argument layer over the
//! `basebackup`, `walstream` and `standby` crates, with the real tool's options
//! (PostgreSQL 15–18), environment variables, output layouts, file modes, exit
//! statuses and error texts. PostgreSQL 15.18's own `010_pg_basebackup.pl` passes with
//! this binary in place of the real one.
//!
//! Deliberate differences from PostgreSQL's tool:
//!
//! * every file is checked against the backup manifest while it is written, and every
//!   streamed WAL record's CRC: a backup the real tool would accept with a file or
//!   record that does not match fails;
//! * nothing is written outside the target and the tablespace directories: a link in
//!   the archive other than `pg_tblspc/<oid>` pointing at a tablespace of this backup
//!   is refused, and so is a plain-format target inside the source's data directory or
//!   tablespaces on this host;
//! * after a page-checksum failure (`XX001`) the backup is removed like after any
//!   other failure (the real tool keeps it); `-n` keeps it, `--no-verify-checksums`
//!   avoids the check; an interruption (SIGINT, SIGTERM) also removes what this run
//!   created, which the real tool (killed by the signal) does not;
//! * `-R` in tar format adds `postgresql.auto.conf` and `standby.signal` as extra
//!   members at the end of the base archive (extraction keeps the last copy) instead
//!   of rewriting the member in place;
//! * `-X stream -Ft` streams into a work directory in the target and packs
//!   `pg_wal.tar` at the end; the temporary slot is named after this process's PID,
//!   not the walsender's;
//! * servers before 13 are not supported; `--version` names this implementation:
//!   `pg_basebackup (PostgreSQL) 18 (pgrepl 0.1.0)`;
//! * connection errors use this crate's texts, not libpq's; LZ4 has one level.

pub mod spec;

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use basebackup::{
    BackupOptions, BackupSink, BaseBackup, Checkpoint, ChecksumAlgorithm, ClientCompression,
    CompressionMethod, ManifestMode, PlainDirSink, ServerCompression, SinkOptions,
    TablespaceMapping, TarSink, TarStreamSink,
};
use pgwire_repl::{ConnectOptions, Notice};
use tokio::sync::watch;

use crate::conn::ConnOptions;
use crate::getopt::{self, HasArg, Opt};
use crate::report;
use spec::{Algorithm, Location};

fn options() -> Vec<Opt> {
    use HasArg::{No, Required};
    vec![
        // As in PostgreSQL's table: -? and -V count only as the first argument (handled
        // before parsing); --help and --version later are mistakes, and so is -k,
        // which getopt accepts and the tool then refuses.
        Opt::long("help", No),
        Opt::long("version", No),
        Opt {
            short: Some('k'),
            long: None,
            has_arg: No,
            id: "k",
        },
        Opt::both('D', "pgdata", Required),
        Opt::both('F', "format", Required),
        Opt::both('c', "checkpoint", Required),
        Opt::both('C', "create-slot", No),
        Opt::both('r', "max-rate", Required),
        Opt::both('R', "write-recovery-conf", No),
        Opt::both('S', "slot", Required),
        Opt::both('t', "target", Required),
        Opt::both('T', "tablespace-mapping", Required),
        Opt::both('X', "wal-method", Required),
        Opt::both('z', "gzip", No),
        Opt::both('Z', "compress", Required),
        Opt::both('l', "label", Required),
        Opt::both('n', "no-clean", No),
        Opt::both('N', "no-sync", No),
        Opt::both('d', "dbname", Required),
        Opt::both('h', "host", Required),
        Opt::both('p', "port", Required),
        Opt::both('U', "username", Required),
        Opt::both('w', "no-password", No),
        Opt::both('W', "password", No),
        Opt::both('s', "status-interval", Required),
        Opt::both('v', "verbose", No),
        Opt::both('P', "progress", No),
        Opt::long("waldir", Required),
        Opt::long("no-slot", No),
        Opt::long("no-verify-checksums", No),
        Opt::long("no-estimate-size", No),
        Opt::long("no-manifest", No),
        Opt::long("manifest-force-encode", No),
        Opt::long("manifest-checksums", Required),
        Opt::long("sync-method", Required),
        Opt::both('i', "incremental", Required),
    ]
}

fn usage(progname: &str) -> String {
    format!(
        "{progname} copies a running PostgreSQL server into a base backup (pgrepl's drop-in
implementation: every file is verified against the backup manifest as it is written).

Usage:
  {progname} [OPTION]...

Where and how to write the backup:
  -D, --pgdata=DIRECTORY    write the backup into DIRECTORY
  -F, --format=p|t          plain data directory (default) or tar archives
  -r, --max-rate=RATE       server-side transfer limit in kB/s (suffix k or M)
  -R, --write-recovery-conf set the backup up as a standby of the server
  -t, --target=TARGET[:DETAIL]
                            store the backup on the server (server:/path) or
                            discard it (blackhole) instead of sending it here
  -T, --tablespace-mapping=OLDDIR=NEWDIR
                            put the tablespace at OLDDIR into NEWDIR (\\= for =)
      --waldir=WALDIR       put the write-ahead log into WALDIR (plain format)
  -X, --wal-method=none|fetch|stream
                            how the write-ahead log is included (default stream)
  -z, --gzip                gzip the tar archives
  -Z, --compress=[client-|server-]METHOD[:DETAIL] or LEVEL
                            compress with gzip, lz4, zstd or none, on the
                            client or on the server

General options:
  -c, --checkpoint=fast|spread
                            how the server's checkpoint is taken
  -C, --create-slot         create the slot named by --slot first
  -i, --incremental=OLDMANIFEST
                            take an incremental backup on top of the backup
                            whose backup_manifest is OLDMANIFEST (17+)
  -l, --label=LABEL         the backup label
  -n, --no-clean            keep what was written when the backup fails
  -N, --no-sync             do not wait for the backup to reach the disk
  -P, --progress            show progress
  -S, --slot=SLOTNAME       stream the write-ahead log through this slot
  -v, --verbose             say what is happening
  -V, --version             print the version and exit
      --manifest-checksums=SHA{{224,256,384,512}}|CRC32C|NONE
                            checksum algorithm of the backup manifest
      --manifest-force-encode
                            hex-encode every file name in the manifest
      --no-estimate-size    do not let the server size the backup first
      --no-manifest         do not ask for a backup manifest
      --no-slot             stream without a temporary replication slot
      --no-verify-checksums do not let the server check page checksums
      --sync-method=fsync|syncfs
                            accepted; files are always synced one by one
  -?, --help                print this help and exit

Connection options:
  -d, --dbname=CONNSTR      connection string
  -h, --host=HOSTNAME       server host or socket directory
  -p, --port=PORT           server port
  -s, --status-interval=INTERVAL
                            seconds between status packets to the server
  -U, --username=NAME       role to connect as
  -w, --no-password         never ask for a password
  -W, --password            ask for a password first

The environment variables PGHOST, PGPORT, PGUSER, PGAPPNAME, PGPASSWORD and the
other libpq variables are used as libpq uses them.
"
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WalMethod {
    None,
    Fetch,
    Stream,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Plain,
    Tar,
}

/// What the command line asked for, checked.
#[derive(Debug)]
struct Args {
    conn: ConnOptions,
    basedir: Option<PathBuf>,
    format: Format,
    wal: WalMethod,
    slot: Option<String>,
    create_slot: bool,
    temp_slot: bool,
    write_recovery: bool,
    no_clean: bool,
    sync: bool,
    waldir: Option<PathBuf>,
    mapping: TablespaceMapping,
    checkpoint: Checkpoint,
    manifest: ManifestMode,
    manifest_checksums: Option<String>,
    verify_checksums: bool,
    estimate_size: bool,
    max_rate: Option<u32>,
    label: String,
    client_compression: Option<ClientCompression>,
    server_compression: Option<(String, Option<String>)>,
    target: Option<String>,
    progress: bool,
    verbose: u32,
    status_interval: Option<Duration>,
    incremental: Option<PathBuf>,
}

/// A failure: the message has been printed already.
struct Exit;

fn fail(prog: &str, message: impl std::fmt::Display) -> Exit {
    report::error(prog, message);
    Exit
}

fn fail_hint(prog: &str, message: impl std::fmt::Display) -> Exit {
    report::error(prog, message);
    report::try_help(prog);
    Exit
}

/// Runs `pg_basebackup` with `args` (`argv[0]` first) and returns its exit status.
pub fn main(args: Vec<OsString>) -> ExitCode {
    let argv0 = args
        .first()
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_else(|| "pg_basebackup".into());
    let prog = report::progname(&argv0);
    let words: Vec<String> = args
        .iter()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    match words.first().map(String::as_str) {
        Some("--help" | "-?") => {
            print!("{}", usage(&prog));
            return ExitCode::SUCCESS;
        }
        Some("--version" | "-V") => {
            println!("{}", report::version_line(&prog));
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    let args = match parse_args(&prog, &argv0, &words) {
        Ok(args) => args,
        Err(Exit) => return ExitCode::FAILURE,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            report::error(&prog, format_args!("could not start: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(&prog, &args));
    // Blocking tasks (the backup's writer) must not hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(5));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Exit) => ExitCode::FAILURE,
    }
}

fn parse_args(prog: &str, argv0: &str, words: &[String]) -> Result<Args, Exit> {
    let spec = options();
    let parsed = match getopt::parse(argv0, words, &spec) {
        Ok(parsed) => parsed,
        Err(message) => {
            eprintln!("{message}");
            report::try_help(prog);
            return Err(Exit);
        }
    };
    let mut args = Args {
        conn: ConnOptions::default(),
        basedir: None,
        format: Format::Plain,
        wal: WalMethod::Stream,
        slot: None,
        create_slot: false,
        temp_slot: true,
        write_recovery: false,
        no_clean: false,
        sync: true,
        waldir: None,
        mapping: TablespaceMapping::default(),
        checkpoint: Checkpoint::Spread,
        manifest: ManifestMode::Yes,
        manifest_checksums: None,
        verify_checksums: true,
        estimate_size: true,
        max_rate: None,
        label: "pg_basebackup base backup".into(),
        client_compression: None,
        server_compression: None,
        target: None,
        progress: false,
        verbose: 0,
        status_interval: None,
        incremental: None,
    };
    let mut format_given = false;
    let mut no_slot = false;
    let mut force_encode = false;
    let mut compress = spec::CompressArg {
        algorithm: "none".into(),
        detail: None,
        location: Location::Unspecified,
    };
    for (id, value) in &parsed.options {
        let value = value.as_deref();
        if args.conn.take(id, value) {
            continue;
        }
        let v = value.unwrap_or_default();
        match *id {
            "pgdata" => args.basedir = Some(PathBuf::from(v)),
            "format" => {
                format_given = true;
                args.format = match v {
                    "p" | "plain" => Format::Plain,
                    "t" | "tar" => Format::Tar,
                    _ => {
                        return Err(fail(
                            prog,
                            format_args!(
                                "invalid output format \"{v}\", must be \"plain\" or \"tar\""
                            ),
                        ))
                    }
                }
            }
            "max-rate" => args.max_rate = Some(parse_max_rate(prog, v)?),
            "write-recovery-conf" => args.write_recovery = true,
            "slot" => {
                args.slot = Some(v.to_string());
                args.temp_slot = false;
            }
            "no-slot" => no_slot = true,
            "target" => args.target = Some(v.to_string()),
            "tablespace-mapping" => parse_mapping(prog, v, &mut args.mapping)?,
            "wal-method" => {
                args.wal = match v {
                    "n" | "none" => WalMethod::None,
                    "f" | "fetch" => WalMethod::Fetch,
                    "s" | "stream" => WalMethod::Stream,
                    _ => return Err(fail(
                        prog,
                        format_args!(
                            "invalid wal-method option \"{v}\", must be \"fetch\", \"stream\", or \"none\""
                        ),
                    )),
                }
            }
            "waldir" => args.waldir = Some(PathBuf::from(basebackup::sink::canonical_path(v))),
            "label" => args.label = v.to_string(),
            "no-clean" => args.no_clean = true,
            "no-sync" => args.sync = false,
            "gzip" => {
                compress = spec::CompressArg {
                    algorithm: "gzip".into(),
                    detail: None,
                    location: Location::Unspecified,
                }
            }
            "compress" => compress = spec::split_compress_arg(v),
            "checkpoint" => {
                args.checkpoint = match v.to_ascii_lowercase().as_str() {
                    "fast" => Checkpoint::Fast,
                    "spread" => Checkpoint::Spread,
                    _ => return Err(fail(
                        prog,
                        format_args!(
                            "invalid checkpoint argument \"{v}\", must be \"fast\" or \"spread\""
                        ),
                    )),
                }
            }
            "status-interval" => {
                let seconds = parse_int(v).filter(|s| (0..=i32::MAX as i64 / 1000).contains(s));
                match seconds {
                    Some(s) => args.status_interval = Some(Duration::from_secs(s as u64)),
                    None if parse_int(v).is_some() => {
                        return Err(fail(
                            prog,
                            format_args!(
                                "-s/--status-interval must be in range 0..{}",
                                i32::MAX / 1000
                            ),
                        ))
                    }
                    None => {
                        return Err(fail(
                            prog,
                            format_args!(
                                "invalid value \"{v}\" for option -s/--status-interval"
                            ),
                        ))
                    }
                }
            }
            "verbose" => args.verbose += 1,
            "progress" => args.progress = true,
            "no-verify-checksums" => args.verify_checksums = false,
            "no-estimate-size" => args.estimate_size = false,
            "no-manifest" => args.manifest = ManifestMode::No,
            "manifest-force-encode" => force_encode = true,
            "manifest-checksums" => args.manifest_checksums = Some(v.to_string()),
            // PostgreSQL 17+: every file written is synced one by one here, which is
            // what `fsync` means; `syncfs` is accepted and does the same.
            "sync-method" => {
                if !matches!(v, "fsync" | "syncfs") {
                    return Err(fail(prog, format_args!("unrecognized sync method: {v}")));
                }
            }
            "create-slot" => args.create_slot = true,
            "incremental" => args.incremental = Some(PathBuf::from(v)),
            // --help and --version anywhere but first, as getopt's caller sees them.
            _ => {
                report::try_help(prog);
                return Err(Exit);
            }
        }
    }
    if let Some(first) = parsed.operands.first() {
        return Err(fail_hint(
            prog,
            format_args!("too many command-line arguments (first is \"{first}\")"),
        ));
    }
    if args.target.as_deref() == Some("client") {
        args.target = None;
    }
    if args.target.is_some() && format_given {
        return Err(fail_hint(
            prog,
            "cannot specify both format and backup target",
        ));
    }
    if args.basedir.is_none() && args.target.is_none() {
        return Err(fail_hint(
            prog,
            "must specify output directory or backup target",
        ));
    }
    if args.basedir.is_some() && args.target.is_some() {
        return Err(fail_hint(
            prog,
            "cannot specify both output directory and backup target",
        ));
    }
    let location = match compress.location {
        Location::Unspecified if args.target.is_some() => Location::Server,
        Location::Unspecified => Location::Client,
        other => other,
    };
    if location == Location::Client {
        let algorithm = Algorithm::parse(&compress.algorithm).ok_or_else(|| {
            fail(
                prog,
                format_args!(
                    "unrecognized compression algorithm: \"{}\"",
                    compress.algorithm
                ),
            )
        })?;
        let checked = spec::parse_spec(algorithm, compress.detail.as_deref())
            .map_err(|e| fail(prog, format_args!("invalid compression specification: {e}")))?;
        args.client_compression = match algorithm {
            Algorithm::None => None,
            Algorithm::Gzip => Some(ClientCompression::Gzip(checked.level.map(|l| l as u32))),
            Algorithm::Lz4 => Some(ClientCompression::Lz4(checked.level.map(|l| l as u32))),
            Algorithm::Zstd => Some(ClientCompression::Zstd(checked.level)),
        };
    } else {
        args.server_compression = Some((compress.algorithm.clone(), compress.detail.clone()));
    }
    if args.target.is_some() && location == Location::Client && args.client_compression.is_some() {
        return Err(fail_hint(
            prog,
            "client-side compression is not possible when a backup target is specified",
        ));
    }
    if args.format == Format::Plain && args.client_compression.is_some() {
        return Err(fail_hint(prog, "only tar mode backups can be compressed"));
    }
    if args.target.is_some() && args.wal == WalMethod::Stream {
        return Err(fail_hint(
            prog,
            "WAL cannot be streamed when a backup target is specified",
        ));
    }
    let to_stdout = args.basedir.as_deref() == Some(Path::new("-"));
    if args.format == Format::Tar && args.wal == WalMethod::Stream && to_stdout {
        return Err(fail_hint(
            prog,
            "cannot stream write-ahead logs in tar mode to stdout",
        ));
    }
    if args.slot.is_some() && args.wal != WalMethod::Stream {
        return Err(fail_hint(
            prog,
            "replication slots can only be used with WAL streaming",
        ));
    }
    if no_slot {
        if args.slot.is_some() {
            return Err(fail_hint(prog, "--no-slot cannot be used with slot name"));
        }
        args.temp_slot = false;
    }
    if args.create_slot {
        if args.slot.is_none() {
            return Err(fail_hint(
                prog,
                "--create-slot needs a slot to be specified using --slot",
            ));
        }
        if no_slot {
            return Err(fail_hint(
                prog,
                "--create-slot and --no-slot are incompatible options",
            ));
        }
    }
    if let Some(waldir) = &args.waldir {
        if args.target.is_some() {
            return Err(fail_hint(
                prog,
                "WAL directory location cannot be specified along with a backup target",
            ));
        }
        if args.format != Format::Plain {
            return Err(fail_hint(
                prog,
                "WAL directory location can only be specified in plain mode",
            ));
        }
        if !waldir.is_absolute() {
            return Err(fail_hint(
                prog,
                "WAL directory location must be an absolute path",
            ));
        }
    }
    if args.progress && !args.estimate_size {
        return Err(fail_hint(
            prog,
            "--progress and --no-estimate-size are incompatible options",
        ));
    }
    if args.manifest == ManifestMode::No && args.manifest_checksums.is_some() {
        return Err(fail_hint(
            prog,
            "--no-manifest and --manifest-checksums are incompatible options",
        ));
    }
    if args.manifest == ManifestMode::No && force_encode {
        return Err(fail_hint(
            prog,
            "--no-manifest and --manifest-force-encode are incompatible options",
        ));
    }
    if force_encode {
        args.manifest = ManifestMode::ForceEncode;
    }
    if args.format == Format::Tar
        && args.write_recovery
        && args
            .server_compression
            .as_ref()
            .is_some_and(|(a, d)| !(a == "none" && d.is_none()))
    {
        return Err(fail(
            prog,
            "cannot parse a server-compressed archive: the -R option requires pg_basebackup to parse the archive; use client-side compression",
        ));
    }
    Ok(args)
}

fn parse_int(text: &str) -> Option<i64> {
    let t = text.trim_start();
    let digits = t.strip_prefix(['+', '-']).unwrap_or(t);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    t.parse().ok()
}

/// `--max-rate` as pg_basebackup reads it: kB/s, optionally with a `k` or `M` unit.
fn parse_max_rate(prog: &str, src: &str) -> Result<u32, Exit> {
    let trimmed = src.trim_start();
    let end = trimmed
        .char_indices()
        .find(|&(i, c)| !(c.is_ascii_digit() || c == '.' || (i == 0 && (c == '-' || c == '+'))))
        .map_or(trimmed.len(), |(i, _)| i);
    let (number, suffix) = trimmed.split_at(end);
    let Ok(value) = number.parse::<f64>() else {
        return Err(fail(
            prog,
            format_args!("transfer rate \"{src}\" is not a valid value"),
        ));
    };
    if value <= 0.0 {
        return Err(fail(prog, "transfer rate must be greater than zero"));
    }
    let factor = match suffix.trim() {
        "" | "k" => 1.0,
        "M" => 1024.0,
        other => {
            return Err(fail(
                prog,
                format_args!("invalid --max-rate unit: \"{other}\""),
            ))
        }
    };
    let rate = value * factor;
    if rate >= u32::MAX as f64 {
        return Err(fail(
            prog,
            format_args!("transfer rate \"{src}\" exceeds integer range"),
        ));
    }
    let rate = rate as u32;
    if !(32..=1_048_576).contains(&rate) {
        return Err(fail(
            prog,
            format_args!("transfer rate \"{src}\" is out of range"),
        ));
    }
    Ok(rate)
}

/// `-T OLDDIR=NEWDIR` with pg_basebackup's checks and messages.
fn parse_mapping(prog: &str, arg: &str, mapping: &mut TablespaceMapping) -> Result<(), Exit> {
    let (mut old, mut new, mut seen) = (String::new(), String::new(), false);
    let mut chars = arg.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' && chars.peek() == Some(&'=') {
            chars.next();
            if seen { &mut new } else { &mut old }.push('=');
        } else if c == '=' {
            if seen {
                return Err(fail(prog, "multiple \"=\" signs in tablespace mapping"));
            }
            seen = true;
        } else if seen {
            new.push(c);
        } else {
            old.push(c);
        }
    }
    if old.is_empty() || new.is_empty() {
        return Err(fail(
            prog,
            format_args!("invalid tablespace mapping format \"{arg}\", must be \"OLDDIR=NEWDIR\""),
        ));
    }
    let (old, new) = (
        basebackup::sink::canonical_path(&old),
        basebackup::sink::canonical_path(&new),
    );
    if !old.starts_with('/') {
        return Err(fail(
            prog,
            format_args!("old directory is not an absolute path in tablespace mapping: {old}"),
        ));
    }
    if !new.starts_with('/') {
        return Err(fail(
            prog,
            format_args!("new directory is not an absolute path in tablespace mapping: {new}"),
        ));
    }
    mapping.add(&old, new);
    Ok(())
}

/// Prints a server notice as libpq's default notice processor does.
fn print_notice(notice: &Notice) {
    let mut text = format!("{}:  {}\n", notice.severity, notice.message);
    if let Some(detail) = &notice.detail {
        text.push_str(&format!("DETAIL:  {detail}\n"));
    }
    if let Some(hint) = &notice.hint {
        text.push_str(&format!("HINT:  {hint}\n"));
    }
    let _ = std::io::stderr().write_all(text.as_bytes());
}

/// A server error in libpq's words (`ERROR:  message`), or the error's own text.
fn server_text(error: &dyn ErrorWithDb) -> String {
    match error.db() {
        Some(db) => format!("{}:  {}", db.severity, db.message),
        None => error.text(),
    }
}

trait ErrorWithDb {
    fn db(&self) -> Option<&pgwire_repl::DbError>;
    fn text(&self) -> String;
}

impl ErrorWithDb for basebackup::Error {
    fn db(&self) -> Option<&pgwire_repl::DbError> {
        self.db_error()
    }
    fn text(&self) -> String {
        self.to_string()
    }
}

impl ErrorWithDb for pgwire_repl::Error {
    fn db(&self) -> Option<&pgwire_repl::DbError> {
        self.db_error()
    }
    fn text(&self) -> String {
        self.to_string()
    }
}

/// A directory this run writes into, and whether it made it or found it empty: what
/// the clean-up after a failure removes.
#[derive(Debug)]
struct OwnedDir {
    path: PathBuf,
    made: bool,
    /// `data` or `WAL`, for the messages.
    what: &'static str,
}

/// Creates `dir` (and its parents) or checks that it is empty, as pg_basebackup's
/// `verify_dir_is_empty_or_create`.
fn empty_or_create(
    prog: &str,
    dir: &Path,
    mode: u32,
    what: &'static str,
) -> Result<OwnedDir, Exit> {
    match fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(fail(
                    prog,
                    format_args!("directory \"{}\" exists but is not empty", dir.display()),
                ));
            }
            Ok(OwnedDir {
                path: dir.to_path_buf(),
                made: false,
                what,
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent() {
                let _ = fs::DirBuilder::new()
                    .recursive(true)
                    .mode(mode)
                    .create(parent);
            }
            fs::DirBuilder::new()
                .mode(mode)
                .create(dir)
                .and_then(|()| fs::set_permissions(dir, fs::Permissions::from_mode(mode)))
                .map_err(|e| {
                    fail(
                        prog,
                        format_args!("could not create directory \"{}\": {e}", dir.display()),
                    )
                })?;
            Ok(OwnedDir {
                path: dir.to_path_buf(),
                made: true,
                what,
            })
        }
        Err(e) => Err(fail(
            prog,
            format_args!("could not access directory \"{}\": {e}", dir.display()),
        )),
    }
}

fn clean_up(prog: &str, dirs: &[OwnedDir], no_clean: bool) {
    for dir in dirs {
        let (path, what) = (dir.path.display(), dir.what);
        if no_clean {
            eprintln!("{prog}: {what} directory \"{path}\" not removed at user's request");
            continue;
        }
        if dir.made {
            eprintln!("{prog}: removing {what} directory \"{path}\"");
            if fs::remove_dir_all(&dir.path).is_err() {
                report::error(prog, format_args!("failed to remove {what} directory"));
            }
        } else {
            eprintln!("{prog}: removing contents of {what} directory \"{path}\"");
            let removed = fs::read_dir(&dir.path).and_then(|entries| {
                for entry in entries {
                    let entry = entry?;
                    if entry.file_type()?.is_dir() {
                        fs::remove_dir_all(entry.path())?;
                    } else {
                        fs::remove_file(entry.path())?;
                    }
                }
                Ok(())
            });
            if removed.is_err() {
                report::error(
                    prog,
                    format_args!("failed to remove contents of {what} directory"),
                );
            }
        }
    }
}

async fn run(prog: &str, args: &Args) -> Result<(), Exit> {
    let mut owned: Vec<OwnedDir> = Vec::new();
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    // Interrupted or terminated, what this run created is removed (the real tool dies
    // without its clean-up then).
    let outcome = tokio::select! {
        result = backup(prog, args, &mut owned) => result,
        _ = tokio::signal::ctrl_c() => Err(fail(prog, "interrupted")),
        () = terminate => Err(fail(prog, "terminated")),
    };
    if outcome.is_err() {
        clean_up(prog, &owned, args.no_clean);
    }
    outcome
}

async fn backup(prog: &str, args: &Args, owned: &mut Vec<OwnedDir>) -> Result<(), Exit> {
    let verbose = args.verbose > 0;
    let info = |message: std::fmt::Arguments<'_>| {
        if verbose {
            eprintln!("{prog}: {message}");
        }
    };
    let mut config = args.conn.config(prog).map_err(|e| fail(prog, e))?;
    // As libpq's PQconninfo, the role is written into -R's primary_conninfo even when
    // it was the default (the standby may run as another OS user).
    if config.user.is_none() {
        config.user = config.effective_user().ok();
    }
    let connect_options = ConnectOptions {
        notice_handler: Some(Arc::new(print_notice)),
        ..ConnectOptions::default()
    };
    let mut client = args
        .conn
        .connect(&mut config, &connect_options)
        .await
        .map_err(|e| fail(prog, e))?;
    let major = client.server_major();
    if major > report::NEWEST_MAJOR {
        return Err(fail(
            prog,
            format_args!("incompatible server version {major}"),
        ));
    }
    // The source's data directory mode decides the backup's (group access or not).
    let dir_mode = match client.show("data_directory_mode").await {
        Ok(mode) if u32::from_str_radix(mode.trim(), 8).is_ok_and(|m| m & 0o070 != 0) => 0o750,
        _ => 0o700,
    };
    let file_mode = dir_mode & 0o666;
    // The source's data directory, when the role may read it: a target inside it on
    // this host is refused (tablespace locations are always checked).
    let source_dirs: Vec<PathBuf> = client
        .show("data_directory")
        .await
        .ok()
        .filter(|dir| dir.starts_with('/'))
        .map(PathBuf::from)
        .into_iter()
        .collect();
    if let Some(target) = &args.target {
        return backup_to_target(prog, args, target, client, major).await;
    }
    let basedir = args.basedir.clone().unwrap_or_default();
    let to_stdout = args.format == Format::Tar && basedir == Path::new("-");
    if !to_stdout {
        owned.push(empty_or_create(prog, &basedir, dir_mode, "data")?);
    }
    let wal_dir = match &args.waldir {
        Some(waldir) => {
            owned.push(empty_or_create(prog, waldir, dir_mode, "WAL")?);
            waldir.clone()
        }
        None if args.format == Format::Tar => basedir.join("pg_wal.streaming"),
        None => basedir.join("pg_wal"),
    };

    if args.create_slot {
        let slot = args.slot.as_deref().unwrap_or_default();
        info(format_args!("creating replication slot \"{slot}\""));
        client
            .create_physical_slot(
                slot,
                pgwire_repl::client::SlotOptions {
                    temporary: false,
                    reserve_wal: true,
                },
            )
            .await
            .map_err(|e| {
                fail(
                    prog,
                    format_args!(
                        "could not create replication slot \"{slot}\": {}",
                        server_text(&e)
                    ),
                )
            })?;
    }

    if let Some(old) = &args.incremental {
        if major < 17 {
            return Err(fail(prog, "server does not support incremental backup"));
        }
        let manifest = fs::read(old).map_err(|e| {
            fail(
                prog,
                format_args!("could not read file \"{}\": {e}", old.display()),
            )
        })?;
        client.upload_manifest(&manifest).await.map_err(|e| {
            fail(
                prog,
                format_args!(
                    "could not send replication command \"UPLOAD_MANIFEST\": {}",
                    server_text(&e)
                ),
            )
        })?;
    }
    let manifest_checksums = match &args.manifest_checksums {
        None => ChecksumAlgorithm::Crc32c,
        Some(name) => ChecksumAlgorithm::parse(name)
            .ok_or_else(|| fail(prog, format_args!("invalid checksum algorithm \"{name}\"")))?,
    };
    let server_compression = args.server_compression.as_ref().map(|(algorithm, detail)| {
        (
            ServerCompression::new(server_method(algorithm)),
            (algorithm.clone(), detail.clone()),
        )
    });
    if server_compression.is_some() && major < 15 {
        return Err(fail(
            prog,
            "server does not support server-side compression",
        ));
    }
    let none_requested = args
        .server_compression
        .as_ref()
        .is_some_and(|(a, d)| a == "none" && d.is_none());
    let backup_options = BackupOptions {
        label: args.label.clone(),
        progress: args.estimate_size,
        checkpoint: args.checkpoint,
        wal: args.wal == WalMethod::Fetch,
        wait: false,
        max_rate: args.max_rate,
        tablespace_map: args.format == Format::Tar,
        verify_checksums: args.verify_checksums,
        manifest: args.manifest,
        manifest_checksums,
        compression: server_compression
            .as_ref()
            .filter(|_| !none_requested)
            .map(|(c, _)| *c),
        compression_as_given: server_compression
            .filter(|_| !none_requested)
            .map(|(_, given)| given),
        incremental: args.incremental.is_some(),
        idle_timeout: None,
        ..BackupOptions::default()
    };
    info(format_args!(
        "initiating base backup, waiting for checkpoint to complete"
    ));
    if args.progress && !verbose {
        // SAFETY: isatty only inspects the descriptor.
        let tty = unsafe { libc::isatty(2) } == 1;
        eprint!("waiting for checkpoint{}", if tty { '\r' } else { '\n' });
    }
    let mut backup = BaseBackup::start(client, backup_options)
        .await
        .map_err(|e| {
            fail(
                prog,
                format_args!("could not initiate base backup: {}", server_text(&e)),
            )
        })?;
    let (start_lsn, timeline) = (backup.start_lsn(), backup.timeline());
    info(format_args!("checkpoint completed"));
    info(format_args!(
        "write-ahead log start point: {start_lsn} on timeline {timeline}"
    ));
    backup.read_tablespaces().await.map_err(|e| {
        fail(
            prog,
            format_args!("could not get backup header: {}", server_text(&e)),
        )
    })?;

    // WAL streaming on a second connection, from the backup's start.
    let (endpos_tx, endpos_rx) = watch::channel(None);
    let mut wal_task = None;
    if args.wal == WalMethod::Stream {
        if args.waldir.is_none() {
            fs::DirBuilder::new()
                .mode(dir_mode)
                .create(&wal_dir)
                .and_then(|()| fs::set_permissions(&wal_dir, fs::Permissions::from_mode(dir_mode)))
                .map_err(|e| {
                    fail(
                        prog,
                        format_args!("could not create directory \"{}\": {e}", wal_dir.display()),
                    )
                })?;
        }
        info(format_args!("starting background WAL receiver"));
        let mut receive = walstream::ReceiveOptions::new(&wal_dir);
        receive.start_position = Some(start_lsn);
        receive.no_loop = true;
        receive.endpos_updates = Some(endpos_rx);
        receive.dir_options.sync = args.sync;
        if let Some(interval) = args.status_interval {
            receive.status_interval = Some(interval);
        }
        match &args.slot {
            Some(slot) => {
                receive.slot = Some(slot.clone());
                receive.report_flush = Some(true);
            }
            None if args.temp_slot => {
                receive.slot = Some(format!("pg_basebackup_{}", std::process::id()));
                receive.temporary_slot = true;
                receive.report_flush = Some(false);
                info(format_args!(
                    "created temporary replication slot \"pg_basebackup_{}\"",
                    std::process::id()
                ));
            }
            None => {}
        }
        let config = config.clone();
        wal_task = Some(tokio::spawn(async move {
            walstream::receive_wal(&config, &receive, std::future::pending()).await
        }));
    }

    let sink_options = SinkOptions {
        allow_non_empty: true,
        keep_on_failure: args.no_clean,
        no_sync: !args.sync,
    };
    let sink: Box<dyn BackupSink> = match args.format {
        Format::Tar if to_stdout => {
            Box::new(TarStreamSink::new(StdoutOut::new(args.client_compression)))
        }
        Format::Plain => Box::new(
            PlainDirSink::new(&basedir)
                .tablespace_mapping(args.mapping.clone())
                .source_directories(source_dirs)
                .data_directory_mode(dir_mode)
                .options(sink_options),
        ),
        Format::Tar => {
            let mut sink = TarSink::new(&basedir).options(sink_options);
            if let Some(compression) = args.client_compression {
                sink = sink.compress(compression);
            }
            Box::new(sink)
        }
    };
    let sink: Box<dyn BackupSink> = if args.write_recovery && args.format == Format::Tar {
        Box::new(RecoveryInjector::new(
            sink,
            recovery_lines(args, &config, major).into_bytes(),
        ))
    } else {
        sink
    };
    let last_progress = Arc::new(std::sync::Mutex::new(None::<basebackup::Progress>));
    let progress_fn: Option<basebackup::ProgressFn> = args.progress.then(|| {
        let mut last = std::time::Instant::now() - Duration::from_secs(2);
        let keep = Arc::clone(&last_progress);
        Box::new(move |p: &basebackup::Progress| {
            if let Ok(mut slot) = keep.lock() {
                *slot = Some(p.clone());
            }
            if last.elapsed() >= Duration::from_secs(1) {
                last = std::time::Instant::now();
                print_progress(p, p.archive_index, false);
            }
        }) as basebackup::ProgressFn
    });
    let show_progress = args.progress;
    // The clean-up after a failure must not run while the writer thread may still
    // create files: the sink says when that thread has let go of it.
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
    let sink = Box::new(SignalWhenDropped {
        inner: sink,
        _stopped: stopped_tx,
    });
    let writer_stopped = async move {
        let _ = tokio::time::timeout(Duration::from_secs(60), stopped_rx).await;
    };
    let mut receiving = tokio::spawn(async move {
        backup
            .receive(sink, progress_fn)
            .await
            .map(|(result, _sink)| result)
    });
    // Dropped on an interruption too: nothing keeps writing behind the clean-up.
    let _stop_backup = AbortOnDrop(receiving.abort_handle());
    let _stop_wal = wal_task
        .as_ref()
        .map(|task| AbortOnDrop(task.abort_handle()));
    let result = tokio::select! {
        joined = &mut receiving => joined,
        wal = async {
            match wal_task.as_mut() {
                Some(task) => task.await,
                None => std::future::pending().await,
            }
        } => {
            if let Ok(Err(e)) = &wal {
                report::error(prog, wal_error_text(e));
            }
            receiving.abort();
            let _ = receiving.await;
            writer_stopped.await;
            return Err(fail(prog, "background process terminated unexpectedly"));
        }
    };
    let result = match result {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => {
            writer_stopped.await;
            if let Some(task) = wal_task.take() {
                task.abort();
                let _ = task.await;
            }
            return Err(match e.sqlstate() {
                Some("XX001") => fail(prog, "checksum error occurred"),
                _ if e.db_error().is_some() => {
                    fail(prog, format_args!("backup failed: {}", server_text(&e)))
                }
                _ => fail(prog, e),
            });
        }
        Err(e) => {
            writer_stopped.await;
            return Err(fail(prog, format_args!("the backup task failed: {e}")));
        }
    };
    if show_progress {
        let last = last_progress.lock().ok().and_then(|slot| slot.clone());
        if let Some(p) = last {
            let mut p = p;
            p.bytes_done = result.bytes.max(p.bytes_done);
            print_progress(&p, p.archives, true);
        }
    }
    let end_lsn = result.end_lsn;
    info(format_args!("write-ahead log end point: {end_lsn}"));

    if let Some(task) = wal_task.take() {
        info(format_args!(
            "waiting for background process to finish streaming ..."
        ));
        let _ = endpos_tx.send(Some(end_lsn));
        let summary = match task.await {
            Ok(Ok(summary)) => summary,
            Ok(Err(e)) => {
                report::error(prog, wal_error_text(&e));
                return Err(fail(prog, "could not finish writing WAL files"));
            }
            Err(_) => return Err(fail(prog, "background process terminated unexpectedly")),
        };
        if summary.flushed < end_lsn {
            return Err(fail(
                prog,
                format_args!(
                    "WAL streaming stopped at {} before the backup's end {end_lsn}",
                    summary.flushed
                ),
            ));
        }
        standby::clone::finish_wal_dir(&wal_dir, start_lsn, end_lsn, timeline, args.sync)
            .map_err(|e| fail(prog, e))?;
        if args.format == Format::Tar {
            let archive = basedir.join("pg_wal.tar");
            standby::waltar::pack_wal_dir(&wal_dir, &archive, args.sync)
                .map_err(|e| fail(prog, e))?;
            if let Some(compression) = args.client_compression {
                compress_file(&archive, compression, args.sync).map_err(|e| {
                    fail(
                        prog,
                        format_args!("could not compress \"{}\": {e}", archive.display()),
                    )
                })?;
            }
        } else {
            set_modes(&wal_dir, dir_mode, file_mode);
        }
    }

    if let (Some(waldir), Format::Plain) = (&args.waldir, args.format) {
        move_wal_dir(
            &basedir.join("pg_wal"),
            waldir,
            args.wal == WalMethod::Stream,
        )
        .map_err(|e| {
            fail(
                prog,
                format_args!(
                    "could not create symbolic link \"{}\": {e}",
                    basedir.join("pg_wal").display()
                ),
            )
        })?;
    }

    if args.wal == WalMethod::Stream && args.format == Format::Plain {
        let final_wal = args
            .waldir
            .clone()
            .unwrap_or_else(|| basedir.join("pg_wal"));
        mark_done(&final_wal, file_mode).map_err(|e| {
            fail(
                prog,
                format_args!(
                    "could not mark streamed WAL as archived in \"{}\": {e}",
                    final_wal.display()
                ),
            )
        })?;
    }
    if args.write_recovery {
        write_recovery(prog, args, &config, major, &basedir)?;
    }
    if to_stdout {
        info(format_args!("base backup completed"));
        return Ok(());
    }
    if dir_mode != 0o700 {
        // Group access on the source: what this run wrote itself gets it too (the
        // files extracted from the server keep the modes the server sent).
        match args.format {
            Format::Tar => set_modes(&basedir, dir_mode, file_mode),
            Format::Plain => {
                let manifest = basedir.join("backup_manifest");
                if manifest.exists() {
                    let _ = fs::set_permissions(&manifest, fs::Permissions::from_mode(file_mode));
                }
            }
        }
    }
    if args.sync {
        info(format_args!("syncing data to disk ..."));
        if let Ok(dir) = fs::File::open(&basedir) {
            let _ = dir.sync_all();
        }
    }
    info(format_args!("base backup completed"));
    Ok(())
}

/// The method used to decode what the server compressed. An algorithm the server does
/// not know is sent as typed and refused by the server, so any method does here.
fn server_method(algorithm: &str) -> CompressionMethod {
    match algorithm {
        "lz4" => CompressionMethod::Lz4,
        "zstd" => CompressionMethod::Zstd,
        _ => CompressionMethod::Gzip,
    }
}

/// What the WAL stream reports when it fails: the server's error in libpq's words when
/// there is one.
fn wal_error_text(error: &walstream::Error) -> String {
    match error.db_error() {
        Some(db) => format!(
            "could not receive write-ahead log: {}:  {}",
            db.severity, db.message
        ),
        None => error.to_string(),
    }
}

/// Standard output for `-D - -Ft`, compressed as asked; the one `flush` at the end of
/// the stream also ends the compressed stream.
enum StdoutOut {
    Plain(std::io::Stdout),
    Gzip(flate2::write::GzEncoder<std::io::Stdout>),
    Lz4(Option<lz4_flex::frame::FrameEncoder<std::io::Stdout>>),
    Zstd(zstd::stream::write::Encoder<'static, std::io::Stdout>),
}

impl StdoutOut {
    fn new(compression: Option<ClientCompression>) -> StdoutOut {
        let out = std::io::stdout();
        match compression {
            None => StdoutOut::Plain(out),
            Some(ClientCompression::Gzip(level)) => StdoutOut::Gzip(flate2::write::GzEncoder::new(
                out,
                level.map_or(flate2::Compression::default(), |l| {
                    flate2::Compression::new(l.min(9))
                }),
            )),
            Some(ClientCompression::Lz4(_)) => {
                StdoutOut::Lz4(Some(lz4_flex::frame::FrameEncoder::new(out)))
            }
            Some(ClientCompression::Zstd(level)) => {
                match zstd::stream::write::Encoder::new(std::io::stdout(), level.unwrap_or(0)) {
                    Ok(encoder) => StdoutOut::Zstd(encoder),
                    // Only a bad level fails here, and the level was checked.
                    Err(_) => StdoutOut::Plain(std::io::stdout()),
                }
            }
        }
    }
}

impl Write for StdoutOut {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        match self {
            StdoutOut::Plain(w) => w.write(data),
            StdoutOut::Gzip(w) => w.write(data),
            StdoutOut::Lz4(Some(w)) => w.write(data),
            StdoutOut::Lz4(None) => Err(std::io::Error::other("the lz4 stream has ended")),
            StdoutOut::Zstd(w) => w.write(data),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            StdoutOut::Plain(w) => w.flush(),
            StdoutOut::Gzip(w) => {
                w.try_finish()?;
                w.get_mut().flush()
            }
            StdoutOut::Lz4(w) => match w.take() {
                Some(encoder) => encoder.finish().map_err(std::io::Error::other)?.flush(),
                None => Ok(()),
            },
            StdoutOut::Zstd(w) => {
                w.do_finish()?;
                w.get_mut().flush()
            }
        }
    }
}

/// `-R` in tar format: adds `standby.signal` and a `postgresql.auto.conf` (the one in
/// the backup, with the standby settings appended) at the end of the base archive,
/// before its end-of-archive blocks, so that it works with client-side compression
/// too. A later member of the same name replaces the earlier one on extraction; the
/// manifest lists the server's file, as with pg_basebackup (whose verification tools
/// skip these two files).
struct RecoveryInjector {
    inner: Box<dyn BackupSink>,
    lines: Vec<u8>,
    in_base: bool,
    /// Bytes of the base archive held back: they may be the end-of-archive blocks.
    tail: Vec<u8>,
    auto_conf: Vec<u8>,
    collecting: bool,
}

/// Two zero blocks end a tar archive.
const TAR_END: usize = 1024;

impl RecoveryInjector {
    fn new(inner: Box<dyn BackupSink>, lines: Vec<u8>) -> RecoveryInjector {
        RecoveryInjector {
            inner,
            lines,
            in_base: false,
            tail: Vec::new(),
            auto_conf: Vec::new(),
            collecting: false,
        }
    }

    fn members(&self) -> basebackup::Result<Vec<u8>> {
        let mut conf = self.auto_conf.clone();
        conf.extend_from_slice(&self.lines);
        let mut out = Vec::new();
        for (name, data) in [
            ("postgresql.auto.conf", conf.as_slice()),
            ("standby.signal", &[][..]),
        ] {
            let header = basebackup::sink::regular_member_header(name, data.len() as u64)?;
            out.extend_from_slice(header.as_bytes());
            out.extend_from_slice(data);
            out.resize(out.len() + (512 - data.len() % 512) % 512, 0);
        }
        Ok(out)
    }
}

impl BackupSink for RecoveryInjector {
    fn begin_backup(&mut self, info: &basebackup::BackupInfo) -> basebackup::Result<()> {
        self.inner.begin_backup(info)
    }
    fn begin_archive(&mut self, archive: &basebackup::ArchiveInfo) -> basebackup::Result<()> {
        self.in_base = archive.is_base();
        self.tail.clear();
        self.inner.begin_archive(archive)
    }
    fn compressed_bytes(&mut self, data: &basebackup::Bytes) -> basebackup::Result<()> {
        self.inner.compressed_bytes(data)
    }
    fn archive_bytes(&mut self, data: &basebackup::Bytes) -> basebackup::Result<()> {
        if !self.in_base {
            return self.inner.archive_bytes(data);
        }
        self.tail.extend_from_slice(data);
        if self.tail.len() > TAR_END {
            let ready: Vec<u8> = self.tail.drain(..self.tail.len() - TAR_END).collect();
            self.inner.archive_bytes(&basebackup::Bytes::from(ready))?;
        }
        Ok(())
    }
    fn entry(&mut self, event: &basebackup::TarEvent) -> basebackup::Result<()> {
        if self.in_base {
            match event {
                basebackup::TarEvent::File { path, .. } => {
                    self.collecting = path.as_slice() == b"postgresql.auto.conf";
                    if self.collecting {
                        self.auto_conf.clear();
                    }
                }
                basebackup::TarEvent::Data(data) if self.collecting => {
                    self.auto_conf.extend_from_slice(data)
                }
                basebackup::TarEvent::FileEnd => self.collecting = false,
                _ => {}
            }
        }
        self.inner.entry(event)
    }
    fn end_archive(&mut self, trailer_present: bool) -> basebackup::Result<()> {
        if self.in_base {
            let tail = std::mem::take(&mut self.tail);
            let members = self.members()?;
            if trailer_present {
                if tail.len() != TAR_END || tail.iter().any(|&b| b != 0) {
                    return Err(basebackup::Error::protocol(
                        "the base archive does not end with the end-of-archive blocks",
                    ));
                }
                self.inner
                    .archive_bytes(&basebackup::Bytes::from(members))?;
                self.inner.archive_bytes(&basebackup::Bytes::from(tail))?;
            } else {
                self.inner.archive_bytes(&basebackup::Bytes::from(tail))?;
                self.inner
                    .archive_bytes(&basebackup::Bytes::from(members))?;
            }
        }
        self.inner.end_archive(trailer_present)
    }
    fn commit(&mut self, manifest: Option<&[u8]>) -> basebackup::Result<()> {
        self.inner.commit(manifest)
    }
    fn abort(&mut self, reason: &basebackup::Error) {
        self.inner.abort(reason)
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A sink that says when the writer thread has dropped it.
struct SignalWhenDropped {
    inner: Box<dyn BackupSink>,
    _stopped: tokio::sync::oneshot::Sender<()>,
}

impl BackupSink for SignalWhenDropped {
    fn begin_backup(&mut self, info: &basebackup::BackupInfo) -> basebackup::Result<()> {
        self.inner.begin_backup(info)
    }
    fn begin_archive(&mut self, archive: &basebackup::ArchiveInfo) -> basebackup::Result<()> {
        self.inner.begin_archive(archive)
    }
    fn compressed_bytes(&mut self, data: &basebackup::Bytes) -> basebackup::Result<()> {
        self.inner.compressed_bytes(data)
    }
    fn archive_bytes(&mut self, data: &basebackup::Bytes) -> basebackup::Result<()> {
        self.inner.archive_bytes(data)
    }
    fn entry(&mut self, event: &basebackup::TarEvent) -> basebackup::Result<()> {
        self.inner.entry(event)
    }
    fn end_archive(&mut self, trailer_present: bool) -> basebackup::Result<()> {
        self.inner.end_archive(trailer_present)
    }
    fn commit(&mut self, manifest: Option<&[u8]>) -> basebackup::Result<()> {
        self.inner.commit(manifest)
    }
    fn abort(&mut self, reason: &basebackup::Error) {
        self.inner.abort(reason)
    }
}

/// `--target`: the server writes the backup (`server:/path`) or discards it
/// (`blackhole`); only the start and end positions come here.
async fn backup_to_target(
    prog: &str,
    args: &Args,
    target: &str,
    client: pgwire_repl::ReplicationClient,
    major: u32,
) -> Result<(), Exit> {
    if major < 15 {
        return Err(fail(
            prog,
            "backup targets are not supported by this server version",
        ));
    }
    if args.write_recovery {
        return Err(fail(
            prog,
            "recovery configuration cannot be written when a backup target is used",
        ));
    }
    let (name, detail) = match target.split_once(':') {
        Some((name, detail)) => (name.to_string(), Some(detail.to_string())),
        None => (target.to_string(), None),
    };
    let compression_as_given = args
        .server_compression
        .clone()
        .filter(|(a, d)| !(a == "none" && d.is_none()));
    let manifest_checksums = match &args.manifest_checksums {
        None => ChecksumAlgorithm::Crc32c,
        Some(name) => ChecksumAlgorithm::parse(name)
            .ok_or_else(|| fail(prog, format_args!("invalid checksum algorithm \"{name}\"")))?,
    };
    let options = BackupOptions {
        label: args.label.clone(),
        progress: args.estimate_size,
        checkpoint: args.checkpoint,
        wal: args.wal == WalMethod::Fetch,
        wait: false,
        max_rate: args.max_rate,
        verify_checksums: args.verify_checksums,
        manifest: args.manifest,
        manifest_checksums,
        compression: compression_as_given
            .as_ref()
            .map(|(algorithm, _)| ServerCompression::new(server_method(algorithm))),
        compression_as_given,
        target: Some((name, detail)),
        idle_timeout: None,
        ..BackupOptions::default()
    };
    let backup = BaseBackup::start(client, options).await.map_err(|e| {
        fail(
            prog,
            format_args!("could not initiate base backup: {}", server_text(&e)),
        )
    })?;
    match backup.finish_elsewhere().await {
        Ok(result) => {
            if args.verbose > 0 {
                eprintln!("{prog}: write-ahead log end point: {}", result.end_lsn);
                eprintln!("{prog}: base backup completed");
            }
            Ok(())
        }
        Err(e) if e.sqlstate() == Some("XX001") => Err(fail(prog, "checksum error occurred")),
        Err(e) => Err(fail(
            prog,
            format_args!("backup failed: {}", server_text(&e)),
        )),
    }
}

/// One progress line in pg_basebackup's form: `done/total kB (P%), n/m tablespaces`,
/// ended by `\r` on a terminal while the backup runs.
fn print_progress(p: &basebackup::Progress, archives_done: usize, finished: bool) {
    let done = p.bytes_done / 1024;
    let total = p.total_estimate.map_or(0, |t| t / 1024);
    let percent = (done * 100).checked_div(total).map_or(0, |p| p.min(100));
    let total = total.max(done).to_string();
    let plural = if p.archives == 1 { "" } else { "s" };
    // SAFETY: isatty only inspects the descriptor.
    let tty = unsafe { libc::isatty(2) } == 1;
    eprint!(
        "{done:>width$}/{total} kB ({percent}%), {archives_done}/{} tablespace{plural}{}",
        p.archives,
        if !finished && tty { '\r' } else { '\n' },
        width = total.len()
    );
}

/// Marks every streamed segment but the last (the one the backup ended in, which the
/// stream did not complete) as archived (`archive_status/<name>.done`), as
/// pg_basebackup's stream does, so that a restored server with archiving on does not
/// archive them again.
fn mark_done(wal_dir: &Path, file_mode: u32) -> std::io::Result<()> {
    let mut segments: Vec<String> = fs::read_dir(wal_dir)?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.len() == 24 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        .collect();
    segments.sort();
    segments.pop();
    if segments.is_empty() {
        return Ok(());
    }
    let status = wal_dir.join("archive_status");
    if !status.exists() {
        fs::DirBuilder::new().mode(0o700).create(&status)?;
    }
    for name in segments {
        let path = status.join(format!("{name}.done"));
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(file_mode))?;
    }
    Ok(())
}

/// Gives streamed WAL the backup's modes (group access when the source has it).
fn set_modes(dir: &Path, dir_mode: u32, file_mode: u32) {
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(dir_mode));
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                set_modes(&entry.path(), dir_mode, file_mode);
            } else if kind.is_file() {
                let _ = fs::set_permissions(entry.path(), fs::Permissions::from_mode(file_mode));
            }
        }
    }
}

/// `--waldir`: what the backup put into `<basedir>/pg_wal` goes into `waldir`, and
/// `pg_wal` becomes a link to it. Streamed WAL is already there.
fn move_wal_dir(pg_wal: &Path, waldir: &Path, streamed: bool) -> std::io::Result<()> {
    let _ = streamed;
    if fs::symlink_metadata(pg_wal).is_ok_and(|m| m.is_dir()) {
        for entry in fs::read_dir(pg_wal)? {
            let entry = entry?;
            let to = waldir.join(entry.file_name());
            if fs::symlink_metadata(&to).is_ok() {
                if entry.file_type()?.is_dir() {
                    for inner in fs::read_dir(entry.path())? {
                        let inner = inner?;
                        fs::rename(inner.path(), to.join(inner.file_name()))?;
                    }
                    fs::remove_dir(entry.path())?;
                }
                continue;
            }
            fs::rename(entry.path(), to)?;
        }
        fs::remove_dir(pg_wal)?;
    }
    std::os::unix::fs::symlink(waldir, pg_wal)
}

/// Compresses `path` in place into `path` + suffix, removing the original.
fn compress_file(path: &Path, compression: ClientCompression, sync: bool) -> std::io::Result<()> {
    let mut target = path.as_os_str().to_owned();
    target.push(compression.suffix());
    let target = PathBuf::from(target);
    let mut input = fs::File::open(path)?;
    let output = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&target)?;
    let file = match compression {
        ClientCompression::Gzip(level) => {
            let mut encoder = flate2::write::GzEncoder::new(
                output,
                level.map_or(flate2::Compression::default(), |l| {
                    flate2::Compression::new(l.min(9))
                }),
            );
            std::io::copy(&mut input, &mut encoder)?;
            encoder.finish()?
        }
        ClientCompression::Lz4(_) => {
            let mut encoder = lz4_flex::frame::FrameEncoder::new(output);
            std::io::copy(&mut input, &mut encoder)?;
            encoder.finish().map_err(std::io::Error::other)?
        }
        ClientCompression::Zstd(level) => {
            let mut encoder = zstd::stream::write::Encoder::new(output, level.unwrap_or(0))?;
            std::io::copy(&mut input, &mut encoder)?;
            encoder.finish()?
        }
    };
    if sync {
        file.sync_all()?;
    }
    fs::remove_file(path)
}

/// The `primary_conninfo` pg_basebackup -R writes: the connection's options without
/// `replication`, `dbname` and `fallback_application_name` (17+: with the `dbname`
/// given in `-d`).
fn recovery_lines(args: &Args, config: &pgwire_repl::Config, major: u32) -> String {
    let mut conninfo = standby::recovery::primary_conninfo(config, major);
    if major >= 17 {
        if let Some(dbname) = args.conn.explicit_dbname() {
            let mut one = pgwire_repl::Config::default();
            one.dbname = Some(dbname);
            let text = one.to_conninfo_string();
            if !conninfo.is_empty() {
                conninfo.push(' ');
            }
            conninfo.push_str(&text);
        }
    }
    let mut lines = format!(
        "primary_conninfo = {}\n",
        standby::recovery::quote_guc(&conninfo)
    );
    if let Some(slot) = &args.slot {
        lines.push_str(&format!("primary_slot_name = '{slot}'\n"));
    }
    lines
}

fn write_recovery(
    prog: &str,
    args: &Args,
    config: &pgwire_repl::Config,
    major: u32,
    basedir: &Path,
) -> Result<(), Exit> {
    let lines = recovery_lines(args, config, major);
    match args.format {
        Format::Plain => fs::write(basedir.join("standby.signal"), b"")
            .and_then(|()| standby::recovery::append_auto_conf(basedir, &lines))
            .map_err(|e| {
                fail(
                    prog,
                    format_args!("could not write the recovery configuration: {e}"),
                )
            }),
        // Added to base.tar while it was written (RecoveryInjector).
        Format::Tar => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(words: &[&str]) -> Result<Args, Exit> {
        let words: Vec<String> = words.iter().map(|w| w.to_string()).collect();
        parse_args("pg_basebackup", "pg_basebackup", &words)
    }

    #[test]
    fn option_checks() {
        assert!(parse(&[]).is_err());
        assert!(parse(&["-D", "/x", "-Tfoo"]).is_err());
        assert!(parse(&["-D", "/x", "-T/foo=/bar=/baz"]).is_err());
        assert!(parse(&["-D", "/x", "-T=/foo"]).is_err());
        assert!(parse(&["-D", "/x", "-C"]).is_err());
        assert!(parse(&["-D", "/x", "-C", "-S", "s", "--no-slot"]).is_err());
        assert!(parse(&["-D", "/x", "-S", "s", "-X", "none"]).is_err());
        assert!(parse(&["-D", "/x", "-z"]).is_err());
        let args = parse(&["-D", "/x", "-Ft", "-Z", "gzip:1", "-cfast"])
            .ok()
            .unwrap();
        assert_eq!(
            args.client_compression,
            Some(ClientCompression::Gzip(Some(1)))
        );
        assert_eq!(args.checkpoint, Checkpoint::Fast);
        let args = parse(&["-D", "/x", r"-T/a\=b=/c"]).ok().unwrap();
        assert_eq!(args.mapping.apply("/a=b"), PathBuf::from("/c"));
        let args = parse(&["-D", "/x", "-Z", "server-gzip:level=236"])
            .ok()
            .unwrap();
        assert_eq!(
            args.server_compression,
            Some(("gzip".to_string(), Some("level=236".to_string())))
        );
    }

    /// Records the archive bytes it is given.
    struct Record(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl BackupSink for Record {
        fn begin_backup(&mut self, _: &basebackup::BackupInfo) -> basebackup::Result<()> {
            Ok(())
        }
        fn begin_archive(&mut self, _: &basebackup::ArchiveInfo) -> basebackup::Result<()> {
            Ok(())
        }
        fn archive_bytes(&mut self, data: &basebackup::Bytes) -> basebackup::Result<()> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(())
        }
        fn end_archive(&mut self, trailer_present: bool) -> basebackup::Result<()> {
            if !trailer_present {
                self.0.lock().unwrap().extend_from_slice(&[0u8; 1024]);
            }
            Ok(())
        }
        fn commit(&mut self, _: Option<&[u8]>) -> basebackup::Result<()> {
            Ok(())
        }
        fn abort(&mut self, _: &basebackup::Error) {}
    }

    fn member(name: &str, data: &[u8]) -> Vec<u8> {
        let mut header = tar::Header::new_ustar();
        header.set_path(name).unwrap();
        header.set_size(data.len() as u64);
        header.set_mode(0o600);
        header.set_cksum();
        let mut out = header.as_bytes().to_vec();
        out.extend_from_slice(data);
        out.resize(out.len() + (512 - data.len() % 512) % 512, 0);
        out
    }

    #[test]
    fn recovery_configuration_is_added_before_the_end_blocks() {
        let base = basebackup::ArchiveInfo {
            name: "base.tar".into(),
            tablespace: basebackup::Tablespace {
                oid: None,
                location: None,
                size_estimate: None,
            },
            compression: None,
        };
        let conf = b"# Do not edit this file manually!\n";
        let mut stream = member("PG_VERSION", b"15\n");
        stream.extend(member("postgresql.auto.conf", conf));
        for trailer in [true, false] {
            let recorded = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let mut sink = RecoveryInjector::new(
                Box::new(Record(recorded.clone())),
                b"primary_conninfo = 'port=5'\n".to_vec(),
            );
            sink.begin_archive(&base).unwrap();
            let mut bytes = stream.clone();
            if trailer {
                bytes.extend_from_slice(&[0u8; 1024]);
            }
            for piece in bytes.chunks(300) {
                sink.archive_bytes(&basebackup::Bytes::copy_from_slice(piece))
                    .unwrap();
            }
            // The parsed view the pipeline gives alongside.
            for event in [
                basebackup::TarEvent::File {
                    path: b"postgresql.auto.conf".to_vec(),
                    mode: 0o600,
                    size: conf.len() as u64,
                },
                basebackup::TarEvent::Data(basebackup::Bytes::from_static(conf)),
                basebackup::TarEvent::FileEnd,
            ] {
                sink.entry(&event).unwrap();
            }
            sink.end_archive(trailer).unwrap();
            let out = recorded.lock().unwrap().clone();
            assert!(out.ends_with(&[0u8; 1024]));
            let mut archive = tar::Archive::new(out.as_slice());
            let mut seen = Vec::new();
            for entry in archive.entries().unwrap() {
                let mut entry = entry.unwrap();
                let name = entry.path().unwrap().display().to_string();
                let mut data = String::new();
                std::io::Read::read_to_string(&mut entry, &mut data).unwrap();
                seen.push((name, data));
            }
            let names: Vec<&str> = seen.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(
                names,
                [
                    "PG_VERSION",
                    "postgresql.auto.conf",
                    "postgresql.auto.conf",
                    "standby.signal"
                ]
            );
            assert_eq!(
                seen[2].1,
                "# Do not edit this file manually!\nprimary_conninfo = 'port=5'\n"
            );
        }
    }

    #[test]
    fn max_rate() {
        assert_eq!(parse_max_rate("p", "32").ok(), Some(32));
        assert_eq!(parse_max_rate("p", "2M").ok(), Some(2048));
        assert!(parse_max_rate("p", "10").is_err());
        assert!(parse_max_rate("p", "5G").is_err());
        assert!(parse_max_rate("p", "x").is_err());
    }

    #[test]
    fn version_keeps_the_shape_scripts_parse() {
        let line = report::version_line("pg_basebackup");
        assert!(line.starts_with("pg_basebackup (PostgreSQL) 18 "), "{line}");
    }
}
