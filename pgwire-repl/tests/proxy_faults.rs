//! Faults injected between the client and a real server: every cut, stall or flipped
//! byte gives a typed error (or a correct result when the damage is harmless), never a
//! panic or a hang.

use std::time::Duration;

use pgwire_repl::{Config, ErrorKind, ReplicationClient, SqlClient};
use testkit::proxy::{Fault, FaultPlan, Proxy};
use testkit::{Cluster, ClusterOptions};

#[tokio::test]
async fn cuts_and_flipped_bytes_during_startup_and_queries() {
    let cluster = Cluster::start(ClusterOptions::new());
    let offsets: Vec<u64> = (0..40).chain((40..1200).step_by(37)).collect();
    let mut plans = Vec::new();
    for &at in &offsets {
        plans.push(FaultPlan::server_to_client(Fault::Cut { at }));
        plans.push(FaultPlan::server_to_client(Fault::FlipByte { at }));
        plans.push(FaultPlan::client_to_server(Fault::FlipByte { at }));
    }
    let count = plans.len();
    let proxy = Proxy::start(cluster.port(), plans).await;
    let config = Config::parse(&format!(
        "host=127.0.0.1 port={} user={} dbname=postgres sslmode=disable connect_timeout=2",
        proxy.port(),
        cluster.superuser()
    ))
    .unwrap();
    let mut outcomes = std::collections::BTreeMap::new();
    for _ in 0..count {
        let attempt = async {
            let mut client = SqlClient::connect(&config).await?;
            let value = client
                .query_value("SELECT string_agg(g::text, ',') FROM generate_series(1, 200) g")
                .await?;
            Ok::<_, pgwire_repl::Error>(value)
        };
        // A flipped length field makes the client wait for bytes that never come; the
        // protocol has no checksum to catch it, so only a read timeout ends it.
        let Ok(result) = tokio::time::timeout(Duration::from_secs(3), attempt).await else {
            *outcomes.entry("Timeout".to_string()).or_insert(0) += 1;
            continue;
        };
        let key = match &result {
            Ok(value) => {
                // Harmless damage (e.g. in a parameter value) may pass, but the data must be right.
                let expected: Vec<String> = (1..=200).map(|g| g.to_string()).collect();
                if value.as_deref() == Some(expected.join(",").as_str()) {
                    "ok".to_string()
                } else {
                    "corrupted result".to_string()
                }
            }
            Err(e) => format!("{:?}", e.kind()),
        };
        *outcomes.entry(key).or_insert(0) += 1;
    }
    // Corrupted text inside a DataRow cannot be detected by the protocol (no checksums):
    // it is counted, not hidden. Everything else must be a typed error or a correct result.
    let kinds: Vec<&String> = outcomes.keys().collect();
    for kind in &kinds {
        assert!(
            [
                "ok",
                "corrupted result",
                "Io",
                "Protocol",
                "Server",
                "Timeout",
                "Auth"
            ]
            .contains(&kind.as_str()),
            "unexpected outcome {kind}: {outcomes:?}"
        );
    }
    assert!(outcomes.get("Io").copied().unwrap_or(0) > 0, "{outcomes:?}");
    assert!(
        outcomes.get("Protocol").copied().unwrap_or(0) > 0,
        "{outcomes:?}"
    );
    eprintln!("outcomes over {count} faulted connections: {outcomes:?}");
}

#[tokio::test]
async fn a_stalled_stream_times_out_and_a_cut_one_is_an_io_error() {
    let cluster = Cluster::start(ClusterOptions::new());
    let proxy = Proxy::start(
        cluster.port(),
        vec![
            FaultPlan::pass(),
            FaultPlan::server_to_client(Fault::Cut { at: 2000 }),
        ],
    )
    .await;
    let config = Config::parse(&format!(
        "host=127.0.0.1 port={} user={} sslmode=disable",
        proxy.port(),
        cluster.superuser()
    ))
    .unwrap();
    // Nothing arrives unasked on an idle replication session: a read times out.
    let mut repl = ReplicationClient::connect(&config).await.unwrap();
    let err = repl
        .connection()
        .read_message_timeout(Duration::from_millis(300))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    drop(repl);
    // The second connection is cut after 2000 bytes, in the middle of a large result.
    let mut sql = SqlClient::connect(&config).await.unwrap();
    let err = sql.query("SELECT repeat('x', 100000)").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io, "{err}");
}
