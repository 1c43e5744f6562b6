//! `load_balance_hosts` on real servers (version from PGREPL_TEST_PG): `random` spreads
//! connections over the hosts, `disable` keeps libpq's order, and an invalid value is
//! refused as libpq 18 refuses it.

use pgwire_repl::config::Config;
use pgwire_repl::{ErrorKind, SqlClient};
use testkit::oracle::Psql;
use testkit::{Cluster, ClusterOptions};

async fn port_of(config: &Config) -> String {
    let mut client = SqlClient::connect(config).await.expect("connect");
    let port = client.query_value("SHOW port").await.unwrap().unwrap();
    client.close().await.unwrap();
    port
}

fn hosts(a: &Cluster, b: &Cluster, extra: &str) -> String {
    format!(
        "host={},{} port={},{} user=postgres dbname=postgres sslmode=disable {extra}",
        a.socket_dir().display(),
        b.socket_dir().display(),
        a.port(),
        b.port()
    )
}

#[tokio::test]
async fn random_uses_every_host_and_disable_keeps_the_order() {
    let a = Cluster::start(ClusterOptions::new());
    let b = Cluster::start(ClusterOptions::new());
    let (port_a, port_b) = (a.port().to_string(), b.port().to_string());

    let ordered = Config::parse(&hosts(&a, &b, "load_balance_hosts=disable")).unwrap();
    for _ in 0..10 {
        assert_eq!(port_of(&ordered).await, port_a);
    }

    // With two hosts each connection picks either with probability 1/2, so 60 tries all
    // landing on one host would happen once in 2^59 runs.
    let random = Config::parse(&hosts(&a, &b, "load_balance_hosts=random")).unwrap();
    let (mut on_a, mut on_b) = (0, 0);
    for _ in 0..60 {
        let port = port_of(&random).await;
        if port == port_a {
            on_a += 1;
        } else if port == port_b {
            on_b += 1;
        } else {
            panic!("connected to port {port}, which is neither host");
        }
        if on_a >= 3 && on_b >= 3 {
            break;
        }
    }
    assert!(on_a > 0 && on_b > 0, "a: {on_a}, b: {on_b}");

    // libpq 18 spreads the same list too.
    let psql = Psql::libpq18();
    let conninfo = hosts(&a, &b, "load_balance_hosts=random");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..60 {
        let outcome = psql.run(&conninfo, "SHOW port", &[]);
        assert!(outcome.ok, "{}", outcome.stderr);
        seen.insert(outcome.stdout);
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen.len(), 2, "libpq 18 used only {seen:?}");

    // A random order still skips an unreachable host.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let with_dead = Config::parse(&format!(
        "host=127.0.0.1,{} port={dead},{} user=postgres dbname=postgres sslmode=disable load_balance_hosts=random",
        a.socket_dir().display(),
        a.port()
    ))
    .unwrap();
    for _ in 0..10 {
        assert_eq!(port_of(&with_dead).await, port_a);
    }
}

#[tokio::test]
async fn an_invalid_value_is_refused_as_libpq_refuses_it() {
    let a = Cluster::start(ClusterOptions::new());
    for value in ["sometimes", "Random", "", "1"] {
        let conninfo = format!(
            "{} load_balance_hosts='{value}'",
            a.unix_conninfo("postgres")
        );
        let err = Config::parse(&conninfo).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        let libpq = Psql::libpq18().run(&conninfo, "SELECT 1", &[]);
        assert!(!libpq.ok, "libpq accepted load_balance_hosts={value:?}");
        let expected = libpq.stderr.trim_start_matches("psql: error: ");
        assert_eq!(err.message(), expected, "{value:?}");
        assert!(err.advice().unwrap().contains("disable, random"), "{err}");
    }
}
