//! Connection start-up: whatever a server sends after the startup packet (authentication
//! requests, parameters, errors, anything), the sans-IO `Startup` machine answers with a
//! step or an error, never panics, and refuses every message after its first error or
//! after ReadyForQuery.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pgwire_repl::config::{ChannelBinding, RequireAuth};
use pgwire_repl::proto::auth::{AuthSettings, Authenticator};
use pgwire_repl::proto::backend::{decode, DecodeLimits};
use pgwire_repl::proto::startup::{Startup, StartupStep};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the client's settings; the rest is the server's byte stream.
    let Some((&selector, rest)) = data.split_first() else { return };
    let tls = selector & 1 == 1;
    let auth = Authenticator::new(AuthSettings {
        user: "fuzz".into(),
        password: (selector & 2 == 2).then(|| "pencil".to_string()),
        channel_binding: [ChannelBinding::Disable, ChannelBinding::Prefer, ChannelBinding::Require]
            [(selector as usize >> 2) % 3],
        tls_in_use: tls,
        server_cert_hash: tls.then(|| Some(vec![7u8; 32])),
        target: "fuzz".into(),
    })
    .with_require_auth(match (selector >> 4) % 4 {
        0 => None,
        1 => RequireAuth::parse("scram-sha-256").ok(),
        2 => RequireAuth::parse("!password,!md5").ok(),
        _ => RequireAuth::parse("none").ok(),
    });
    let mut startup = Startup::new(auth, "fuzz", "fuzz");
    let limits = DecodeLimits { max_short_message: 4096, max_long_message: 1 << 16 };
    let mut buf = BytesMut::from(rest);
    let mut over = false;
    while let Ok(Some(message)) = decode(&mut buf, &limits) {
        let result = startup.handle(message);
        if over {
            assert!(result.is_err(), "a message was accepted after the exchange ended");
        }
        if !matches!(
            result,
            Ok(StartupStep::Send(_) | StartupStep::Notice(_) | StartupStep::Continue)
        ) {
            over = true;
        }
    }
});
