//! The pure (sans-IO) state machine of a `BASE_BACKUP` response.
//!
//! [`BackupResponse`] is fed every backend message the server sends after the
//! `BASE_BACKUP` command and says what happened, as [`BackupEvent`]s. It does no I/O, so
//! tests, fuzzers and other drivers use it with plain values; [`BaseBackup`] is a thin
//! async loop around it. It enforces every protocol rule the client relies on: the
//! result sets' shapes, the archive order (one archive per row of the tablespace list,
//! in its order, the base directory last), archive names and locations, the expected
//! compression, the manifest after the archives, and the final `CommandComplete` and
//! `ReadyForQuery`.
//!
//! Both framings:
//!
//! ```text
//!   StartRows ──T D C──► TablespaceRows ──T D* C──┬─ 13/14 ─► for each tablespace:
//!                                                 │             H, d*, c      (one archive)
//!                                                 │           then, with a manifest: H, d*, c
//!                                                 └─ 15+ ──► H, then CopyData sub-messages:
//!                                                              n (new archive), d (data),
//!                                                              p (progress), m (manifest
//!                                                              follows, after the archives)
//!                                                            then c
//!   ──► EndRows ──T D C──► Trailer ──C*──► Z: Done
//!   any state ──E──► Failed (and it stays failed)
//! ```
//!
//! [`BaseBackup`]: crate::BaseBackup

use std::collections::HashSet;

use bytes::Bytes;
use pgwire_repl::proto::backend::BackendMessage;
use pgwire_repl::{Lsn, TimelineId};

use crate::command::{BackupOptions, CompressionMethod, ManifestMode};
use crate::demux::{self, StreamMessage};
use crate::error::{Error, Result};
use crate::sink::{ArchiveInfo, Tablespace};

/// The most rows the tablespace list may have (a bound on what a hostile server can make
/// the client hold; real clusters have a handful).
pub const MAX_TABLESPACES: usize = 65_536;

/// Something that happened in a `BASE_BACKUP` response, in this order:
/// `Started`, `Tablespaces`, then for each archive `ArchiveStart`, any number of
/// `ArchiveData` and `Progress`, `ArchiveEnd`; then (when a manifest was asked for)
/// `ManifestStart` and any number of `ManifestData`; then `Ended` and `Done`.
/// `Progress` may also come between archives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupEvent {
    /// The server took its checkpoint: the backup starts here. WAL streaming on a second
    /// connection may begin from this position.
    Started {
        /// Where replay must begin.
        start_lsn: Lsn,
        /// The timeline at the start.
        timeline: TimelineId,
    },
    /// The tablespace list, base directory last (one archive follows per row, in order).
    Tablespaces(Vec<Tablespace>),
    /// An archive begins. On 13/14 its name is derived from the tablespace list.
    ArchiveStart(ArchiveInfo),
    /// Bytes of the current archive, as the server sent them (compressed when
    /// [`ArchiveInfo::compression`] is set): a slice of the receive buffer, no copy.
    ArchiveData(Bytes),
    /// 15+: the server's count of archive bytes sent so far (uncompressed).
    Progress(u64),
    /// The current archive is complete.
    ArchiveEnd,
    /// The backup manifest follows (after every archive).
    ManifestStart,
    /// Bytes of the manifest: a slice of the receive buffer, no copy.
    ManifestData(Bytes),
    /// The server stopped the backup: it is consistent once replay reaches `end_lsn`.
    Ended {
        /// The end of the WAL needed for consistency.
        end_lsn: Lsn,
        /// The timeline at the end.
        timeline: TimelineId,
    },
    /// `ReadyForQuery`: the command succeeded and the connection is idle. Only now is
    /// the backup complete from the server's side (an error may still come before it,
    /// such as `XX001` for page checksum failures).
    Done,
}

/// The events one message produced: none, one or two (the 15+ `n` and `m` sub-messages
/// end the previous archive and start the next part). An iterator, without allocation.
#[derive(Debug, Default)]
pub struct Events {
    first: Option<BackupEvent>,
    second: Option<BackupEvent>,
}

impl Events {
    fn none() -> Events {
        Events::default()
    }

    fn one(event: BackupEvent) -> Events {
        Events {
            first: Some(event),
            second: None,
        }
    }

    fn two(first: Option<BackupEvent>, second: BackupEvent) -> Events {
        match first {
            Some(first) => Events {
                first: Some(first),
                second: Some(second),
            },
            None => Events::one(second),
        }
    }

    /// True when the message produced no event.
    pub fn is_empty(&self) -> bool {
        self.first.is_none() && self.second.is_none()
    }
}

impl Iterator for Events {
    type Item = BackupEvent;

    fn next(&mut self) -> Option<BackupEvent> {
        self.first.take().or_else(|| self.second.take())
    }
}

/// Where a 15+ copy is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    BeforeFirstArchive,
    Archive,
    Manifest,
}

/// Which result set is being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowsOf {
    Start,
    Tablespaces,
    End,
}

impl RowsOf {
    fn what(self) -> &'static str {
        match self {
            RowsOf::Start => "the start position",
            RowsOf::Tablespaces => "the tablespace list",
            RowsOf::End => "the end position",
        }
    }

    fn columns(self) -> usize {
        match self {
            RowsOf::Start | RowsOf::End => 2,
            RowsOf::Tablespaces => 3,
        }
    }

    fn max_rows(self) -> usize {
        match self {
            RowsOf::Start | RowsOf::End => 1,
            RowsOf::Tablespaces => MAX_TABLESPACES,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a result set; `described` once its RowDescription came.
    Rows {
        of: RowsOf,
        described: bool,
    },
    /// 13/14: waiting for the CopyOutResponse of archive `archives_started`.
    ArchiveCopyStart,
    /// 13/14: inside the copy of the current archive.
    ArchiveCopy,
    /// 13/14: waiting for the manifest's CopyOutResponse.
    ManifestCopyStart,
    /// 13/14: inside the manifest's copy.
    ManifestCopy,
    /// 15+: waiting for the one CopyOutResponse.
    CopyStart,
    /// 15+: inside the one copy.
    Copy(Part),
    /// After the end position: CommandComplete until ReadyForQuery.
    Trailer,
    Done,
    Failed,
}

/// The state machine of one `BASE_BACKUP` response. See the module documentation.
///
/// ```
/// use basebackup::protocol::{BackupEvent, BackupResponse};
/// use basebackup::BackupOptions;
/// use bytes::Bytes;
/// use pgwire_repl::proto::backend::{BackendMessage, FieldDescription};
///
/// let column = |name: &str| FieldDescription {
///     name: name.into(), table_oid: 0, column_id: 0, type_oid: 25,
///     type_size: -1, type_modifier: -1, format: 0,
/// };
/// let mut response = BackupResponse::new(16, &BackupOptions::default());
/// let messages = [
///     BackendMessage::RowDescription(vec![column("recptr"), column("tli")]),
///     BackendMessage::DataRow(vec![Some(Bytes::from("0/2000028")), Some(Bytes::from("1"))]),
///     BackendMessage::CommandComplete { tag: "SELECT".into() },
/// ];
/// let mut events = Vec::new();
/// for message in messages {
///     events.extend(response.handle(message).unwrap());
/// }
/// assert_eq!(
///     events,
///     [BackupEvent::Started { start_lsn: "0/2000028".parse().unwrap(), timeline: pgwire_repl::TimelineId(1) }]
/// );
/// assert_eq!(response.start(), Some(("0/2000028".parse().unwrap(), pgwire_repl::TimelineId(1))));
/// ```
#[derive(Debug, Clone)]
pub struct BackupResponse {
    state: State,
    legacy: bool,
    manifest_expected: bool,
    compression: Option<CompressionMethod>,
    /// The DataRows of the result set being read.
    rows: Vec<Vec<Option<Bytes>>>,
    start: Option<(Lsn, TimelineId)>,
    end: Option<(Lsn, TimelineId)>,
    tablespaces: Option<Vec<Tablespace>>,
    archives_started: usize,
    bytes_done: u64,
}

impl BackupResponse {
    /// A machine for a `BASE_BACKUP` sent with `options` to a server of major version
    /// `server_major` (13/14 and 15+ frame the response differently).
    pub fn new(server_major: u32, options: &BackupOptions) -> BackupResponse {
        BackupResponse {
            state: State::Rows {
                of: RowsOf::Start,
                described: false,
            },
            legacy: server_major < 15,
            manifest_expected: options.manifest != ManifestMode::No,
            compression: options.compression.map(|c| c.method),
            rows: Vec::new(),
            start: None,
            end: None,
            tablespaces: None,
            archives_started: 0,
            bytes_done: 0,
        }
    }

    /// The start position and timeline, once [`BackupEvent::Started`] was produced.
    pub fn start(&self) -> Option<(Lsn, TimelineId)> {
        self.start
    }

    /// The end position and timeline, once [`BackupEvent::Ended`] was produced.
    pub fn end(&self) -> Option<(Lsn, TimelineId)> {
        self.end
    }

    /// The tablespace list, once [`BackupEvent::Tablespaces`] was produced.
    pub fn tablespaces(&self) -> Option<&[Tablespace]> {
        self.tablespaces.as_deref()
    }

    /// How many archives have started.
    pub fn archives_started(&self) -> usize {
        self.archives_started
    }

    /// Archive bytes sent so far: on 15+ the server's last progress report
    /// (uncompressed), on 13/14 the bytes received.
    pub fn bytes_done(&self) -> u64 {
        self.bytes_done
    }

    /// True between the first CopyOutResponse and the end of the last copy: the server
    /// is streaming and should never pause for long.
    pub fn is_copying(&self) -> bool {
        matches!(
            self.state,
            State::ArchiveCopyStart
                | State::ArchiveCopy
                | State::ManifestCopyStart
                | State::ManifestCopy
                | State::CopyStart
                | State::Copy(_)
        )
    }

    /// True once the response is over: [`BackupEvent::Done`] was produced, or an error.
    /// Nothing more is accepted then.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done | State::Failed)
    }

    /// True after an error.
    pub fn is_failed(&self) -> bool {
        self.state == State::Failed
    }

    /// Feeds one backend message and returns the events it produced.
    ///
    /// `NoticeResponse`, `ParameterStatus` and `NotificationResponse` produce nothing
    /// (a driver delivers notices itself, as [`pgwire_repl::Connection::read_message`]
    /// does). Any error ends the response: the machine then refuses every further
    /// message, so a caller can never be handed a clean end after a failure.
    pub fn handle(&mut self, message: BackendMessage) -> Result<Events> {
        let result = self.handle_message(message);
        if result.is_err() {
            self.state = State::Failed;
        }
        result
    }

    fn handle_message(&mut self, message: BackendMessage) -> Result<Events> {
        match message {
            BackendMessage::NoticeResponse(_)
            | BackendMessage::ParameterStatus { .. }
            | BackendMessage::NotificationResponse { .. } => return Ok(Events::none()),
            BackendMessage::ErrorResponse(db) => return Err(self.server_error(db)),
            _ => {}
        }
        match (self.state, message) {
            (State::Rows { of, described }, message) => self.rows(of, described, message),

            // 13/14: one copy per archive, then the manifest's.
            (State::ArchiveCopyStart, BackendMessage::CopyOutResponse(_)) => {
                let tablespace = self
                    .tablespaces
                    .as_ref()
                    .and_then(|t| t.get(self.archives_started))
                    .cloned()
                    .ok_or_else(|| Error::protocol("a copy beyond the tablespace list"))?;
                let name = match tablespace.oid {
                    Some(oid) => format!("{oid}.tar"),
                    None => "base.tar".to_owned(),
                };
                self.archives_started += 1;
                self.state = State::ArchiveCopy;
                Ok(Events::one(BackupEvent::ArchiveStart(ArchiveInfo {
                    name,
                    tablespace,
                    compression: None,
                })))
            }
            (State::ArchiveCopy, BackendMessage::CopyData(data)) => {
                self.bytes_done = self.bytes_done.saturating_add(data.len() as u64);
                Ok(Events::one(BackupEvent::ArchiveData(data)))
            }
            (State::ArchiveCopy, BackendMessage::CopyDone) => {
                self.state = if self.archives_started < self.tablespace_count() {
                    State::ArchiveCopyStart
                } else if self.manifest_expected {
                    State::ManifestCopyStart
                } else {
                    self.end_rows()
                };
                Ok(Events::one(BackupEvent::ArchiveEnd))
            }
            (State::ManifestCopyStart, BackendMessage::CopyOutResponse(_)) => {
                self.state = State::ManifestCopy;
                Ok(Events::one(BackupEvent::ManifestStart))
            }
            (State::ManifestCopyStart, BackendMessage::RowDescription(_)) => Err(no_manifest()),
            (State::ManifestCopy, BackendMessage::CopyData(data)) => {
                Ok(Events::one(BackupEvent::ManifestData(data)))
            }
            (State::ManifestCopy, BackendMessage::CopyDone) => {
                self.state = self.end_rows();
                Ok(Events::none())
            }

            // 15+: one copy with sub-messages.
            (State::CopyStart, BackendMessage::CopyOutResponse(_)) => {
                self.state = State::Copy(Part::BeforeFirstArchive);
                Ok(Events::none())
            }
            (State::Copy(part), BackendMessage::CopyData(payload)) => {
                self.sub_message(part, payload)
            }
            (State::Copy(part), BackendMessage::CopyDone) => {
                if self.archives_started != self.tablespace_count() {
                    return Err(Error::protocol(format!(
                        "the server sent {} archives, its tablespace list has {}",
                        self.archives_started,
                        self.tablespace_count()
                    )));
                }
                if self.manifest_expected && part != Part::Manifest {
                    return Err(no_manifest());
                }
                self.state = self.end_rows();
                Ok(match part {
                    Part::Archive => Events::one(BackupEvent::ArchiveEnd),
                    _ => Events::none(),
                })
            }

            (State::Trailer, BackendMessage::CommandComplete { .. }) => Ok(Events::none()),
            (State::Trailer, BackendMessage::ReadyForQuery { .. }) => {
                self.state = State::Done;
                Ok(Events::one(BackupEvent::Done))
            }

            (state, other) => Err(Error::protocol(format!(
                "unexpected {} from the server {}",
                other.name(),
                match state {
                    State::Rows { of, .. } => format!("while reading {} of BASE_BACKUP", of.what()),
                    State::ArchiveCopyStart | State::CopyStart =>
                        "where the archive copy (CopyOutResponse) should start".to_owned(),
                    State::ArchiveCopy | State::Copy(Part::Archive | Part::BeforeFirstArchive) =>
                        "in the middle of the archive copy".to_owned(),
                    State::ManifestCopyStart =>
                        "where the manifest copy (CopyOutResponse) should start".to_owned(),
                    State::ManifestCopy | State::Copy(Part::Manifest) =>
                        "in the middle of the manifest copy".to_owned(),
                    State::Trailer =>
                        "after the end position (expected CommandComplete or ReadyForQuery)"
                            .to_owned(),
                    State::Done => "after BASE_BACKUP completed".to_owned(),
                    State::Failed => "after the backup already failed".to_owned(),
                }
            ))),
        }
    }

    fn tablespace_count(&self) -> usize {
        self.tablespaces.as_ref().map_or(0, Vec::len)
    }

    fn end_rows(&self) -> State {
        State::Rows {
            of: RowsOf::End,
            described: false,
        }
    }

    fn server_error(&self, db: pgwire_repl::DbError) -> Error {
        let context = match self.state {
            State::Rows {
                of: RowsOf::Start, ..
            } => "BASE_BACKUP failed (the start position)",
            State::Rows {
                of: RowsOf::Tablespaces,
                ..
            } => "BASE_BACKUP failed (the tablespace list)",
            State::ManifestCopy | State::Copy(Part::Manifest) => {
                "BASE_BACKUP failed sending the manifest"
            }
            State::Rows {
                of: RowsOf::End, ..
            }
            | State::Trailer => "BASE_BACKUP failed at the end",
            _ => "BASE_BACKUP failed during the transfer",
        };
        let checksum_failure = db.code == "XX001";
        let error: Error = pgwire_repl::Error::server(context, db).into();
        if checksum_failure {
            error.with_advice(
                "the server found damaged data pages (see the WARNINGs in its log); repair or restore the damaged relations before taking a backup, or turn off verify_checksums to copy them as they are",
            )
        } else {
            error
        }
    }

    /// A message of a result set.
    fn rows(&mut self, of: RowsOf, described: bool, message: BackendMessage) -> Result<Events> {
        match (described, message) {
            (false, BackendMessage::RowDescription(fields)) => {
                if fields.len() != of.columns() {
                    return Err(Error::protocol(format!(
                        "{} has {} columns, expected {}",
                        of.what(),
                        fields.len(),
                        of.columns()
                    )));
                }
                self.rows.clear();
                self.state = State::Rows {
                    of,
                    described: true,
                };
                Ok(Events::none())
            }
            (true, BackendMessage::DataRow(row)) => {
                if row.len() != of.columns() {
                    return Err(Error::protocol(format!(
                        "a row of {} has {} values, expected {}",
                        of.what(),
                        row.len(),
                        of.columns()
                    )));
                }
                if self.rows.len() >= of.max_rows() {
                    return Err(Error::protocol(format!(
                        "{} has more than {} rows",
                        of.what(),
                        of.max_rows()
                    )));
                }
                self.rows.push(row);
                Ok(Events::none())
            }
            (true, BackendMessage::CommandComplete { .. }) => {
                let rows = std::mem::take(&mut self.rows);
                match of {
                    RowsOf::Start => {
                        let (lsn, timeline) = position(&rows, "start")?;
                        self.start = Some((lsn, timeline));
                        self.state = State::Rows {
                            of: RowsOf::Tablespaces,
                            described: false,
                        };
                        Ok(Events::one(BackupEvent::Started {
                            start_lsn: lsn,
                            timeline,
                        }))
                    }
                    RowsOf::Tablespaces => {
                        let list = tablespaces(&rows)?;
                        self.tablespaces = Some(list.clone());
                        self.state = if self.legacy {
                            State::ArchiveCopyStart
                        } else {
                            State::CopyStart
                        };
                        Ok(Events::one(BackupEvent::Tablespaces(list)))
                    }
                    RowsOf::End => {
                        let (lsn, timeline) = position(&rows, "end")?;
                        self.end = Some((lsn, timeline));
                        self.state = State::Trailer;
                        Ok(Events::one(BackupEvent::Ended {
                            end_lsn: lsn,
                            timeline,
                        }))
                    }
                }
            }
            (_, other) => Err(Error::protocol(format!(
                "expected {} ({}), got {}",
                of.what(),
                if described {
                    "DataRow or CommandComplete"
                } else {
                    "RowDescription"
                },
                other.name()
            ))),
        }
    }

    /// A 15+ CopyData sub-message.
    fn sub_message(&mut self, part: Part, payload: Bytes) -> Result<Events> {
        match demux::parse(payload)? {
            StreamMessage::NewArchive { name, location } => {
                if part == Part::Manifest {
                    return Err(Error::protocol(format!(
                        "archive {name:?} after the manifest (archives must come first)"
                    )));
                }
                let tablespace = self
                    .tablespaces
                    .as_ref()
                    .and_then(|t| t.get(self.archives_started))
                    .cloned()
                    .ok_or_else(|| {
                        Error::protocol(format!(
                            "archive {name:?} is not in the tablespace list (it has {} rows)",
                            self.tablespace_count()
                        ))
                    })?;
                if tablespace.location.as_deref().unwrap_or("") != location {
                    return Err(Error::protocol(format!(
                        "archive {name} has location {location:?}, the tablespace list says {:?}",
                        tablespace.location
                    )));
                }
                let compression = [
                    CompressionMethod::Gzip,
                    CompressionMethod::Lz4,
                    CompressionMethod::Zstd,
                ]
                .into_iter()
                .find(|m| name.ends_with(m.suffix()));
                if compression != self.compression
                    || !name
                        .trim_end_matches(compression.map_or("", |m| m.suffix()))
                        .ends_with(".tar")
                {
                    return Err(Error::protocol(format!(
                        "unexpected archive name {name:?} (expected a .tar archive{})",
                        match self.compression {
                            Some(m) => format!(" compressed as {}", m.suffix()),
                            None => " without compression".to_owned(),
                        }
                    )));
                }
                self.archives_started += 1;
                self.state = State::Copy(Part::Archive);
                let previous_end = (part == Part::Archive).then_some(BackupEvent::ArchiveEnd);
                Ok(Events::two(
                    previous_end,
                    BackupEvent::ArchiveStart(ArchiveInfo {
                        name,
                        tablespace,
                        compression,
                    }),
                ))
            }
            StreamMessage::Data(data) => match part {
                Part::BeforeFirstArchive => {
                    Err(Error::protocol("archive data before the first archive"))
                }
                Part::Archive => Ok(Events::one(BackupEvent::ArchiveData(data))),
                Part::Manifest => Ok(Events::one(BackupEvent::ManifestData(data))),
            },
            StreamMessage::Progress(done) => {
                self.bytes_done = self.bytes_done.max(done);
                Ok(Events::one(BackupEvent::Progress(done)))
            }
            StreamMessage::Manifest => {
                if !self.manifest_expected {
                    return Err(Error::protocol(
                        "the server sent a manifest that was not asked for",
                    ));
                }
                if part == Part::Manifest {
                    return Err(Error::protocol("the server started the manifest twice"));
                }
                if self.archives_started != self.tablespace_count() {
                    return Err(Error::protocol(format!(
                        "the manifest came after {} archives, the tablespace list has {} (archives must come first)",
                        self.archives_started,
                        self.tablespace_count()
                    )));
                }
                self.state = State::Copy(Part::Manifest);
                let previous_end = (part == Part::Archive).then_some(BackupEvent::ArchiveEnd);
                Ok(Events::two(previous_end, BackupEvent::ManifestStart))
            }
        }
    }
}

fn no_manifest() -> Error {
    Error::verify("backup_manifest", "the server sent no manifest")
}

fn text<'a>(row: &'a [Option<Bytes>], column: usize, what: &str) -> Result<Option<&'a str>> {
    match row.get(column) {
        None | Some(None) => Ok(None),
        Some(Some(b)) => std::str::from_utf8(b)
            .map(Some)
            .map_err(|_| Error::protocol(format!("{what} is not UTF-8"))),
    }
}

/// The one row of a start or end position result set: `(recptr, tli)`.
fn position(rows: &[Vec<Option<Bytes>>], what: &str) -> Result<(Lsn, TimelineId)> {
    let row = rows
        .first()
        .ok_or_else(|| Error::protocol(format!("no row with the {what} position")))?;
    let lsn_text = text(row, 0, what)?;
    let lsn: Lsn = lsn_text
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::protocol(format!("invalid {what} LSN {lsn_text:?}")))?;
    let tli_text = text(row, 1, what)?;
    let tli = tli_text
        .and_then(|s| s.parse::<u32>().ok())
        .filter(|t| *t > 0)
        .ok_or_else(|| Error::protocol(format!("invalid {what} timeline {tli_text:?}")))?;
    Ok((lsn, TimelineId(tli)))
}

/// The tablespace list: `(spcoid, spclocation, size in kB)` rows, base directory last.
fn tablespaces(rows: &[Vec<Option<Bytes>>]) -> Result<Vec<Tablespace>> {
    let mut list = Vec::with_capacity(rows.len());
    let mut oids = HashSet::new();
    for (index, row) in rows.iter().enumerate() {
        let oid = text(row, 0, "spcoid")?
            .map(|s| {
                s.parse::<u32>()
                    .map_err(|_| Error::protocol(format!("invalid tablespace OID {s:?}")))
            })
            .transpose()?;
        let location = text(row, 1, "spclocation")?.map(str::to_owned);
        let size_estimate = text(row, 2, "size")?
            .and_then(|s| s.parse::<u64>().ok())
            .map(|kb| kb.saturating_mul(1024));
        match oid {
            None if index + 1 != rows.len() => {
                return Err(Error::protocol(
                    "the tablespace list has the base directory before its end",
                ))
            }
            Some(oid) if !oids.insert(oid) => {
                return Err(Error::protocol(format!(
                    "the tablespace list names tablespace {oid} twice"
                )))
            }
            _ => {}
        }
        list.push(Tablespace {
            oid,
            location,
            size_estimate,
        });
    }
    if list.last().is_none_or(|t| t.oid.is_some()) {
        return Err(Error::protocol(
            "the tablespace list does not end with the base directory",
        ));
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use pgwire_repl::proto::backend::{CopyResponse, FieldDescription};
    use pgwire_repl::DbError;

    fn column(name: &str) -> FieldDescription {
        FieldDescription {
            name: name.into(),
            table_oid: 0,
            column_id: 0,
            type_oid: 25,
            type_size: -1,
            type_modifier: -1,
            format: 0,
        }
    }

    fn row(cells: &[Option<&str>]) -> BackendMessage {
        BackendMessage::DataRow(
            cells
                .iter()
                .map(|c| c.map(|t| Bytes::copy_from_slice(t.as_bytes())))
                .collect(),
        )
    }

    fn complete() -> BackendMessage {
        BackendMessage::CommandComplete {
            tag: "SELECT".into(),
        }
    }

    fn copy_out() -> BackendMessage {
        BackendMessage::CopyOutResponse(CopyResponse {
            format: 0,
            column_formats: vec![],
        })
    }

    fn data(payload: &[u8]) -> BackendMessage {
        BackendMessage::CopyData(Bytes::copy_from_slice(payload))
    }

    /// A machine past the start position and a tablespace list of one tablespace
    /// (16385 at /srv/ts) and the base directory.
    fn opened(major: u32, options: &BackupOptions) -> BackupResponse {
        let mut r = BackupResponse::new(major, options);
        let mut events = Vec::new();
        for m in [
            BackendMessage::RowDescription(vec![column("recptr"), column("tli")]),
            row(&[Some("0/2000028"), Some("1")]),
            complete(),
            BackendMessage::RowDescription(vec![
                column("spcoid"),
                column("spclocation"),
                column("size"),
            ]),
            row(&[Some("16385"), Some("/srv/ts"), Some("4")]),
            row(&[None, None, Some("8")]),
            complete(),
        ] {
            events.extend(r.handle(m).unwrap());
        }
        assert_eq!(events.len(), 2);
        assert_eq!(
            r.tablespaces().unwrap()[0].size_estimate,
            Some(4096),
            "kB become bytes"
        );
        r
    }

    fn feed(r: &mut BackupResponse, messages: Vec<BackendMessage>) -> Result<Vec<BackupEvent>> {
        let mut events = Vec::new();
        for m in messages {
            events.extend(r.handle(m)?);
        }
        Ok(events)
    }

    #[test]
    fn a_new_archive_ends_the_previous_one_and_the_manifest_ends_the_last() {
        let mut r = opened(15, &BackupOptions::default());
        let events = feed(
            &mut r,
            vec![
                copy_out(),
                data(b"n16385.tar\0/srv/ts\0"),
                data(b"dab"),
                data(b"nbase.tar\0\0"),
                data(b"dcd"),
                data(b"m"),
                data(b"d{}"),
                BackendMessage::CopyDone,
            ],
        )
        .unwrap();
        let kinds: Vec<&str> = events
            .iter()
            .map(|e| match e {
                BackupEvent::ArchiveStart(_) => "start",
                BackupEvent::ArchiveData(_) => "data",
                BackupEvent::ArchiveEnd => "end",
                BackupEvent::ManifestStart => "manifest",
                BackupEvent::ManifestData(_) => "manifest data",
                _ => "other",
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "start",
                "data",
                "end",
                "start",
                "data",
                "end",
                "manifest",
                "manifest data"
            ]
        );
        assert!(!r.is_done() && !r.is_copying());
    }

    #[test]
    fn out_of_order_archives_and_manifests_are_refused() {
        let options = BackupOptions::default();
        for (case, messages, words) in [
            (
                "data before any archive",
                vec![copy_out(), data(b"dxx")],
                "before the first archive",
            ),
            (
                "archive in the wrong order",
                vec![copy_out(), data(b"nbase.tar\0\0")],
                "tablespace list says",
            ),
            (
                "manifest before the last archive",
                vec![copy_out(), data(b"n16385.tar\0/srv/ts\0"), data(b"m")],
                "archives must come first",
            ),
            (
                "an archive after the manifest",
                vec![
                    copy_out(),
                    data(b"n16385.tar\0/srv/ts\0"),
                    data(b"nbase.tar\0\0"),
                    data(b"m"),
                    data(b"nbase.tar\0\0"),
                ],
                "after the manifest",
            ),
            (
                "a third archive",
                vec![
                    copy_out(),
                    data(b"n16385.tar\0/srv/ts\0"),
                    data(b"nbase.tar\0\0"),
                    data(b"n16386.tar\0/x\0"),
                ],
                "not in the tablespace list",
            ),
            (
                "compressed although not asked",
                vec![copy_out(), data(b"n16385.tar.zst\0/srv/ts\0")],
                "without compression",
            ),
            (
                "too few archives",
                vec![
                    copy_out(),
                    data(b"n16385.tar\0/srv/ts\0"),
                    BackendMessage::CopyDone,
                ],
                "sent 1 archives, its tablespace list has 2",
            ),
        ] {
            let mut r = opened(16, &options);
            let e = feed(&mut r, messages).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Protocol, "{case}: {e}");
            assert!(e.to_string().contains(words), "{case}: {e}");
            assert!(r.is_failed());
            // Failed stays failed, even for what would have been valid.
            assert!(r.handle(BackendMessage::CopyDone).is_err(), "{case}");
        }
        // No manifest although asked for: the same error in both framings.
        let mut r = opened(15, &options);
        let e = feed(
            &mut r,
            vec![
                copy_out(),
                data(b"n16385.tar\0/srv/ts\0"),
                data(b"nbase.tar\0\0"),
                BackendMessage::CopyDone,
            ],
        )
        .unwrap_err();
        assert_eq!(
            (e.kind(), e.path()),
            (ErrorKind::Verify, Some("backup_manifest"))
        );
        let mut r = opened(14, &options);
        let e = feed(
            &mut r,
            vec![
                copy_out(),
                BackendMessage::CopyDone,
                copy_out(),
                BackendMessage::CopyDone,
                BackendMessage::RowDescription(vec![column("recptr"), column("tli")]),
            ],
        )
        .unwrap_err();
        assert_eq!(
            (e.kind(), e.path()),
            (ErrorKind::Verify, Some("backup_manifest"))
        );
    }

    #[test]
    fn the_13_14_framing_names_archives_from_the_list() {
        let mut r = opened(13, &BackupOptions::default());
        let events = feed(
            &mut r,
            vec![
                copy_out(),
                data(b"xyz"),
                BackendMessage::CopyDone,
                copy_out(),
            ],
        )
        .unwrap();
        let names: Vec<&str> = events
            .iter()
            .filter_map(|e| match e {
                BackupEvent::ArchiveStart(a) => Some(a.name.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(names, ["16385.tar", "base.tar"]);
        assert_eq!(r.bytes_done(), 3);
        assert!(r.is_copying());
    }

    #[test]
    fn server_errors_keep_their_fields_and_say_where() {
        let db = |code: &str| DbError {
            severity: "ERROR".into(),
            code: code.into(),
            message: "something".into(),
            detail: Some("the detail".into()),
            hint: Some("the hint".into()),
            ..DbError::default()
        };
        let mut r = opened(15, &BackupOptions::default());
        let e = feed(
            &mut r,
            vec![
                copy_out(),
                data(b"n16385.tar\0/srv/ts\0"),
                BackendMessage::ErrorResponse(db("58P01")),
            ],
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Server);
        assert!(e.message().contains("during the transfer"), "{e}");
        let fields = e.db_error().unwrap();
        assert_eq!(
            (
                fields.code.as_str(),
                fields.detail.as_deref(),
                fields.hint.as_deref()
            ),
            ("58P01", Some("the detail"), Some("the hint"))
        );
        assert!(!e.is_retryable());

        // XX001 after the end position: advice about damaged pages.
        let mut r = opened(
            14,
            &BackupOptions::default().manifest_checksums(crate::ChecksumAlgorithm::None),
        );
        let mut messages = vec![
            copy_out(),
            BackendMessage::CopyDone,
            copy_out(),
            BackendMessage::CopyDone,
        ];
        messages.extend([
            copy_out(),
            BackendMessage::CopyDone,
            BackendMessage::RowDescription(vec![column("recptr"), column("tli")]),
            row(&[Some("0/3000000"), Some("1")]),
            complete(),
            BackendMessage::ErrorResponse(db("XX001")),
        ]);
        let e = feed(&mut r, messages).unwrap_err();
        assert_eq!(e.sqlstate(), Some("XX001"));
        assert!(e.message().contains("at the end"), "{e}");
        assert!(e.advice().unwrap().contains("damaged data pages"), "{e}");
        assert_eq!(
            r.end().map(|(l, _)| l.to_string()).as_deref(),
            Some("0/3000000")
        );

        // A shutting-down server is worth retrying.
        let mut r = BackupResponse::new(15, &BackupOptions::default());
        let e = r
            .handle(BackendMessage::ErrorResponse(DbError {
                severity: "FATAL".into(),
                ..db("57P01")
            }))
            .unwrap_err();
        assert!(
            e.is_retryable() && e.message().contains("start position"),
            "{e}"
        );
    }

    #[test]
    fn result_sets_are_checked() {
        let start = |messages: Vec<BackendMessage>| {
            let mut r = BackupResponse::new(15, &BackupOptions::default());
            feed(&mut r, messages)
        };
        let desc = || BackendMessage::RowDescription(vec![column("recptr"), column("tli")]);
        for (case, messages, words) in [
            ("no rows", vec![desc(), complete()], "no row"),
            (
                "two rows",
                vec![
                    desc(),
                    row(&[Some("0/1"), Some("1")]),
                    row(&[Some("0/1"), Some("1")]),
                ],
                "more than 1 rows",
            ),
            (
                "three columns",
                vec![BackendMessage::RowDescription(vec![
                    column("a"),
                    column("b"),
                    column("c"),
                ])],
                "3 columns",
            ),
            (
                "bad LSN",
                vec![desc(), row(&[Some("zz"), Some("1")]), complete()],
                "invalid start LSN",
            ),
            (
                "timeline 0",
                vec![desc(), row(&[Some("0/1"), Some("0")]), complete()],
                "invalid start timeline",
            ),
            (
                "short row",
                vec![desc(), row(&[Some("0/1")])],
                "1 values, expected 2",
            ),
            (
                "data before the description",
                vec![row(&[Some("0/1"), Some("1")])],
                "got DataRow",
            ),
        ] {
            let e = start(messages).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Protocol, "{case}: {e}");
            assert!(e.to_string().contains(words), "{case}: {e}");
        }
        let mut r = BackupResponse::new(15, &BackupOptions::default());
        feed(
            &mut r,
            vec![desc(), row(&[Some("0/1"), Some("1")]), complete()],
        )
        .unwrap();
        let ts = || {
            BackendMessage::RowDescription(vec![
                column("spcoid"),
                column("spclocation"),
                column("size"),
            ])
        };
        for (case, rows, words) in [
            ("empty", vec![], "does not end with the base directory"),
            (
                "base first",
                vec![
                    row(&[None, None, None]),
                    row(&[Some("1"), Some("/a"), None]),
                ],
                "before its end",
            ),
            (
                "duplicate",
                vec![
                    row(&[Some("7"), Some("/a"), None]),
                    row(&[Some("7"), Some("/b"), None]),
                    row(&[None, None, None]),
                ],
                "twice",
            ),
            (
                "bad OID",
                vec![
                    row(&[Some("x"), Some("/a"), None]),
                    row(&[None, None, None]),
                ],
                "invalid tablespace OID",
            ),
        ] {
            let mut r = r.clone();
            let mut messages = vec![ts()];
            messages.extend(rows);
            messages.push(complete());
            let e = feed(&mut r, messages).unwrap_err();
            assert!(e.to_string().contains(words), "{case}: {e}");
        }
    }

    #[test]
    fn the_tablespace_list_is_bounded() {
        let mut r = BackupResponse::new(15, &BackupOptions::default());
        feed(
            &mut r,
            vec![
                BackendMessage::RowDescription(vec![column("recptr"), column("tli")]),
                row(&[Some("0/1"), Some("1")]),
                complete(),
                BackendMessage::RowDescription(vec![
                    column("spcoid"),
                    column("spclocation"),
                    column("size"),
                ]),
            ],
        )
        .unwrap();
        let mut failed = None;
        for i in 0..=MAX_TABLESPACES {
            if let Err(e) = r.handle(row(&[Some(&i.to_string()), Some("/a"), None])) {
                failed = Some((i, e));
                break;
            }
        }
        let (at, e) = failed.expect("an endless tablespace list was accepted");
        assert_eq!(at, MAX_TABLESPACES);
        assert!(e.to_string().contains("more than 65536 rows"), "{e}");
    }

    #[test]
    fn notices_are_ignored_and_done_accepts_nothing_more() {
        let mut r = opened(
            15,
            &BackupOptions {
                manifest: ManifestMode::No,
                ..BackupOptions::default()
            },
        );
        let events = feed(
            &mut r,
            vec![
                copy_out(),
                BackendMessage::NoticeResponse(DbError::default()),
                data(b"n16385.tar\0/srv/ts\0"),
                data(b"nbase.tar\0\0"),
                data(&[b'p', 0, 0, 0, 0, 0, 0, 4, 0]),
                BackendMessage::CopyDone,
                BackendMessage::RowDescription(vec![column("recptr"), column("tli")]),
                row(&[Some("0/3000000"), Some("1")]),
                complete(),
                BackendMessage::CommandComplete {
                    tag: "BASE_BACKUP".into(),
                },
                BackendMessage::ReadyForQuery { status: b'I' },
            ],
        )
        .unwrap();
        assert_eq!(events.last(), Some(&BackupEvent::Done));
        assert_eq!(r.bytes_done(), 1024);
        assert!(r.is_done() && !r.is_failed());
        let e = r.handle(BackendMessage::CopyDone).unwrap_err();
        assert!(e.to_string().contains("after BASE_BACKUP completed"), "{e}");
    }
}
