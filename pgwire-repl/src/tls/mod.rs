//! TLS with libpq's rules, on rustls (ring provider).
//!
//! # sslmode
//!
//! * With a root certificate (`sslrootcert`, else `~/.postgresql/root.crt` when it
//!   exists, or `sslrootcert=system`), every sslmode that uses TLS verifies the server's
//!   chain, as libpq does: `require`, `prefer` and `allow` then behave like `verify-ca`
//!   (a failed verification under `prefer` falls back to an unencrypted attempt, as in
//!   libpq). `verify-full` also checks the host name.
//! * Without one, `require`, `prefer` and `allow` accept any certificate (the handshake
//!   signatures are still checked), and `verify-ca` / `verify-full` are refused.
//! * `sslcrl`, `sslcrldir` (or `~/.postgresql/root.crl`): every certificate of the chain,
//!   the root included, must be covered by a current CRL from its issuer and not be
//!   revoked (OpenSSL's `X509_V_FLAG_CRL_CHECK | X509_V_FLAG_CRL_CHECK_ALL`, which libpq
//!   sets). Without a root certificate nothing is verified, so no CRL is read.
//! * `ssl_min_protocol_version` / `ssl_max_protocol_version` select the rustls protocol
//!   versions (TLS 1.2 and 1.3); `sslsni=0` turns Server Name Indication off;
//!   `sslcertmode` decides whether a client certificate is sent and whether the server
//!   must have asked for one; `sslpassword` decrypts an encrypted PKCS#8 `sslkey`.
//!
//! ALPN `postgresql` is always offered: PostgreSQL 17+ requires it for direct TLS and
//! older servers ignore it.
//!
//! # Design note: certificates libpq accepts and WebPKI does not
//!
//! libpq verifies with OpenSSL. rustls' WebPKI verifier is stricter in three ways that
//! matter for PostgreSQL servers set up by hand: it refuses a CA certificate as the
//! server's certificate (`CaUsedAsEndEntity`, e.g. `openssl req -x509` with
//! `CA:TRUE`, used as its own root), X.509 v1 certificates (`UnsupportedCertVersion`,
//! e.g. `openssl x509 -req` as in PostgreSQL's documentation), and host names found only
//! in the subject's CN. It is also laxer in a few: it does not check the trust anchor's
//! validity dates, CA flag or key usage, accepts an intermediate CA as a trust anchor,
//! ignores key usage on the server certificate and checks revocation below the anchor
//! only.
//!
//! So the verifier here works in layers, each of which can only refuse more:
//!
//! 1. WebPKI verifies the chain first (with the CRLs, revocation expiry enforced). Any
//!    refusal other than `CaUsedAsEndEntity` and `UnsupportedCertVersion` is final.
//!    (A host-name mismatch is not a refusal here: names are checked in step 3.)
//! 2. OpenSSL's rules, as libpq runs them (`chain` module), on the certificates the
//!    server sent and the certificates of `sslrootcert`:
//!    - the chain must end at a self-signed certificate of `sslrootcert`; a self-signed
//!      server certificate is trusted only when `sslrootcert` holds that very
//!      certificate, byte for byte (OpenSSL's rule against look-alikes);
//!    - every signature below the anchor is checked with the rustls provider's
//!      algorithms (the same ones WebPKI uses; the anchor's signature on itself is not
//!      checked, by OpenSSL or WebPKI);
//!    - every certificate, the anchor included, must be within its validity dates;
//!    - every intermediate must have basicConstraints `CA:TRUE`, and the anchor must be
//!      a CA by OpenSSL's `check_ca()` (which counts a self-signed v1 certificate as
//!      one; a v1 intermediate is refused, as OpenSSL 3 refuses it); keyUsage, if
//!      present, must allow certificate signing; path-length limits hold;
//!    - the `ssl_server` purpose: extendedKeyUsage (if present) includes serverAuth,
//!      the server certificate's keyUsage (if present) allows a TLS key exchange;
//!    - no unknown critical extension; with CRLs, the whole chain is revocation-checked
//!      as above.
//!
//!    When WebPKI accepted the chain, these rules run as extra checks. When WebPKI
//!    refused it for one of the two reasons above, they decide alone, and then refuse
//!    any chain with constraints they do not evaluate (name, policy, proxy or RFC 3779
//!    constraints).
//! 3. `verify-full`: libpq's host-name rules (`hostname` module) against the `host`
//!    option, never `hostaddr`.
//!
//! What is accepted beyond WebPKI is exactly what OpenSSL accepts for libpq: a CA or v1
//! certificate as the server's certificate, a v1 root, and a CN-only name. Each such
//! chain still has every signature verified, every date checked and every issuer proven
//! to be a CA, and it must end at a certificate the user put in `sslrootcert`, so it is
//! no weaker than libpq. Differences that remain are refusals where libpq would
//! connect: signature algorithms or key sizes ring does not verify (SHA-1, RSA below
//! 2048 bits, Ed448, DSA), a missing explicitly named `sslrootcert`, `sslcrl` or
//! `sslcrldir` file (libpq silently skips verification or revocation then), partitioned
//! or delta CRLs, and name or policy constraints on chains WebPKI cannot handle.

mod chain;
mod hostname;
mod key;
#[cfg(test)]
mod tests;
mod x509;

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::{
    verify_tls12_signature, verify_tls13_signature, verify_tls13_signature_with_raw_key,
    CryptoProvider, WebPkiSupportedAlgorithms,
};
use rustls::pki_types::{CertificateRevocationListDer, SubjectPublicKeyInfoDer};
use rustls::sign::CertifiedKey;
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, OtherError,
    PeerMisbehaved, RootCertStore, SignatureScheme, SupportedProtocolVersion,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, DnsName, ServerName, UnixTime};
use sha2::Digest;

use crate::config::{Config, Host, SslCertMode, SslMode, SslProtocolVersion};
use crate::error::{Error, Result};

/// The ALPN protocol name PostgreSQL 17+ uses.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn home_file(name: &str) -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    Some(Path::new(&home).join(".postgresql").join(name))
}

/// Everything one TLS handshake needs, made fresh for each connection attempt.
pub(crate) struct TlsSetup {
    /// The rustls configuration.
    pub client_config: Arc<ClientConfig>,
    /// The name rustls uses for SNI (an IP address means no SNI).
    pub server_name: ServerName<'static>,
    cert_request: Arc<CertRequest>,
}

/// Whether the server asked for a client certificate, and whether one was sent.
#[derive(Debug, Default)]
struct CertRequest {
    requested: AtomicBool,
    sent: AtomicBool,
}

/// Builds the TLS setup for connecting to `host` (the `host` option of this attempt, or
/// the `hostaddr` when no host name was given).
pub(crate) fn prepare(config: &Config, host: &str) -> Result<TlsSetup> {
    let provider = provider();
    let host_given = config
        .hosts
        .iter()
        .any(|h| matches!(h, Host::Tcp(name) if name == host));
    let verifier = server_verifier(config, host, host_given, &provider)?;
    let versions = protocol_versions(config)?;
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| Error::tls(format!("cannot configure TLS: {e}"), "report this as a bug"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let cert_request = Arc::new(CertRequest::default());
    let resolver = ClientCert {
        key: client_certificate(config, &provider)?,
        state: cert_request.clone(),
    };
    let mut tls = builder.with_client_cert_resolver(Arc::new(resolver));
    tls.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    tls.enable_sni = config.ssl_sni;
    Ok(TlsSetup {
        client_config: Arc::new(tls),
        server_name: rustls_server_name(host),
        cert_request,
    })
}

impl TlsSetup {
    /// `sslcertmode=require` after the handshake: the server must have asked for a
    /// client certificate and one must have been sent (libpq checks this when the
    /// server reports success; failing earlier gives the same verdict).
    pub(crate) fn check_client_cert_mode(&self, config: &Config, target: &str) -> Result<()> {
        if config.ssl_cert_mode != SslCertMode::Require {
            return Ok(());
        }
        if !self.cert_request.requested.load(Ordering::SeqCst) {
            return Err(Error::auth(
                format!("{target} did not request an SSL certificate, but sslcertmode=require"),
                "set ssl_ca_file on the server so that it asks for client certificates (and use a hostssl line with clientcert or the cert method), or lower sslcertmode to allow",
            ));
        }
        if !self.cert_request.sent.load(Ordering::SeqCst) {
            return Err(Error::auth(
                format!("{target} asked for a client certificate, but none was sent, and sslcertmode=require"),
                "set sslcert and sslkey (or put them in ~/.postgresql/postgresql.crt and postgresql.key), with a key type the server accepts",
            ));
        }
        Ok(())
    }
}

/// `sslcertmode=require` on a connection without TLS: libpq fails it, since no server
/// can have asked for a certificate.
pub(crate) fn check_client_cert_mode_without_tls(config: &Config, target: &str) -> Result<()> {
    if config.ssl_cert_mode == SslCertMode::Require {
        return Err(Error::auth(
            format!("{target}: the connection does not use TLS, so the server did not request an SSL certificate, but sslcertmode=require"),
            "use sslmode=require (or verify-ca/verify-full) over TCP, or lower sslcertmode to allow",
        ));
    }
    Ok(())
}

/// The rustls protocol versions for `ssl_min_protocol_version` and
/// `ssl_max_protocol_version`.
fn protocol_versions(config: &Config) -> Result<Vec<&'static SupportedProtocolVersion>> {
    config.validate_tls_versions()?;
    let min = config.ssl_min_protocol_version;
    let max = config
        .ssl_max_protocol_version
        .unwrap_or(SslProtocolVersion::Tls1_3);
    let mut versions = Vec::new();
    if min <= SslProtocolVersion::Tls1_3 && SslProtocolVersion::Tls1_3 <= max {
        versions.push(&rustls::version::TLS13);
    }
    if min <= SslProtocolVersion::Tls1_2 && SslProtocolVersion::Tls1_2 <= max {
        versions.push(&rustls::version::TLS12);
    }
    Ok(versions)
}

/// The server name given to rustls. It only decides SNI here (the verifier checks the
/// host itself): as in libpq, an IP address (as `inet_aton` or `inet_pton` reads it) is
/// never sent; a host that is not a valid DNS name is not sent either.
pub(crate) fn rustls_server_name(host: &str) -> ServerName<'static> {
    if let Some(v4) = hostname::inet_aton(host) {
        return ServerName::IpAddress(IpAddr::V4(Ipv4Addr::from(v4)).into());
    }
    if let Ok(v6) = host.parse::<Ipv6Addr>() {
        return ServerName::IpAddress(IpAddr::V6(v6).into());
    }
    match DnsName::try_from(host.to_string()) {
        Ok(name) => ServerName::DnsName(name),
        Err(_) => {
            tracing::debug!("host {host:?} is not a valid DNS name; no TLS SNI is sent");
            ServerName::IpAddress(IpAddr::V4(Ipv4Addr::UNSPECIFIED).into())
        }
    }
}

fn server_verifier(
    config: &Config,
    host: &str,
    host_given: bool,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ServerCertVerifier>> {
    let root_path = match &config.ssl_root_cert {
        Some(path) => Some(path.clone()),
        None => home_file("root.crt").filter(|p| p.exists()),
    };
    let mode = crate::config::ssl_mode_name(config.ssl_mode);
    let Some(root_path) = root_path else {
        return match config.ssl_mode {
            SslMode::VerifyCa | SslMode::VerifyFull => Err(Error::config(
                format!("sslmode={mode} needs a root certificate, but sslrootcert is not set and ~/.postgresql/root.crt does not exist"),
                "set sslrootcert=/path/to/ca.crt (or PGSSLROOTCERT) to the CA that signed the server's certificate, or use sslmode=require to skip verification",
            )),
            SslMode::Disable => Err(Error::usage(
                "TLS configuration requested with sslmode=disable",
                "report this as a bug",
            )),
            SslMode::Allow | SslMode::Prefer | SslMode::Require => {
                Ok(Arc::new(AcceptAnyCertificate {
                    provider: provider.clone(),
                }))
            }
        };
    };
    if config.ssl_mode == SslMode::Disable {
        return Err(Error::usage(
            "TLS configuration requested with sslmode=disable",
            "report this as a bug",
        ));
    }
    let roots = load_roots(&root_path, mode)?;
    let crls = load_crls(config)?;
    let mut builder =
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots.store), provider.clone());
    let parsed_crls = match crls {
        Some((ders, parsed)) => {
            builder = builder.with_crls(ders).enforce_revocation_expiration();
            Some(parsed)
        }
        None => None,
    };
    let webpki = builder.build().map_err(|e| {
        Error::tls(
            format!(
                "cannot use the root certificates in {} or the CRLs (sslcrl, sslcrldir): {e}",
                root_path.display()
            ),
            "check that sslrootcert holds CA certificates and sslcrl/sslcrldir hold PEM CRLs",
        )
    })?;
    let host = (config.ssl_mode == SslMode::VerifyFull).then(|| {
        if host_given {
            host.to_string()
        } else {
            String::new()
        }
    });
    Ok(Arc::new(LibpqVerifier {
        webpki,
        anchors: roots.anchors,
        crls: parsed_crls,
        host,
        provider: provider.clone(),
    }))
}

fn load_certs(path: &Path, option: &str) -> Result<Vec<CertificateDer<'static>>> {
    let iter = CertificateDer::pem_file_iter(path).map_err(|e| {
        Error::config(
            format!("cannot read {option} file {}: {e}", path.display()),
            format!("check that {option} names a readable PEM file"),
        )
    })?;
    let certs: Vec<_> = iter.collect::<std::result::Result<_, _>>().map_err(|e| {
        Error::config(
            format!("cannot parse {option} file {}: {e}", path.display()),
            "the file must contain PEM certificates",
        )
    })?;
    if certs.is_empty() {
        return Err(Error::config(
            format!("{option} file {} holds no certificate", path.display()),
            "the file must contain at least one PEM certificate (-----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(certs)
}

/// The trusted certificates, for WebPKI and for the OpenSSL rules.
struct Roots {
    store: RootCertStore,
    anchors: Vec<x509::Cert>,
}

fn load_roots(path: &Path, mode: &str) -> Result<Roots> {
    let mut store = RootCertStore::empty();
    let mut anchors = Vec::new();
    if path.as_os_str() == "system" {
        // libpq 16+: trust the operating system's CA store.
        let found = rustls_native_certs::load_native_certs();
        anchors.extend(found.certs.iter().filter_map(|c| x509::Cert::parse(c).ok()));
        let (added, _ignored) = store.add_parsable_certificates(found.certs);
        if added == 0 {
            let errors: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
            return Err(Error::config(
                format!("sslrootcert=system, but no trusted CA certificate could be loaded from the system store ({})", errors.join("; ")),
                "install the ca-certificates package, or give sslrootcert the path of a PEM file",
            ));
        }
        return Ok(Roots { store, anchors });
    }
    if !path.exists() {
        return Err(Error::config(
            format!(
                "root certificate file \"{}\" does not exist (sslrootcert, with sslmode={mode})",
                path.display()
            ),
            "give sslrootcert the PEM file of the CA that signed the server's certificate (or the server's self-signed certificate itself), or unset sslrootcert and use sslmode=require to skip verification",
        ));
    }
    for cert in load_certs(path, "sslrootcert")? {
        match x509::Cert::parse(&cert) {
            Ok(parsed) => anchors.push(parsed),
            Err(e) => tracing::debug!("a certificate in {} {e}", path.display()),
        }
        store.add(cert).map_err(|e| {
            Error::config(
                format!("invalid root certificate in {}: {e}", path.display()),
                "check the sslrootcert file",
            )
        })?;
    }
    Ok(Roots { store, anchors })
}

/// The CRLs to check against, when revocation checking is on: `sslcrl` and
/// `sslcrldir`, else `~/.postgresql/root.crl` if it exists.
#[allow(clippy::type_complexity)]
fn load_crls(
    config: &Config,
) -> Result<Option<(Vec<CertificateRevocationListDer<'static>>, Vec<x509::Crl>)>> {
    let mut files: Vec<(PathBuf, &str)> = Vec::new();
    if let Some(file) = &config.ssl_crl {
        files.push((file.clone(), "sslcrl"));
    }
    if let Some(dir) = &config.ssl_crl_dir {
        let entries = std::fs::read_dir(dir).map_err(|e| {
            Error::config(
                format!("cannot read the CRL directory {} (sslcrldir): {e}", dir.display()),
                "give sslcrldir a readable directory of CRLs named by issuer hash (openssl rehash <dir>)",
            )
        })?;
        let mut names: Vec<PathBuf> = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| {
                Error::config(
                    format!(
                        "cannot read the CRL directory {} (sslcrldir): {e}",
                        dir.display()
                    ),
                    "check the directory's permissions",
                )
            })?;
            if is_hashed_crl_name(&entry.file_name().to_string_lossy()) {
                names.push(entry.path());
            }
        }
        names.sort();
        files.extend(names.into_iter().map(|p| (p, "sslcrldir")));
        if config.ssl_crl.is_none() && files.is_empty() {
            tracing::debug!(
                "sslcrldir {} holds no <hash>.r<n> file: every verified chain will lack a CRL",
                dir.display()
            );
        }
    }
    if config.ssl_crl.is_none() && config.ssl_crl_dir.is_none() {
        match home_file("root.crl").filter(|p| p.exists()) {
            Some(file) => files.push((file, "the default CRL file ~/.postgresql/root.crl")),
            None => return Ok(None),
        }
    }
    let mut ders = Vec::new();
    let mut parsed = Vec::new();
    for (path, option) in files {
        let bytes = std::fs::read(&path).map_err(|e| {
            Error::config(
                format!(
                    "cannot read the CRL file {} ({option}): {e}",
                    path.display()
                ),
                format!(
                    "check that {option} names a readable PEM file of certificate revocation lists"
                ),
            )
        })?;
        let found: Vec<CertificateRevocationListDer<'static>> =
            CertificateRevocationListDer::pem_slice_iter(&bytes)
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| {
                    Error::config(
                        format!(
                            "cannot parse the CRL file {} ({option}): {e}",
                            path.display()
                        ),
                        "the file must contain PEM CRLs (-----BEGIN X509 CRL-----)",
                    )
                })?;
        if found.is_empty() {
            return Err(Error::config(
                format!("the CRL file {} ({option}) holds no CRL", path.display()),
                "the file must contain PEM CRLs (-----BEGIN X509 CRL-----), as openssl ca -gencrl writes them",
            ));
        }
        for der in found {
            let crl = x509::Crl::parse(&der).map_err(|e| {
                Error::config(
                    format!("a CRL in {} ({option}) {e}", path.display()),
                    "the file must contain valid X.509 CRLs",
                )
            })?;
            parsed.push(crl);
            ders.push(der);
        }
    }
    Ok(Some((ders, parsed)))
}

/// OpenSSL's hashed-directory CRL names: eight hex digits, `.r`, a number.
fn is_hashed_crl_name(name: &str) -> bool {
    let Some((hash, suffix)) = name.split_once(".r") else {
        return false;
    };
    hash.len() == 8
        && hash
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        && !suffix.is_empty()
        && suffix.bytes().all(|b| b.is_ascii_digit())
}

/// The client certificate and key, unless `sslcertmode=disable` or none is configured.
fn client_certificate(
    config: &Config,
    provider: &CryptoProvider,
) -> Result<Option<Arc<CertifiedKey>>> {
    if config.ssl_cert_mode == SslCertMode::Disable {
        return Ok(None);
    }
    let cert_path = config
        .ssl_cert
        .clone()
        .or_else(|| home_file("postgresql.crt").filter(|p| p.exists()));
    let Some(cert_path) = cert_path else {
        return Ok(None);
    };
    let key_path = config
        .ssl_key
        .clone()
        .or_else(|| home_file("postgresql.key"))
        .ok_or_else(|| {
            Error::config(
                "sslcert is set but sslkey is not",
                "set sslkey to the client certificate's private key",
            )
        })?;
    let chain = load_certs(&cert_path, "sslcert")?;
    let key = key::load(&key_path, config.ssl_password.as_deref())?;
    let certified = CertifiedKey::from_der(chain, key, provider).map_err(|e| {
        Error::tls(
            format!(
                "the client certificate {} does not match its key {}, or the key cannot be used: {e}",
                cert_path.display(),
                key_path.display()
            ),
            "check that sslcert and sslkey belong together",
        )
    })?;
    Ok(Some(Arc::new(certified)))
}

/// Sends the client certificate when the server asks, and records that it asked.
#[derive(Debug)]
struct ClientCert {
    key: Option<Arc<CertifiedKey>>,
    state: Arc<CertRequest>,
}

impl ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.state.requested.store(true, Ordering::SeqCst);
        let key = self.key.as_ref()?;
        key.key.choose_scheme(sigschemes)?;
        self.state.sent.store(true, Ordering::SeqCst);
        Some(key.clone())
    }

    fn has_certs(&self) -> bool {
        self.key.is_some()
    }
}

/// Why a certificate was refused, in a sentence.
#[derive(Debug)]
struct Refusal(String);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refusal {}

fn refuse(message: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refusal(
        message,
    )))))
}

/// The webpki error inside a rustls certificate error, when there is one.
fn webpki_error(error: &rustls::Error) -> Option<&webpki::Error> {
    match error {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
            other.0.downcast_ref::<webpki::Error>()
        }
        _ => None,
    }
}

/// Checks a handshake signature with the server certificate's key. Certificates WebPKI
/// cannot parse (X.509 v1) are handled through their public key alone.
fn handshake_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
    algorithms: &WebPkiSupportedAlgorithms,
    tls13: bool,
) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
    if webpki::EndEntityCert::try_from(cert).is_ok() {
        return if tls13 {
            verify_tls13_signature(message, cert, dss, algorithms)
        } else {
            verify_tls12_signature(message, cert, dss, algorithms)
        };
    }
    let parsed =
        x509::Cert::parse(cert).map_err(|e| refuse(format!("the server certificate {e}")))?;
    let spki = SubjectPublicKeyInfoDer::from(parsed.spki_der.as_slice());
    if tls13 {
        return verify_tls13_signature_with_raw_key(message, &spki, dss, algorithms);
    }
    let candidates = algorithms
        .mapping
        .iter()
        .find(|(scheme, _)| *scheme == dss.scheme)
        .map(|(_, algs)| *algs)
        .ok_or(PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme)?;
    let key = webpki::RawPublicKeyEntity::try_from(&spki).map_err(|e| {
        refuse(format!(
            "the server certificate's public key is unusable: {e}"
        ))
    })?;
    for alg in candidates {
        if key.verify_signature(*alg, message, dss.signature()).is_ok() {
            return Ok(HandshakeSignatureValid::assertion());
        }
    }
    Err(rustls::Error::InvalidCertificate(
        CertificateError::BadSignature,
    ))
}

/// No root certificate (`require`, `prefer`, `allow`): accept the chain, verify the
/// handshake signatures.
#[derive(Debug)]
struct AcceptAnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        handshake_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
            false,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        handshake_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
            true,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A root certificate is configured: WebPKI, then OpenSSL's rules, then (verify-full)
/// libpq's host-name check. See the module documentation.
#[derive(Debug)]
struct LibpqVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    anchors: Vec<x509::Cert>,
    crls: Option<Vec<x509::Crl>>,
    /// `Some(host)` for verify-full; an empty host means only `hostaddr` was given.
    host: Option<String>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for LibpqVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let first = self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        let mode = match first {
            // WebPKI checks the name after the whole chain: a name error means the chain
            // passed. Names are checked with libpq's rules below.
            Ok(_)
            | Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => chain::Mode::AfterWebPki,
            Err(error) => match webpki_error(&error) {
                Some(webpki::Error::CaUsedAsEndEntity | webpki::Error::UnsupportedCertVersion) => {
                    chain::Mode::Fallback
                }
                _ => return Err(error),
            },
        };
        let leaf = x509::Cert::parse(end_entity)
            .map_err(|e| refuse(format!("the server certificate {e}")))?;
        let peer: Vec<x509::Cert> = intermediates
            .iter()
            .filter_map(|der| x509::Cert::parse(der).ok())
            .collect();
        let policy = chain::Policy {
            anchors: &self.anchors,
            crls: self.crls.as_deref(),
            algorithms: &self.provider.signature_verification_algorithms,
            now: now.as_secs(),
            mode,
        };
        chain::verify(&leaf, &peer, &policy).map_err(refuse)?;
        if let Some(host) = &self.host {
            hostname::check(&leaf, host).map_err(refuse)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        handshake_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
            false,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        handshake_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
            true,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The error for a failed TLS handshake with `host`: what the verifier or the peer
/// said, and what to do about it. `custom`: the caller supplied the rustls
/// configuration (so its verifier, not sslrootcert, refused a certificate).
///
/// A handshake that broke on the transport (the peer closed or reset the connection,
/// no TLS error) is retryable: a new connection may get through.
pub(crate) fn handshake_error(
    config: &Config,
    host: &str,
    direct: bool,
    custom: bool,
    error: &io::Error,
) -> Error {
    let what = if direct {
        "direct TLS handshake"
    } else {
        "TLS handshake"
    };
    let rustls_error = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let mode = crate::config::ssl_mode_name(config.ssl_mode);
    let certificate_advice = match config.ssl_mode {
        SslMode::VerifyFull => "the server's certificate must chain to a certificate in sslrootcert and name the host given as `host` (in a subjectAltName, or in the CN when the certificate has no subjectAltName of that kind); use that name as host (with hostaddr for the address), or sslmode=verify-ca to skip the name check",
        _ => "the server's certificate must chain to a certificate in sslrootcert (with a root certificate present, sslmode=require, prefer and allow verify the chain as libpq does); fix sslrootcert, or remove it and use sslmode=require to skip verification",
    };
    let certificate_advice = if custom {
        "the certificate verifier of the rustls::ClientConfig given in ConnectOptions::tls_config refused the server's certificate (sslmode, sslrootcert and the other ssl options do not apply to it): fix that configuration's root store or verifier, or the server's certificate"
    } else {
        certificate_advice
    };
    let (detail, advice) = match rustls_error {
        Some(rustls::Error::InvalidCertificate(cert_error)) => {
            (describe_certificate_error(cert_error), certificate_advice.to_string())
        }
        Some(rustls::Error::AlertReceived(AlertDescription::ProtocolVersion))
        | Some(rustls::Error::PeerIncompatible(_)) => (
            format!(
                "{} (this client offers {})",
                rustls_error.map(ToString::to_string).unwrap_or_default(),
                offered_versions(config)
            ),
            "the server and this client share no TLS protocol version: compare ssl_min_protocol_version/ssl_max_protocol_version here with the server's settings of the same names".to_string(),
        ),
        Some(other) => (
            other.to_string(),
            "check the server's ssl settings and its log".to_string(),
        ),
        None => (
            error.to_string(),
            "check the server's ssl settings and its log".to_string(),
        ),
    };
    let mut message = format!("{what} with {host} failed (sslmode={mode}): {detail}");
    if direct {
        message.push_str(" (direct TLS needs PostgreSQL 17 or later; use sslnegotiation=postgres for older servers)");
    }
    let error = Error::tls(message, advice);
    if rustls_error.is_none() {
        // The transport broke mid-handshake: no TLS verdict was reached.
        error.retryable()
    } else {
        error
    }
}

fn offered_versions(config: &Config) -> String {
    let min = config
        .ssl_min_protocol_version
        .max(SslProtocolVersion::Tls1_2);
    let max = config
        .ssl_max_protocol_version
        .unwrap_or(SslProtocolVersion::Tls1_3);
    if min == max {
        format!("{} only", min.name())
    } else {
        format!("{} to {}", min.name(), max.name())
    }
}

fn describe_certificate_error(error: &CertificateError) -> String {
    if let CertificateError::Other(other) = error {
        if let Some(refusal) = other.0.downcast_ref::<Refusal>() {
            return format!("the server's certificate was refused: {refusal}");
        }
        if let Some(webpki) = other.0.downcast_ref::<webpki::Error>() {
            return format!("the server's certificate was refused: {webpki:?}");
        }
    }
    let detail = match error {
        CertificateError::UnknownIssuer => {
            "it is not signed by a certificate in sslrootcert (unknown issuer)".to_string()
        }
        CertificateError::Revoked => {
            "it has been revoked (by a CRL in sslcrl/sslcrldir)".to_string()
        }
        CertificateError::UnknownRevocationStatus => {
            "revocation is checked (sslcrl/sslcrldir), but no CRL covers a certificate of its chain"
                .to_string()
        }
        other => other.to_string(),
    };
    format!("the server's certificate was refused: {detail}")
}

/// The `tls-server-end-point` channel-binding data (RFC 5929) for a server certificate:
/// its DER hashed with the hash of its signature algorithm, SHA-256 for MD5 and SHA-1.
///
/// Returns `None` when no digest can be chosen (Ed25519, RSA-PSS, unknown algorithms),
/// which is also when libpq refuses channel binding.
pub fn tls_server_end_point(certificate_der: &[u8]) -> Option<Vec<u8>> {
    use x509_cert::der::Decode;
    let certificate = x509_cert::Certificate::from_der(certificate_der).ok()?;
    let oid = certificate.signature_algorithm.oid.to_string();
    let hash = match oid.as_str() {
        // md5/sha1/sha256 with RSA, ecdsa-with-SHA1/SHA256, dsa-with-sha1/sha256
        "1.2.840.113549.1.1.4"
        | "1.2.840.113549.1.1.5"
        | "1.2.840.113549.1.1.11"
        | "1.2.840.10045.4.1"
        | "1.2.840.10045.4.3.2"
        | "1.2.840.10040.4.3"
        | "2.16.840.1.101.3.4.3.2" => sha2::Sha256::digest(certificate_der).to_vec(),
        "1.2.840.113549.1.1.14" | "1.2.840.10045.4.3.1" | "2.16.840.1.101.3.4.3.1" => {
            sha2::Sha224::digest(certificate_der).to_vec()
        }
        "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => {
            sha2::Sha384::digest(certificate_der).to_vec()
        }
        "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => {
            sha2::Sha512::digest(certificate_der).to_vec()
        }
        _ => return None,
    };
    Some(hash)
}
