//! Physical WAL streaming (`START_REPLICATION`), WAL verification and a segment writer.

pub mod decode;
