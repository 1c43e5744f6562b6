//! `clone-standby backup`, `list`, `verify --repo` and `restore` end to end: real
//! primaries (version from PGREPL_TEST_PG) and a real object store (Garage, started by
//! testkit; `scripts/install-garage.sh` builds it).

mod common;

use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{free_port, scratch, standby_config, table_digest, text, StandbyGuard};
use pgwire_repl::SqlClient;
use testkit::proxy::{Fault, FaultPlan, Proxy};
use testkit::{Cluster, ClusterOptions, Garage};

/// Where a test's repository lives, and the environment that reaches it.
struct Store {
    url: String,
    env: Vec<(String, String)>,
}

/// Runs the binary with the store's environment on a blocking thread.
async fn run_with(store: &Store, args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let env = store.env.clone();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(common::bin())
            .args(&args)
            .envs(env)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

/// Tables with data (some of it incompressible), then a background writer until the
/// returned flag is cleared.
async fn start_load(primary: &Cluster) -> (Arc<AtomicBool>, tokio::task::JoinHandle<u64>) {
    primary
        .execute(
            "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint, note text);
             INSERT INTO accounts SELECT g, 0, md5(g::text) || repeat('n', 100) FROM generate_series(1, 20000) g;
             CREATE TABLE history (id bigserial PRIMARY KEY, account int, delta bigint, at timestamptz DEFAULT now());",
        )
        .await;
    let running = Arc::new(AtomicBool::new(true));
    let flag = running.clone();
    let config = primary.config(primary.superuser());
    let task = tokio::spawn(async move {
        let mut sql = SqlClient::connect(&config).await.expect("load connection");
        let mut transactions = 0u64;
        while flag.load(Ordering::Relaxed) {
            let id = (transactions * 7919) % 20000 + 1;
            sql.batch(&format!(
                "BEGIN; UPDATE accounts SET balance = balance + 1 WHERE id = {id};
                 INSERT INTO history (account, delta) VALUES ({id}, 1); COMMIT;"
            ))
            .await
            .expect("load transaction");
            transactions += 1;
        }
        transactions
    });
    (running, task)
}

/// The compression the server under test can do: the npm builds of 16–18 lack zstd and
/// lz4, so those compress on the client; 15 (Debian's build) compresses on the server.
fn compression_for(major: u32) -> &'static str {
    if major == 15 {
        "server-zstd"
    } else {
        "client-zstd"
    }
}

async fn round_trip_under_load(store: Store) {
    let primary = Cluster::start(ClusterOptions::new());
    let (running, load) = start_load(&primary).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let source = primary.unix_conninfo(primary.superuser());

    let backup = run_with(
        &store,
        &[
            "backup",
            "--source",
            &source,
            "--repo",
            &store.url,
            "--compress",
            compression_for(primary.major()),
            "--label",
            "first",
            "--part-size-mib",
            "5",
            "--json",
        ],
    )
    .await;
    assert!(backup.status.success(), "backup failed:\n{}", text(&backup));
    let record: serde_json::Value =
        serde_json::from_slice(&backup.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&backup)));
    assert_eq!(record["label"], "first", "{record}");
    assert!(record["files"].as_u64().unwrap() > 500, "{record}");
    assert!(
        record["wal"]["records_verified"].as_u64().unwrap() > 0,
        "{record}"
    );
    let stored = record["stored_bytes"].as_u64().unwrap();
    let database = record["database_bytes"].as_u64().unwrap();
    assert!(stored < database, "compressed: {stored} < {database}");

    // The same label is never reused.
    let again = run_with(
        &store,
        &[
            "backup", "--source", &source, "--repo", &store.url, "--label", "first",
        ],
    )
    .await;
    assert!(!again.status.success(), "{}", text(&again));
    assert!(
        text(&again).contains("already has objects"),
        "{}",
        text(&again)
    );

    let list = run_with(&store, &["list", "--repo", &store.url, "--json"]).await;
    assert!(list.status.success(), "{}", text(&list));
    let listed: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0]["label"], "first");
    assert_eq!(listed[0]["wal_complete"], true);

    let verify = run_with(
        &store,
        &["verify", "--repo", &store.url, "--backup", "first"],
    )
    .await;
    assert!(verify.status.success(), "verify:\n{}", text(&verify));
    assert!(text(&verify).contains("verified"), "{}", text(&verify));

    // Restore as a standby of the primary, start it, let it catch up.
    let work = scratch();
    let pgdata = work.path().join("restored");
    let pgdata_text = pgdata.to_str().unwrap().to_string();
    let _guard = StandbyGuard {
        pg_ctl: primary.bin("pg_ctl"),
        pgdata: pgdata.clone(),
    };
    let port = free_port().to_string();
    let restore = run_with(
        &store,
        &[
            "restore",
            "--repo",
            &store.url,
            "--pgdata",
            &pgdata_text,
            "--standby",
            "--source",
            &source,
            "--start",
            "--standby-port",
            &port,
            "--pg-ctl",
            primary.bin("pg_ctl").to_str().unwrap(),
            "--json",
        ],
    )
    .await;
    assert!(restore.status.success(), "restore:\n{}", text(&restore));
    let summary: serde_json::Value = serde_json::from_slice(&restore.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", text(&restore)));
    assert_eq!(summary["started"], true, "{summary}");
    assert!(pgdata.join("standby.signal").exists());

    tokio::time::sleep(Duration::from_millis(500)).await;
    running.store(false, Ordering::Relaxed);
    let transactions = load.await.unwrap();
    assert!(
        transactions > 10,
        "the load ran ({transactions} transactions)"
    );
    let standby = standby_config(&pgdata, "postgres");
    let status = std::process::Command::new(common::bin())
        .args(["status", "--wait", "--timeout", "60", "--primary"])
        .arg(&source)
        .arg("--standby")
        .arg(standby.to_conninfo_string())
        .output()
        .unwrap();
    assert!(status.status.success(), "status --wait:\n{}", text(&status));
    let primary_config = primary.config(primary.superuser());
    for table in ["accounts", "history"] {
        assert_eq!(
            table_digest(&primary_config, table).await,
            table_digest(&standby, table).await,
            "table {table} differs between primary and the restored standby"
        );
    }
}

/// The store's environment with the endpoint pointed elsewhere (a fault proxy).
fn via(garage: &Garage, port: u16, prefix: &str) -> Store {
    let mut env = garage.env();
    env.retain(|(k, _)| k != "AWS_ENDPOINT_URL");
    env.push((
        "AWS_ENDPOINT_URL".into(),
        format!("http://127.0.0.1:{port}"),
    ));
    Store {
        url: garage.url(prefix),
        env,
    }
}

fn garage_store(garage: &Garage, prefix: &str) -> Store {
    Store {
        url: garage.url(prefix),
        env: garage.env(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_in_garage_under_load_restores_into_a_standby_with_equal_data() {
    let garage = Garage::start();
    round_trip_under_load(garage_store(&garage, "roundtrip")).await;
}

/// Labels `list` shows as committed.
async fn committed(store: &Store) -> Vec<String> {
    let list = run_with(store, &["list", "--repo", &store.url, "--json"]).await;
    assert!(list.status.success(), "list:\n{}", text(&list));
    let listed: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    listed
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["label"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cuts_and_stalls_between_the_tool_and_garage_never_yield_a_false_backup() {
    let primary = Cluster::start(ClusterOptions::new());
    primary
        .execute(
            "CREATE TABLE t AS SELECT g, md5(g::text) || md5((g * 7)::text) AS m FROM generate_series(1, 200000) g",
        )
        .await;
    let source = primary.unix_conninfo(primary.superuser());
    let garage = Garage::start();
    let direct = garage_store(&garage, "faults");
    let cut = |at| FaultPlan::client_to_server(Fault::Cut { at });
    let scenarios: Vec<(&str, Vec<FaultPlan>)> = vec![
        // Transient: a few connections die mid-upload, later ones pass.
        (
            "transient-cuts",
            vec![cut(1 << 20), cut(3 << 20), cut(64 << 10)],
        ),
        (
            "stall",
            vec![FaultPlan::client_to_server(Fault::Stall {
                at: 2 << 20,
                duration: Duration::from_secs(2),
            })],
        ),
        // Permanent: every connection dies after 1 MiB, so no part ever completes.
        (
            "permanent-cuts",
            (0..10_000).map(|_| cut(1 << 20)).collect(),
        ),
    ];
    for (label, plans) in scenarios {
        let proxy = Proxy::start(garage.s3_port(), plans).await;
        let store = via(&garage, proxy.port(), "faults");
        let out = run_with(
            &store,
            &[
                "backup",
                "--source",
                &source,
                "--repo",
                &store.url,
                "--label",
                label,
                "--compress",
                "none",
                "--part-size-mib",
                "5",
            ],
        )
        .await;
        let listed = committed(&direct).await;
        if out.status.success() {
            // A success is a committed backup that verifies.
            assert!(listed.contains(&label.to_string()), "{label}: {listed:?}");
            let verify = run_with(
                &direct,
                &["verify", "--repo", &direct.url, "--backup", label],
            )
            .await;
            assert!(
                verify.status.success(),
                "{label}: verify:\n{}",
                text(&verify)
            );
        } else {
            assert!(
                !listed.contains(&label.to_string()),
                "{label}: failed but listed"
            );
        }
        if label == "permanent-cuts" {
            assert!(
                !out.status.success(),
                "every upload was cut, yet:\n{}",
                text(&out)
            );
            assert!(text(&out).contains("what to do"), "{}", text(&out));
        }
        eprintln!("{label}: exit {:?}", out.status.code());
    }

    // Restores through a proxy that cuts downloads: a verified data directory or nothing.
    let work = scratch();
    for (attempt, plans) in [
        vec![FaultPlan::server_to_client(Fault::Cut { at: 1 << 20 }); 3],
        (0..10_000)
            .map(|_| FaultPlan::server_to_client(Fault::Cut { at: 256 << 10 }))
            .collect(),
    ]
    .into_iter()
    .enumerate()
    {
        let proxy = Proxy::start(garage.s3_port(), plans).await;
        let store = via(&garage, proxy.port(), "faults");
        let target = work.path().join(format!("restore-{attempt}"));
        let out = run_with(
            &store,
            &[
                "restore",
                "--repo",
                &store.url,
                "--backup",
                "transient-cuts",
                "--pgdata",
                target.to_str().unwrap(),
            ],
        )
        .await;
        if out.status.success() {
            assert!(target.join("global/pg_control").exists());
            let verify = std::process::Command::new(common::bin())
                .args(["verify", "--pgdata", target.to_str().unwrap()])
                .output()
                .unwrap();
            assert!(verify.status.success(), "{}", text(&verify));
        } else {
            assert!(
                !target.exists(),
                "a failed restore left {target:?}:\n{}",
                text(&out)
            );
        }
        if attempt == 1 {
            assert!(
                !out.status.success(),
                "every download was cut, yet:\n{}",
                text(&out)
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_garage_that_loses_a_node_during_a_backup_still_commits_and_restores() {
    let primary = Cluster::start(ClusterOptions::new());
    primary
        .execute("CREATE TABLE t AS SELECT g, md5(g::text) AS m FROM generate_series(1, 300000) g")
        .await;
    let source = primary.unix_conninfo(primary.superuser());
    let mut garage = Garage::start_cluster(3);
    let store = garage_store(&garage, "three");
    // Slowed down so that the node dies while archives are being uploaded.
    let backup = {
        let args: Vec<String> = [
            "backup",
            "--source",
            &source,
            "--repo",
            &store.url,
            "--label",
            "survivor",
            "--compress",
            "none",
            "--max-rate",
            "8M",
            "--part-size-mib",
            "5",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let env = store.env.clone();
        std::process::Command::new(common::bin())
            .args(&args)
            .envs(env)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    garage.stop_node(2);
    let out = tokio::task::spawn_blocking(move || backup.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "backup with a node down:\n{}",
        text(&out)
    );
    assert_eq!(committed(&store).await, vec!["survivor".to_string()]);
    let verify = run_with(&store, &["verify", "--repo", &store.url]).await;
    assert!(verify.status.success(), "{}", text(&verify));
    let work = scratch();
    let target = work.path().join("restored");
    let restore = run_with(
        &store,
        &[
            "restore",
            "--repo",
            &store.url,
            "--pgdata",
            target.to_str().unwrap(),
        ],
    )
    .await;
    assert!(restore.status.success(), "{}", text(&restore));
    assert!(target.join("global/pg_control").exists());
}

/// Flips one byte in the middle of a file.
fn flip_byte(path: &std::path::Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_missing_and_foreign_backups_are_refused_by_name() {
    let primary = Cluster::start(ClusterOptions::new());
    primary
        .execute("CREATE TABLE t AS SELECT g, md5(g::text) AS m FROM generate_series(1, 50000) g")
        .await;
    let source = primary.unix_conninfo(primary.superuser());
    let dir = scratch();
    let root = dir.path().join("repo");
    let store = Store {
        url: format!("file://{}", root.display()),
        env: vec![],
    };
    for label in ["good", "damaged"] {
        let out = run_with(
            &store,
            &[
                "backup", "--source", &source, "--repo", &store.url, "--label", label,
            ],
        )
        .await;
        assert!(out.status.success(), "{}", text(&out));
    }

    // A flipped byte in a stored archive: verify and restore name it and fail.
    flip_byte(&root.join("backups/damaged/base.tar.zst"));
    let verify = run_with(
        &store,
        &["verify", "--repo", &store.url, "--backup", "damaged"],
    )
    .await;
    assert!(!verify.status.success(), "{}", text(&verify));
    let work = scratch();
    let target = work.path().join("restored");
    let restore = run_with(
        &store,
        &[
            "restore",
            "--repo",
            &store.url,
            "--backup",
            "damaged",
            "--pgdata",
            target.to_str().unwrap(),
        ],
    )
    .await;
    assert!(!restore.status.success(), "{}", text(&restore));
    assert!(!target.exists(), "a failed restore left {target:?} behind");
    // The good backup is unaffected.
    let verify = run_with(
        &store,
        &["verify", "--repo", &store.url, "--backup", "good"],
    )
    .await;
    assert!(verify.status.success(), "{}", text(&verify));

    // A truncated archive is named before anything is decompressed.
    let archive = root.join("backups/good/base.tar.zst");
    let len = std::fs::metadata(&archive).unwrap().len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&archive)
        .unwrap();
    file.set_len(len - 100).unwrap();
    let verify = run_with(
        &store,
        &["verify", "--repo", &store.url, "--backup", "good"],
    )
    .await;
    assert!(!verify.status.success());
    assert!(
        text(&verify).contains("backups/good/base.tar.zst"),
        "{}",
        text(&verify)
    );

    // Without its commit record a backup does not exist.
    std::fs::remove_file(root.join("backups/good/backup.json")).unwrap();
    let list = run_with(&store, &["list", "--repo", &store.url, "--json"]).await;
    let listed: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let labels: Vec<_> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["label"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(labels, vec!["damaged".to_string()]);
    let restore = run_with(
        &store,
        &[
            "restore",
            "--repo",
            &store.url,
            "--backup",
            "good",
            "--pgdata",
            target.to_str().unwrap(),
        ],
    )
    .await;
    assert!(!restore.status.success());
    assert!(
        text(&restore).contains("no committed backup"),
        "{}",
        text(&restore)
    );

    // Another cluster may not write into this repository. (Clusters of one initdb
    // template share a system identifier; one without data checksums has its own.)
    let other = Cluster::start(ClusterOptions::new().data_checksums(false));
    let system_id = "SELECT system_identifier::text FROM pg_control_system()";
    assert_ne!(
        other.query_value(system_id).await,
        primary.query_value(system_id).await
    );
    let foreign = run_with(
        &store,
        &[
            "backup",
            "--source",
            &other.unix_conninfo(other.superuser()),
            "--repo",
            &store.url,
        ],
    )
    .await;
    assert!(!foreign.status.success());
    assert!(
        text(&foreign).contains("belongs to the cluster with system identifier"),
        "{}",
        text(&foreign)
    );
}
