//! Side-by-side benchmarks of `clone-standby` against `pg_basebackup` and
//! `pg_receivewal` (the `compare` binary), plus criterion micro-benchmarks (`benches/`).
//!
//! The harness builds or reuses a persistent pgbench source cluster ([`cluster`]), runs
//! both tools alternately on each case ([`harness`]) measuring wall time, CPU and peak
//! RSS of the whole process tree ([`measure`]), measures the machine's limits in the
//! same run ([`limits`]), and renders markdown and JSON ([`report`]).
//!
//! The object-storage cases ([`repo`], `--cases repo-backup,repo-restore`) back up into
//! and restore from a local Garage S3 store, ours against pgBackRest and barman-cloud.
//! The WAL-archive cases ([`walbench`], `--cases wal-archive,sync-commit`) catch WAL up
//! into that store and measure commit latency with a synchronous receiver.
//!
//! The incremental case ([`incremental`], `--cases incremental`) takes a full and an
//! incremental backup of a PostgreSQL 18 cluster into Garage and restores the chain,
//! against pg_basebackup --incremental and pg_combinebackup followed by a copy.

pub mod cluster;
pub mod harness;
pub mod incremental;
pub mod limits;
pub mod machine;
pub mod measure;
pub mod repo;
pub mod report;
pub mod stats;
pub mod walbench;
