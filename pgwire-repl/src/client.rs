//! Thin async clients: a SQL session and a replication session.

use crate::config::Config;
use crate::error::{Error, Result};

/// Rows of a simple query, as text (`None` is SQL NULL).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueryResult {
    /// Column names from the RowDescription.
    pub columns: Vec<String>,
    /// Each row's values in text form.
    pub rows: Vec<Vec<Option<String>>>,
    /// The CommandComplete tag, e.g. `SELECT 1`.
    pub tag: String,
}

/// A plain SQL session using the simple-query protocol.
pub struct SqlClient {
    _private: (),
}

impl SqlClient {
    /// Connects a normal (non-replication) session.
    pub async fn connect(config: &Config) -> Result<SqlClient> {
        let _ = config;
        Err(Error::usage("not yet implemented", "wait"))
    }

    /// Runs one SQL statement and returns its rows.
    pub async fn query(&mut self, sql: &str) -> Result<QueryResult> {
        let _ = sql;
        Err(Error::usage("not yet implemented", "wait"))
    }

    /// Runs one or more statements, discarding rows.
    pub async fn batch(&mut self, sql: &str) -> Result<()> {
        let _ = sql;
        Err(Error::usage("not yet implemented", "wait"))
    }

    /// Runs a query that returns one row with one column, and returns that value.
    pub async fn query_value(&mut self, sql: &str) -> Result<Option<String>> {
        let _ = sql;
        Err(Error::usage("not yet implemented", "wait"))
    }

    /// The server's major version (13–18).
    pub fn server_major(&self) -> u32 {
        0
    }

    /// Ends the session with a Terminate message.
    pub async fn close(self) -> Result<()> {
        Ok(())
    }
}
