//! The TLS options that were once "accepted but not enforced": each test here fails if
//! its option is ignored. (`sslcrl`, `sslcrldir` and the protocol versions are also
//! compared with libpq in `tls_libpq.rs`.)

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use pgwire_repl::config::Config;
use pgwire_repl::{ErrorKind, SqlClient};
use testkit::{Cluster, ClusterOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PSQL: &str = "/usr/bin/psql";
const OPENSSL: &str = "/usr/bin/openssl";

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new(OPENSSL)
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {OPENSSL}: {e}"));
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn config(text: &str) -> Config {
    Config::parse(text).unwrap_or_else(|e| panic!("bad test conninfo {text}: {e}"))
}

async fn refusal(text: &str) -> pgwire_repl::Error {
    match SqlClient::connect(&config(text)).await {
        Ok(_) => panic!("{text} connected, expected a refusal"),
        Err(e) => e,
    }
}

#[track_caller]
fn mentions(err: &pgwire_repl::Error, needles: &[&str]) {
    let text = err.to_string();
    for needle in needles {
        assert!(text.contains(needle), "{text:?} lacks {needle:?}");
    }
    assert!(
        err.advice().is_some_and(|a| !a.is_empty()),
        "{text}: no advice"
    );
}

/// psql's verdict (true = connected), with an empty environment.
fn psql_connects(conninfo: &str, home: &Path) -> bool {
    Command::new(PSQL)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", home)
        .args(["-X", "-A", "-t", "-d", conninfo, "-c", "SELECT 1"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {PSQL}: {e}"))
        .status
        .success()
}

fn mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslcertmode_and_encrypted_client_keys() {
    let cluster = Cluster::start(
        ClusterOptions::new()
            .tls(true)
            .hba("hostssl all certuser 127.0.0.1/32 cert"),
    );
    cluster.execute("CREATE ROLE certuser LOGIN").await;
    let tls = cluster.tls_files().unwrap();
    let work = tempfile::tempdir().unwrap();
    let home = work.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let base = |user: &str| {
        format!(
            "host=localhost hostaddr=127.0.0.1 port={} user={user} dbname=postgres sslmode=verify-full sslrootcert='{}'",
            cluster.port(),
            tls.ca_cert.display()
        )
    };
    let (cert, key) = tls.client_cert_for("certuser");
    let with_cert = |user: &str, key: &Path| {
        format!(
            "{} sslcert='{}' sslkey='{}'",
            base(user),
            cert.display(),
            key.display()
        )
    };

    // The server has ssl_ca_file, so it asks every TLS client for a certificate.
    SqlClient::connect(&config(&format!("{} sslcertmode=allow", base("postgres"))))
        .await
        .expect("sslcertmode=allow without a certificate");
    let err = refusal(&format!("{} sslcertmode=require", base("postgres"))).await;
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    mentions(&err, &["none was sent", "sslcertmode=require"]);
    SqlClient::connect(&config(&format!(
        "{} sslcertmode=require",
        with_cert("certuser", &key)
    )))
    .await
    .expect("sslcertmode=require with a certificate the server asked for");
    // sslcertmode=disable keeps the configured certificate back: cert auth fails.
    SqlClient::connect(&config(&with_cert("certuser", &key)))
        .await
        .expect("cert authentication with the certificate");
    let err = refusal(&format!(
        "{} sslcertmode=disable",
        with_cert("certuser", &key)
    ))
    .await;
    assert_eq!(err.kind(), ErrorKind::Server, "{err}");
    // Without TLS no server can have asked.
    let err = refusal(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=disable sslcertmode=require",
        cluster.port()
    ))
    .await;
    mentions(&err, &["does not use TLS", "sslcertmode=require"]);

    // sslpassword: an encrypted PKCS#8 key (PBKDF2 + AES-256-CBC, and scrypt).
    let dir = work.path();
    std::fs::copy(&key, dir.join("plain.key")).unwrap();
    openssl(
        dir,
        &[
            "pkcs8",
            "-topk8",
            "-v2",
            "aes-256-cbc",
            "-in",
            "plain.key",
            "-passout",
            "pass:s3 cret",
            "-out",
            "enc.key",
        ],
    );
    openssl(
        dir,
        &[
            "pkcs8",
            "-topk8",
            "-scrypt",
            "-in",
            "plain.key",
            "-passout",
            "pass:s3 cret",
            "-out",
            "enc-scrypt.key",
        ],
    );
    openssl(
        dir,
        &[
            "ec",
            "-in",
            "plain.key",
            "-aes256",
            "-passout",
            "pass:s3 cret",
            "-out",
            "legacy.key",
        ],
    );
    for name in ["enc.key", "enc-scrypt.key", "legacy.key"] {
        mode(&dir.join(name), 0o600);
    }
    let encrypted = dir.join("enc.key");
    let good = format!(
        "{} sslpassword='s3 cret'",
        with_cert("certuser", &encrypted)
    );
    SqlClient::connect(&config(&good))
        .await
        .expect("an encrypted key with the right sslpassword");
    assert!(
        psql_connects(&good, &home),
        "psql must accept it too: {good}"
    );
    SqlClient::connect(&config(&format!(
        "{} sslpassword='s3 cret'",
        with_cert("certuser", &dir.join("enc-scrypt.key"))
    )))
    .await
    .expect("an scrypt-encrypted key");
    let wrong = format!("{} sslpassword=wrong", with_cert("certuser", &encrypted));
    let err = refusal(&wrong).await;
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    mentions(&err, &["cannot decrypt", "sslpassword"]);
    assert!(
        !psql_connects(&wrong, &home),
        "psql refuses a wrong sslpassword too"
    );
    let err = refusal(&with_cert("certuser", &encrypted)).await;
    mentions(&err, &["is encrypted", "sslpassword is not set"]);
    let err = refusal(&format!(
        "{} sslpassword='s3 cret'",
        with_cert("certuser", &dir.join("legacy.key"))
    ))
    .await;
    mentions(&err, &["legacy PEM encryption", "openssl pkcs8 -topk8"]);

    // libpq refuses a key file others can read; so does this client.
    let open = dir.join("open.key");
    std::fs::copy(&key, &open).unwrap();
    mode(&open, 0o644);
    let loose = with_cert("certuser", &open);
    let err = refusal(&loose).await;
    mentions(&err, &["group or world access", "0600"]);
    assert!(
        !psql_connects(&loose, &home),
        "psql refuses the 0644 key too"
    );

    // A server that does not ask for certificates (no ssl_ca_file).
    cluster.execute("ALTER SYSTEM SET ssl_ca_file = ''").await;
    cluster.reload().await;
    let err = refusal(&format!(
        "{} sslcertmode=require",
        with_cert("postgres", &key)
    ))
    .await;
    mentions(&err, &["did not request an SSL certificate"]);
    SqlClient::connect(&config(&with_cert("postgres", &key)))
        .await
        .expect("sslcertmode=allow does not need a request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_version_and_crl_options_are_checked_before_connecting() {
    let err =
        Config::parse("host=db ssl_max_protocol_version=TLSv1.1 ssl_min_protocol_version=TLSv1")
            .unwrap_err();
    assert!(
        err.message().contains("ssl_max_protocol_version=TLSv1.1"),
        "{err}"
    );
    let err =
        Config::parse("host=db ssl_min_protocol_version=TLSv1.3 ssl_max_protocol_version=TLSv1.2")
            .unwrap_err();
    assert!(
        err.message().contains("invalid SSL protocol version range"),
        "{err}"
    );

    // An explicitly named CRL file that cannot be read is an error, not a silent skip.
    let cluster = Cluster::start(ClusterOptions::new().tls(true));
    let ca = cluster.tls_files().unwrap().ca_cert.clone();
    let base = format!(
        "host=localhost hostaddr=127.0.0.1 port={} user=postgres dbname=postgres sslmode=verify-full sslrootcert='{}'",
        cluster.port(),
        ca.display()
    );
    SqlClient::connect(&config(&base)).await.expect("baseline");
    let err = refusal(&format!("{base} sslcrl=/nonexistent/root.crl")).await;
    mentions(&err, &["/nonexistent/root.crl", "sslcrl"]);
    let err = refusal(&format!("{base} sslcrldir=/nonexistent/crls")).await;
    mentions(&err, &["/nonexistent/crls", "sslcrldir"]);
    let not_a_crl = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(not_a_crl.path(), "no CRL here\n").unwrap();
    let err = refusal(&format!("{base} sslcrl='{}'", not_a_crl.path().display())).await;
    mentions(&err, &["holds no CRL"]);
    // An empty CRL directory turns checking on with no CRL: every chain is refused,
    // as libpq (OpenSSL) does.
    let empty = tempfile::tempdir().unwrap();
    let err = refusal(&format!("{base} sslcrldir='{}'", empty.path().display())).await;
    mentions(&err, &["no CRL from"]);
    // With a ceiling of TLS 1.2 the connection uses TLS 1.2.
    let client = SqlClient::connect(&config(&format!("{base} ssl_max_protocol_version=TLSv1.2")))
        .await
        .unwrap();
    assert_eq!(client.connection().tls().unwrap().version, "TLSv1.2");
    let _ = client.close().await;
    let client = SqlClient::connect(&config(&format!("{base} ssl_min_protocol_version=TLSv1.3")))
        .await
        .unwrap();
    assert_eq!(client.connection().tls().unwrap().version, "TLSv1.3");
    let _ = client.close().await;
}

/// What a fake server saw in the ClientHello: the SNI name, if any.
async fn sni_seen(conninfo_without_port: &str) -> Option<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut request = [0u8; 8];
        socket.read_exact(&mut request).await.unwrap();
        assert_eq!(
            request,
            [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f],
            "an SSLRequest"
        );
        socket.write_all(b"S").await.unwrap();
        let acceptor =
            tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), socket);
        let start = acceptor.await.unwrap();
        start.client_hello().server_name().map(str::to_string)
    });
    let text = format!("{conninfo_without_port} port={port} user=u dbname=d connect_timeout=5");
    // The fake server stops after the ClientHello, so the connection fails.
    let _ = SqlClient::connect(&config(&text)).await;
    server.await.unwrap()
}

#[tokio::test]
async fn sslsni_zero_sends_no_server_name() {
    let host = "host=db.example.com hostaddr=127.0.0.1 sslmode=require";
    assert_eq!(sni_seen(host).await.as_deref(), Some("db.example.com"));
    assert_eq!(
        sni_seen(&format!("{host} sslsni=1")).await.as_deref(),
        Some("db.example.com")
    );
    assert_eq!(sni_seen(&format!("{host} sslsni=0")).await, None);
    // Never for an address, as in libpq (RFC 6066).
    assert_eq!(sni_seen("host=127.0.0.1 sslmode=require").await, None);
    assert_eq!(sni_seen("hostaddr=127.0.0.1 sslmode=require").await, None);
}

#[test]
fn files_exist() {
    // The oracles the TLS tests rely on; a clear failure instead of a confusing one.
    for path in [PSQL, OPENSSL] {
        assert!(
            PathBuf::from(path).exists(),
            "{path} is missing: install postgresql-client-15 and openssl"
        );
    }
}
