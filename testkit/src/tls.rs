//! Test certificates, generated with rcgen for each cluster.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SignatureAlgorithm,
};

use crate::env::{self, ServerUser};

/// The key type of every generated key (CA, server and client certificates).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KeyAlgorithm {
    /// ECDSA on P-256 with SHA-256 (the default).
    #[default]
    EcdsaP256Sha256,
    /// ECDSA on P-384 with SHA-384.
    EcdsaP384Sha384,
    /// Ed25519.
    Ed25519,
}

impl KeyAlgorithm {
    fn rcgen(self) -> &'static SignatureAlgorithm {
        match self {
            KeyAlgorithm::EcdsaP256Sha256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyAlgorithm::EcdsaP384Sha384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyAlgorithm::Ed25519 => &rcgen::PKCS_ED25519,
        }
    }
}

/// The PEM files of a TLS-enabled cluster.
///
/// The server certificate is valid for `localhost` and `127.0.0.1` and is signed by
/// [`TlsFiles::ca_cert`]; the server also trusts that CA for client certificates
/// (`ssl_ca_file`), so `cert` authentication works with
/// [`TlsFiles::client_cert_for`].
pub struct TlsFiles {
    /// The CA certificate (PEM): use it as `sslrootcert`.
    pub ca_cert: PathBuf,
    /// The server certificate (PEM), signed by the CA.
    pub server_cert: PathBuf,
    /// The server's private key (PKCS#8 PEM, mode 0600, owned by the server's OS user).
    pub server_key: PathBuf,
    /// A certificate of an unrelated CA that signed nothing here: as `sslrootcert` it
    /// makes `verify-ca` / `verify-full` fail.
    pub other_ca_cert: PathBuf,
    /// The key algorithm used for every key.
    pub algorithm: KeyAlgorithm,
    client_dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    counter: AtomicU32,
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsFiles")
            .field("ca_cert", &self.ca_cert)
            .field("server_cert", &self.server_cert)
            .field("server_key", &self.server_key)
            .field("other_ca_cert", &self.other_ca_cert)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

fn tls_panic(what: &str, err: impl std::fmt::Display) -> ! {
    panic!("testkit: could not {what}: {err}")
}

fn ca(alg: KeyAlgorithm, name: &str) -> (String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate_for(alg.rcgen()).unwrap_or_else(|e| tls_panic("generate a key", e));
    let mut params = CertificateParams::new(Vec::<String>::new())
        .unwrap_or_else(|e| tls_panic("make CA parameters", e));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "pgrepl testkit");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params
        .self_signed(&key)
        .unwrap_or_else(|e| tls_panic("self-sign the CA", e));
    (cert.pem(), Issuer::new(params, key))
}

fn leaf(
    alg: KeyAlgorithm,
    issuer: &Issuer<'static, KeyPair>,
    common_name: &str,
    sans: Vec<String>,
    purpose: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let key = KeyPair::generate_for(alg.rcgen()).unwrap_or_else(|e| tls_panic("generate a key", e));
    let mut params = CertificateParams::new(sans)
        .unwrap_or_else(|e| tls_panic("make certificate parameters", e));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![purpose];
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(&key, issuer)
        .unwrap_or_else(|e| tls_panic("sign a certificate", e));
    (cert.pem(), private_key_pem(&key))
}

/// The key as PKCS#8 PEM that OpenSSL (the server, libpq) can read.
///
/// ring makes Ed25519 keys as PKCS#8 v2 (RFC 5958, with the public key attached), which
/// OpenSSL 3.0 rejects ("unsupported"); those are re-encoded as PKCS#8 v1 (RFC 8410).
fn private_key_pem(key: &KeyPair) -> String {
    const V2_PREFIX: [u8; 16] = [
        0x30, 0x51, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    const V1_PREFIX: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    let der = key.serialized_der();
    if der.len() >= 48 && der[..16] == V2_PREFIX {
        let mut v1 = V1_PREFIX.to_vec();
        v1.extend_from_slice(&der[16..48]);
        return pem("PRIVATE KEY", &v1);
    }
    key.serialize_pem()
}

fn pem(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Writes `contents` to a new file with `mode`, then gives it to `owner`.
fn write_file(path: &Path, contents: &str, mode: u32, owner: Option<&ServerUser>) {
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(path)?;
        file.write_all(contents.as_bytes())?;
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        env::give_to(owner, path)
    })();
    if let Err(err) = result {
        tls_panic(&format!("write {}", path.display()), err);
    }
}

impl TlsFiles {
    /// Generates the CA and server files in `server_dir` (owned by the server user) and
    /// prepares `client_dir` for client certificates.
    pub(crate) fn generate(
        alg: KeyAlgorithm,
        server_dir: &Path,
        client_dir: &Path,
        user: Option<&ServerUser>,
    ) -> TlsFiles {
        let (ca_pem, issuer) = ca(alg, "pgrepl testkit CA");
        let (other_ca_pem, _) = ca(alg, "pgrepl testkit unrelated CA");
        let (server_pem, server_key_pem) = leaf(
            alg,
            &issuer,
            "localhost",
            vec!["localhost".to_string(), "127.0.0.1".to_string()],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let files = TlsFiles {
            ca_cert: server_dir.join("ca.crt"),
            server_cert: server_dir.join("server.crt"),
            server_key: server_dir.join("server.key"),
            other_ca_cert: client_dir.join("other-ca.crt"),
            algorithm: alg,
            client_dir: client_dir.to_path_buf(),
            issuer,
            counter: AtomicU32::new(0),
        };
        write_file(&files.ca_cert, &ca_pem, 0o644, user);
        write_file(&files.server_cert, &server_pem, 0o644, user);
        // PostgreSQL refuses a key readable by group or others.
        write_file(&files.server_key, &server_key_pem, 0o600, user);
        write_file(&files.other_ca_cert, &other_ca_pem, 0o644, None);
        files
    }

    /// Overwrites the server certificate and key files (same paths, same owner and
    /// modes).
    pub(crate) fn replace_server_files(
        &self,
        cert_pem: &str,
        key_pem: &str,
        owner: Option<&ServerUser>,
    ) {
        write_file(&self.server_cert, cert_pem, 0o644, owner);
        write_file(&self.server_key, key_pem, 0o600, owner);
    }

    /// Generates a client certificate with `CN=<user>` signed by the cluster's CA, for
    /// `cert` authentication, and returns `(certificate, private key)` PEM paths.
    ///
    /// The files belong to the test process (the key has mode 0600, as libpq demands).
    /// Every call makes a fresh key pair and new files.
    pub fn client_cert_for(&self, user: &str) -> (PathBuf, PathBuf) {
        let (cert_pem, key_pem) = leaf(
            self.algorithm,
            &self.issuer,
            user,
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let safe: String = user
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let cert = self.client_dir.join(format!("{safe}-{n}.crt"));
        let key = self.client_dir.join(format!("{safe}-{n}.key"));
        write_file(&cert, &cert_pem, 0o644, None);
        write_file(&key, &key_pem, 0o600, None);
        (cert, key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_encoding_matches_rcgen() {
        // Non-Ed25519 keys go through rcgen's encoder; compare ours with it.
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        assert_eq!(
            pem("PRIVATE KEY", key.serialized_der()),
            key.serialize_pem()
        );
        for len in 0..5 {
            let der = vec![0xfbu8; len];
            let text = pem("X", &der);
            let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
            assert_eq!(body.len(), len.div_ceil(3) * 4, "{text}");
        }
    }

    #[test]
    fn ed25519_keys_become_pkcs8_v1() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let text = private_key_pem(&key);
        assert!(
            text.starts_with("-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEI"),
            "{text}"
        );
    }
}
