//! `clone-standby backup`, `list`, `verify --repo` and `restore` on a real S3 store:
//! Garage, started by testkit (`scripts/install-garage.sh` builds it), against real
//! primaries (version from PGREPL_TEST_PG): a round trip under load, cuts and stalls
//! between the tool and the store, and a three-node store losing a node mid-backup.

mod common;

use std::time::Duration;

use common::repo::{round_trip_under_load, run_with, Store};
use common::{scratch, text};
use testkit::proxy::{Fault, FaultPlan, Proxy};
use testkit::{Cluster, ClusterOptions, Garage};

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
        eprintln!("{label}: exit {:?}\n{}", out.status.code(), text(&out));
    }

    // Restores through a proxy that cuts downloads: a verified data directory or nothing.
    let work = scratch();
    for (attempt, plans) in [
        vec![FaultPlan::server_to_client(Fault::Cut { at: 1 << 20 }); 3],
        (0..10_000)
            // Cut inside the response headers: no attempt gets a byte of
            // data (a cut further in is resumed from where it stopped).
            .map(|_| FaultPlan::server_to_client(Fault::Cut { at: 100 }))
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_show_and_bad_ones_are_explained() {
    let primary = Cluster::start(ClusterOptions::new());
    let source = primary.unix_conninfo(primary.superuser());
    let garage = Garage::start();
    let secret = garage.secret_access_key().to_string();

    // A wrong secret: refused by the store, explained, and no secret in the output.
    let mut wrong = garage_store(&garage, "creds");
    let bad_secret = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    for (k, v) in wrong.env.iter_mut() {
        if k == "AWS_SECRET_ACCESS_KEY" {
            *v = bad_secret.to_string();
        }
    }
    let out = run_with(
        &wrong,
        &[
            "backup", "--source", &source, "--repo", &wrong.url, "--json",
        ],
    )
    .await;
    assert!(!out.status.success());
    let shown = text(&out);
    assert!(
        !shown.contains(bad_secret) && !shown.contains(&secret),
        "{shown}"
    );
    assert!(shown.contains("what to do"), "{shown}");

    // A secret from a file overrides the variable; the JSON summary holds no secret.
    let work = scratch();
    let secret_file = work.path().join("secret");
    std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
    let store = garage_store(&garage, "creds");
    let out = run_with(
        &wrong,
        &[
            "backup",
            "--source",
            &source,
            "--repo",
            &store.url,
            "--secret-access-key-file",
            secret_file.to_str().unwrap(),
            "--json",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let shown = text(&out);
    assert!(
        !shown.contains(&secret) && !shown.contains(bad_secret),
        "{shown}"
    );
    let list = run_with(&store, &["list", "--repo", &store.url, "--json"]).await;
    assert!(!text(&list).contains(&secret));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_a_backup_and_leaves_no_objects_behind() {
    let primary = Cluster::start(ClusterOptions::new());
    primary
        .execute("CREATE TABLE t AS SELECT g, md5(g::text) AS m FROM generate_series(1, 300000) g")
        .await;
    let source = primary.unix_conninfo(primary.superuser());
    let garage = Garage::start();
    let store = garage_store(&garage, "interrupted");
    let child = std::process::Command::new(common::bin())
        .args([
            "backup",
            "--source",
            &source,
            "--repo",
            &store.url,
            "--label",
            "cut-short",
            "--compress",
            "none",
            "--max-rate",
            "4M",
            "--part-size-mib",
            "5",
        ])
        .envs(store.env.clone())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("interrupted"), "{}", text(&out));
    let list = run_with(&store, &["list", "--repo", &store.url, "--json"]).await;
    assert_eq!(text(&list).trim(), "[]", "{}", text(&list));
    // Nothing is left under the label: it can be used again at once.
    let again = run_with(
        &store,
        &[
            "backup",
            "--source",
            &source,
            "--repo",
            &store.url,
            "--label",
            "cut-short",
        ],
    )
    .await;
    assert!(again.status.success(), "{}", text(&again));
}
