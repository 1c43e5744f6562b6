//! Throwaway real PostgreSQL clusters for tests.
//!
//! [`Cluster::start`] runs a real PostgreSQL server (13 to 18) in a temporary directory
//! and tears it down on drop. The binaries come from the `PGREPL_TEST_PG` environment
//! variable: a major version (`13`..`18`, default `15`), looked up in
//! `<cache>/postgres/<major>/bin` and then `/usr/lib/postgresql/<major>/bin`, or a path
//! to a binary directory. Missing binaries make the test panic, naming
//! `scripts/install-postgres.sh`: tests fail, they never skip.
//!
//! Environment variables:
//!
//! - `PGREPL_TEST_PG`: the major version or binary directory (see above).
//! - `PGREPL_CACHE_DIR`: the cache directory (default `/var/cache/pgrepl` as root, else
//!   `${XDG_CACHE_HOME:-$HOME/.cache}/pgrepl`); initdb templates are kept in
//!   `<cache>/templates`.
//! - `PGREPL_TEST_OS_USER`: the OS user that runs the server when the tests run as root
//!   (default `postgres`).
//! - `PGREPL_TEST_TMPDIR`: where each cluster's temporary directory is made (default
//!   `/tmp`). A tmpfs such as `/dev/shm` makes starts much faster where creating files
//!   is slow, but holds all data and WAL in memory.
//! - `PGREPL_TEST_KEEP=1`: keep each cluster's (and Garage store's) directory after the
//!   test.
//! - `PGREPL_TEST_NO_TEMPLATE=1`: run initdb for every cluster instead of copying a
//!   cached template.
//! - `PGREPL_GARAGE`: the Garage binary [`Garage`] runs (default
//!   `<cache>/garage/bin/garage`, then `garage` on `PATH`).
//!
//! [`patroni::PatroniCluster`] runs an etcd and Patroni nodes (Debian's packages, from
//! `scripts/install-test-tools.sh`) for the tests of replicas and receivers inside an
//! HA stack.
//!
//! [`Garage`] runs a throwaway Garage S3-compatible object store (one node or a small
//! replicated cluster) for the object-storage tests; its binary comes from
//! `scripts/install-garage.sh` (see [`garage`]).
//!
//! ```no_run
//! # async fn demo() {
//! let cluster = testkit::Cluster::start(testkit::ClusterOptions::new().tls(true));
//! cluster.execute("CREATE TABLE t (x int)").await;
//! assert_eq!(cluster.query_value("SELECT 1").await.as_deref(), Some("1"));
//! # }
//! ```

mod cluster;
mod env;
pub mod fake;
pub mod garage;
pub mod oracle;
pub mod patroni;
pub mod proxy;
mod standby;
mod template;
mod tls;

pub use cluster::{Cluster, ClusterOptions};
pub use env::{bin_dir_from_env, cache_dir, pg_major_from_env, DEFAULT_MAJOR};
pub use garage::Garage;
pub use standby::Standby;
pub use tls::{KeyAlgorithm, TlsFiles};
