//! SCRAM server messages: whatever the server sends as server-first-message and
//! server-final-message, the client side of the exchange must answer or fail with an
//! error, never panic.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use pgwire_repl::config::ChannelBinding;
use pgwire_repl::proto::auth::{AuthSettings, Authenticator};
use pgwire_repl::proto::backend::AuthRequest;

fuzz_target!(|data: &[u8]| {
    // First byte picks the binding mode; the rest splits into server-first and -final.
    let Some((&selector, rest)) = data.split_first() else { return };
    let split = rest.iter().position(|&b| b == 0xFF).unwrap_or(rest.len());
    let (first, last) = rest.split_at(split);
    let tls = selector & 1 == 1;
    let mut auth = Authenticator::new(AuthSettings {
        user: "fuzz".into(),
        password: Some("pencil".into()),
        channel_binding: [ChannelBinding::Disable, ChannelBinding::Prefer, ChannelBinding::Require][(selector as usize >> 1) % 3],
        tls_in_use: tls,
        server_cert_hash: tls.then(|| Some(vec![7u8; 32])),
        target: "fuzz".into(),
    });
    let mechanisms = vec!["SCRAM-SHA-256-PLUS".to_string(), "SCRAM-SHA-256".to_string()];
    if auth.respond(AuthRequest::Sasl { mechanisms }).is_err() {
        return;
    }
    if auth.respond(AuthRequest::SaslContinue(Bytes::copy_from_slice(first))).is_err() {
        return;
    }
    let _ = auth.respond(AuthRequest::SaslFinal(Bytes::copy_from_slice(last.get(1..).unwrap_or_default())));
    let _ = auth.finish();
});
