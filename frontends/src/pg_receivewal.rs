//! `pg_receivewal`: streams WAL from a server into a directory with PostgreSQL 15–18's
//! options, file layout, messages and exit statuses, over walstream's receiver (every
//! record's CRC is checked before it is written; a segment gets its final name only
//! once all of it is verified).
//!
//! The layout is pg_receivewal's: complete segments under their WAL file names
//! (`.gz` / `.lz4` when compressed), the segment being received as `.partial`
//! (`.gz.partial` / `.lz4.partial` when compressed, written when the tool stops),
//! timeline history files; a restart resumes after the newest complete segment, else
//! from the slot's `restart_lsn` (PostgreSQL 15+), else from the server's position.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::Duration;

use pgwire_repl::client::SlotOptions;
use pgwire_repl::{ConnectOptions, Lsn};
use pgwire_repl::{SystemId, TimelineId, WalSegmentSize};
use walstream::{
    Bytes, Compression, EndReason, LocalDir, ReceiveOptions, Resume, WalDestination, WalDirOptions,
    WalWriter, WriterTotals,
};

use crate::conn::ConnOptions;
use crate::getopt::{self, HasArg, Opt};
use crate::report;

/// Seconds between reconnection attempts without `--no-loop`, as pg_receivewal.
const RECONNECT_SLEEP: u64 = 5;

const OPTIONS: [Opt; 18] = [
    Opt::both('D', "directory", HasArg::Required),
    Opt::both('d', "dbname", HasArg::Required),
    Opt::both('E', "endpos", HasArg::Required),
    Opt::both('h', "host", HasArg::Required),
    Opt::both('n', "no-loop", HasArg::No),
    Opt::both('p', "port", HasArg::Required),
    Opt::both('s', "status-interval", HasArg::Required),
    Opt::both('S', "slot", HasArg::Required),
    Opt::both('U', "username", HasArg::Required),
    Opt::both('v', "verbose", HasArg::No),
    Opt::both('w', "no-password", HasArg::No),
    Opt::both('W', "password", HasArg::No),
    Opt::both('Z', "compress", HasArg::Required),
    Opt::long("create-slot", HasArg::No),
    Opt::long("drop-slot", HasArg::No),
    Opt::long("if-not-exists", HasArg::No),
    Opt::long("synchronous", HasArg::No),
    Opt::long("no-sync", HasArg::No),
];

/// pg_receivewal's compression choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WalCompression {
    /// Plain segments.
    #[default]
    None,
    /// gzip at this level (`None`: zlib's default, 6).
    Gzip(Option<u32>),
    /// LZ4 (the level is accepted and checked; frames use LZ4's fast mode).
    Lz4(Option<u32>),
}

/// The parsed command line.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `-D`.
    pub directory: Option<PathBuf>,
    /// `-E`.
    pub endpos: Option<Lsn>,
    /// `-n`.
    pub no_loop: bool,
    /// `--no-sync` (false) or not.
    pub sync: bool,
    /// `-s` in seconds (0: no periodic status).
    pub status_interval: u64,
    /// `-S`.
    pub slot: Option<String>,
    /// `--synchronous`.
    pub synchronous: bool,
    /// `-v`.
    pub verbose: bool,
    /// `-Z`.
    pub compression: WalCompression,
    /// `--create-slot`.
    pub create_slot: bool,
    /// `--drop-slot`.
    pub drop_slot: bool,
    /// `--if-not-exists`.
    pub if_not_exists: bool,
    /// `-d -h -p -U -w -W`.
    pub conn: ConnOptions,
}

/// What the command line asks for.
#[derive(Debug, Clone)]
pub enum Command {
    /// `--help`.
    Help,
    /// `--version`.
    Version,
    /// Create or drop a slot, or stream.
    Run(Options),
}

/// A command-line mistake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError {
    /// The message (glibc's full text when `from_getopt`).
    pub message: String,
    /// getopt's own complaint, printed as is.
    pub from_getopt: bool,
    /// Followed by the `Try … --help` hint.
    pub hint: bool,
}

fn usage_error(message: impl Into<String>, hint: bool) -> UsageError {
    UsageError {
        message: message.into(),
        from_getopt: false,
        hint,
    }
}

/// `%X/%X`, as `sscanf` reads it.
fn parse_lsn(s: &str) -> Option<Lsn> {
    let (hi, lo) = s.split_once('/')?;
    let hex = |t: &str| {
        let t = t.trim_start();
        let t = t
            .strip_prefix("0x")
            .or_else(|| t.strip_prefix("0X"))
            .unwrap_or(t);
        let end = t.find(|c: char| !c.is_ascii_hexdigit()).unwrap_or(t.len());
        u32::from_str_radix(&t[..end], 16).ok()
    };
    Some(Lsn((u64::from(hex(hi)?) << 32) | u64::from(hex(lo)?)))
}

/// PostgreSQL's `option_parse_int`.
fn parse_int(value: &str, name: &str, min: i64, max: i64) -> Result<i64, UsageError> {
    let trimmed = value.trim_start();
    let parsed: Option<i64> = trimmed.trim_end().parse().ok();
    match parsed {
        None => Err(usage_error(
            format!("invalid value \"{value}\" for option {name}"),
            false,
        )),
        Some(v) if v < min || v > max => Err(usage_error(
            format!("{name} must be in range {min}..{max}"),
            false,
        )),
        Some(v) => Ok(v),
    }
}

/// `-Z`: pg_receivewal's `METHOD[:DETAIL]` or a bare level, checked as PostgreSQL's
/// `parse_compress_specification` / `validate_compress_specification` do.
pub fn parse_compression(value: &str) -> Result<WalCompression, String> {
    let (algorithm, detail) = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        match value.parse::<u64>() {
            Ok(0) => ("none", None),
            _ => ("gzip", Some(value)),
        }
    } else {
        match value.split_once(':') {
            None => (value, None),
            Some((alg, detail)) => (alg, Some(detail)),
        }
    };
    if !matches!(algorithm, "none" | "gzip" | "lz4" | "zstd") {
        return Err(format!(
            "unrecognized compression algorithm: \"{algorithm}\""
        ));
    }
    let invalid = |m: String| format!("invalid compression specification: {m}");
    let mut level: Option<i64> = None;
    let mut workers = false;
    if let Some(detail) = detail {
        if !detail.is_empty() && detail.bytes().all(|b| b.is_ascii_digit() || b == b'-') {
            level = Some(detail.parse().map_err(|_| {
                invalid("value for compression option \"level\" must be an integer".to_string())
            })?);
        } else {
            for item in detail.split(',') {
                let (keyword, value) = match item.split_once('=') {
                    Some((k, v)) => (k, Some(v)),
                    None => (item, None),
                };
                if keyword.is_empty() {
                    return Err(invalid(
                        "found empty string where a compression option was expected".into(),
                    ));
                }
                if !matches!(keyword, "level" | "workers") {
                    return Err(invalid(format!(
                        "unrecognized compression option: \"{keyword}\""
                    )));
                }
                let Some(value) = value.filter(|v| !v.is_empty()) else {
                    return Err(invalid(format!(
                        "compression option \"{keyword}\" requires a value"
                    )));
                };
                let number: i64 = value.parse().map_err(|_| {
                    invalid(format!(
                        "value for compression option \"{keyword}\" must be an integer"
                    ))
                })?;
                if keyword == "level" {
                    level = Some(number);
                } else {
                    workers = true;
                }
            }
        }
    }
    if let Some(level) = level {
        let range = match algorithm {
            "gzip" => 1..=9,
            "lz4" => 1..=12,
            "zstd" => -131072..=22,
            _ => {
                return Err(invalid(format!(
                    "compression algorithm \"{algorithm}\" does not accept a compression level"
                )))
            }
        };
        if !range.contains(&level) {
            return Err(invalid(format!(
                "compression algorithm \"{algorithm}\" expects a compression level between {} and {}",
                range.start(),
                range.end()
            )));
        }
    }
    if workers && algorithm != "zstd" {
        return Err(invalid(format!(
            "compression algorithm \"{algorithm}\" does not accept a worker count"
        )));
    }
    let level = level.map(|l| l as u32);
    match algorithm {
        "none" => Ok(WalCompression::None),
        "gzip" => Ok(WalCompression::Gzip(level)),
        "lz4" => Ok(WalCompression::Lz4(level)),
        _ => Err("compression with ZSTD is not yet supported".into()),
    }
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
    // -V and -? are recognised only as the first argument, as in PostgreSQL.
    let parsed = getopt::parse(prog, &args, &OPTIONS).map_err(|message| UsageError {
        message,
        from_getopt: true,
        hint: true,
    })?;
    let mut o = Options {
        sync: true,
        status_interval: 10,
        ..Options::default()
    };
    let mut compress = None;
    for (id, value) in parsed.options {
        if o.conn.take(id, value.as_deref()) {
            continue;
        }
        let value = value.unwrap_or_default();
        match id {
            "directory" => o.directory = Some(PathBuf::from(value)),
            "endpos" => {
                o.endpos = Some(parse_lsn(&value).ok_or_else(|| {
                    usage_error(format!("could not parse end position \"{value}\""), false)
                })?)
            }
            "no-loop" => o.no_loop = true,
            "status-interval" => {
                o.status_interval = parse_int(
                    &value,
                    "-s/--status-interval",
                    0,
                    i64::from(i32::MAX / 1000),
                )? as u64
            }
            "slot" => o.slot = Some(value),
            "verbose" => o.verbose = true,
            "compress" => compress = Some(value),
            "create-slot" => o.create_slot = true,
            "drop-slot" => o.drop_slot = true,
            "if-not-exists" => o.if_not_exists = true,
            "synchronous" => o.synchronous = true,
            "no-sync" => o.sync = false,
            _ => {}
        }
    }
    if let Some(extra) = parsed.operands.first() {
        return Err(usage_error(
            format!("too many command-line arguments (first is \"{extra}\")"),
            true,
        ));
    }
    if o.drop_slot && o.create_slot {
        return Err(usage_error(
            "cannot use --create-slot together with --drop-slot",
            true,
        ));
    }
    if o.slot.is_none() && (o.drop_slot || o.create_slot) {
        let which = if o.drop_slot {
            "--drop-slot"
        } else {
            "--create-slot"
        };
        return Err(usage_error(
            format!("{which} needs a slot to be specified using --slot"),
            true,
        ));
    }
    if o.synchronous && !o.sync {
        return Err(usage_error(
            "cannot use --synchronous together with --no-sync",
            true,
        ));
    }
    if o.directory.is_none() && !o.drop_slot && !o.create_slot {
        return Err(usage_error("no target directory specified", true));
    }
    if let Some(value) = compress {
        o.compression = parse_compression(&value).map_err(|m| usage_error(m, false))?;
    }
    Ok(Command::Run(o))
}

fn usage(prog: &str) {
    println!("{prog} receives PostgreSQL streaming write-ahead logs.\n");
    println!("Usage:\n  {prog} [OPTION]...\n");
    println!("Options:");
    println!("  -D, --directory=DIR    receive write-ahead log files into this directory");
    println!("  -E, --endpos=LSN       exit after receiving the specified LSN");
    println!("      --if-not-exists    do not error if slot already exists when creating a slot");
    println!("  -n, --no-loop          do not loop on connection lost");
    println!("      --no-sync          do not wait for changes to be written safely to disk");
    println!("  -s, --status-interval=SECS");
    println!("                         time between status packets sent to server (default: 10)");
    println!("  -S, --slot=SLOTNAME    replication slot to use");
    println!("      --synchronous      flush write-ahead log immediately after writing");
    println!("  -v, --verbose          output verbose messages");
    println!("  -V, --version          output version information, then exit");
    println!("  -Z, --compress=METHOD[:DETAIL]");
    println!("                         compress as specified");
    println!("  -?, --help             show this help, then exit");
    println!("\nConnection options:");
    println!("  -d, --dbname=CONNSTR   connection string");
    println!("  -h, --host=HOSTNAME    database server host or socket directory");
    println!("  -p, --port=PORT        database server port number");
    println!("  -U, --username=NAME    connect as specified database user");
    println!("  -w, --no-password      never prompt for password");
    println!("  -W, --password         force password prompt (should happen automatically)");
    println!("\nOptional actions:");
    println!(
        "      --create-slot      create a new replication slot (for the slot's name see --slot)"
    );
    println!("      --drop-slot        drop the replication slot (for the slot's name see --slot)");
}

/// Prints an error the PostgreSQL way: the first line as `error:`, a `what to do`
/// advice as `hint:`.
fn print_error(prog: &str, err: &dyn std::fmt::Display) {
    let text = err.to_string();
    let mut lines = text.lines();
    report::error(prog, lines.next().unwrap_or(""));
    for line in lines {
        let line = line.trim();
        match line.strip_prefix("what to do: ") {
            Some(advice) => report::hint(prog, advice),
            None if !line.is_empty() => eprintln!("{prog}: detail: {line}"),
            None => {}
        }
    }
}

/// Runs the tool; returns the exit status.
pub fn main(argv: Vec<OsString>) -> i32 {
    let prog = argv
        .first()
        .map(report::progname)
        .unwrap_or_else(|| "pg_receivewal".into());
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
        Ok(Command::Run(o)) => o,
        Err(e) => return report::usage_failed(&prog, &e.message, e.from_getopt, e.hint),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            report::error(&prog, format_args!("could not start: {e}"));
            return 1;
        }
    };
    runtime.block_on(run(&prog, options))
}

async fn run(prog: &str, o: Options) -> i32 {
    let mut config = match o.conn.config(prog) {
        Ok(c) => c,
        Err(e) => {
            report::error(prog, e);
            return 1;
        }
    };
    if o.drop_slot || o.create_slot {
        return slot_action(prog, &o, &mut config).await;
    }
    let Some(directory) = o.directory.clone() else {
        return 1;
    };
    if let Err(e) = std::fs::read_dir(&directory) {
        report::error(
            prog,
            format_args!(
                "could not open directory \"{}\": {}",
                directory.display(),
                crate::pg_verifybackup::strerror(&e)
            ),
        );
        return 1;
    }
    let mut options = ReceiveOptions::new(&directory);
    options.slot = o.slot.clone();
    options.endpos = o.endpos;
    options.synchronous = o.synchronous;
    options.no_loop = o.no_loop;
    options.status_interval =
        (o.status_interval > 0).then(|| Duration::from_secs(o.status_interval));
    options.dir_options = WalDirOptions {
        sync: o.sync,
        compression: match o.compression {
            WalCompression::None => Compression::None,
            WalCompression::Gzip(level) => Compression::Gzip {
                level: level.unwrap_or(6),
            },
            WalCompression::Lz4(_) => Compression::Lz4,
        },
    };
    // Lost connections are retried inside the receiver, every RECONNECT_SLEEP seconds
    // as pg_receivewal does, with its messages; the loop below retries what the
    // receiver returns (a refused password, a missing slot, …), as pg_receivewal
    // retries every failure.
    options.reconnect = walstream::ReconnectPolicy::default()
        .first_delay(Duration::from_secs(RECONNECT_SLEEP))
        .interval(Duration::from_secs(RECONNECT_SLEEP))
        .slot_wait(Duration::from_secs(RECONNECT_SLEEP))
        .retry_forever();
    {
        let prog = prog.to_string();
        options.on_event(move |event| match event {
            walstream::ReceiverEvent::Disconnected { error: Some(error) } => {
                print_error(&prog, error)
            }
            walstream::ReceiverEvent::Retrying { delay, .. } => report_info(
                &prog,
                format_args!(
                    "disconnected; waiting {} seconds to try again",
                    delay.as_secs()
                ),
            ),
            _ => {}
        });
    }
    loop {
        // Connect once here for the password prompt (-W, or a server asking); the
        // receiver then connects with the password found.
        let connected = o
            .conn
            .connect(&mut config, &ConnectOptions::default())
            .await;
        let result = match connected {
            Ok(client) => {
                let _ = client.close().await;
                let stop = async {
                    let mut term =
                        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                            .ok();
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = async {
                            match term.as_mut() {
                                Some(t) => { t.recv().await; }
                                None => std::future::pending::<()>().await,
                            }
                        } => {}
                    }
                };
                let destination = Verbose {
                    inner: LocalDir::new(&directory, options.dir_options),
                    suffix: options.dir_options.compression.suffix(),
                    prog: prog.to_string(),
                    verbose: o.verbose,
                    segment_size: None,
                    last_timeline: None,
                    switch_points: Vec::new(),
                };
                walstream::receive_wal_into(&config, &options, destination, stop)
                    .await
                    .map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok(summary) => match summary.end_reason {
                EndReason::EndPos => {
                    if o.verbose {
                        report_info(
                            prog,
                            format_args!(
                                "stopped log streaming at {} (timeline {})",
                                summary.written, summary.timeline.0
                            ),
                        );
                    }
                    return 0;
                }
                EndReason::Shutdown => {
                    if o.verbose {
                        report_info(prog, "received interrupt signal, exiting");
                    }
                    return 0;
                }
                _ => {
                    // The server ended streaming (a shutdown).
                    if o.no_loop {
                        report::error(prog, "disconnected");
                        return 1;
                    }
                }
            },
            Err(message) => {
                print_error(prog, &message);
                if o.no_loop {
                    report::error(prog, "disconnected");
                    return 1;
                }
            }
        }
        report_info(
            prog,
            format_args!("disconnected; waiting {RECONNECT_SLEEP} seconds to try again"),
        );
        tokio::time::sleep(Duration::from_secs(RECONNECT_SLEEP)).await;
    }
}

fn report_info(prog: &str, message: impl std::fmt::Display) {
    eprintln!("{prog}: {message}");
}

async fn slot_action(prog: &str, o: &Options, config: &mut pgwire_repl::Config) -> i32 {
    let Some(slot) = o.slot.as_deref() else {
        return 1;
    };
    let mut client = match o.conn.connect(config, &ConnectOptions::default()).await {
        Ok(c) => c,
        Err(e) => {
            print_error(prog, &e);
            return 1;
        }
    };
    let (command, result) = if o.drop_slot {
        if o.verbose {
            report_info(prog, format_args!("dropping replication slot \"{slot}\""));
        }
        let r = client.drop_slot(slot, false).await;
        (format!("DROP_REPLICATION_SLOT \"{slot}\""), r)
    } else {
        if o.verbose {
            report_info(prog, format_args!("creating replication slot \"{slot}\""));
        }
        let options = SlotOptions {
            temporary: false,
            reserve_wal: false,
        };
        let r = match client.create_physical_slot(slot, options).await {
            Err(e) if o.if_not_exists && e.sqlstate() == Some("42710") => Ok(()),
            other => other.map(drop),
        };
        (format!("CREATE_REPLICATION_SLOT \"{slot}\" PHYSICAL"), r)
    };
    let _ = client.close().await;
    match result {
        Ok(()) => 0,
        Err(e) => {
            let detail = e
                .db_error()
                .map(|d| d.message.clone())
                .unwrap_or_else(|| e.to_string());
            report::error(
                prog,
                format_args!("could not send replication command \"{command}\": {detail}"),
            );
            1
        }
    }
}

/// Where a timeline begins, from its history file: the switch point of the last entry
/// (`<parent TLI>\t<switch point>\t<reason>`).
fn history_switch_point(history: &str) -> Option<Lsn> {
    history
        .lines()
        .rfind(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(parse_lsn)
}

/// The directory destination, printing pg_receivewal's `-v` messages (streaming starts,
/// segments finished, timeline switches) as the receiver reaches them.
struct Verbose {
    inner: LocalDir,
    /// The compression suffix of segment files.
    suffix: &'static str,
    prog: String,
    verbose: bool,
    segment_size: Option<WalSegmentSize>,
    last_timeline: Option<TimelineId>,
    /// Where each timeline whose history file was fetched branched off.
    switch_points: Vec<(TimelineId, Lsn)>,
}

impl WalDestination for Verbose {
    type Writer = VerboseWriter;

    async fn open(&mut self, segment_size: WalSegmentSize) -> walstream::Result<()> {
        self.segment_size = Some(segment_size);
        self.inner.open(segment_size).await
    }

    async fn check_system(&mut self, system_id: SystemId) -> walstream::Result<()> {
        self.inner.check_system(system_id).await
    }

    async fn resume_point(&mut self) -> walstream::Result<Option<Resume>> {
        self.inner.resume_point().await
    }

    async fn has_history(&mut self, timeline: TimelineId) -> walstream::Result<bool> {
        self.inner.has_history(timeline).await
    }

    async fn write_history(
        &mut self,
        timeline: TimelineId,
        content: Bytes,
    ) -> walstream::Result<()> {
        if let Some(lsn) = history_switch_point(&String::from_utf8_lossy(&content)) {
            self.switch_points.push((timeline, lsn));
        }
        self.inner.write_history(timeline, content).await
    }

    async fn writer(
        &mut self,
        timeline: TimelineId,
        start: Lsn,
    ) -> walstream::Result<VerboseWriter> {
        if self.verbose {
            if self.last_timeline.is_some_and(|t| t != timeline) {
                let at = self
                    .switch_points
                    .iter()
                    .find(|(t, _)| *t == timeline)
                    .map_or(start, |(_, lsn)| *lsn);
                report_info(
                    &self.prog,
                    format_args!("switched to timeline {} at {at}", timeline.0),
                );
            }
            report_info(
                &self.prog,
                format_args!(
                    "starting log streaming at {start} (timeline {})",
                    timeline.0
                ),
            );
        }
        self.last_timeline = Some(timeline);
        Ok(VerboseWriter {
            inner: self.inner.writer(timeline, start).await?,
            suffix: self.suffix,
            prog: self.prog.clone(),
            verbose: self.verbose,
            segment_size: self.segment_size,
            timeline,
        })
    }
}

/// The writer of [`Verbose`].
struct VerboseWriter {
    inner: <LocalDir as WalDestination>::Writer,
    suffix: &'static str,
    prog: String,
    verbose: bool,
    segment_size: Option<WalSegmentSize>,
    timeline: TimelineId,
}

impl WalWriter for VerboseWriter {
    fn written(&self) -> Lsn {
        self.inner.written()
    }

    fn durable(&self) -> Lsn {
        self.inner.durable()
    }

    async fn write(&mut self, lsn: Lsn, data: Bytes, verified: Lsn) -> walstream::Result<()> {
        let len = data.len() as u64;
        self.inner.write(lsn, data, verified).await?;
        if let (true, Some(size)) = (self.verbose, self.segment_size) {
            let end = lsn.0.saturating_add(len);
            let bytes = size.bytes();
            // Each segment boundary this write reached or crossed.
            let mut boundary = (lsn.0 / bytes + 1).saturating_mul(bytes);
            while boundary <= end && len > 0 {
                report_info(
                    &self.prog,
                    format_args!(
                        "finished segment at {} (timeline {})",
                        Lsn(boundary),
                        self.timeline.0
                    ),
                );
                boundary = boundary.saturating_add(bytes);
            }
        }
        Ok(())
    }

    async fn flush(&mut self) -> walstream::Result<Lsn> {
        self.inner.flush().await
    }

    async fn close(self) -> walstream::Result<WriterTotals> {
        let totals = self.inner.close().await?;
        if let Some(size) = self.segment_size {
            if let Some(segno) = partial_segment(&totals, size) {
                // pg_receivewal says so whenever it closes a segment it has not
                // completed (at a disconnect, a stop, the end position).
                report_info(
                    &self.prog,
                    format_args!(
                        "not renaming \"{}{}.partial\", segment is not complete",
                        pgwire_repl::types::wal_file_name(self.timeline, segno, size),
                        self.suffix
                    ),
                );
            }
        }
        Ok(totals)
    }
}

/// The segment a closed writer left `.partial`: the one holding its last byte, unless
/// that segment was completed.
fn partial_segment(totals: &WriterTotals, size: WalSegmentSize) -> Option<u64> {
    let written = totals.written;
    if written.0 == 0 {
        return None;
    }
    let last = Lsn(written.0 - 1).segment_number(size);
    let completed = written.segment_offset(size) == 0 && totals.durable >= written;
    (!completed).then_some(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(words: &[&str]) -> Result<Command, UsageError> {
        let args: Vec<OsString> = words.iter().map(OsString::from).collect();
        parse_args("pg_receivewal", &args)
    }

    fn message(words: &[&str]) -> String {
        parse(words).unwrap_err().message
    }

    #[test]
    fn option_conflicts_use_postgres_messages() {
        assert_eq!(message(&[]), "no target directory specified");
        assert_eq!(
            message(&["-D", "x", "--create-slot", "--drop-slot"]),
            "cannot use --create-slot together with --drop-slot"
        );
        assert_eq!(
            message(&["-D", "x", "--create-slot"]),
            "--create-slot needs a slot to be specified using --slot"
        );
        assert_eq!(
            message(&["-D", "x", "--synchronous", "--no-sync"]),
            "cannot use --synchronous together with --no-sync"
        );
        assert_eq!(
            message(&["-D", "x", "--compress", "none:1"]),
            "invalid compression specification: compression algorithm \"none\" does not accept a compression level"
        );
        assert_eq!(
            message(&["-D", "x", "-E", "bogus"]),
            "could not parse end position \"bogus\""
        );
        assert_eq!(
            message(&["-D", "x", "-s", "-1"]),
            "-s/--status-interval must be in range 0..2147483"
        );
        assert_eq!(
            message(&["-D", "x", "y"]),
            "too many command-line arguments (first is \"y\")"
        );
        assert!(matches!(
            parse(&["--slot", "s", "--create-slot"]),
            Ok(Command::Run(_))
        ));
    }

    #[test]
    fn compression_forms() {
        assert_eq!(parse_compression("0"), Ok(WalCompression::None));
        assert_eq!(parse_compression("5"), Ok(WalCompression::Gzip(Some(5))));
        assert_eq!(
            parse_compression("gzip:1"),
            Ok(WalCompression::Gzip(Some(1)))
        );
        assert_eq!(
            parse_compression("gzip:level=9"),
            Ok(WalCompression::Gzip(Some(9)))
        );
        assert_eq!(parse_compression("lz4"), Ok(WalCompression::Lz4(None)));
        assert_eq!(
            parse_compression("gzip:level=10").unwrap_err(),
            "invalid compression specification: compression algorithm \"gzip\" expects a compression level between 1 and 9"
        );
        assert_eq!(
            parse_compression("bogus").unwrap_err(),
            "unrecognized compression algorithm: \"bogus\""
        );
        assert_eq!(
            parse_compression("zstd").unwrap_err(),
            "compression with ZSTD is not yet supported"
        );
        assert_eq!(
            parse_compression("gzip:workers=3").unwrap_err(),
            "invalid compression specification: compression algorithm \"gzip\" does not accept a worker count"
        );
    }

    #[test]
    fn history_files() {
        assert_eq!(
            history_switch_point("1\t0/3000000\tno recovery target specified\n\n2\t0/50000A0\tx\n"),
            Some(Lsn(0x50000A0))
        );
        assert_eq!(history_switch_point(""), None);
    }

    #[test]
    fn end_positions() {
        assert_eq!(parse_lsn("0/3000028"), Some(Lsn(0x3000028)));
        assert_eq!(parse_lsn("A/B"), Some(Lsn(0xA_0000_000B)));
        assert_eq!(parse_lsn("oops"), None);
    }
}
