//! `target_session_attrs` over host lists, compared with libpq 15 (Debian's psql) for
//! all six values, on SQL and physical replication connections, against real servers
//! (version from PGREPL_TEST_PG): a primary, a streaming standby of it, and a primary
//! whose sessions are read-only by default.

use std::time::Duration;

use pgwire_repl::config::Config;
use pgwire_repl::{ReplicationClient, SqlClient};
use testkit::oracle::Psql;
use testkit::{Cluster, ClusterOptions, Standby};

const VALUES: [&str; 6] = [
    "any",
    "read-write",
    "read-only",
    "primary",
    "standby",
    "prefer-standby",
];

/// Which server ours picked: `Ok(port)`, or the error text.
async fn ours(conninfo: &str, replication: bool) -> Result<String, String> {
    let config = Config::parse(conninfo).map_err(|e| e.to_string())?;
    if replication {
        let mut client = ReplicationClient::connect(&config)
            .await
            .map_err(|e| e.to_string())?;
        let port = client.show("port").await.map_err(|e| e.to_string())?;
        client.close().await.map_err(|e| e.to_string())?;
        Ok(port)
    } else {
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
}

struct Servers {
    primary: Cluster,
    standby: Standby,
    read_only_primary: Cluster,
}

async fn servers() -> Servers {
    let primary = Cluster::start(ClusterOptions::new().setting("wal_keep_size", "256MB"));
    let standby = Standby::start(&primary, ClusterOptions::new()).await;
    let read_only_primary =
        Cluster::start(ClusterOptions::new().setting("default_transaction_read_only", "on"));
    // The standby must be in hot standby (accepting connections) before the lists are
    // tried; testkit's start waits for that.
    assert_eq!(
        standby
            .query_value("SELECT pg_is_in_recovery()")
            .await
            .as_deref(),
        Some("t")
    );
    Servers {
        primary,
        standby,
        read_only_primary,
    }
}

fn list(servers: &[&Cluster]) -> String {
    let hosts: Vec<String> = servers
        .iter()
        .map(|s| s.socket_dir().display().to_string())
        .collect();
    let ports: Vec<String> = servers.iter().map(|s| s.port().to_string()).collect();
    format!(
        "host={} port={} user=postgres dbname=postgres sslmode=disable",
        hosts.join(","),
        ports.join(",")
    )
}

#[tokio::test]
async fn every_value_picks_the_server_libpq_picks() {
    let psql = Psql::libpq15();
    let s = servers().await;
    let (p, sb, ro) = (&s.primary, &*s.standby, &s.read_only_primary);
    let lists: Vec<(&str, Vec<&Cluster>)> = vec![
        ("[standby, primary]", vec![sb, p]),
        ("[primary, standby]", vec![p, sb]),
        ("[read-only primary, standby]", vec![ro, sb]),
        ("[standby, read-only primary, primary]", vec![sb, ro, p]),
        ("[primary]", vec![p]),
        ("[standby]", vec![sb]),
    ];
    let mut disagreements = Vec::new();
    let mut compared = 0;
    let mut refused = 0;
    for replication in [false, true] {
        for (name, servers) in &lists {
            for value in VALUES {
                let mut conninfo = format!("{} target_session_attrs={value}", list(servers));
                if replication {
                    conninfo.push_str(" replication=true");
                }
                let libpq = psql.run(&conninfo, "SHOW port", &[]);
                let mine = ours(&conninfo, replication).await;
                compared += 1;
                let case = format!("{value} over {name} (replication={replication})");
                match (&mine, libpq.ok) {
                    (Ok(port), true) if *port == libpq.stdout => {}
                    (Err(_), false) => refused += 1,
                    _ => disagreements.push(format!(
                        "{case}: libpq {}, we {mine:?}",
                        if libpq.ok {
                            format!("picks port {}", libpq.stdout)
                        } else {
                            format!("fails: {}", libpq.stderr)
                        }
                    )),
                }
            }
        }
    }
    assert!(
        disagreements.is_empty(),
        "{} of {compared} cases disagree with libpq 15:\n{}",
        disagreements.len(),
        disagreements.join("\n")
    );
    assert!(
        refused > 0 && refused < compared,
        "{refused} of {compared} refused"
    );
    eprintln!(
        "target_session_attrs: {compared} cases agree with libpq 15 ({refused} refused by both)"
    );
}

#[tokio::test]
async fn the_errors_say_why_each_host_was_skipped() {
    let s = servers().await;
    let conninfo = format!(
        "{} target_session_attrs=primary",
        list(&[&*s.standby, &*s.standby])
    );
    let err = ours(&conninfo, false).await.unwrap_err();
    assert!(err.contains("server is in hot standby mode"), "{err}");
    assert!(
        err.contains(
            "could not connect to any host with target_session_attrs=primary (2 attempts)"
        ),
        "{err}"
    );
    assert!(err.contains("what to do:"), "{err}");
    let conninfo = format!("{} target_session_attrs=standby", list(&[&s.primary]));
    let err = ours(&conninfo, false).await.unwrap_err();
    assert!(err.contains("server is not in hot standby mode"), "{err}");
    let conninfo = format!(
        "{} target_session_attrs=read-write",
        list(&[&s.read_only_primary])
    );
    let err = ours(&conninfo, true).await.unwrap_err();
    assert!(err.contains("session is read-only"), "{err}");
}

#[tokio::test]
async fn unreachable_hosts_are_skipped_but_a_refused_login_is_final() {
    let s = servers().await;
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // A host nobody listens on is skipped, as libpq skips it.
    let conninfo = format!(
        "host=127.0.0.1,{} port={dead_port},{} user=postgres dbname=postgres sslmode=disable connect_timeout=5 target_session_attrs=primary",
        s.primary.socket_dir().display(),
        s.primary.port()
    );
    assert_eq!(
        ours(&conninfo, false).await.unwrap(),
        s.primary.port().to_string()
    );
    // A server that rejects the role ends the attempt: the next host is not tried
    // (libpq's documented behaviour for authentication failures).
    let conninfo = format!(
        "host={},{} port={},{} user=no_such_role dbname=postgres sslmode=disable",
        s.standby.socket_dir().display(),
        s.primary.socket_dir().display(),
        s.standby.port(),
        s.primary.port()
    );
    let started = std::time::Instant::now();
    let err = ours(&conninfo, false).await.unwrap_err();
    assert!(err.contains("no_such_role"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30));
    let libpq = Psql::libpq15().run(&conninfo, "SHOW port", &[]);
    assert!(!libpq.ok, "libpq connected: {}", libpq.stdout);
    // libpq reports only the first host: it never tried the second.
    assert!(
        !libpq.stderr.contains(&s.primary.port().to_string()),
        "{}",
        libpq.stderr
    );
    assert!(
        !err.contains(&format!(".s.PGSQL.{}", s.primary.port())),
        "{err}"
    );
}
