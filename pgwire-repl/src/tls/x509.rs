//! The parts of an X.509 certificate and CRL that OpenSSL's verification looks at, parsed
//! once with `x509-cert`, plus signature checks with the rustls provider's algorithms.
//!
//! Nothing here trusts its input: every accessor works on values that were decoded and
//! checked when the certificate was parsed, and malformed input is an error, never a
//! panic.

use std::fmt;

use rustls::crypto::WebPkiSupportedAlgorithms;
use x509_cert::der::asn1::{Any, BitString, ObjectIdentifier, OctetString};
use x509_cert::der::{Decode, Encode, Tag, Tagged};
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage};
use x509_cert::name::Name;
use x509_cert::spki::AlgorithmIdentifierOwned;
use x509_cert::time::Time;

const OID_BASIC_CONSTRAINTS: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.19");
const OID_KEY_USAGE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.15");
const OID_EXT_KEY_USAGE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.37");
const OID_SUBJECT_ALT_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.17");
const OID_SUBJECT_KEY_ID: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.14");
const OID_AUTHORITY_KEY_ID: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.35");
const OID_NETSCAPE_CERT_TYPE: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("2.16.840.1.113730.1.1");
const OID_CERTIFICATE_POLICIES: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.32");
const OID_CRL_DISTRIBUTION_POINTS: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.31");
const OID_OCSP_NO_CHECK: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.48.1.5");
const OID_NAME_CONSTRAINTS: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.30");
const OID_POLICY_CONSTRAINTS: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.36");
const OID_POLICY_MAPPINGS: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.33");
const OID_INHIBIT_ANY_POLICY: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.54");
const OID_PROXY_CERT_INFO: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.1.14");
const OID_IP_ADDR_BLOCKS: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.1.7");
const OID_AS_IDENTIFIERS: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.1.8");
const OID_COMMON_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");

const OID_CRL_ISSUING_DISTRIBUTION_POINT: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("2.5.29.28");
const OID_CRL_DELTA_INDICATOR: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.27");

/// TLS server authentication, and the two "server gated cryptography" purposes OpenSSL
/// accepts in its place.
pub(crate) const EKU_SERVER_AUTH: [ObjectIdentifier; 3] = [
    ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.1"),
    ObjectIdentifier::new_unwrap("2.16.840.1.113730.4.1"),
    ObjectIdentifier::new_unwrap("1.3.6.1.4.1.311.10.3.3"),
];

/// Netscape certificate type bits (the first octet of the BIT STRING).
pub(crate) const NS_SSL_SERVER: u8 = 0x40;
pub(crate) const NS_SSL_CA: u8 = 0x04;
pub(crate) const NS_ANY_CA: u8 = 0x07;

/// One entry of a subjectAltName extension, as far as host-name checks care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AltName {
    /// dNSName: the raw IA5String bytes.
    Dns(Vec<u8>),
    /// iPAddress: the raw octets (4 or 16 in a well-formed certificate).
    Ip(Vec<u8>),
    /// Any other kind of name.
    Other,
}

/// The authorityKeyIdentifier fields OpenSSL compares with the issuer.
#[derive(Debug, Clone, Default)]
pub(crate) struct AuthorityKeyId {
    key_id: Option<Vec<u8>>,
    issuer: Option<Name>,
    serial: Option<Vec<u8>>,
}

/// The extensions OpenSSL's chain verification reads.
#[derive(Debug, Clone, Default)]
pub(crate) struct Extensions {
    /// basicConstraints: (cA, pathLenConstraint).
    pub basic_constraints: Option<(bool, Option<u8>)>,
    /// keyUsage.
    pub key_usage: Option<KeyUsage>,
    /// extKeyUsage purposes.
    pub ext_key_usage: Option<Vec<ObjectIdentifier>>,
    /// Netscape certificate type, first octet.
    pub ns_cert_type: Option<u8>,
    pub subject_key_id: Option<Vec<u8>>,
    pub authority_key_id: Option<AuthorityKeyId>,
    /// subjectAltName entries, in order.
    pub alt_names: Option<Vec<AltName>>,
    /// The first critical extension OpenSSL does not handle (it refuses such a
    /// certificate).
    pub unhandled_critical: Option<ObjectIdentifier>,
    /// Constraint extensions OpenSSL evaluates and the fallback verifier does not.
    pub unevaluated: Vec<&'static str>,
}

/// A parsed certificate.
#[derive(Clone)]
pub(crate) struct Cert {
    /// The DER bytes as received.
    pub der: Vec<u8>,
    pub subject: Name,
    pub issuer: Name,
    /// The serial number's minimal big-endian bytes.
    pub serial: Vec<u8>,
    /// X.509 version: 1, 2 or 3.
    pub version: u8,
    pub not_before: Time,
    pub not_after: Time,
    /// The signed part, as received.
    tbs: Vec<u8>,
    /// The contents of the signatureAlgorithm AlgorithmIdentifier.
    sig_alg: Vec<u8>,
    sig_alg_oid: ObjectIdentifier,
    signature: Vec<u8>,
    /// The contents of the subjectPublicKeyInfo's AlgorithmIdentifier.
    spki_alg: Vec<u8>,
    spki_alg_oid: ObjectIdentifier,
    /// The subjectPublicKey bits.
    spki_key: Vec<u8>,
    /// The whole SubjectPublicKeyInfo, DER.
    pub spki_der: Vec<u8>,
    pub ext: Extensions,
}

impl fmt::Debug for Cert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cert")
            .field("subject", &self.subject.to_string())
            .field("issuer", &self.issuer.to_string())
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// Splits one DER TLV off the front of `input`: `(whole TLV, contents, rest)`.
/// Only definite lengths (DER) are accepted.
fn split_tlv(input: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let (&_tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, header_len) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let mut len = 0usize;
        for &byte in rest.get(..count)? {
            len = len.checked_mul(256)?.checked_add(usize::from(byte))?;
        }
        (len, 2 + count)
    };
    let end = header_len.checked_add(len)?;
    let whole = input.get(..end)?;
    let contents = input.get(header_len..end)?;
    Some((whole, contents, input.get(end..)?))
}

/// The signed part and the signature parts of a SIGNED{...} structure (a certificate
/// or a CRL): `(tbs TLV, signatureAlgorithm contents)`.
fn split_signed(der: &[u8]) -> Option<(&[u8], &[u8])> {
    let (_, outer, rest) = split_tlv(der)?;
    if !rest.is_empty() {
        return None;
    }
    let (tbs, _, after_tbs) = split_tlv(outer)?;
    let (_, alg, _) = split_tlv(after_tbs)?;
    Some((tbs, alg))
}

/// The DER contents (without the SEQUENCE header) of an AlgorithmIdentifier, the form
/// rustls' `SignatureVerificationAlgorithm` ids are written in.
fn alg_contents(alg: &AlgorithmIdentifierOwned) -> Result<Vec<u8>, String> {
    let der = alg
        .to_der()
        .map_err(|e| format!("cannot encode an algorithm identifier: {e}"))?;
    split_tlv(&der)
        .map(|(_, contents, _)| contents.to_vec())
        .ok_or_else(|| "cannot encode an algorithm identifier".to_string())
}

fn bits(bits: &BitString) -> Result<Vec<u8>, String> {
    if bits.unused_bits() != 0 {
        return Err("a signature or key is not a whole number of bytes".into());
    }
    Ok(bits.raw_bytes().to_vec())
}

fn decode<'a, T: Decode<'a>>(bytes: &'a [u8], what: &str) -> Result<T, String> {
    T::from_der(bytes).map_err(|e| format!("cannot parse its {what} extension: {e}"))
}

impl Extensions {
    fn parse(list: &[x509_cert::ext::Extension]) -> Result<Extensions, String> {
        let mut ext = Extensions::default();
        let mut seen: Vec<&ObjectIdentifier> = Vec::new();
        for e in list {
            if seen.contains(&&e.extn_id) {
                return Err(format!("it has the extension {} twice", e.extn_id));
            }
            seen.push(&e.extn_id);
            let value = e.extn_value.as_bytes();
            let id = e.extn_id;
            if id == OID_BASIC_CONSTRAINTS {
                let bc: BasicConstraints = decode(value, "basicConstraints")?;
                if bc.path_len_constraint.is_some() && !bc.ca {
                    return Err(
                        "its basicConstraints has a path length but is not a CA".to_string()
                    );
                }
                ext.basic_constraints = Some((bc.ca, bc.path_len_constraint));
            } else if id == OID_KEY_USAGE {
                let ku: KeyUsage = decode(value, "keyUsage")?;
                ext.key_usage = Some(ku);
            } else if id == OID_EXT_KEY_USAGE {
                let eku: ExtendedKeyUsage = decode(value, "extendedKeyUsage")?;
                ext.ext_key_usage = Some(eku.0);
            } else if id == OID_SUBJECT_ALT_NAME {
                let names: Vec<GeneralName> = decode(value, "subjectAltName")?;
                ext.alt_names = Some(
                    names
                        .into_iter()
                        .map(|name| match name {
                            GeneralName::DnsName(dns) => AltName::Dns(dns.as_bytes().to_vec()),
                            GeneralName::IpAddress(ip) => AltName::Ip(ip.as_bytes().to_vec()),
                            _ => AltName::Other,
                        })
                        .collect(),
                );
            } else if id == OID_SUBJECT_KEY_ID {
                let skid: OctetString = decode(value, "subjectKeyIdentifier")?;
                ext.subject_key_id = Some(skid.as_bytes().to_vec());
            } else if id == OID_AUTHORITY_KEY_ID {
                let akid: AuthorityKeyIdentifier = decode(value, "authorityKeyIdentifier")?;
                let issuer = akid.authority_cert_issuer.as_ref().and_then(|names| {
                    names.iter().find_map(|name| match name {
                        GeneralName::DirectoryName(dn) => Some(dn.clone()),
                        _ => None,
                    })
                });
                ext.authority_key_id = Some(AuthorityKeyId {
                    key_id: akid.key_identifier.map(|k| k.as_bytes().to_vec()),
                    issuer,
                    serial: akid
                        .authority_cert_serial_number
                        .map(|s| s.as_bytes().to_vec()),
                });
            } else if id == OID_NETSCAPE_CERT_TYPE {
                let bits: BitString = decode(value, "netscape-cert-type")?;
                ext.ns_cert_type = Some(bits.raw_bytes().first().copied().unwrap_or(0));
            } else if id == OID_NAME_CONSTRAINTS {
                ext.unevaluated.push("nameConstraints");
            } else if id == OID_POLICY_CONSTRAINTS {
                ext.unevaluated.push("policyConstraints");
            } else if id == OID_POLICY_MAPPINGS {
                ext.unevaluated.push("policyMappings");
            } else if id == OID_INHIBIT_ANY_POLICY {
                ext.unevaluated.push("inhibitAnyPolicy");
            } else if id == OID_PROXY_CERT_INFO {
                ext.unevaluated.push("proxyCertInfo");
            } else if id == OID_IP_ADDR_BLOCKS || id == OID_AS_IDENTIFIERS {
                ext.unevaluated.push("RFC 3779 resources");
            } else if id == OID_CERTIFICATE_POLICIES
                || id == OID_CRL_DISTRIBUTION_POINTS
                || id == OID_OCSP_NO_CHECK
            {
                // Handled by OpenSSL, and without effect on its default verification.
            } else if e.critical && ext.unhandled_critical.is_none() {
                ext.unhandled_critical = Some(id);
            }
        }
        Ok(ext)
    }
}

/// The key family of a signature algorithm or a public-key algorithm, for OpenSSL's
/// "does the signature algorithm match the issuer's key type" test.
fn key_family(oid: &ObjectIdentifier) -> Option<&'static str> {
    let text = oid.to_string();
    let family = match text.as_str() {
        "1.2.840.113549.1.1.1"
        | "1.2.840.113549.1.1.10"
        | "1.2.840.113549.1.1.2"
        | "1.2.840.113549.1.1.3"
        | "1.2.840.113549.1.1.4"
        | "1.2.840.113549.1.1.5"
        | "1.2.840.113549.1.1.11"
        | "1.2.840.113549.1.1.12"
        | "1.2.840.113549.1.1.13"
        | "1.2.840.113549.1.1.14" => "RSA",
        "1.2.840.10045.2.1"
        | "1.2.840.10045.4.1"
        | "1.2.840.10045.4.3.1"
        | "1.2.840.10045.4.3.2"
        | "1.2.840.10045.4.3.3"
        | "1.2.840.10045.4.3.4" => "EC",
        "1.3.101.112" => "Ed25519",
        "1.3.101.113" => "Ed448",
        "1.2.840.10040.4.1"
        | "1.2.840.10040.4.3"
        | "2.16.840.1.101.3.4.3.1"
        | "2.16.840.1.101.3.4.3.2" => "DSA",
        _ => return None,
    };
    Some(family)
}

impl Cert {
    /// Parses a DER certificate. The error says what is wrong, for a sentence that
    /// starts "the certificate …".
    pub(crate) fn parse(der: &[u8]) -> Result<Cert, String> {
        let cert = x509_cert::Certificate::from_der(der)
            .map_err(|e| format!("cannot be parsed as an X.509 certificate: {e}"))?;
        let (tbs, sig_alg) = split_signed(der)
            .ok_or_else(|| "cannot be split into its signed part and signature".to_string())?;
        let tbs_cert = &cert.tbs_certificate;
        if tbs_cert.signature != cert.signature_algorithm {
            return Err(
                "names a different signature algorithm inside and outside its signed part".into(),
            );
        }
        let ext = match &tbs_cert.extensions {
            Some(list) => Extensions::parse(list)?,
            None => Extensions::default(),
        };
        let spki = &tbs_cert.subject_public_key_info;
        Ok(Cert {
            der: der.to_vec(),
            subject: tbs_cert.subject.clone(),
            issuer: tbs_cert.issuer.clone(),
            serial: tbs_cert.serial_number.as_bytes().to_vec(),
            version: tbs_cert.version as u8 + 1,
            not_before: tbs_cert.validity.not_before,
            not_after: tbs_cert.validity.not_after,
            tbs: tbs.to_vec(),
            sig_alg: sig_alg.to_vec(),
            sig_alg_oid: cert.signature_algorithm.oid,
            signature: bits(&cert.signature)?,
            spki_alg: alg_contents(&spki.algorithm)?,
            spki_alg_oid: spki.algorithm.oid,
            spki_key: bits(&spki.subject_public_key)?,
            spki_der: spki
                .to_der()
                .map_err(|e| format!("has a public key that cannot be encoded: {e}"))?,
            ext,
        })
    }

    /// The subject for messages, e.g. `CN=db.example.com,O=Example`.
    pub(crate) fn describe(&self) -> String {
        let subject = self.subject.to_string();
        if subject.is_empty() {
            "(empty subject)".to_string()
        } else {
            subject
        }
    }

    /// OpenSSL's EXFLAG_SI: the subject and issuer names are equal.
    pub(crate) fn self_issued(&self) -> bool {
        names_equal(&self.subject, &self.issuer)
    }

    /// OpenSSL's EXFLAG_SS ("self-signed", decided without checking the signature):
    /// self-issued, an authorityKeyIdentifier (if any) that names this certificate, and
    /// a signature algorithm of this certificate's own key type.
    pub(crate) fn self_signed(&self) -> bool {
        self.self_issued() && self.likely_issued_by(self)
    }

    /// OpenSSL's `ossl_x509_likely_issued(issuer, self)` without the name test:
    /// the authorityKeyIdentifier matches the issuer and the signature algorithm
    /// matches the issuer's key type.
    fn likely_issued_by(&self, issuer: &Cert) -> bool {
        if let Some(akid) = &self.ext.authority_key_id {
            if let (Some(key_id), Some(skid)) = (&akid.key_id, &issuer.ext.subject_key_id) {
                if key_id != skid {
                    return false;
                }
            }
            if let Some(serial) = &akid.serial {
                if *serial != issuer.serial {
                    return false;
                }
            }
            if let Some(name) = &akid.issuer {
                if !names_equal(name, &issuer.issuer) {
                    return false;
                }
            }
        }
        matches!(
            (key_family(&self.sig_alg_oid), key_family(&issuer.spki_alg_oid)),
            (Some(a), Some(b)) if a == b
        )
    }

    /// Whether `issuer` is a candidate issuer of this certificate (names, key ids and
    /// key type agree; the signature is checked separately).
    pub(crate) fn could_be_issued_by(&self, issuer: &Cert) -> bool {
        names_equal(&self.issuer, &issuer.subject) && self.likely_issued_by(issuer)
    }

    /// Checks this certificate's signature with `issuer`'s public key.
    pub(crate) fn verify_signed_by(
        &self,
        issuer: &Cert,
        algorithms: &WebPkiSupportedAlgorithms,
    ) -> Result<(), String> {
        verify_signature(
            &self.tbs,
            &self.sig_alg,
            &self.signature,
            issuer,
            algorithms,
        )
    }

    /// The raw value bytes of the first commonName attribute of the subject, in DER
    /// order (OpenSSL's `X509_NAME_get_index_by_NID(name, NID_commonName, -1)`).
    pub(crate) fn first_common_name(&self) -> Option<&[u8]> {
        self.subject
            .0
            .iter()
            .flat_map(|rdn| rdn.0.iter())
            .find(|atv| atv.oid == OID_COMMON_NAME)
            .map(|atv| atv.value.value())
    }

    /// Whether `now` (seconds since 1970) lies before notBefore (`Less`), after
    /// notAfter (`Greater`) or within the validity period (`Equal`).
    pub(crate) fn validity_at(&self, now: u64) -> std::cmp::Ordering {
        if now < self.not_before.to_unix_duration().as_secs() {
            std::cmp::Ordering::Less
        } else if now > self.not_after.to_unix_duration().as_secs() {
            std::cmp::Ordering::Greater
        } else {
            std::cmp::Ordering::Equal
        }
    }
}

/// Verifies `signature` over `message` made with `sig_alg` by the key of `signer`,
/// using only the algorithms of the rustls crypto provider.
fn verify_signature(
    message: &[u8],
    sig_alg: &[u8],
    signature: &[u8],
    signer: &Cert,
    algorithms: &WebPkiSupportedAlgorithms,
) -> Result<(), String> {
    let mut supported_signature = false;
    for alg in algorithms.all {
        if alg.signature_alg_id().as_ref() != sig_alg {
            continue;
        }
        supported_signature = true;
        if alg.public_key_alg_id().as_ref() != signer.spki_alg.as_slice() {
            continue;
        }
        return alg
            .verify_signature(&signer.spki_key, message, signature)
            .map_err(|_| {
                format!(
                    "the signature does not verify with the public key of \"{}\"",
                    signer.describe()
                )
            });
    }
    if supported_signature {
        Err(format!(
            "the signature algorithm does not fit the key type (or key size) of \"{}\"",
            signer.describe()
        ))
    } else {
        Err("the signature algorithm is not supported (this client accepts RSA with SHA-256/384/512 and 2048 to 8192 bit keys, RSA-PSS, ECDSA P-256/P-384 and Ed25519)".to_string())
    }
}

/// Compares two names the way OpenSSL's `X509_NAME_cmp` does: RDN by RDN, attribute
/// types exactly, and string values after canonicalisation (converted to UTF-8,
/// leading and trailing white space removed, inner white space runs folded to one
/// space, ASCII letters lower-cased), so that `PrintableString "Example  CA"` equals
/// `UTF8String "example ca"`.
pub(crate) fn names_equal(a: &Name, b: &Name) -> bool {
    if a.0.len() != b.0.len() {
        return false;
    }
    a.0.iter().zip(b.0.iter()).all(|(ra, rb)| {
        let mut xa: Vec<(String, Vec<u8>)> =
            ra.0.iter()
                .map(|atv| (atv.oid.to_string(), canonical_value(&atv.value)))
                .collect();
        let mut xb: Vec<(String, Vec<u8>)> =
            rb.0.iter()
                .map(|atv| (atv.oid.to_string(), canonical_value(&atv.value)))
                .collect();
        xa.sort();
        xb.sort();
        xa == xb
    })
}

fn canonical_value(value: &Any) -> Vec<u8> {
    let raw = value.value();
    let text: Option<String> = match value.tag() {
        Tag::Utf8String | Tag::PrintableString | Tag::Ia5String | Tag::VisibleString => {
            Some(String::from_utf8_lossy(raw).into_owned())
        }
        // T61String: OpenSSL converts it as Latin-1.
        Tag::TeletexString => Some(raw.iter().map(|&b| char::from(b)).collect()),
        Tag::BmpString => {
            let units: Vec<u16> = raw
                .chunks(2)
                .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))
                .collect();
            Some(String::from_utf16_lossy(&units))
        }
        _ if value.tag().number().value() == 28 && !value.tag().is_constructed() => {
            // UniversalString (UTF-32BE).
            Some(
                raw.chunks(4)
                    .map(|c| {
                        let mut word = [0u8; 4];
                        for (slot, byte) in word.iter_mut().zip(c) {
                            *slot = *byte;
                        }
                        char::from_u32(u32::from_be_bytes(word)).unwrap_or('\u{fffd}')
                    })
                    .collect(),
            )
        }
        _ => None,
    };
    match text {
        Some(text) => {
            let mut out = String::with_capacity(text.len());
            for word in text.split(|c: char| c.is_ascii_whitespace() || c == '\u{0b}') {
                if word.is_empty() {
                    continue;
                }
                if !out.is_empty() {
                    out.push(' ');
                }
                out.push_str(&word.to_ascii_lowercase());
            }
            let mut bytes = vec![0x0c];
            bytes.extend_from_slice(out.as_bytes());
            bytes
        }
        None => {
            let mut bytes = vec![0xff];
            bytes.extend_from_slice(&value.to_der().unwrap_or_default());
            bytes
        }
    }
}

/// A parsed certificate revocation list.
#[derive(Clone)]
pub(crate) struct Crl {
    pub issuer: Name,
    pub this_update: Time,
    pub next_update: Option<Time>,
    /// Serial numbers (minimal big-endian bytes) of the revoked certificates.
    pub revoked: Vec<Vec<u8>>,
    /// Why this CRL cannot be used by the fallback verifier, if it cannot.
    pub unsupported: Option<String>,
    tbs: Vec<u8>,
    sig_alg: Vec<u8>,
    signature: Vec<u8>,
}

impl fmt::Debug for Crl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Crl")
            .field("issuer", &self.issuer.to_string())
            .field("revoked", &self.revoked.len())
            .finish_non_exhaustive()
    }
}

impl Crl {
    /// Parses a DER CRL.
    pub(crate) fn parse(der: &[u8]) -> Result<Crl, String> {
        let crl = x509_cert::crl::CertificateList::from_der(der)
            .map_err(|e| format!("cannot be parsed as an X.509 CRL: {e}"))?;
        let (tbs, sig_alg) = split_signed(der)
            .ok_or_else(|| "cannot be split into its signed part and signature".to_string())?;
        let list = &crl.tbs_cert_list;
        let mut unsupported = None;
        for ext in list.crl_extensions.iter().flatten() {
            if ext.extn_id == OID_CRL_ISSUING_DISTRIBUTION_POINT {
                unsupported = Some("it has an issuingDistributionPoint (a partitioned CRL)");
            } else if ext.extn_id == OID_CRL_DELTA_INDICATOR {
                unsupported = Some("it is a delta CRL");
            } else if ext.critical && ext.extn_id != OID_AUTHORITY_KEY_ID {
                unsupported = Some("it has a critical extension this client does not know");
            }
        }
        let mut revoked = Vec::new();
        for entry in list.revoked_certificates.iter().flatten() {
            if entry
                .crl_entry_extensions
                .iter()
                .flatten()
                .any(|ext| ext.critical)
            {
                unsupported = Some("an entry has a critical extension (an indirect CRL)");
            }
            revoked.push(entry.serial_number.as_bytes().to_vec());
        }
        Ok(Crl {
            issuer: list.issuer.clone(),
            this_update: list.this_update,
            next_update: list.next_update,
            revoked,
            unsupported: unsupported.map(str::to_string),
            tbs: tbs.to_vec(),
            sig_alg: sig_alg.to_vec(),
            signature: bits(&crl.signature)?,
        })
    }

    /// Checks the CRL's signature with `issuer`'s key.
    pub(crate) fn verify_signed_by(
        &self,
        issuer: &Cert,
        algorithms: &WebPkiSupportedAlgorithms,
    ) -> Result<(), String> {
        verify_signature(
            &self.tbs,
            &self.sig_alg,
            &self.signature,
            issuer,
            algorithms,
        )
    }
}

/// A time for messages, e.g. `2025-01-31 12:00:00 UTC`.
pub(crate) fn show_time(time: &Time) -> String {
    let t = time.to_date_time();
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
        t.year(),
        t.month(),
        t.day(),
        t.hour(),
        t.minutes(),
        t.seconds()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_tlv_handles_short_long_and_truncated_lengths() {
        assert_eq!(
            split_tlv(&[0x30, 0x01, 0xaa, 0xbb]),
            Some((&[0x30, 0x01, 0xaa][..], &[0xaa][..], &[0xbb][..]))
        );
        let mut long = vec![0x04, 0x81, 0x80];
        long.extend(std::iter::repeat_n(7u8, 0x80));
        let (whole, contents, rest) = split_tlv(&long).unwrap();
        assert_eq!((whole.len(), contents.len(), rest.len()), (0x83, 0x80, 0));
        assert_eq!(split_tlv(&[0x30, 0x05, 0x00]), None);
        assert_eq!(split_tlv(&[0x30, 0x80, 0x00, 0x00]), None);
        assert_eq!(split_tlv(&[0x30, 0x85, 1, 1, 1, 1, 1]), None);
        assert_eq!(split_tlv(&[]), None);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for len in 0..64 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 % 251) as u8).collect();
            assert!(Cert::parse(&bytes).is_err());
            assert!(Crl::parse(&bytes).is_err());
        }
    }

    #[test]
    fn names_compare_like_openssl() {
        let a: Name = "CN=Example  CA,O=Acme".parse().unwrap();
        let b: Name = "CN=example ca,O=ACME".parse().unwrap();
        let c: Name = "CN=example cb,O=ACME".parse().unwrap();
        let d: Name = "CN=example ca".parse().unwrap();
        assert!(names_equal(&a, &b));
        assert!(!names_equal(&a, &c));
        assert!(!names_equal(&a, &d));
    }
}
