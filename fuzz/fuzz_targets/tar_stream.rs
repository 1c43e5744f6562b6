//! BASE_BACKUP sub-messages and the tar extractor: arbitrary bytes, split at arbitrary
//! points, never panic; every entry the parser lets through is a safe relative path
//! (no absolute path, no `..`, no NUL), and splitting never changes the outcome.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use basebackup::tar::{TarEvent, TarParser};

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let _ = basebackup::demux::parse(Bytes::copy_from_slice(rest));
    let whole = run(rest, &[rest.len()]);
    let cut = (split as usize * 7) % (rest.len() + 1);
    let pieces = run(rest, &[cut, rest.len()]);
    assert_eq!(whole, pieces, "chunking changed the result");
});

fn run(data: &[u8], cuts: &[usize]) -> Vec<String> {
    let mut parser = TarParser::new(true);
    let mut seen = Vec::new();
    let mut from = 0;
    for &to in cuts {
        let chunk = Bytes::copy_from_slice(&data[from..to]);
        from = to;
        let result = parser.push(chunk, &mut |event| {
            match &event {
                TarEvent::Directory { path, .. } | TarEvent::File { path, .. } | TarEvent::Symlink { path, .. } => {
                    assert!(!path.starts_with(b"/"), "absolute path {path:?}");
                    assert!(!path.contains(&0), "NUL in {path:?}");
                    assert!(!path.split(|&b| b == b'/').any(|c| c == b".."), "dotdot in {path:?}");
                    seen.push(format!("{event:?}"));
                }
                // Data chunks may be split differently; count bytes instead.
                TarEvent::Data(chunk) => seen.push(format!("data {}", chunk.len())),
                TarEvent::FileEnd => seen.push("end".into()),
            }
            Ok(())
        });
        if let Err(e) = result {
            seen.push(format!("error {:?}", e.kind()));
            return normalize(seen);
        }
    }
    if parser.finish().is_err() {
        seen.push("unfinished".into());
    }
    normalize(seen)
}

/// Merges consecutive data-chunk sizes, which depend on where the input was split.
fn normalize(events: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut pending = 0usize;
    for event in events {
        if let Some(n) = event.strip_prefix("data ") {
            pending += n.parse::<usize>().unwrap_or(0);
            continue;
        }
        if pending > 0 {
            out.push(format!("data {pending}"));
            pending = 0;
        }
        out.push(event);
    }
    if pending > 0 {
        out.push(format!("data {pending}"));
    }
    out
}
