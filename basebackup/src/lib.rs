//! Streams `BASE_BACKUP` from PostgreSQL 13–18 into a data directory or tar archives.
//!
//! Not yet implemented: this crate is filled by the basebackup issue. It exists so that
//! the workspace layout is final from the start.
