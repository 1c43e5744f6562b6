//! Drop-in front-ends for PostgreSQL's `pg_basebackup`, `pg_receivewal` and
//! `pg_verifybackup`: the same options, environment variables, output layouts, exit
//! statuses and error texts, as thin argument layers over the library calls that
//! `clone-standby` uses (so every file and WAL record is verified while it is written).
//!
//! Each tool is a module with a `main(args)` entry point; the binaries in `src/bin`
//! only call it. Parsing is pure ([`getopt`]) so that it can be tested without a server.

pub mod conn;
pub mod getopt;
pub mod pg_basebackup;
pub mod pg_receivewal;
pub mod pg_verifybackup;
pub mod report;
