//! A host list where every host fails names every host with its own error, as libpq
//! does: compared with libpq 18's psql on one stopped port and two hot standbys, with
//! `target_session_attrs=read-write`, over SQL and physical replication connections
//! (servers from PGREPL_TEST_PG).

use pgwire_repl::config::Config;
use pgwire_repl::{Error, ErrorKind, ReplicationClient, SqlClient};
use testkit::oracle::Psql;
use testkit::{Cluster, ClusterOptions, Standby};

/// A port nobody listens on (bound, then released).
fn dead_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// libpq's error for `port`: the text after `port <port> failed: ` on its one line.
fn libpq_error_for(stderr: &str, port: u16) -> String {
    let marker = format!("port {port} failed: ");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains(&marker)).collect();
    assert_eq!(lines.len(), 1, "libpq names port {port} once:\n{stderr}");
    let line = lines[0];
    line[line.find(&marker).unwrap() + marker.len()..].to_string()
}

/// Our line for `port`: exactly one line of the message names it.
fn our_line_for(error: &Error, port: u16) -> String {
    let marker = format!("port={port}");
    let lines: Vec<&str> = error
        .message()
        .lines()
        .filter(|l| l.contains(&format!("{marker}:")) || l.contains(&format!("{marker} ")))
        .collect();
    assert_eq!(lines.len(), 1, "one line names port {port}:\n{error}");
    lines[0].to_string()
}

#[tokio::test]
async fn every_failed_host_is_named_with_its_own_error() {
    let primary = Cluster::start(ClusterOptions::new().setting("wal_keep_size", "128MB"));
    let first = Standby::start(&primary, ClusterOptions::new()).await;
    let second = Standby::start(&primary, ClusterOptions::new()).await;
    let dead = dead_port();
    let conninfo = format!(
        "host=127.0.0.1,127.0.0.1,127.0.0.1 port={dead},{},{} user=postgres dbname=postgres sslmode=disable target_session_attrs=read-write",
        first.port(),
        second.port()
    );
    let libpq = Psql::libpq18().run(&conninfo, "SELECT 1", &[]);
    assert!(!libpq.ok, "libpq connected to {}", libpq.stdout);
    let expected = [
        (dead, libpq_error_for(&libpq.stderr, dead)),
        (first.port(), libpq_error_for(&libpq.stderr, first.port())),
        (second.port(), libpq_error_for(&libpq.stderr, second.port())),
    ];
    assert_eq!(expected[0].1, "Connection refused", "{}", libpq.stderr);
    assert_eq!(expected[1].1, "session is read-only", "{}", libpq.stderr);
    assert_eq!(expected[2].1, "session is read-only", "{}", libpq.stderr);

    let sql = SqlClient::connect(&Config::parse(&conninfo).unwrap())
        .await
        .unwrap_err();
    let repl = ReplicationClient::connect(
        &Config::parse(&format!("{conninfo} replication=true")).unwrap(),
    )
    .await
    .unwrap_err();
    for (what, error) in [("SQL", &sql), ("replication", &repl)] {
        // One line per host, as libpq, each with that host's own error.
        assert!(
            error
                .message()
                .starts_with("could not connect to any host with target_session_attrs=read-write (3 attempts):\n"),
            "{what}: {error}"
        );
        assert_eq!(error.message().lines().count(), 4, "{what}: {error}");
        for (port, libpq_error) in &expected {
            let line = our_line_for(error, *port);
            assert!(
                line.contains(libpq_error.as_str()),
                "{what}: port {port}: libpq says {libpq_error:?}, we say {line:?}"
            );
        }
        // The advice covers both kinds of failure and names whom each is for, not
        // only the first host's "is the server running".
        let advice = error.advice().unwrap();
        assert!(advice.contains("is the server running"), "{what}: {advice}");
        assert!(
            advice.contains(&format!("host=127.0.0.1 port={dead}")),
            "{what}: {advice}"
        );
        assert!(
            advice.contains("target_session_attrs=read-write skips"),
            "{what}: {advice}"
        );
        for standby in [first.port(), second.port()] {
            assert!(
                advice.contains(&format!("port={standby}")),
                "{what}: {advice}"
            );
        }
        // Kind and retryability are those of the real failure (the stopped server).
        assert_eq!(error.kind(), ErrorKind::Io, "{what}: {error:?}");
        assert!(error.is_retryable(), "{what}");
    }
    eprintln!("libpq 18:\n{}\nours:\n{repl}", libpq.stderr);
}
