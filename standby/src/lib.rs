//! Standbys as library calls: clone a primary (or a standby) into a verified,
//! ready-to-start standby, start it and wait until it has caught up, watch it, and
//! check a server before cloning. The `clone-standby` command is one user of this
//! crate; a Rust service embeds the same calls.
//!
//! * [`clone::clone`]: base backup and streamed WAL, both verified, with safe
//!   target directories and an honest clean-up on failure;
//! * [`start::start_standby`]: `pg_ctl start` and wait for catch-up;
//! * [`status`]: the upstream's position against the standby's, with the least
//!   privilege;
//! * [`check`]: can a server serve a standby, and what would fix it;
//! * [`recovery`]: the standby configuration `pg_basebackup -R` writes.
//!
//! ```no_run
//! # async fn demo() -> standby::Result<()> {
//! use standby::clone::{clone, CloneOptions, CloneEvent};
//! let source = pgwire_repl::Config::parse_with_env("host=primary user=replicator")?;
//! let options = CloneOptions::new(source.clone(), "/var/lib/postgresql/16/standby");
//! let events = Box::new(|event: CloneEvent| {
//!     if let CloneEvent::Progress { done, total } = event {
//!         eprintln!("{done} of {total:?} bytes");
//!     }
//! });
//! let summary = clone(options, events, std::future::pending())
//!     .await
//!     .map_err(|failure| failure.error)?;
//! let status = standby::start::start_standby(
//!     &standby::start::StartOptions::new("/var/lib/postgresql/16/standby"),
//!     &source,
//!     summary.server_major,
//! )
//! .await?;
//! println!("streaming, {} bytes behind", status.replay_lag().unwrap_or(0));
//! # Ok(()) }
//! ```

pub mod check;
pub mod clone;
mod error;
pub mod recovery;
pub mod start;
pub mod status;
pub mod waltar;

pub use error::{Error, ErrorKind, Result};
