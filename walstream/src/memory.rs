//! [`MemoryWal`]: a [`WalDestination`] in memory, with the same rules as the local
//! directory (partial segments, verified-only completion, resume), for tests and as
//! the smallest example of a destination.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use pgwire_repl::types::wal_file_name;
use pgwire_repl::{Lsn, SystemId, TimelineId, WalSegmentSize};

use crate::destination::{Resume, WalDestination, WalWriter, WriterTotals};
use crate::error::{Error, Result};

#[derive(Debug, Default)]
struct Segment {
    data: Vec<u8>,
    complete: bool,
}

#[derive(Debug, Default)]
struct State {
    segment_size: Option<WalSegmentSize>,
    /// (segment number, timeline) → segment, ordered as pg_receivewal ranks files.
    segments: BTreeMap<(u64, u32), Segment>,
    histories: HashMap<u32, Bytes>,
}

/// WAL kept in memory. Clones share the same store, so a test keeps one clone to look
/// at what a receiver wrote into another.
///
/// ```
/// let wal = walstream::MemoryWal::new();
/// let inspect = wal.clone();
/// // … walstream::receive_wal_into(&config, &options, wal, shutdown).await …
/// assert!(inspect.complete_segments().is_empty());
/// ```
#[derive(Debug, Clone, Default)]
pub struct MemoryWal {
    state: Arc<Mutex<State>>,
}

impl MemoryWal {
    /// An empty store.
    pub fn new() -> MemoryWal {
        MemoryWal::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves plain data behind: keep going.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The names of the complete segments, in order.
    pub fn complete_segments(&self) -> Vec<String> {
        self.segment_names(true)
    }

    /// The names of the partial segments, in order.
    pub fn partial_segments(&self) -> Vec<String> {
        self.segment_names(false)
    }

    fn segment_names(&self, complete: bool) -> Vec<String> {
        let state = self.lock();
        let Some(size) = state.segment_size else {
            return Vec::new();
        };
        state
            .segments
            .iter()
            .filter(|(_, s)| s.complete == complete)
            .map(|((segno, tli), _)| wal_file_name(TimelineId(*tli), *segno, size))
            .collect()
    }

    /// The bytes of a segment by its file name (complete or partial); a partial one
    /// holds zeros after what was written.
    pub fn segment(&self, name: &str) -> Option<Bytes> {
        let state = self.lock();
        let size = state.segment_size?;
        state
            .segments
            .iter()
            .find(|((segno, tli), _)| wal_file_name(TimelineId(*tli), *segno, size) == name)
            .map(|(_, s)| Bytes::copy_from_slice(&s.data))
    }

    /// The history file of `timeline`, if stored.
    pub fn history(&self, timeline: TimelineId) -> Option<Bytes> {
        self.lock().histories.get(&timeline.0).cloned()
    }
}

impl WalDestination for MemoryWal {
    type Writer = MemoryWriter;

    async fn open(&mut self, segment_size: WalSegmentSize) -> Result<()> {
        let mut state = self.lock();
        match state.segment_size {
            Some(size) if size != segment_size && !state.segments.is_empty() => Err(Error::state(
                format!(
                    "the stored WAL has {} byte segments, the server {}",
                    size.bytes(),
                    segment_size.bytes()
                ),
                "use a new store for this server",
            )),
            _ => {
                state.segment_size = Some(segment_size);
                Ok(())
            }
        }
    }

    async fn resume_point(&mut self) -> Result<Option<Resume>> {
        let state = self.lock();
        let Some(size) = state.segment_size else {
            return Ok(None);
        };
        // The newest by (segment, timeline), complete preferred over partial.
        let best = state
            .segments
            .iter()
            .map(|(&(segno, tli), s)| (segno, tli, s.complete))
            .max();
        let Some((segno, tli, complete)) = best else {
            return Ok(None);
        };
        let mut resume = if complete { segno + 1 } else { segno };
        // As the local directory: a run of partials resumes from its oldest.
        if !complete {
            while resume > 0
                && state
                    .segments
                    .get(&(resume - 1, tli))
                    .is_some_and(|s| !s.complete)
            {
                resume -= 1;
            }
        }
        let newest = &state.segments[&(segno, tli)];
        Ok(Some(Resume {
            lsn: Lsn(resume * size.bytes()),
            timeline: TimelineId(tli),
            system_id: system_id_of(&newest.data),
            from: wal_file_name(TimelineId(tli), segno, size),
        }))
    }

    async fn has_history(&mut self, timeline: TimelineId) -> Result<bool> {
        Ok(self.lock().histories.contains_key(&timeline.0))
    }

    async fn write_history(&mut self, timeline: TimelineId, content: Bytes) -> Result<()> {
        self.lock().histories.insert(timeline.0, content);
        Ok(())
    }

    async fn writer(&mut self, timeline: TimelineId, start: Lsn) -> Result<MemoryWriter> {
        let size = self.lock().segment_size.ok_or_else(|| {
            Error::usage(
                "the memory store was written before it was opened",
                "call open() first (receive_wal_into does)",
            )
        })?;
        if start.segment_offset(size) != 0 {
            return Err(Error::usage(
                format!("WAL writing must start at a segment start, not at {start}"),
                "round the start position down to its segment start",
            ));
        }
        Ok(MemoryWriter {
            store: self.clone(),
            size,
            timeline,
            written: start,
            durable: start,
            verified: start,
            completed: 0,
            next_to_complete: start.0 / size.bytes(),
        })
    }
}

/// The system identifier in a segment's long page header, once one was written.
fn system_id_of(segment: &[u8]) -> Option<SystemId> {
    let header = segment.get(..32)?;
    if header[0..2] == [0, 0] {
        return None;
    }
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&header[24..32]);
    Some(SystemId(u64::from_le_bytes(raw)))
}

/// The writer of a [`MemoryWal`].
#[derive(Debug)]
pub struct MemoryWriter {
    store: MemoryWal,
    size: WalSegmentSize,
    timeline: TimelineId,
    written: Lsn,
    durable: Lsn,
    verified: Lsn,
    completed: u64,
    /// The first segment this writer has not completed yet.
    next_to_complete: u64,
}

impl MemoryWriter {
    /// Completes every written segment that lies entirely below the verified position.
    fn complete_verified(&mut self, state: &mut State) {
        let end = self.written.0.min(self.verified.0);
        let full_segments = end / self.size.bytes();
        // Writes are contiguous from the start, so segments complete in order.
        while self.next_to_complete < full_segments {
            let segno = self.next_to_complete;
            if let Some(segment) = state.segments.get_mut(&(segno, self.timeline.0)) {
                if !segment.complete && segment.data.len() as u64 == self.size.bytes() {
                    segment.complete = true;
                    self.completed += 1;
                    self.durable = self.durable.max(Lsn((segno + 1) * self.size.bytes()));
                }
            }
            self.next_to_complete += 1;
        }
    }
}

impl WalWriter for MemoryWriter {
    fn written(&self) -> Lsn {
        self.written
    }

    fn durable(&self) -> Lsn {
        self.durable
    }

    async fn write(&mut self, lsn: Lsn, data: Bytes, verified: Lsn) -> Result<()> {
        if lsn != self.written {
            return Err(Error::state(
                format!(
                    "WAL at {lsn} does not follow the end of what was written, {}",
                    self.written
                ),
                "this is a bug in the caller: WAL must be written contiguously",
            ));
        }
        let store = self.store.clone();
        let mut state = store.lock();
        let mut at = lsn.0;
        let mut rest = &data[..];
        while !rest.is_empty() {
            let segno = at / self.size.bytes();
            let offset = (at % self.size.bytes()) as usize;
            let take = rest.len().min(self.size.bytes() as usize - offset);
            let segment = state.segments.entry((segno, self.timeline.0)).or_default();
            if segment.complete {
                // Streamed again after a resume: the bytes must be the same.
                if segment.data[offset..offset + take] != rest[..take] {
                    return Err(Error::state(
                        format!(
                            "WAL at {} differs from the complete segment already stored",
                            Lsn(at)
                        ),
                        "the store holds WAL of another history; use a new store",
                    ));
                }
            } else {
                if segment.data.len() < offset + take {
                    segment.data.resize(self.size.bytes() as usize, 0);
                }
                segment.data[offset..offset + take].copy_from_slice(&rest[..take]);
            }
            at += take as u64;
            rest = &rest[take..];
        }
        self.written = Lsn(at);
        self.verified = self.verified.max(verified);
        self.complete_verified(&mut state);
        Ok(())
    }

    async fn flush(&mut self) -> Result<Lsn> {
        // Memory holds what was written at once, but only verified WAL counts (the
        // rule of every destination): an unverified tail is never reported.
        self.durable = self.durable.max(self.written.min(self.verified));
        Ok(self.durable)
    }

    async fn close(mut self) -> Result<WriterTotals> {
        let durable = self.flush().await?;
        Ok(WriterTotals {
            written: self.written,
            durable,
            completed_segments: self.completed,
        })
    }
}
