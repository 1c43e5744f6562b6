//! `clone-standby clone … sslmode=verify-full` with certificates made the way people
//! make them with the openssl command: a self-signed server certificate used as its own
//! root (seed scripts), and PostgreSQL's documentation recipe (a root CA and an X.509 v1
//! server certificate signed with `openssl x509 -req`). libpq accepts both; so must we.

mod common;

use std::path::Path;
use std::process::Command;

use common::{run, scratch, text};
use testkit::{Cluster, ClusterOptions};

const OPENSSL: &str = "/usr/bin/openssl";

fn openssl(dir: &Path, args: &str) {
    let output = Command::new(OPENSSL)
        .current_dir(dir)
        .args(args.split_whitespace())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {OPENSSL} (install openssl): {e}"));
    assert!(
        output.status.success(),
        "openssl {args}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn clone(source: &str, pgdata: &Path) -> std::process::Output {
    run(&[
        "clone",
        "--source",
        source,
        "--pgdata",
        pgdata.to_str().unwrap(),
        "--no-sync",
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_with_verify_full_through_self_signed_and_documentation_certificates() {
    let primary = Cluster::start(
        ClusterOptions::new()
            .tls(true)
            .hba("hostssl replication,all repl 127.0.0.1/32 scram-sha-256"),
    );
    primary
        .execute("SET password_encryption = 'scram-sha-256'; CREATE ROLE repl LOGIN REPLICATION PASSWORD 'pw'")
        .await;
    let work = scratch();
    let dir = work.path();
    let source = |host: &str, root: &Path| {
        format!(
            "host={host} hostaddr=127.0.0.1 port={} user=repl password=pw sslmode=verify-full sslrootcert='{}'",
            primary.port(),
            root.display()
        )
    };

    // A seed script's certificate: self-signed, CA:TRUE, no subjectAltName, copied to
    // the client as its root certificate.
    openssl(
        dir,
        "req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=db.example.com -keyout self.key -out self.crt",
    );
    std::fs::copy(dir.join("self.crt"), dir.join("self-root.crt")).unwrap();
    primary.set_server_certificate(&read(&dir.join("self.crt")), &read(&dir.join("self.key")));
    primary.reload().await;
    let first = dir.join("standby-self-signed");
    let output = clone(
        &source("db.example.com", &dir.join("self-root.crt")),
        &first,
    );
    assert!(output.status.success(), "{}", text(&output));
    let verify = run(&["verify", "--pgdata", first.to_str().unwrap()]);
    assert!(verify.status.success(), "{}", text(&verify));
    // verify-full still checks the name: the certificate does not name localhost.
    let wrong = clone(
        &source("localhost", &dir.join("self-root.crt")),
        &dir.join("standby-wrong-name"),
    );
    assert!(!wrong.status.success(), "{}", text(&wrong));
    assert!(
        text(&wrong).contains("does not match host name \"localhost\""),
        "{}",
        text(&wrong)
    );

    // PostgreSQL's documentation: a root CA, and a v1 server certificate it signs.
    openssl(
        dir,
        "req -new -x509 -days 365 -nodes -text -out root.crt -keyout root.key -subj /CN=root.example.com",
    );
    openssl(
        dir,
        "req -new -nodes -text -out server.csr -keyout server.key -subj /CN=db.example.com",
    );
    openssl(
        dir,
        "x509 -req -in server.csr -text -days 365 -CA root.crt -CAkey root.key -CAcreateserial -out server.crt",
    );
    let output = Command::new(OPENSSL)
        .args(["x509", "-noout", "-text", "-in"])
        .arg(dir.join("server.crt"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("Version: 1 (0x0)"),
        "the documentation's recipe should make a v1 certificate"
    );
    primary.set_server_certificate(
        &read(&dir.join("server.crt")),
        &read(&dir.join("server.key")),
    );
    primary.reload().await;
    let second = dir.join("standby-documentation");
    let output = clone(&source("db.example.com", &dir.join("root.crt")), &second);
    assert!(output.status.success(), "{}", text(&output));
    let verify = run(&["verify", "--pgdata", second.to_str().unwrap()]);
    assert!(verify.status.success(), "{}", text(&verify));
    let auto_conf = read(&second.join("postgresql.auto.conf"));
    assert!(auto_conf.contains("verify-full"), "{auto_conf}");
    // The unrelated self-signed certificate is no root for this server.
    let wrong = clone(
        &source("db.example.com", &dir.join("self-root.crt")),
        &dir.join("standby-wrong-root"),
    );
    assert!(!wrong.status.success(), "{}", text(&wrong));
    assert!(
        text(&wrong).contains("is neither in sslrootcert nor sent by the server"),
        "{}",
        text(&wrong)
    );
}
