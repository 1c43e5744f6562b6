//! The client certificate's private key (`sslkey`, `sslpassword`), read as libpq reads
//! it: a PEM file that is a regular file not readable by group or others, optionally
//! encrypted.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use pkcs8::der::Document;
use pkcs8::EncryptedPrivateKeyInfo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::error::{Error, Result};

const ENCRYPTED_BEGIN: &str = "-----BEGIN ENCRYPTED PRIVATE KEY-----";
const ENCRYPTED_END: &str = "-----END ENCRYPTED PRIVATE KEY-----";

/// libpq's permission rule for the key file (`fe-secure-openssl.c`): owned by root, at
/// most group read (0640 or less); owned by anyone else, no access for group or others
/// (0600 or less).
fn check_permissions(path: &Path, metadata: &std::fs::Metadata) -> Result<()> {
    let mode = metadata.mode();
    let forbidden = if metadata.uid() == 0 { 0o037 } else { 0o077 };
    if mode & forbidden != 0 {
        return Err(Error::config(
            format!(
                "private key file \"{}\" (sslkey) has group or world access (mode {:04o})",
                path.display(),
                mode & 0o7777
            ),
            "as libpq demands, give it permissions u=rw (0600) or less if owned by the current user, or u=rw,g=r (0640) or less if owned by root: chmod 0600 <file>",
        ));
    }
    Ok(())
}

/// Reads the private key at `path`, decrypting it with `password` when it is an
/// encrypted PKCS#8 key.
pub(crate) fn load(path: &Path, password: Option<&str>) -> Result<PrivateKeyDer<'static>> {
    let metadata = std::fs::metadata(path).map_err(|e| {
        Error::config(
            format!(
                "certificate present, but not private key file \"{}\" (sslkey): {e}",
                path.display()
            ),
            "set sslkey to the client certificate's private key, or put it in ~/.postgresql/postgresql.key",
        )
    })?;
    if !metadata.is_file() {
        return Err(Error::config(
            format!(
                "private key file \"{}\" (sslkey) is not a regular file",
                path.display()
            ),
            "point sslkey at the PEM file holding the client certificate's private key",
        ));
    }
    check_permissions(path, &metadata)?;
    let bytes = std::fs::read(path).map_err(|e| {
        Error::config(
            format!(
                "cannot read the private key {} (sslkey): {e}",
                path.display()
            ),
            "check that the file is readable by this user",
        )
    })?;
    let text = String::from_utf8_lossy(&bytes);
    if let Some(block) = encrypted_block(&text) {
        return decrypt(path, block, password);
    }
    if text.contains("Proc-Type: 4,ENCRYPTED") {
        return Err(Error::config(
            format!(
                "the private key {} (sslkey) uses OpenSSL's legacy PEM encryption (Proc-Type: 4,ENCRYPTED), which this client cannot decrypt",
                path.display()
            ),
            "convert it to an encrypted PKCS#8 key, which works with sslpassword here and in libpq: openssl pkcs8 -topk8 -v2 aes-256-cbc -in client.key -out client-pkcs8.key",
        ));
    }
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
        Error::config(
            format!(
                "cannot read the private key {} (sslkey): {e}",
                path.display()
            ),
            "sslkey must be a PEM private key (PKCS#8, encrypted PKCS#8 with sslpassword, PKCS#1 or SEC1)",
        )
    })
}

fn encrypted_block(text: &str) -> Option<&str> {
    let start = text.find(ENCRYPTED_BEGIN)?;
    let end = text[start..].find(ENCRYPTED_END)? + start + ENCRYPTED_END.len();
    Some(&text[start..end])
}

fn decrypt(path: &Path, block: &str, password: Option<&str>) -> Result<PrivateKeyDer<'static>> {
    let Some(password) = password.filter(|p| !p.is_empty()) else {
        return Err(Error::config(
            format!(
                "the private key {} (sslkey) is encrypted, but sslpassword is not set",
                path.display()
            ),
            "give the key's pass phrase as sslpassword=... in the connection string (this client never prompts for it)",
        ));
    };
    let bad = |e: &dyn std::fmt::Display| {
        Error::config(
            format!(
                "cannot parse the encrypted private key {} (sslkey): {e}",
                path.display()
            ),
            "sslkey must be a PEM \"ENCRYPTED PRIVATE KEY\" (PKCS#8, as written by openssl pkcs8 -topk8)",
        )
    };
    let (_label, document) = Document::from_pem(block).map_err(|e| bad(&e))?;
    let info = EncryptedPrivateKeyInfo::try_from(document.as_bytes()).map_err(|e| bad(&e))?;
    let plain = info.decrypt(password.as_bytes()).map_err(|e| {
        Error::config(
            format!(
                "cannot decrypt the private key {} (sslkey) with sslpassword: {e}",
                path.display()
            ),
            "check sslpassword; this client decrypts PKCS#8 keys protected with PBES2 (PBKDF2 or scrypt, with AES-CBC or 3DES-CBC)",
        )
    })?;
    Ok(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        plain.as_bytes().to_vec(),
    )))
}
