//! Helpers of the repository tests (`repo.rs`, `repo_garage.rs`).

use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{free_port, scratch, standby_config, table_digest, text, StandbyGuard};
use pgwire_repl::SqlClient;
use testkit::{Cluster, ClusterOptions};

/// The repository at `url` through the library, with a Garage store's credentials.
pub fn garage_repository(garage: &testkit::Garage, url: &str) -> pgrepo::Repository {
    let options = pgrepo::StoreOptions {
        access_key_id: Some(garage.access_key_id().to_string()),
        secret_access_key: Some(pgrepo::Secret::new(garage.secret_access_key())),
        region: Some(garage.region().to_string()),
        endpoint: Some(garage.endpoint()),
        allow_http: Some(true),
        ..pgrepo::StoreOptions::default()
    };
    pgrepo::Repository::open(url, &options).unwrap()
}

/// Where a test's repository lives, and the environment that reaches it.
pub struct Store {
    pub url: String,
    pub env: Vec<(String, String)>,
}

/// Runs the binary with the store's environment on a blocking thread.
pub async fn run_with(store: &Store, args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let env = store.env.clone();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(super::bin())
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
pub async fn start_load(primary: &Cluster) -> (Arc<AtomicBool>, tokio::task::JoinHandle<u64>) {
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
pub fn compression_for(major: u32) -> &'static str {
    if major == 15 {
        "server-zstd"
    } else {
        "client-zstd"
    }
}

pub async fn round_trip_under_load(store: Store) {
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
    let status = std::process::Command::new(super::bin())
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
