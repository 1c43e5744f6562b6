//! Physical WAL streaming (`START_REPLICATION`), WAL verification and a segment writer.
//!
//! Not yet implemented: this crate is filled by the walstream issue. It exists so that
//! the workspace layout is final from the start.
