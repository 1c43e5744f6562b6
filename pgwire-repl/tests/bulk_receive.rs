//! Bulk receive (`Connection::set_bulk_receive`) against a real server over TCP: large
//! results arrive whole, and a small answer after a large one is not held back waiting
//! for a watermark it will never reach.

use std::time::{Duration, Instant};

use pgwire_repl::config::ReplicationMode;
use pgwire_repl::connection::{ConnectOptions, Connection};
use pgwire_repl::proto::backend::BackendMessage;
use pgwire_repl::proto::frontend;
use testkit::proxy::{Fault, FaultPlan, Proxy};
use testkit::{Cluster, ClusterOptions};

/// Runs one simple query; returns the first column of every row.
async fn query(conn: &mut Connection, sql: &str) -> Vec<Vec<u8>> {
    frontend::query(sql, conn.write_buf()).unwrap();
    conn.flush().await.unwrap();
    let mut values = Vec::new();
    loop {
        let message = match conn.try_read_buffered().unwrap() {
            Some(message) => message,
            None => conn.read_message().await.unwrap(),
        };
        match message {
            BackendMessage::DataRow(row) => {
                values.push(row[0].as_ref().unwrap().to_vec());
            }
            BackendMessage::ReadyForQuery { .. } => return values,
            BackendMessage::ErrorResponse(e) => panic!("query failed: {e:?}"),
            _ => {}
        }
    }
}

#[tokio::test]
async fn small_answers_after_large_ones_are_not_delayed() {
    let cluster = Cluster::start(ClusterOptions::new());
    let config = pgwire_repl::Config::parse(&cluster.tcp_conninfo(cluster.superuser())).unwrap();
    let mut conn = Connection::connect(&config, ReplicationMode::Off, &ConnectOptions::default())
        .await
        .unwrap();
    conn.set_bulk_receive(256 * 1024);

    let started = Instant::now();
    for round in 0..40 {
        // 4 MB in one DataRow: reads fill up, so the watermark is set.
        let large = query(&mut conn, "SELECT repeat('x', 4000000)").await;
        assert_eq!(large.len(), 1);
        assert_eq!(large[0].len(), 4_000_000);
        assert!(large[0].iter().all(|&b| b == b'x'));
        // A few dozen bytes, far below the watermark: taken after at most ~1 ms.
        let small = query(&mut conn, &format!("SELECT {round}")).await;
        assert_eq!(small, vec![round.to_string().into_bytes()]);
    }
    // 80 round trips; a watermark that held back the small answers until some timeout
    // (or for ever) would blow this budget by far.
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(20),
        "40 large and 40 small queries took {elapsed:?}"
    );

    // Many small rows in one result: the stream is read correctly, whatever the wake-ups.
    let rows = query(
        &mut conn,
        "SELECT g::text FROM generate_series(1, 100000) g",
    )
    .await;
    assert_eq!(rows.len(), 100_000);
    assert_eq!(rows[99_999], b"100000".to_vec());

    // Turned off, the connection behaves as before.
    conn.set_bulk_receive(0);
    assert_eq!(
        query(&mut conn, "SELECT 'off'").await,
        vec![b"off".to_vec()]
    );
}

#[tokio::test]
async fn a_stream_cut_while_the_watermark_is_set_is_an_error_at_once() {
    let cluster = Cluster::start(ClusterOptions::new());
    // The proxy passes 3 MB of a 40 MB result, then closes both directions.
    let proxy = Proxy::start(
        cluster.port(),
        vec![FaultPlan::server_to_client(Fault::Cut { at: 3_000_000 })],
    )
    .await;
    let config = pgwire_repl::Config::parse(&format!(
        "host=127.0.0.1 port={} user={} dbname=postgres sslmode=disable",
        proxy.port(),
        cluster.superuser()
    ))
    .unwrap();
    let mut conn = Connection::connect(&config, ReplicationMode::Off, &ConnectOptions::default())
        .await
        .unwrap();
    conn.set_bulk_receive(256 * 1024);
    frontend::query("SELECT repeat('x', 40000000)", conn.write_buf()).unwrap();
    conn.flush().await.unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Err(e) = conn.read_message().await {
                break e;
            }
        }
    })
    .await
    .expect("the cut was not noticed within 10 s");
    assert!(
        outcome.to_string().contains("closed"),
        "expected the closed connection to be named: {outcome}"
    );
}
