//! Our `pg_receivewal` on a real server, where PostgreSQL's TAP suite does not look:
//! the bytes of received segments (plain and gzip) are the server's own, and a signal
//! stops streaming cleanly (exit 0) leaving a `.partial` a later run completes.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use testkit::{Cluster, ClusterOptions};

fn ours() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pg_receivewal"))
}

fn scratch() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("fe-recvwal-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

async fn switch_and_insert(cluster: &Cluster) -> String {
    cluster.execute("SELECT pg_switch_wal()").await;
    let lsn = cluster
        .query_value("SELECT pg_current_wal_insert_lsn()::text")
        .await
        .unwrap();
    cluster.execute("INSERT INTO t VALUES (1)").await;
    lsn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn received_segments_hold_the_servers_bytes_plain_and_gzip() {
    let cluster = Cluster::start(ClusterOptions::new());
    cluster.execute("CREATE TABLE t (x int)").await;
    let dir = scratch();
    let conninfo = cluster.unix_conninfo("postgres");
    // Plain, then gzip: the second run completes the first's partial as .gz.
    for compress in [None, Some("gzip:1")] {
        cluster
            .execute("INSERT INTO t SELECT generate_series(1, 20000)")
            .await;
        let endpos = switch_and_insert(&cluster).await;
        let mut cmd = Command::new(ours());
        cmd.args(["-d", &conninfo, "-D"])
            .arg(dir.path())
            .args(["-E", &endpos, "-n", "--no-sync"]);
        if let Some(c) = compress {
            cmd.args(["--compress", c]);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "pg_receivewal failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let files = names(dir.path());
    let complete: Vec<&String> = files.iter().filter(|n| !n.contains("partial")).collect();
    assert!(
        complete.iter().any(|n| n.ends_with(".gz")),
        "no .gz segment in {files:?}"
    );
    assert_eq!(
        files.iter().filter(|n| n.ends_with(".gz.partial")).count(),
        1,
        "{files:?}"
    );
    let mut compared = 0;
    for name in complete {
        let mut bytes = Vec::new();
        let path = dir.path().join(name);
        if let Some(base) = name.strip_suffix(".gz") {
            flate2::read::GzDecoder::new(std::fs::File::open(&path).unwrap())
                .read_to_end(&mut bytes)
                .unwrap();
            let server = cluster.data_dir().join("pg_wal").join(base);
            if let Ok(theirs) = std::fs::read(&server) {
                assert!(bytes == theirs, "{name} differs from the server's {base}");
                compared += 1;
            }
        } else if name.len() == 24 {
            bytes = std::fs::read(&path).unwrap();
            if let Ok(theirs) = std::fs::read(cluster.data_dir().join("pg_wal").join(name)) {
                assert!(bytes == theirs, "{name} differs from the server's");
                compared += 1;
            }
        }
    }
    assert!(
        compared >= 1,
        "no received segment was still on the server: {files:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly_and_the_partial_is_completed_later() {
    let cluster = Cluster::start(ClusterOptions::new());
    cluster.execute("CREATE TABLE t (x int)").await;
    let dir = scratch();
    let conninfo = cluster.unix_conninfo("postgres");
    let mut child = Command::new(ours())
        .args(["-d", &conninfo, "-D"])
        .arg(dir.path())
        .args(["--no-sync", "-s", "1"])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !names(dir.path()).iter().any(|n| n.ends_with(".partial")) {
        assert!(Instant::now() < deadline, "no .partial appeared");
        std::thread::sleep(Duration::from_millis(100));
    }
    let partial = names(dir.path())
        .into_iter()
        .find(|n| n.ends_with(".partial"))
        .unwrap();
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "a signal must end pg_receivewal with 0"
    );
    assert!(names(dir.path()).contains(&partial));
    // The next run resumes from that segment's start and completes it.
    let endpos = switch_and_insert(&cluster).await;
    let out = Command::new(ours())
        .args(["-d", &conninfo, "-D"])
        .arg(dir.path())
        .args(["-E", &endpos, "-n", "--no-sync"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let base = partial.strip_suffix(".partial").unwrap();
    assert!(
        names(dir.path()).iter().any(|n| n == base),
        "{base} was not completed: {:?}",
        names(dir.path())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_is_reported_as_pg_receivewal_does_and_streaming_resumes() {
    let mut cluster = Cluster::start(ClusterOptions::new());
    cluster.execute("CREATE TABLE t (x int)").await;
    let dir = scratch();
    let wal = dir.path().join("wal");
    std::fs::create_dir(&wal).unwrap();
    let log = dir.path().join("stderr");
    let conninfo = cluster.unix_conninfo("postgres");
    let mut child = Command::new(ours())
        .args(["-d", &conninfo, "-D"])
        .arg(&wal)
        .args(["--no-sync", "-s", "1"])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !names(&wal).iter().any(|n| n.ends_with(".partial")) {
        assert!(Instant::now() < deadline, "no .partial appeared");
        std::thread::sleep(Duration::from_millis(100));
    }
    let partial = names(&wal)
        .into_iter()
        .find(|n| n.ends_with(".partial"))
        .unwrap();
    cluster = tokio::task::spawn_blocking(move || {
        cluster.restart();
        cluster
    })
    .await
    .unwrap();
    // PostgreSQL's messages, which scripts and log alerts look for.
    let expected = [
        format!("pg_receivewal: not renaming \"{partial}\", segment is not complete"),
        "pg_receivewal: disconnected; waiting 5 seconds to try again".to_string(),
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if expected.iter().all(|line| text.lines().any(|l| l == line)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "expected {expected:?} in:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // It comes back by itself and completes the segment it had left partial.
    let base = partial.strip_suffix(".partial").unwrap().to_string();
    cluster.execute("INSERT INTO t VALUES (2)").await;
    cluster.execute("SELECT pg_switch_wal()").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !names(&wal).contains(&base) {
        assert!(
            Instant::now() < deadline,
            "{base} was not completed after the reconnect: {:?}\n{}",
            names(&wal),
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    assert_eq!(child.wait().unwrap().code(), Some(0));
}
