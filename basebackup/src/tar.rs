//! An incremental (push) tar parser with the safety checks a backup extractor needs (pure).
//!
//! Chunks of any size go in; events come out, with file data handed on as zero-copy
//! slices of the input [`Bytes`]. It accepts ustar as PostgreSQL writes it (§5 of the
//! protocol reference: bare relative names, `./` prefixes, trailing `/` on directories and
//! links, base-256 numbers), plus GNU long names and PAX `path`/`linkpath`/`size` records,
//! and an archive that ends without the trailer (13/14).
//!
//! Rejected, with an [`ErrorKind::Unsafe`](crate::ErrorKind::Unsafe) error naming the entry:
//! absolute paths, `..` or `.` components, NUL bytes in names, hard links, device files,
//! FIFOs, duplicates, entries beneath a symbolic link, and any symbolic link other than a
//! `pg_tblspc/<oid>` tablespace link in the base archive.

use std::collections::HashSet;

use bytes::Bytes;

use crate::error::{Error, Result};

const BLOCK: usize = 512;
/// Limit for GNU long-name and PAX records (names are at most a few KiB in practice).
const MAX_META: u64 = 64 * 1024;

/// What the parser found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TarEvent {
    /// A directory (path normalised: no `./` prefix, no trailing `/`).
    Directory {
        /// Relative path.
        path: Vec<u8>,
        /// Permission bits (`mode & 0o777`).
        mode: u32,
    },
    /// A regular file starts; [`TarEvent::Data`] chunks and [`TarEvent::FileEnd`] follow.
    File {
        /// Relative path.
        path: Vec<u8>,
        /// Permission bits (`mode & 0o777`).
        mode: u32,
        /// Size in bytes.
        size: u64,
    },
    /// A chunk of the current file: a slice of the input, not a copy.
    Data(Bytes),
    /// The current file is complete.
    FileEnd,
    /// A tablespace link `pg_tblspc/<oid>`.
    Symlink {
        /// Relative path of the link.
        path: Vec<u8>,
        /// Its target, as the server sent it.
        target: Vec<u8>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MetaKind {
    GnuLongName,
    GnuLongLink,
    Pax,
    PaxGlobal,
}

#[derive(Debug)]
enum State {
    Header,
    Data {
        remaining: u64,
        padding: usize,
    },
    Padding(usize),
    Meta {
        kind: MetaKind,
        remaining: u64,
        padding: usize,
    },
    Ended,
}

/// The incremental tar parser. See the module documentation.
///
/// ```
/// use basebackup::tar::{TarParser, TarEvent};
/// # fn archive() -> Vec<u8> {
/// #     let mut b = tar::Builder::new(Vec::new());
/// #     let mut h = tar::Header::new_ustar();
/// #     h.set_path("PG_VERSION").unwrap(); h.set_size(3); h.set_mode(0o600); h.set_cksum();
/// #     b.append(&h, &b"15\n"[..]).unwrap();
/// #     b.into_inner().unwrap()
/// # }
/// let mut parser = TarParser::new(true);
/// let mut events = Vec::new();
/// parser.push(bytes::Bytes::from(archive()), &mut |e| { events.push(e); Ok(()) }).unwrap();
/// parser.finish().unwrap();
/// assert_eq!(events[0], TarEvent::File { path: b"PG_VERSION".to_vec(), mode: 0o600, size: 3 });
/// ```
#[derive(Debug)]
pub struct TarParser {
    state: State,
    header: [u8; BLOCK],
    fill: usize,
    meta: Vec<u8>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax_size: Option<u64>,
    current: Vec<u8>,
    seen: HashSet<Vec<u8>>,
    links: HashSet<Vec<u8>>,
    allow_tablespace_links: bool,
    trailer_seen: bool,
}

impl TarParser {
    /// A parser; `allow_tablespace_links` is true for the base archive, where
    /// `pg_tblspc/<oid>` links are expected.
    pub fn new(allow_tablespace_links: bool) -> TarParser {
        TarParser {
            state: State::Header,
            header: [0; BLOCK],
            fill: 0,
            meta: Vec::new(),
            long_name: None,
            long_link: None,
            pax_size: None,
            current: Vec::new(),
            seen: HashSet::new(),
            links: HashSet::new(),
            allow_tablespace_links,
            trailer_seen: false,
        }
    }

    /// True once the end-of-archive block was seen (15+ servers send it; 13/14 do not).
    pub fn trailer_seen(&self) -> bool {
        self.trailer_seen
    }

    /// Feeds the next chunk; `out` receives the events in order.
    pub fn push(
        &mut self,
        chunk: Bytes,
        out: &mut dyn FnMut(TarEvent) -> Result<()>,
    ) -> Result<()> {
        let mut pos = 0;
        while pos < chunk.len() {
            let avail = chunk.len() - pos;
            match &mut self.state {
                State::Header => {
                    let take = (BLOCK - self.fill).min(avail);
                    self.header[self.fill..self.fill + take]
                        .copy_from_slice(&chunk[pos..pos + take]);
                    self.fill += take;
                    pos += take;
                    if self.fill == BLOCK {
                        self.fill = 0;
                        self.process_header(out)?;
                    }
                }
                State::Data { remaining, padding } => {
                    let take = usize::try_from(*remaining).unwrap_or(usize::MAX).min(avail);
                    *remaining -= take as u64;
                    let done = *remaining == 0;
                    let padding = *padding;
                    out(TarEvent::Data(chunk.slice(pos..pos + take)))?;
                    pos += take;
                    if done {
                        out(TarEvent::FileEnd)?;
                        self.state = next_after(padding);
                    }
                }
                State::Padding(left) => {
                    let take = (*left).min(avail);
                    *left -= take;
                    pos += take;
                    if *left == 0 {
                        self.state = State::Header;
                    }
                }
                State::Meta {
                    kind,
                    remaining,
                    padding,
                } => {
                    let take = usize::try_from(*remaining).unwrap_or(usize::MAX).min(avail);
                    self.meta.extend_from_slice(&chunk[pos..pos + take]);
                    *remaining -= take as u64;
                    pos += take;
                    if *remaining == 0 {
                        let (kind, padding) = (*kind, *padding);
                        self.state = next_after(padding);
                        self.finish_meta(kind)?;
                    }
                }
                State::Ended => {
                    if chunk[pos..].iter().any(|&b| b != 0) {
                        return Err(Error::protocol(
                            "the archive has data after its end-of-archive block",
                        ));
                    }
                    pos = chunk.len();
                }
            }
        }
        Ok(())
    }

    /// Declares the end of the input; fails if it stopped inside an entry.
    pub fn finish(&mut self) -> Result<()> {
        match &self.state {
            State::Header if self.fill == 0 && self.long_name.is_none() && self.pax_size.is_none() => Ok(()),
            State::Ended => Ok(()),
            State::Padding(_) => Ok(()),
            State::Header => Err(Error::protocol(format!(
                "the archive ends in the middle of a header (after {})",
                display(&self.current)
            ))),
            State::Data { remaining, .. } => Err(Error::verify(
                display(&self.current),
                format!("the archive ends {remaining} bytes before the end of this file (truncated stream)"),
            )),
            State::Meta { .. } => Err(Error::protocol("the archive ends in the middle of an extended header")),
        }
    }

    fn process_header(&mut self, out: &mut dyn FnMut(TarEvent) -> Result<()>) -> Result<()> {
        let h = self.header;
        if h.iter().all(|&b| b == 0) {
            self.trailer_seen = true;
            self.state = State::Ended;
            return Ok(());
        }
        // A bad header is most often the previous entry's fault (a size that disagrees
        // with its data shifts every later header), so the messages name that entry.
        // (Built only on error: this runs once per entry.)
        let after = |previous: &[u8]| {
            if previous.is_empty() {
                String::new()
            } else {
                format!(" after entry {:?}", display(previous))
            }
        };
        let stored = parse_number(&h[148..156]).ok_or_else(|| {
            Error::protocol(format!(
                "a tar header{} has an unreadable checksum field (not a tar stream, or the previous entry's size is wrong?)",
                after(&self.current)
            ))
        })?;
        let unsigned: u64 = h
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u64::from(b)
                }
            })
            .sum();
        let signed: i64 = h
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    i64::from(b as i8)
                }
            })
            .sum();
        let raw_name = field(&h[0..100]);
        if stored != unsigned && i64::try_from(stored).ok() != Some(signed) {
            return Err(Error::protocol(format!(
                "tar header checksum mismatch for entry {:?}{} (stored {stored}, computed {unsigned}): the stream is corrupt",
                display(raw_name),
                after(&self.current)
            )));
        }
        let typeflag = h[156];
        let mut size = parse_number(&h[124..136]).ok_or_else(|| {
            Error::protocol(format!(
                "unreadable size field in the tar header of {:?}",
                display(raw_name)
            ))
        })?;
        if let Some(pax) = self.pax_size.take() {
            size = pax;
        }
        let padding = pad(size);
        match typeflag {
            b'L' | b'K' | b'x' | b'g' => {
                if size > MAX_META {
                    return Err(Error::protocol(format!(
                        "extended tar header of {size} bytes is too large"
                    )));
                }
                let kind = match typeflag {
                    b'L' => MetaKind::GnuLongName,
                    b'K' => MetaKind::GnuLongLink,
                    b'x' => MetaKind::Pax,
                    _ => MetaKind::PaxGlobal,
                };
                self.meta.clear();
                self.state = if size == 0 {
                    State::Header
                } else {
                    State::Meta {
                        kind,
                        remaining: size,
                        padding,
                    }
                };
                if size == 0 {
                    self.finish_meta(kind)?;
                }
                return Ok(());
            }
            _ => {}
        }
        let name = match self.long_name.take() {
            Some(n) => n,
            None => {
                let name = checked_field(&h[0..100], raw_name)?;
                let magic_ustar = &h[257..262] == b"ustar";
                let prefix = if magic_ustar {
                    checked_field(&h[345..500], raw_name)?
                } else {
                    &[][..]
                };
                if prefix.is_empty() {
                    name.to_vec()
                } else {
                    let mut p = prefix.to_vec();
                    p.push(b'/');
                    p.extend_from_slice(name);
                    p
                }
            }
        };
        let link = match self.long_link.take() {
            Some(l) => l,
            None => checked_field(&h[157..257], raw_name)?.to_vec(),
        };
        let mode = parse_number(&h[100..108]).unwrap_or(0o600) as u32 & 0o777;
        let path = normalize(&name)?;
        self.current = path.clone();
        if path.is_empty() {
            // "./" itself: the archive root, which exists already.
            if typeflag == b'5' && size == 0 {
                return Ok(());
            }
            return Err(Error::unsafe_entry(
                display(&name),
                "an entry with an empty name",
            ));
        }
        self.check_parents(&path)?;
        if !self.seen.insert(path.clone()) {
            return Err(Error::unsafe_entry(
                display(&path),
                "duplicate entry in the archive",
            ));
        }
        match typeflag {
            b'0' | 0 | b'7' => {
                out(TarEvent::File { path, mode, size })?;
                if size == 0 {
                    out(TarEvent::FileEnd)?;
                    self.state = State::Header;
                } else {
                    self.state = State::Data {
                        remaining: size,
                        padding,
                    };
                }
            }
            b'5' => {
                if size != 0 {
                    return Err(Error::protocol(format!(
                        "directory {:?} has a size of {size}",
                        display(&path)
                    )));
                }
                out(TarEvent::Directory { path, mode })?;
            }
            b'2' => {
                if size != 0 {
                    return Err(Error::protocol(format!(
                        "link {:?} has a size of {size}",
                        display(&path)
                    )));
                }
                if !self.allow_tablespace_links || !is_tablespace_link(&path) {
                    return Err(Error::unsafe_entry(
                        display(&path),
                        format!(
                            "symbolic link to {:?}: only pg_tblspc/<oid> tablespace links are allowed in a base backup",
                            display(&link)
                        ),
                    ));
                }
                if link.is_empty() || link.contains(&0) {
                    return Err(Error::unsafe_entry(
                        display(&path),
                        "link with an empty or NUL-containing target",
                    ));
                }
                self.links.insert(path.clone());
                out(TarEvent::Symlink { path, target: link })?;
            }
            b'1' => {
                return Err(Error::unsafe_entry(
                    display(&path),
                    format!(
                        "hard link to {:?}: hard links are not allowed",
                        display(&link)
                    ),
                ))
            }
            b'3' | b'4' => {
                return Err(Error::unsafe_entry(
                    display(&path),
                    "device files are not allowed",
                ))
            }
            b'6' => return Err(Error::unsafe_entry(display(&path), "FIFOs are not allowed")),
            other => {
                return Err(Error::unsafe_entry(
                    display(&path),
                    format!("unsupported tar entry type {:?}", other as char),
                ))
            }
        }
        Ok(())
    }

    fn check_parents(&self, path: &[u8]) -> Result<()> {
        for (i, &b) in path.iter().enumerate() {
            if b == b'/' && self.links.contains(&path[..i]) {
                return Err(Error::unsafe_entry(
                    display(path),
                    format!("entry beneath the symbolic link {:?}", display(&path[..i])),
                ));
            }
        }
        Ok(())
    }

    fn finish_meta(&mut self, kind: MetaKind) -> Result<()> {
        let data = std::mem::take(&mut self.meta);
        match kind {
            MetaKind::GnuLongName | MetaKind::GnuLongLink => {
                let value = strip_nul_terminator(&data)?;
                if kind == MetaKind::GnuLongName {
                    self.long_name = Some(value);
                } else {
                    self.long_link = Some(value);
                }
            }
            MetaKind::PaxGlobal => {}
            MetaKind::Pax => {
                let mut rest = &data[..];
                while !rest.is_empty() {
                    let space = rest.iter().position(|&b| b == b' ').ok_or_else(bad_pax)?;
                    let len: usize = std::str::from_utf8(&rest[..space])
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(bad_pax)?;
                    if len <= space + 1 || len > rest.len() || rest[len - 1] != b'\n' {
                        return Err(bad_pax());
                    }
                    let record = &rest[space + 1..len - 1];
                    let eq = record.iter().position(|&b| b == b'=').ok_or_else(bad_pax)?;
                    let (key, value) = (&record[..eq], &record[eq + 1..]);
                    if value.contains(&0) {
                        return Err(Error::unsafe_entry(
                            display(value),
                            "NUL byte in a PAX value",
                        ));
                    }
                    match key {
                        b"path" => self.long_name = Some(value.to_vec()),
                        b"linkpath" => self.long_link = Some(value.to_vec()),
                        b"size" => {
                            self.pax_size = Some(
                                std::str::from_utf8(value)
                                    .ok()
                                    .and_then(|s| s.parse().ok())
                                    .ok_or_else(bad_pax)?,
                            )
                        }
                        _ => {}
                    }
                    rest = &rest[len..];
                }
            }
        }
        Ok(())
    }
}

fn bad_pax() -> Error {
    Error::protocol("malformed PAX extended header record")
}

fn strip_nul_terminator(data: &[u8]) -> Result<Vec<u8>> {
    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    if data[end..].iter().any(|&b| b != 0) {
        return Err(Error::unsafe_entry(
            display(&data[..end]),
            "NUL byte inside a long name",
        ));
    }
    Ok(data[..end].to_vec())
}

fn next_after(padding: usize) -> State {
    if padding == 0 {
        State::Header
    } else {
        State::Padding(padding)
    }
}

fn pad(size: u64) -> usize {
    ((BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64) as usize
}

/// The bytes of a NUL-terminated header field.
fn field(raw: &[u8]) -> &[u8] {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    &raw[..end]
}

/// Like [`field`], but rejects anything other than NULs after the terminator (a name with
/// an embedded NUL would mean one thing to us and another to other tools).
fn checked_field<'a>(raw: &'a [u8], name: &[u8]) -> Result<&'a [u8]> {
    let value = field(raw);
    if raw[value.len()..].iter().any(|&b| b != 0) {
        return Err(Error::unsafe_entry(display(name), "NUL byte inside a name"));
    }
    Ok(value)
}

/// Parses an octal (space/NUL padded) or base-256 numeric field.
pub fn parse_number(raw: &[u8]) -> Option<u64> {
    if raw.first().is_some_and(|&b| b & 0x80 != 0) {
        if raw[0] != 0x80 {
            return None; // negative or oversized
        }
        let mut value: u64 = 0;
        for &b in &raw[1..] {
            value = value.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(value);
    }
    let mut value: u64 = 0;
    let mut i = 0;
    while i < raw.len() && (raw[i] == b' ' || raw[i] == 0) {
        i += 1;
    }
    while i < raw.len() && (b'0'..=b'7').contains(&raw[i]) {
        value = value
            .checked_mul(8)?
            .checked_add(u64::from(raw[i] - b'0'))?;
        i += 1;
    }
    if raw[i..].iter().any(|&b| b != b' ' && b != 0) {
        return None;
    }
    Some(value)
}

/// Strips `./` prefixes and one trailing `/`, and rejects absolute paths, `..`, `.` and
/// empty components, and NUL bytes.
pub fn normalize(name: &[u8]) -> Result<Vec<u8>> {
    if name.contains(&0) {
        return Err(Error::unsafe_entry(display(name), "NUL byte inside a name"));
    }
    if name.first() == Some(&b'/') {
        return Err(Error::unsafe_entry(display(name), "absolute path"));
    }
    let mut p = name;
    while let Some(rest) = p.strip_prefix(b"./") {
        p = rest;
    }
    if p == b"." {
        p = b"";
    }
    let p = p.strip_suffix(b"/").unwrap_or(p);
    if p.is_empty() {
        return Ok(Vec::new());
    }
    for comp in p.split(|&b| b == b'/') {
        match comp {
            b".." => return Err(Error::unsafe_entry(display(name), "path contains `..`")),
            b"." | b"" => {
                return Err(Error::unsafe_entry(
                    display(name),
                    "path contains an empty or `.` component",
                ))
            }
            _ => {}
        }
    }
    Ok(p.to_vec())
}

/// `pg_tblspc/<digits>`.
fn is_tablespace_link(path: &[u8]) -> bool {
    path.strip_prefix(b"pg_tblspc/")
        .is_some_and(|oid| !oid.is_empty() && oid.iter().all(u8::is_ascii_digit))
}

/// A path for messages (lossy UTF-8).
pub fn display(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use proptest::prelude::*;

    fn header(name: &[u8], typeflag: u8, size: u64, link: &[u8]) -> [u8; 512] {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name);
        h[100..108].copy_from_slice(b"0000600 ");
        h[108..116].copy_from_slice(b"0000000 ");
        h[116..124].copy_from_slice(b"0000000 ");
        h[124..136].copy_from_slice(format!("{size:011o} ").as_bytes());
        h[136..148].copy_from_slice(b"00000000000 ");
        h[156] = typeflag;
        h[157..157 + link.len()].copy_from_slice(link);
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        set_checksum(&mut h);
        h
    }

    fn set_checksum(h: &mut [u8; 512]) {
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:07o} ").as_bytes());
    }

    fn file(name: &[u8], data: &[u8]) -> Vec<u8> {
        let mut v = header(name, b'0', data.len() as u64, b"").to_vec();
        v.extend_from_slice(data);
        v.resize(v.len() + pad(data.len() as u64), 0);
        v
    }

    fn parse_all(stream: &[u8], base: bool) -> Result<Vec<TarEvent>> {
        let mut p = TarParser::new(base);
        let mut events = Vec::new();
        p.push(Bytes::copy_from_slice(stream), &mut |e| {
            events.push(e);
            Ok(())
        })?;
        p.finish()?;
        Ok(events)
    }

    /// Merges data chunks so that different chunkings compare equal.
    fn merged(events: Vec<TarEvent>) -> Vec<TarEvent> {
        let mut out: Vec<TarEvent> = Vec::new();
        for e in events {
            if let (TarEvent::Data(d), Some(TarEvent::Data(prev))) = (&e, out.last_mut()) {
                let mut v = prev.to_vec();
                v.extend_from_slice(d);
                *prev = Bytes::from(v);
                continue;
            }
            out.push(e);
        }
        out
    }

    fn sample() -> Vec<u8> {
        let mut s = Vec::new();
        s.extend(file(b"backup_label", b"START WAL LOCATION: 0/2000028\n"));
        s.extend(header(b"pg_wal/", b'5', 0, b""));
        s.extend(header(b"./pg_wal/archive_status/", b'5', 0, b""));
        s.extend(header(b"pg_tblspc/16384/", b'2', 0, b"/srv/ts"));
        s.extend(file(b"base/1/1259", &vec![7u8; 8192 + 100]));
        s.extend(file(b"empty", b""));
        s
    }

    #[test]
    fn parses_server_style_archive() {
        let events = merged(parse_all(&sample(), true).unwrap());
        assert_eq!(
            events[0],
            TarEvent::File {
                path: b"backup_label".to_vec(),
                mode: 0o600,
                size: 30
            }
        );
        assert!(events.contains(&TarEvent::Directory {
            path: b"pg_wal/archive_status".to_vec(),
            mode: 0o600
        }));
        assert!(events.contains(&TarEvent::Symlink {
            path: b"pg_tblspc/16384".to_vec(),
            target: b"/srv/ts".to_vec()
        }));
        assert_eq!(events.last(), Some(&TarEvent::FileEnd));
        // with a trailer and extra zero blocks
        let mut s = sample();
        s.extend([0u8; 2048]);
        let mut p = TarParser::new(true);
        p.push(Bytes::from(s), &mut |_| Ok(())).unwrap();
        assert!(p.trailer_seen());
        p.finish().unwrap();
    }

    fn unsafe_err(stream: &[u8], base: bool) -> Error {
        let e = parse_all(stream, base).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsafe, "{e}");
        e
    }

    #[test]
    fn hostile_entries() {
        let e = unsafe_err(&file(b"/etc/passwd", b"x"), true);
        assert_eq!(e.path(), Some("/etc/passwd"));
        assert!(e.to_string().contains("absolute path"));
        let e = unsafe_err(&file(b"base/../../x", b"x"), true);
        assert!(e.to_string().contains("`..`"), "{e}");
        // a symlink that is not a tablespace link
        let e = unsafe_err(&header(b"evil", b'2', 0, b"/etc"), true);
        assert_eq!(e.path(), Some("evil"));
        // tablespace links only in the base archive
        unsafe_err(&header(b"pg_tblspc/1/", b'2', 0, b"/x"), false);
        // an entry through a link
        let mut s = header(b"pg_tblspc/16384/", b'2', 0, b"/etc").to_vec();
        s.extend(file(b"pg_tblspc/16384/passwd", b"x"));
        let e = unsafe_err(&s, true);
        assert_eq!(e.path(), Some("pg_tblspc/16384/passwd"));
        assert!(e.to_string().contains("beneath the symbolic link"));
        let e = unsafe_err(&header(b"hard", b'1', 0, b"base/1/1259"), true);
        assert!(e.to_string().contains("hard link"));
        let e = unsafe_err(&header(b"dev", b'3', 0, b""), true);
        assert!(e.to_string().contains("device"));
        unsafe_err(&header(b"fifo", b'6', 0, b""), true);
        let mut s = file(b"a", b"1");
        s.extend(file(b"./a", b"2"));
        let e = unsafe_err(&s, true);
        assert!(e.to_string().contains("duplicate"), "{e}");
        let mut h = header(b"a", b'0', 0, b"");
        h[2] = 0;
        h[3] = b'b';
        set_checksum(&mut h);
        let e = unsafe_err(&h, true);
        assert!(e.to_string().contains("NUL"), "{e}");
        // PAX path with ..
        let rec = b"18 path=../escape\n";
        let mut s = header(b"pax", b'x', rec.len() as u64, b"").to_vec();
        s.extend_from_slice(rec);
        s.resize(1024, 0);
        s.extend(file(b"innocent", b"x"));
        let e = unsafe_err(&s, true);
        assert_eq!(e.path(), Some("../escape"));
    }

    #[test]
    fn truncation_and_corruption() {
        let s = file(b"base/1/1", &[1u8; 1000]);
        let e = parse_all(&s[..700], true).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Verify);
        assert_eq!(e.path(), Some("base/1/1"));
        assert!(e.to_string().contains("812 bytes before the end"), "{e}");
        let e = parse_all(&s[..100], true).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol);
        let mut bad = s.clone();
        bad[10] ^= 1;
        let e = parse_all(&bad, true).unwrap_err();
        assert!(e.to_string().contains("checksum mismatch"), "{e}");
        let mut after = s.clone();
        after.extend([0u8; 512]);
        after.extend(file(b"x", b"y"));
        assert_eq!(
            parse_all(&after, true).unwrap_err().kind(),
            ErrorKind::Protocol
        );
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_number(b"0000644 "), Some(0o644));
        assert_eq!(parse_number(b"  644\0"), Some(0o644));
        let mut big = [0u8; 12];
        big[0] = 0x80;
        big[4..].copy_from_slice(&(1u64 << 40).to_be_bytes());
        assert_eq!(parse_number(&big), Some(1 << 40));
        assert_eq!(parse_number(b"12a4"), None);
        // a base-256 size in a real header
        let mut h = header(b"big", b'0', 0, b"");
        h[124..136].copy_from_slice(&big);
        set_checksum(&mut h);
        let mut p = TarParser::new(true);
        let mut got = None;
        p.push(Bytes::copy_from_slice(&h), &mut |e| {
            got = Some(e);
            Ok(())
        })
        .unwrap();
        assert_eq!(
            got,
            Some(TarEvent::File {
                path: b"big".to_vec(),
                mode: 0o600,
                size: 1 << 40
            })
        );
    }

    #[test]
    fn gnu_long_names_and_tar_crate_output() {
        let long = "d/".repeat(80) + "file";
        let mut b = ::tar::Builder::new(Vec::new());
        let mut h = ::tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o640);
        b.append_data(&mut h, &long, &b"hello"[..]).unwrap();
        let data = b.into_inner().unwrap();
        let events = merged(parse_all(&data, false).unwrap());
        assert_eq!(
            events,
            vec![
                TarEvent::File {
                    path: long.into_bytes(),
                    mode: 0o640,
                    size: 5
                },
                TarEvent::Data(Bytes::from_static(b"hello")),
                TarEvent::FileEnd
            ]
        );
    }

    proptest! {
        #[test]
        fn any_chunking_gives_the_same_events(cuts in proptest::collection::vec(0usize..20000, 0..40)) {
            let mut stream = sample();
            stream.extend([0u8; 1024]);
            let whole = merged(parse_all(&stream, true).unwrap());
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (stream.len() + 1)).collect();
            cuts.sort_unstable();
            let mut p = TarParser::new(true);
            let mut events = Vec::new();
            let all = Bytes::from(stream.clone());
            let mut last = 0;
            for c in cuts.into_iter().chain([stream.len()]) {
                p.push(all.slice(last..c), &mut |e| { events.push(e); Ok(()) }).unwrap();
                last = c;
            }
            p.finish().unwrap();
            prop_assert_eq!(merged(events), whole);
        }
    }
}
