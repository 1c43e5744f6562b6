//! `requirepeer` on a real server's Unix socket, compared with libpq 15 (Debian's
//! psql): the right OS user connects, any other is refused before anything is sent.

use std::os::unix::fs::MetadataExt;

use pgwire_repl::config::Config;
use pgwire_repl::SqlClient;
use testkit::oracle::Psql;
use testkit::{Cluster, ClusterOptions};

/// The OS user the server runs as: the owner of its data directory.
fn server_os_user(cluster: &Cluster) -> String {
    let uid = std::fs::metadata(cluster.data_dir()).unwrap().uid();
    let output = std::process::Command::new("id")
        .args(["-nu", &uid.to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

#[tokio::test]
async fn requirepeer_accepts_the_server_user_and_refuses_any_other_as_libpq_does() {
    let cluster = Cluster::start(ClusterOptions::new());
    let owner = server_os_user(&cluster);
    assert!(!owner.is_empty());
    let psql = Psql::libpq15();
    for (peer, should_connect) in [(owner.as_str(), true), ("nobody", false)] {
        let conninfo = format!(
            "{} dbname=postgres requirepeer={peer}",
            cluster.unix_conninfo(cluster.superuser())
        );
        let theirs = psql.run(&conninfo, "select 1", &[]);
        let ours = match SqlClient::connect(&Config::parse(&conninfo).unwrap()).await {
            Ok(client) => {
                let _ = client.close().await;
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        };
        assert_eq!(
            theirs.ok, should_connect,
            "libpq with requirepeer={peer}: {theirs:?}"
        );
        assert_eq!(
            ours.is_ok(),
            should_connect,
            "ours with requirepeer={peer}: {ours:?}"
        );
        if let Err(message) = ours {
            let expected = format!(
                "requirepeer specifies \"{peer}\", but actual peer user name is \"{owner}\""
            );
            assert!(message.contains(&expected), "{message}");
            assert!(theirs.stderr.contains(&expected), "{}", theirs.stderr);
        }
    }
}
