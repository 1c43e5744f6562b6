//! Physical replication slots.

use pgwire_repl::client::SlotOptions;
use pgwire_repl::ReplicationClient;

use crate::error::{Error, Result};

/// Creates a physical slot that reserves WAL at once (`RESERVE_WAL`), unless one with
/// that name exists already (SQLSTATE 42710, like pg_receivewal's `--if-not-exists`).
/// Returns true if it was created.
///
/// Cancel safety: as [`ReplicationClient`]'s commands, if the future is dropped the slot
/// may or may not exist, and the session stays usable.
///
/// ```no_run
/// # async fn demo() -> walstream::Result<()> {
/// let config = pgwire_repl::Config::parse_with_env("host=primary user=repl")?;
/// let mut client = pgwire_repl::ReplicationClient::connect(&config).await?;
/// let created = walstream::slot::create_physical_slot_if_not_exists(&mut client, "archive").await?;
/// # Ok(()) }
/// ```
pub async fn create_physical_slot_if_not_exists(
    client: &mut ReplicationClient,
    name: &str,
) -> Result<bool> {
    let options = SlotOptions {
        temporary: false,
        reserve_wal: true,
    };
    match client.create_physical_slot(name, options).await {
        Ok(_) => Ok(true),
        Err(err) if err.sqlstate() == Some("42710") => {
            tracing::info!(slot = name, "replication slot exists already");
            Ok(false)
        }
        Err(err) => Err(Error::from(err)),
    }
}

/// Drops a slot. With `wait`, waits until no other session uses it.
///
/// Cancel safety: as [`ReplicationClient`]'s commands, if the future is dropped the slot
/// may or may not be gone, and the session stays usable.
pub async fn drop_slot(client: &mut ReplicationClient, name: &str, wait: bool) -> Result<()> {
    client.drop_slot(name, wait).await.map_err(Error::from)
}
