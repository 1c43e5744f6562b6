//! The pure protocol layer: no I/O, no clocks, no panics on peer data.

pub mod auth;
pub mod backend;
pub mod frontend;
pub mod replication;
pub mod startup;
