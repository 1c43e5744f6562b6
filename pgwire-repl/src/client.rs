//! Thin async clients: a SQL session and a physical replication session.

use bytes::Bytes;

use crate::config::{Config, ReplicationMode};
use crate::connection::{AsyncStream, ConnectOptions, Connection};
use crate::error::{Error, Result};
use crate::proto::backend::BackendMessage;
use crate::proto::frontend::{self, validate_slot_name};
use crate::types::{Lsn, SystemId, TimelineId, WalSegmentSize};

/// One result set of a simple query, as text (`None` is SQL NULL).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueryResult {
    /// Column names from the RowDescription.
    pub columns: Vec<String>,
    /// Each row's values in text form.
    pub rows: Vec<Vec<Option<String>>>,
    /// The CommandComplete tag, e.g. `SELECT 1`.
    pub tag: String,
}

/// One result set with raw values, for results that are not text (TIMELINE_HISTORY on 13).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct RawResult {
    columns: Vec<String>,
    rows: Vec<Vec<Option<Bytes>>>,
    tag: String,
}

/// Reads and drops the reply to a query whose call was cancelled (`unanswered`), up to
/// its ReadyForQuery, so that the connection is idle again.
async fn settle(conn: &mut Connection, unanswered: &mut bool) -> Result<()> {
    if !*unanswered {
        return Ok(());
    }
    // The query itself may still be partly in the send buffer.
    conn.flush().await?;
    loop {
        match conn.read_message().await? {
            BackendMessage::ReadyForQuery { .. } => break,
            BackendMessage::CopyInResponse(_)
            | BackendMessage::CopyOutResponse(_)
            | BackendMessage::CopyBothResponse(_) => {
                return Err(Error::usage(
                    "a cancelled command left the connection in COPY mode",
                    "drop this connection and connect again",
                ))
            }
            _ => {}
        }
    }
    *unanswered = false;
    Ok(())
}

/// Runs one simple query and collects every result set until ReadyForQuery.
///
/// An ErrorResponse fails the call, but only after ReadyForQuery, so the connection
/// stays usable. `unanswered` is true from the moment the query is queued until its
/// ReadyForQuery is read: if the call is cancelled in between, the next call first
/// drops the rest of that reply ([`settle`]).
async fn simple_query_raw(
    conn: &mut Connection,
    unanswered: &mut bool,
    sql: &str,
) -> Result<Vec<RawResult>> {
    settle(conn, unanswered).await?;
    frontend::query(sql, conn.write_buf())?;
    *unanswered = true;
    conn.flush().await?;
    let mut results = Vec::new();
    let mut current: Option<RawResult> = None;
    let mut error = None;
    loop {
        match conn.read_message().await? {
            BackendMessage::RowDescription(fields) => {
                current = Some(RawResult {
                    columns: fields.into_iter().map(|f| f.name).collect(),
                    ..RawResult::default()
                });
            }
            BackendMessage::DataRow(values) => match current.as_mut() {
                Some(result) if values.len() == result.columns.len() => result.rows.push(values),
                Some(result) => {
                    return Err(Error::protocol(format!(
                        "DataRow with {} values for {} columns",
                        values.len(),
                        result.columns.len()
                    )))
                }
                None => return Err(Error::protocol("DataRow before RowDescription")),
            },
            BackendMessage::CommandComplete { tag } => {
                let mut result = current.take().unwrap_or_default();
                result.tag = tag;
                results.push(result);
            }
            BackendMessage::EmptyQueryResponse => results.push(RawResult::default()),
            BackendMessage::ErrorResponse(db) => {
                let fatal = db.severity == "FATAL" || db.severity == "PANIC";
                let server_error = Error::server(format!("running {}", summarize(sql)), db);
                if fatal {
                    // The server closes the connection after a FATAL error: report it,
                    // not the end of the stream that follows.
                    return Err(server_error);
                }
                current = None;
                error = Some(server_error);
            }
            BackendMessage::ReadyForQuery { .. } => {
                *unanswered = false;
                break;
            }
            BackendMessage::CopyInResponse(_)
            | BackendMessage::CopyOutResponse(_)
            | BackendMessage::CopyBothResponse(_) => {
                return Err(Error::usage(
                    format!(
                        "{} started a COPY, which a simple query cannot handle",
                        summarize(sql)
                    ),
                    "use the streaming APIs (basebackup, walstream) for COPY commands",
                ));
            }
            other => {
                return Err(Error::protocol(format!(
                    "unexpected {} in reply to a simple query",
                    other.name()
                )))
            }
        }
    }
    match error {
        Some(error) => Err(error),
        None => Ok(results),
    }
}

fn summarize(sql: &str) -> String {
    let first_line = sql.lines().next().unwrap_or("");
    if first_line.len() > 80 || sql.lines().count() > 1 {
        let cut: String = first_line.chars().take(80).collect();
        format!("{cut:?}…")
    } else {
        format!("{first_line:?}")
    }
}

fn into_text(raw: RawResult) -> Result<QueryResult> {
    let mut rows = Vec::with_capacity(raw.rows.len());
    for row in raw.rows {
        let mut values = Vec::with_capacity(row.len());
        for value in row {
            values.push(match value {
                None => None,
                Some(bytes) => Some(String::from_utf8(bytes.to_vec()).map_err(|_| {
                    Error::protocol(
                        "the server sent a text value that is not UTF-8 (client_encoding is UTF8)",
                    )
                })?),
            });
        }
        rows.push(values);
    }
    Ok(QueryResult {
        columns: raw.columns,
        rows,
        tag: raw.tag,
    })
}

/// A plain SQL session using the simple-query protocol.
///
/// # Cancel safety
///
/// Every query method is cancel-safe in the sense that matters for a session: if the
/// future is dropped before it returns (a `select!` branch, a timeout), that query's
/// result is lost (the statement may or may not have run on the server), but the
/// session stays usable: the next call first reads and drops the rest of the abandoned
/// reply, so each call gets its own answer.
///
/// ```no_run
/// # async fn demo() -> pgwire_repl::Result<()> {
/// use pgwire_repl::{Config, SqlClient};
/// let config = Config::parse_with_env("host=db1 user=monitor dbname=postgres")?;
/// let mut sql = SqlClient::connect(&config).await?;
/// let lsn = sql.query_value("SELECT pg_current_wal_lsn()").await?;
/// println!("primary is at {lsn:?}");
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct SqlClient {
    conn: Connection,
    /// A query was sent whose ReadyForQuery has not been read (its call was cancelled).
    unanswered: bool,
}

impl SqlClient {
    /// Connects a normal (non-replication) session; `replication` in `config` is ignored.
    pub async fn connect(config: &Config) -> Result<SqlClient> {
        SqlClient::connect_with(config, &ConnectOptions::default()).await
    }

    /// Connects with extra options (notice handler, message limits).
    pub async fn connect_with(config: &Config, options: &ConnectOptions) -> Result<SqlClient> {
        let mut config = config.clone();
        if config.dbname.is_none() {
            config.dbname = Some("postgres".into());
        }
        let conn = Connection::connect(&config, ReplicationMode::Off, options).await?;
        Ok(SqlClient {
            conn,
            unanswered: false,
        })
    }

    /// Connects a normal session over a stream the caller opened; see
    /// [`Connection::connect_over`] for what changes when the stream is not this
    /// crate's own socket.
    ///
    /// ```no_run
    /// # async fn demo(stream: tokio::net::TcpStream) -> pgwire_repl::Result<()> {
    /// use pgwire_repl::{Config, ConnectOptions, SqlClient};
    /// let config = Config::parse_with_env("host=db1 user=monitor dbname=postgres")?;
    /// let mut sql = SqlClient::connect_over(stream, &config, &ConnectOptions::default()).await?;
    /// println!("{:?}", sql.query_value("SELECT version()").await?);
    /// # Ok(()) }
    /// ```
    pub async fn connect_over(
        stream: impl AsyncStream,
        config: &Config,
        options: &ConnectOptions,
    ) -> Result<SqlClient> {
        let mut config = config.clone();
        if config.dbname.is_none() {
            config.dbname = Some("postgres".into());
        }
        let conn = Connection::connect_over(stream, &config, ReplicationMode::Off, options).await?;
        Ok(SqlClient {
            conn,
            unanswered: false,
        })
    }

    /// Runs one SQL statement and returns its (last) result set.
    pub async fn query(&mut self, sql: &str) -> Result<QueryResult> {
        let results = simple_query_raw(&mut self.conn, &mut self.unanswered, sql).await?;
        into_text(results.into_iter().last().unwrap_or_default())
    }

    /// Runs one or more statements, discarding rows.
    pub async fn batch(&mut self, sql: &str) -> Result<()> {
        simple_query_raw(&mut self.conn, &mut self.unanswered, sql)
            .await
            .map(drop)
    }

    /// Runs a query that returns one row with one column, and returns that value.
    pub async fn query_value(&mut self, sql: &str) -> Result<Option<String>> {
        let result = self.query(sql).await?;
        match (result.rows.len(), result.columns.len()) {
            (1, 1) => Ok(result
                .rows
                .into_iter()
                .next()
                .and_then(|row| row.into_iter().next())
                .flatten()),
            (rows, columns) => Err(Error::usage(
                format!(
                    "{} returned {rows} rows of {columns} columns, expected one value",
                    summarize(sql)
                ),
                "use query() for results that are not a single value",
            )),
        }
    }

    /// The server's major version (13–18).
    pub fn server_major(&self) -> u32 {
        self.conn.server_major()
    }

    /// The underlying connection (TLS details, parameters, authentication method).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Ends the session with a Terminate message.
    pub async fn close(self) -> Result<()> {
        self.conn.close().await
    }
}

/// The answer to `IDENTIFY_SYSTEM`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentifySystem {
    /// The cluster's system identifier.
    pub system_id: SystemId,
    /// The current timeline (on a standby, the one it replays).
    pub timeline: TimelineId,
    /// The current WAL flush position.
    pub xlog_pos: Lsn,
    /// The database, for `replication=database` connections.
    pub dbname: Option<String>,
}

/// A timeline history file as returned by `TIMELINE_HISTORY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelineHistory {
    /// The file name, e.g. `00000002.history`.
    pub file_name: String,
    /// The file's raw bytes.
    pub content: Bytes,
}

/// Options for [`ReplicationClient::create_physical_slot`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlotOptions {
    /// Drop the slot when this session ends.
    pub temporary: bool,
    /// Reserve WAL at once (restart_lsn = the last checkpoint's redo point), so nothing
    /// needed later can be recycled.
    pub reserve_wal: bool,
}

/// A slot as reported by `READ_REPLICATION_SLOT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    /// `physical` (logical slots are an error on the server).
    pub slot_type: String,
    /// Where WAL is retained from, if reserved.
    pub restart_lsn: Option<Lsn>,
    /// The timeline of `restart_lsn`.
    pub restart_tli: Option<TimelineId>,
}

/// A physical replication session (`replication=true`).
///
/// # Cancel safety
///
/// The command methods are cancel-safe in the sense that matters for a session: if
/// the future is dropped before it returns, that command's result is lost (a slot may
/// or may not have been created), but the session stays usable, since the next call
/// first reads and drops the rest of the abandoned reply. Before handing the connection
/// to a streaming protocol ([`ReplicationClient::into_connection`],
/// [`ReplicationClient::connection`]) after a cancelled call, call
/// [`ReplicationClient::settle`]; `walstream::WalStream::start` does.
///
/// ```no_run
/// # async fn demo() -> pgwire_repl::Result<()> {
/// use pgwire_repl::{Config, ReplicationClient};
/// use pgwire_repl::client::SlotOptions;
///
/// let config = Config::parse_with_env("host=primary user=repl sslmode=verify-full sslrootcert=ca.crt")?;
/// let mut repl = ReplicationClient::connect(&config).await?;
/// let id = repl.identify_system().await?;
/// println!("system {} on timeline {} at {}", id.system_id, id.timeline, id.xlog_pos);
/// repl.create_physical_slot("standby1", SlotOptions { temporary: false, reserve_wal: true }).await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct ReplicationClient {
    conn: Connection,
    /// A command was sent whose ReadyForQuery has not been read (its call was
    /// cancelled).
    unanswered: bool,
}

impl ReplicationClient {
    /// Connects a physical walsender session.
    pub async fn connect(config: &Config) -> Result<ReplicationClient> {
        ReplicationClient::connect_with(config, &ConnectOptions::default()).await
    }

    /// Connects with extra options (notice handler, message limits).
    pub async fn connect_with(
        config: &Config,
        options: &ConnectOptions,
    ) -> Result<ReplicationClient> {
        let conn = Connection::connect(config, ReplicationMode::Physical, options).await?;
        Ok(ReplicationClient {
            conn,
            unanswered: false,
        })
    }

    /// Connects a physical walsender session over a stream the caller opened; see
    /// [`Connection::connect_over`] for what changes when the stream is not this
    /// crate's own socket.
    ///
    /// ```no_run
    /// # async fn demo(stream: tokio::net::TcpStream) -> pgwire_repl::Result<()> {
    /// use pgwire_repl::{Config, ConnectOptions, ReplicationClient};
    /// let config = Config::parse_with_env("host=primary user=repl sslmode=verify-full")?;
    /// let mut repl = ReplicationClient::connect_over(stream, &config, &ConnectOptions::default()).await?;
    /// println!("{}", repl.identify_system().await?.system_id);
    /// # Ok(()) }
    /// ```
    pub async fn connect_over(
        stream: impl AsyncStream,
        config: &Config,
        options: &ConnectOptions,
    ) -> Result<ReplicationClient> {
        let conn =
            Connection::connect_over(stream, config, ReplicationMode::Physical, options).await?;
        Ok(ReplicationClient {
            conn,
            unanswered: false,
        })
    }

    /// The server's major version (13–18).
    pub fn server_major(&self) -> u32 {
        self.conn.server_major()
    }

    /// The underlying connection, for streaming protocols built on top (BASE_BACKUP,
    /// START_REPLICATION).
    pub fn connection(&mut self) -> &mut Connection {
        &mut self.conn
    }

    /// Gives up the client, returning the connection. If a command's call was
    /// cancelled, call [`ReplicationClient::settle`] first, or the connection may still
    /// hold the rest of its reply.
    pub fn into_connection(self) -> Connection {
        self.conn
    }

    /// Reads and drops the rest of the reply to a command whose call was cancelled, if
    /// any, so that the connection is idle. Every command method does this first.
    ///
    /// ```no_run
    /// # async fn demo(mut repl: pgwire_repl::ReplicationClient) -> pgwire_repl::Result<()> {
    /// use std::time::Duration;
    /// // A command given up on after 10 ms…
    /// let _ = tokio::time::timeout(Duration::from_millis(10), repl.identify_system()).await;
    /// // …leaves its reply behind until the connection is settled.
    /// repl.settle().await?;
    /// let conn = repl.into_connection();
    /// # let _ = conn; Ok(()) }
    /// ```
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: if dropped, the next call settles what is left.
    pub async fn settle(&mut self) -> Result<()> {
        settle(&mut self.conn, &mut self.unanswered).await
    }

    /// Runs a replication command and returns its result sets with text values.
    pub async fn command(&mut self, command: &str) -> Result<Vec<QueryResult>> {
        simple_query_raw(&mut self.conn, &mut self.unanswered, command)
            .await?
            .into_iter()
            .map(into_text)
            .collect()
    }

    async fn single_row(&mut self, command: &str) -> Result<Vec<Option<String>>> {
        let results = self.command(command).await?;
        let Some(result) = results.into_iter().find(|r| !r.columns.is_empty()) else {
            return Err(Error::protocol(format!("{command} returned no result set")));
        };
        let column_count = result.columns.len();
        match <[Vec<Option<String>>; 1]>::try_from(result.rows) {
            Ok([row]) => Ok(row),
            Err(rows) => Err(Error::protocol(format!(
                "{command} returned {} rows of {column_count} columns, expected 1 row",
                rows.len()
            ))),
        }
    }

    /// `UPLOAD_MANIFEST` (PostgreSQL 17+): sends a parent backup's `backup_manifest`,
    /// so that the next `BASE_BACKUP (INCREMENTAL)` on this connection sends only what
    /// changed since that backup. The server checks the manifest (its system
    /// identifier, its WAL ranges) and answers with an error it explains.
    ///
    /// ```no_run
    /// # async fn demo(parent_manifest: Vec<u8>) -> pgwire_repl::Result<()> {
    /// let config = pgwire_repl::Config::parse_with_env("host=primary user=repl")?;
    /// let mut repl = pgwire_repl::ReplicationClient::connect(&config).await?;
    /// repl.upload_manifest(&parent_manifest).await?;
    /// // … then BASE_BACKUP ( INCREMENTAL, … ) on the same connection.
    /// # Ok(()) }
    /// ```
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: a call dropped while the manifest is being sent leaves the
    /// connection in COPY mode; drop the connection then.
    pub async fn upload_manifest(&mut self, manifest: &[u8]) -> Result<()> {
        if self.server_major() < 17 {
            return Err(Error::usage(
                format!(
                    "UPLOAD_MANIFEST needs PostgreSQL 17 or later; this server is {}",
                    self.server_major()
                ),
                "take a full backup, or upgrade the server for incremental backups",
            ));
        }
        settle(&mut self.conn, &mut self.unanswered).await?;
        frontend::query("UPLOAD_MANIFEST", self.conn.write_buf())?;
        self.unanswered = true;
        self.conn.flush().await?;
        let mut error = None;
        let mut sent = false;
        loop {
            match self.conn.read_message().await? {
                BackendMessage::CopyInResponse(_) if !sent => {
                    for chunk in manifest.chunks(64 * 1024) {
                        frontend::copy_data(chunk, self.conn.write_buf());
                        if self.conn.write_buf().len() >= 256 * 1024 {
                            self.conn.flush().await?;
                        }
                    }
                    frontend::copy_done(self.conn.write_buf());
                    self.conn.flush().await?;
                    sent = true;
                }
                BackendMessage::ErrorResponse(db) => {
                    let fatal = db.severity == "FATAL" || db.severity == "PANIC";
                    let server_error = Error::server("uploading the parent backup's manifest", db);
                    if fatal {
                        return Err(server_error);
                    }
                    error = Some(server_error);
                }
                BackendMessage::ReadyForQuery { .. } => {
                    self.unanswered = false;
                    break;
                }
                BackendMessage::CommandComplete { .. }
                | BackendMessage::RowDescription(_)
                | BackendMessage::DataRow(_) => {}
                other => {
                    return Err(Error::protocol(format!(
                        "unexpected {} in reply to UPLOAD_MANIFEST",
                        other.name()
                    )))
                }
            }
        }
        match (error, sent) {
            (Some(error), _) => Err(error),
            (None, true) => Ok(()),
            (None, false) => Err(Error::protocol(
                "the server accepted UPLOAD_MANIFEST without asking for the manifest",
            )),
        }
    }

    /// `IDENTIFY_SYSTEM`.
    pub async fn identify_system(&mut self) -> Result<IdentifySystem> {
        let row = self.single_row("IDENTIFY_SYSTEM").await?;
        let [system_id, timeline, xlog_pos, dbname] = <[Option<String>; 4]>::try_from(row)
            .map_err(|row| {
                Error::protocol(format!(
                    "IDENTIFY_SYSTEM returned {} columns, expected 4",
                    row.len()
                ))
            })?;
        Ok(IdentifySystem {
            system_id: SystemId(parse_field(system_id, "IDENTIFY_SYSTEM systemid")?),
            // int4 before 16, int8 from 16: parse the text either way.
            timeline: TimelineId(parse_field(timeline, "IDENTIFY_SYSTEM timeline")?),
            xlog_pos: parse_lsn(xlog_pos, "IDENTIFY_SYSTEM xlogpos")?,
            dbname,
        })
    }

    /// `SHOW name`: the setting's value as the server prints it (with units).
    pub async fn show(&mut self, name: &str) -> Result<String> {
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
            || name.is_empty()
        {
            return Err(Error::usage(
                format!("invalid setting name {name:?}"),
                "setting names contain only letters, digits, _ and .",
            ));
        }
        let row = self.single_row(&format!("SHOW {name}")).await?;
        row.into_iter()
            .next()
            .flatten()
            .ok_or_else(|| Error::protocol(format!("SHOW {name} returned no value")))
    }

    /// The WAL segment size, from `SHOW wal_segment_size`.
    pub async fn wal_segment_size(&mut self) -> Result<WalSegmentSize> {
        let value = self.show("wal_segment_size").await?;
        WalSegmentSize::parse_setting(&value)
    }

    /// `TIMELINE_HISTORY tli`: the history file of a timeline above 1 (timeline 1 has none).
    pub async fn timeline_history(&mut self, timeline: TimelineId) -> Result<TimelineHistory> {
        if timeline.0 < 2 {
            return Err(Error::usage(
                format!("timeline {timeline} has no history file"),
                "only timelines 2 and later have history files",
            ));
        }
        let command = format!("TIMELINE_HISTORY {}", timeline.0);
        // Raw values: PG13 types the content as bytea but sends the file's raw bytes.
        let results = simple_query_raw(&mut self.conn, &mut self.unanswered, &command).await?;
        let result = results
            .into_iter()
            .find(|r| r.columns.len() == 2)
            .ok_or_else(|| Error::protocol(format!("{command} returned no 2-column result")))?;
        let mut row = result
            .rows
            .into_iter()
            .next()
            .ok_or_else(|| Error::protocol(format!("{command} returned no row")))?
            .into_iter();
        let (Some(Some(name)), Some(Some(content))) = (row.next(), row.next()) else {
            return Err(Error::protocol(format!("{command} returned NULL values")));
        };
        let file_name = String::from_utf8(name.to_vec())
            .map_err(|_| Error::protocol("timeline history file name is not UTF-8"))?;
        if file_name != timeline.history_file_name() {
            return Err(Error::protocol(format!(
                "{command} returned file {file_name:?}, expected {}",
                timeline.history_file_name()
            )));
        }
        Ok(TimelineHistory { file_name, content })
    }

    /// `CREATE_REPLICATION_SLOT name [TEMPORARY] PHYSICAL [RESERVE_WAL]`, in the syntax
    /// the server's version takes. Returns the slot's consistent point (`0/0` for physical
    /// slots on every version).
    pub async fn create_physical_slot(&mut self, name: &str, options: SlotOptions) -> Result<Lsn> {
        validate_slot_name(name)?;
        let temporary = if options.temporary { " TEMPORARY" } else { "" };
        let command = match (options.reserve_wal, self.server_major() >= 15) {
            (false, _) => format!("CREATE_REPLICATION_SLOT {name}{temporary} PHYSICAL"),
            (true, true) => {
                format!("CREATE_REPLICATION_SLOT {name}{temporary} PHYSICAL (RESERVE_WAL)")
            }
            (true, false) => {
                format!("CREATE_REPLICATION_SLOT {name}{temporary} PHYSICAL RESERVE_WAL")
            }
        };
        let row = self.single_row(&command).await?;
        let mut values = row.into_iter();
        let slot_name = values.next().flatten().unwrap_or_default();
        if slot_name != name {
            return Err(Error::protocol(format!(
                "CREATE_REPLICATION_SLOT returned slot {slot_name:?}, expected {name:?}"
            )));
        }
        let consistent_point = values.next().flatten();
        match consistent_point {
            Some(text) => text
                .parse()
                .map_err(|_| Error::protocol(format!("invalid consistent_point {text:?}"))),
            None => Ok(Lsn::INVALID),
        }
    }

    /// `DROP_REPLICATION_SLOT name [WAIT]`. With `wait`, blocks until the slot is free
    /// instead of failing when another session uses it.
    pub async fn drop_slot(&mut self, name: &str, wait: bool) -> Result<()> {
        validate_slot_name(name)?;
        let command = format!(
            "DROP_REPLICATION_SLOT {name}{}",
            if wait { " WAIT" } else { "" }
        );
        self.command(&command).await.map(drop)
    }

    /// `READ_REPLICATION_SLOT name` (PostgreSQL 15+). `None` when the slot does not exist.
    pub async fn read_replication_slot(&mut self, name: &str) -> Result<Option<SlotInfo>> {
        validate_slot_name(name)?;
        if self.server_major() < 15 {
            return Err(Error::unsupported(
                "READ_REPLICATION_SLOT",
                15,
                self.server_major(),
            ));
        }
        let row = self
            .single_row(&format!("READ_REPLICATION_SLOT {name}"))
            .await?;
        let [slot_type, restart_lsn, restart_tli] =
            <[Option<String>; 3]>::try_from(row).map_err(|row| {
                Error::protocol(format!(
                    "READ_REPLICATION_SLOT returned {} columns, expected 3",
                    row.len()
                ))
            })?;
        let Some(slot_type) = slot_type else {
            return Ok(None);
        };
        Ok(Some(SlotInfo {
            slot_type,
            restart_lsn: restart_lsn
                .map(|t| parse_lsn(Some(t), "READ_REPLICATION_SLOT restart_lsn"))
                .transpose()?,
            restart_tli: restart_tli
                .map(|t| parse_field(Some(t), "READ_REPLICATION_SLOT restart_tli").map(TimelineId))
                .transpose()?,
        }))
    }

    /// Ends the session with a Terminate message.
    pub async fn close(self) -> Result<()> {
        self.conn.close().await
    }
}

fn parse_field<T: std::str::FromStr>(value: Option<String>, what: &str) -> Result<T> {
    let text = value.ok_or_else(|| Error::protocol(format!("{what} is NULL")))?;
    text.trim()
        .parse()
        .map_err(|_| Error::protocol(format!("cannot parse {what} {text:?}")))
}

fn parse_lsn(value: Option<String>, what: &str) -> Result<Lsn> {
    let text = value.ok_or_else(|| Error::protocol(format!("{what} is NULL")))?;
    text.parse()
        .map_err(|_| Error::protocol(format!("cannot parse {what} {text:?} as an LSN")))
}
