//! The PostgreSQL 15+ CopyData sub-messages of a base backup (pure).

use bytes::Bytes;

use crate::error::{Error, Result};

/// One CopyData payload of the 15+ stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamMessage {
    /// `n`: a new archive starts.
    NewArchive {
        /// `base.tar`, `<oid>.tar`, with `.gz`/`.lz4`/`.zst` when the server compresses.
        name: String,
        /// The tablespace location (empty for the base directory).
        location: String,
    },
    /// `d`: archive (or, after `m`, manifest) bytes — a slice of the payload, no copy.
    Data(Bytes),
    /// `p`: cumulative uncompressed bytes sent so far.
    Progress(u64),
    /// `m`: the manifest follows.
    Manifest,
}

/// Parses one CopyData payload.
///
/// ```
/// use basebackup::demux::{parse, StreamMessage};
/// let m = parse(bytes::Bytes::from_static(b"nbase.tar\0\0")).unwrap();
/// assert_eq!(m, StreamMessage::NewArchive { name: "base.tar".into(), location: String::new() });
/// ```
pub fn parse(payload: Bytes) -> Result<StreamMessage> {
    match payload.first() {
        Some(b'd') => Ok(StreamMessage::Data(payload.slice(1..))),
        Some(b'p') => {
            let raw: [u8; 8] = payload
                .get(1..9)
                .and_then(|s| s.try_into().ok())
                .ok_or_else(|| Error::protocol("progress message ('p') shorter than 9 bytes"))?;
            Ok(StreamMessage::Progress(u64::from_be_bytes(raw)))
        }
        Some(b'm') => Ok(StreamMessage::Manifest),
        Some(b'n') => {
            let mut parts = payload[1..].split(|&b| b == 0);
            let name = parts.next().unwrap_or_default();
            let location = parts
                .next()
                .ok_or_else(|| Error::protocol("new-archive message ('n') without a location"))?;
            let name = String::from_utf8(name.to_vec())
                .map_err(|_| Error::protocol("archive name is not UTF-8"))?;
            // As pg_basebackup: no empty names, no hidden files, no directories.
            if name.is_empty() || name.starts_with('.') || name.contains('/') || name.contains('\\')
            {
                return Err(Error::unsafe_entry(
                    name,
                    "invalid archive name from the server",
                ));
            }
            let location = String::from_utf8(location.to_vec())
                .map_err(|_| Error::protocol("tablespace location is not UTF-8"))?;
            Ok(StreamMessage::NewArchive { name, location })
        }
        Some(&other) => Err(Error::protocol(format!(
            "unknown base-backup stream message type {:?}",
            other as char
        ))),
        None => Err(Error::protocol(
            "empty CopyData message in the base-backup stream",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages() {
        assert_eq!(
            parse(Bytes::from_static(b"n16387.tar\0/srv/pg/ts1\0")).unwrap(),
            StreamMessage::NewArchive {
                name: "16387.tar".into(),
                location: "/srv/pg/ts1".into()
            }
        );
        assert_eq!(
            parse(Bytes::from_static(b"dabc")).unwrap(),
            StreamMessage::Data(Bytes::from_static(b"abc"))
        );
        let mut p = b"p".to_vec();
        p.extend(77312u64.to_be_bytes());
        assert_eq!(
            parse(Bytes::from(p)).unwrap(),
            StreamMessage::Progress(77312)
        );
        assert_eq!(
            parse(Bytes::from_static(b"m")).unwrap(),
            StreamMessage::Manifest
        );
        assert!(parse(Bytes::from_static(b"p123")).is_err());
        assert!(parse(Bytes::from_static(b"x")).is_err());
        assert!(parse(Bytes::new()).is_err());
        assert_eq!(
            parse(Bytes::from_static(b"n../x\0\0")).unwrap_err().kind(),
            crate::ErrorKind::Unsafe
        );
        assert!(parse(Bytes::from_static(b"nbase.tar")).is_err());
    }
}
