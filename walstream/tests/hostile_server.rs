//! A scripted fake walsender (IDENTIFY_SYSTEM, SHOW wal_segment_size,
//! START_REPLICATION → CopyBoth with synthetic WAL from `WalBuilder`) sends what a real
//! server never would. `receive_wal` must fail with a typed error naming the LSN, never
//! panic or hang, and never complete a segment holding bytes it did not verify: the bad
//! XLogData never reaches the disk, and at most a `.partial` segment remains.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pgwire_repl::proto::backend::{BackendMessage, CopyResponse, FieldDescription};
use pgwire_repl::proto::replication::StandbyStatusUpdate;
use pgwire_repl::proto::replication::{PrimaryKeepalive, ReplicationMessage, XLogData};
use pgwire_repl::{Config, DbError, Lsn, TimelineId, WalSegmentSize};
use testkit::fake::{Action, FakeServer, FrontendMessage};
use walstream::decode::synth::{SynthOptions, WalBuilder};
use walstream::{receive_wal, EndReason, ErrorKind, ReceiveOptions, WalDirOptions};

/// 1 MiB segments keep the WAL small; streaming starts at 0/1000000 (segment 16).
const SEGMENT: u64 = 1 << 20;
const START: Lsn = Lsn(0x100_0000);
const SYSTEM_ID: u64 = 7_000_000_000_000_000_001;

fn segment_size() -> WalSegmentSize {
    WalSegmentSize::new(SEGMENT).unwrap()
}

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

fn result_set(columns: &[(&str, u32)], row: &[&str], tag: &str) -> Vec<Action> {
    vec![
        Action::Send(BackendMessage::RowDescription(
            columns.iter().map(|(n, t)| column(n, *t)).collect(),
        )),
        Action::Send(BackendMessage::DataRow(
            row.iter()
                .map(|v| Some(Bytes::copy_from_slice(v.as_bytes())))
                .collect(),
        )),
        Action::Send(BackendMessage::CommandComplete { tag: tag.into() }),
    ]
}

/// Handshake, IDENTIFY_SYSTEM (at 0/1000028 on timeline 1: the receiver starts at
/// 0/1000000), SHOW wal_segment_size, START_REPLICATION → CopyBothResponse.
fn opening() -> Vec<Action> {
    let mut s = vec![Action::handshake("15.18"), Action::Expect(b'Q')];
    s.extend(result_set(
        &[
            ("systemid", 25),
            ("timeline", 23),
            ("xlogpos", 25),
            ("dbname", 25),
        ],
        &[&SYSTEM_ID.to_string(), "1", "0/1000028", ""],
        "IDENTIFY_SYSTEM",
    ));
    s.push(Action::Send(BackendMessage::ReadyForQuery { status: b'I' }));
    s.push(Action::Expect(b'Q'));
    s.extend(result_set(&[("wal_segment_size", 25)], &["1MB"], "SHOW"));
    s.push(Action::Send(BackendMessage::ReadyForQuery { status: b'I' }));
    s.push(Action::Expect(b'Q'));
    s.push(copy_both());
    s
}

fn copy_both() -> Action {
    Action::Send(BackendMessage::CopyBothResponse(CopyResponse {
        format: 0,
        column_formats: vec![],
    }))
}

fn xlog(start: Lsn, data: &[u8]) -> Action {
    let mut out = BytesMut::new();
    ReplicationMessage::XLogData(XLogData {
        wal_start: start,
        wal_end: Lsn(start.0 + data.len() as u64),
        send_time: 0,
        data: Bytes::copy_from_slice(data),
    })
    .encode(&mut out);
    Action::Send(BackendMessage::CopyData(out.freeze()))
}

fn keepalive(wal_end: Lsn, reply_requested: bool) -> Action {
    let mut out = BytesMut::new();
    ReplicationMessage::PrimaryKeepalive(PrimaryKeepalive {
        wal_end,
        send_time: 0,
        reply_requested,
    })
    .encode(&mut out);
    Action::Send(BackendMessage::CopyData(out.freeze()))
}

/// WAL bytes from `from` on, as XLogData messages of at most 16 KiB.
fn stream(wal: &WalBuilder, from: Lsn) -> Vec<Action> {
    let bytes = wal.bytes_from(from);
    bytes
        .chunks(16 * 1024)
        .enumerate()
        .map(|(i, c)| xlog(Lsn(from.0 + (i * 16 * 1024) as u64), c))
        .collect()
}

/// The walsender shuts down: `COPY 0` without CopyDone, then the socket closes.
fn shutdown() -> Vec<Action> {
    vec![
        Action::Send(BackendMessage::CommandComplete {
            tag: "COPY 0".into(),
        }),
        Action::Close,
    ]
}

/// A timeline 1 WAL: records, some crossing pages, up to `len` bytes past the start.
fn wal(timeline: u32, start: Lsn, len: u64) -> WalBuilder {
    let mut opts = SynthOptions::new(segment_size(), 15);
    opts.timeline = timeline;
    let mut wal = WalBuilder::new(start, opts);
    let mut i = 0u32;
    while wal.position().0 < start.0 + len {
        wal.filler(100 + (i * 977) % 12_000);
        i += 1;
    }
    wal
}

fn options(dir: &Path) -> ReceiveOptions {
    let mut o = ReceiveOptions::new(dir);
    o.no_loop = true;
    o.dir_options = WalDirOptions {
        sync: false,
        ..WalDirOptions::default()
    };
    o.idle_timeout = Some(Duration::from_secs(5));
    o
}

fn config(server: &FakeServer) -> Config {
    Config::parse(&format!("{} connect_timeout=5", server.conninfo())).unwrap()
}

async fn run(
    scripts: Vec<Vec<Action>>,
    options: &ReceiveOptions,
) -> (
    walstream::Result<walstream::ReceiveSummary>,
    Vec<Vec<FrontendMessage>>,
) {
    let server = FakeServer::start(scripts).await;
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        receive_wal(&config(&server), options, std::future::pending()),
    )
    .await
    .expect("receive_wal hung");
    let received = server
        .outcomes()
        .await
        .into_iter()
        .map(|o| o.unwrap_or_default())
        .collect();
    (result, received)
}

/// The files in the WAL directory, sorted.
fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn segment_name(timeline: u32, lsn: Lsn) -> String {
    lsn.wal_file_name(TimelineId(timeline), segment_size())
}

/// Only the first segment, as `.partial`, holding exactly the first `good` bytes of `wal`
/// and zeros after (it is pre-sized): nothing of the refused message landed.
fn assert_only_partial(dir: &Path, wal: &[u8], good: usize, case: &str) {
    let partial = format!("{}.partial", segment_name(1, START));
    assert_eq!(files(dir), std::slice::from_ref(&partial), "{case}");
    let content = std::fs::read(dir.join(&partial)).unwrap();
    assert_eq!(content.len() as u64, SEGMENT, "{case}: pre-sized");
    assert_eq!(&content[..good], &wal[..good], "{case}: verified bytes");
    assert!(
        content[good..].iter().all(|&b| b == 0),
        "{case}: bytes past the refused message reached the disk"
    );
}

fn db_error(code: &str, message: &str) -> DbError {
    DbError {
        severity: "ERROR".into(),
        code: code.into(),
        message: message.into(),
        ..DbError::default()
    }
}

/// The standby status updates the client sent.
fn status_updates(received: &[FrontendMessage]) -> Vec<StandbyStatusUpdate> {
    received
        .iter()
        .filter(|m| m.tag == b'd' && m.body.first() == Some(&b'r'))
        .map(|m| StandbyStatusUpdate::parse(&m.body).unwrap())
        .collect()
}

// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn the_fake_walsender_streams_a_verified_segment() {
    let dir = tempfile::tempdir().unwrap();
    let w = wal(1, START, SEGMENT + 20_000);
    let end = w.position();
    let mut script = opening();
    script.extend(stream(&w, START));
    script.extend(shutdown());
    let (result, _) = run(vec![script], &options(dir.path())).await;
    let summary = result.unwrap();
    assert_eq!(summary.end_reason, EndReason::ServerShutdown);
    assert_eq!(summary.written, end);
    assert_eq!(summary.segments_completed, 1);
    let complete = segment_name(1, START);
    assert_eq!(
        files(dir.path()),
        [
            complete.clone(),
            format!("{}.partial", segment_name(1, Lsn(START.0 + SEGMENT)))
        ]
    );
    assert_eq!(
        std::fs::read(dir.path().join(complete)).unwrap(),
        &w.bytes()[..SEGMENT as usize]
    );
}

#[tokio::test]
async fn corrupt_wal_is_refused_naming_the_lsn_and_never_lands() {
    let w = wal(1, START, 200_000);
    let bytes = w.bytes().to_vec();
    let records = w.records().to_vec();
    // The message that carries the bad byte is the third (48 KiB .. 64 KiB).
    let bad_message_start = 2 * 16 * 1024;
    let cases: Vec<(&str, Vec<u8>, Lsn, &str)> = vec![
        {
            // The magic of the page at 0/100A000 (inside the third message).
            let mut b = bytes.clone();
            let page = 5 * 8192;
            b[page] ^= 0xFF;
            ("wrong page magic", b, Lsn(START.0 + page as u64), "magic")
        },
        {
            // A byte inside a record that starts in the third message.
            let record = records
                .iter()
                .find(|r| r.lsn.0 >= START.0 + bad_message_start as u64 + 100)
                .unwrap();
            let mut b = bytes.clone();
            let at = (record.lsn.0 - START.0) as usize + 30;
            b[at] ^= 0x01;
            ("CRC mismatch", b, record.lsn, "CRC")
        },
    ];
    for (case, corrupt, lsn, word) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut script = opening();
        let messages: Vec<Action> = corrupt
            .chunks(16 * 1024)
            .enumerate()
            .map(|(i, c)| xlog(Lsn(START.0 + (i * 16 * 1024) as u64), c))
            .collect();
        script.extend(messages);
        script.extend(shutdown());
        let started = Instant::now();
        let (result, _) = run(vec![script], &options(dir.path())).await;
        let err = result.unwrap_err();
        eprintln!("{case}: {:?}: {err}", err.kind());
        assert_eq!(err.kind(), ErrorKind::Verify, "{case}: {err}");
        assert_eq!(err.lsn(), Some(lsn), "{case}: {err}");
        let text = err.to_string();
        assert!(text.contains(&lsn.to_string()), "{case}: {text}");
        assert!(text.contains(word), "{case}: expected {word:?} in {text}");
        assert!(started.elapsed() < Duration::from_secs(5), "{case}");
        // The two messages before the bad one landed (in .partial); nothing after.
        assert_only_partial(dir.path(), &bytes, bad_message_start, case);
    }
}

#[tokio::test]
async fn gaps_and_backward_starts_are_protocol_errors_naming_both_positions() {
    let w = wal(1, START, 64 * 1024);
    let bytes = w.bytes();
    let chunk = 16 * 1024;
    let second = Lsn(START.0 + chunk as u64);
    for (case, skip_to, expected_text) in [
        ("gap", Lsn(second.0 + 8192), "0/1006000"),
        ("backwards", Lsn(START.0 + 8192), "0/1002000"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut script = opening();
        script.push(xlog(START, &bytes[..chunk]));
        let from = (skip_to.0 - START.0) as usize;
        script.push(xlog(skip_to, &bytes[from..from + chunk]));
        script.extend(shutdown());
        let (result, _) = run(vec![script], &options(dir.path())).await;
        let err = result.unwrap_err();
        eprintln!("{case}: {:?}: {err}", err.kind());
        assert_eq!(err.kind(), ErrorKind::Protocol, "{case}: {err}");
        let text = err.to_string();
        assert!(
            text.contains(&format!("starting at {expected_text}, expected 0/1004000")),
            "{case}: {text}"
        );
        assert_only_partial(dir.path(), bytes, chunk, case);
    }
}

#[tokio::test]
async fn an_oversized_length_prefix_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let w = wal(1, START, 16 * 1024);
    let mut script = opening();
    script.extend(stream(&w, START));
    script.push(Action::SendRaw(Bytes::from_static(&[b'd', 0x80, 0, 0, 0])));
    script.push(Action::GoSilent);
    let started = Instant::now();
    let (result, _) = run(vec![script], &options(dir.path())).await;
    let err = result.unwrap_err();
    eprintln!("{:?}: {err}", err.kind());
    assert_eq!(err.kind(), ErrorKind::Protocol, "{err}");
    assert!(err.to_string().contains("2147483648 bytes"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
    let n = w.bytes().len();
    assert_only_partial(dir.path(), w.bytes(), n, "oversized");
}

#[tokio::test]
async fn a_silent_server_times_out_within_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let w = wal(1, START, 20_000);
    let mut script = opening();
    script.extend(stream(&w, START));
    script.push(Action::GoSilent);
    let mut opts = options(dir.path());
    opts.idle_timeout = Some(Duration::from_millis(500));
    opts.status_interval = None;
    let started = Instant::now();
    let (result, _) = run(vec![script], &opts).await;
    let elapsed = started.elapsed();
    let err = result.unwrap_err();
    eprintln!("{:?}: {err}", err.kind());
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(
        err.to_string()
            .contains("sent nothing for 0.5 s while streaming WAL"),
        "{err}"
    );
    assert!(
        elapsed >= Duration::from_millis(450) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    let n = w.bytes().len();
    assert_only_partial(dir.path(), w.bytes(), n, "silent");
}

#[tokio::test]
async fn an_error_mid_copy_is_a_server_error_and_keeps_what_was_verified() {
    let dir = tempfile::tempdir().unwrap();
    let w = wal(1, START, 40_000);
    let mut script = opening();
    script.extend(stream(&w, START));
    script.push(Action::Send(BackendMessage::ErrorResponse(db_error(
        "58P01",
        "requested WAL segment 000000010000000000000011 has already been removed",
    ))));
    script.push(Action::Close);
    let (result, _) = run(vec![script], &options(dir.path())).await;
    let err = result.unwrap_err();
    eprintln!("{:?}: {err}", err.kind());
    assert_eq!(err.kind(), ErrorKind::Server, "{err}");
    assert_eq!(err.sqlstate(), Some("58P01"));
    assert!(
        err.to_string().contains("has already been removed"),
        "{err}"
    );
    let n = w.bytes().len();
    assert_only_partial(dir.path(), w.bytes(), n, "error mid-copy");
}

#[tokio::test]
async fn reply_requested_keepalives_are_answered_with_the_verified_positions() {
    let dir = tempfile::tempdir().unwrap();
    let w = wal(1, START, 40_000);
    let end = w.position(); // the end of the last complete record
                            // Part of one more record: written, but not verified (its CRC has not arrived).
    let mut longer = w.clone();
    longer.filler(9_000);
    let partial_end = Lsn(end.0 + 2_000);
    let mut script = opening();
    script.extend(stream(&w, START));
    script.push(xlog(end, &longer.bytes_from(end)[..2_000]));
    script.push(keepalive(partial_end, true));
    script.push(Action::Expect(b'd'));
    script.extend(shutdown());
    let mut opts = options(dir.path());
    opts.report_flush = Some(true);
    opts.status_interval = None;
    let (result, received) = run(vec![script], &opts).await;
    assert_eq!(result.unwrap().end_reason, EndReason::ServerShutdown);
    let updates = status_updates(&received[0]);
    let reply = updates.last().expect("a reply to the keepalive");
    assert_eq!(reply.write, partial_end, "write: everything received");
    // The verified position is the end of the last complete record, MAXALIGNed (where
    // the next record starts).
    let verified = Lsn((end.0 + 7) & !7);
    assert_eq!(
        reply.flush, verified,
        "flush: only what is verified and fsynced"
    );
    assert!(!reply.reply_requested);
}

#[tokio::test]
async fn a_scripted_timeline_switch_is_followed() {
    let dir = tempfile::tempdir().unwrap();
    // Timeline 1 up to a switch point inside the first segment; timeline 2 continues
    // from the switch point's segment start with its own page headers.
    let w1 = wal(1, START, 30_000);
    let switch = w1.position();
    let mut w2 = WalBuilder::new(START, {
        let mut o = SynthOptions::new(segment_size(), 15);
        o.timeline = 2;
        o
    });
    while w2.position() < switch {
        w2.filler(500);
    }
    let mut first = opening();
    first.extend(stream(&w1, START));
    // End of timeline 1: CopyDone, wait for ours, then the next timeline result set.
    first.push(Action::Send(BackendMessage::CopyDone));
    first.push(Action::Expect(b'c'));
    first.extend(result_set(
        &[("next_tli", 20), ("next_tli_startpos", 25)],
        &["2", &switch.to_string()],
        "START_STREAMING",
    ));
    first.push(Action::Send(BackendMessage::CommandComplete {
        tag: "START_REPLICATION".into(),
    }));
    first.push(Action::Send(BackendMessage::ReadyForQuery { status: b'I' }));
    first.push(Action::Expect(b'X'));
    let history = format!("1\t{switch}\tno recovery target specified\n");
    let mut second = vec![Action::handshake("15.18"), Action::Expect(b'Q')];
    second.extend(result_set(
        &[("filename", 25), ("content", 25)],
        &["00000002.history", &history],
        "TIMELINE_HISTORY",
    ));
    second.push(Action::Send(BackendMessage::ReadyForQuery { status: b'I' }));
    second.push(Action::Expect(b'Q'));
    second.push(copy_both());
    second.extend(stream(&w2, START));
    second.extend(shutdown());
    let (result, received) = run(vec![first, second], &options(dir.path())).await;
    let summary = result.unwrap();
    assert_eq!(summary.timeline_switches, 1);
    assert_eq!(summary.timeline, TimelineId(2));
    assert_eq!(summary.written, w2.position());
    let start_2 = received[1]
        .iter()
        .filter_map(FrontendMessage::query_text)
        .find(|q| q.starts_with("START_REPLICATION"))
        .unwrap()
        .to_string();
    assert!(start_2.ends_with("0/1000000 TIMELINE 2"), "{start_2}");
    assert_eq!(
        files(dir.path()),
        [
            format!("{}.partial", segment_name(1, START)),
            "00000002.history".to_string(),
            format!("{}.partial", segment_name(2, START)),
        ]
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("00000002.history")).unwrap(),
        history
    );
}

#[tokio::test]
async fn a_timeline_switch_that_goes_backwards_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let w1 = wal(1, START, 10_000);
    let mut first = opening();
    first.extend(stream(&w1, START));
    first.push(Action::Send(BackendMessage::CopyDone));
    first.push(Action::Expect(b'c'));
    first.extend(result_set(
        &[("next_tli", 20), ("next_tli_startpos", 25)],
        &["1", "0/1000100"],
        "START_STREAMING",
    ));
    first.push(Action::Send(BackendMessage::CommandComplete {
        tag: "START_REPLICATION".into(),
    }));
    first.push(Action::Send(BackendMessage::ReadyForQuery { status: b'I' }));
    first.push(Action::GoSilent);
    let (result, _) = run(vec![first], &options(dir.path())).await;
    let err = result.unwrap_err();
    eprintln!("{:?}: {err}", err.kind());
    assert_eq!(err.kind(), ErrorKind::State, "{err}");
    assert!(err.to_string().contains("from timeline 1 to 1"), "{err}");
}

#[tokio::test]
async fn a_segment_whose_last_record_fails_its_crc_is_never_completed() {
    // A record crosses from the first segment into the second; its bad byte lies in the
    // second. Every byte of the first segment arrives and verifies up to that record,
    // but the segment must stay .partial: its last record never verified.
    let w = wal(1, START, SEGMENT + 40_000);
    let boundary = START.0 + SEGMENT;
    let crossing = w
        .records()
        .iter()
        .find(|r| r.lsn.0 < boundary && r.lsn.0 + u64::from(r.tot_len) > boundary + 200)
        .copied()
        .expect("a record crossing the segment boundary");
    let mut bytes = w.bytes().to_vec();
    // Past the second segment's long page header (40 bytes).
    bytes[SEGMENT as usize + 100] ^= 0x01;
    let dir = tempfile::tempdir().unwrap();
    let mut script = opening();
    script.extend(
        bytes
            .chunks(16 * 1024)
            .enumerate()
            .map(|(i, c)| xlog(Lsn(START.0 + (i * 16 * 1024) as u64), c)),
    );
    script.extend(shutdown());
    let (result, _) = run(vec![script], &options(dir.path())).await;
    let err = result.unwrap_err();
    eprintln!("{:?}: {err}", err.kind());
    assert_eq!(err.kind(), ErrorKind::Verify, "{err}");
    assert_eq!(err.lsn(), Some(crossing.lsn), "{err}");
    assert!(err.to_string().contains(&crossing.lsn.to_string()), "{err}");
    // Fully written, not completed.
    assert_only_partial(
        dir.path(),
        &bytes,
        SEGMENT as usize,
        "record crossing the segment end",
    );
}

/// Pinned from the copyboth_stream fuzz target: after a malformed end-of-timeline row
/// (an empty next_tli), the machine must stay failed instead of going on to report a
/// clean end at ReadyForQuery.
#[test]
fn copyboth_stays_failed_after_a_malformed_message() {
    use walstream::protocol::CopyBoth;
    let mut machine = CopyBoth::new(START);
    machine
        .handle(BackendMessage::CopyBothResponse(CopyResponse {
            format: 0,
            column_formats: vec![],
        }))
        .unwrap();
    machine.handle(BackendMessage::CopyDone).unwrap();
    machine
        .handle(BackendMessage::RowDescription(vec![
            column("next_tli", 20),
            column("next_tli_startpos", 25),
        ]))
        .unwrap();
    let err = machine
        .handle(BackendMessage::DataRow(vec![
            Some(Bytes::new()),
            Some(Bytes::from_static(b"0/1000040")),
        ]))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Protocol, "{err}");
    assert!(machine.is_done());
    assert!(machine
        .handle(BackendMessage::ReadyForQuery { status: b'I' })
        .is_err());
    // The same for a malformed CopyData payload while streaming.
    let mut machine = CopyBoth::new(START);
    machine
        .handle(BackendMessage::CopyBothResponse(CopyResponse {
            format: 0,
            column_formats: vec![],
        }))
        .unwrap();
    assert!(machine
        .handle(BackendMessage::CopyData(Bytes::from_static(b"w\0")))
        .is_err());
    assert!(machine.is_done());
}
