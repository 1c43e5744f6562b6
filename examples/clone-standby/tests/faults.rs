//! A fault-injecting proxy between `clone-standby` and a real primary: cuts, stalls and
//! flipped bytes at chosen offsets of the backup and WAL connections.
//!
//! - `clone` never exits 0 with bad data and never leaves a directory that looks
//!   complete: after a fault it either fails and removes the target, or succeeds with a
//!   clone that verifies against a manifest whose own SHA-256 the server computed.
//! - `receive-wal`, restarted after each cut, ends with segments byte-identical to the
//!   server's.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use testkit::proxy::{Fault, FaultPlan, Proxy};
use testkit::{Cluster, ClusterOptions};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_clone-standby")
}

fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

async fn run(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(bin())
            .args(&args)
            .output()
            .expect("run clone-standby")
    })
    .await
    .unwrap()
}

fn scratch() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("pgrepl-faults-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn conninfo(port: u16) -> String {
    format!("host=127.0.0.1 port={port} user=postgres sslmode=disable connect_timeout=5")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_on_the_backup_and_wal_connections_never_pass_as_a_good_clone() {
    let primary = Cluster::start(ClusterOptions::new());
    primary
        .execute("CREATE TABLE t AS SELECT g, md5(g::text) AS v FROM generate_series(1, 30000) g")
        .await;
    let work = scratch();
    // clone opens the backup connection first, then the WAL connection.
    let cases: Vec<(&str, Vec<FaultPlan>)> = vec![
        (
            "cut during the backup header",
            vec![FaultPlan::server_to_client(Fault::Cut { at: 600 })],
        ),
        (
            "cut deep in the archive",
            vec![FaultPlan::server_to_client(Fault::Cut { at: 3 << 20 })],
        ),
        (
            "cut the WAL stream",
            vec![
                FaultPlan::pass(),
                FaultPlan::server_to_client(Fault::Cut { at: 40_000 }),
            ],
        ),
        (
            "flip a byte in the archive",
            vec![FaultPlan::server_to_client(Fault::FlipByte { at: 2 << 20 })],
        ),
        (
            "flip a byte early in the archive",
            vec![FaultPlan::server_to_client(Fault::FlipByte { at: 20_000 })],
        ),
        (
            "flip a byte in the WAL stream",
            vec![
                FaultPlan::pass(),
                FaultPlan::server_to_client(Fault::FlipByte { at: 30_000 }),
            ],
        ),
        (
            "flip a byte the client sends",
            vec![FaultPlan::client_to_server(Fault::FlipByte { at: 120 })],
        ),
        (
            "stall the archive briefly",
            vec![FaultPlan::server_to_client(Fault::Stall {
                at: 1 << 20,
                duration: Duration::from_millis(500),
            })],
        ),
    ];
    let mut outcomes = Vec::new();
    for (name, plans) in cases {
        let proxy = Proxy::start(primary.port(), plans).await;
        let target = work.path().join(name.replace(' ', "_"));
        let output = run(vec![
            "clone".into(),
            "--source".into(),
            conninfo(proxy.port()),
            "--pgdata".into(),
            target.to_str().unwrap().into(),
            "--no-sync".into(),
        ])
        .await;
        if output.status.success() {
            // Success is only acceptable when the damage did not reach the data: the clone
            // verifies against the manifest, whose own checksum the server computed.
            let verify = Command::new(bin())
                .args(["verify", "--pgdata"])
                .arg(&target)
                .output()
                .unwrap();
            assert!(
                verify.status.success(),
                "{name}: a clone that exits 0 must verify:\n{}",
                text(&verify)
            );
            outcomes.push(format!("{name}: harmless, verified"));
        } else {
            assert!(
                text(&output).contains("clone failed"),
                "{name}: {}",
                text(&output)
            );
            assert!(
                !target.exists(),
                "{name}: a failed clone must remove its target"
            );
            outcomes.push(format!(
                "{name}: failed cleanly: {}",
                text(&output).lines().next().unwrap_or("")
            ));
        }
    }
    let failures = outcomes
        .iter()
        .filter(|o| o.contains("failed cleanly"))
        .count();
    assert!(
        failures >= 5,
        "cuts and data flips must fail the clone: {outcomes:#?}"
    );
    eprintln!("{outcomes:#?}");
}

fn complete_segments(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .filter(|n| n.len() == 24 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_wal_restarted_after_each_cut_ends_byte_identical() {
    let primary = Cluster::start(ClusterOptions::new().setting("wal_keep_size", "512MB"));
    primary
        .execute("SELECT pg_create_physical_replication_slot('faults', true)")
        .await;
    for _ in 0..4 {
        primary
            .execute("CREATE TABLE IF NOT EXISTS w (v text); INSERT INTO w SELECT repeat('w', 2000) FROM generate_series(1, 4000); SELECT pg_switch_wal()")
            .await;
    }
    let endpos = primary
        .query_value("SELECT pg_current_wal_flush_lsn()::text")
        .await
        .unwrap();
    // 13/14 have no READ_REPLICATION_SLOT: name the start, as on every version.
    let start = primary
        .query_value(
            "SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = 'faults'",
        )
        .await
        .unwrap();
    let work = scratch();
    let dir = work.path().join("wal");
    // Every connection is cut a little further in; restarting resumes from the directory.
    let cuts = [300_000u64, 5 << 20, 11 << 20, 23 << 20, 37 << 20];
    let plans: Vec<FaultPlan> = cuts
        .iter()
        .map(|&at| FaultPlan::server_to_client(Fault::Cut { at }))
        .collect();
    let proxy = Proxy::start(primary.port(), plans).await;
    let mut finished = false;
    for attempt in 0..12 {
        let output = run(vec![
            "receive-wal".into(),
            "--source".into(),
            conninfo(proxy.port()),
            "--directory".into(),
            dir.to_str().unwrap().into(),
            "--slot".into(),
            "faults".into(),
            "--endpos".into(),
            endpos.clone(),
            "--start-lsn".into(),
            start.clone(),
            "--no-loop".into(),
        ])
        .await;
        if output.status.success() {
            finished = true;
            break;
        }
        assert!(
            text(&output).contains("receive-wal failed"),
            "attempt {attempt}: {}",
            text(&output)
        );
    }
    assert!(finished, "receive-wal must finish once the cuts stop");
    let ours = complete_segments(&dir);
    assert!(ours.len() >= 3, "{ours:?}");
    for name in &ours {
        let server = std::fs::read(primary.data_dir().join("pg_wal").join(name)).unwrap();
        let mine = std::fs::read(dir.join(name)).unwrap();
        assert!(mine == server, "segment {name} differs from the server's");
    }
}
