//! pg_verifybackup's PostgreSQL-compatible manifest reader: arbitrary bytes never panic,
//! and a manifest it accepts has a known version.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(parsed) = pg_frontends::pg_verifybackup::manifest::parse(data) {
        assert!(parsed.version == 1 || parsed.version == 2);
    }
});
