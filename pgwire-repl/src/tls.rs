//! TLS with libpq's `sslmode` semantics, on rustls (ring provider).
//!
//! * `require` without a root certificate accepts any server certificate (but still checks
//!   the handshake signatures); with one, it verifies the chain like `verify-ca`, as libpq does.
//! * `verify-ca` verifies the chain but not the host name.
//! * `verify-full` verifies the chain and the host name.
//!
//! ALPN `postgresql` is always offered: PostgreSQL 17+ requires it for direct TLS and
//! older servers ignore it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use sha2::Digest;

use crate::config::{Config, SslMode};
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

/// Builds the rustls client configuration for `config`.
pub(crate) fn client_config(config: &Config) -> Result<Arc<ClientConfig>> {
    let provider = provider();
    let root_path = match &config.ssl_root_cert {
        Some(path) => Some(path.clone()),
        None => home_file("root.crt").filter(|p| p.exists()),
    };
    let verifier: Arc<dyn ServerCertVerifier> = match (config.ssl_mode, &root_path) {
        (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
            return Err(Error::config(
                format!(
                    "sslmode={} needs a root certificate, but sslrootcert is not set and ~/.postgresql/root.crt does not exist",
                    crate::config::ssl_mode_name(config.ssl_mode)
                ),
                "set sslrootcert=/path/to/ca.crt (or PGSSLROOTCERT) to the CA that signed the server's certificate, or use sslmode=require to skip verification",
            ));
        }
        (SslMode::Allow | SslMode::Prefer, None) | (SslMode::Require, None) => {
            Arc::new(AcceptAnyCertificate {
                provider: provider.clone(),
            })
        }
        // libpq treats allow/prefer as "no verification" even when a root file exists.
        (SslMode::Allow | SslMode::Prefer, Some(_)) => Arc::new(AcceptAnyCertificate {
            provider: provider.clone(),
        }),
        (SslMode::Disable, _) => {
            return Err(Error::usage(
                "TLS configuration requested with sslmode=disable",
                "report this as a bug",
            ))
        }
        (mode, Some(path)) => {
            let roots = load_roots(path)?;
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| {
                        Error::tls(
                            format!(
                                "cannot use the root certificates in {}: {e}",
                                path.display()
                            ),
                            "check that sslrootcert holds valid CA certificates",
                        )
                    })?;
            if mode == SslMode::VerifyFull {
                webpki
            } else {
                Arc::new(IgnoreHostName { inner: webpki })
            }
        }
    };

    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::tls(format!("cannot configure TLS: {e}"), "report this as a bug"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);

    let cert_path = config
        .ssl_cert
        .clone()
        .or_else(|| home_file("postgresql.crt").filter(|p| p.exists()));
    let mut tls =
        match cert_path {
            Some(cert_path) => {
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
                let key =
                    PrivateKeyDer::from_pem_file(&key_path).map_err(|e| {
                        Error::config(
                    format!("cannot read the private key {} (sslkey): {e}", key_path.display()),
                    "sslkey must be an unencrypted PEM private key (PKCS#8, PKCS#1 or SEC1)",
                )
                    })?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    Error::tls(
                        format!(
                            "the client certificate {} does not match its key {}: {e}",
                            cert_path.display(),
                            key_path.display()
                        ),
                        "check that sslcert and sslkey belong together",
                    )
                })?
            }
            None => builder.with_no_client_auth(),
        };
    tls.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(Arc::new(tls))
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

fn load_roots(path: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    if path.as_os_str() == "system" {
        // libpq 16+: trust the operating system's CA store.
        let found = rustls_native_certs::load_native_certs();
        let (added, _ignored) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            let errors: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
            return Err(Error::config(
                format!("sslrootcert=system, but no trusted CA certificate could be loaded from the system store ({})", errors.join("; ")),
                "install the ca-certificates package, or give sslrootcert the path of a PEM file",
            ));
        }
        return Ok(roots);
    }
    for cert in load_certs(path, "sslrootcert")? {
        roots.add(cert).map_err(|e| {
            Error::config(
                format!("invalid root certificate in {}: {e}", path.display()),
                "check the sslrootcert file",
            )
        })?;
    }
    Ok(roots)
}

/// The TLS server name to check the certificate against.
pub(crate) fn server_name(host: &str) -> Result<ServerName<'static>> {
    ServerName::try_from(host.to_string()).map_err(|e| {
        Error::config(
            format!("{host:?} is not a valid TLS server name: {e}"),
            "use a DNS name or an IP address as host",
        )
    })
}

/// `sslmode=require` without a root certificate: accept the chain, verify signatures.
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
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `sslmode=verify-ca`: full chain verification, but a host-name mismatch is accepted.
#[derive(Debug)]
struct IgnoreHostName {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for IgnoreHostName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
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
