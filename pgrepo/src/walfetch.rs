//! `restore_command` for the streamed WAL archive: fetch one file (`%f`) from the
//! repository into `%p`, verified, with prefetching of the segments that follow.
//!
//! - A complete segment is decompressed and checked before a byte reaches `%p`: exactly
//!   the segment size of `wal/archive.json`, every page header sane (magic, address,
//!   a timeline not above the requested one, the long header's system identifier) and
//!   every record that can be decoded inside it CRC-checked ([`WalVerifier`]).
//! - A segment without a complete object is [`FetchOutcome::Missing`]: nothing is
//!   written (the command then exits 1, which tells a standby to switch to streaming).
//!   With [`FetchOptions::partial`], the contiguous pieces from offset 0 are served
//!   instead, zero-padded to the segment size as `pg_receivewal`'s `.partial` files
//!   are, verified as far as they go.
//! - A history file (`00000002.history`) is served byte for byte.
//! - Output goes to a temporary file in `%p`'s directory, is synced and renamed over
//!   `%p`: `%p` is either absent or complete.
//!
//! Prefetch: once the requested segment is resolved, the next
//! [`FetchOptions::prefetch`] complete segments of its timeline (found in the same
//! single listing of `wal/<TLI>/`) are fetched in parallel, verified and placed into a
//! cache directory (default `pgrepo-prefetch` beside `%p`, that is inside `pg_wal`, which
//! base backups never copy). A later request for a cached segment is served by moving
//! the file into `%p` without touching the store; the cache is refilled when fewer
//! than half of the next segments are left in it. Entries below the requested segment
//! are removed. The invocation waits for its prefetches before returning, at most
//! [`FetchOptions::prefetch_wait`]; a prefetch not finished by then is dropped
//! and leaves nothing in the cache.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use pgwire_repl::types::{parse_wal_file_name, wal_file_name};
use pgwire_repl::{Lsn, SystemId, TimelineId, WalSegmentSize};
use walstream::decode::{VerifierConfig, WalVerifier};

use crate::error::{Error, Result};
use crate::repository::Repository;
use crate::store::Scheme;
use crate::walnames::{self, WalObject};

/// Segments prefetched after the requested one, by default.
pub const DEFAULT_PREFETCH: usize = 8;
/// The cache directory's name, beside `%p`.
pub const CACHE_DIR_NAME: &str = "pgrepo-prefetch";
/// The longest an invocation waits for its prefetches, by default.
pub const DEFAULT_PREFETCH_WAIT: Duration = Duration::from_secs(60);
/// Downloads in flight while prefetching.
const PREFETCH_CONCURRENCY: usize = 4;
/// The largest history file or archive record read.
const SMALL_LIMIT: u64 = 16 << 20;
/// Pieces of a partial segment downloaded at once.
const PIECE_CONCURRENCY: usize = 8;

/// How [`fetch_wal_file`] works.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Serve a segment that has only partial pieces, zero-padded (for recovery to the
    /// very end of the archive; never for a standby, which streams the rest).
    pub partial: bool,
    /// Complete segments to prefetch after the requested one (0: none).
    pub prefetch: usize,
    /// The prefetch cache (default: `pgrepo-prefetch` in `%p`'s directory).
    pub cache_dir: Option<PathBuf>,
    /// The longest the call waits for its prefetches.
    pub prefetch_wait: Duration,
}

impl Default for FetchOptions {
    fn default() -> FetchOptions {
        FetchOptions {
            partial: false,
            prefetch: DEFAULT_PREFETCH,
            cache_dir: None,
            prefetch_wait: DEFAULT_PREFETCH_WAIT,
        }
    }
}

/// Where a fetched file came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchedFrom {
    /// A complete segment in the store.
    Store,
    /// The prefetch cache (verified when it was placed there).
    Cache,
    /// Partial pieces, served up to `end` (an offset in the segment) and zero-padded.
    Partial {
        /// The end of the contiguous pieces.
        end: u64,
    },
    /// A timeline history file.
    History,
}

/// What [`fetch_wal_file`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchOutcome {
    /// The file was written to the destination.
    Fetched {
        /// From where.
        from: FetchedFrom,
        /// Bytes written.
        bytes: u64,
        /// Records CRC-checked (0 for history files and cache hits).
        records_verified: u64,
        /// Segments newly placed in the prefetch cache.
        prefetched: usize,
    },
    /// The repository has no such file; nothing was written.
    Missing,
}

/// The WAL archive's cluster and segment size, checked.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ArchiveParams {
    pub system_id: u64,
    pub segment_size: WalSegmentSize,
}

/// Reads `wal/archive.json`; `None` when the repository has no WAL archive.
pub(crate) async fn archive_params(repo: &Repository) -> Result<Option<ArchiveParams>> {
    let Some(info) = crate::walarchive::read_archive_record(repo).await? else {
        return Ok(None);
    };
    let what = repo.describe(&repo.path(walnames::ARCHIVE_RECORD));
    let system_id = info
        .system_identifier
        .parse::<u64>()
        .map_err(|_| wal_damage(&what, "the system identifier is not a number"))?;
    let segment_size = WalSegmentSize::new(info.segment_size).map_err(|_| {
        wal_damage(
            &what,
            format!("{} is not a WAL segment size", info.segment_size),
        )
    })?;
    Ok(Some(ArchiveParams {
        system_id,
        segment_size,
    }))
}

fn wal_damage(object: impl std::fmt::Display, what: impl std::fmt::Display) -> Error {
    Error::verify(object, what).with_advice(
        "the WAL archive in the repository is damaged: do not recover from this object; \
         recovery can stop before it, or restore a newer backup taken after it",
    )
}

/// The segment size of the repository's WAL archive; `None` when it has none (no
/// `wal/archive.json`: no receiver ever streamed into it).
pub async fn archive_segment_size(repo: &Repository) -> Result<Option<WalSegmentSize>> {
    Ok(archive_params(repo).await?.map(|p| p.segment_size))
}

/// What the listing of `wal/<TLI>/` showed for one segment.
#[derive(Debug, Default)]
struct Listed {
    /// The complete object: its path, whether it is compressed, its size.
    complete: Option<(ObjectPath, bool, u64)>,
    /// Pieces: (from, to, path).
    pieces: Vec<(u64, u64, ObjectPath)>,
}

/// Fetches `file` (`%f`: a 24-digit segment name or `TTTTTTTT.history`) from the
/// repository into `dest` (`%p`).
///
/// ```no_run
/// # async fn demo() -> pgrepo::Result<()> {
/// use pgrepo::walfetch::{fetch_wal_file, FetchOptions, FetchOutcome};
/// let repo = pgrepo::Repository::open("s3://backups/db1", &Default::default())?;
/// let outcome = fetch_wal_file(
///     &repo,
///     "000000010000000000000003",
///     std::path::Path::new("pg_wal/RECOVERYXLOG"),
///     &FetchOptions::default(),
/// )
/// .await?;
/// assert_ne!(outcome, FetchOutcome::Missing);
/// # Ok(()) }
/// ```
pub async fn fetch_wal_file(
    repo: &Repository,
    file: &str,
    dest: &Path,
    options: &FetchOptions,
) -> Result<FetchOutcome> {
    if let Some(timeline) = walnames::history_name_timeline(file) {
        return fetch_history(repo, timeline, dest).await;
    }
    if !walnames::is_segment_name(file) {
        return Err(Error::usage(
            format!("{file:?} is not a WAL segment name (24 hexadecimal digits) or a timeline history file name (TTTTTTTT.history)"),
            "use wal-fetch as restore_command = '… wal-fetch … %f %p'",
        ));
    }
    let dest_dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let cache = options
        .cache_dir
        .clone()
        .unwrap_or_else(|| dest_dir.join(CACHE_DIR_NAME));

    let timeline = u32::from_str_radix(&file[..8], 16)
        .ok()
        .filter(|t| *t != 0)
        .map(TimelineId)
        .ok_or_else(|| {
            Error::usage(
                format!("{file}: timeline 0 does not exist"),
                "check the file name",
            )
        })?;

    // A cache hit needs no request; the cache is refilled when it runs low.
    if let Some(segment_size) = take_from_cache(&cache, file, dest).await? {
        let mut prefetched = 0;
        if let Some((_, number)) = parse_wal_file_name(file, segment_size) {
            remove_older(&cache, number, segment_size).await;
            let ahead =
                cached_ahead(&cache, timeline, number, options.prefetch, segment_size).await;
            if options.prefetch > 0 && ahead < options.prefetch.div_ceil(2) {
                let (params, listing) = resolve(repo, timeline, file, options.prefetch).await?;
                if let Some(params) = params.filter(|p| p.segment_size == segment_size) {
                    let listing = index_listing(repo, listing, timeline, segment_size);
                    prefetched =
                        prefetch(repo, &cache, timeline, number, &listing, params, options).await;
                }
            }
        }
        return Ok(FetchOutcome::Fetched {
            from: FetchedFrom::Cache,
            bytes: segment_size.bytes(),
            records_verified: 0,
            prefetched,
        });
    }

    // Twice at most: pieces may be folded into a complete object while being read.
    for attempt in 0..2 {
        let (params, listing) = resolve(repo, timeline, file, options.prefetch).await?;
        let Some(params) = params else {
            return Ok(FetchOutcome::Missing);
        };
        let (_, number) = parse_wal_file_name(file, params.segment_size).ok_or_else(|| {
            Error::usage(
                format!(
                    "{file} is not a segment name for the archive's {}-byte segments",
                    params.segment_size.bytes()
                ),
                "check that the repository belongs to this cluster",
            )
        })?;
        let listing = index_listing(repo, listing, timeline, params.segment_size);
        remove_older(&cache, number, params.segment_size).await;
        let Some(entry) = listing.get(&number) else {
            return Ok(FetchOutcome::Missing);
        };
        if let Some((path, compressed, size)) = &entry.complete {
            let (bytes, records) =
                fetch_complete(repo, path, *compressed, *size, timeline, number, params).await?;
            let len = bytes.len() as u64;
            write_atomically(dest, bytes, 0).await?;
            let prefetched = if options.prefetch > 0 {
                prefetch(repo, &cache, timeline, number, &listing, params, options).await
            } else {
                0
            };
            return Ok(FetchOutcome::Fetched {
                from: FetchedFrom::Store,
                bytes: len,
                records_verified: records,
                prefetched,
            });
        }
        if !options.partial || entry.pieces.is_empty() {
            return Ok(FetchOutcome::Missing);
        }
        let Some((bytes, records)) =
            fetch_partial(repo, &entry.pieces, timeline, number, params).await?
        else {
            // A piece went away after the listing: the segment was just completed (its
            // pieces are deleted after the complete object is stored). Look again.
            if attempt == 0 {
                continue;
            }
            return Err(Error::verify(
                format!("{} ({file})", repo.url()),
                "its partial pieces vanished twice between listing and reading",
            )
            .with_advice("try again; a receiver is rewriting this segment"));
        };
        let end = bytes.len() as u64;
        let pad = params.segment_size.bytes() - end;
        write_atomically(dest, bytes, pad).await?;
        return Ok(FetchOutcome::Fetched {
            from: FetchedFrom::Partial { end },
            bytes: params.segment_size.bytes(),
            records_verified: records,
            prefetched: 0,
        });
    }
    Err(Error::usage(
        format!("{file}: gave up after two attempts"),
        "try again",
    ))
}

async fn fetch_history(
    repo: &Repository,
    timeline: TimelineId,
    dest: &Path,
) -> Result<FetchOutcome> {
    let path = repo.path(&walnames::history_object(timeline));
    let Some(bytes) = repo.get_optional(&path, SMALL_LIMIT).await? else {
        return Ok(FetchOutcome::Missing);
    };
    let len = bytes.len() as u64;
    write_atomically(dest, bytes, 0).await?;
    Ok(FetchOutcome::Fetched {
        from: FetchedFrom::History,
        bytes: len,
        records_verified: 0,
        prefetched: 0,
    })
}

/// Lists `wal/<TLI>/` from `name` on (its own objects included), stopping after
/// `ahead` further segments on stores that list in order.
async fn list_from_name(
    repo: &Repository,
    timeline: TimelineId,
    name: &str,
    ahead: usize,
) -> Result<Vec<object_store::ObjectMeta>> {
    let dir = repo.path(&walnames::timeline_dir(timeline));
    // Just below `name` and above every object of any lower segment: a lower name with
    // `Z` appended (`Z` sorts after the digits, `A`–`F` and `.`).
    let offset = lower_name(name)
        .map(|lower| repo.path(&format!("{}/{lower}Z", walnames::timeline_dir(timeline))));
    let ordered = !matches!(repo.url().scheme, Scheme::File);
    let mut stream = match &offset {
        Some(offset) => repo.store().list_with_offset(Some(&dir), offset),
        None => repo.store().list(Some(&dir)),
    };
    let mut out = Vec::new();
    // Anything at or past this ends an ordered listing.
    let stop = stop_name(name, ahead as u64 + 1);
    while let Some(meta) = stream
        .try_next()
        .await
        .map_err(|e| Error::store(format!("listing {}", repo.describe(&dir)), e))?
    {
        if ordered {
            if let (Some(stop), Some(file)) = (&stop, meta.location.filename()) {
                if file.get(..24).is_some_and(|n| n >= stop.as_str()) {
                    break;
                }
            }
        }
        out.push(meta);
    }
    Ok(out)
}

/// The archive record and the listing from `name` on, in parallel: one round trip.
async fn resolve(
    repo: &Repository,
    timeline: TimelineId,
    name: &str,
    ahead: usize,
) -> Result<(Option<ArchiveParams>, Vec<object_store::ObjectMeta>)> {
    let (params, listing) = tokio::join!(
        archive_params(repo),
        list_from_name(repo, timeline, name, ahead)
    );
    Ok((params?, listing?))
}

/// The 24-digit name one lower, textually (`…0100000000` → `…00FFFFFFFF`); `None` for
/// the lowest name of a timeline.
fn lower_name(name: &str) -> Option<String> {
    let log = u64::from_str_radix(name.get(8..16)?, 16).ok()?;
    let seg = u64::from_str_radix(name.get(16..24)?, 16).ok()?;
    let (log, seg) = if seg > 0 {
        (log, seg - 1)
    } else if log > 0 {
        (log - 1, 0xFFFF_FFFF)
    } else {
        return None;
    };
    Some(format!("{}{log:08X}{seg:08X}", name.get(..8)?))
}

/// A name above every name within `count` segments after `name`, whatever the segment
/// size (unknown while listing): segment `count` of the next log id. Within the log id
/// everything after `name` is listed (256 segments at most with 16 MiB segments).
/// `None` at the end of the name space.
fn stop_name(name: &str, count: u64) -> Option<String> {
    let log = u64::from_str_radix(name.get(8..16)?, 16).ok()?;
    let log = log.checked_add(1).filter(|l| *l <= 0xFFFF_FFFF)?;
    Some(format!(
        "{}{log:08X}{:08X}",
        name.get(..8)?,
        count.min(0xFFFF_FFFF)
    ))
}

fn index_listing(
    repo: &Repository,
    listing: Vec<object_store::ObjectMeta>,
    timeline: TimelineId,
    segment_size: WalSegmentSize,
) -> BTreeMap<u64, Listed> {
    let prefix = repo.path("");
    let mut out: BTreeMap<u64, Listed> = BTreeMap::new();
    for meta in listing {
        let full = meta.location.as_ref();
        let relative = full
            .strip_prefix(prefix.as_ref())
            .unwrap_or(full)
            .trim_start_matches('/');
        match walnames::parse_wal_object(relative, segment_size) {
            Some(WalObject::Complete {
                timeline: t,
                segment,
                compressed,
            }) if t == timeline => {
                let slot = &mut out.entry(segment).or_default().complete;
                // The compressed form wins when both exist (either is complete).
                if slot.as_ref().is_none_or(|(_, c, _)| !c) {
                    *slot = Some((meta.location.clone(), compressed, meta.size));
                }
            }
            Some(WalObject::Partial {
                timeline: t,
                segment,
                from,
                to,
            }) if t == timeline => {
                out.entry(segment)
                    .or_default()
                    .pieces
                    .push((from, to, meta.location.clone()));
            }
            _ => {}
        }
    }
    out
}

/// Downloads, decompresses and verifies a complete segment.
async fn fetch_complete(
    repo: &Repository,
    path: &ObjectPath,
    compressed: bool,
    listed_size: u64,
    timeline: TimelineId,
    number: u64,
    params: ArchiveParams,
) -> Result<(Bytes, u64)> {
    let what = repo.describe(path);
    let size = params.segment_size.bytes();
    // zstd never grows data by more than a small fraction; anything larger is not ours.
    let limit = if compressed {
        size + size / 64 + 4096
    } else {
        size
    };
    if listed_size > limit || (!compressed && listed_size != size) {
        return Err(wal_damage(
            &what,
            format!("holds {listed_size} bytes, which a {size}-byte segment cannot be stored as"),
        ));
    }
    let stored = repo.get_bytes(path, limit).await?;
    let segment = if compressed {
        let what = what.clone();
        tokio::task::spawn_blocking(move || decompress(&stored, size, &what))
            .await
            .map_err(|e| Error::usage(format!("decompressing {e}"), "report this bug"))??
    } else {
        stored
    };
    if segment.len() as u64 != size {
        return Err(wal_damage(
            &what,
            format!(
                "holds {} bytes of WAL, not the segment size {size}",
                segment.len()
            ),
        ));
    }
    let checked = segment.clone();
    let records =
        tokio::task::spawn_blocking(move || verify_wal(&checked, timeline, number, params, &what))
            .await
            .map_err(|e| Error::usage(format!("verifying {e}"), "report this bug"))??;
    Ok((segment, records))
}

/// Decompresses one zstd segment, refusing more than `size` bytes of output.
fn decompress(stored: &[u8], size: u64, what: &str) -> Result<Bytes> {
    let mut decoder = zstd::stream::read::Decoder::new(stored)
        .map_err(|e| wal_damage(what, format!("not zstd: {e}")))?;
    let mut out = Vec::with_capacity(size as usize);
    let read =
        std::io::Read::read_to_end(&mut std::io::Read::take(&mut decoder, size + 1), &mut out)
            .map_err(|e| wal_damage(what, format!("does not decompress: {e}")))?;
    if read as u64 > size {
        return Err(wal_damage(
            what,
            format!("decompresses to more than the segment size {size}"),
        ));
    }
    Ok(Bytes::from(out))
}

/// Verifies WAL from the start of segment `number`; returns the records checked.
fn verify_wal(
    bytes: &[u8],
    timeline: TimelineId,
    number: u64,
    params: ArchiveParams,
    what: &str,
) -> Result<u64> {
    let start = Lsn(number.saturating_mul(params.segment_size.bytes()));
    let mut verifier = WalVerifier::new(
        start,
        VerifierConfig {
            segment_size: params.segment_size,
            server_major: None,
            system_id: Some(SystemId(params.system_id)),
            timeline,
            verify_records: true,
        },
    );
    verifier
        .feed(start, bytes)
        .map_err(|e| wal_damage(what, e))?;
    Ok(verifier.records_verified())
}

/// Downloads the contiguous pieces from offset 0 and verifies them.
async fn fetch_partial(
    repo: &Repository,
    pieces: &[(u64, u64, ObjectPath)],
    timeline: TimelineId,
    number: u64,
    params: ArchiveParams,
) -> Result<Option<(Bytes, u64)>> {
    let run: Vec<_> = crate::walarchive::contiguous_run(pieces)
        .into_iter()
        .map(|(index, keep_from)| {
            let (from, to, path) = &pieces[index];
            (*from, *to, path.clone(), keep_from)
        })
        .collect();
    let end = run.last().map_or(0, |piece| piece.1);
    let name = wal_file_name(timeline, number, params.segment_size);
    if run.is_empty() {
        return Err(wal_damage(
            format!("{} ({name})", repo.url()),
            "its partial pieces do not start at offset 0",
        ));
    }
    let fetched: Vec<Option<Bytes>> = futures::stream::iter(run.into_iter().map(
        |(from, to, path, keep_from)| async move {
            let Some(bytes) = repo.get_optional(&path, to - from).await? else {
                return Ok(None);
            };
            if bytes.len() as u64 != to - from {
                return Err(wal_damage(
                    repo.describe(&path),
                    format!("holds {} bytes, its name says {}", bytes.len(), to - from),
                ));
            }
            let skip = (keep_from - from) as usize;
            Ok(Some(bytes.slice(skip..)))
        },
    ))
    .buffered(PIECE_CONCURRENCY)
    .try_collect()
    .await?;
    let mut segment = Vec::with_capacity(end as usize);
    for piece in fetched {
        let Some(piece) = piece else {
            return Ok(None);
        };
        segment.extend_from_slice(&piece);
    }
    let segment = Bytes::from(segment);
    let checked = segment.clone();
    let what = format!(
        "{}/{}/{name}.partial.*",
        repo.url(),
        walnames::timeline_dir(timeline)
    );
    let records =
        tokio::task::spawn_blocking(move || verify_wal(&checked, timeline, number, params, &what))
            .await
            .map_err(|e| Error::usage(format!("verifying {e}"), "report this bug"))??;
    Ok(Some((segment, records)))
}

/// Writes `bytes` then `pad` zeros to a temporary file beside `dest`, syncs it and
/// renames it over `dest` (then syncs the directory). On failure nothing is left.
async fn write_atomically(dest: &Path, bytes: Bytes, pad: u64) -> Result<()> {
    let dest = dest.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let temp = temp_name(&dest);
        let result = (|| {
            let mut file = std::fs::File::create(&temp)?;
            file.write_all(&bytes)?;
            let zeros = [0u8; 64 << 10];
            let mut left = pad;
            while left > 0 {
                let n = left.min(zeros.len() as u64) as usize;
                file.write_all(&zeros[..n])?;
                left -= n as u64;
            }
            file.sync_all()?;
            drop(file);
            std::fs::rename(&temp, &dest)?;
            sync_dir(&dest)
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&temp);
            return Err(Error::io("writing", &dest, e));
        }
        Ok(())
    })
    .await
    .map_err(|e| Error::usage(format!("writing {e}"), "report this bug"))?
}

fn temp_name(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.pgrepo-{}.tmp", std::process::id()))
}

fn sync_dir(file: &Path) -> std::io::Result<()> {
    match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::File::open(dir)?.sync_all(),
        _ => std::fs::File::open(".")?.sync_all(),
    }
}

/// Moves `cache/file` to `dest` if it is there; returns the segment size (its length).
async fn take_from_cache(cache: &Path, file: &str, dest: &Path) -> Result<Option<WalSegmentSize>> {
    let cached = cache.join(file);
    let dest = dest.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let meta = match std::fs::symlink_metadata(&cached) {
            Ok(meta) if meta.is_file() => meta,
            _ => return Ok(None),
        };
        let Ok(size) = WalSegmentSize::new(meta.len()) else {
            // Not something this cache holds: ignore it and fetch from the store.
            let _ = std::fs::remove_file(&cached);
            return Ok(None);
        };
        match std::fs::rename(&cached, &dest) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::CrossesDevices => {
                // Another file system: copy through a temporary file.
                let temp = temp_name(&dest);
                let copied = std::fs::copy(&cached, &temp)
                    .and_then(|_| std::fs::File::open(&temp)?.sync_all())
                    .and_then(|()| std::fs::rename(&temp, &dest));
                if let Err(e) = copied {
                    let _ = std::fs::remove_file(&temp);
                    return Err(Error::io("copying the prefetched segment to", &dest, e));
                }
                let _ = std::fs::remove_file(&cached);
            }
            Err(e) => return Err(Error::io("moving the prefetched segment to", &dest, e)),
        }
        sync_dir(&dest).map_err(|e| Error::io("syncing the directory of", &dest, e))?;
        Ok(Some(size))
    })
    .await
    .map_err(|e| Error::usage(format!("reading the cache {e}"), "report this bug"))?
}

/// Removes cache entries below segment `number` (any timeline) and temporary files of
/// other processes. Failures are ignored: the cache is only an optimisation.
async fn remove_older(cache: &Path, number: u64, segment_size: WalSegmentSize) {
    let cache = cache.to_path_buf();
    let own = format!(".pgrepo-{}.tmp", std::process::id());
    let _ = tokio::task::spawn_blocking(move || {
        let Ok(entries) = std::fs::read_dir(&cache) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale = if name.ends_with(".tmp") {
                !name.ends_with(&own)
            } else {
                parse_wal_file_name(&name, segment_size).is_some_and(|(_, n)| n < number)
            };
            if stale {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    })
    .await;
}

/// How many of the `window` segments after `number` of `timeline` are in the cache.
async fn cached_ahead(
    cache: &Path,
    timeline: TimelineId,
    number: u64,
    window: usize,
    segment_size: WalSegmentSize,
) -> usize {
    (1..=window as u64)
        .filter(|i| {
            number
                .checked_add(*i)
                .map(|n| {
                    cache
                        .join(wal_file_name(timeline, n, segment_size))
                        .is_file()
                })
                .unwrap_or(false)
        })
        .count()
}

/// Fetches the complete segments among the next `options.prefetch` after `number` that
/// are not cached yet into the cache, verified; returns how many were placed. Failures
/// only leave a segment out (the later request fetches it and reports the error).
async fn prefetch(
    repo: &Repository,
    cache: &Path,
    timeline: TimelineId,
    number: u64,
    listing: &BTreeMap<u64, Listed>,
    params: ArchiveParams,
    options: &FetchOptions,
) -> usize {
    let wanted: Vec<(u64, ObjectPath, bool, u64)> = (1..=options.prefetch as u64)
        .filter_map(|i| number.checked_add(i))
        .filter(|n| {
            !cache
                .join(wal_file_name(timeline, *n, params.segment_size))
                .is_file()
        })
        .filter_map(|n| {
            let (path, compressed, size) = listing.get(&n)?.complete.clone()?;
            Some((n, path, compressed, size))
        })
        .collect();
    if wanted.is_empty() {
        return 0;
    }
    if let Err(e) = std::fs::create_dir_all(cache) {
        tracing::warn!("not prefetching: cannot create {}: {e}", cache.display());
        return 0;
    }
    let work = futures::stream::iter(wanted.into_iter().map(
        |(n, path, compressed, size)| async move {
            let (bytes, _) =
                fetch_complete(repo, &path, compressed, size, timeline, n, params).await?;
            let name = wal_file_name(timeline, n, params.segment_size);
            write_atomically(&cache.join(name), bytes, 0).await
        },
    ))
    .buffer_unordered(PREFETCH_CONCURRENCY)
    .fold(0usize, |placed, result| async move {
        match result {
            Ok(()) => placed + 1,
            Err(e) => {
                tracing::warn!("prefetch: {e}");
                placed
            }
        }
    });
    match tokio::time::timeout(options.prefetch_wait, work).await {
        Ok(placed) => placed,
        Err(_) => {
            tracing::warn!(
                "prefetch: not finished after {:?}; the rest is fetched when requested",
                options.prefetch_wait
            );
            // Dropped writes may leave temporary files: the next call removes them.
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use walstream::decode::synth::{SynthOptions, WalBuilder};

    const SIZE: u64 = 1 << 20;
    const SYSTEM: u64 = 7_000_000_000_000_000_123;

    /// Segments 1..=4 of timeline 1, full of records.
    fn segments() -> Vec<Vec<u8>> {
        let size = WalSegmentSize::new(SIZE).unwrap();
        let mut options = SynthOptions::new(size, 16);
        options.system_id = SYSTEM;
        let mut builder = WalBuilder::new(Lsn(SIZE), options);
        while builder.position().0 < 5 * SIZE - 8192 {
            builder.record(0, 0, &[9u8; 500]);
        }
        builder.zeros_until(Lsn(5 * SIZE));
        builder
            .into_bytes()
            .chunks(SIZE as usize)
            .map(<[u8]>::to_vec)
            .collect()
    }

    fn name(n: u64) -> String {
        wal_file_name(TimelineId(1), n, WalSegmentSize::new(SIZE).unwrap())
    }

    async fn put(repo: &Repository, relative: &str, bytes: &[u8]) {
        repo.put_bytes(&repo.path(relative), Bytes::copy_from_slice(bytes))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn fetches_verifies_pads_and_prefetches_from_a_store() {
        let repo = Repository::open("memory://fetch/x", &Default::default()).unwrap();
        let record =
            format!(r#"{{"format":1,"system_identifier":"{SYSTEM}","segment_size":{SIZE}}}"#);
        put(&repo, walnames::ARCHIVE_RECORD, record.as_bytes()).await;
        let wal = segments();
        for n in 1..=2u64 {
            let bytes = zstd::bulk::compress(&wal[n as usize - 1], 1).unwrap();
            put(
                &repo,
                &walnames::segment_object(TimelineId(1), &name(n), true),
                &bytes,
            )
            .await;
        }
        put(
            &repo,
            &walnames::segment_object(TimelineId(1), &name(3), false),
            &wal[2],
        )
        .await;
        for (from, to) in [(0u64, 5000u64), (4000, 9000), (12000, 13000)] {
            let object = walnames::partial_object(TimelineId(1), &name(4), from, to);
            put(&repo, &object, &wal[3][from as usize..to as usize]).await;
        }
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("RECOVERYXLOG");
        let options = FetchOptions::default();

        let got = fetch_wal_file(&repo, &name(1), &dest, &options)
            .await
            .unwrap();
        assert!(
            matches!(
                got,
                FetchOutcome::Fetched {
                    from: FetchedFrom::Store,
                    prefetched: 2,
                    ..
                }
            ),
            "{got:?}"
        );
        assert_eq!(std::fs::read(&dest).unwrap(), wal[0]);
        let got = fetch_wal_file(&repo, &name(2), &dest, &options)
            .await
            .unwrap();
        assert!(
            matches!(
                got,
                FetchOutcome::Fetched {
                    from: FetchedFrom::Cache,
                    ..
                }
            ),
            "{got:?}"
        );
        assert_eq!(std::fs::read(&dest).unwrap(), wal[1]);

        // Pieces: missing without `partial`; with it, the run from 0 (to the hole), padded.
        std::fs::remove_file(&dest).unwrap();
        assert_eq!(
            fetch_wal_file(&repo, &name(4), &dest, &options)
                .await
                .unwrap(),
            FetchOutcome::Missing
        );
        assert!(!dest.exists());
        let partial = FetchOptions {
            partial: true,
            ..FetchOptions::default()
        };
        let got = fetch_wal_file(&repo, &name(4), &dest, &partial)
            .await
            .unwrap();
        assert!(
            matches!(
                got,
                FetchOutcome::Fetched {
                    from: FetchedFrom::Partial { end: 9000 },
                    ..
                }
            ),
            "{got:?}"
        );
        let served = std::fs::read(&dest).unwrap();
        assert_eq!(served.len() as u64, SIZE);
        assert_eq!(served[..9000], wal[3][..9000]);
        assert!(served[9000..].iter().all(|b| *b == 0));

        // Damage in the store: an error, nothing written, no temporary file left.
        std::fs::remove_file(&dest).unwrap();
        let mut bad = wal[4 - 1].clone();
        bad[300_000..300_008].iter_mut().for_each(|b| *b ^= 0xff);
        put(
            &repo,
            &walnames::segment_object(TimelineId(1), &name(4), false),
            &bad,
        )
        .await;
        let err = fetch_wal_file(&repo, &name(4), &dest, &options)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Verify, "{err}");
        for garbage in [&b"not zstd"[..], &[0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0][..]] {
            put(
                &repo,
                &walnames::segment_object(TimelineId(1), &name(4), true),
                garbage,
            )
            .await;
            assert!(fetch_wal_file(&repo, &name(4), &dest, &options)
                .await
                .is_err());
        }
        assert!(!dest.exists());
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [std::ffi::OsString::from(CACHE_DIR_NAME)]);

        // Beyond the archive, and names that are not WAL.
        assert_eq!(
            fetch_wal_file(&repo, &name(9), &dest, &options)
                .await
                .unwrap(),
            FetchOutcome::Missing
        );
        assert_eq!(
            fetch_wal_file(&repo, "00000002.history", &dest, &options)
                .await
                .unwrap(),
            FetchOutcome::Missing
        );
        assert!(fetch_wal_file(&repo, "../../etc/passwd", &dest, &options)
            .await
            .is_err());
    }

    #[test]
    fn neighbouring_names() {
        assert_eq!(
            lower_name("000000010000000100000000").as_deref(),
            Some("0000000100000000FFFFFFFF")
        );
        assert_eq!(
            lower_name("000000010000000000000005").as_deref(),
            Some("000000010000000000000004")
        );
        assert_eq!(lower_name("000000010000000000000000"), None);
        assert_eq!(
            stop_name("0000000100000000000000FE", 9).as_deref(),
            Some("000000010000000100000009")
        );
        assert_eq!(stop_name("00000001FFFFFFFF00000001", 1), None);
        // The offset of a listing sorts between a segment's objects and the next one's.
        let lower = format!("{}Z", lower_name("000000010000000000000005").unwrap());
        assert!(lower.as_str() > "000000010000000000000004.zst");
        assert!(lower.as_str() > "000000010000000000000004.partial.00000000-00001000");
        assert!(lower.as_str() < "000000010000000000000005");
    }
}
