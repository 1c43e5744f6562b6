//! `Connection::connect_over` (a stream the caller opened) and
//! `ConnectOptions::tls_config` (a rustls configuration of the caller's), against a
//! real server; and `Error::is_retryable` on real failures.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pgwire_repl::config::{Config, ReplicationMode};
use pgwire_repl::connection::{AuthMethod, ConnectOptions, Connection};
use pgwire_repl::{ErrorKind, ReplicationClient, SqlClient};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use testkit::{Cluster, ClusterOptions};
use tokio::net::TcpStream;

const PASSWORD: &str = "over-pw";

async fn scram_cluster() -> Cluster {
    let cluster = Cluster::start(
        ClusterOptions::new()
            .tls(true)
            .hba("host all,replication u_scram 127.0.0.1/32 scram-sha-256")
            .hba("host all,replication u_scram ::1/128 scram-sha-256"),
    );
    cluster
        .execute(&format!(
            "SET password_encryption = 'scram-sha-256';
             CREATE ROLE u_scram LOGIN REPLICATION PASSWORD '{PASSWORD}';"
        ))
        .await;
    cluster
}

fn config(text: &str) -> Config {
    Config::parse(text).unwrap_or_else(|e| panic!("bad test conninfo {text}: {e}"))
}

/// A conninfo naming the server as `localhost` (the name its certificate carries).
fn localhost(cluster: &Cluster, extra: &str) -> String {
    format!(
        "host=localhost port={} user=u_scram password={PASSWORD} dbname=postgres {extra}",
        cluster.port()
    )
}

async fn tcp(cluster: &Cluster) -> TcpStream {
    TcpStream::connect(("127.0.0.1", cluster.port()))
        .await
        .expect("connect to the test cluster")
}

/// A stream that is not a socket: one end of an in-memory pipe whose other end is
/// copied to and from a TCP connection by a task, as a tunnel would.
async fn tunnel(cluster: &Cluster) -> tokio::io::DuplexStream {
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let mut socket = tcp(cluster).await;
    tokio::spawn(async move {
        let mut theirs = theirs;
        let _ = tokio::io::copy_bidirectional(&mut theirs, &mut socket).await;
    });
    ours
}

fn roots(pem: &std::path::Path) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(pem).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    roots
}

fn client_config(roots: rustls::RootCertStore) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_over_runs_tls_and_scram_on_the_callers_stream() {
    let cluster = scram_cluster().await;
    let tls = cluster.tls_files().unwrap();
    let options = ConnectOptions::default();

    // A TCP stream the test opened, with the libpq-compatible TLS setup: verify-full
    // checks the name `localhost` though the stream went to 127.0.0.1.
    let verify_full = config(&localhost(
        &cluster,
        &format!("sslmode=verify-full sslrootcert={}", tls.ca_cert.display()),
    ));
    let stream = tcp(&cluster).await;
    let conn = Connection::connect_over(stream, &verify_full, ReplicationMode::Physical, &options)
        .await
        .unwrap();
    assert!(conn.tls().is_some());
    assert_eq!(conn.auth_method(), AuthMethod::ScramSha256Plus);
    assert_eq!(conn.server_major(), cluster.major());
    assert_eq!(
        conn.target(),
        format!("host=localhost port={}", cluster.port())
    );
    conn.close().await.unwrap();

    // Through an in-memory pipe: the same steps, and replication commands work.
    let mut repl = ReplicationClient::connect_over(tunnel(&cluster).await, &verify_full, &options)
        .await
        .unwrap();
    assert!(repl.connection().tls().is_some());
    let id = repl.identify_system().await.unwrap();
    assert!(id.timeline.0 >= 1);
    repl.close().await.unwrap();

    // A SQL session over a pipe, without TLS.
    let plain = config(&localhost(&cluster, "sslmode=disable"));
    let mut sql = SqlClient::connect_over(tunnel(&cluster).await, &plain, &options)
        .await
        .unwrap();
    assert!(sql.connection().tls().is_none());
    assert_eq!(
        sql.query_value("SELECT 41 + 1").await.unwrap().as_deref(),
        Some("42")
    );
    sql.close().await.unwrap();

    // The certificate check is the same as for connect(): a wrong root refuses.
    let wrong_root = config(&localhost(
        &cluster,
        &format!(
            "sslmode=verify-full sslrootcert={}",
            tls.other_ca_cert.display()
        ),
    ));
    let err = Connection::connect_over(
        tcp(&cluster).await,
        &wrong_root,
        ReplicationMode::Off,
        &options,
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Tls, "{err}");
    assert!(!err.is_retryable(), "{err}");

    // A wrong password is the server's refusal, with its SQLSTATE, and not retryable.
    let bad_password = config(&format!(
        "host=localhost port={} user=u_scram password=nope sslmode=disable",
        cluster.port()
    ));
    let err = Connection::connect_over(
        tcp(&cluster).await,
        &bad_password,
        ReplicationMode::Off,
        &options,
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Server, "{err}");
    assert_eq!(err.sqlstate(), Some("28P01"), "{err}");
    assert!(!err.is_retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_over_refuses_what_it_cannot_do_and_honours_connect_timeout() {
    let cluster = scram_cluster().await;
    let options = ConnectOptions::default();

    // A host list: which server is at the other end?
    let list = config(&format!(
        "host=localhost,127.0.0.1 port={} user=u_scram password={PASSWORD}",
        cluster.port()
    ));
    let err = Connection::connect_over(tcp(&cluster).await, &list, ReplicationMode::Off, &options)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Usage, "{err}");
    assert!(err.message().contains("lists 2 hosts"), "{err}");
    assert!(err.advice().unwrap().contains("Config::for_host"), "{err}");

    // requirepeer cannot be checked on a caller's stream.
    let peer = config(&localhost(&cluster, "requirepeer=postgres"));
    let err = Connection::connect_over(tcp(&cluster).await, &peer, ReplicationMode::Off, &options)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Usage, "{err}");

    // A stream on which nothing ever answers: connect_timeout ends the start-up.
    let (silent, _other_end) = tokio::io::duplex(1024);
    let timed = config(&localhost(&cluster, "sslmode=disable connect_timeout=2"));
    let started = Instant::now();
    let err = Connection::connect_over(silent, &timed, ReplicationMode::Off, &options)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(err.is_retryable());
    assert!(started.elapsed() < Duration::from_secs(10));

    // A stream that is closed at once: an I/O error, retryable.
    let (closed, other_end) = tokio::io::duplex(1024);
    drop(other_end);
    let plain = config(&localhost(&cluster, "sslmode=disable"));
    let err = Connection::connect_over(closed, &plain, ReplicationMode::Off, &options)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io, "{err}");
    assert!(err.is_retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_rustls_config_decides_trust() {
    let cluster = scram_cluster().await;
    let tls = cluster.tls_files().unwrap();

    // Trusting the cluster's CA: TLS with channel binding, over connect() and
    // connect_over() alike, with sslmode=require (the config verifies, not sslmode).
    let trusting = ConnectOptions {
        tls_config: Some(client_config(roots(&tls.ca_cert))),
        ..ConnectOptions::default()
    };
    let require = config(&localhost(&cluster, "sslmode=require"));
    let conn = Connection::connect(&require, ReplicationMode::Physical, &trusting)
        .await
        .unwrap();
    assert!(conn.tls().is_some());
    assert_eq!(conn.auth_method(), AuthMethod::ScramSha256Plus);
    conn.close().await.unwrap();
    let conn = Connection::connect_over(
        tcp(&cluster).await,
        &require,
        ReplicationMode::Off,
        &trusting,
    )
    .await
    .unwrap();
    assert!(conn.tls().is_some());
    conn.close().await.unwrap();

    // Trusting another CA: refused by the caller's verifier, even with sslmode=require
    // (which alone would accept any certificate), and the advice says whose verifier.
    let distrusting = ConnectOptions {
        tls_config: Some(client_config(roots(&tls.other_ca_cert))),
        ..ConnectOptions::default()
    };
    let err = Connection::connect(&require, ReplicationMode::Off, &distrusting)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Tls, "{err}");
    assert!(
        err.advice().unwrap().contains("ConnectOptions::tls_config"),
        "{err}"
    );
    assert!(!err.is_retryable());

    // The caller's verifier checks the name rustls is given: the host, not hostaddr.
    let wrong_name = config(&format!(
        "host=db.invalid hostaddr=127.0.0.1 port={} user=u_scram password={PASSWORD} sslmode=require",
        cluster.port()
    ));
    let err = Connection::connect(&wrong_name, ReplicationMode::Off, &trusting)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Tls, "{err}");

    // Options this crate's own TLS setup would use are refused, not ignored.
    for option in [
        format!("sslrootcert={}", tls.ca_cert.display()),
        "sslcrl=/nonexistent.crl".to_string(),
        "ssl_min_protocol_version=TLSv1.3".to_string(),
        "sslcertmode=require".to_string(),
        "sslsni=0".to_string(),
    ] {
        let conflicting = config(&localhost(&cluster, &format!("sslmode=require {option}")));
        let err = Connection::connect(&conflicting, ReplicationMode::Off, &trusting)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Usage, "{option}: {err}");
        let name = option.split('=').next().unwrap();
        assert!(err.message().contains(name), "{option}: {err}");
    }

    // sslmode=disable never uses it.
    let disabled = config(&localhost(&cluster, "sslmode=disable"));
    let conn = Connection::connect(&disabled, ReplicationMode::Off, &distrusting)
        .await
        .unwrap();
    assert!(conn.tls().is_none());
    conn.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryability_of_real_failures() {
    let cluster = scram_cluster().await;
    // Nothing listens on this port: refused, an I/O error, worth retrying.
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let refused = config(&format!(
        "host=127.0.0.1 port={closed_port} user=u_scram sslmode=disable"
    ));
    let err = SqlClient::connect(&refused).await.err().unwrap();
    assert_eq!(err.kind(), ErrorKind::Io, "{err}");
    assert!(err.is_retryable(), "{err}");

    // A missing slot: the server's answer to this request, not retryable.
    let mut repl = ReplicationClient::connect(&config(&localhost(&cluster, "sslmode=disable")))
        .await
        .unwrap();
    let err = repl
        .command("START_REPLICATION SLOT \"no_such_slot\" PHYSICAL 0/1000000")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Server, "{err}");
    assert!(!err.is_retryable(), "{err}");

    // The backend is terminated under us: its FATAL 57P01 (not the closed socket that
    // follows) is the error, and it is retryable.
    let pid = repl.connection().process_id();
    cluster
        .execute(&format!("SELECT pg_terminate_backend({pid})"))
        .await;
    let err = repl.identify_system().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Server, "{err}");
    assert_eq!(err.sqlstate(), Some("57P01"), "{err}");
    assert!(err.is_retryable(), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_calls_leave_the_session_usable() {
    let cluster = scram_cluster().await;
    let plain = config(&localhost(&cluster, "sslmode=disable"));

    // A query abandoned while the server works on it: its reply is dropped by the next
    // call, which gets its own answer.
    let mut sql = SqlClient::connect(&plain).await.unwrap();
    let abandoned = tokio::time::timeout(
        Duration::from_millis(50),
        sql.query("SELECT pg_sleep(0.5), 'stale'"),
    )
    .await;
    assert!(abandoned.is_err(), "the query should still be running");
    assert_eq!(
        sql.query_value("SELECT 'fresh'").await.unwrap().as_deref(),
        Some("fresh")
    );
    // An abandoned failing statement does not fail the next one either.
    let _ = tokio::time::timeout(
        Duration::from_millis(50),
        sql.batch("SELECT pg_sleep(0.3); SELECT 1/0"),
    )
    .await;
    assert_eq!(
        sql.query_value("SELECT 7").await.unwrap().as_deref(),
        Some("7")
    );
    sql.close().await.unwrap();

    // The same for replication commands, cancelled at the first await. On a busy
    // machine the server can answer before the single poll reads, so retry until one
    // call really was abandoned with its reply still unread.
    let mut repl = ReplicationClient::connect(&plain).await.unwrap();
    let mut abandoned = false;
    for _ in 0..100 {
        match futures_poll_once(repl.identify_system()).await {
            None => {
                abandoned = true;
                break;
            }
            Some(answered) => {
                answered.unwrap();
            }
        }
    }
    assert!(
        abandoned,
        "IDENTIFY_SYSTEM was answered within a single poll 100 times in a row"
    );
    let shown = repl.show("wal_segment_size").await.unwrap();
    assert!(shown.ends_with("MB"), "{shown}");
    let id = repl.identify_system().await.unwrap();
    assert!(id.timeline.0 >= 1);
    repl.close().await.unwrap();
}

/// Polls a future once and drops it: `Some` if it finished at once.
async fn futures_poll_once<F: std::future::Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match future.as_mut().poll(cx) {
            std::task::Poll::Ready(output) => Some(output),
            std::task::Poll::Pending => None,
        })
    })
    .await
}
