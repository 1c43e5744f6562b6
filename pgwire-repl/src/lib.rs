//! PostgreSQL replication-protocol connections for PostgreSQL 13–18.
//!
//! The crate has two layers:
//!
//! * a pure layer ([`proto`], [`types`], [`config`]) that encodes and decodes protocol
//!   messages over [`bytes`] buffers without doing I/O, so that fuzzers and property
//!   tests can drive it;
//! * a thin tokio layer ([`ReplicationClient`], [`SqlClient`]) that connects over TCP or a
//!   Unix socket, negotiates TLS with libpq's `sslmode` rules, authenticates, and runs
//!   replication commands. Connecting is split into socket, encryption, startup and
//!   authentication steps ([`connection`]); a connection can also run over a stream the
//!   caller opened ([`Connection::connect_over`]) and with the caller's own rustls
//!   configuration ([`ConnectOptions::tls_config`]).
//!
//! [`Bytes`] and [`BytesMut`] are re-exported: `CopyData` payloads arrive as [`Bytes`]
//! slices of the receive buffer, and messages are written into a [`BytesMut`].

pub mod client;
pub mod config;
pub mod connection;
pub mod error;
pub mod proto;
pub mod tls;
pub mod types;

pub use bytes::{Bytes, BytesMut};
pub use client::{IdentifySystem, QueryResult, ReplicationClient, SqlClient};
pub use config::Config;
pub use connection::{AsyncStream, ConnectOptions, Connection};
pub use error::{DbError, Error, ErrorKind, Notice, Result};
pub use types::{Lsn, SystemId, TimelineId, WalSegmentSize};
