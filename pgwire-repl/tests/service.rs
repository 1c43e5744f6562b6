//! Service files (`service=`, PGSERVICE), compared with libpq 15 (Debian's psql) on a
//! real server: the look-up order (PGSERVICEFILE, ~/.pg_service.conf,
//! PGSYSCONFDIR/pg_service.conf), the precedence of the connection string over the
//! service and of the service over the environment, and the errors.

use std::path::Path;

use pgwire_repl::config::Config;
use pgwire_repl::SqlClient;
use testkit::oracle::Psql;
use testkit::{Cluster, ClusterOptions};

/// The port ours connects to, or the error text.
async fn ours(conninfo: &str, env: &[(&str, String)]) -> Result<String, String> {
    let mut config = Config::parse(conninfo).map_err(|e| e.to_string())?;
    config
        .apply_env(|name: &str| {
            env.iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| value.clone())
        })
        .map_err(|e| e.to_string())?;
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

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

#[tokio::test]
async fn service_files_resolve_as_libpq_resolves_them() {
    let psql = Psql::libpq15();
    let a = Cluster::start(ClusterOptions::new());
    let b = Cluster::start(ClusterOptions::new());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let section = |name: &str, server: &Cluster| {
        format!(
            "[{name}]\nhost={}\nport={}\nuser=postgres\ndbname=postgres\n",
            server.socket_dir().display(),
            server.port()
        )
    };
    // An explicit file, a home directory file and a system file, each naming the
    // services differently so that the winner shows in the port.
    let explicit = root.join("explicit.conf");
    write(
        &explicit,
        &format!(
            "# explicit\n{}{}",
            section("mysvc", &a),
            section("only_explicit", &b)
        ),
    );
    let home = root.join("home");
    write(
        &home.join(".pg_service.conf"),
        &format!("{}{}", section("mysvc", &b), section("only_home", &a)),
    );
    let sysconf = root.join("etc");
    write(
        &sysconf.join("pg_service.conf"),
        &format!(
            "{}{}[noport]\nhost={dir}\nuser=postgres\ndbname=postgres\n[broken]\nhost={dir}\nport {}\n[nested]\nservice=mysvc\n",
            section("mysvc", &b),
            section("only_sys", &a),
            a.port(),
            // [noport] leaves the port to the connection string or PGPORT.
            dir = a.socket_dir().display(),
        ),
    );
    let var = |name: &'static str, path: &Path| (name, path.display().to_string());
    let with_file = vec![
        var("PGSERVICEFILE", &explicit),
        var("HOME", &home),
        var("PGSYSCONFDIR", &sysconf),
    ];
    let with_home = vec![var("HOME", &home), var("PGSYSCONFDIR", &sysconf)];
    let empty_home = root.join("empty-home");
    std::fs::create_dir_all(&empty_home).unwrap();
    let system_only = vec![var("HOME", &empty_home), var("PGSYSCONFDIR", &sysconf)];
    let missing_file = vec![
        var("PGSERVICEFILE", &root.join("missing.conf")),
        var("HOME", &home),
        var("PGSYSCONFDIR", &sysconf),
    ];
    let mut pgservice = system_only.clone();
    pgservice.push(("PGSERVICE", "only_sys".to_string()));
    let mut pgport = system_only.clone();
    pgport.push(("PGPORT", a.port().to_string()));
    let mut pgport_and_service = system_only.clone();
    pgport_and_service.push(("PGPORT", "1".to_string()));

    type Env = Vec<(&'static str, String)>;
    let cases: Vec<(&str, String, &Env)> = vec![
        ("PGSERVICEFILE wins", "service=mysvc".into(), &with_file),
        (
            "then the system file",
            "service=only_sys".into(),
            &with_file,
        ),
        (
            "~/.pg_service.conf is skipped with PGSERVICEFILE",
            "service=only_home".into(),
            &with_file,
        ),
        (
            "~/.pg_service.conf without PGSERVICEFILE",
            "service=mysvc".into(),
            &with_home,
        ),
        ("home, then system", "service=only_sys".into(), &with_home),
        ("system only", "service=mysvc".into(), &system_only),
        (
            "a missing PGSERVICEFILE is an error",
            "service=mysvc".into(),
            &missing_file,
        ),
        (
            "the string beats the service",
            format!(
                "service=mysvc host={} port={}",
                a.socket_dir().display(),
                a.port()
            ),
            &system_only,
        ),
        (
            "the service beats PGPORT",
            "service=mysvc".into(),
            &pgport_and_service,
        ),
        (
            "PGPORT fills what the service leaves out",
            "service=noport".into(),
            &pgport,
        ),
        ("PGSERVICE", String::new(), &pgservice),
        (
            "the string's service beats PGSERVICE",
            "service=mysvc".into(),
            &pgservice,
        ),
        ("an unknown service", "service=nosuch".into(), &system_only),
        ("a syntax error", "service=broken".into(), &system_only),
        ("a nested service", "service=nested".into(), &system_only),
        ("an empty service name", "service=''".into(), &system_only),
        (
            "a URI",
            "postgresql:///?service=only_sys".into(),
            &system_only,
        ),
    ];
    let mut disagreements = Vec::new();
    let mut connected = 0;
    for (name, conninfo, env) in &cases {
        let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let libpq = psql.run(conninfo, "SHOW port", &env_refs);
        let mine = ours(conninfo, env).await;
        match (&mine, libpq.ok) {
            (Ok(port), true) if *port == libpq.stdout => connected += 1,
            (Err(error), false) => {
                let expected = libpq.stderr.lines().next().unwrap_or_default();
                let expected = expected.strip_prefix("psql: error: ").unwrap_or(expected);
                if !error.contains(expected) {
                    disagreements.push(format!(
                        "{name} ({conninfo}): libpq says {expected:?}, we say {error:?}"
                    ));
                }
            }
            _ => disagreements.push(format!(
                "{name} ({conninfo}): libpq {} / {}, we {mine:?}",
                libpq.stdout, libpq.stderr
            )),
        }
    }
    assert!(
        disagreements.is_empty(),
        "{} of {} cases disagree with libpq 15:\n{}",
        disagreements.len(),
        cases.len(),
        disagreements.join("\n")
    );
    assert!(connected >= 10, "only {connected} cases connected");
    eprintln!(
        "service: {} cases agree with libpq 15 ({connected} connect)",
        cases.len()
    );
}

#[tokio::test]
async fn a_service_error_names_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("svc.conf");
    write(&file, "[s]\nhost=/tmp\n\nsslmode=sometimes\n");
    let mut config = Config::parse("service=s").unwrap();
    let err = config
        .apply_env(|name: &str| match name {
            "PGSERVICEFILE" => Some(file.display().to_string()),
            _ => None,
        })
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("invalid sslmode value: \"sometimes\""),
        "{text}"
    );
    assert!(
        text.contains(&format!("\"{}\", line 4", file.display())),
        "{text}"
    );
    assert!(text.contains("what to do:"), "{text}");
}
