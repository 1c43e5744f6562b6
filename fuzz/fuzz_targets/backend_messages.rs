//! Backend message framing and decoding: arbitrary bytes, split at an arbitrary point,
//! must decode to the same messages as unsplit, and never panic.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pgwire_repl::proto::backend::{decode, DecodeLimits};

fuzz_target!(|data: &[u8]| {
    let limits = DecodeLimits { max_short_message: 4096, max_long_message: 1 << 16 };
    let Some((&split, rest)) = data.split_first() else { return };
    let split = (split as usize).min(rest.len());

    let whole = decode_all(rest, rest.len(), &limits);
    let pieces = decode_all(rest, split, &limits);
    assert_eq!(whole, pieces, "splitting the stream changed the result");
});

fn decode_all(data: &[u8], split: usize, limits: &DecodeLimits) -> Vec<String> {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for chunk in [&data[..split], &data[split..]] {
        buf.extend_from_slice(chunk);
        loop {
            match decode(&mut buf, limits) {
                Ok(Some(message)) => out.push(format!("{message:?}")),
                Ok(None) => break,
                Err(e) => {
                    out.push(format!("error: {}", e.message()));
                    return out;
                }
            }
        }
    }
    out
}
