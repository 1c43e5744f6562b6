//! PostgreSQL replication-protocol connections for PostgreSQL 13–18.
//!
//! The crate has two layers:
//!
//! * a pure layer ([`proto`], [`types`], [`config`]) that encodes and decodes protocol
//!   messages over [`bytes`] buffers without doing I/O, so that fuzzers and property
//!   tests can drive it;
//! * a thin tokio layer ([`ReplicationClient`], [`SqlClient`]) that connects over TCP or a
//!   Unix socket, negotiates TLS with libpq's `sslmode` rules, authenticates, and runs
//!   replication commands.

pub mod client;
pub mod config;
pub mod connection;
pub mod error;
pub mod proto;
pub mod tls;
pub mod types;

pub use client::{IdentifySystem, QueryResult, ReplicationClient, SqlClient};
pub use config::Config;
pub use connection::{ConnectOptions, Connection};
pub use error::{DbError, Error, ErrorKind, Notice, Result};
pub use types::{Lsn, SystemId, TimelineId, WalSegmentSize};
