//! Following a timeline switch: stream from a standby, promote it, continue on TLI 2.

mod common;

use std::time::Duration;

use common::*;
use pgwire_repl::{Lsn, ReplicationClient, TimelineId, WalSegmentSize};
use testkit::Standby;
use walstream::{receive_wal, ReceiveOptions, StreamEvent, StreamOptions, WalStream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotion_is_followed_onto_the_new_timeline() {
    let primary = start_primary();
    generate_wal(&primary, 2_000).await;
    let standby = Standby::start(&primary, primary_options()).await;
    let config = standby.config(standby.superuser());

    let dir = tempfile::tempdir().unwrap();
    let wal = dir.path().join("wal");
    let mut options = ReceiveOptions::new(&wal);
    options.status_interval = Some(Duration::from_millis(500));
    let (stop, shutdown) = shutdown_pair();
    let receiver = {
        let config = config.clone();
        let options = options.clone();
        tokio::spawn(async move { receive_wal(&config, &options, shutdown).await })
    };
    // WAL on timeline 1, through the standby.
    generate_wal(&primary, 5_000).await;
    let switched = switch_wal(&primary).await;
    let tli1_last = segment_name(1, Lsn(switched.0 - 1));
    wait_for(
        "timeline 1 WAL via the standby",
        Duration::from_secs(60),
        || wal.join(&tli1_last).is_file(),
    )
    .await;

    // More WAL, so that the switch point falls inside a segment.
    generate_wal(&primary, 1_000).await;
    let target = lsn(&primary, "SELECT pg_current_wal_flush_lsn()").await;
    for _ in 0..600 {
        let replayed = lsn(&standby, "SELECT pg_last_wal_replay_lsn()").await;
        if replayed >= target {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    standby.promote();
    generate_wal(&standby, 3_000).await;
    let end = switch_wal(&standby).await;
    let tli2_last = segment_name(2, Lsn(end.0 - 1));
    wait_for("timeline 2 WAL", Duration::from_secs(60), || {
        wal.join(&tli2_last).is_file()
    })
    .await;
    stop.send(true).unwrap();
    let summary = receiver.await.unwrap().unwrap();
    assert_eq!(summary.timeline, TimelineId(2), "{summary:?}");
    assert_eq!(summary.timeline_switches, 1, "{summary:?}");

    // The history file, byte for byte.
    let standby_wal = standby.data_dir().join("pg_wal");
    let history = std::fs::read(wal.join("00000002.history")).unwrap();
    assert_eq!(
        history,
        std::fs::read(standby_wal.join("00000002.history")).unwrap()
    );
    let text = String::from_utf8(history).unwrap();
    let switch_point: Lsn = text
        .split('\t')
        .nth(1)
        .expect("a history line")
        .parse()
        .unwrap();

    // Every complete segment of both timelines equals the standby's.
    let compared = assert_same_as_server(&wal, &standby_wal);
    assert!(compared >= 2, "compared {compared}");
    let names = complete_segments(&wal);
    assert!(names.keys().any(|n| n.starts_with("00000001")));
    assert!(names.keys().any(|n| n.starts_with("00000002")));
    // The old timeline's segment holding the switch point stays .partial, as with
    // pg_receivewal; up to the switch point it equals the standby's copy.
    let old = segment_name(1, switch_point);
    let listing: Vec<String> = files(&wal).into_keys().collect();
    eprintln!("switch point {switch_point}; our files: {listing:?}");
    let ours = std::fs::read(wal.join(format!("{old}.partial"))).unwrap();
    let upto = switch_point.segment_offset(WalSegmentSize::DEFAULT) as usize;
    assert!(
        upto > 0,
        "the switch point {switch_point} is at a segment start"
    );
    let theirs = std::fs::read(standby_wal.join(format!("{old}.partial")))
        .or_else(|_| std::fs::read(standby_wal.join(&old)))
        .unwrap();
    assert!(
        ours[..upto] == theirs[..upto],
        "the old timeline's partial differs"
    );
    assert!(
        !wal.join(&old).exists(),
        "{old} is complete on the old timeline"
    );
    // And the new timeline holds the same segment number from its start.
    assert!(wal.join(segment_name(2, switch_point)).is_file());

    // Asking for timeline 1 at the switch point: the server answers with the end of the
    // timeline straight away (no CopyBoth), delivered as the first event.
    let client = ReplicationClient::connect(&config).await.unwrap();
    let mut stream = WalStream::start(
        client,
        StreamOptions::new(switch_point).timeline(TimelineId(1)),
    )
    .await
    .unwrap();
    assert_eq!(
        stream.next_event().await.unwrap(),
        Some(StreamEvent::EndOfTimeline {
            next_timeline: TimelineId(2),
            next_start: switch_point
        })
    );
    assert_eq!(stream.next_event().await.unwrap(), None);
}
