//! `pg_basebackup` end to end against real servers (version from PGREPL_TEST_PG, 13–18):
//! what PostgreSQL's own TAP suite (run separately, see the README) does not cover.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use testkit::{Cluster, ClusterOptions};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_pg_basebackup")
}

fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

/// Runs pg_basebackup with `-d <conninfo>` and `args`, off the test's runtime.
async fn run(conninfo: String, args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(bin())
            .arg("-d")
            .arg(conninfo)
            .args(&args)
            .env("PGAPPNAME", "pg_basebackup_test")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn scratch() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("pgrepl-pgbb-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn shell(line: &str) {
    let output = Command::new("sh").arg("-c").arg(line).output().unwrap();
    assert!(output.status.success(), "{line}:\n{}", text(&output));
}

/// Waits until `sql` on `cluster` returns `want`.
async fn wait_for(cluster: &Cluster, sql: &str, want: &str) {
    for _ in 0..300 {
        if cluster.query_value(sql).await.as_deref() == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{sql} never returned {want}:\n{}", cluster.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_x_stream_c_s_makes_a_standby_that_streams_through_its_slot() {
    let primary = Cluster::start(ClusterOptions::new());
    primary
        .execute("CREATE TABLE t AS SELECT g FROM generate_series(1, 20000) g")
        .await;
    let work = scratch();
    let pgdata = work.path().join("standby");
    let output = run(
        primary.unix_conninfo(primary.superuser()),
        &[
            "-D",
            pgdata.to_str().unwrap(),
            "-R",
            "-X",
            "stream",
            "-C",
            "-S",
            "s1",
            "--no-sync",
            "-c",
            "fast",
        ],
    )
    .await;
    assert!(output.status.success(), "{}", text(&output));
    assert!(output.stdout.is_empty(), "{}", text(&output));
    assert!(pgdata.join("standby.signal").exists());
    assert!(pgdata.join("backup_manifest").exists());
    let auto_conf = std::fs::read_to_string(pgdata.join("postgresql.auto.conf")).unwrap();
    assert!(
        auto_conf.contains("\nprimary_slot_name = 's1'\n"),
        "{auto_conf}"
    );
    let conninfo_line = auto_conf
        .lines()
        .find(|l| l.starts_with("primary_conninfo = '"))
        .unwrap_or_else(|| panic!("no primary_conninfo in {auto_conf}"));
    assert!(
        conninfo_line.contains(&format!("port={}", primary.port())),
        "{conninfo_line}"
    );
    assert!(
        conninfo_line.contains("application_name=pg_basebackup_test"),
        "PGAPPNAME is part of the connection: {conninfo_line}"
    );
    // PostgreSQL 17+ keeps an explicit dbname for slot synchronisation.
    assert_eq!(
        conninfo_line.contains("dbname=postgres"),
        primary.major() >= 17,
        "{conninfo_line}"
    );
    assert!(!conninfo_line.contains("replication"), "{conninfo_line}");
    // The slot was created and its restart_lsn follows the streamed WAL.
    let restart = primary
        .query_value(
            "SELECT restart_lsn IS NOT NULL FROM pg_replication_slots WHERE slot_name = 's1'",
        )
        .await;
    assert_eq!(restart.as_deref(), Some("t"));

    let standby = Cluster::start_on_data_dir(&pgdata, ClusterOptions::new());
    wait_for(
        &primary,
        "SELECT active::text FROM pg_replication_slots WHERE slot_name = 's1'",
        "true",
    )
    .await;
    primary.execute("INSERT INTO t VALUES (-1)").await;
    wait_for(&standby, "SELECT count(*)::text FROM t WHERE g = -1", "1").await;
    assert_eq!(
        standby
            .query_value("SELECT pg_is_in_recovery()::text")
            .await
            .as_deref(),
        Some("true")
    );
    drop(standby);
    primary
        .execute("SELECT pg_drop_replication_slot('s1')")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tar_format_with_r_restores_into_a_standby() {
    let primary = Cluster::start(ClusterOptions::new());
    primary
        .execute("CREATE TABLE t AS SELECT g FROM generate_series(1, 5000) g")
        .await;
    let work = scratch();
    // Uncompressed, and gzip-compressed on the client: the configuration is added to
    // the stream either way.
    for (extra, suffix, untar) in [("-Fp", "", "tar -xf"), ("-z", ".gz", "tar -xzf")] {
        let target = work.path().join(format!("tar{suffix}"));
        let mut args = vec![
            "-D",
            target.to_str().unwrap(),
            "-Ft",
            "-R",
            "--no-sync",
            "-cfast",
        ];
        if extra != "-Fp" {
            args.push(extra);
        }
        let output = run(primary.unix_conninfo(primary.superuser()), &args).await;
        assert!(output.status.success(), "{}", text(&output));
        let base = target.join(format!("base.tar{suffix}"));
        let wal = target.join(format!("pg_wal.tar{suffix}"));
        for path in [&base, &wal, &target.join("backup_manifest")] {
            assert!(path.exists(), "{}", path.display());
        }
        assert!(
            !target.join("standby.signal").exists(),
            "-R goes into base.tar"
        );
        let data = work.path().join(format!("restored{suffix}"));
        std::fs::create_dir(&data).unwrap();
        shell(&format!("{untar} {} -C {}", base.display(), data.display()));
        shell(&format!(
            "{untar} {} -C {}",
            wal.display(),
            data.join("pg_wal").display()
        ));
        assert!(data.join("standby.signal").exists());
        let auto_conf = std::fs::read_to_string(data.join("postgresql.auto.conf")).unwrap();
        assert!(auto_conf.contains("\nprimary_conninfo = '"), "{auto_conf}");
        assert!(auto_conf.starts_with("# Do not edit"), "{auto_conf}");
        let standby = Cluster::start_on_data_dir(&data, ClusterOptions::new());
        let rows = primary
            .query_value("SELECT count(*) + 1 FROM t")
            .await
            .unwrap();
        primary.execute("INSERT INTO t VALUES (-1)").await;
        wait_for(&standby, "SELECT count(*)::text FROM t", &rows).await;
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_tar_layouts_match_pg_basebackup() {
    let primary = Cluster::start(ClusterOptions::new());
    let work = scratch();
    let conninfo = primary.unix_conninfo(primary.superuser());
    // Client-side: every archive, pg_wal.tar included, gets the suffix.
    for (spec, suffix, test) in [
        ("client-lz4", "lz4", "lz4 -t"),
        ("zstd:level=3", "zst", "zstd -q -t"),
        ("gzip:9", "gz", "gzip -t"),
    ] {
        let target = work.path().join(suffix);
        let output = run(
            conninfo.clone(),
            &[
                "-D",
                target.to_str().unwrap(),
                "-Ft",
                "-Z",
                spec,
                "-N",
                "-cfast",
            ],
        )
        .await;
        assert!(output.status.success(), "{spec}: {}", text(&output));
        assert_eq!(
            names(&target),
            [
                "backup_manifest".to_string(),
                format!("base.tar.{suffix}"),
                format!("pg_wal.tar.{suffix}")
            ],
            "{spec}"
        );
        shell(&format!(
            "{test} {0}/base.tar.{suffix} {0}/pg_wal.tar.{suffix}",
            target.display()
        ));
    }
    // -D -: one tar stream on standard output, the manifest as its last member.
    let output = run(
        conninfo.clone(),
        &["-D", "-", "-Ft", "-X", "fetch", "-cfast"],
    )
    .await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut archive = tar::Archive::new(output.stdout.as_slice());
    let members: Vec<String> = archive
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    assert_eq!(members.last().map(String::as_str), Some("backup_manifest"));
    assert!(members.iter().any(|n| n == "PG_VERSION"), "{members:?}");
    assert!(
        members.iter().any(|n| n.starts_with("pg_wal/0000")),
        "{members:?}"
    );

    // Server-side (15+): the base archive is stored as the server compressed it.
    if primary.major() >= 15 {
        let target = work.path().join("server");
        let output = run(
            conninfo.clone(),
            &[
                "-D",
                target.to_str().unwrap(),
                "-Ft",
                "--compress=server-gzip:level=1",
                "-N",
                "-cfast",
            ],
        )
        .await;
        assert!(output.status.success(), "{}", text(&output));
        assert_eq!(
            names(&target),
            ["backup_manifest", "base.tar.gz", "pg_wal.tar"]
        );
        shell(&format!("gzip -t {}/base.tar.gz", target.display()));
    } else {
        let output = run(
            conninfo.clone(),
            &["-D", "/tmp/never", "-Ft", "--compress=server-gzip", "-N"],
        )
        .await;
        assert_eq!(output.status.code(), Some(1), "{}", text(&output));
        assert!(
            text(&output)
                .contains("pg_basebackup: error: server does not support server-side compression"),
            "{}",
            text(&output)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_backup_removes_what_it_created_unless_no_clean() {
    let primary = Cluster::start(ClusterOptions::new());
    let work = scratch();
    let conninfo = primary.unix_conninfo(primary.superuser());
    let target = work.path().join("made");
    let output = run(
        conninfo.clone(),
        &[
            "-D",
            target.to_str().unwrap(),
            "-S",
            "missing",
            "-N",
            "-cfast",
        ],
    )
    .await;
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(
        text(&output).contains("pg_basebackup: error: "),
        "{}",
        text(&output)
    );
    assert!(
        !target.exists(),
        "the directory this run created is removed"
    );

    let output = run(
        conninfo.clone(),
        &[
            "-D",
            target.to_str().unwrap(),
            "-S",
            "missing",
            "-N",
            "-n",
            "-cfast",
        ],
    )
    .await;
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(target.exists(), "--no-clean leaves it");

    // An existing empty directory is emptied again, not removed.
    let empty = work.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let output = run(
        conninfo,
        &[
            "-D",
            empty.to_str().unwrap(),
            "-S",
            "missing",
            "-N",
            "-cfast",
        ],
    )
    .await;
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(empty.exists());
    assert!(names(&empty).is_empty(), "{:?}", names(&empty));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_backups_combine_into_a_server_that_starts() {
    let major_options = ClusterOptions::new();
    let probe = Cluster::start(major_options.clone());
    let options = if probe.major() >= 17 {
        major_options.setting("summarize_wal", "on")
    } else {
        major_options
    };
    drop(probe);
    let primary = Cluster::start(options);
    let conninfo = primary.unix_conninfo(primary.superuser());
    let work = scratch();
    let full = work.path().join("full");
    primary
        .execute("CREATE TABLE t AS SELECT g FROM generate_series(1, 20000) g")
        .await;
    let output = run(
        conninfo.clone(),
        &["-D", full.to_str().unwrap(), "-N", "-cfast"],
    )
    .await;
    assert!(output.status.success(), "{}", text(&output));
    let old_manifest = full.join("backup_manifest");
    let incr = work.path().join("incr");
    if primary.major() < 17 {
        let output = run(
            conninfo,
            &[
                "-D",
                incr.to_str().unwrap(),
                "-i",
                old_manifest.to_str().unwrap(),
                "-N",
            ],
        )
        .await;
        assert_eq!(output.status.code(), Some(1));
        assert!(
            text(&output)
                .contains("pg_basebackup: error: server does not support incremental backup"),
            "{}",
            text(&output)
        );
        return;
    }
    primary.execute("INSERT INTO t VALUES (-1)").await;
    let output = run(
        conninfo,
        &[
            "-D",
            incr.to_str().unwrap(),
            "--incremental",
            old_manifest.to_str().unwrap(),
            "-N",
            "-cfast",
        ],
    )
    .await;
    assert!(output.status.success(), "{}", text(&output));
    let mut incremental_files = 0;
    let mut stack = vec![incr.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            } else if entry
                .file_name()
                .to_string_lossy()
                .starts_with("INCREMENTAL.")
            {
                incremental_files += 1;
            }
        }
    }
    assert!(incremental_files > 0, "no INCREMENTAL.* file in the backup");
    // The oracle available here is PostgreSQL 18's pg_combinebackup.
    if primary.major() != 18 {
        return;
    }
    let combined = work.path().join("combined");
    let combine = Command::new(testkit::oracle::pg_combinebackup18())
        .arg(&full)
        .arg(&incr)
        .arg("-o")
        .arg(&combined)
        .output()
        .unwrap();
    assert!(combine.status.success(), "{}", text(&combine));
    let restored = Cluster::start_on_data_dir(&combined, ClusterOptions::new());
    assert_eq!(
        restored
            .query_value("SELECT count(*)::text FROM t")
            .await
            .as_deref(),
        Some("20001")
    );
}
