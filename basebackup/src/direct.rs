//! Writing large files with `O_DIRECT`: the data goes from one reused, aligned staging
//! buffer straight to the device, bypassing the page cache.
//!
//! A buffered write copies every byte into freshly allocated page-cache pages and leaves
//! them dirty for writeback, all in the kernel and charged to the writer. For a clone that
//! is gigabytes of pages nobody reads again soon. Direct writes copy each byte once, into
//! memory the process keeps reusing, and leave nothing to write back, so the final
//! fdatasync only has metadata and a cache flush left to do.
//!
//! Direct I/O needs the buffer address, the file offset and the length aligned to the
//! device's logical block size. Every write here is a whole number of [`ALIGN`] blocks at
//! an aligned offset; only a file's last partial block is written buffered, after
//! `O_DIRECT` has been cleared. A file system that refuses `O_DIRECT` (at open or at the
//! first write) gets buffered writes, with the same result on disk.
//!
//! [`crate::PlainDirSink`] writes files of 1 MiB and more this way. With `no_sync` it
//! goes back to buffered writes for the next files once direct writes have taken half
//! of the time so far: on a disk slower than the stream, the page cache should absorb
//! the writes, as the caller asked not to wait for the disk.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::io::AsRawFd;

/// Alignment of buffers, offsets and lengths: 4096 covers every common logical block size.
pub(crate) const ALIGN: usize = 4096;

/// Size of the staging buffer, which is also the size of each direct write.
pub(crate) const STAGE_BYTES: usize = 1 << 20;

/// Files at least this large are written directly; smaller ones stay buffered (they are
/// mostly catalog files of a few pages, where the page cache costs little).
pub(crate) const DIRECT_MIN_FILE: u64 = 1 << 20;

/// An aligned staging buffer, allocated once per sink and reused for every file.
pub(crate) struct Stage {
    memory: Vec<u8>,
    start: usize,
    len: usize,
}

impl Stage {
    pub(crate) fn new() -> Stage {
        let memory = vec![0u8; STAGE_BYTES + ALIGN];
        let start = memory.as_ptr().align_offset(ALIGN);
        Stage {
            memory,
            start,
            len: 0,
        }
    }

    fn filled(&self) -> &[u8] {
        &self.memory[self.start..self.start + self.len]
    }

    /// Appends as much of `data` as fits; returns how much was taken.
    fn fill(&mut self, data: &[u8]) -> usize {
        let room = STAGE_BYTES - self.len;
        let take = room.min(data.len());
        let at = self.start + self.len;
        self.memory[at..at + take].copy_from_slice(&data[..take]);
        self.len += take;
        take
    }
}

impl std::fmt::Debug for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stage").field("len", &self.len).finish()
    }
}

/// One file being written through a [`Stage`].
pub(crate) struct DirectFile {
    file: File,
    /// False once the file system refused a direct write: the rest is buffered.
    direct: bool,
}

impl DirectFile {
    /// Wraps a file opened with `O_DIRECT`.
    pub(crate) fn new(file: File) -> DirectFile {
        DirectFile { file, direct: true }
    }

    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Takes `data`, writing the stage out each time it fills up.
    pub(crate) fn write(&mut self, stage: &mut Stage, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let took = stage.fill(data);
            data = &data[took..];
            if stage.len == STAGE_BYTES {
                self.write_stage(stage, STAGE_BYTES)?;
                stage.len = 0;
            }
        }
        Ok(())
    }

    /// Writes what is left in the stage: the aligned part directly, the last partial
    /// block buffered. Returns the file.
    pub(crate) fn finish(mut self, stage: &mut Stage) -> io::Result<File> {
        let aligned = stage.len / ALIGN * ALIGN;
        if aligned > 0 {
            self.write_stage(stage, aligned)?;
        }
        if aligned < stage.len {
            self.stop_direct()?;
            self.file.write_all(&stage.filled()[aligned..])?;
        }
        stage.len = 0;
        Ok(self.file)
    }

    /// Writes the first `len` bytes of the stage (a multiple of [`ALIGN`]).
    fn write_stage(&mut self, stage: &Stage, len: usize) -> io::Result<()> {
        let data = &stage.filled()[..len];
        if self.direct {
            match self.file.write_all(data) {
                Ok(()) => return Ok(()),
                // EINVAL: this file system or device wants another alignment, or no
                // direct I/O at all; nothing was written by the failed call.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.stop_direct()?,
                Err(e) => return Err(e),
            }
        }
        self.file.write_all(data)
    }

    fn stop_direct(&mut self) -> io::Result<()> {
        if !self.direct {
            return Ok(());
        }
        let fd = self.file.as_raw_fd();
        // SAFETY: fcntl on an open descriptor owned by `self.file`.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above; only the O_DIRECT bit changes.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) } < 0 {
            return Err(io::Error::last_os_error());
        }
        self.direct = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::os::unix::fs::OpenOptionsExt;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn write_in_chunks(path: &std::path::Path, data: &[u8], chunk: usize, stage: &mut Stage) {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .or_else(|_| OpenOptions::new().write(true).create_new(true).open(path))
            .unwrap();
        let mut direct = DirectFile::new(file);
        for piece in data.chunks(chunk) {
            direct.write(stage, piece).unwrap();
        }
        direct.finish(stage).unwrap().sync_all().unwrap();
    }

    #[test]
    fn every_size_and_chunking_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let mut stage = Stage::new();
        let sizes = [
            0,
            1,
            ALIGN - 1,
            ALIGN,
            ALIGN + 1,
            STAGE_BYTES - 1,
            STAGE_BYTES,
            STAGE_BYTES + 1,
            3 * STAGE_BYTES + 8192 + 17,
        ];
        for (n, size) in sizes.into_iter().enumerate() {
            for chunk in [1000, 32 * 1024 + 5, STAGE_BYTES + 3] {
                let data = pattern(size, n as u8);
                let path = dir.path().join(format!("f{n}-{chunk}"));
                write_in_chunks(&path, &data, chunk, &mut stage);
                assert_eq!(
                    std::fs::read(&path).unwrap(),
                    data,
                    "size {size}, chunk {chunk}"
                );
            }
        }
    }

    #[test]
    fn a_file_without_o_direct_is_written_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffered");
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        let mut stage = Stage::new();
        let data = pattern(2 * STAGE_BYTES + 100, 7);
        let mut direct = DirectFile::new(file);
        direct.write(&mut stage, &data).unwrap();
        direct.finish(&mut stage).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
    }

    #[test]
    fn the_stage_is_aligned() {
        let stage = Stage::new();
        assert_eq!(stage.filled().as_ptr() as usize % ALIGN, 0);
    }
}
