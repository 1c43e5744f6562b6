//! Connection strings and URIs: parsing must never panic, and a parsed configuration
//! must survive a round trip through its own conninfo text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgwire_repl::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(config) = Config::parse(text) {
        let again = Config::parse(&config.to_conninfo_string())
            .unwrap_or_else(|e| panic!("re-parsing {:?} failed: {e}", config.to_conninfo_string()));
        assert_eq!(again.to_conninfo_string(), config.to_conninfo_string());
    }
});
