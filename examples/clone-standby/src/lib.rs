//! The library behind the `clone-standby` command: checks of a primary, standby status,
//! and the standby configuration written after a clone.

pub mod check;
pub mod clone;
pub mod recovery;
pub mod status;
pub mod waltar;
