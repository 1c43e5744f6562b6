//! Step 2 of a connection: encryption, as `sslmode` and `sslnegotiation` say. An
//! SSLRequest and the server's one-byte answer, or a direct TLS handshake (PG17+), over
//! whatever stream step 1 opened (or the caller supplied).

use std::sync::Arc;

use bytes::BytesMut;
use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::stream::{has_unread_bytes, Stream};
use super::{ConnectOptions, TlsInfo};
use crate::config::{Config, Host, SslCertMode, SslMode, SslNegotiation, SslProtocolVersion};
use crate::error::{Error, Result};
use crate::proto::frontend;

/// Which encryption one attempt uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Encryption {
    None,
    Negotiated { required: bool },
    Direct,
}

/// The attempts libpq makes for one address, in order: `allow` and `prefer` try the
/// other way after a failure. TLS is never used over Unix sockets (libpq ignores
/// `sslmode` there).
pub(super) fn plan(config: &Config, host: &Host) -> &'static [Encryption] {
    match (host, config.ssl_mode, config.ssl_negotiation) {
        (Host::Unix(_), _, _) => &[Encryption::None],
        (_, SslMode::Disable, _) => &[Encryption::None],
        (_, SslMode::Allow, _) => &[Encryption::None, Encryption::Negotiated { required: true }],
        (_, SslMode::Prefer, _) => &[Encryption::Negotiated { required: false }, Encryption::None],
        (_, _, SslNegotiation::Direct) => &[Encryption::Direct],
        (_, _, SslNegotiation::Postgres) => &[Encryption::Negotiated { required: true }],
    }
}

/// A stream after step 2.
pub(super) struct Secured {
    pub(super) stream: Stream,
    pub(super) tls: Option<TlsInfo>,
    /// The `tls-server-end-point` hash for channel binding: `None` without TLS (or
    /// without a server certificate), `Some(None)` when its algorithm has no digest.
    pub(super) server_cert_hash: Option<Option<Vec<u8>>>,
}

/// Applies `encryption` to `stream`.
pub(super) async fn negotiate(
    config: &Config,
    options: &ConnectOptions,
    host: &Host,
    target: &str,
    mut stream: Stream,
    encryption: Encryption,
) -> Result<Secured> {
    let mut direct = false;
    match encryption {
        Encryption::None => {}
        Encryption::Direct => {
            stream = start_tls(config, options, host, stream, true).await?;
            direct = true;
        }
        Encryption::Negotiated { required } => {
            let mut request = BytesMut::new();
            frontend::ssl_request(&mut request);
            stream
                .write_all(&request)
                .await
                .map_err(|e| Error::io(format!("sending SSLRequest to {target}"), e))?;
            stream
                .flush()
                .await
                .map_err(|e| Error::io(format!("sending SSLRequest to {target}"), e))?;
            let mut answer = [0u8; 1];
            stream.read_exact(&mut answer).await.map_err(|e| {
                Error::io(format!("reading the SSLRequest answer from {target}"), e)
            })?;
            match answer[0] {
                b'S' => {
                    // Bytes after 'S' but before the handshake could be injected by a
                    // man in the middle (CVE-2021-23222): refuse them.
                    if has_unread_bytes(&mut stream) {
                        return Err(Error::protocol(format!(
                            "{target} sent unencrypted data after accepting TLS"
                        )));
                    }
                    stream = start_tls(config, options, host, stream, false).await?;
                }
                b'N' if required => {
                    return Err(Error::tls(
                        format!("{target} does not support TLS, but sslmode={} requires it", crate::config::ssl_mode_name(config.ssl_mode)),
                        "enable ssl=on (with ssl_cert_file and ssl_key_file) on the server, or lower sslmode to prefer or disable",
                    ));
                }
                b'N' => {}
                b'E' => {
                    return Err(Error::protocol(format!("{target} answered the SSLRequest with an error; is it PostgreSQL older than 7.0?")))
                }
                other => {
                    return Err(Error::protocol(format!("{target} answered the SSLRequest with byte 0x{other:02x}, expected 'S' or 'N'")))
                }
            }
        }
    }
    let Some(session) = stream.tls_session() else {
        crate::tls::check_client_cert_mode_without_tls(config, target)?;
        return Ok(Secured {
            stream,
            tls: None,
            server_cert_hash: None,
        });
    };
    let tls = TlsInfo {
        version: session
            .protocol_version()
            .map(|v| format!("{v:?}").replace("TLSv1_", "TLSv1."))
            .unwrap_or_default(),
        cipher: session
            .negotiated_cipher_suite()
            .map(|c| format!("{:?}", c.suite()))
            .unwrap_or_default(),
        direct,
    };
    let server_cert_hash = session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|cert| crate::tls::tls_server_end_point(cert.as_ref()));
    Ok(Secured {
        stream,
        tls: Some(tls),
        server_cert_hash,
    })
}

/// The TLS handshake over `stream`, with the libpq-compatible configuration built from
/// `config`, or with the caller's [`ConnectOptions::tls_config`].
async fn start_tls(
    config: &Config,
    options: &ConnectOptions,
    host: &Host,
    stream: Stream,
    direct: bool,
) -> Result<Stream> {
    let Host::Tcp(name) = host else {
        return Err(Error::usage(
            "TLS over a Unix socket",
            "report this as a bug",
        ));
    };
    if matches!(stream, Stream::Unix(_) | Stream::Tls(_)) {
        return Err(Error::usage(
            "TLS over a Unix socket or inside TLS",
            "report this as a bug",
        ));
    }
    let (client_config, server_name, setup) = match &options.tls_config {
        Some(custom) => (
            with_postgresql_alpn(custom),
            crate::tls::rustls_server_name(name),
            None,
        ),
        None => {
            let setup = crate::tls::prepare(config, name)?;
            (
                setup.client_config.clone(),
                setup.server_name.clone(),
                Some(setup),
            )
        }
    };
    let connector = tokio_rustls::TlsConnector::from(client_config);
    let tls = connector.connect(server_name, stream).await.map_err(|e| {
        crate::tls::handshake_error(config, name, direct, options.tls_config.is_some(), &e)
    })?;
    if let Some(setup) = setup {
        setup.check_client_cert_mode(config, &format!("host={name}"))?;
    }
    Ok(Stream::Tls(Box::new(tls)))
}

/// The caller's configuration, offering ALPN `postgresql` when it offers no protocol
/// (PostgreSQL 17+ requires it for direct TLS, older servers ignore it).
fn with_postgresql_alpn(custom: &Arc<ClientConfig>) -> Arc<ClientConfig> {
    if !custom.alpn_protocols.is_empty() {
        return custom.clone();
    }
    let mut config = ClientConfig::clone(custom);
    config.alpn_protocols = vec![crate::tls::ALPN_POSTGRESQL.to_vec()];
    Arc::new(config)
}

/// With a caller-supplied TLS configuration, the options that configure this crate's own
/// TLS setup would be silently ignored: refuse them instead, so that nobody believes a
/// root certificate or CRL is checked when the caller's verifier decides.
pub(super) fn check_custom_tls(config: &Config, options: &ConnectOptions) -> Result<()> {
    if options.tls_config.is_none() {
        return Ok(());
    }
    let mut ignored = Vec::new();
    let mut path = |name: &str, value: &Option<std::path::PathBuf>| {
        if let Some(value) = value {
            ignored.push(format!("{name}={}", value.display()));
        }
    };
    path("sslrootcert", &config.ssl_root_cert);
    path("sslcert", &config.ssl_cert);
    path("sslkey", &config.ssl_key);
    path("sslcrl", &config.ssl_crl);
    path("sslcrldir", &config.ssl_crl_dir);
    if config.ssl_password.is_some() {
        ignored.push("sslpassword".to_string());
    }
    if config.ssl_cert_mode != SslCertMode::Allow {
        ignored.push("sslcertmode".to_string());
    }
    if config.ssl_min_protocol_version != SslProtocolVersion::default() {
        ignored.push(format!(
            "ssl_min_protocol_version={}",
            config.ssl_min_protocol_version.name()
        ));
    }
    if let Some(max) = config.ssl_max_protocol_version {
        ignored.push(format!("ssl_max_protocol_version={}", max.name()));
    }
    if !config.ssl_sni {
        ignored.push("sslsni=0".to_string());
    }
    if ignored.is_empty() {
        return Ok(());
    }
    Err(Error::usage(
        format!(
            "the connection options set {} but the TLS configuration is supplied by the caller (ConnectOptions::tls_config), which alone decides certificates, trust, revocation, protocol versions and SNI",
            ignored.join(", ")
        ),
        "configure those in the rustls::ClientConfig and remove them from the connection options (and from PGSSL* variables and the service file), or drop ConnectOptions::tls_config to use the libpq-compatible TLS setup",
    ))
}
