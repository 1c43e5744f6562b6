//! The WAL verifier against real WAL: the segment files a real server (version from
//! PGREPL_TEST_PG) wrote into pg_wal must verify record by record, and one changed
//! byte must be reported as a CRC mismatch of exactly that record.

use std::path::{Path, PathBuf};
use std::process::Command;

use pgwire_repl::{Lsn, SystemId, TimelineId, WalSegmentSize};
use testkit::{Cluster, ClusterOptions};
use walstream::decode::{RecordInfo, VerifierConfig, WalVerifier, WalVerifyErrorKind};

struct Wal {
    segment_size: WalSegmentSize,
    config: VerifierConfig,
    /// The completed segments, in order, contiguous: (segment start, bytes).
    segments: Vec<(Lsn, Vec<u8>)>,
}

async fn generate_wal(cluster: &Cluster) -> Wal {
    cluster
        .execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text);
             ALTER TABLE t ALTER COLUMN v SET STORAGE EXTERNAL;
             INSERT INTO t SELECT g, repeat(md5(g::text), 160 + g % 100) FROM generate_series(1, 3000) g;
             SELECT pg_switch_wal();
             CHECKPOINT;
             UPDATE t SET id = id WHERE id % 7 = 0;
             SELECT pg_logical_emit_message(true, 'big', repeat('y', 20000000));
             INSERT INTO t SELECT g, repeat('z', 300) FROM generate_series(3001, 6000) g;
             SELECT pg_switch_wal();
             CHECKPOINT;
             INSERT INTO t SELECT g, 'a' FROM generate_series(6001, 6100) g;
             SELECT pg_switch_wal();",
        )
        .await;
    let system_id: u64 = cluster
        .query_value("SELECT system_identifier FROM pg_control_system()")
        .await
        .expect("a system identifier")
        .parse()
        .expect("a number");
    let segment_size = WalSegmentSize::parse_setting(
        &cluster
            .query_value("SHOW wal_segment_size")
            .await
            .expect("a segment size"),
    )
    .expect("a valid segment size");
    let current: Lsn = cluster
        .query_value("SELECT pg_current_wal_insert_lsn()")
        .await
        .expect("an LSN")
        .parse()
        .expect("a valid LSN");
    let current_segment = current.segment_number(segment_size);

    // The contiguous run of timeline-1 segments that ends just before the current one.
    let pg_wal = cluster.data_dir().join("pg_wal");
    let mut segments = Vec::new();
    let mut segno = current_segment;
    while segno > 0 {
        segno -= 1;
        let name = pgwire_repl::types::wal_file_name(TimelineId(1), segno, segment_size);
        let path = pg_wal.join(&name);
        if !path.exists() {
            break;
        }
        let bytes =
            std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        assert_eq!(bytes.len() as u64, segment_size.bytes(), "{name}");
        segments.push((Lsn(segno * segment_size.bytes()), bytes));
    }
    segments.reverse();
    assert!(
        segments.len() >= 4,
        "only {} completed segments",
        segments.len()
    );
    let config = VerifierConfig {
        segment_size,
        server_major: Some(cluster.major()),
        system_id: Some(SystemId(system_id)),
        timeline: TimelineId(1),
        verify_records: true,
    };
    Wal {
        segment_size,
        config,
        segments,
    }
}

/// Feeds all segments in 128 KiB pieces (as XLogData would carry them; the pieces
/// straddle segment boundaries); returns the records or the first error.
fn verify(
    wal: &Wal,
    segments: &[(Lsn, Vec<u8>)],
) -> (
    WalVerifier,
    Result<Vec<RecordInfo>, walstream::decode::WalVerifyError>,
) {
    let start = segments[0].0;
    let stream: Vec<u8> = segments
        .iter()
        .flat_map(|(_, bytes)| bytes.iter().copied())
        .collect();
    let mut verifier = WalVerifier::new(start, wal.config.clone());
    let mut records = Vec::new();
    for (i, piece) in stream.chunks(128 * 1024).enumerate() {
        let lsn = Lsn(start.0 + (i * 128 * 1024) as u64);
        if let Err(err) = verifier.feed_with(lsn, piece, |r| records.push(*r)) {
            return (verifier, Err(err));
        }
    }
    (verifier, Ok(records))
}

/// What the server wrote after each XLOG_SWITCH: the next page's header, described.
fn describe_switch_padding(wal: &Wal, switch: &RecordInfo) -> String {
    let segment = wal.segment_size.bytes();
    let next_page = switch.end.0.next_multiple_of(8192);
    if next_page % segment == 0 {
        return "the switch record's page is the segment's last".to_owned();
    }
    let Some((start, bytes)) = wal
        .segments
        .iter()
        .find(|(s, _)| s.0 / segment == next_page / segment)
    else {
        return "segment not read".to_owned();
    };
    let offset = (next_page - start.0) as usize;
    let header = &bytes[offset..offset + 24];
    let rest_zero = bytes[offset + 24..].iter().all(|&b| b == 0);
    let tail_after_record = bytes[(switch.end.0 - start.0) as usize..offset]
        .iter()
        .all(|&b| b == 0);
    format!(
        "next page header {}; rest of segment {}; rest of the switch record's page {}",
        if header.iter().all(|&b| b == 0) {
            "all zeros".to_owned()
        } else {
            format!("valid-looking, magic {:02X}{:02X}", header[1], header[0])
        },
        if rest_zero { "zeros" } else { "NOT zeros" },
        if tail_after_record {
            "zeros"
        } else {
            "NOT zeros"
        },
    )
}

fn pg_waldump_records(cluster: &Cluster, pg_wal: &Path, start: Lsn, end: Lsn) -> Option<Vec<Lsn>> {
    let bin: PathBuf = cluster.bin("pg_waldump");
    if !bin.exists() {
        return None;
    }
    let output = Command::new(&bin)
        .arg("-p")
        .arg(pg_wal)
        .arg("-s")
        .arg(start.to_string())
        .arg("-e")
        .arg(end.to_string())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let lsns = text
        .lines()
        .filter_map(|line| {
            let rest = &line[line.find("lsn: ")? + 5..];
            rest.split(',').next()?.trim().parse().ok()
        })
        .collect();
    Some(lsns)
}

#[tokio::test(flavor = "multi_thread")]
async fn real_wal_segments_verify_and_a_changed_byte_names_its_record() {
    let cluster = Cluster::start(ClusterOptions::new().setting("wal_keep_size", "1GB"));
    let wal = generate_wal(&cluster).await;
    let first = wal.segments[0].0;
    let end = Lsn(wal.segments.last().unwrap().0 .0 + wal.segment_size.bytes());

    let (verifier, result) = verify(&wal, &wal.segments);
    let records = result.unwrap_or_else(|err| panic!("PostgreSQL {}: {err}", cluster.version()));
    assert_eq!(
        verifier.verified_up_to(),
        end,
        "the last segment ends with XLOG_SWITCH"
    );
    assert_eq!(verifier.records_verified(), records.len() as u64);
    let switches: Vec<&RecordInfo> = records.iter().filter(|r| r.is_switch()).collect();
    assert!(switches.len() >= 3, "{} switch records", switches.len());
    let longest = records.iter().map(|r| r.tot_len).max().unwrap_or(0);
    assert!(
        longest > 20_000_000,
        "the 20 MB message spans segments ({longest})"
    );
    assert!(
        records.iter().any(|r| r.tot_len > 8192),
        "a record crossing pages"
    );
    eprintln!(
        "PostgreSQL {}: {} segments from {first}, {} records verified, longest {longest} bytes",
        cluster.version(),
        wal.segments.len(),
        records.len()
    );
    for switch in &switches {
        eprintln!(
            "  after XLOG_SWITCH at {}: {}",
            switch.lsn,
            describe_switch_padding(&wal, switch)
        );
    }

    // pg_waldump, where installed, sees the same records.
    let pg_wal = cluster.data_dir().join("pg_wal");
    let from = records[0].lsn;
    if let Some(dumped) = pg_waldump_records(&cluster, &pg_wal, from, records.last().unwrap().lsn) {
        let ours: Vec<Lsn> = records
            .iter()
            .map(|r| r.lsn)
            .filter(|l| *l < records.last().unwrap().lsn)
            .collect();
        assert_eq!(
            dumped.len(),
            ours.len(),
            "pg_waldump and the verifier disagree"
        );
        assert_eq!(dumped, ours);
        eprintln!("  pg_waldump agrees on {} records", dumped.len());
    }

    // Streaming starts at a segment start, often mid-record: every later segment start works.
    for k in 1..wal.segments.len() {
        let (verifier, result) = verify(&wal, &wal.segments[k..]);
        let tail = result.unwrap_or_else(|err| panic!("from {}: {err}", wal.segments[k].0));
        assert_eq!(verifier.verified_up_to(), end);
        let expected: Vec<Lsn> = records
            .iter()
            .map(|r| r.lsn)
            .filter(|l| *l >= tail[0].lsn)
            .collect();
        assert_eq!(tail.iter().map(|r| r.lsn).collect::<Vec<_>>(), expected);
    }

    // One byte changed inside a record's data: a CRC mismatch naming that record.
    let victim = records
        .iter()
        .filter(|r| {
            r.tot_len > 200
                && r.lsn.0 % 8192 + 200 < 8192
                && r.lsn.0 / wal.segment_size.bytes() > first.0 / wal.segment_size.bytes()
        })
        .nth(100)
        .expect("a record to corrupt");
    let mut corrupted = wal.segments.clone();
    let segment = (victim.lsn.0 - first.0) / wal.segment_size.bytes();
    let (start, bytes) = &mut corrupted[segment as usize];
    bytes[(victim.lsn.0 - start.0) as usize + 100] ^= 0x20;
    let (verifier, result) = verify(&wal, &corrupted);
    let err = result.expect_err("the changed byte must be detected");
    assert_eq!(err.lsn, victim.lsn, "{err}");
    assert!(
        matches!(err.kind, WalVerifyErrorKind::RecordCrcMismatch { record_len, .. } if record_len == victim.tot_len),
        "{err}"
    );
    assert!(verifier.verified_up_to() <= victim.lsn);
    eprintln!("  corrupted record reported as: {err}");
}

fn read_segment(
    pg_wal: &Path,
    timeline: u32,
    segno: u64,
    segment_size: WalSegmentSize,
) -> Option<Vec<u8>> {
    let name = pgwire_repl::types::wal_file_name(TimelineId(timeline), segno, segment_size);
    std::fs::read(pg_wal.join(&name))
        .or_else(|_| std::fs::read(pg_wal.join(format!("{name}.partial"))))
        .ok()
}

fn feed_all(verifier: &mut WalVerifier, start: Lsn, bytes: &[u8]) -> Vec<RecordInfo> {
    let mut records = Vec::new();
    for (i, piece) in bytes.chunks(128 * 1024).enumerate() {
        let lsn = Lsn(start.0 + (i * 128 * 1024) as u64);
        if let Err(err) = verifier.feed_with(lsn, piece, |r| records.push(*r)) {
            panic!("{err}");
        }
    }
    records
}

/// A real promotion: timeline 2's first segment is a copy of timeline 1's up to the
/// switch point, so its early pages carry TLI 1. Both ways of verifying it work: as
/// timeline 2 from that segment's start, and following timeline 1 then switching.
#[tokio::test(flavor = "multi_thread")]
async fn real_timeline_switch_verifies() {
    let mut cluster = Cluster::start(ClusterOptions::new().setting("wal_keep_size", "1GB"));
    cluster
        .execute(
            "CREATE TABLE t (id int, v text);
             INSERT INTO t SELECT g, repeat(md5(g::text), 20) FROM generate_series(1, 20000) g;",
        )
        .await;
    let segment_size = WalSegmentSize::parse_setting(
        &cluster
            .query_value("SHOW wal_segment_size")
            .await
            .expect("a size"),
    )
    .expect("a valid size");
    let system_id: u64 = cluster
        .query_value("SELECT system_identifier FROM pg_control_system()")
        .await
        .expect("a system identifier")
        .parse()
        .expect("a number");
    // Restart as a standby with no WAL source, then promote: timeline 2 begins at the
    // end of timeline 1's WAL.
    cluster.stop();
    let signal = cluster.data_dir().join("standby.signal");
    std::fs::write(&signal, b"").expect("standby.signal");
    let owner = std::fs::metadata(cluster.data_dir()).expect("data dir");
    std::os::unix::fs::chown(
        &signal,
        Some(std::os::unix::fs::MetadataExt::uid(&owner)),
        Some(std::os::unix::fs::MetadataExt::gid(&owner)),
    )
    .expect("chown standby.signal");
    cluster.start_again();
    cluster.promote();
    cluster
        .execute(
            "INSERT INTO t SELECT g, repeat(md5(g::text), 20) FROM generate_series(1, 20000) g;
             SELECT pg_switch_wal();",
        )
        .await;
    let current: Lsn = cluster
        .query_value("SELECT pg_current_wal_insert_lsn()")
        .await
        .expect("an LSN")
        .parse()
        .expect("a valid LSN");
    let pg_wal = cluster.data_dir().join("pg_wal");
    let history =
        std::fs::read_to_string(pg_wal.join("00000002.history")).expect("00000002.history");
    let switch_point: Lsn = history
        .lines()
        .find_map(|line| line.split('\t').nth(1)?.parse().ok())
        .expect("a switch point in the history file");
    let seg = segment_size.bytes();
    let switch_segment = switch_point.0 / seg;
    let end_segment = current.0 / seg; // exclusive: the current one is incomplete
    assert!(end_segment > switch_segment);
    let config = |timeline| VerifierConfig {
        segment_size,
        server_major: Some(cluster.major()),
        system_id: Some(SystemId(system_id)),
        timeline: TimelineId(timeline),
        verify_records: true,
    };
    let tl2: Vec<u8> = (switch_segment..end_segment)
        .flat_map(|segno| {
            read_segment(&pg_wal, 2, segno, segment_size).expect("a timeline 2 segment")
        })
        .collect();
    let tl2_start = Lsn(switch_segment * seg);
    let end = Lsn(end_segment * seg);

    // As timeline 2 from the start of its first segment.
    let mut verifier = WalVerifier::new(tl2_start, config(2));
    let records = feed_all(&mut verifier, tl2_start, &tl2);
    assert_eq!(verifier.verified_up_to(), end);
    assert!(
        records.iter().any(|r| r.lsn == switch_point),
        "a record starts at the switch point {switch_point}"
    );
    // Timeline 1 only may not read it: its pages after the switch point say 2.
    let mut strict = WalVerifier::new(tl2_start, config(1));
    let err = strict
        .feed(tl2_start, &tl2)
        .expect_err("timeline 2 pages refused as timeline 1");
    assert!(
        matches!(
            err.kind,
            WalVerifyErrorKind::WrongTimeline {
                found: 2,
                expected: 1
            }
        ),
        "{err}"
    );

    // Following timeline 1 up to the switch point, then switching.
    let first_segment = (1..=switch_segment)
        .rev()
        .take_while(|&s| read_segment(&pg_wal, 1, s, segment_size).is_some())
        .last()
        .expect("timeline 1 segments");
    let mut tl1: Vec<u8> = (first_segment..=switch_segment)
        .flat_map(|segno| {
            read_segment(&pg_wal, 1, segno, segment_size).expect("a timeline 1 segment")
        })
        .collect();
    tl1.truncate((switch_point.0 - first_segment * seg) as usize);
    let tl1_start = Lsn(first_segment * seg);
    let mut verifier = WalVerifier::new(tl1_start, config(1));
    feed_all(&mut verifier, tl1_start, &tl1);
    assert_eq!(verifier.verified_up_to(), switch_point);
    verifier.switch_timeline(TimelineId(2), tl2_start);
    let after = feed_all(&mut verifier, tl2_start, &tl2);
    assert_eq!(verifier.verified_up_to(), end);
    assert_eq!(after.len(), records.len());
    eprintln!(
        "PostgreSQL {}: timeline 2 from {switch_point}; {} records on timeline 2's segments verified",
        cluster.version(),
        records.len()
    );
}
