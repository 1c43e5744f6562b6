//! Connection tests against a real PostgreSQL server (version from PGREPL_TEST_PG).
//!
//! Every auth method × TLS mode must succeed or fail exactly as libpq would.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgwire_repl::client::SlotOptions;
use pgwire_repl::config::Config;
use pgwire_repl::connection::{AuthMethod, ConnectOptions};
use pgwire_repl::{Error, ErrorKind, Lsn, ReplicationClient, SqlClient};
use testkit::{Cluster, ClusterOptions, KeyAlgorithm};

const PASSWORD: &str = "s3cret pass'word";

/// One pg_hba line per auth method, for both SQL and physical replication connections.
fn auth_cluster(tls: bool, algorithm: KeyAlgorithm) -> Cluster {
    let mut options = ClusterOptions::new().tls(tls).tls_key_algorithm(algorithm);
    for line in [
        "hostssl all,replication u_cert 127.0.0.1/32 cert",
        "host all,replication u_trust 127.0.0.1/32 trust",
        "host all,replication u_password 127.0.0.1/32 password",
        "host all,replication u_md5 127.0.0.1/32 md5",
        "host all,replication u_scram 127.0.0.1/32 scram-sha-256",
        "hostssl all,replication u_tls_only 127.0.0.1/32 scram-sha-256",
        "hostnossl all,replication u_plain_only 127.0.0.1/32 scram-sha-256",
        "host all u_no_repl_line 127.0.0.1/32 scram-sha-256",
        "host all,replication u_no_repl_attr 127.0.0.1/32 scram-sha-256",
    ] {
        options = options.hba(line);
    }
    Cluster::start(options)
}

async fn create_roles(cluster: &Cluster) {
    let pw = PASSWORD.replace('\'', "''");
    cluster
        .execute(&format!(
            "SET password_encryption = 'scram-sha-256';
             CREATE ROLE u_trust LOGIN REPLICATION;
             CREATE ROLE u_cert LOGIN REPLICATION;
             CREATE ROLE u_password LOGIN REPLICATION PASSWORD '{pw}';
             CREATE ROLE u_scram LOGIN REPLICATION PASSWORD '{pw}';
             CREATE ROLE u_tls_only LOGIN REPLICATION PASSWORD '{pw}';
             CREATE ROLE u_plain_only LOGIN REPLICATION PASSWORD '{pw}';
             CREATE ROLE u_no_repl_line LOGIN REPLICATION PASSWORD '{pw}';
             CREATE ROLE u_no_repl_attr LOGIN PASSWORD '{pw}';
             SET password_encryption = 'md5';
             CREATE ROLE u_md5 LOGIN REPLICATION PASSWORD '{pw}';"
        ))
        .await;
}

fn conninfo(cluster: &Cluster, user: &str, extra: &str) -> Config {
    let text = format!(
        "{} password='{}' {extra}",
        cluster.tcp_conninfo(user),
        PASSWORD.replace('\'', "\\'")
    );
    Config::parse(&text).unwrap_or_else(|e| panic!("bad test conninfo {text}: {e}"))
}

fn tls_extra(cluster: &Cluster, sslmode: &str) -> String {
    let ca = cluster
        .tls_files()
        .expect("TLS cluster")
        .ca_cert
        .display()
        .to_string();
    format!("sslmode={sslmode} sslrootcert='{ca}'")
}

/// Connects a SQL session and a physical replication session; both must agree.
async fn connect_both(config: &Config) -> Result<(AuthMethod, bool), Error> {
    let sql = SqlClient::connect(config).await?;
    let method = sql.connection().auth_method();
    let tls = sql.connection().tls().is_some();
    sql.close().await?;
    let mut repl = ReplicationClient::connect(config).await?;
    assert_eq!(
        repl.connection().auth_method(),
        method,
        "replication session authenticated differently"
    );
    assert_eq!(repl.connection().tls().is_some(), tls);
    repl.identify_system().await?;
    repl.close().await?;
    Ok((method, tls))
}

#[tokio::test]
async fn auth_methods_by_tls_mode() {
    let cluster = auth_cluster(true, KeyAlgorithm::EcdsaP256Sha256);
    create_roles(&cluster).await;

    let password_users = [
        ("u_password", AuthMethod::Cleartext),
        ("u_md5", AuthMethod::Md5),
        ("u_scram", AuthMethod::ScramSha256),
        ("u_trust", AuthMethod::None),
    ];
    for sslmode in [
        "disable",
        "allow",
        "prefer",
        "require",
        "verify-ca",
        "verify-full",
    ] {
        let expect_tls = !matches!(sslmode, "disable" | "allow");
        for (user, method) in password_users {
            let config = conninfo(&cluster, user, &tls_extra(&cluster, sslmode));
            let (got_method, got_tls) = connect_both(&config)
                .await
                .unwrap_or_else(|e| panic!("{user} with sslmode={sslmode} failed: {e}"));
            // With TLS and the default channel_binding=prefer, SCRAM upgrades to -PLUS.
            let method = if method == AuthMethod::ScramSha256 && expect_tls {
                AuthMethod::ScramSha256Plus
            } else {
                method
            };
            assert_eq!(got_method, method, "{user} sslmode={sslmode}");
            assert_eq!(got_tls, expect_tls, "{user} sslmode={sslmode}: TLS in use?");
        }
        // A hostssl-only role: allow falls back to TLS, disable fails.
        let tls_only = connect_both(&conninfo(
            &cluster,
            "u_tls_only",
            &tls_extra(&cluster, sslmode),
        ))
        .await;
        match sslmode {
            "disable" => assert_server_error(tls_only, "28000", "no pg_hba.conf entry"),
            _ => assert!(
                tls_only.unwrap().1,
                "u_tls_only must end up on TLS with sslmode={sslmode}"
            ),
        }
        // A hostnossl-only role: prefer falls back to plain, require and stricter fail.
        let plain_only = connect_both(&conninfo(
            &cluster,
            "u_plain_only",
            &tls_extra(&cluster, sslmode),
        ))
        .await;
        match sslmode {
            "disable" | "allow" | "prefer" => assert!(!plain_only.unwrap().1),
            _ => assert_server_error(plain_only, "28000", "no pg_hba.conf entry"),
        }
    }

    // Wrong passwords are server errors with SQLSTATE 28P01, on every password method.
    for user in ["u_password", "u_md5", "u_scram"] {
        for sslmode in ["disable", "require"] {
            let mut config = conninfo(&cluster, user, &format!("sslmode={sslmode}"));
            config.password = Some("wrong".into());
            let err = SqlClient::connect(&config)
                .await
                .expect_err("wrong password accepted");
            assert_eq!(err.kind(), ErrorKind::Server, "{err}");
            assert_eq!(err.sqlstate(), Some("28P01"), "{user} {sslmode}: {err}");
            assert!(err.to_string().contains("what to do"), "{err}");
        }
        // No password at all is caught on the client side before anything is sent.
        let mut config = conninfo(&cluster, user, "sslmode=disable passfile=/nonexistent");
        config.password = None;
        let err = SqlClient::connect(&config)
            .await
            .expect_err("missing password accepted");
        assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
        assert!(err.to_string().contains("PGPASSWORD"), "{err}");
    }

    // Client-certificate authentication.
    let tls = cluster.tls_files().unwrap();
    let (cert, key) = tls.client_cert_for("u_cert");
    let cert_extra = format!(
        "{} sslcert='{}' sslkey='{}'",
        tls_extra(&cluster, "verify-full"),
        cert.display(),
        key.display()
    );
    let (method, used_tls) = connect_both(&conninfo(&cluster, "u_cert", &cert_extra))
        .await
        .expect("cert auth");
    assert_eq!((method, used_tls), (AuthMethod::None, true));
    // A certificate for another user is refused by the server.
    let (other_cert, other_key) = tls.client_cert_for("someone_else");
    let wrong_cert = format!(
        "{} sslcert='{}' sslkey='{}'",
        tls_extra(&cluster, "require"),
        other_cert.display(),
        other_key.display()
    );
    assert_server_error(
        connect_both(&conninfo(&cluster, "u_cert", &wrong_cert)).await,
        "28000",
        "certificate",
    );
    // Without a certificate, cert auth fails.
    let no_cert = connect_both(&conninfo(
        &cluster,
        "u_cert",
        &tls_extra(&cluster, "require"),
    ))
    .await;
    assert_eq!(no_cert.unwrap_err().kind(), ErrorKind::Server);

    // Channel binding.
    let require_cb = |user: &str, sslmode: &str| {
        conninfo(
            &cluster,
            user,
            &format!("{} channel_binding=require", tls_extra(&cluster, sslmode)),
        )
    };
    assert_eq!(
        connect_both(&require_cb("u_scram", "require"))
            .await
            .unwrap()
            .0,
        AuthMethod::ScramSha256Plus
    );
    for user in ["u_trust", "u_md5", "u_password"] {
        let err = connect_both(&require_cb(user, "require"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Auth, "{user}: {err}");
        assert!(err.to_string().contains("channel binding"), "{err}");
    }
    let disabled = conninfo(
        &cluster,
        "u_scram",
        &format!("{} channel_binding=disable", tls_extra(&cluster, "require")),
    );
    assert_eq!(
        connect_both(&disabled).await.unwrap().0,
        AuthMethod::ScramSha256
    );
    let no_tls = conninfo(
        &cluster,
        "u_scram",
        "sslmode=disable channel_binding=prefer",
    );
    assert_eq!(
        connect_both(&no_tls).await.unwrap().0,
        AuthMethod::ScramSha256
    );

    // verify-full checks the host name; verify-ca does not.
    let renamed = |sslmode: &str| {
        let mut config = conninfo(&cluster, "u_scram", &tls_extra(&cluster, sslmode));
        config.hosts = vec![pgwire_repl::config::Host::Tcp("db.wrong.example".into())];
        config.host_addrs = vec![Some("127.0.0.1".into())];
        config
    };
    let err = connect_both(&renamed("verify-full")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Tls, "{err}");
    assert!(err.to_string().contains("db.wrong.example"), "{err}");
    connect_both(&renamed("verify-ca"))
        .await
        .expect("verify-ca ignores the host name");
    // The host name the certificate does name works with verify-full.
    let mut by_name = conninfo(&cluster, "u_scram", &tls_extra(&cluster, "verify-full"));
    by_name.hosts = vec![pgwire_repl::config::Host::Tcp("localhost".into())];
    by_name.host_addrs = vec![Some("127.0.0.1".into())];
    connect_both(&by_name)
        .await
        .expect("verify-full with host=localhost");
    // An unrelated CA fails verification, but not sslmode=require without a root file.
    let other_ca = format!(
        "sslmode=verify-ca sslrootcert='{}'",
        tls.other_ca_cert.display()
    );
    assert_eq!(
        connect_both(&conninfo(&cluster, "u_scram", &other_ca))
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::Tls
    );
    let mut require_any = conninfo(&cluster, "u_scram", "sslmode=require");
    require_any.ssl_root_cert = None;
    connect_both(&require_any)
        .await
        .expect("sslmode=require does not verify the chain");

    // Direct TLS (sslnegotiation=direct) works on 17+ and fails cleanly before.
    let direct = conninfo(
        &cluster,
        "u_scram",
        &format!(
            "{} sslnegotiation=direct",
            tls_extra(&cluster, "verify-full")
        ),
    );
    let result = SqlClient::connect(&direct).await;
    if cluster.major() >= 17 {
        let client = result.expect("direct TLS on 17+");
        assert!(client.connection().tls().unwrap().direct);
        assert_eq!(
            client.connection().auth_method(),
            AuthMethod::ScramSha256Plus
        );
    } else {
        let err = result.expect_err("direct TLS must fail before 17");
        assert!(
            matches!(err.kind(), ErrorKind::Tls | ErrorKind::Io),
            "{err}"
        );
    }

    // Replication-specific rejections carry the fix.
    let err = ReplicationClient::connect(&conninfo(&cluster, "u_no_repl_line", "sslmode=disable"))
        .await
        .err()
        .unwrap();
    assert_eq!(err.sqlstate(), Some("28000"), "{err}");
    assert!(
        err.advice()
            .unwrap()
            .contains("host  replication  u_no_repl_line  127.0.0.1/32"),
        "{err}"
    );
    let err = ReplicationClient::connect(&conninfo(&cluster, "u_no_repl_attr", "sslmode=disable"))
        .await
        .err()
        .unwrap();
    assert_eq!(err.sqlstate(), Some("42501"), "{err}");
    assert!(err.advice().unwrap().contains("ALTER ROLE"), "{err}");
}

fn assert_server_error<T: std::fmt::Debug>(result: Result<T, Error>, sqlstate: &str, text: &str) {
    let err = result.expect_err("expected a server error");
    assert_eq!(err.kind(), ErrorKind::Server, "{err}");
    assert_eq!(err.sqlstate(), Some(sqlstate), "{err}");
    assert!(
        err.to_string().contains(text),
        "expected {text:?} in: {err}"
    );
}

/// SCRAM-PLUS must hash the certificate with its signature's hash (SHA-384 here);
/// the server computes its own value, so success proves ours matches.
#[tokio::test]
async fn channel_binding_follows_the_certificate_hash() {
    let cluster = auth_cluster(true, KeyAlgorithm::EcdsaP384Sha384);
    create_roles(&cluster).await;
    let config = conninfo(
        &cluster,
        "u_scram",
        &format!(
            "{} channel_binding=require",
            tls_extra(&cluster, "verify-full")
        ),
    );
    assert_eq!(
        connect_both(&config).await.unwrap().0,
        AuthMethod::ScramSha256Plus
    );
}

#[tokio::test]
async fn replication_commands_and_plain_server() {
    let cluster = Cluster::start(ClusterOptions::new());
    let mut sql = cluster.sql().await;
    let unix = cluster.config(cluster.superuser());
    let mut repl = ReplicationClient::connect(&unix)
        .await
        .expect("replication connection");
    assert_eq!(repl.server_major(), cluster.major());

    // IDENTIFY_SYSTEM matches pg_control_system() and the current WAL position.
    let before = sql
        .query_value("SELECT pg_current_wal_lsn()")
        .await
        .unwrap()
        .unwrap()
        .parse::<Lsn>()
        .unwrap();
    let id = repl.identify_system().await.unwrap();
    let after = sql
        .query_value("SELECT pg_current_wal_lsn()")
        .await
        .unwrap()
        .unwrap()
        .parse::<Lsn>()
        .unwrap();
    let system_id = sql
        .query_value("SELECT system_identifier FROM pg_control_system()")
        .await
        .unwrap()
        .unwrap();
    let timeline = sql
        .query_value("SELECT timeline_id FROM pg_control_checkpoint()")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(id.system_id.to_string(), system_id);
    assert_eq!(id.timeline.to_string(), timeline);
    assert!(
        before <= id.xlog_pos && id.xlog_pos <= after,
        "{before} <= {} <= {after}",
        id.xlog_pos
    );
    assert_eq!(id.dbname, None);
    assert_eq!(repl.wal_segment_size().await.unwrap().bytes(), 16 << 20);
    assert_eq!(repl.show("data_directory_mode").await.unwrap(), "0700");

    // Slots: create (permanent, reserving WAL), see it, refuse a duplicate, read, drop.
    let consistent = repl
        .create_physical_slot(
            "kit_slot",
            SlotOptions {
                temporary: false,
                reserve_wal: true,
            },
        )
        .await
        .unwrap();
    assert_eq!(consistent, Lsn::INVALID, "physical slots report 0/0");
    let restart = sql
        .query_value("SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = 'kit_slot'")
        .await
        .unwrap()
        .expect("RESERVE_WAL sets restart_lsn")
        .parse::<Lsn>()
        .unwrap();
    assert!(restart <= id.xlog_pos && !restart.is_invalid());
    let dup = repl
        .create_physical_slot("kit_slot", SlotOptions::default())
        .await
        .unwrap_err();
    assert_eq!(dup.sqlstate(), Some("42710"), "{dup}");
    if cluster.major() >= 15 {
        let info = repl
            .read_replication_slot("kit_slot")
            .await
            .unwrap()
            .expect("slot exists");
        assert_eq!(info.slot_type, "physical");
        assert_eq!(info.restart_lsn, Some(restart));
        assert_eq!(info.restart_tli, Some(id.timeline));
        assert_eq!(
            repl.read_replication_slot("no_such_slot").await.unwrap(),
            None
        );
    } else {
        let err = repl.read_replication_slot("kit_slot").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        assert!(err.to_string().contains("needs PostgreSQL 15"), "{err}");
    }
    repl.drop_slot("kit_slot", true).await.unwrap();
    let missing = repl.drop_slot("kit_slot", false).await.unwrap_err();
    assert_eq!(missing.sqlstate(), Some("42704"), "{missing}");
    assert_eq!(
        sql.query_value("SELECT count(*) FROM pg_replication_slots")
            .await
            .unwrap()
            .as_deref(),
        Some("0")
    );

    // A temporary slot (no RESERVE_WAL) lives as long as its session.
    repl.create_physical_slot(
        "kit_temp",
        SlotOptions {
            temporary: true,
            reserve_wal: false,
        },
    )
    .await
    .unwrap();
    assert_eq!(
        sql.query_value(
            "SELECT temporary::text FROM pg_replication_slots WHERE slot_name = 'kit_temp'"
        )
        .await
        .unwrap()
        .as_deref(),
        Some("true")
    );
    // Errors leave the session usable: SQL is refused on a physical walsender.
    let err = repl.command("SELECT 1").await.unwrap_err();
    assert_eq!(err.sqlstate(), Some("0A000"), "{err}");
    assert!(
        err.advice().unwrap().contains("replication commands"),
        "{err}"
    );
    let err = repl
        .timeline_history(pgwire_repl::TimelineId(1))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Usage);
    repl.identify_system()
        .await
        .expect("session still usable after errors");
    repl.close().await.unwrap();
    let mut gone = false;
    for _ in 0..50 {
        if sql
            .query_value("SELECT count(*) FROM pg_replication_slots")
            .await
            .unwrap()
            .as_deref()
            == Some("0")
        {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "the temporary slot must disappear with its session");

    // Notices reach the caller.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let options = ConnectOptions {
        notice_handler: Some(Arc::new(move |notice| {
            sink.lock().unwrap().push(notice.message.clone())
        })),
        ..ConnectOptions::default()
    };
    let mut noisy = SqlClient::connect_with(&unix, &options).await.unwrap();
    noisy
        .batch("DO $$ BEGIN RAISE NOTICE 'hello from the server'; END $$")
        .await
        .unwrap();
    assert_eq!(
        seen.lock().unwrap().as_slice(),
        ["hello from the server".to_string()]
    );

    // sslmode=require against a server without TLS is a clear TLS error.
    let config = Config::parse(&format!(
        "{} sslmode=require",
        cluster.tcp_conninfo(cluster.superuser())
    ))
    .unwrap();
    let err = SqlClient::connect(&config)
        .await
        .expect_err("require without server TLS");
    assert_eq!(err.kind(), ErrorKind::Tls, "{err}");
    assert!(err.to_string().contains("does not support TLS"), "{err}");
    // prefer falls back to plain text on the same server.
    let config = Config::parse(&format!(
        "{} sslmode=prefer",
        cluster.tcp_conninfo(cluster.superuser())
    ))
    .unwrap();
    let client = SqlClient::connect(&config).await.unwrap();
    assert!(client.connection().tls().is_none());
}

/// A refused port and a server that accepts but never answers both fail within
/// connect_timeout, with a timeout or I/O error, not a hang.
#[tokio::test]
async fn refused_and_silent_servers_fail_within_connect_timeout() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = listener.local_addr().unwrap().port();
    drop(listener);
    let config = Config::parse(&format!(
        "host=127.0.0.1 port={closed_port} user=x sslmode=disable connect_timeout=2"
    ))
    .unwrap();
    let started = Instant::now();
    let err = SqlClient::connect(&config).await.err().unwrap();
    assert_eq!(err.kind(), ErrorKind::Io, "{err}");
    assert!(err.to_string().contains("is the server running"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));

    // Accepts the TCP connection, then says nothing.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let keeper = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    for sslmode in ["disable", "require"] {
        let config = Config::parse(&format!(
            "host=127.0.0.1 port={port} user=x sslmode={sslmode} connect_timeout=2"
        ))
        .unwrap();
        let started = Instant::now();
        let err = SqlClient::connect(&config).await.err().unwrap();
        let elapsed = started.elapsed();
        assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
        assert!(err.to_string().contains("connect_timeout"), "{err}");
        assert!(
            elapsed >= Duration::from_millis(1900) && elapsed < Duration::from_secs(4),
            "{elapsed:?}"
        );
    }
    keeper.abort();
}
