//! Streams WAL into a destination of your own: here one that keeps WAL in memory (by
//! delegating to `MemoryWal`) and counts what it is handed, to show the two traits an
//! embedder implements. The receiver keeps resume, verification, timeline following
//! and reconnects; the destination only stores bytes and says what is durable.
//!
//! ```text
//! cargo run -p walstream --example custom_destination -- "host=primary user=repl" 0/3000000 0/5000000
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use pgwire_repl::{Lsn, TimelineId, WalSegmentSize};
use walstream::{
    MemoryWal, MemoryWriter, ReceiveOptions, Resume, WalDestination, WalWriter, WriterTotals,
};

/// A destination that counts the WAL bytes it is given.
#[derive(Clone, Default)]
pub struct CountingWal {
    /// Where the bytes really go.
    pub store: MemoryWal,
    /// WAL bytes written.
    pub bytes: Arc<AtomicU64>,
}

/// Its writer.
pub struct CountingWriter {
    inner: MemoryWriter,
    bytes: Arc<AtomicU64>,
}

impl WalDestination for CountingWal {
    type Writer = CountingWriter;

    async fn open(&mut self, segment_size: WalSegmentSize) -> walstream::Result<()> {
        self.store.open(segment_size).await
    }

    async fn resume_point(&mut self) -> walstream::Result<Option<Resume>> {
        self.store.resume_point().await
    }

    async fn has_history(&mut self, timeline: TimelineId) -> walstream::Result<bool> {
        self.store.has_history(timeline).await
    }

    async fn write_history(
        &mut self,
        timeline: TimelineId,
        content: Bytes,
    ) -> walstream::Result<()> {
        self.store.write_history(timeline, content).await
    }

    async fn writer(
        &mut self,
        timeline: TimelineId,
        start: Lsn,
    ) -> walstream::Result<CountingWriter> {
        Ok(CountingWriter {
            inner: self.store.writer(timeline, start).await?,
            bytes: self.bytes.clone(),
        })
    }
}

impl WalWriter for CountingWriter {
    fn written(&self) -> Lsn {
        self.inner.written()
    }

    fn durable(&self) -> Lsn {
        self.inner.durable()
    }

    async fn write(&mut self, lsn: Lsn, data: Bytes, verified: Lsn) -> walstream::Result<()> {
        self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        self.inner.write(lsn, data, verified).await
    }

    async fn flush(&mut self) -> walstream::Result<Lsn> {
        self.inner.flush().await
    }

    async fn close(self) -> walstream::Result<WriterTotals> {
        self.inner.close().await
    }
}

/// Streams WAL from `start` (rounded down to its segment) to `endpos` from `conninfo`
/// into a [`CountingWal`].
pub async fn stream_range(
    conninfo: &str,
    start: Lsn,
    endpos: Lsn,
) -> walstream::Result<CountingWal> {
    let config = pgwire_repl::Config::parse_with_env(conninfo)?;
    let mut options = ReceiveOptions::new("");
    options.start_position = Some(start);
    options.endpos = Some(endpos);
    options.no_loop = true;
    let destination = CountingWal::default();
    walstream::receive_wal_into(
        &config,
        &options,
        destination.clone(),
        std::future::pending(),
    )
    .await?;
    Ok(destination)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [conninfo, start, endpos] = args.as_slice() else {
        eprintln!("usage: custom_destination CONNINFO START_LSN END_LSN");
        return std::process::ExitCode::FAILURE;
    };
    let (Ok(start), Ok(endpos)) = (start.parse::<Lsn>(), endpos.parse::<Lsn>()) else {
        eprintln!("give LSNs like 0/3000000");
        return std::process::ExitCode::FAILURE;
    };
    match stream_range(conninfo, start, endpos).await {
        Ok(wal) => {
            println!(
                "{} WAL bytes, {} complete segments",
                wal.bytes.load(Ordering::Relaxed),
                wal.store.complete_segments().len()
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}
