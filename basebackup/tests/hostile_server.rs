//! A scripted fake walsender answers BASE_BACKUP with what a real server never sends:
//! hostile tar entries, truncated streams, manifests that disagree with the files,
//! oversized frames, errors mid-copy and silence. Each case must fail with the exact
//! error kind, name the entry or file, write nothing outside the target, and leave
//! nothing behind (the target is removed; it never holds a `backup_manifest`).
//!
//! Both response framings are emulated message for message (protocol reference §4.2,
//! §4.3): 13/14 send one CopyOut per tablespace plus one for the manifest, 15+ one
//! CopyOut with `n`/`d`/`p`/`m` sub-messages.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use basebackup::manifest::FileChecksum;
use basebackup::{BackupOptions, BaseBackup, ChecksumAlgorithm, ErrorKind, PlainDirSink};
use basebackup::{Manifest, SinkOptions, TablespaceMapping};
use bytes::Bytes;
use pgwire_repl::proto::backend::{BackendMessage, CopyResponse, FieldDescription};
use pgwire_repl::{Config, DbError, ReplicationClient};
use sha2::Digest;
use testkit::fake::{Action, FakeServer};

// ---------------------------------------------------------------------------------------
// A per-thread allocation counter, to show that parsing a huge manifest allocates in
// proportion to its size and no more.

struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn track(delta: isize) {
    // `try_with`: thread-local storage may be gone while a thread exits.
    let _ = LIVE.try_with(|live| {
        let now = live.get().saturating_add_signed(delta);
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        track(layout.size() as isize);
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        track(-(layout.size() as isize));
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        track(new as isize - layout.size() as isize);
        unsafe { std::alloc::System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Peak bytes allocated (net) on this thread while `f` runs.
fn peak_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    (out, PEAK.with(Cell::get) - base)
}

// ---------------------------------------------------------------------------------------
// Tar and manifest builders.

/// One tar entry: a ustar header written byte by byte (so that names can hold anything,
/// NUL included), then `data` and its padding. `size` is what the header claims.
fn entry(name: &[u8], typeflag: u8, size: u64, data: &[u8], link: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    {
        let raw = h.as_mut_bytes();
        raw[..name.len()].copy_from_slice(name);
        raw[157..157 + link.len()].copy_from_slice(link);
    }
    h.set_size(size);
    h.set_mode(if typeflag == b'5' { 0o700 } else { 0o600 });
    h.set_mtime(1_700_000_000);
    h.set_entry_type(tar::EntryType::new(typeflag));
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

fn file(name: &str, data: &[u8]) -> Vec<u8> {
    entry(name.as_bytes(), b'0', data.len() as u64, data, b"")
}

fn dir(name: &str) -> Vec<u8> {
    entry(name.as_bytes(), b'5', 0, b"", b"")
}

const PG_VERSION: &[u8] = b"15\n";
const RELATION: &[u8] = &[0x5a; 3000];

/// A small, valid base archive (without trailer).
fn good_entries() -> Vec<u8> {
    let mut t = file("PG_VERSION", PG_VERSION);
    t.extend(dir("global"));
    t.extend(file("global/1262", RELATION));
    t
}

fn good_files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("PG_VERSION", PG_VERSION.to_vec()),
        ("global/1262", RELATION.to_vec()),
    ]
}

/// `(path, size, checksum)` as the manifest states them.
fn manifest_of(files: &[(&str, u64, String)]) -> Vec<u8> {
    let mut body = String::from("{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [\n");
    for (i, (path, size, sum)) in files.iter().enumerate() {
        if i > 0 {
            body.push_str(",\n");
        }
        body.push_str(&format!(
            "{{ \"Path\": \"{path}\", \"Size\": {size}, \"Last-Modified\": \"2026-01-01 00:00:00 GMT\", \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"{sum}\" }}"
        ));
    }
    body.push_str(
        " ],\n\"WAL-Ranges\": [\n{ \"Timeline\": 1, \"Start-LSN\": \"0/2000028\", \"End-LSN\": \"0/2000100\" }\n],\n",
    );
    let sum: String = sha2::Sha256::digest(body.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{body}\"Manifest-Checksum\": \"{sum}\"}}\n").into_bytes()
}

fn crc(data: &[u8]) -> String {
    let mut c = FileChecksum::new(ChecksumAlgorithm::Crc32c);
    c.update(data);
    c.finish().unwrap()
}

fn manifest_for(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let listed: Vec<(&str, u64, String)> = files
        .iter()
        .map(|(p, d)| (*p, d.len() as u64, crc(d)))
        .collect();
    manifest_of(&listed)
}

// ---------------------------------------------------------------------------------------
// The fake walsender's scripts.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// 13/14: one CopyOut per tablespace, then one for the manifest; no tar trailer.
    V14,
    /// 15+: one CopyOut with n/d/p/m sub-messages; each archive ends with the trailer.
    V15,
}

const BOTH: [Framing; 2] = [Framing::V14, Framing::V15];

fn column(name: &str, type_oid: u32) -> FieldDescription {
    FieldDescription {
        name: name.into(),
        table_oid: 0,
        column_id: 0,
        type_oid,
        type_size: -1,
        type_modifier: -1,
        format: 0,
    }
}

fn cell(v: Option<&str>) -> Option<Bytes> {
    v.map(|s| Bytes::copy_from_slice(s.as_bytes()))
}

/// `T(recptr text, tli int8) D(lsn, tli) C "SELECT"`.
fn position(lsn: &str) -> Vec<Action> {
    vec![
        Action::Send(BackendMessage::RowDescription(vec![
            column("recptr", 25),
            column("tli", 20),
        ])),
        Action::Send(BackendMessage::DataRow(vec![
            cell(Some(lsn)),
            cell(Some("1")),
        ])),
        Action::Send(BackendMessage::CommandComplete {
            tag: "SELECT".into(),
        }),
    ]
}

/// An archive of the backup: its tablespace (`None`: base) and its tar bytes.
#[derive(Clone)]
struct Archive {
    oid: Option<u32>,
    location: Option<String>,
    tar: Vec<u8>,
}

fn base(tar: Vec<u8>) -> Archive {
    Archive {
        oid: None,
        location: None,
        tar,
    }
}

fn copy_out() -> Action {
    Action::Send(BackendMessage::CopyOutResponse(CopyResponse {
        format: 0,
        column_formats: vec![],
    }))
}

fn copy_data(bytes: Vec<u8>) -> Action {
    Action::Send(BackendMessage::CopyData(Bytes::from(bytes)))
}

/// Up to the first CopyOutResponse: handshake, the command, the start position and the
/// tablespace list (user tablespaces first, base last).
fn opening(framing: Framing, archives: &[Archive]) -> Vec<Action> {
    let version = match framing {
        Framing::V14 => "14.13",
        Framing::V15 => "15.18",
    };
    let mut s = vec![Action::handshake(version), Action::Expect(b'Q')];
    s.extend(position("0/2000028"));
    s.push(Action::Send(BackendMessage::RowDescription(vec![
        column("spcoid", 26),
        column("spclocation", 25),
        column("size", 20),
    ])));
    for a in archives {
        let oid = a.oid.map(|o| o.to_string());
        s.push(Action::Send(BackendMessage::DataRow(vec![
            cell(oid.as_deref()),
            cell(a.location.as_deref()),
            cell(Some("4")),
        ])));
    }
    s.push(Action::Send(BackendMessage::CommandComplete {
        tag: "SELECT".into(),
    }));
    s
}

/// The archive and manifest copy (without the final result set), with archive data cut
/// into `chunk`-byte CopyData messages.
fn copy(framing: Framing, archives: &[Archive], manifest: Option<&[u8]>) -> Vec<Action> {
    const CHUNK: usize = 700;
    let mut s = Vec::new();
    match framing {
        Framing::V14 => {
            for a in archives {
                s.push(copy_out());
                for c in a.tar.chunks(CHUNK) {
                    s.push(copy_data(c.to_vec()));
                }
                s.push(Action::Send(BackendMessage::CopyDone));
            }
            if let Some(m) = manifest {
                s.push(copy_out());
                for c in m.chunks(CHUNK) {
                    s.push(copy_data(c.to_vec()));
                }
                s.push(Action::Send(BackendMessage::CopyDone));
            }
        }
        Framing::V15 => {
            s.push(copy_out());
            let mut done = 0u64;
            for a in archives {
                let name = match a.oid {
                    Some(oid) => format!("{oid}.tar"),
                    None => "base.tar".into(),
                };
                let mut n = format!("n{name}\0").into_bytes();
                n.extend(a.location.as_deref().unwrap_or("").as_bytes());
                n.push(0);
                s.push(copy_data(n));
                let mut tar = a.tar.clone();
                tar.extend([0u8; 1024]);
                for c in tar.chunks(CHUNK) {
                    let mut d = vec![b'd'];
                    d.extend_from_slice(c);
                    s.push(copy_data(d));
                }
                done += tar.len() as u64;
                let mut p = vec![b'p'];
                p.extend(done.to_be_bytes());
                s.push(copy_data(p));
            }
            if let Some(m) = manifest {
                s.push(copy_data(b"m".to_vec()));
                for c in m.chunks(CHUNK) {
                    let mut d = vec![b'd'];
                    d.extend_from_slice(c);
                    s.push(copy_data(d));
                }
            }
            s.push(Action::Send(BackendMessage::CopyDone));
        }
    }
    s
}

/// The end: the end position, `C "BASE_BACKUP"`, `Z`.
fn closing() -> Vec<Action> {
    let mut s = position("0/2000100");
    s.push(Action::Send(BackendMessage::CommandComplete {
        tag: "BASE_BACKUP".into(),
    }));
    s.push(Action::Send(BackendMessage::ReadyForQuery { status: b'I' }));
    s.push(Action::GoSilent);
    s
}

/// A whole, well-formed exchange around the given archives and manifest.
fn full(framing: Framing, archives: &[Archive], manifest: Option<&[u8]>) -> Vec<Action> {
    let mut s = opening(framing, archives);
    s.extend(copy(framing, archives, manifest));
    s.extend(closing());
    s
}

// ---------------------------------------------------------------------------------------
// Running a backup against a script, and the "nothing left behind" checks.

/// A scratch area: `target` (not created), `sentinel` (an empty directory next to it
/// that must stay empty) and nothing else.
struct Scratch {
    _dir: tempfile::TempDir,
    root: PathBuf,
    target: PathBuf,
    sentinel: PathBuf,
}

fn scratch() -> Scratch {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let sentinel = root.join("sentinel");
    std::fs::create_dir(&sentinel).unwrap();
    Scratch {
        target: root.join("target"),
        sentinel,
        root,
        _dir: dir,
    }
}

impl Scratch {
    /// After a failure: the target is gone, the sentinel is empty, nothing else appeared
    /// (no `../escape`, no absolute-path file, no tablespace directory).
    fn assert_untouched(&self, case: &str) {
        let mut names: Vec<String> = std::fs::read_dir(&self.root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["sentinel"],
            "{case}: something was left next to the target"
        );
        assert_eq!(
            std::fs::read_dir(&self.sentinel).unwrap().count(),
            0,
            "{case}: something was written into the sentinel directory"
        );
        assert!(!self.target.join("backup_manifest").exists(), "{case}");
    }
}

fn config(server: &FakeServer) -> Config {
    Config::parse(&format!("{} connect_timeout=5", server.conninfo())).unwrap()
}

fn fast_sink(target: &Path) -> PlainDirSink {
    PlainDirSink::new(target).options(SinkOptions {
        no_sync: true,
        ..SinkOptions::default()
    })
}

/// Runs one backup against `script` into a plain directory.
async fn run(
    script: Vec<Action>,
    sink: PlainDirSink,
    options: BackupOptions,
) -> basebackup::Result<basebackup::BackupResult> {
    let server = FakeServer::start(vec![script]).await;
    let client = ReplicationClient::connect(&config(&server)).await.unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), async {
        BaseBackup::start(client, options)
            .await?
            .receive(sink, None)
            .await
            .map(|(result, _sink)| result)
    })
    .await
    .expect("the backup hung");
    // The client is gone (dropped with the backup); the script ends with GoSilent/Close.
    let _ = server.outcomes().await;
    result
}

/// Runs a backup expected to fail with `kind`, naming `names` (in the message, and as
/// the error's path when `path` is given); checks nothing was left behind.
async fn expect_failure(
    case: &str,
    script: Vec<Action>,
    kind: ErrorKind,
    path: Option<&str>,
    names: &[&str],
) -> basebackup::Error {
    let s = scratch();
    let err = run(script, fast_sink(&s.target), BackupOptions::default())
        .await
        .expect_err(case);
    // Shown with --nocapture: the exact errors, for review.
    eprintln!("{case}: {:?}: {}", err.kind(), err.message());
    assert_eq!(err.kind(), kind, "{case}: {err}");
    if path.is_some() {
        assert_eq!(err.path(), path, "{case}: {err}");
    }
    for name in names {
        assert!(
            err.to_string().contains(name),
            "{case}: expected {name:?} in: {err}"
        );
    }
    s.assert_untouched(case);
    err
}

// ---------------------------------------------------------------------------------------
// The cases.

#[tokio::test]
async fn the_fake_walsender_serves_a_valid_backup_in_both_framings() {
    for framing in BOTH {
        let s = scratch();
        let manifest = manifest_for(&good_files());
        let script = full(framing, &[base(good_entries())], Some(&manifest));
        let r = run(script, fast_sink(&s.target), BackupOptions::default())
            .await
            .unwrap_or_else(|e| panic!("{framing:?}: {e}"));
        assert_eq!(r.files, 2);
        assert_eq!(r.end_lsn.to_string(), "0/2000100");
        assert_eq!(
            std::fs::read(s.target.join("global/1262")).unwrap(),
            RELATION
        );
        assert_eq!(
            std::fs::read(s.target.join("backup_manifest")).unwrap(),
            manifest
        );
    }
}

#[tokio::test]
async fn hostile_tar_entries_are_refused_naming_the_entry() {
    let s = scratch();
    let sentinel_file = format!("{}/abs", s.sentinel.display());
    let sentinel_dir = s.sentinel.display().to_string();
    drop(s);
    let escape_link = {
        // The link points at the sentinel directory, which must stay empty.
        let mut t = entry(b"pg_tblspc/1", b'2', 0, b"", sentinel_dir.as_bytes());
        t.extend(file("pg_tblspc/1/file", b"owned"));
        t
    };
    let link_words = [
        "does not point at a tablespace of this backup",
        sentinel_dir.as_str(),
    ];
    let cases: Vec<(&str, Vec<u8>, &str, &[&str])> = vec![
        ("dot-dot", file("../escape", b"x"), "../escape", &["`..`"]),
        (
            "dot-dot inside",
            file("global/../../escape", b"x"),
            "global/../../escape",
            &["`..`"],
        ),
        (
            "absolute path",
            file(&sentinel_file, b"x"),
            &sentinel_file,
            &["absolute path"],
        ),
        (
            "symlink outside pg_tblspc",
            entry(b"escape", b'2', 0, b"", sentinel_dir.as_bytes()),
            "escape",
            &["only pg_tblspc/<oid> tablespace links"],
        ),
        (
            "tablespace link that is not a tablespace of the backup, then a file through it",
            escape_link,
            "pg_tblspc/1",
            &link_words,
        ),
        (
            "hard link",
            entry(b"global/hard", b'1', 0, b"", b"PG_VERSION"),
            "global/hard",
            &["hard links are not allowed"],
        ),
        (
            "character device",
            entry(b"global/null", b'3', 0, b"", b""),
            "global/null",
            &["device files"],
        ),
        (
            "block device",
            entry(b"global/sda", b'4', 0, b"", b""),
            "global/sda",
            &["device files"],
        ),
        (
            "FIFO",
            entry(b"global/fifo", b'6', 0, b"", b""),
            "global/fifo",
            &["FIFOs"],
        ),
        (
            "duplicate",
            file("global/1262", b"second copy"),
            "global/1262",
            &["duplicate entry"],
        ),
        (
            "NUL in a name",
            file_raw_name(b"global/12\x0062"),
            "global/12",
            &["NUL byte inside a name"],
        ),
    ];
    for framing in BOTH {
        for (case, hostile, name, words) in &cases {
            let mut tar = good_entries();
            tar.extend_from_slice(hostile);
            tar.extend(file("global/after", b"never"));
            let manifest = manifest_for(&good_files());
            let script = full(framing, &[base(tar)], Some(&manifest));
            let case = format!("{framing:?} {case}");
            let mut expected = words.to_vec();
            expected.push(name);
            expect_failure(&case, script, ErrorKind::Unsafe, Some(name), &expected).await;
        }
    }
}

fn file_raw_name(name: &[u8]) -> Vec<u8> {
    entry(name, b'0', 1, b"x", b"")
}

#[tokio::test]
async fn an_entry_beneath_a_real_tablespace_link_is_refused() {
    // Tablespace 16385 is real (listed, mapped into the scratch area); its link in the
    // base archive is accepted, but an entry through the link is not.
    for framing in BOTH {
        let s = scratch();
        let ts_dir = s.root.join("ts");
        let mut mapping = TablespaceMapping::default();
        mapping.add("/srv/ts", &ts_dir);
        let mut tar = good_entries();
        tar.extend(dir("pg_tblspc"));
        tar.extend(entry(b"pg_tblspc/16385", b'2', 0, b"", b"/srv/ts"));
        tar.extend(file("pg_tblspc/16385/PG_15_1/evil", b"x"));
        let archives = [
            Archive {
                oid: Some(16385),
                location: Some("/srv/ts".into()),
                tar: dir("PG_15_1"),
            },
            base(tar),
        ];
        let manifest = manifest_for(&good_files());
        let script = full(framing, &archives, Some(&manifest));
        let err = run(
            script,
            fast_sink(&s.target).tablespace_mapping(mapping),
            BackupOptions::default(),
        )
        .await
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsafe, "{framing:?} {err}");
        assert_eq!(err.path(), Some("pg_tblspc/16385/PG_15_1/evil"), "{err}");
        assert!(
            err.to_string()
                .contains("entry beneath the symbolic link \"pg_tblspc/16385\""),
            "{err}"
        );
        s.assert_untouched(&format!("{framing:?} link then entry"));
    }
}

#[tokio::test]
async fn sizes_that_disagree_with_the_data_are_detected() {
    for framing in BOTH {
        // The header claims 1000 bytes, 10 follow, then the next header: the parser reads
        // that header as file data and then meets garbage where a header should be.
        let mut tar = good_entries();
        tar.extend(entry(b"global/short", b'0', 1000, b"0123456789", b""));
        tar.extend(file("global/next", b"next file"));
        let manifest = manifest_for(&good_files());
        let script = full(framing, &[base(tar)], Some(&manifest));
        expect_failure(
            &format!("{framing:?} size larger than the data"),
            script,
            ErrorKind::Protocol,
            None,
            &[
                "tar header checksum mismatch",
                "after entry \"global/short\"",
                "the stream is corrupt",
            ],
        )
        .await;

        // The same short file as the last entry: the archive ends inside it.
        let mut tar = good_entries();
        tar.extend(entry(b"global/short", b'0', 100_000, b"0123456789", b""));
        let script = full(framing, &[base(tar)], Some(&manifest));
        let err = expect_failure(
            &format!("{framing:?} archive ends inside a file"),
            script,
            // 15+ sends the trailer, which the parser reads as file data; either way the
            // archive ends before the file does.
            ErrorKind::Verify,
            Some("global/short"),
            &["before the end of this file (truncated stream)"],
        )
        .await;
        assert!(err.to_string().contains("archive base.tar"), "{err}");

        // A size smaller than the data: the rest of the data is read as a header.
        let mut tar = good_entries();
        let mut long = entry(b"global/long", b'0', 4, b"0123", b"");
        long.extend([0x41u8; 512]);
        tar.extend(long);
        let script = full(framing, &[base(tar)], Some(&manifest));
        expect_failure(
            &format!("{framing:?} size smaller than the data"),
            script,
            ErrorKind::Protocol,
            None,
            &[
                "a tar header after entry \"global/long\"",
                "the previous entry's size is wrong",
            ],
        )
        .await;
    }
}

#[tokio::test]
async fn truncated_streams_fail() {
    for framing in BOTH {
        let manifest = manifest_for(&good_files());
        let archives = [base(good_entries())];
        let copy_messages = copy(framing, &archives, Some(&manifest));
        // The connection closes after a few messages of the copy: before any data, in
        // PG_VERSION's padding, in the middle of the `global` header (V14: 1400 bytes),
        // inside global/1262's data (V14: 2100 bytes; V15: 2100 and 2800 bytes).
        for cut in [1usize, 2, 3, 4, 5] {
            let mut script = opening(framing, &archives);
            script.extend(copy_messages.iter().take(cut).cloned());
            script.push(Action::Close);
            expect_failure(
                &format!("{framing:?} closed after {cut} copy messages"),
                script,
                ErrorKind::Io,
                None,
                &["the server closed the connection"],
            )
            .await;
        }
        // The connection closes in the middle of a CopyData frame.
        let mut script = opening(framing, &archives);
        script.push(copy_out());
        if framing == Framing::V15 {
            script.push(copy_data(b"nbase.tar\0\0".to_vec()));
        }
        script.push(Action::SendRaw(Bytes::from_static(&[
            b'd', 0, 0, 4, 0, b'd', 1, 2,
        ])));
        script.push(Action::Close);
        expect_failure(
            &format!("{framing:?} closed inside a frame"),
            script,
            ErrorKind::Io,
            None,
            &["in the middle of a message"],
        )
        .await;

        // The archive ends (CopyDone, no trailer) in the middle of a file and of a header.
        for (case, tar, kind, path, words) in [
            (
                "mid-file",
                {
                    let mut t = good_entries();
                    t.truncate(4 * 512 + 1000);
                    t
                },
                ErrorKind::Verify,
                Some("global/1262"),
                &["ends 2000 bytes before the end of this file"][..],
            ),
            (
                "mid-header",
                {
                    let mut t = good_entries();
                    t.truncate(512 + 512 + 100);
                    t
                },
                ErrorKind::Protocol,
                None,
                &["the archive ends in the middle of a header (after PG_VERSION)"][..],
            ),
        ] {
            if framing == Framing::V15 {
                // 15+ always appends the trailer; build the stream by hand without it.
                let mut script = opening(framing, &archives);
                script.push(copy_out());
                script.push(copy_data(b"nbase.tar\0\0".to_vec()));
                let mut d = vec![b'd'];
                d.extend(&tar);
                script.push(copy_data(d));
                script.push(copy_data(b"m".to_vec()));
                let mut d = vec![b'd'];
                d.extend(&manifest);
                script.push(copy_data(d));
                script.push(Action::Send(BackendMessage::CopyDone));
                script.extend(closing());
                expect_failure(&format!("{framing:?} {case}"), script, kind, path, words).await;
            } else {
                let script = full(framing, &[base(tar)], Some(&manifest));
                expect_failure(&format!("{framing:?} {case}"), script, kind, path, words).await;
            }
        }
    }
}

#[tokio::test]
async fn a_manifest_that_disagrees_with_the_files_fails_naming_the_file() {
    let good = good_files();
    let sums: Vec<(&str, u64, String)> = good
        .iter()
        .map(|(p, d)| (*p, d.len() as u64, crc(d)))
        .collect();
    let mut wrong_checksum = sums.clone();
    wrong_checksum[1].2 = "00000000".into();
    let mut wrong_size = sums.clone();
    wrong_size[1].1 += 1;
    let mut missing = sums.clone();
    missing.push(("global/pg_control", 8192, crc(b"")));
    let extra = vec![sums[0].clone()];
    let mut bad_self_checksum = manifest_of(&sums);
    let at = bad_self_checksum.len() - 10;
    bad_self_checksum[at] = if bad_self_checksum[at] == b'0' {
        b'1'
    } else {
        b'0'
    };
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "wrong checksum",
            manifest_of(&wrong_checksum),
            "global/1262",
            "checksum",
        ),
        (
            "wrong size",
            manifest_of(&wrong_size),
            "global/1262",
            "size",
        ),
        (
            "missing file",
            manifest_of(&missing),
            "global/pg_control",
            "missing",
        ),
        (
            "extra file",
            manifest_of(&extra),
            "global/1262",
            "present in the backup but not in the backup manifest",
        ),
        (
            "manifest checksum wrong",
            bad_self_checksum,
            "backup_manifest",
            "manifest checksum mismatch",
        ),
        (
            "manifest is not JSON",
            b"{ oops\n}\n".to_vec(),
            "backup_manifest",
            "not JSON",
        ),
    ];
    for framing in BOTH {
        for (case, manifest, path, word) in &cases {
            let script = full(framing, &[base(good_entries())], Some(manifest));
            expect_failure(
                &format!("{framing:?} {case}"),
                script,
                ErrorKind::Verify,
                Some(path),
                &[path, word],
            )
            .await;
        }
        // No manifest at all although one was asked for (13/14: the end position
        // comes where the manifest's CopyOutResponse should): the same error both ways.
        let script = full(framing, &[base(good_entries())], None);
        expect_failure(
            &format!("{framing:?} no manifest"),
            script,
            ErrorKind::Verify,
            Some("backup_manifest"),
            &["the server sent no manifest"],
        )
        .await;
    }
}

#[tokio::test]
async fn a_two_gigabyte_length_prefix_mid_copy_is_refused_at_once() {
    for framing in BOTH {
        let archives = [base(good_entries())];
        let mut script = opening(framing, &archives);
        let copy_messages = copy(framing, &archives, None);
        script.extend(copy_messages.into_iter().take(3));
        // A CopyData announcing 2 GiB, then silence.
        script.push(Action::SendRaw(Bytes::from_static(&[b'd', 0x80, 0, 0, 0])));
        script.push(Action::GoSilent);
        let started = Instant::now();
        expect_failure(
            &format!("{framing:?} 2 GiB frame"),
            script,
            ErrorKind::Protocol,
            None,
            &["2147483648 bytes"],
        )
        .await;
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}

fn db_error(code: &str, message: &str) -> DbError {
    DbError {
        severity: "ERROR".into(),
        code: code.into(),
        message: message.into(),
        ..DbError::default()
    }
}

#[tokio::test]
async fn server_errors_mid_copy_and_after_the_end_fail_the_backup() {
    for framing in BOTH {
        let manifest = manifest_for(&good_files());
        let archives = [base(good_entries())];
        // An ErrorResponse in the middle of the copy.
        let mut script = opening(framing, &archives);
        script.extend(
            copy(framing, &archives, Some(&manifest))
                .into_iter()
                .take(4),
        );
        script.push(Action::Send(BackendMessage::ErrorResponse(db_error(
            "58P01",
            "could not open file \"base/1/1259\": No such file or directory",
        ))));
        script.push(Action::Send(BackendMessage::ReadyForQuery { status: b'I' }));
        script.push(Action::GoSilent);
        let err = expect_failure(
            &format!("{framing:?} error mid-copy"),
            script,
            ErrorKind::Server,
            None,
            &["BASE_BACKUP failed during the transfer", "base/1/1259"],
        )
        .await;
        assert_eq!(err.sqlstate(), Some("58P01"));

        // XX001 (checksum failures) after the final result set, instead of the
        // CommandComplete: everything was received and verified, but it must fail.
        let mut script = opening(framing, &archives);
        script.extend(copy(framing, &archives, Some(&manifest)));
        script.extend(position("0/2000100"));
        script.push(Action::Send(BackendMessage::ErrorResponse(db_error(
            "XX001",
            "checksum verification failure during base backup",
        ))));
        script.push(Action::Send(BackendMessage::ReadyForQuery { status: b'I' }));
        script.push(Action::GoSilent);
        let err = expect_failure(
            &format!("{framing:?} XX001 at the end"),
            script,
            ErrorKind::Server,
            None,
            &[
                "BASE_BACKUP failed at the end",
                "checksum verification failure",
            ],
        )
        .await;
        assert_eq!(err.sqlstate(), Some("XX001"));
        assert!(
            err.advice().unwrap().contains("damaged data pages"),
            "{err}"
        );
    }
}

#[tokio::test]
async fn a_server_that_goes_silent_mid_copy_times_out() {
    for framing in BOTH {
        let s = scratch();
        let archives = [base(good_entries())];
        let mut script = opening(framing, &archives);
        script.extend(copy(framing, &archives, None).into_iter().take(3));
        script.push(Action::GoSilent);
        let options = BackupOptions::default().idle_timeout(Some(Duration::from_millis(400)));
        let started = Instant::now();
        let err = run(script, fast_sink(&s.target), options)
            .await
            .unwrap_err();
        let elapsed = started.elapsed();
        assert_eq!(err.kind(), ErrorKind::Timeout, "{framing:?} {err}");
        assert!(err.to_string().contains("sent nothing for 0.4 s"), "{err}");
        assert!(
            elapsed >= Duration::from_millis(350) && elapsed < Duration::from_secs(3),
            "{elapsed:?}"
        );
        s.assert_untouched(&format!("{framing:?} silent"));
    }
    assert_eq!(
        BackupOptions::default().idle_timeout,
        Some(basebackup::DEFAULT_IDLE_TIMEOUT)
    );
}

#[tokio::test]
async fn a_hostile_entry_then_silence_fails_at_once_not_at_the_idle_timeout() {
    for framing in BOTH {
        let mut tar = good_entries();
        tar.extend(file("../escape", b"x"));
        let archives = [base(tar)];
        let mut script = opening(framing, &archives);
        let messages = copy(framing, &archives, None);
        // Everything up to and including the hostile entry, then nothing.
        let upto = match framing {
            Framing::V14 => messages.len() - 1,
            Framing::V15 => messages.len() - 3,
        };
        script.extend(messages.into_iter().take(upto));
        script.push(Action::GoSilent);
        let started = Instant::now();
        expect_failure(
            &format!("{framing:?} hostile then silent"),
            script,
            ErrorKind::Unsafe,
            Some("../escape"),
            &["`..`"],
        )
        .await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "waited for the server after the writer failed: {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test]
async fn a_huge_valid_manifest_is_refused_with_bounded_memory() {
    // 30 000 declared files, none of which arrive: valid JSON, correct checksum.
    let declared: Vec<(String, u64, String)> = (0..30_000)
        .map(|i| (format!("base/1/{i}"), 8192, crc(&[])))
        .collect();
    let listed: Vec<(&str, u64, String)> = declared
        .iter()
        .map(|(p, s, c)| (p.as_str(), *s, c.clone()))
        .chain(
            good_files()
                .iter()
                .map(|(p, d)| (*p, d.len() as u64, crc(d))),
        )
        .collect();
    let manifest = manifest_of(&listed);
    // Parsing costs a bounded multiple of its size (the JSON tree plus the file list).
    let (parsed, peak) = peak_allocation(|| Manifest::parse(&manifest));
    assert_eq!(parsed.unwrap().files.len(), 30_002);
    eprintln!(
        "parsing a {} byte manifest peaked at {peak} bytes ({:.1}x)",
        manifest.len(),
        peak as f64 / manifest.len() as f64
    );
    assert!(
        peak < 12 * manifest.len(),
        "parsing a {} byte manifest peaked at {peak} bytes",
        manifest.len()
    );
    for framing in BOTH {
        let script = full(framing, &[base(good_entries())], Some(&manifest));
        expect_failure(
            &format!("{framing:?} huge manifest"),
            script,
            ErrorKind::Verify,
            Some("base/1/0"),
            &["base/1/0"],
        )
        .await;
    }
}

#[tokio::test]
async fn the_tar_sink_refuses_hostile_entries_and_leaves_nothing() {
    // The tar sink copies archives verbatim, but the stream is parsed (and refused)
    // all the same: no base.tar with a `..` entry is left for someone to extract later.
    for framing in BOTH {
        for (hostile, name) in [
            (file("../escape", b"x"), "../escape"),
            (
                entry(b"global/hard", b'1', 0, b"", b"PG_VERSION"),
                "global/hard",
            ),
        ] {
            let s = scratch();
            let mut tar = good_entries();
            tar.extend(hostile);
            let manifest = manifest_for(&good_files());
            let script = full(framing, &[base(tar)], Some(&manifest));
            let server = FakeServer::start(vec![script]).await;
            let client = ReplicationClient::connect(&config(&server)).await.unwrap();
            let sink = basebackup::TarSink::new(&s.target).options(SinkOptions {
                no_sync: true,
                ..SinkOptions::default()
            });
            let err = BaseBackup::start(client, BackupOptions::default())
                .await
                .unwrap()
                .receive(sink, None)
                .await
                .unwrap_err();
            let _ = server.outcomes().await;
            assert_eq!(err.kind(), ErrorKind::Unsafe, "{framing:?} {err}");
            assert_eq!(err.path(), Some(name), "{err}");
            s.assert_untouched(&format!("{framing:?} tar sink {name}"));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Asynchronous sinks, and what `abort` is told.

/// What a sink saw, shared with the test (the sink is not given back on failure).
#[derive(Debug, Default)]
struct Seen {
    calls: Vec<String>,
    archives: Vec<(String, Vec<u8>)>,
    files: usize,
    manifest: Option<Vec<u8>>,
    aborted: Option<basebackup::Error>,
}

type Shared = std::sync::Arc<std::sync::Mutex<Seen>>;

/// An asynchronous sink that keeps everything in memory, yields between chunks (as a
/// network client would), and fails where told.
struct MemorySink {
    seen: Shared,
    entries: bool,
    fail_after_chunks: Option<usize>,
    chunks: usize,
    archive_began: Option<tokio::sync::oneshot::Sender<()>>,
}

impl MemorySink {
    fn new(seen: &Shared) -> MemorySink {
        MemorySink {
            seen: seen.clone(),
            entries: true,
            fail_after_chunks: None,
            chunks: 0,
            archive_began: None,
        }
    }

    fn log(&self, call: &str) {
        self.seen.lock().unwrap().calls.push(call.to_owned());
    }
}

impl basebackup::AsyncBackupSink for MemorySink {
    async fn begin_backup(&mut self, info: &basebackup::BackupInfo) -> basebackup::Result<()> {
        self.log(&format!("begin_backup {} archives", info.tablespaces.len()));
        Ok(())
    }
    async fn begin_archive(&mut self, archive: &basebackup::ArchiveInfo) -> basebackup::Result<()> {
        self.log(&format!("begin_archive {}", archive.name));
        self.seen
            .lock()
            .unwrap()
            .archives
            .push((archive.name.clone(), Vec::new()));
        if let Some(tx) = self.archive_began.take() {
            let _ = tx.send(());
        }
        Ok(())
    }
    async fn archive_bytes(&mut self, data: Bytes) -> basebackup::Result<()> {
        tokio::task::yield_now().await;
        self.chunks += 1;
        if self.fail_after_chunks.is_some_and(|n| self.chunks > n) {
            return Err(basebackup::Error::sink(
                "uploading to the test store: the store refused the write (HTTP 507)",
                "free space in the test store",
            ));
        }
        let mut seen = self.seen.lock().unwrap();
        seen.archives.last_mut().unwrap().1.extend_from_slice(&data);
        Ok(())
    }
    fn wants_entries(&self) -> bool {
        self.entries
    }
    async fn entry(&mut self, event: basebackup::TarEvent) -> basebackup::Result<()> {
        if let basebackup::TarEvent::File { .. } = event {
            self.seen.lock().unwrap().files += 1;
        }
        Ok(())
    }
    async fn end_archive(&mut self, trailer_present: bool) -> basebackup::Result<()> {
        self.log(&format!("end_archive {trailer_present}"));
        Ok(())
    }
    async fn commit(&mut self, manifest: Option<Bytes>) -> basebackup::Result<()> {
        self.log("commit");
        self.seen.lock().unwrap().manifest = manifest.map(|m| m.to_vec());
        Ok(())
    }
    async fn abort(&mut self, reason: &basebackup::Error) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.log("abort");
        self.seen.lock().unwrap().aborted = Some(reason.clone());
    }
}

async fn run_async(
    script: Vec<Action>,
    sink: MemorySink,
) -> basebackup::Result<(basebackup::BackupResult, MemorySink)> {
    let server = FakeServer::start(vec![script]).await;
    let client = ReplicationClient::connect(&config(&server)).await.unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), async {
        BaseBackup::start(client, BackupOptions::default())
            .await?
            .receive_async(sink, None)
            .await
    })
    .await
    .expect("the backup hung");
    let _ = server.outcomes().await;
    result
}

#[tokio::test]
async fn an_async_sink_receives_the_verified_backup_and_is_given_back() {
    for framing in BOTH {
        for entries in [true, false] {
            let seen = Shared::default();
            let mut sink = MemorySink::new(&seen);
            sink.entries = entries;
            let manifest = manifest_for(&good_files());
            let script = full(framing, &[base(good_entries())], Some(&manifest));
            let (result, sink) = run_async(script, sink)
                .await
                .unwrap_or_else(|e| panic!("{framing:?}: {e}"));
            assert_eq!(result.files, 2);
            // The sink came back: its own state is readable without sharing.
            assert!(sink.chunks > 0);
            let seen = seen.lock().unwrap();
            let trailer = framing == Framing::V15;
            assert_eq!(
                seen.calls,
                [
                    "begin_backup 1 archives".to_string(),
                    "begin_archive base.tar".into(),
                    format!("end_archive {trailer}"),
                    "commit".into()
                ],
                "{framing:?}"
            );
            let mut sent = good_entries();
            if trailer {
                sent.extend([0u8; 1024]);
            }
            assert!(
                seen.archives == [("base.tar".to_string(), sent)],
                "{framing:?}"
            );
            assert_eq!(seen.files, if entries { 2 } else { 0 }, "{framing:?}");
            assert_eq!(seen.manifest.as_deref(), Some(&manifest[..]));
            assert!(seen.aborted.is_none());
        }
    }
}

#[tokio::test]
async fn an_async_sink_that_fails_stops_the_backup_and_is_aborted_with_its_own_error() {
    // A backup long enough that the failure must stop it early: 64 files of 8 KiB.
    let mut tar = Vec::new();
    let mut files = Vec::new();
    for i in 0..64 {
        let name: &'static str = Box::leak(format!("base/1/{}", 16384 + i).into_boxed_str());
        let data = vec![i as u8; 8192];
        tar.extend(file(name, &data));
        files.push((name, data));
    }
    let manifest = manifest_for(&files);
    for framing in BOTH {
        let seen = Shared::default();
        let mut sink = MemorySink::new(&seen);
        sink.fail_after_chunks = Some(3);
        let script = full(framing, &[base(tar.clone())], Some(&manifest));
        let err = run_async(script, sink).await.map(|_| ()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Sink, "{err}");
        assert!(err.to_string().contains("HTTP 507"), "{err}");
        assert!(
            err.to_string().contains("free space in the test store"),
            "{err}"
        );
        let seen = seen.lock().unwrap();
        assert!(
            !seen.calls.contains(&"commit".to_string()),
            "{:?}",
            seen.calls
        );
        assert_eq!(seen.calls.last().map(String::as_str), Some("abort"));
        let reason = seen.aborted.as_ref().unwrap();
        assert_eq!(reason.kind(), ErrorKind::Sink);
        assert!(reason.to_string().contains("HTTP 507"), "{reason}");
    }
}

#[tokio::test]
async fn abort_is_told_why_the_backup_failed() {
    for framing in BOTH {
        let manifest = manifest_for(&good_files());
        let archives = [base(good_entries())];

        // A server error mid-copy, for an asynchronous sink.
        let mut script = opening(framing, &archives);
        script.extend(
            copy(framing, &archives, Some(&manifest))
                .into_iter()
                .take(4),
        );
        script.push(Action::Send(BackendMessage::ErrorResponse(db_error(
            "58P01",
            "could not open file \"base/1/1259\"",
        ))));
        script.push(Action::GoSilent);
        let seen = Shared::default();
        let err = run_async(script, MemorySink::new(&seen))
            .await
            .map(|_| ())
            .unwrap_err();
        assert_eq!(err.sqlstate(), Some("58P01"), "{err}");
        let reason = seen
            .lock()
            .unwrap()
            .aborted
            .clone()
            .expect("abort was not called");
        assert_eq!(reason.kind(), ErrorKind::Server, "{reason}");
        assert_eq!(reason.db_error().map(|d| d.code.as_str()), Some("58P01"));

        // A hostile entry, for an asynchronous sink.
        let mut tar = good_entries();
        tar.extend(file("../escape", b"x"));
        let script = full(framing, &[base(tar)], Some(&manifest));
        let seen = Shared::default();
        let err = run_async(script, MemorySink::new(&seen))
            .await
            .map(|_| ())
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsafe, "{err}");
        let reason = seen
            .lock()
            .unwrap()
            .aborted
            .clone()
            .expect("abort was not called");
        assert_eq!(
            (reason.kind(), reason.path()),
            (ErrorKind::Unsafe, Some("../escape"))
        );

        // A lost connection, for a blocking sink.
        let mut script = opening(framing, &archives);
        script.extend(
            copy(framing, &archives, Some(&manifest))
                .into_iter()
                .take(3),
        );
        script.push(Action::Close);
        let server = FakeServer::start(vec![script]).await;
        let client = ReplicationClient::connect(&config(&server)).await.unwrap();
        let (reason_tx, reason_rx) = std::sync::mpsc::channel();
        let err = BaseBackup::start(client, BackupOptions::default())
            .await
            .unwrap()
            .receive(Reasons(reason_tx), None)
            .await
            .map(|_| ())
            .unwrap_err();
        let _ = server.outcomes().await;
        assert_eq!(err.kind(), ErrorKind::Io, "{err}");
        assert!(err.is_retryable(), "{err}");
        let reason = reason_rx.try_recv().expect("abort was not called");
        assert_eq!(reason.kind(), ErrorKind::Io, "{reason}");
        assert!(
            reason.to_string().contains("closed the connection"),
            "{reason}"
        );
    }
}

/// A blocking sink that reports the reason of its abort.
struct Reasons(std::sync::mpsc::Sender<basebackup::Error>);

impl basebackup::BackupSink for Reasons {
    fn begin_backup(&mut self, _: &basebackup::BackupInfo) -> basebackup::Result<()> {
        Ok(())
    }
    fn begin_archive(&mut self, _: &basebackup::ArchiveInfo) -> basebackup::Result<()> {
        Ok(())
    }
    fn end_archive(&mut self, _: bool) -> basebackup::Result<()> {
        Ok(())
    }
    fn commit(&mut self, _: Option<&[u8]>) -> basebackup::Result<()> {
        Ok(())
    }
    fn abort(&mut self, reason: &basebackup::Error) {
        let _ = self.0.send(reason.clone());
    }
}

#[tokio::test]
async fn a_dropped_backup_aborts_its_sink_as_cancelled() {
    for framing in BOTH {
        let archives = [base(good_entries())];
        let mut script = opening(framing, &archives);
        script.extend(copy(framing, &archives, None).into_iter().take(4));
        script.push(Action::GoSilent);

        // Asynchronous: the sink's task outlives the dropped future until `abort` ran.
        let server = FakeServer::start(vec![script.clone()]).await;
        let client = ReplicationClient::connect(&config(&server)).await.unwrap();
        let seen = Shared::default();
        let mut sink = MemorySink::new(&seen);
        let (began_tx, began_rx) = tokio::sync::oneshot::channel();
        sink.archive_began = Some(began_tx);
        let backup = BaseBackup::start(client, BackupOptions::default())
            .await
            .unwrap();
        let task = tokio::spawn(backup.receive_async(sink, None));
        tokio::time::timeout(Duration::from_secs(5), began_rx)
            .await
            .expect("the archive never began at the sink")
            .unwrap();
        task.abort();
        let started = Instant::now();
        let reason = loop {
            if let Some(reason) = seen.lock().unwrap().aborted.clone() {
                break reason;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{framing:?}: the sink was never aborted"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(reason.kind(), ErrorKind::Cancelled, "{reason}");
        assert!(!seen.lock().unwrap().calls.contains(&"commit".to_string()));
        drop(server);

        // Blocking: the writer thread aborts the sink once the channel closes.
        let server = FakeServer::start(vec![script]).await;
        let client = ReplicationClient::connect(&config(&server)).await.unwrap();
        let (reason_tx, reason_rx) = std::sync::mpsc::channel();
        let backup = BaseBackup::start(client, BackupOptions::default())
            .await
            .unwrap();
        let receiving = backup.receive(Reasons(reason_tx), None);
        // Long enough to start the writer and take in what the server sent.
        let _ = tokio::time::timeout(Duration::from_millis(300), receiving).await;
        let reason =
            tokio::task::spawn_blocking(move || reason_rx.recv_timeout(Duration::from_secs(5)))
                .await
                .unwrap()
                .expect("the blocking sink was never aborted");
        assert_eq!(reason.kind(), ErrorKind::Cancelled, "{reason}");
        drop(server);
    }
}

#[tokio::test]
async fn a_backup_that_fails_before_the_first_archive_never_calls_the_sink() {
    // The tablespace list is cut off: no sink call at all, neither abort.
    let archives = [base(good_entries())];
    let mut script = opening(Framing::V15, &archives);
    script.truncate(script.len() - 2);
    script.push(Action::Close);
    let seen = Shared::default();
    let err = run_async(script, MemorySink::new(&seen))
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io, "{err}");
    // receive_async returned after the sink's task ended: it never called the sink.
    let seen = seen.lock().unwrap();
    assert!(
        seen.calls.is_empty() && seen.aborted.is_none(),
        "{:?} {:?}",
        seen.calls,
        seen.aborted
    );
}
