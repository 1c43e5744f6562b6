//! Certificate chain verification with the rules OpenSSL applies for libpq
//! (`X509_verify_cert` with the `ssl_server` purpose, no partial chains, and
//! `X509_V_FLAG_CRL_CHECK | X509_V_FLAG_CRL_CHECK_ALL` when CRLs are configured).
//!
//! See the module documentation of [`crate::tls`] for where this is used and why.

use std::cmp::Ordering;

use rustls::crypto::WebPkiSupportedAlgorithms;

use super::x509::{show_time, Cert, Crl, EKU_SERVER_AUTH, NS_ANY_CA, NS_SSL_CA, NS_SSL_SERVER};

/// The longest chain considered (leaf and anchor included). OpenSSL's default limit is
/// 100; real PostgreSQL chains have two to four certificates.
const MAX_CHAIN_LEN: usize = 10;
/// At most this many signatures are checked while looking for a chain, so that a peer
/// sending many look-alike certificates cannot make the search expensive.
const SIGNATURE_BUDGET: usize = 64;

/// Why the chain is being checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// WebPKI refused the certificate for a reason OpenSSL does not share; this check
    /// alone decides. Constraint extensions it does not evaluate (name constraints,
    /// policy constraints, …) make it refuse.
    Fallback,
    /// WebPKI accepted the chain; this check adds OpenSSL's rules that WebPKI does not
    /// have (trust anchors must be self-signed CAs within their validity period, the
    /// purpose and key-usage tests, and revocation of the whole chain). Name
    /// constraints were enforced by WebPKI.
    AfterWebPki,
}

/// What to verify against.
pub(crate) struct Policy<'a> {
    /// The certificates of `sslrootcert`.
    pub anchors: &'a [Cert],
    /// The CRLs of `sslcrl` / `sslcrldir`, when revocation checking is on.
    pub crls: Option<&'a [Crl]>,
    /// The signature algorithms of the rustls crypto provider.
    pub algorithms: &'a WebPkiSupportedAlgorithms,
    /// Seconds since 1970.
    pub now: u64,
    pub mode: Mode,
}

#[derive(Clone, Copy)]
struct Link<'a> {
    cert: &'a Cert,
    trusted: bool,
}

struct Search<'a> {
    policy: &'a Policy<'a>,
    peer: &'a [Cert],
    budget: usize,
}

/// Verifies that `leaf` chains, possibly through `intermediates` (as sent by the
/// server), to a certificate of `policy.anchors`, as OpenSSL would for libpq.
///
/// The error is a sentence saying what is wrong with which certificate.
pub(crate) fn verify(
    leaf: &Cert,
    intermediates: &[Cert],
    policy: &Policy<'_>,
) -> Result<(), String> {
    let mut search = Search {
        policy,
        peer: intermediates,
        budget: SIGNATURE_BUDGET,
    };
    let mut chain = vec![Link {
        cert: leaf,
        trusted: false,
    }];
    search.extend(&mut chain)
}

impl<'a> Search<'a> {
    fn extend(&mut self, chain: &mut Vec<Link<'a>>) -> Result<(), String> {
        let top = *chain.last().ok_or("empty chain")?;
        if top.cert.self_signed() {
            if top.trusted {
                return check_chain(chain, self.policy);
            }
            // OpenSSL trusts a self-signed certificate from the peer only when the trust
            // store holds the very same certificate (X509_cmp), never a look-alike.
            let Some(anchor) = self.policy.anchors.iter().find(|a| a.der == top.cert.der) else {
                return Err(format!(
                    "the self-signed certificate \"{}\" is not in sslrootcert (a self-signed server certificate is trusted only when sslrootcert holds that very certificate)",
                    top.cert.describe()
                ));
            };
            let last = chain.len() - 1;
            chain[last] = Link {
                cert: anchor,
                trusted: true,
            };
            let result = check_chain(chain, self.policy);
            chain[last] = top;
            return result;
        }
        if chain.len() >= MAX_CHAIN_LEN {
            return Err(format!(
                "no trusted root was reached within {MAX_CHAIN_LEN} certificates"
            ));
        }
        // Trusted issuers first (OpenSSL's X509_V_FLAG_TRUSTED_FIRST); once a trusted
        // certificate is in the chain, only the trust store is searched.
        let from_store = chain.iter().any(|link| link.trusted);
        let mut candidates: Vec<Link<'a>> = self
            .policy
            .anchors
            .iter()
            .filter(|a| top.cert.could_be_issued_by(a))
            .map(|cert| Link {
                cert,
                trusted: true,
            })
            .collect();
        if !from_store {
            candidates.extend(
                self.peer
                    .iter()
                    .filter(|p| top.cert.could_be_issued_by(p))
                    .filter(|p| !chain.iter().any(|link| link.cert.der == p.der))
                    .map(|cert| Link {
                        cert,
                        trusted: false,
                    }),
            );
        }
        if candidates.is_empty() {
            let hint = if from_store {
                " (sslrootcert holds an intermediate CA but not the self-signed root above it; libpq needs the root)"
            } else {
                ""
            };
            return Err(format!(
                "the issuer \"{}\" of \"{}\" is neither in sslrootcert nor sent by the server{hint}",
                top.cert.issuer,
                top.cert.describe()
            ));
        }
        let mut last_error = String::new();
        for candidate in candidates {
            if self.budget == 0 {
                return Err(
                    "the server's certificate chain needs too many signature checks".into(),
                );
            }
            self.budget -= 1;
            if let Err(e) = top
                .cert
                .verify_signed_by(candidate.cert, self.policy.algorithms)
            {
                last_error = format!(
                    "the signature of \"{}\" is invalid: {e}",
                    top.cert.describe()
                );
                continue;
            }
            chain.push(candidate);
            let result = self.extend(chain);
            chain.pop();
            match result {
                Ok(()) => return Ok(()),
                Err(e) => last_error = e,
            }
        }
        Err(last_error)
    }
}

/// OpenSSL's `check_ca()`: 0 = not a CA, 1 = basicConstraints cA, 3 = self-signed v1,
/// 4 = keyUsage with keyCertSign but no basicConstraints, 5 = Netscape CA type.
fn check_ca(cert: &Cert) -> u8 {
    if cert
        .ext
        .key_usage
        .as_ref()
        .is_some_and(|ku| !ku.key_cert_sign())
    {
        return 0;
    }
    if let Some((ca, _)) = cert.ext.basic_constraints {
        return u8::from(ca);
    }
    if cert.version == 1 && cert.self_signed() {
        3
    } else if cert.ext.key_usage.is_some() {
        4
    } else if cert.ext.ns_cert_type.is_some_and(|t| t & NS_ANY_CA != 0) {
        5
    } else {
        0
    }
}

/// OpenSSL's `ssl_server` purpose test (`check_purpose_ssl_server`).
fn purpose_ok(cert: &Cert, as_ca: bool) -> bool {
    if let Some(eku) = &cert.ext.ext_key_usage {
        if !eku.iter().any(|oid| EKU_SERVER_AUTH.contains(oid)) {
            return false;
        }
    }
    if as_ca {
        return match check_ca(cert) {
            0 => false,
            5 => cert.ext.ns_cert_type.is_some_and(|t| t & NS_SSL_CA != 0),
            _ => true,
        };
    }
    if cert
        .ext
        .ns_cert_type
        .is_some_and(|t| t & NS_SSL_SERVER == 0)
    {
        return false;
    }
    if let Some(ku) = &cert.ext.key_usage {
        if !(ku.digital_signature() || ku.key_encipherment() || ku.key_agreement()) {
            return false;
        }
    }
    true
}

fn role(index: usize, len: usize) -> &'static str {
    if index == 0 {
        "server certificate"
    } else if index + 1 == len {
        "root certificate"
    } else {
        "intermediate certificate"
    }
}

/// The checks of OpenSSL's `verify_chain()` on a complete chain (leaf first, trusted
/// self-signed anchor last), in OpenSSL's order: extensions and CA flags, purposes,
/// path lengths, revocation, then validity dates and issuer key usage.
fn check_chain(chain: &[Link<'_>], policy: &Policy<'_>) -> Result<(), String> {
    let len = chain.len();
    let mut path_len = 0usize;
    for (i, link) in chain.iter().enumerate() {
        let cert = link.cert;
        let what = role(i, len);
        let name = cert.describe();
        if let Some(oid) = &cert.ext.unhandled_critical {
            return Err(format!(
                "the {what} \"{name}\" has a critical extension ({oid}) that OpenSSL does not handle"
            ));
        }
        if policy.mode == Mode::Fallback {
            if let Some(ext) = cert.ext.unevaluated.first() {
                return Err(format!(
                    "the {what} \"{name}\" has a {ext} extension, which this client evaluates only for chains the standard (WebPKI) verifier accepts"
                ));
            }
        }
        if i > 0 {
            let ca = check_ca(cert);
            // OpenSSL 3 requires basicConstraints cA=TRUE of every intermediate, and some
            // CA marking (which includes a self-signed v1 certificate) of the root.
            if ca == 0 || (i + 1 < len && ca != 1) {
                let why = if cert.version == 1 {
                    "a v1 certificate is a CA only when it is a self-signed root"
                } else {
                    "it lacks basicConstraints CA:TRUE, or its keyUsage lacks keyCertSign"
                };
                return Err(format!("the {what} \"{name}\" is not a valid CA: {why}"));
            }
        }
        if !purpose_ok(cert, i > 0) {
            return Err(format!(
                "the {what} \"{name}\" is not valid for TLS servers (its extendedKeyUsage, keyUsage or Netscape certificate type excludes it)"
            ));
        }
        if i > 1 {
            if let Some((_, Some(limit))) = cert.ext.basic_constraints {
                if path_len > usize::from(limit) {
                    return Err(format!(
                        "the {what} \"{name}\" allows {limit} intermediate CA(s) below it, but the chain has {path_len}"
                    ));
                }
            }
        }
        if i > 0 && !cert.self_issued() {
            path_len += 1;
        }
    }
    if let Some(crls) = policy.crls {
        for (i, link) in chain.iter().enumerate() {
            let issuer = chain.get(i + 1).unwrap_or(link).cert;
            check_revocation(link.cert, issuer, role(i, len), crls, policy)?;
        }
    }
    for (i, link) in chain.iter().enumerate() {
        let cert = link.cert;
        let what = role(i, len);
        match cert.validity_at(policy.now) {
            Ordering::Less => {
                return Err(format!(
                    "the {what} \"{}\" is not valid before {}",
                    cert.describe(),
                    show_time(&cert.not_before)
                ))
            }
            Ordering::Greater => {
                return Err(format!(
                    "the {what} \"{}\" expired on {}",
                    cert.describe(),
                    show_time(&cert.not_after)
                ))
            }
            Ordering::Equal => {}
        }
        // The issuer's keyUsage must allow certificate signing (not checked for the
        // anchor's signature on itself, which OpenSSL does not verify).
        if let Some(issuer) = chain.get(i + 1) {
            if issuer
                .cert
                .ext
                .key_usage
                .as_ref()
                .is_some_and(|ku| !ku.key_cert_sign())
            {
                return Err(format!(
                    "the {} \"{}\" may not sign certificates (its keyUsage lacks keyCertSign)",
                    role(i + 1, len),
                    issuer.cert.describe()
                ));
            }
        }
    }
    Ok(())
}

/// OpenSSL's CRL check for one certificate of the chain (`X509_V_FLAG_CRL_CHECK_ALL`
/// checks every certificate, the root included): a CRL from its issuer must be there,
/// signed by the issuer, current, and must not list it.
fn check_revocation(
    cert: &Cert,
    issuer: &Cert,
    what: &str,
    crls: &[Crl],
    policy: &Policy<'_>,
) -> Result<(), String> {
    let name = cert.describe();
    let mut current = Vec::new();
    let mut stale: Option<String> = None;
    for crl in crls
        .iter()
        .filter(|crl| super::x509::names_equal(&crl.issuer, &cert.issuer))
    {
        if let Some(why) = &crl.unsupported {
            return Err(format!(
                "the CRL from \"{}\" cannot be used: {why}",
                crl.issuer
            ));
        }
        if issuer
            .ext
            .key_usage
            .as_ref()
            .is_some_and(|ku| !ku.crl_sign())
        {
            return Err(format!(
                "the CRL for the {what} \"{name}\" is signed by \"{}\", whose keyUsage lacks cRLSign",
                issuer.describe()
            ));
        }
        crl.verify_signed_by(issuer, policy.algorithms)
            .map_err(|e| {
                format!(
                    "the CRL from \"{}\" has an invalid signature: {e}",
                    crl.issuer
                )
            })?;
        let this_update = crl.this_update.to_unix_duration().as_secs();
        if policy.now < this_update {
            stale = Some(format!(
                "the CRL from \"{}\" is not valid before {}",
                crl.issuer,
                show_time(&crl.this_update)
            ));
            continue;
        }
        if let Some(next) = &crl.next_update {
            if policy.now > next.to_unix_duration().as_secs() {
                stale = Some(format!(
                    "the CRL from \"{}\" expired on {} (its nextUpdate)",
                    crl.issuer,
                    show_time(next)
                ));
                continue;
            }
        }
        current.push(crl);
    }
    if current.is_empty() {
        return Err(stale.unwrap_or_else(|| {
            format!(
                "revocation is checked (sslcrl/sslcrldir), but there is no CRL from \"{}\", the issuer of the {what} \"{name}\" (libpq, through OpenSSL, needs a CRL for every certificate of the chain)",
                cert.issuer
            )
        }));
    }
    if current.iter().any(|crl| crl.revoked.contains(&cert.serial)) {
        return Err(format!(
            "the {what} \"{name}\" (serial {}) has been revoked by its issuer \"{}\"",
            hex(&cert.serial),
            cert.issuer
        ));
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}
