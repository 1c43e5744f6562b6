//! The machine's limits, measured in the same run as the comparisons: the disk's
//! sequential write bandwidth with fsync (buffered and `O_DIRECT`), and the server's
//! raw send rate (a BASE_BACKUP stream read and thrown away).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Instant;

use pgwire_repl::proto::backend::BackendMessage;
use pgwire_repl::proto::frontend;
use pgwire_repl::proto::replication::ReplicationMessage;
use pgwire_repl::{Config, Lsn, ReplicationClient};
use serde::Serialize;

/// One timed transfer: how many bytes, in how long.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Transfer {
    /// Bytes moved.
    pub bytes: u64,
    /// Wall time in seconds.
    pub wall_s: f64,
    /// CPU (user + sys) of this process during the transfer, in seconds.
    pub cpu_s: f64,
}

impl Transfer {
    /// Megabytes (10^6 bytes) per second.
    pub fn mb_per_s(&self) -> f64 {
        if self.wall_s > 0.0 {
            self.bytes as f64 / 1e6 / self.wall_s
        } else {
            0.0
        }
    }
}

/// CPU time (user + sys) of the calling thread so far, in seconds.
fn thread_cpu_s() -> f64 {
    // SAFETY: rusage is a plain C struct; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer is valid for the call.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// A 4 KiB page aligned to 4 KiB, as `O_DIRECT` needs.
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct AlignedPage([u8; 4096]);

/// A 1 MiB block of aligned pages, filled with a non-zero pattern.
fn aligned_block() -> Vec<AlignedPage> {
    let mut pages = vec![AlignedPage([0; 4096]); 256];
    for (p, page) in pages.iter_mut().enumerate() {
        for (i, byte) in page.0.iter_mut().enumerate() {
            // Not all zeros, so nothing along the way can take a shortcut.
            *byte = ((p * 4096 + i).wrapping_mul(31) >> 3) as u8;
        }
    }
    pages
}

fn as_bytes(pages: &[AlignedPage]) -> &[u8] {
    // SAFETY: AlignedPage is repr(C) around a byte array with no padding (its size,
    // 4096, is a multiple of its alignment), so the pages are contiguous initialized
    // bytes, borrowed for as long as `pages`.
    unsafe { std::slice::from_raw_parts(pages.as_ptr().cast::<u8>(), std::mem::size_of_val(pages)) }
}

/// How the disk write test writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskMode {
    /// Buffered writes, one fsync at the end.
    Buffered,
    /// Buffered writes, starting writeback (`sync_file_range(SYNC_FILE_RANGE_WRITE)`)
    /// every 8 MiB, one fsync at the end.
    EarlyWriteback,
    /// `O_DIRECT` writes from an aligned buffer, one fsync at the end.
    Direct,
}

impl DiskMode {
    /// Every mode.
    pub const ALL: [DiskMode; 3] = [
        DiskMode::Buffered,
        DiskMode::EarlyWriteback,
        DiskMode::Direct,
    ];

    /// A short description.
    pub fn describe(self) -> &'static str {
        match self {
            DiskMode::Buffered => "buffered 1 MiB writes + fsync",
            DiskMode::EarlyWriteback => {
                "buffered 1 MiB writes, sync_file_range every 8 MiB, + fsync"
            }
            DiskMode::Direct => "O_DIRECT 1 MiB writes + fsync",
        }
    }
}

/// Writes `bytes` (rounded up to whole MiB) sequentially in 1 MiB blocks into a new file
/// in `dir` as `mode` says, then fsyncs it; the file is removed afterwards. `Direct` is
/// an error if the filesystem refuses `O_DIRECT`.
pub fn disk_write(dir: &Path, bytes: u64, mode: DiskMode) -> std::io::Result<Transfer> {
    let path = dir.join("disk-test");
    let _ = std::fs::remove_file(&path);
    let pages = aligned_block();
    let block = as_bytes(&pages);
    let blocks = bytes.div_ceil(1 << 20);
    // SAFETY: sync has no preconditions; it keeps earlier dirty pages out of the timing.
    unsafe { libc::sync() };
    let cpu_before = thread_cpu_s();
    let started = Instant::now();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    if mode == DiskMode::Direct {
        options.custom_flags(libc::O_DIRECT);
    }
    let result = (|| {
        let mut file = options.open(&path)?;
        for index in 0..blocks {
            file.write_all(block)?;
            if mode == DiskMode::EarlyWriteback && index % 8 == 7 {
                use std::os::fd::AsRawFd;
                // SAFETY: a valid open descriptor; the range is the last 8 MiB written.
                unsafe {
                    libc::sync_file_range(
                        file.as_raw_fd(),
                        ((index - 7) << 20) as libc::off64_t,
                        8 << 20,
                        libc::SYNC_FILE_RANGE_WRITE,
                    )
                };
            }
        }
        file.sync_all()
    })();
    let wall_s = started.elapsed().as_secs_f64();
    let cpu_s = thread_cpu_s() - cpu_before;
    let _ = std::fs::remove_file(&path);
    result?;
    Ok(Transfer {
        bytes: blocks << 20,
        wall_s,
        cpu_s,
    })
}

/// The BASE_BACKUP command the raw send uses: what the clones ask for (fast checkpoint,
/// a manifest with CRC32C checksums), without WAL; with `compression` (15 and later),
/// server-side compression such as `zstd`.
pub fn raw_base_backup_command(server_major: u32, compression: Option<&str>) -> String {
    if server_major >= 15 {
        let compression = compression
            .map(|c| format!(", COMPRESSION '{c}'"))
            .unwrap_or_default();
        format!(
            "BASE_BACKUP (LABEL 'pgrepl bench raw send', CHECKPOINT 'fast', WAIT false, \
             MANIFEST 'yes', MANIFEST_CHECKSUMS 'CRC32C'{compression})"
        )
    } else {
        "BASE_BACKUP LABEL 'pgrepl bench raw send' FAST NOWAIT MANIFEST 'yes' \
         MANIFEST_CHECKSUMS 'CRC32C'"
            .into()
    }
}

/// Connects over replication, sends BASE_BACKUP and throws every CopyData away,
/// measuring from connecting to ReadyForQuery. `bytes` counts CopyData payloads.
/// `compression` asks the server to compress (15 and later), e.g. `zstd`.
pub async fn raw_send(config: &Config, compression: Option<&str>) -> Result<Transfer, String> {
    let cpu_before = thread_cpu_s();
    let started = Instant::now();
    let mut client = ReplicationClient::connect(config)
        .await
        .map_err(|e| format!("raw send: connecting: {e}"))?;
    let command = raw_base_backup_command(client.server_major(), compression);
    let conn = client.connection();
    frontend::query(&command, conn.write_buf()).map_err(|e| format!("raw send: {e}"))?;
    conn.flush()
        .await
        .map_err(|e| format!("raw send: sending BASE_BACKUP: {e}"))?;
    let mut bytes = 0u64;
    let mut error = None;
    loop {
        match conn
            .read_message()
            .await
            .map_err(|e| format!("raw send: reading: {e}"))?
        {
            BackendMessage::CopyData(payload) => bytes += payload.len() as u64,
            BackendMessage::ErrorResponse(db) => error = Some(db.to_string()),
            BackendMessage::ReadyForQuery { .. } => break,
            _ => {}
        }
    }
    let wall_s = started.elapsed().as_secs_f64();
    let cpu_s = thread_cpu_s() - cpu_before;
    let _ = client.close().await;
    if let Some(error) = error {
        return Err(format!("raw send: BASE_BACKUP failed: {error}"));
    }
    Ok(Transfer {
        bytes,
        wall_s,
        cpu_s,
    })
}

/// Connects over replication, streams WAL from the start of the segment holding `start`
/// through `slot` until `end`, and throws it away: the server's raw WAL send rate.
/// Measured from connecting to receiving `end`; `bytes` counts WAL bytes.
pub async fn raw_wal_send(
    config: &Config,
    slot: &str,
    start: Lsn,
    end: Lsn,
) -> Result<Transfer, String> {
    let cpu_before = thread_cpu_s();
    let started = Instant::now();
    let mut client = ReplicationClient::connect(config)
        .await
        .map_err(|e| format!("raw WAL send: connecting: {e}"))?;
    let segment = client
        .wal_segment_size()
        .await
        .map_err(|e| format!("raw WAL send: {e}"))?;
    let from = start.segment_start(segment);
    let conn = client.connection();
    frontend::query(
        &format!("START_REPLICATION SLOT {slot} PHYSICAL {from}"),
        conn.write_buf(),
    )
    .map_err(|e| format!("raw WAL send: {e}"))?;
    conn.flush()
        .await
        .map_err(|e| format!("raw WAL send: sending START_REPLICATION: {e}"))?;
    let mut bytes = 0u64;
    loop {
        match conn
            .read_message()
            .await
            .map_err(|e| format!("raw WAL send: reading: {e}"))?
        {
            BackendMessage::CopyData(payload) => {
                if let Ok(ReplicationMessage::XLogData(x)) = ReplicationMessage::parse(payload) {
                    bytes += x.data.len() as u64;
                    if x.wal_start.0 + x.data.len() as u64 >= end.0 {
                        break;
                    }
                }
            }
            BackendMessage::ErrorResponse(db) => {
                return Err(format!("raw WAL send: START_REPLICATION failed: {db}"))
            }
            BackendMessage::ReadyForQuery { .. } => {
                return Err("raw WAL send: the stream ended before the end position".into())
            }
            _ => {}
        }
    }
    let wall_s = started.elapsed().as_secs_f64();
    let cpu_s = thread_cpu_s() - cpu_before;
    // Dropping the connection ends the walsender; nothing more is needed.
    drop(client);
    Ok(Transfer {
        bytes,
        wall_s,
        cpu_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_write_writes_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [DiskMode::Buffered, DiskMode::EarlyWriteback] {
            let t = disk_write(dir.path(), 9 << 20, mode).unwrap();
            assert_eq!(t.bytes, 9 << 20);
            assert!(t.wall_s > 0.0 && t.mb_per_s() > 0.0);
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        }
        // O_DIRECT may be refused (tmpfs); either way nothing is left behind.
        let _ = disk_write(dir.path(), 1 << 20, DiskMode::Direct);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn raw_command_syntax_by_version() {
        assert!(raw_base_backup_command(15, None).starts_with("BASE_BACKUP ("));
        assert!(raw_base_backup_command(15, Some("zstd")).ends_with("COMPRESSION 'zstd')"));
        assert!(raw_base_backup_command(14, None).contains(" FAST NOWAIT "));
    }
}
