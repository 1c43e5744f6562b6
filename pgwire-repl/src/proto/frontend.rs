//! Frontend (client → server) messages.
//!
//! Built on `postgres-protocol`'s message builders; this module adds the checks a
//! replication client needs (no NUL bytes in query strings, one command per query) and
//! maps failures into this crate's [`Error`].

use bytes::{BufMut, BytesMut};
use postgres_protocol::message::frontend;

use crate::error::{Error, Result};

/// The SSLRequest code (1234 << 16 | 5679).
pub const SSL_REQUEST_CODE: i32 = 80_877_103;
/// Protocol version 3.0, which this client always requests (PostgreSQL 13–18 all speak it).
pub const PROTOCOL_VERSION_3_0: i32 = 196_608;

/// Appends a StartupMessage with `parameters` (protocol 3.0).
///
/// ```
/// let mut out = bytes::BytesMut::new();
/// pgwire_repl::proto::frontend::startup(&[("user", "repl"), ("replication", "true")], &mut out).unwrap();
/// assert_eq!(&out[4..8], &196608i32.to_be_bytes());
/// ```
pub fn startup(parameters: &[(&str, &str)], out: &mut BytesMut) -> Result<()> {
    for (name, value) in parameters {
        if name.contains('\0') || value.contains('\0') {
            return Err(Error::usage(
                format!("startup parameter {name:?} contains a NUL byte"),
                "remove NUL characters from connection parameters",
            ));
        }
    }
    frontend::startup_message(parameters.iter().copied(), out).map_err(|e| {
        Error::usage(
            format!("cannot encode the startup message: {e}"),
            "shorten the connection parameters",
        )
    })
}

/// Appends an SSLRequest.
pub fn ssl_request(out: &mut BytesMut) {
    frontend::ssl_request(out);
}

/// Appends a PasswordMessage (cleartext or MD5 response).
pub fn password(password: &[u8], out: &mut BytesMut) -> Result<()> {
    if password.contains(&0) {
        return Err(Error::usage(
            "the password contains a NUL byte",
            "PostgreSQL passwords cannot contain NUL characters",
        ));
    }
    frontend::password_message(password, out).map_err(|e| {
        Error::usage(
            format!("cannot encode the password message: {e}"),
            "use a shorter password",
        )
    })
}

/// Appends a SASLInitialResponse.
pub fn sasl_initial_response(mechanism: &str, data: &[u8], out: &mut BytesMut) -> Result<()> {
    frontend::sasl_initial_response(mechanism, data, out).map_err(|e| {
        Error::usage(
            format!("cannot encode the SASL initial response: {e}"),
            "report this as a bug",
        )
    })
}

/// Appends a SASLResponse.
pub fn sasl_response(data: &[u8], out: &mut BytesMut) -> Result<()> {
    frontend::sasl_response(data, out).map_err(|e| {
        Error::usage(
            format!("cannot encode the SASL response: {e}"),
            "report this as a bug",
        )
    })
}

/// Appends a simple Query. The text must not contain a NUL byte.
pub fn query(sql: &str, out: &mut BytesMut) -> Result<()> {
    if sql.contains('\0') {
        return Err(Error::usage(
            "the query text contains a NUL byte",
            "remove NUL characters from the command",
        ));
    }
    frontend::query(sql, out).map_err(|e| {
        Error::usage(
            format!("cannot encode the query: {e}"),
            "shorten the command",
        )
    })
}

/// Appends a CopyData message carrying `payload`.
pub fn copy_data(payload: &[u8], out: &mut BytesMut) {
    out.reserve(5 + payload.len());
    out.put_u8(b'd');
    out.put_u32(payload.len() as u32 + 4);
    out.put_slice(payload);
}

/// Appends a CopyDone. This, never CopyFail, is how a client ends START_REPLICATION.
pub fn copy_done(out: &mut BytesMut) {
    frontend::copy_done(out);
}

/// Appends a Terminate.
pub fn terminate(out: &mut BytesMut) {
    frontend::terminate(out);
}

/// Quotes a string literal for a replication command: `'…'` with `''` for a quote.
/// Backslashes are not special in the replication grammar.
///
/// ```
/// assert_eq!(pgwire_repl::proto::frontend::quote_literal("it's"), "'it''s'");
/// ```
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Checks a replication slot name: `[a-z0-9_]`, 1 to 63 characters, as the server requires.
pub fn validate_slot_name(name: &str) -> Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(Error::usage(
            format!("invalid replication slot name {name:?}"),
            "slot names may contain only lower-case letters, digits and underscores, 1 to 63 characters",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_rejects_nul() {
        assert!(query("SELECT\0 1", &mut BytesMut::new()).is_err());
    }

    #[test]
    fn copy_data_framing() {
        let mut out = BytesMut::new();
        copy_data(b"abc", &mut out);
        assert_eq!(&out[..], b"d\0\0\0\x07abc");
    }

    #[test]
    fn slot_names() {
        assert!(validate_slot_name("standby_1").is_ok());
        for bad in ["", "Standby", "a-b", "a b", &"x".repeat(64)] {
            assert!(validate_slot_name(bad).is_err(), "{bad:?}");
        }
    }
}
