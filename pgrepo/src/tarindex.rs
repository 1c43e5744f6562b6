//! A tar offset walker (pure: fed bytes, no I/O): where each entry of a tar stream
//! starts, what it is called and how big it is. The uploader uses it to cut stored
//! archives into independently decompressible frames at entry boundaries; delta restore
//! reads the resulting index to fetch only the frames it needs.
//!
//! An entry starts at its FIRST header: GNU long-name (`L`), long-link (`K`) and PAX
//! (`x`, `g`) headers belong to the entry they precede. The walker never panics; on
//! input that is not a tar stream it stops reporting ([`TarWalker::broken`]).

const BLOCK: u64 = 512;
/// Long names and PAX records larger than this are skipped, not collected.
const MAX_META: u64 = 64 * 1024;

/// One entry of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarEntry {
    /// Offset of its first header in the tar stream.
    pub offset: u64,
    /// Its path as stored (long name or PAX `path` when present; not normalised).
    pub path: Vec<u8>,
    /// Its data size.
    pub size: u64,
    /// Its type flag (`0` file, `5` directory, `2` symlink, …).
    pub typeflag: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a header block (`fill` bytes of it so far).
    Header,
    /// Skipping data and padding of an entry.
    Skip(u64),
    /// Collecting the data of a long-name or PAX header, then skipping its padding.
    Meta { kind: u8, remaining: u64, pad: u64 },
    /// After the end-of-archive block or a bad header: nothing more is reported.
    Ended,
}

/// The incremental walker.
///
/// ```
/// use pgrepo::tarindex::TarWalker;
/// let mut header = [0u8; 512];
/// header[..4].copy_from_slice(b"PG_V");
/// header[124..135].copy_from_slice(b"00000000003");
/// header[156] = b'0';
/// let mut stream = header.to_vec();
/// stream.extend_from_slice(&[b'1'; 512]);
/// let mut walker = TarWalker::default();
/// let mut entries = Vec::new();
/// walker.push(&stream, &mut |e| entries.push(e));
/// assert_eq!((entries[0].offset, entries[0].size), (0, 3));
/// assert!(walker.at_entry_start());
/// ```
#[derive(Debug, Clone)]
pub struct TarWalker {
    offset: u64,
    state: State,
    header: Vec<u8>,
    meta: Vec<u8>,
    /// Where the pending long-name/PAX headers began.
    first: Option<u64>,
    long_name: Option<Vec<u8>>,
    pax_path: Option<Vec<u8>>,
    pax_size: Option<u64>,
    broken: bool,
}

impl Default for TarWalker {
    fn default() -> TarWalker {
        TarWalker {
            offset: 0,
            state: State::Header,
            header: Vec::with_capacity(BLOCK as usize),
            meta: Vec::new(),
            first: None,
            long_name: None,
            pax_path: None,
            pax_size: None,
            broken: false,
        }
    }
}

impl TarWalker {
    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// True when the input did not look like tar (nothing after that is reported).
    pub fn broken(&self) -> bool {
        self.broken
    }

    /// True when the next byte would start a new entry (or the trailer): a safe place
    /// to cut the stream.
    pub fn at_entry_start(&self) -> bool {
        self.state == State::Header && self.header.is_empty() && self.first.is_none()
    }

    /// Walks `data`, calling `entry` for each entry whose header completes in it.
    pub fn push(&mut self, mut data: &[u8], entry: &mut impl FnMut(TarEntry)) {
        while !data.is_empty() {
            match self.state {
                State::Ended => {
                    self.offset += data.len() as u64;
                    return;
                }
                State::Skip(n) => {
                    let take = n.min(data.len() as u64);
                    self.offset += take;
                    data = &data[take as usize..];
                    self.state = if n == take {
                        State::Header
                    } else {
                        State::Skip(n - take)
                    };
                }
                State::Meta {
                    kind,
                    remaining,
                    pad,
                } => {
                    let take = remaining.min(data.len() as u64);
                    if self.meta.len() as u64 + take <= MAX_META {
                        self.meta.extend_from_slice(&data[..take as usize]);
                    }
                    self.offset += take;
                    data = &data[take as usize..];
                    if take == remaining {
                        self.end_meta(kind, remaining == 0 || self.meta.len() as u64 <= MAX_META);
                        self.state = State::Skip(pad);
                        if pad == 0 {
                            self.state = State::Header;
                        }
                    } else {
                        self.state = State::Meta {
                            kind,
                            remaining: remaining - take,
                            pad,
                        };
                    }
                }
                State::Header => {
                    let want = BLOCK as usize - self.header.len();
                    let take = want.min(data.len());
                    self.header.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if self.header.len() == BLOCK as usize {
                        let start = self.offset;
                        self.offset += BLOCK;
                        let header = std::mem::take(&mut self.header);
                        self.header_block(&header, start, entry);
                        self.header = header;
                        self.header.clear();
                    }
                }
            }
        }
    }

    fn header_block(&mut self, h: &[u8], start: u64, entry: &mut impl FnMut(TarEntry)) {
        if h.iter().all(|&b| b == 0) {
            self.state = State::Ended;
            return;
        }
        let Some(mut size) = parse_number(&h[124..136]) else {
            self.broken = true;
            self.state = State::Ended;
            return;
        };
        let typeflag = h[156];
        let first = *self.first.get_or_insert(start);
        if matches!(typeflag, b'L' | b'K' | b'x' | b'g') {
            self.meta.clear();
            self.state = State::Meta {
                kind: typeflag,
                remaining: size,
                pad: padding(size),
            };
            if size == 0 {
                self.end_meta(typeflag, true);
                self.state = State::Header;
            }
            return;
        }
        if let Some(s) = self.pax_size.take() {
            size = s;
        }
        let path = match (self.pax_path.take(), self.long_name.take()) {
            (Some(p), _) | (None, Some(p)) => p,
            (None, None) => {
                let name = cstr(&h[..100]);
                let prefix = if &h[257..262] == b"ustar" {
                    cstr(&h[345..500])
                } else {
                    &[]
                };
                if prefix.is_empty() {
                    name.to_vec()
                } else {
                    [prefix, b"/", name].concat()
                }
            }
        };
        self.first = None;
        entry(TarEntry {
            offset: first,
            path,
            size,
            typeflag,
        });
        // Only regular files (and unknown types, as tar does) carry data.
        let data = match typeflag {
            b'1' | b'2' | b'3' | b'4' | b'5' | b'6' => 0,
            _ => size,
        };
        let skip = data.saturating_add(padding(data));
        self.state = if skip == 0 {
            State::Header
        } else {
            State::Skip(skip)
        };
    }

    fn end_meta(&mut self, kind: u8, complete: bool) {
        let meta = std::mem::take(&mut self.meta);
        if !complete {
            return;
        }
        match kind {
            b'L' => self.long_name = Some(cstr(&meta).to_vec()),
            b'x' => {
                for (key, value) in pax_records(&meta) {
                    match key {
                        b"path" => self.pax_path = Some(value.to_vec()),
                        b"size" => {
                            self.pax_size =
                                std::str::from_utf8(value).ok().and_then(|s| s.parse().ok())
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
}

/// Padding after `size` bytes of data, up to the next block.
fn padding(size: u64) -> u64 {
    (BLOCK - size % BLOCK) % BLOCK
}

/// The bytes up to the first NUL.
fn cstr(raw: &[u8]) -> &[u8] {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    &raw[..end]
}

/// A numeric header field: octal (NUL/space terminated) or GNU base-256.
fn parse_number(raw: &[u8]) -> Option<u64> {
    if raw.first().is_some_and(|b| b & 0x80 != 0) {
        if raw[0] & 0x40 != 0 {
            return None; // negative
        }
        let mut value: u64 = u64::from(raw[0] & 0x3f);
        for &b in &raw[1..] {
            value = value.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(value);
    }
    let text = cstr(raw);
    let digits: Vec<u8> = text
        .iter()
        .copied()
        .skip_while(|&b| b == b' ')
        .take_while(|&b| b != b' ')
        .collect();
    if digits.is_empty() {
        return Some(0);
    }
    let mut value: u64 = 0;
    for b in digits {
        if !(b'0'..=b'7').contains(&b) {
            return None;
        }
        value = value.checked_mul(8)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(value)
}

/// PAX records `"<len> key=value\n"`; stops at the first malformed one.
fn pax_records(mut data: &[u8]) -> Vec<(&[u8], &[u8])> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let Some(space) = data.iter().position(|&b| b == b' ') else {
            break;
        };
        let Some(len) = std::str::from_utf8(&data[..space])
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
        else {
            break;
        };
        if len <= space + 1 || len > data.len() {
            break;
        }
        let record = &data[space + 1..len];
        let record = record.strip_suffix(b"\n").unwrap_or(record);
        if let Some(eq) = record.iter().position(|&b| b == b'=') {
            out.push((&record[..eq], &record[eq + 1..]));
        }
        data = &data[len..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(name: &[u8], size: u64, typeflag: u8) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..name.len().min(100)].copy_from_slice(&name[..name.len().min(100)]);
        h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        h[156] = typeflag;
        h[257..263].copy_from_slice(b"ustar\0");
        h
    }

    fn entry(out: &mut Vec<u8>, name: &[u8], data: &[u8], typeflag: u8) {
        out.extend(header(name, data.len() as u64, typeflag));
        out.extend_from_slice(data);
        out.resize(out.len() + padding(data.len() as u64) as usize, 0);
    }

    fn walk(stream: &[u8], chunk: usize) -> (Vec<TarEntry>, TarWalker) {
        let mut walker = TarWalker::default();
        let mut entries = Vec::new();
        for piece in stream.chunks(chunk.max(1)) {
            walker.push(piece, &mut |e| entries.push(e));
        }
        (entries, walker)
    }

    fn sample() -> Vec<u8> {
        let mut s = Vec::new();
        entry(&mut s, b"base", b"", b'5');
        entry(&mut s, b"PG_VERSION", b"15\n", b'0');
        // A GNU long name: the entry starts at the 'L' header.
        let long = vec![b'a'; 150];
        let mut name = long.clone();
        name.push(0);
        entry(&mut s, b"././@LongLink", &name, b'L');
        entry(&mut s, b"truncated", &[7u8; 1000], b'0');
        // PAX path and size.
        entry(
            &mut s,
            b"PaxHeader",
            b"27 path=pax/named/file.bin\n12 size=600\n",
            b'x',
        );
        entry(&mut s, b"short", &[1u8; 600], b'0');
        entry(&mut s, b"pg_tblspc/16385", b"", b'2');
        s.extend([0u8; 1024]);
        s
    }

    #[test]
    fn walks_plain_long_name_and_pax_entries() {
        let s = sample();
        for chunk in [1, 7, 511, 512, 513, 100_000] {
            let (entries, walker) = walk(&s, chunk);
            let got: Vec<_> = entries
                .iter()
                .map(|e| (e.offset, e.path.clone(), e.size, e.typeflag))
                .collect();
            assert_eq!(got.len(), 5, "{got:?}");
            assert_eq!(got[0], (0, b"base".to_vec(), 0, b'5'));
            assert_eq!(got[1], (512, b"PG_VERSION".to_vec(), 3, b'0'));
            assert_eq!(got[2], (1536, vec![b'a'; 150], 1000, b'0'));
            assert_eq!(got[3].1, b"pax/named/file.bin".to_vec());
            assert_eq!(got[3].2, 600);
            assert_eq!(got[4].1, b"pg_tblspc/16385".to_vec());
            assert!(!walker.broken());
            assert_eq!(walker.offset(), s.len() as u64);
        }
    }

    #[test]
    fn entry_starts_are_reported_as_boundaries() {
        let s = sample();
        let (entries, _) = walk(&s, 100_000);
        for e in &entries {
            let mut walker = TarWalker::default();
            walker.push(&s[..e.offset as usize], &mut |_| {});
            assert!(walker.at_entry_start(), "at {}", e.offset);
        }
        // Not inside a long-name header group.
        let mut walker = TarWalker::default();
        walker.push(&s[..2048], &mut |_| {});
        assert!(!walker.at_entry_start());
    }

    #[test]
    fn truncated_and_hostile_input() {
        let s = sample();
        for cut in 0..s.len().min(4000) {
            let _ = walk(&s[..cut], 333);
        }
        let mut bad = header(b"x", 0, b'0');
        bad[124..136].copy_from_slice(b"zzzzzzzzzzz\0");
        let (entries, walker) = walk(&bad, 512);
        assert!(entries.is_empty());
        assert!(walker.broken());
        // Base-256 sizes, including one near u64::MAX.
        let mut big = header(b"big", 0, b'0');
        big[124..136].copy_from_slice(&[
            0x80, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ]);
        let (entries, _) = walk(&big, 512);
        assert_eq!(entries[0].size, u64::MAX);
        let mut huge = header(b"big", 0, b'L');
        huge[124..136].copy_from_slice(&[
            0x80, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ]);
        huge.extend([1u8; 2048]);
        let _ = walk(&huge, 100);
    }

    proptest! {
        #[test]
        fn never_panics_and_chunking_does_not_matter(
            data in proptest::collection::vec(any::<u8>(), 0..3000),
            chunk in 1usize..700,
            seed in any::<u64>(),
        ) {
            // Arbitrary bytes, and a valid stream with arbitrary bytes spliced in.
            let (a, _) = walk(&data, data.len().max(1));
            let (b, _) = walk(&data, chunk);
            prop_assert_eq!(a, b);
            let mut s = sample();
            let at = (seed as usize) % s.len();
            s.splice(at..at, data.iter().copied());
            let (a, _) = walk(&s, s.len());
            let (b, _) = walk(&s, chunk);
            prop_assert_eq!(a, b);
        }
    }
}
