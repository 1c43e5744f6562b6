//! `keepalives`, `keepalives_idle`, `keepalives_interval`, `keepalives_count` and
//! `tcp_user_timeout` against a real server (version from PGREPL_TEST_PG), compared with
//! libpq 18's psql on the same connection strings: values the kernel takes connect, a
//! value it refuses fails that TCP address with libpq's message and the next host is
//! tried, and Unix sockets ignore them all. (What the kernel holds for each option is
//! read back with getsockopt in the crate's own socket tests.)

use pgwire_repl::config::Config;
use pgwire_repl::{ReplicationClient, SqlClient};
use testkit::oracle::Psql;
use testkit::{Cluster, ClusterOptions};

/// The port ours connected to, or our error text.
async fn ours(conninfo: &str) -> Result<String, String> {
    let config = Config::parse(conninfo).map_err(|e| e.to_string())?;
    let mut client = SqlClient::connect(&config)
        .await
        .map_err(|e| e.to_string())?;
    let port = client
        .query_value("SHOW port")
        .await
        .map_err(|e| e.to_string())?
        .unwrap_or_default();
    client.close().await.map_err(|e| e.to_string())?;
    Ok(port)
}

#[tokio::test]
async fn connections_honour_the_tcp_options_as_libpq_does() {
    let server = Cluster::start(ClusterOptions::new());
    let psql = Psql::libpq18();
    let tcp = format!("{} sslmode=disable", server.tcp_conninfo("postgres"));
    let unix = server.unix_conninfo("postgres");
    let port = server.port().to_string();
    let good = "keepalives=1 keepalives_idle=30 keepalives_interval=5 keepalives_count=3 tcp_user_timeout=10000";
    let refused = "keepalives_idle=0 keepalives_interval=0 keepalives_count=0";
    let cases = [
        (format!("{tcp} {good}"), Some(port.as_str())),
        (
            format!("{tcp} keepalives=0 {refused} tcp_user_timeout=-1"),
            Some(port.as_str()),
        ),
        (format!("{tcp} {refused}"), None),
        (format!("{tcp} keepalives_count=128"), None),
        (format!("{unix} {good}"), Some(port.as_str())),
        (format!("{unix} {refused}"), Some(port.as_str())),
    ];
    for (conninfo, expected) in &cases {
        let libpq = psql.run(conninfo, "SHOW port", &[]);
        let mine = ours(conninfo).await;
        match expected {
            Some(port) => {
                assert!(libpq.ok, "{conninfo}: libpq: {}", libpq.stderr);
                assert_eq!(libpq.stdout, *port, "{conninfo}");
                assert_eq!(mine.as_deref(), Ok(*port), "{conninfo}");
            }
            None => {
                assert!(!libpq.ok, "{conninfo}: libpq connected");
                let err = mine.unwrap_err();
                // libpq: `… port N failed: setsockopt(TCP_KEEPIDLE) failed: Invalid
                // argument`: ours says the same after naming the host.
                let detail = libpq.stderr.split_once("failed: ").unwrap().1.trim();
                assert!(detail.starts_with("setsockopt("), "{}", libpq.stderr);
                assert!(
                    err.contains(detail),
                    "{conninfo}: libpq {detail:?}, we {err}"
                );
            }
        }
    }
    // A refused value fails the TCP address, and the next host (a Unix socket, where
    // the options do not apply) is tried: both connect there.
    let list = format!(
        "host=127.0.0.1,{} port={port} user=postgres dbname=postgres sslmode=disable {refused}",
        server.socket_dir().display()
    );
    let libpq = psql.run(&list, "SHOW port", &[]);
    assert!(libpq.ok, "{}", libpq.stderr);
    assert_eq!(ours(&list).await.as_deref(), Ok(port.as_str()));
    // The same on a replication connection over TCP.
    let config = Config::parse(&format!("{tcp} {good} replication=true")).unwrap();
    let mut client = ReplicationClient::connect(&config).await.unwrap();
    assert_eq!(client.show("port").await.unwrap(), port);
    client.close().await.unwrap();
}
