//! A `backup_manifest` reader that fails exactly where and how PostgreSQL's
//! `pg_verifybackup` does: an event-driven JSON parser feeding a state machine, so that a
//! structural mistake is reported before any later syntax error, with PostgreSQL's
//! message texts (`could not parse backup manifest: unexpected scalar`, …), which
//! scripts and PostgreSQL's own tests match on.
//!
//! Pure: no I/O. Never panics on any input (property-tested).

use basebackup::manifest::{hex, FileChecksum};
use basebackup::ChecksumAlgorithm;
use pgwire_repl::{Lsn, TimelineId};

/// One file of the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The path relative to the backup directory (raw bytes).
    pub path: Vec<u8>,
    /// The size in bytes.
    pub size: u64,
    /// The checksum algorithm (`None` when the entry has none).
    pub algorithm: ChecksumAlgorithm,
    /// The decoded checksum bytes (empty when absent).
    pub checksum: Vec<u8>,
}

/// One `WAL-Ranges` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// The timeline.
    pub timeline: TimelineId,
    /// The first LSN needed.
    pub start: Lsn,
    /// The end of the WAL needed.
    pub end: Lsn,
}

/// A parsed manifest whose own checksum matched.
#[derive(Debug, Clone, Default)]
pub struct Parsed {
    /// 1, or 2 (PostgreSQL 17+).
    pub version: u32,
    /// The system identifier (version 2).
    pub system_identifier: Option<u64>,
    /// The files, in manifest order.
    pub files: Vec<Entry>,
    /// The WAL ranges, in manifest order.
    pub wal_ranges: Vec<Range>,
}

/// Parses `bytes`. The error is the complete message PostgreSQL prints after
/// `pg_verifybackup: error: `.
pub fn parse(bytes: &[u8]) -> Result<Parsed, String> {
    let mut sm = Machine::default();
    let mut parser = Parser {
        bytes,
        pos: 0,
        sm: &mut sm,
    };
    match parser.document() {
        Ok(()) => {}
        Err(Fail::Syntax) => return Err(parse_failure("parsing failed")),
        // PostgreSQL 17+ report the JSON parser's own words (json_errdetail).
        Err(Fail::Eof) => return Err(parse_failure("The input string ended unexpectedly.")),
        Err(Fail::Message(m)) => return Err(m),
    }
    if sm.state != State::Eof {
        return Err(parse_failure("manifest ended unexpectedly"));
    }
    check_manifest_checksum(bytes, sm.manifest_checksum.as_deref())?;
    Ok(sm.out)
}

fn parse_failure(what: &str) -> String {
    format!("could not parse backup manifest: {what}")
}

fn check_manifest_checksum(bytes: &[u8], stated: Option<&str>) -> Result<(), String> {
    let newlines: Vec<usize> = bytes
        .iter()
        .enumerate()
        .filter(|(_, &b)| b == b'\n')
        .map(|(i, _)| i)
        .collect();
    if newlines.len() < 2 {
        return Err(parse_failure("expected at least 2 lines"));
    }
    let (last, penultimate) = (newlines[newlines.len() - 1], newlines[newlines.len() - 2]);
    if last != bytes.len() - 1 {
        return Err(parse_failure("last line not newline-terminated"));
    }
    let mut sum = FileChecksum::new(ChecksumAlgorithm::Sha256);
    sum.update(&bytes[..=penultimate]);
    let actual = sum.finish().unwrap_or_default();
    let Some(stated) = stated else {
        return Err("manifest has no checksum".into());
    };
    match unhex(stated) {
        Some(decoded) if decoded.len() == 32 => {
            if hex(&decoded) != actual {
                return Err("manifest checksum mismatch".into());
            }
            Ok(())
        }
        _ => Err(format!("invalid manifest checksum: \"{stated}\"")),
    }
}

/// Decodes hex in either case; `None` for an odd length or a non-hex digit.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if s.len() % 2 != 0 {
        return None;
    }
    s.chunks(2)
        .map(|pair| {
            let digit = |c: u8| (c as char).to_digit(16);
            Some((digit(pair[0])? * 16 + digit(pair[1])?) as u8)
        })
        .collect()
}

// ------------------------------------------------------------------ JSON events

enum Fail {
    /// Any other JSON syntax error.
    Syntax,
    /// The input ended where the JSON needed more (jsonapi's JSON_EXPECTED_MORE).
    Eof,
    Message(String),
}

impl From<String> for Fail {
    fn from(m: String) -> Fail {
        Fail::Message(m)
    }
}

/// A recursive-descent JSON parser that reports events as it meets them.
struct Parser<'a, 'm> {
    bytes: &'a [u8],
    pos: usize,
    sm: &'m mut Machine,
}

const MAX_DEPTH: usize = 64;

impl Parser<'_, '_> {
    fn document(&mut self) -> Result<(), Fail> {
        self.value(0)?;
        self.ws();
        if self.pos != self.bytes.len() {
            return Err(Fail::Syntax);
        }
        Ok(())
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes.get(self.pos) {
            self.pos += 1;
        }
    }

    fn value(&mut self, depth: usize) -> Result<(), Fail> {
        if depth > MAX_DEPTH {
            return Err(Fail::Syntax);
        }
        self.ws();
        match self.bytes.get(self.pos) {
            Some(b'{') => {
                self.pos += 1;
                self.sm.object_start()?;
                self.ws();
                if self.bytes.get(self.pos) == Some(&b'}') {
                    self.pos += 1;
                    return Ok(self.sm.object_end()?);
                }
                loop {
                    self.ws();
                    if self.bytes.get(self.pos) != Some(&b'"') {
                        return Err(self.unexpected());
                    }
                    let name = self.string()?;
                    self.ws();
                    if self.bytes.get(self.pos) != Some(&b':') {
                        return Err(self.unexpected());
                    }
                    self.pos += 1;
                    self.sm.field_start(&name)?;
                    self.value(depth + 1)?;
                    self.ws();
                    match self.bytes.get(self.pos) {
                        Some(b',') => self.pos += 1,
                        Some(b'}') => {
                            self.pos += 1;
                            return Ok(self.sm.object_end()?);
                        }
                        _ => return Err(self.unexpected()),
                    }
                }
            }
            Some(b'[') => {
                self.pos += 1;
                self.sm.array_start()?;
                self.ws();
                if self.bytes.get(self.pos) == Some(&b']') {
                    self.pos += 1;
                    return Ok(self.sm.array_end()?);
                }
                loop {
                    self.value(depth + 1)?;
                    self.ws();
                    match self.bytes.get(self.pos) {
                        Some(b',') => self.pos += 1,
                        Some(b']') => {
                            self.pos += 1;
                            return Ok(self.sm.array_end()?);
                        }
                        _ => return Err(self.unexpected()),
                    }
                }
            }
            Some(b'"') => {
                let s = self.string()?;
                Ok(self.sm.scalar(s)?)
            }
            Some(_) => {
                let token = self.bare()?;
                Ok(self.sm.scalar(token)?)
            }
            None => Err(Fail::Eof),
        }
    }

    /// The failure for a byte that is not what the grammar wants here: the end of
    /// the input, or a syntax error.
    fn unexpected(&self) -> Fail {
        if self.pos >= self.bytes.len() {
            Fail::Eof
        } else {
            Fail::Syntax
        }
    }

    /// `true`, `false`, `null` or a number, as its text.
    fn bare(&mut self) -> Result<String, Fail> {
        let start = self.pos;
        while let Some(c) = self.bytes.get(self.pos) {
            if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'+' | b'.') {
                self.pos += 1;
            } else {
                break;
            }
        }
        let token = std::str::from_utf8(&self.bytes[start..self.pos]).map_err(|_| Fail::Syntax)?;
        if matches!(token, "true" | "false" | "null") || is_json_number(token) {
            Ok(token.to_string())
        } else {
            Err(Fail::Syntax)
        }
    }

    fn string(&mut self) -> Result<String, Fail> {
        self.pos += 1; // the opening quote
        let mut out: Vec<u8> = Vec::new();
        loop {
            let Some(&c) = self.bytes.get(self.pos) else {
                return Err(Fail::Eof);
            };
            self.pos += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let Some(&e) = self.bytes.get(self.pos) else {
                        return Err(Fail::Eof);
                    };
                    self.pos += 1;
                    match e {
                        b'"' | b'\\' | b'/' => out.push(e),
                        b'b' => out.push(8),
                        b'f' => out.push(12),
                        b'n' => out.push(b'\n'),
                        b'r' => out.push(b'\r'),
                        b't' => out.push(b'\t'),
                        b'u' => {
                            let mut code = self.hex4()?;
                            if (0xD800..0xDC00).contains(&code) {
                                if self.bytes.get(self.pos..self.pos + 2) != Some(b"\\u") {
                                    return Err(Fail::Syntax);
                                }
                                self.pos += 2;
                                let low = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&low) {
                                    return Err(Fail::Syntax);
                                }
                                code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
                            }
                            let ch = char::from_u32(code).filter(|&c| c != '\0');
                            let ch = ch.ok_or(Fail::Syntax)?;
                            let mut buf = [0u8; 4];
                            out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                        }
                        _ => return Err(Fail::Syntax),
                    }
                }
                0..=0x1f => return Err(Fail::Syntax),
                _ => out.push(c),
            }
        }
        String::from_utf8(out).map_err(|_| Fail::Syntax)
    }

    fn hex4(&mut self) -> Result<u32, Fail> {
        let digits = self.bytes.get(self.pos..self.pos + 4).ok_or(Fail::Syntax)?;
        self.pos += 4;
        let text = std::str::from_utf8(digits).map_err(|_| Fail::Syntax)?;
        u32::from_str_radix(text, 16).map_err(|_| Fail::Syntax)
    }
}

fn is_json_number(t: &str) -> bool {
    let b = t.as_bytes();
    let mut i = 0;
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    let digits = |i: &mut usize| {
        let s = *i;
        while b.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i - s
    };
    let int_start = i;
    let n = digits(&mut i);
    if n == 0 || (n > 1 && b[int_start] == b'0') {
        return false;
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if digits(&mut i) == 0 {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == b.len()
}

// ------------------------------------------------------------------ the state machine

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum State {
    #[default]
    TopStart,
    TopField,
    VersionValue,
    SystemIdValue,
    FilesStart,
    FilesNext,
    ThisFileField,
    ThisFileValue,
    WalRangesStart,
    WalRangesNext,
    ThisRangeField,
    ThisRangeValue,
    ChecksumValue,
    TopEnd,
    Eof,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileField {
    Path,
    EncodedPath,
    Size,
    LastModified,
    Algorithm,
    Checksum,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RangeField {
    Timeline,
    Start,
    End,
}

#[derive(Debug, Default)]
struct Machine {
    state: State,
    saw_version: bool,
    file_field: Option<FileField>,
    range_field: Option<RangeField>,
    path: Option<String>,
    encoded_path: Option<String>,
    size: Option<String>,
    algorithm: Option<String>,
    checksum: Option<String>,
    timeline: Option<String>,
    start: Option<String>,
    end: Option<String>,
    manifest_checksum: Option<String>,
    seen_paths: std::collections::HashSet<Vec<u8>>,
    out: Parsed,
}

impl Machine {
    fn fail(what: &str) -> Result<(), String> {
        Err(parse_failure(what))
    }

    fn object_start(&mut self) -> Result<(), String> {
        match self.state {
            State::TopStart => self.state = State::TopField,
            State::FilesNext => {
                self.state = State::ThisFileField;
                self.path = None;
                self.encoded_path = None;
                self.size = None;
                self.algorithm = None;
                self.checksum = None;
            }
            State::WalRangesNext => {
                self.state = State::ThisRangeField;
                self.timeline = None;
                self.start = None;
                self.end = None;
            }
            _ => return Self::fail("unexpected object start"),
        }
        Ok(())
    }

    fn object_end(&mut self) -> Result<(), String> {
        match self.state {
            State::TopEnd => self.state = State::Eof,
            State::ThisFileField => {
                self.finish_file()?;
                self.state = State::FilesNext;
            }
            State::ThisRangeField => {
                self.finish_range()?;
                self.state = State::WalRangesNext;
            }
            _ => return Self::fail("unexpected object end"),
        }
        Ok(())
    }

    fn array_start(&mut self) -> Result<(), String> {
        match self.state {
            State::FilesStart => self.state = State::FilesNext,
            State::WalRangesStart => self.state = State::WalRangesNext,
            _ => return Self::fail("unexpected array start"),
        }
        Ok(())
    }

    fn array_end(&mut self) -> Result<(), String> {
        match self.state {
            State::FilesNext | State::WalRangesNext => self.state = State::TopField,
            _ => return Self::fail("unexpected array end"),
        }
        Ok(())
    }

    fn field_start(&mut self, name: &str) -> Result<(), String> {
        match self.state {
            State::TopField => {
                if !self.saw_version {
                    if name != "PostgreSQL-Backup-Manifest-Version" {
                        return Self::fail("expected version indicator");
                    }
                    self.saw_version = true;
                    self.state = State::VersionValue;
                    return Ok(());
                }
                self.state = match name {
                    "System-Identifier" if self.out.version >= 2 => State::SystemIdValue,
                    "Files" => State::FilesStart,
                    "WAL-Ranges" => State::WalRangesStart,
                    "Manifest-Checksum" => State::ChecksumValue,
                    _ => return Self::fail("unrecognized top-level field"),
                };
            }
            State::ThisFileField => {
                self.file_field = Some(match name {
                    "Path" => FileField::Path,
                    "Encoded-Path" => FileField::EncodedPath,
                    "Size" => FileField::Size,
                    "Last-Modified" => FileField::LastModified,
                    "Checksum-Algorithm" => FileField::Algorithm,
                    "Checksum" => FileField::Checksum,
                    _ => return Self::fail("unexpected file field"),
                });
                self.state = State::ThisFileValue;
            }
            State::ThisRangeField => {
                self.range_field = Some(match name {
                    "Timeline" => RangeField::Timeline,
                    "Start-LSN" => RangeField::Start,
                    "End-LSN" => RangeField::End,
                    _ => return Self::fail("unexpected WAL range field"),
                });
                self.state = State::ThisRangeValue;
            }
            _ => return Self::fail("unexpected object field"),
        }
        Ok(())
    }

    fn scalar(&mut self, token: String) -> Result<(), String> {
        match self.state {
            State::VersionValue => {
                // As PostgreSQL 17+: C's strtol read into an int, any text after the
                // number refused, then only 1 and 2 accepted.
                let version = c_strtoint(&token)
                    .ok_or_else(|| parse_failure("manifest version not an integer"))?;
                self.out.version = match version {
                    1 => 1,
                    2 => 2,
                    _ => return Self::fail("unexpected manifest version"),
                };
                self.state = State::TopField;
            }
            State::SystemIdValue => {
                self.out.system_identifier =
                    Some(token.parse().map_err(|_| {
                        parse_failure("system identifier in manifest not an integer")
                    })?);
                self.state = State::TopField;
            }
            State::ThisFileValue => {
                let slot = match self.file_field {
                    Some(FileField::Path) => &mut self.path,
                    Some(FileField::EncodedPath) => &mut self.encoded_path,
                    Some(FileField::Size) => &mut self.size,
                    Some(FileField::Algorithm) => &mut self.algorithm,
                    Some(FileField::Checksum) => &mut self.checksum,
                    Some(FileField::LastModified) | None => &mut None,
                };
                *slot = Some(token);
                self.state = State::ThisFileField;
            }
            State::ThisRangeValue => {
                let slot = match self.range_field {
                    Some(RangeField::Timeline) => &mut self.timeline,
                    Some(RangeField::Start) => &mut self.start,
                    Some(RangeField::End) | None => &mut self.end,
                };
                *slot = Some(token);
                self.state = State::ThisRangeField;
            }
            State::ChecksumValue => {
                self.manifest_checksum = Some(token);
                self.state = State::TopEnd;
            }
            _ => return Self::fail("unexpected scalar"),
        }
        Ok(())
    }

    fn finish_file(&mut self) -> Result<(), String> {
        if self.path.is_none() && self.encoded_path.is_none() {
            return Self::fail("missing path name");
        }
        if self.path.is_some() && self.encoded_path.is_some() {
            return Self::fail("both path name and encoded path name");
        }
        let Some(size) = self.size.take() else {
            return Self::fail("missing size");
        };
        if self.algorithm.is_none() && self.checksum.is_some() {
            return Self::fail("checksum without algorithm");
        }
        let path = match (self.path.take(), self.encoded_path.take()) {
            (Some(p), _) => p.into_bytes(),
            (None, Some(e)) => {
                unhex(&e).ok_or_else(|| parse_failure("could not decode file name"))?
            }
            (None, None) => Vec::new(),
        };
        let size =
            parse_unsigned(&size).ok_or_else(|| parse_failure("file size is not an integer"))?;
        let algorithm = match self.algorithm.take() {
            None => ChecksumAlgorithm::None,
            Some(name) => ChecksumAlgorithm::parse(&name)
                .ok_or_else(|| format!("unrecognized checksum algorithm: \"{name}\""))?,
        };
        let checksum = match self.checksum.take() {
            None => Vec::new(),
            Some(c) if c.is_empty() => Vec::new(),
            Some(c) => unhex(&c).ok_or_else(|| {
                format!(
                    "invalid checksum for file \"{}\": \"{c}\"",
                    String::from_utf8_lossy(&path)
                )
            })?,
        };
        if !self.seen_paths.insert(path.clone()) {
            return Err(format!(
                "duplicate path name in backup manifest: \"{}\"",
                String::from_utf8_lossy(&path)
            ));
        }
        self.out.files.push(Entry {
            path,
            size,
            algorithm,
            checksum,
        });
        Ok(())
    }

    fn finish_range(&mut self) -> Result<(), String> {
        if self.timeline.is_none() {
            return Self::fail("missing timeline");
        }
        if self.start.is_none() {
            return Self::fail("missing start LSN");
        }
        let (Some(timeline), Some(start), Some(end)) =
            (self.timeline.take(), self.start.take(), self.end.take())
        else {
            return Self::fail("missing end LSN");
        };
        let timeline = parse_unsigned(&timeline)
            .and_then(|t| u32::try_from(t).ok())
            .ok_or_else(|| parse_failure("timeline is not an integer"))?;
        let start = parse_lsn(&start).ok_or_else(|| parse_failure("could not parse start LSN"))?;
        let end = parse_lsn(&end).ok_or_else(|| parse_failure("could not parse end LSN"))?;
        self.out.wal_ranges.push(Range {
            timeline: TimelineId(timeline),
            start,
            end,
        });
        Ok(())
    }
}

/// PostgreSQL's `strtoint(token, &ep, 10)` followed by an `*ep` check: leading white
/// space and a sign allowed, digits up to the end; the value clamped to 64 bits as
/// `strtol` does, then cut to an `int` as the C cast does. An empty token reads as 0
/// (strtol leaves `ep` at its terminating NUL). `None` when text is left over.
fn c_strtoint(token: &str) -> Option<i32> {
    let bytes = token.as_bytes();
    let mut i = 0;
    while bytes
        .get(i)
        .is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r'))
    {
        i += 1;
    }
    let negative = match bytes.get(i) {
        Some(b'-') => {
            i += 1;
            true
        }
        Some(b'+') => {
            i += 1;
            false
        }
        _ => false,
    };
    let digits_start = i;
    let mut value: i64 = 0;
    while let Some(d) = bytes.get(i).filter(|b| b.is_ascii_digit()) {
        let digit = i64::from(d - b'0');
        value = if negative {
            value.saturating_mul(10).saturating_sub(digit)
        } else {
            value.saturating_mul(10).saturating_add(digit)
        };
        i += 1;
    }
    if i == digits_start {
        // No number: strtol leaves ep at the start of the text.
        return token.is_empty().then_some(0);
    }
    // The C cast keeps the low 32 bits.
    (i == bytes.len()).then_some(value as i32)
}

fn parse_unsigned(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// `%X/%X`.
fn parse_lsn(s: &str) -> Option<Lsn> {
    let (hi, lo) = s.split_once('/')?;
    let hi = u32::from_str_radix(hi, 16).ok()?;
    let lo = u32::from_str_radix(lo, 16).ok()?;
    Some(Lsn((u64::from(hi) << 32) | u64::from(lo)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn with_checksum(body: &str) -> String {
        let mut sum = FileChecksum::new(ChecksumAlgorithm::Sha256);
        sum.update(body.as_bytes());
        format!(
            "{body}\"Manifest-Checksum\": \"{}\"}}\n",
            sum.finish().unwrap()
        )
    }

    #[test]
    fn good_manifest() {
        let body = "{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [\n\
{ \"Path\": \"PG_VERSION\", \"Size\": 3, \"Last-Modified\": \"2026-01-01 00:00:00 GMT\", \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"12345678\" },\n\
{ \"Encoded-Path\": \"464f4fe0\", \"Size\": 0 }\n],\n\
\"WAL-Ranges\": [\n{ \"Timeline\": 1, \"Start-LSN\": \"0/2000028\", \"End-LSN\": \"0/2000100\" }\n],\n";
        let m = parse(with_checksum(body).as_bytes()).unwrap();
        assert_eq!(m.files.len(), 2);
        assert_eq!(m.files[0].checksum, vec![0x12, 0x34, 0x56, 0x78]);
        assert_eq!(m.files[1].path, b"FOO\xe0".to_vec());
        assert_eq!(m.wal_ranges[0].end, Lsn(0x2000100));
        let tampered = with_checksum(body).replace("Size\": 3", "Size\": 4");
        assert_eq!(
            parse(tampered.as_bytes()).unwrap_err(),
            "manifest checksum mismatch"
        );
    }

    #[test]
    fn postgres_messages() {
        let cases: &[(&str, &str)] = &[
            ("{\n", "could not parse backup manifest: The input string ended unexpectedly."),
            ("", "could not parse backup manifest: The input string ended unexpectedly."),
            ("{\"a\": [1,\n", "could not parse backup manifest: expected version indicator"),
            ("{\"PostgreSQL-Backup-Manifest-Version\": 1, \"Files\": [\n", "could not parse backup manifest: The input string ended unexpectedly."),
            ("{\"PostgreSQL-Backup-Manifest-Version\": 1 x}\n", "could not parse backup manifest: parsing failed"),
            ("{}\n", "could not parse backup manifest: unexpected object end"),
            ("[]\n", "could not parse backup manifest: unexpected array start"),
            ("{\"PostgreSQL-Backup-Manifest-Version\": \"phooey\"}\n", "could not parse backup manifest: manifest version not an integer"),
            ("{\"PostgreSQL-Backup-Manifest-Version\": 9876599}\n", "could not parse backup manifest: unexpected manifest version"),
            ("{\"PostgreSQL-Backup-Manifest-Version\": 1, \"Files\": true}\n", "could not parse backup manifest: unexpected scalar"),
            ("{\"PostgreSQL-Backup-Manifest-Version\": 1, \"Files\": [{\"Path\": \"x\", \"Encoded-Path\": \"1234\"}]}\n", "could not parse backup manifest: both path name and encoded path name"),
            ("{\"PostgreSQL-Backup-Manifest-Version\": 1, \"Files\": [{\"Path\": \"x\", \"Size\": 0}, {\"Path\": \"x\", \"Size\": 0}]}\n", "duplicate path name in backup manifest: \"x\""),
            ("{\"PostgreSQL-Backup-Manifest-Version\": 1, \"Files\": [{\"Path\": \"x\", \"Size\": 100, \"Checksum-Algorithm\": \"Oops\", \"Checksum\": \"00\"}]}\n", "unrecognized checksum algorithm: \"Oops\""),
            ("{\"PostgreSQL-Backup-Manifest-Version\": 1, \"WAL-Ranges\": [{\"Timeline\": 1, \"Start-LSN\": \"0/0\"}]}\n", "could not parse backup manifest: missing end LSN"),
            ("{\"PostgreSQL-Backup-Manifest-Version\": 1, \"WAL-Ranges\": [{\"Timeline\": 1, \"Start-LSN\": \"0/0\", \"End-LSN\": \"0/0\"}]}\n", "could not parse backup manifest: unexpected object end"),
            ("{\"PostgreSQL-Backup-Manifest-Version\": 1, \"Files\": [], \"Manifest-Checksum\": null}\n", "could not parse backup manifest: expected at least 2 lines"),
            ("{\"PostgreSQL-Backup-Manifest-Version\": 1,\n \"Files\": [],\n \"Manifest-Checksum\": null}", "could not parse backup manifest: last line not newline-terminated"),
            ("{\"PostgreSQL-Backup-Manifest-Version\": 1, \"Files\": [],\n \"Manifest-Checksum\": \"ABCD\"}\n", "invalid manifest checksum: \"ABCD\""),
        ];
        for (input, want) in cases {
            assert_eq!(parse(input.as_bytes()).unwrap_err(), *want, "{input}");
        }
    }

    #[test]
    fn versions_are_read_as_strtoint_reads_them() {
        for (token, value) in [
            ("1", Some(1)),
            (" 2", Some(2)),
            ("+1", Some(1)),
            ("-1", Some(-1)),
            ("", Some(0)),
            ("4294967297", Some(1)),
            ("99999999999999999999", Some(-1)),
            ("-99999999999999999999", Some(0)),
            ("1.5", None),
            ("2x", None),
            (" ", None),
            ("-", None),
            ("true", None),
            ("1 ", None),
        ] {
            assert_eq!(c_strtoint(token), value, "{token:?}");
        }
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn never_panics_on_jsonish(s in "[\\[\\]{}\":, 0-9a-zA-Z\\\\\n-]{0,120}") {
            let _ = parse(s.as_bytes());
        }
    }
}
