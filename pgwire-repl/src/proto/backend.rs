//! Backend (server → client) messages: a framing decoder with per-type length limits,
//! a non-panicking body parser, and an encoder used by tests and scripted servers.
//!
//! Decoding never copies a message body: the frame is split off the receive buffer and
//! frozen, and `CopyData` payloads and `DataRow` values are [`Bytes`] slices of it.
//!
//! ```
//! use bytes::BytesMut;
//! use pgwire_repl::proto::backend::{decode, BackendMessage, DecodeLimits};
//!
//! let mut wire = BytesMut::new();
//! BackendMessage::CopyData(bytes::Bytes::from_static(b"hello")).encode(&mut wire);
//! BackendMessage::CopyDone.encode(&mut wire);
//! let limits = DecodeLimits::default();
//! match decode(&mut wire, &limits).unwrap() {
//!     Some(BackendMessage::CopyData(payload)) => assert_eq!(&payload[..], b"hello"),
//!     other => panic!("unexpected {other:?}"),
//! }
//! assert_eq!(decode(&mut wire, &limits).unwrap(), Some(BackendMessage::CopyDone));
//! assert_eq!(decode(&mut wire, &limits).unwrap(), None);
//! ```

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::{DbError, Error, Result};

/// Length limits for incoming messages, checked before any body is buffered.
///
/// A message's length field counts itself but not the type byte, as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Limit for message types that are always short (authentication, ParameterStatus,
    /// ReadyForQuery, CommandComplete, …). libpq uses 30000 bytes.
    pub max_short_message: u32,
    /// Limit for types that can be long: RowDescription, DataRow, CopyData, ErrorResponse,
    /// NoticeResponse, NotificationResponse. libpq accepts up to 1 GiB; the default here is
    /// 64 MiB, far above anything PostgreSQL 13–18 sends on a replication connection
    /// (XLogData carries at most 128 KiB of WAL), so memory stays bounded against a hostile
    /// peer. Raise it for SQL results with huge rows.
    pub max_long_message: u32,
}

impl Default for DecodeLimits {
    fn default() -> DecodeLimits {
        DecodeLimits {
            max_short_message: 30_000,
            max_long_message: 64 * 1024 * 1024,
        }
    }
}

impl DecodeLimits {
    fn limit_for(&self, tag: u8) -> u32 {
        match tag {
            b'T' | b'D' | b'd' | b'E' | b'N' | b'A' | b'V' => self.max_long_message,
            _ => self.max_short_message,
        }
    }
}

/// An authentication request (`R` message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthRequest {
    /// Authentication succeeded.
    Ok,
    /// Kerberos V5 (obsolete).
    KerberosV5,
    /// Send the password in clear text.
    CleartextPassword,
    /// Send an MD5-hashed password with this salt.
    Md5Password {
        /// The 4-byte salt.
        salt: [u8; 4],
    },
    /// SCM credentials (obsolete).
    ScmCredential,
    /// GSSAPI.
    Gss,
    /// GSSAPI continuation data.
    GssContinue(Bytes),
    /// SSPI.
    Sspi,
    /// SASL, with the mechanisms the server offers, in its order of preference.
    Sasl {
        /// Mechanism names, e.g. `SCRAM-SHA-256-PLUS`, `SCRAM-SHA-256`.
        mechanisms: Vec<String>,
    },
    /// SASL challenge data (the server-first-message for SCRAM).
    SaslContinue(Bytes),
    /// SASL outcome data (the server-final-message for SCRAM).
    SaslFinal(Bytes),
    /// A code this client does not know.
    Other {
        /// The authentication request code.
        code: i32,
    },
}

/// One column of a RowDescription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDescription {
    /// Column name.
    pub name: String,
    /// Table OID, or 0.
    pub table_oid: u32,
    /// Column attribute number, or 0.
    pub column_id: i16,
    /// Data type OID.
    pub type_oid: u32,
    /// Type size (negative for variable length). Replication result sets differ between
    /// versions here, so do not rely on it.
    pub type_size: i16,
    /// Type modifier.
    pub type_modifier: i32,
    /// 0 = text, 1 = binary.
    pub format: i16,
}

/// The header of CopyInResponse, CopyOutResponse and CopyBothResponse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyResponse {
    /// Overall format: 0 = text, 1 = binary.
    pub format: u8,
    /// Per-column formats.
    pub column_formats: Vec<i16>,
}

/// A decoded backend message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendMessage {
    /// `R`.
    Authentication(AuthRequest),
    /// `S`.
    ParameterStatus {
        /// Parameter name.
        name: String,
        /// Its value.
        value: String,
    },
    /// `K`. The secret is 4 bytes under protocol 3.0 and up to 256 under 3.2.
    BackendKeyData {
        /// Backend process ID.
        process_id: i32,
        /// Cancel secret.
        secret_key: Bytes,
    },
    /// `Z` with the transaction status byte (`I`, `T` or `E`).
    ReadyForQuery {
        /// Transaction status.
        status: u8,
    },
    /// `T`.
    RowDescription(Vec<FieldDescription>),
    /// `D`: each value as a slice of the frame, `None` for NULL.
    DataRow(Vec<Option<Bytes>>),
    /// `C` with its tag.
    CommandComplete {
        /// The command tag, e.g. `SELECT 1` or `START_REPLICATION`.
        tag: String,
    },
    /// `I`.
    EmptyQueryResponse,
    /// `E`.
    ErrorResponse(DbError),
    /// `N`.
    NoticeResponse(DbError),
    /// `A`.
    NotificationResponse {
        /// Notifying backend's process ID.
        process_id: i32,
        /// Channel name.
        channel: String,
        /// Payload.
        payload: String,
    },
    /// `G`.
    CopyInResponse(CopyResponse),
    /// `H`.
    CopyOutResponse(CopyResponse),
    /// `W`.
    CopyBothResponse(CopyResponse),
    /// `d`: the payload, a slice of the receive buffer.
    CopyData(Bytes),
    /// `c`.
    CopyDone,
    /// `v`: the server does not support the requested minor version or `_pq_` options.
    NegotiateProtocolVersion {
        /// Newest minor protocol version the server supports.
        newest_minor: i32,
        /// Options the server did not recognise.
        unrecognized_options: Vec<String>,
    },
    /// A message type this client does not handle (for example extended-protocol replies).
    Unknown {
        /// The type byte.
        tag: u8,
        /// The body.
        body: Bytes,
    },
}

impl BackendMessage {
    /// The message's type byte.
    pub fn tag(&self) -> u8 {
        match self {
            BackendMessage::Authentication(_) => b'R',
            BackendMessage::ParameterStatus { .. } => b'S',
            BackendMessage::BackendKeyData { .. } => b'K',
            BackendMessage::ReadyForQuery { .. } => b'Z',
            BackendMessage::RowDescription(_) => b'T',
            BackendMessage::DataRow(_) => b'D',
            BackendMessage::CommandComplete { .. } => b'C',
            BackendMessage::EmptyQueryResponse => b'I',
            BackendMessage::ErrorResponse(_) => b'E',
            BackendMessage::NoticeResponse(_) => b'N',
            BackendMessage::NotificationResponse { .. } => b'A',
            BackendMessage::CopyInResponse(_) => b'G',
            BackendMessage::CopyOutResponse(_) => b'H',
            BackendMessage::CopyBothResponse(_) => b'W',
            BackendMessage::CopyData(_) => b'd',
            BackendMessage::CopyDone => b'c',
            BackendMessage::NegotiateProtocolVersion { .. } => b'v',
            BackendMessage::Unknown { tag, .. } => *tag,
        }
    }

    /// A short name for error messages ("CopyData", "ErrorResponse", …).
    pub fn name(&self) -> &'static str {
        message_name(self.tag())
    }

    /// Appends the wire form of this message to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        let start = out.len();
        out.put_u8(self.tag());
        out.put_u32(0); // length, patched below
        match self {
            BackendMessage::Authentication(request) => encode_auth(request, out),
            BackendMessage::ParameterStatus { name, value } => {
                put_cstr(out, name);
                put_cstr(out, value);
            }
            BackendMessage::BackendKeyData {
                process_id,
                secret_key,
            } => {
                out.put_i32(*process_id);
                out.put_slice(secret_key);
            }
            BackendMessage::ReadyForQuery { status } => out.put_u8(*status),
            BackendMessage::RowDescription(fields) => {
                out.put_i16(fields.len() as i16);
                for field in fields {
                    put_cstr(out, &field.name);
                    out.put_u32(field.table_oid);
                    out.put_i16(field.column_id);
                    out.put_u32(field.type_oid);
                    out.put_i16(field.type_size);
                    out.put_i32(field.type_modifier);
                    out.put_i16(field.format);
                }
            }
            BackendMessage::DataRow(values) => {
                out.put_i16(values.len() as i16);
                for value in values {
                    match value {
                        Some(v) => {
                            out.put_i32(v.len() as i32);
                            out.put_slice(v);
                        }
                        None => out.put_i32(-1),
                    }
                }
            }
            BackendMessage::CommandComplete { tag } => put_cstr(out, tag),
            BackendMessage::EmptyQueryResponse | BackendMessage::CopyDone => {}
            BackendMessage::ErrorResponse(db) | BackendMessage::NoticeResponse(db) => {
                encode_fields(db, out)
            }
            BackendMessage::NotificationResponse {
                process_id,
                channel,
                payload,
            } => {
                out.put_i32(*process_id);
                put_cstr(out, channel);
                put_cstr(out, payload);
            }
            BackendMessage::CopyInResponse(copy)
            | BackendMessage::CopyOutResponse(copy)
            | BackendMessage::CopyBothResponse(copy) => {
                out.put_u8(copy.format);
                out.put_i16(copy.column_formats.len() as i16);
                for format in &copy.column_formats {
                    out.put_i16(*format);
                }
            }
            BackendMessage::CopyData(payload) => out.put_slice(payload),
            BackendMessage::NegotiateProtocolVersion {
                newest_minor,
                unrecognized_options,
            } => {
                out.put_i32(*newest_minor);
                out.put_i32(unrecognized_options.len() as i32);
                for option in unrecognized_options {
                    put_cstr(out, option);
                }
            }
            BackendMessage::Unknown { body, .. } => out.put_slice(body),
        }
        let len = (out.len() - start - 1) as u32;
        out[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
    }
}

fn encode_auth(request: &AuthRequest, out: &mut BytesMut) {
    match request {
        AuthRequest::Ok => out.put_i32(0),
        AuthRequest::KerberosV5 => out.put_i32(2),
        AuthRequest::CleartextPassword => out.put_i32(3),
        AuthRequest::Md5Password { salt } => {
            out.put_i32(5);
            out.put_slice(salt);
        }
        AuthRequest::ScmCredential => out.put_i32(6),
        AuthRequest::Gss => out.put_i32(7),
        AuthRequest::GssContinue(data) => {
            out.put_i32(8);
            out.put_slice(data);
        }
        AuthRequest::Sspi => out.put_i32(9),
        AuthRequest::Sasl { mechanisms } => {
            out.put_i32(10);
            for mechanism in mechanisms {
                put_cstr(out, mechanism);
            }
            out.put_u8(0);
        }
        AuthRequest::SaslContinue(data) => {
            out.put_i32(11);
            out.put_slice(data);
        }
        AuthRequest::SaslFinal(data) => {
            out.put_i32(12);
            out.put_slice(data);
        }
        AuthRequest::Other { code } => out.put_i32(*code),
    }
}

fn encode_fields(db: &DbError, out: &mut BytesMut) {
    let mut field = |code: u8, value: &str| {
        out.put_u8(code);
        put_cstr(out, value);
    };
    field(b'S', &db.severity);
    field(b'V', &db.severity);
    field(b'C', &db.code);
    field(b'M', &db.message);
    if let Some(detail) = &db.detail {
        field(b'D', detail);
    }
    if let Some(hint) = &db.hint {
        field(b'H', hint);
    }
    if let Some(context) = &db.context {
        field(b'W', context);
    }
    if let Some(location) = &db.source_location {
        field(b'F', location);
    }
    out.put_u8(0);
}

fn put_cstr(out: &mut BytesMut, s: &str) {
    out.put_slice(s.as_bytes());
    out.put_u8(0);
}

/// A human-readable name for a backend message type byte.
pub fn message_name(tag: u8) -> &'static str {
    match tag {
        b'R' => "Authentication",
        b'S' => "ParameterStatus",
        b'K' => "BackendKeyData",
        b'Z' => "ReadyForQuery",
        b'T' => "RowDescription",
        b'D' => "DataRow",
        b'C' => "CommandComplete",
        b'I' => "EmptyQueryResponse",
        b'E' => "ErrorResponse",
        b'N' => "NoticeResponse",
        b'A' => "NotificationResponse",
        b'G' => "CopyInResponse",
        b'H' => "CopyOutResponse",
        b'W' => "CopyBothResponse",
        b'd' => "CopyData",
        b'c' => "CopyDone",
        b'v' => "NegotiateProtocolVersion",
        b'1' => "ParseComplete",
        b'2' => "BindComplete",
        b'3' => "CloseComplete",
        b'n' => "NoData",
        b's' => "PortalSuspended",
        b't' => "ParameterDescription",
        _ => "unknown message",
    }
}

/// How many bytes the next complete frame in `buf` needs in total (type byte included),
/// once its 5-byte header is present. Lets a reader reserve exactly once per large message.
pub fn frame_len(buf: &[u8]) -> Option<usize> {
    let header = buf.get(..5)?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    Some(len as usize + 1)
}

/// Decodes one message from the front of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole message (read more and call
/// again). A length prefix below 4 or above the type's limit is an error before any
/// body is buffered, so a hostile length never causes a large allocation.
pub fn decode(buf: &mut BytesMut, limits: &DecodeLimits) -> Result<Option<BackendMessage>> {
    let Some(header) = buf.get(..5) else {
        return Ok(None);
    };
    let tag = header[0];
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    if len < 4 {
        return Err(Error::protocol(format!(
            "invalid length {len} in {} ('{}') message header",
            message_name(tag),
            printable(tag)
        )));
    }
    let limit = limits.limit_for(tag);
    if len > limit {
        return Err(Error::protocol(format!(
            "the server announced a {} ('{}') message of {len} bytes, over the {limit}-byte limit for that type",
            message_name(tag),
            printable(tag)
        ))
        .with_advice(
            "this usually means the stream is corrupt or not PostgreSQL; if the server really sends such large rows, raise DecodeLimits::max_long_message",
        ));
    }
    let total = len as usize + 1;
    if buf.len() < total {
        return Ok(None);
    }
    let frame = buf.split_to(total).freeze();
    let body = frame.slice(5..);
    parse_body(tag, body).map(Some)
}

fn printable(tag: u8) -> char {
    if tag.is_ascii_graphic() {
        tag as char
    } else {
        '?'
    }
}

/// Parses a message body whose type byte is `tag`.
pub fn parse_body(tag: u8, body: Bytes) -> Result<BackendMessage> {
    let mut r = Reader::new(tag, body);
    let message = match tag {
        b'R' => BackendMessage::Authentication(parse_auth(&mut r)?),
        b'S' => BackendMessage::ParameterStatus {
            name: r.cstr()?,
            value: r.cstr()?,
        },
        b'K' => {
            let process_id = r.i32()?;
            let secret_key = r.rest();
            if secret_key.len() < 4 || secret_key.len() > 256 {
                return Err(r.invalid("a cancel key of 4 to 256 bytes"));
            }
            BackendMessage::BackendKeyData {
                process_id,
                secret_key,
            }
        }
        b'Z' => BackendMessage::ReadyForQuery { status: r.u8()? },
        b'T' => {
            let count = r.count()?;
            let mut fields = Vec::with_capacity(count.min(r.remaining() / 19));
            for _ in 0..count {
                fields.push(FieldDescription {
                    name: r.cstr()?,
                    table_oid: r.u32()?,
                    column_id: r.i16()?,
                    type_oid: r.u32()?,
                    type_size: r.i16()?,
                    type_modifier: r.i32()?,
                    format: r.i16()?,
                });
            }
            BackendMessage::RowDescription(fields)
        }
        b'D' => {
            let count = r.count()?;
            let mut values = Vec::with_capacity(count.min(r.remaining() / 4));
            for _ in 0..count {
                let len = r.i32()?;
                if len == -1 {
                    values.push(None);
                } else if len < 0 {
                    return Err(r.invalid("a value length of -1 or more"));
                } else {
                    values.push(Some(r.bytes(len as usize)?));
                }
            }
            BackendMessage::DataRow(values)
        }
        b'C' => BackendMessage::CommandComplete { tag: r.cstr()? },
        b'I' => BackendMessage::EmptyQueryResponse,
        b'E' => BackendMessage::ErrorResponse(parse_fields(&mut r)?),
        b'N' => BackendMessage::NoticeResponse(parse_fields(&mut r)?),
        b'A' => BackendMessage::NotificationResponse {
            process_id: r.i32()?,
            channel: r.cstr()?,
            payload: r.cstr()?,
        },
        b'G' => BackendMessage::CopyInResponse(parse_copy_response(&mut r)?),
        b'H' => BackendMessage::CopyOutResponse(parse_copy_response(&mut r)?),
        b'W' => BackendMessage::CopyBothResponse(parse_copy_response(&mut r)?),
        b'd' => return Ok(BackendMessage::CopyData(r.rest())),
        b'c' => BackendMessage::CopyDone,
        b'v' => {
            let newest_minor = r.i32()?;
            let count = r.i32()?;
            if count < 0 {
                return Err(r.invalid("a non-negative option count"));
            }
            let mut unrecognized_options = Vec::with_capacity((count as usize).min(r.remaining()));
            for _ in 0..count {
                unrecognized_options.push(r.cstr()?);
            }
            BackendMessage::NegotiateProtocolVersion {
                newest_minor,
                unrecognized_options,
            }
        }
        _ => {
            return Ok(BackendMessage::Unknown {
                tag,
                body: r.rest(),
            })
        }
    };
    r.finish()?;
    Ok(message)
}

fn parse_auth(r: &mut Reader) -> Result<AuthRequest> {
    let code = r.i32()?;
    Ok(match code {
        0 => AuthRequest::Ok,
        2 => AuthRequest::KerberosV5,
        3 => AuthRequest::CleartextPassword,
        5 => {
            let salt = r.bytes(4)?;
            AuthRequest::Md5Password {
                salt: [salt[0], salt[1], salt[2], salt[3]],
            }
        }
        6 => AuthRequest::ScmCredential,
        7 => AuthRequest::Gss,
        8 => AuthRequest::GssContinue(r.rest()),
        9 => AuthRequest::Sspi,
        10 => {
            let mut mechanisms = Vec::new();
            loop {
                let mechanism = r.cstr()?;
                if mechanism.is_empty() {
                    break;
                }
                mechanisms.push(mechanism);
            }
            AuthRequest::Sasl { mechanisms }
        }
        11 => AuthRequest::SaslContinue(r.rest()),
        12 => AuthRequest::SaslFinal(r.rest()),
        code => {
            r.rest();
            AuthRequest::Other { code }
        }
    })
}

fn parse_copy_response(r: &mut Reader) -> Result<CopyResponse> {
    let format = r.u8()?;
    let count = r.count()?;
    let mut column_formats = Vec::with_capacity(count.min(r.remaining() / 2));
    for _ in 0..count {
        column_formats.push(r.i16()?);
    }
    Ok(CopyResponse {
        format,
        column_formats,
    })
}

/// Parses the field list of an ErrorResponse or NoticeResponse.
fn parse_fields(r: &mut Reader) -> Result<DbError> {
    let mut db = DbError::default();
    let mut localized_severity = None;
    let (mut file, mut line, mut routine) = (None, None, None);
    loop {
        let code = r.u8()?;
        if code == 0 {
            break;
        }
        // Error texts may be in the server's encoding; never fail on that.
        let value = r.cstr_lossy()?;
        match code {
            b'S' => localized_severity = Some(value),
            b'V' => db.severity = value,
            b'C' => db.code = value,
            b'M' => db.message = value,
            b'D' => db.detail = Some(value),
            b'H' => db.hint = Some(value),
            b'W' => db.context = Some(value),
            b'F' => file = Some(value),
            b'L' => line = Some(value),
            b'R' => routine = Some(value),
            _ => {}
        }
    }
    if db.severity.is_empty() {
        db.severity = localized_severity.unwrap_or_default();
    }
    db.source_location = match (file, line, routine) {
        (None, None, None) => None,
        (file, line, routine) => {
            let mut location = file.unwrap_or_default();
            if let Some(line) = line {
                location.push(':');
                location.push_str(&line);
            }
            if let Some(routine) = routine {
                location.push(' ');
                location.push_str(&routine);
            }
            Some(location)
        }
    };
    Ok(db)
}

/// A bounds-checked cursor over a message body. Every read returns an error naming the
/// message instead of panicking.
struct Reader {
    tag: u8,
    body: Bytes,
    pos: usize,
}

impl Reader {
    fn new(tag: u8, body: Bytes) -> Reader {
        Reader { tag, body, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.body.len() - self.pos
    }

    fn invalid(&self, expected: &str) -> Error {
        Error::protocol(format!(
            "malformed {} ('{}') message: expected {expected} at byte {} of {}",
            message_name(self.tag),
            printable(self.tag),
            self.pos,
            self.body.len()
        ))
    }

    fn take(&mut self, n: usize) -> Result<&[u8]> {
        if self.remaining() < n {
            return Err(self.invalid(&format!("{n} more bytes")));
        }
        let slice = &self.body[self.pos..self.pos + n];
        self.pos += n;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn i16(&mut self) -> Result<i16> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self) -> Result<i32> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(self.i32()? as u32)
    }

    /// An Int16 element count, rejected when negative.
    fn count(&mut self) -> Result<usize> {
        let count = self.i16()?;
        usize::try_from(count).map_err(|_| self.invalid("a non-negative count"))
    }

    fn bytes(&mut self, n: usize) -> Result<Bytes> {
        if self.remaining() < n {
            return Err(self.invalid(&format!("{n} more bytes")));
        }
        let slice = self.body.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(slice)
    }

    fn rest(&mut self) -> Bytes {
        let slice = self.body.slice(self.pos..);
        self.pos = self.body.len();
        slice
    }

    fn raw_cstr(&mut self) -> Result<&[u8]> {
        let rest = &self.body[self.pos..];
        let Some(nul) = rest.iter().position(|&b| b == 0) else {
            return Err(self.invalid("a NUL-terminated string"));
        };
        let start = self.pos;
        self.pos += nul + 1;
        Ok(&self.body[start..start + nul])
    }

    fn cstr(&mut self) -> Result<String> {
        let raw = self.raw_cstr()?;
        match std::str::from_utf8(raw) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => {
                self.pos -= raw.len() + 1;
                Err(self.invalid("a UTF-8 string"))
            }
        }
    }

    fn cstr_lossy(&mut self) -> Result<String> {
        Ok(String::from_utf8_lossy(self.raw_cstr()?).into_owned())
    }

    fn finish(&self) -> Result<()> {
        if self.remaining() == 0 {
            Ok(())
        } else {
            Err(self.invalid("the end of the message"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    #[test]
    fn oversized_length_is_rejected_before_buffering() {
        // A CopyData announcing 2 GiB: only the header has arrived.
        let mut buf = BytesMut::from(&[b'd', 0x80, 0, 0, 4][..]);
        let err = decode(&mut buf, &DecodeLimits::default()).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Protocol);
        assert!(err.to_string().contains("2147483652 bytes"), "{err}");
        // Short types have the short limit.
        let mut buf = BytesMut::from(&[b'Z', 0, 0, 0x80, 0][..]);
        assert!(decode(&mut buf, &DecodeLimits::default()).is_err());
    }

    #[test]
    fn length_below_four_is_rejected() {
        let mut buf = BytesMut::from(&[b'c', 0, 0, 0, 3][..]);
        assert!(decode(&mut buf, &DecodeLimits::default()).is_err());
    }

    #[test]
    fn copy_data_is_a_slice_of_the_receive_buffer() {
        let mut wire = BytesMut::new();
        BackendMessage::CopyData(Bytes::from(vec![7u8; 1000])).encode(&mut wire);
        let base = wire.as_ptr() as usize;
        let Some(BackendMessage::CopyData(payload)) =
            decode(&mut wire, &DecodeLimits::default()).unwrap()
        else {
            panic!("expected CopyData");
        };
        // The payload points into the original allocation, 5 bytes past the header.
        assert_eq!(payload.as_ptr() as usize, base + 5);
    }

    #[test]
    fn error_response_fields() {
        let body = b"SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed for user \"x\"\0Fauth.c\0L326\0Rauth_failed\0\0";
        let msg = parse_body(b'E', Bytes::from_static(body)).unwrap();
        let BackendMessage::ErrorResponse(db) = msg else {
            panic!()
        };
        assert_eq!(db.code, "28P01");
        assert_eq!(db.severity, "FATAL");
        assert_eq!(
            db.source_location.as_deref(),
            Some("auth.c:326 auth_failed")
        );
    }

    #[test]
    fn trailing_garbage_is_an_error() {
        assert!(parse_body(b'Z', Bytes::from_static(b"II")).is_err());
        assert!(parse_body(b'c', Bytes::from_static(b"x")).is_err());
    }

    #[test]
    fn copy_both_response_as_sent_by_start_replication() {
        let msg = parse_body(b'W', Bytes::from_static(&[0, 0, 0])).unwrap();
        assert_eq!(
            msg,
            BackendMessage::CopyBothResponse(CopyResponse {
                format: 0,
                column_formats: vec![]
            })
        );
    }

    fn text() -> impl Strategy<Value = String> {
        "[^\u{0}]{0,20}"
    }

    fn db_error() -> impl Strategy<Value = DbError> {
        (
            prop_oneof![Just("ERROR"), Just("FATAL"), Just("NOTICE")],
            "[0-9A-Z]{5}",
            text(),
            proptest::option::of(text()),
            proptest::option::of(text()),
            proptest::option::of(text()),
        )
            .prop_map(|(severity, code, message, detail, hint, context)| DbError {
                severity: severity.into(),
                code,
                message,
                detail,
                hint,
                context,
                source_location: None,
            })
    }

    fn auth_request() -> impl Strategy<Value = AuthRequest> {
        prop_oneof![
            Just(AuthRequest::Ok),
            Just(AuthRequest::CleartextPassword),
            any::<[u8; 4]>().prop_map(|salt| AuthRequest::Md5Password { salt }),
            vec("[A-Z0-9-]{1,20}", 0..3).prop_map(|mechanisms| AuthRequest::Sasl { mechanisms }),
            vec(any::<u8>(), 0..40).prop_map(|d| AuthRequest::SaslContinue(d.into())),
            vec(any::<u8>(), 0..40).prop_map(|d| AuthRequest::SaslFinal(d.into())),
            Just(AuthRequest::Gss),
            Just(AuthRequest::Sspi),
            vec(any::<u8>(), 0..10).prop_map(|d| AuthRequest::GssContinue(d.into())),
            (13i32..1000).prop_map(|code| AuthRequest::Other { code }),
        ]
    }

    fn field() -> impl Strategy<Value = FieldDescription> {
        (
            text(),
            any::<u32>(),
            any::<i16>(),
            any::<u32>(),
            any::<i16>(),
            any::<i32>(),
            0i16..2,
        )
            .prop_map(
                |(name, table_oid, column_id, type_oid, type_size, type_modifier, format)| {
                    FieldDescription {
                        name,
                        table_oid,
                        column_id,
                        type_oid,
                        type_size,
                        type_modifier,
                        format,
                    }
                },
            )
    }

    fn copy_response() -> impl Strategy<Value = CopyResponse> {
        (0u8..2, vec(0i16..2, 0..4)).prop_map(|(format, column_formats)| CopyResponse {
            format,
            column_formats,
        })
    }

    /// Every message type this decoder knows.
    pub(crate) fn backend_message() -> impl Strategy<Value = BackendMessage> {
        prop_oneof![
            auth_request().prop_map(BackendMessage::Authentication),
            (text(), text())
                .prop_map(|(name, value)| BackendMessage::ParameterStatus { name, value }),
            (any::<i32>(), vec(any::<u8>(), 4..=32)).prop_map(|(process_id, key)| {
                BackendMessage::BackendKeyData {
                    process_id,
                    secret_key: key.into(),
                }
            }),
            prop_oneof![Just(b'I'), Just(b'T'), Just(b'E')]
                .prop_map(|status| BackendMessage::ReadyForQuery { status }),
            vec(field(), 0..4).prop_map(BackendMessage::RowDescription),
            vec(
                proptest::option::of(vec(any::<u8>(), 0..30).prop_map(Bytes::from)),
                0..5
            )
            .prop_map(BackendMessage::DataRow),
            text().prop_map(|tag| BackendMessage::CommandComplete { tag }),
            Just(BackendMessage::EmptyQueryResponse),
            db_error().prop_map(BackendMessage::ErrorResponse),
            db_error().prop_map(BackendMessage::NoticeResponse),
            (any::<i32>(), text(), text()).prop_map(|(process_id, channel, payload)| {
                BackendMessage::NotificationResponse {
                    process_id,
                    channel,
                    payload,
                }
            }),
            copy_response().prop_map(BackendMessage::CopyInResponse),
            copy_response().prop_map(BackendMessage::CopyOutResponse),
            copy_response().prop_map(BackendMessage::CopyBothResponse),
            vec(any::<u8>(), 0..300).prop_map(|d| BackendMessage::CopyData(d.into())),
            Just(BackendMessage::CopyDone),
            (any::<i32>(), vec(text(), 0..3)).prop_map(|(newest_minor, unrecognized_options)| {
                BackendMessage::NegotiateProtocolVersion {
                    newest_minor,
                    unrecognized_options,
                }
            }),
            (
                prop_oneof![Just(b'1'), Just(b'2'), Just(b'n'), Just(b's')],
                vec(any::<u8>(), 0..10)
            )
                .prop_map(|(tag, body)| BackendMessage::Unknown {
                    tag,
                    body: body.into()
                }),
        ]
    }

    proptest! {
        #[test]
        fn every_message_round_trips(message in backend_message()) {
            let mut wire = BytesMut::new();
            message.encode(&mut wire);
            let decoded = decode(&mut wire, &DecodeLimits::default()).unwrap();
            prop_assert_eq!(decoded, Some(message));
            prop_assert!(wire.is_empty());
        }

        #[test]
        fn any_split_of_the_stream_gives_the_same_messages(
            messages in vec(backend_message(), 1..12),
            cuts in vec(any::<prop::sample::Index>(), 0..20),
        ) {
            let mut wire = BytesMut::new();
            for message in &messages {
                message.encode(&mut wire);
            }
            let wire = wire.freeze();
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
            points.push(wire.len());
            points.sort_unstable();
            let limits = DecodeLimits::default();
            let mut buf = BytesMut::new();
            let mut decoded = Vec::new();
            let mut fed = 0;
            for point in points {
                buf.extend_from_slice(&wire[fed..point]);
                fed = point;
                while let Some(message) = decode(&mut buf, &limits).unwrap() {
                    decoded.push(message);
                }
            }
            prop_assert_eq!(decoded, messages);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..200)) {
            let mut buf = BytesMut::from(&bytes[..]);
            let limits = DecodeLimits { max_short_message: 100, max_long_message: 150 };
            while let Ok(Some(_)) = decode(&mut buf, &limits) {}
        }

        #[test]
        fn arbitrary_bodies_never_panic(tag: u8, body in vec(any::<u8>(), 0..100)) {
            let _ = parse_body(tag, Bytes::from(body));
        }
    }
}
