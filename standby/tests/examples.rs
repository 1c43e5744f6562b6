//! The embedder examples, run against a real server (version from PGREPL_TEST_PG).

#[allow(dead_code)]
#[path = "../examples/clone_with_progress.rs"]
mod clone_with_progress;

use std::os::unix::fs::PermissionsExt;

use testkit::{Cluster, ClusterOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clone_example_makes_a_verified_standby_and_reports_progress() {
    let primary = Cluster::start(ClusterOptions::new());
    primary
        .execute(
            "CREATE TABLE t AS SELECT g, repeat('p', 500) AS pad FROM generate_series(1, 20000) g",
        )
        .await;
    let work = tempfile::Builder::new()
        .prefix("pgrepl-example-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let target = work.path().join("standby");
    let (summary, reports) = clone_with_progress::clone_with_progress(
        &primary.unix_conninfo(primary.superuser()),
        &target,
    )
    .await
    .unwrap_or_else(|e| panic!("the example failed: {e}"));
    assert!(reports >= 1, "the progress callback was called");
    assert!(summary.verified_files > 500, "{summary:?}");
    assert!(summary.end_lsn > summary.start_lsn, "{summary:?}");
    assert!(target.join("standby.signal").exists());
    // The library's verify agrees with the in-transfer checks.
    let manifest = basebackup::verify_backup(&target).unwrap();
    assert_eq!(manifest.files.len(), summary.verified_files);
}
