//! Tests of the cluster harness itself, checked with the system's `psql` (our own
//! client is tested elsewhere).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use testkit::{Cluster, ClusterOptions, KeyAlgorithm};

const PSQL: &str = "/usr/bin/psql";

/// Runs `psql -Atc sql` with a connection string; returns stdout or the error text.
fn psql_conninfo(conninfo: &str, sql: &str) -> Result<String, String> {
    let out = Command::new(PSQL)
        .arg("-X")
        .arg("-At")
        .arg("-d")
        .arg(conninfo)
        .arg("-c")
        .arg(sql)
        .env_remove("PGSSLMODE")
        .env_remove("PGHOST")
        .env_remove("PGPORT")
        .env_remove("PGUSER")
        .output()
        .expect("run psql");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `psql -h <socket_dir> -p <port> -U postgres -Atc sql`, which must succeed.
fn psql(cluster: &Cluster, sql: &str) -> String {
    let out = Command::new(PSQL)
        .arg("-X")
        .arg("-h")
        .arg(cluster.socket_dir())
        .arg("-p")
        .arg(cluster.port().to_string())
        .args(["-U", "postgres", "-d", "postgres", "-Atc", sql])
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "psql failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.log()
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn tls_cluster_answers_over_socket_and_tcp() {
    let started = Instant::now();
    let cluster = Cluster::start(
        ClusterOptions::new()
            .tls(true)
            .hba("hostssl all certuser 127.0.0.1/32 cert")
            .setting("work_mem", "7MB"),
    );
    eprintln!("TLS cluster started in {:?}", started.elapsed());

    let socket = cluster
        .socket_dir()
        .join(format!(".s.PGSQL.{}", cluster.port()));
    assert!(socket.exists(), "{} missing", socket.display());
    assert_eq!(psql(&cluster, "select 1"), "1");
    assert_eq!(
        psql(&cluster, "show server_version_num")
            .parse::<u32>()
            .unwrap()
            / 10000,
        cluster.major()
    );
    assert_eq!(cluster.major(), testkit::pg_major_from_env());
    assert_eq!(psql(&cluster, "show data_checksums"), "on");
    assert_eq!(psql(&cluster, "show wal_level"), "replica");
    assert_eq!(psql(&cluster, "show work_mem"), "7MB");
    assert_eq!(cluster.superuser(), "postgres");
    assert!(cluster.bin("pg_ctl").is_file());
    assert!(cluster.data_dir().join("PG_VERSION").is_file());

    // The Unix conninfo works as is.
    assert_eq!(
        psql_conninfo(&cluster.unix_conninfo("postgres"), "select current_user").unwrap(),
        "postgres"
    );

    // TCP with full verification against the generated CA.
    let tls = cluster.tls_files().expect("TLS files");
    let verify_full = format!(
        "{} sslmode=verify-full sslrootcert={}",
        cluster.tcp_conninfo("postgres"),
        tls.ca_cert.display()
    );
    assert_eq!(
        psql_conninfo(
            &verify_full,
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()"
        )
        .unwrap(),
        "t"
    );
    // localhost is in the certificate too.
    let by_name = verify_full.replace("host=127.0.0.1", "host=localhost hostaddr=127.0.0.1");
    assert_eq!(psql_conninfo(&by_name, "select 1").unwrap(), "1");

    // An unrelated CA is rejected.
    let wrong_ca = format!(
        "{} sslmode=verify-ca sslrootcert={}",
        cluster.tcp_conninfo("postgres"),
        tls.other_ca_cert.display()
    );
    let err = psql_conninfo(&wrong_ca, "select 1").unwrap_err();
    assert!(err.contains("certificate verify failed"), "{err}");

    // Client-certificate authentication (hba line from the test comes first).
    psql(&cluster, "create role certuser login");
    let (cert, key) = tls.client_cert_for("certuser");
    let cert_auth = format!(
        "{} sslmode=verify-full sslrootcert={} sslcert={} sslkey={}",
        cluster.tcp_conninfo("certuser"),
        tls.ca_cert.display(),
        cert.display(),
        key.display()
    );
    assert_eq!(
        psql_conninfo(&cert_auth, "select current_user").unwrap(),
        "certuser"
    );
    // Without a certificate, cert auth fails.
    let no_cert = format!("{} sslmode=require", cluster.tcp_conninfo("certuser"));
    assert!(psql_conninfo(&no_cert, "select 1").is_err());

    assert!(cluster.log().contains("database system is ready"));
}

#[test]
fn other_key_algorithms_work() {
    for alg in [KeyAlgorithm::EcdsaP384Sha384, KeyAlgorithm::Ed25519] {
        let cluster = Cluster::start(
            ClusterOptions::new()
                .tls(true)
                .tls_key_algorithm(alg)
                .hba("hostssl all certuser 127.0.0.1/32 cert"),
        );
        let tls = cluster.tls_files().unwrap();
        assert_eq!(tls.algorithm, alg);
        psql(&cluster, "create role certuser login");
        let (cert, key) = tls.client_cert_for("certuser");
        let conninfo = format!(
            "{} sslmode=verify-full sslrootcert={} sslcert={} sslkey={}",
            cluster.tcp_conninfo("certuser"),
            tls.ca_cert.display(),
            cert.display(),
            key.display()
        );
        assert_eq!(
            psql_conninfo(&conninfo, "select current_user").unwrap(),
            "certuser",
            "{alg:?}"
        );
    }
}

#[test]
fn two_clusters_at_once_get_different_ports() {
    let handles: Vec<_> = (0..2)
        .map(|_| std::thread::spawn(|| Cluster::start(ClusterOptions::new())))
        .collect();
    let clusters: Vec<Cluster> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_ne!(clusters[0].port(), clusters[1].port());
    assert_ne!(clusters[0].data_dir(), clusters[1].data_dir());
    for cluster in &clusters {
        assert_eq!(psql(cluster, "select 1"), "1");
        assert!(cluster.tls_files().is_none());
        assert_eq!(
            psql(cluster, "show port"),
            cluster.port().to_string(),
            "each server listens on its own port"
        );
    }
}

#[test]
fn restart_keeps_the_port_and_the_data() {
    let mut cluster = Cluster::start(ClusterOptions::new());
    psql(
        &cluster,
        "create table kept (x int); insert into kept values (42)",
    );
    let port = cluster.port();
    let pid = cluster.pid().unwrap();

    cluster.restart();
    assert_eq!(cluster.port(), port);
    assert_ne!(cluster.pid().unwrap(), pid);
    assert!(!process_alive(pid));
    assert_eq!(psql(&cluster, "select x from kept"), "42");

    cluster.stop();
    assert!(cluster.pid().is_none());
    assert!(!cluster
        .socket_dir()
        .join(format!(".s.PGSQL.{port}"))
        .exists());
    cluster.stop(); // stopping twice is harmless
    cluster.start_again();
    assert_eq!(cluster.port(), port);
    assert_eq!(psql(&cluster, "select x from kept"), "42");
}

#[test]
fn drop_kills_the_server_and_removes_the_directory() {
    let cluster = Cluster::start(ClusterOptions::new().data_checksums(false));
    assert_eq!(psql(&cluster, "show data_checksums"), "off");
    let pid = cluster.pid().unwrap();
    let base = cluster.base_dir().to_path_buf();
    assert!(cluster.data_dir().starts_with(&base));
    assert!(cluster.socket_dir().starts_with(&base));
    assert!(process_alive(pid));
    drop(cluster);
    assert!(!process_alive(pid), "postmaster {pid} still running");
    assert!(!base.exists(), "{} not removed", base.display());
}

#[test]
fn hba_lines_from_the_test_come_first() {
    let cluster = Cluster::start(ClusterOptions::new().hba("local all postgres reject"));
    let err = psql_conninfo(&cluster.unix_conninfo("postgres"), "select 1").unwrap_err();
    assert!(err.contains("pg_hba.conf rejects connection"), "{err}");
    // TCP still uses the default trust line.
    let tcp = format!("{} sslmode=disable", cluster.tcp_conninfo("postgres"));
    assert_eq!(psql_conninfo(&tcp, "select 1").unwrap(), "1");
}

#[test]
fn promote_ends_recovery() {
    let mut cluster = Cluster::start(ClusterOptions::new());
    cluster.stop();
    std::fs::write(cluster.data_dir().join("standby.signal"), "").unwrap();
    cluster.start_again();
    assert_eq!(psql(&cluster, "select pg_is_in_recovery()"), "t");
    cluster.promote();
    assert_eq!(psql(&cluster, "select pg_is_in_recovery()"), "f");
}

#[test]
fn startup_failure_panics_with_the_log() {
    let result = std::panic::catch_unwind(|| {
        Cluster::start(ClusterOptions::new().setting("shared_buffers", "not a size"))
    });
    let err = result.expect_err("a bad setting must make start panic");
    let message = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("exited during startup"), "{message}");
    assert!(message.contains("shared_buffers"), "{message}");
}

#[tokio::test]
async fn sql_helpers_use_our_client() {
    let cluster = Cluster::start(ClusterOptions::new());
    cluster
        .execute("create table t (x int); insert into t values (1), (2)")
        .await;
    assert_eq!(
        cluster.query_value("select sum(x) from t").await.as_deref(),
        Some("3")
    );
    assert_eq!(cluster.query_value("select null").await, None);
    let mut sql = cluster.sql().await;
    assert_eq!(sql.server_major(), cluster.major());
    let result = sql.query("select x from t order by x").await.unwrap();
    assert_eq!(
        result.rows,
        vec![vec![Some("1".to_string())], vec![Some("2".to_string())]]
    );
    sql.close().await.unwrap();
    let config = cluster.config("postgres");
    assert_eq!(config.ports, vec![cluster.port()]);
    // The data is also visible to psql.
    assert_eq!(psql(&cluster, "select count(*) from t"), "2");
}

#[tokio::test]
#[should_panic(expected = "SQL: select * from no_such_table")]
async fn execute_panics_naming_the_sql() {
    let cluster = Cluster::start(ClusterOptions::new());
    cluster.execute("select * from no_such_table").await;
}
