//! Unit tests of the OpenSSL-rule chain checker and libpq's host-name matcher, on
//! certificates generated here (rcgen for v3, hand-built DER for v1).

use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CustomExtension,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, Issuer, KeyIdMethod,
    KeyPair, KeyUsagePurpose, NameConstraints, PublicKeyData, RevokedCertParams, SanType,
    SerialNumber, SigningKey,
};
use x509_cert::der::asn1::BitString;
use x509_cert::der::{Decode, Encode};
use x509_cert::name::Name;
use x509_cert::spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_cert::time::{Time, Validity};

use super::chain::{self, Mode, Policy};
use super::hostname;
use super::x509::{Cert, Crl};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn key() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}

/// A CA or leaf made with rcgen, with its issuer handle for signing more.
struct Made {
    cert: Cert,
    issuer: Issuer<'static, KeyPair>,
}

fn params(cn: &str, sans: &[&str]) -> CertificateParams {
    let mut params =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.use_authority_key_identifier_extension = true;
    params
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut p = params(cn, &[]);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

fn leaf_params(cn: &str, sans: &[&str]) -> CertificateParams {
    let mut p = params(cn, sans);
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p
}

fn self_signed(params: CertificateParams) -> Made {
    let key = key();
    let cert = params.self_signed(&key).unwrap();
    Made {
        cert: Cert::parse(cert.der()).unwrap(),
        issuer: Issuer::new(params, key),
    }
}

fn signed(params: CertificateParams, by: &Made) -> Made {
    let key = key();
    let cert = params.signed_by(&key, &by.issuer).unwrap();
    Made {
        cert: Cert::parse(cert.der()).unwrap(),
        issuer: Issuer::new(params, key),
    }
}

/// A hand-built X.509 v1 certificate (no version field, no extensions), ECDSA P-256.
fn v1(subject: &str, issuer: &str, subject_key: &KeyPair, signer: &KeyPair) -> Cert {
    let alg = AlgorithmIdentifierOwned {
        oid: "1.2.840.10045.4.3.2".parse().unwrap(),
        parameters: None,
    };
    let start = now() - 3600;
    let tbs = x509_cert::TbsCertificate {
        version: x509_cert::Version::V1,
        serial_number: x509_cert::serial_number::SerialNumber::new(&[0x42, subject.len() as u8])
            .unwrap(),
        signature: alg.clone(),
        issuer: Name::from_str(issuer).unwrap(),
        validity: Validity {
            not_before: Time::UtcTime(
                x509_cert::der::asn1::UtcTime::from_unix_duration(std::time::Duration::from_secs(
                    start,
                ))
                .unwrap(),
            ),
            not_after: Time::UtcTime(
                x509_cert::der::asn1::UtcTime::from_unix_duration(std::time::Duration::from_secs(
                    start + 86400 * 30,
                ))
                .unwrap(),
            ),
        },
        subject: Name::from_str(subject).unwrap(),
        subject_public_key_info: SubjectPublicKeyInfoOwned::from_der(
            &subject_key.subject_public_key_info(),
        )
        .unwrap(),
        issuer_unique_id: None,
        subject_unique_id: None,
        extensions: None,
    };
    let signature = signer.sign(&tbs.to_der().unwrap()).unwrap();
    let cert = x509_cert::Certificate {
        tbs_certificate: tbs,
        signature_algorithm: alg,
        signature: BitString::from_bytes(&signature).unwrap(),
    };
    let parsed = Cert::parse(&cert.to_der().unwrap()).unwrap();
    assert_eq!(parsed.version, 1);
    parsed
}

fn policy<'a>(anchors: &'a [Cert], crls: Option<&'a [Crl]>, mode: Mode) -> Policy<'a> {
    Policy {
        anchors,
        crls,
        algorithms: &ALGORITHMS,
        now: now(),
        mode,
    }
}

static ALGORITHMS: std::sync::LazyLock<rustls::crypto::WebPkiSupportedAlgorithms> =
    std::sync::LazyLock::new(|| {
        rustls::crypto::ring::default_provider().signature_verification_algorithms
    });

fn verify(leaf: &Cert, intermediates: &[Cert], anchors: &[Cert]) -> Result<(), String> {
    chain::verify(leaf, intermediates, &policy(anchors, None, Mode::Fallback))
}

#[track_caller]
fn refused(result: Result<(), String>, needle: &str) {
    match result {
        Ok(()) => panic!("accepted, expected a refusal mentioning {needle:?}"),
        Err(e) => assert!(e.contains(needle), "{e:?} lacks {needle:?}"),
    }
}

#[test]
fn a_self_signed_ca_server_certificate_is_its_own_anchor_only_byte_for_byte() {
    let server_key = key();
    let ca_like = |serial: u8| {
        let mut p = params("db.example.com", &[]);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.serial_number = Some(SerialNumber::from(vec![serial]));
        p
    };
    let server = self_signed_with(ca_like(1), &server_key);
    assert!(server.self_signed());
    verify(&server, &[], std::slice::from_ref(&server)).unwrap();
    refused(verify(&server, &[], &[]), "not in sslrootcert");
    // A look-alike with the same name and key but another serial is not trusted.
    let twin = self_signed_with(ca_like(2), &server_key);
    assert!(twin.self_signed());
    refused(verify(&server, &[], &[twin]), "not in sslrootcert");
}

#[test]
fn v1_certificates_follow_openssl() {
    let root_key = key();
    let root = self_signed_with(ca_params("Root CA"), &root_key);
    let server_key = key();
    // The documentation's recipe: a v1 server certificate under a v3 root.
    let server = v1("CN=db.example.com", "CN=Root CA", &server_key, &root_key);
    verify(&server, &[], std::slice::from_ref(&root)).unwrap();
    // A self-signed v1 root is a CA for OpenSSL.
    let v1_root_key = key();
    let v1_root = v1("CN=Old Root", "CN=Old Root", &v1_root_key, &v1_root_key);
    let under_v1 = v1(
        "CN=db.example.com",
        "CN=Old Root",
        &server_key,
        &v1_root_key,
    );
    verify(&under_v1, &[], std::slice::from_ref(&v1_root)).unwrap();
    // A v1 intermediate is not (OpenSSL 3 wants CA:TRUE of intermediates).
    let mid_key = key();
    let mid = v1("CN=Middle", "CN=Root CA", &mid_key, &root_key);
    let below_mid = v1("CN=db.example.com", "CN=Middle", &server_key, &mid_key);
    refused(
        verify(
            &below_mid,
            std::slice::from_ref(&mid),
            std::slice::from_ref(&root),
        ),
        "a v1 certificate is a CA only when it is a self-signed root",
    );
    // A v1 certificate signed by the wrong key.
    let forged = v1("CN=db.example.com", "CN=Root CA", &server_key, &server_key);
    refused(
        verify(&forged, &[], std::slice::from_ref(&root)),
        "signature",
    );
}

fn self_signed_with(params: CertificateParams, key: &KeyPair) -> Cert {
    Cert::parse(params.self_signed(key).unwrap().der()).unwrap()
}

#[test]
fn intermediates_must_be_cas_and_the_root_must_be_in_sslrootcert() {
    let root = self_signed(ca_params("Root CA"));
    let mid = signed(ca_params("Intermediate CA"), &root);
    let leaf = signed(leaf_params("db", &["db.example.com"]), &mid);
    verify(
        &leaf.cert,
        std::slice::from_ref(&mid.cert),
        std::slice::from_ref(&root.cert),
    )
    .unwrap();
    // The intermediate missing from the server's chain.
    refused(
        verify(&leaf.cert, &[], std::slice::from_ref(&root.cert)),
        "neither in sslrootcert nor sent by the server",
    );
    // sslrootcert holding only the intermediate: OpenSSL needs the self-signed root.
    refused(
        verify(&leaf.cert, &[], std::slice::from_ref(&mid.cert)),
        "not the self-signed root",
    );
    // An intermediate without basicConstraints CA:TRUE (keyUsage keyCertSign only).
    let mut weak = params("Weak CA", &[]);
    weak.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let weak = signed(weak, &root);
    let under_weak = signed(leaf_params("db", &["db.example.com"]), &weak);
    refused(
        verify(
            &under_weak.cert,
            std::slice::from_ref(&weak.cert),
            std::slice::from_ref(&root.cert),
        ),
        "not a valid CA",
    );
    // A CA:TRUE server certificate signed by a root is fine (OpenSSL does not mind).
    let mut ca_leaf = ca_params("db.example.com");
    ca_leaf.key_usages.push(KeyUsagePurpose::DigitalSignature);
    let ca_leaf = signed(ca_leaf, &root);
    verify(&ca_leaf.cert, &[], std::slice::from_ref(&root.cert)).unwrap();
    // A path length of 0 on the root forbids the intermediate.
    let mut short = ca_params("Short Root");
    short.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let short = self_signed(short);
    let mid2 = signed(ca_params("Intermediate CA"), &short);
    let leaf2 = signed(leaf_params("db", &["db.example.com"]), &mid2);
    refused(
        verify(
            &leaf2.cert,
            std::slice::from_ref(&mid2.cert),
            std::slice::from_ref(&short.cert),
        ),
        "allows 0 intermediate",
    );
}

#[test]
fn dates_are_checked_at_every_level() {
    let mut old_root = ca_params("Old Root");
    old_root.not_before = rcgen::date_time_ymd(2000, 1, 1);
    old_root.not_after = rcgen::date_time_ymd(2001, 1, 1);
    let old_root = self_signed(old_root);
    let leaf = signed(leaf_params("db", &["db"]), &old_root);
    refused(
        verify(&leaf.cert, &[], std::slice::from_ref(&old_root.cert)),
        "root certificate",
    );
    refused(
        verify(&leaf.cert, &[], std::slice::from_ref(&old_root.cert)),
        "expired on 2001-01-01",
    );

    let root = self_signed(ca_params("Root CA"));
    let mut expired = leaf_params("db", &["db"]);
    expired.not_before = rcgen::date_time_ymd(2000, 1, 1);
    expired.not_after = rcgen::date_time_ymd(2000, 6, 1);
    let expired = signed(expired, &root);
    refused(
        verify(&expired.cert, &[], std::slice::from_ref(&root.cert)),
        "server certificate",
    );
    refused(
        verify(&expired.cert, &[], std::slice::from_ref(&root.cert)),
        "expired",
    );
    let mut future = leaf_params("db", &["db"]);
    future.not_before = rcgen::date_time_ymd(2090, 1, 1);
    future.not_after = rcgen::date_time_ymd(2091, 1, 1);
    let future = signed(future, &root);
    refused(
        verify(&future.cert, &[], std::slice::from_ref(&root.cert)),
        "not valid before 2090",
    );
}

#[test]
fn purposes_and_key_usage_follow_openssl() {
    let root = self_signed(ca_params("Root CA"));
    let mut client_only = leaf_params("db", &["db"]);
    client_only.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_only = signed(client_only, &root);
    refused(
        verify(&client_only.cert, &[], std::slice::from_ref(&root.cert)),
        "not valid for TLS servers",
    );
    let mut signing_only = leaf_params("db", &["db"]);
    signing_only.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let signing_only = signed(signing_only, &root);
    refused(
        verify(&signing_only.cert, &[], std::slice::from_ref(&root.cert)),
        "not valid for TLS servers",
    );
    // A root whose keyUsage does not allow certificate signing.
    let mut odd_root = params("Odd Root", &[]);
    odd_root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    odd_root.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let odd_root = self_signed(odd_root);
    let under_odd = signed(leaf_params("db", &["db"]), &odd_root);
    refused(
        verify(&under_odd.cert, &[], std::slice::from_ref(&odd_root.cert)),
        "not a valid CA",
    );
}

#[test]
fn unknown_critical_extensions_and_unevaluated_constraints() {
    let root = self_signed(ca_params("Root CA"));
    let mut odd = leaf_params("db", &["db"]);
    let mut ext = CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 99999, 1], vec![5, 0]);
    ext.set_criticality(true);
    odd.custom_extensions = vec![ext];
    let odd = signed(odd, &root);
    refused(
        verify(&odd.cert, &[], std::slice::from_ref(&root.cert)),
        "critical extension",
    );

    let mut constrained = ca_params("Constrained Root");
    constrained.name_constraints = Some(NameConstraints {
        permitted_subtrees: vec![GeneralSubtree::DnsName("example.com".into())],
        excluded_subtrees: vec![],
    });
    let constrained = self_signed(constrained);
    let leaf = signed(leaf_params("db", &["db.example.com"]), &constrained);
    let anchors = std::slice::from_ref(&constrained.cert);
    refused(
        chain::verify(&leaf.cert, &[], &policy(anchors, None, Mode::Fallback)),
        "nameConstraints",
    );
    // After WebPKI (which enforces name constraints) the chain passes.
    chain::verify(&leaf.cert, &[], &policy(anchors, None, Mode::AfterWebPki)).unwrap();
}

fn crl(by: &Made, revoked: &[&Cert], this: (i32, u8), next: (i32, u8)) -> Crl {
    let params = CertificateRevocationListParams {
        this_update: rcgen::date_time_ymd(this.0, this.1, 1),
        next_update: rcgen::date_time_ymd(next.0, next.1, 1),
        crl_number: SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|cert| RevokedCertParams {
                serial_number: SerialNumber::from(cert.serial.clone()),
                revocation_time: rcgen::date_time_ymd(2024, 1, 1),
                reason_code: None,
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    Crl::parse(params.signed_by(&by.issuer).unwrap().der()).unwrap()
}

#[test]
fn revocation_covers_the_whole_chain() {
    let root = self_signed(ca_params("Root CA"));
    let mid = signed(ca_params("Intermediate CA"), &root);
    let leaf = signed(leaf_params("db", &["db"]), &mid);
    let other = signed(leaf_params("other", &["other"]), &mid);
    let anchors = std::slice::from_ref(&root.cert);
    let peer = std::slice::from_ref(&mid.cert);
    let check = |crls: &[Crl]| {
        chain::verify(
            &leaf.cert,
            peer,
            &policy(anchors, Some(crls), Mode::Fallback),
        )
    };

    let root_crl = crl(&root, &[], (2020, 1), (2099, 1));
    let mid_crl = crl(&mid, &[&other.cert], (2020, 1), (2099, 1));
    check(&[root_crl.clone(), mid_crl.clone()]).unwrap();
    refused(
        check(&[
            root_crl.clone(),
            crl(&mid, &[&leaf.cert], (2020, 1), (2099, 1)),
        ]),
        "has been revoked",
    );
    // OpenSSL's CRL_CHECK_ALL: the intermediate (and root) need their issuer's CRL too.
    refused(
        check(std::slice::from_ref(&mid_crl)),
        "no CRL from \"CN=Root CA\"",
    );
    refused(
        check(std::slice::from_ref(&root_crl)),
        "no CRL from \"CN=Intermediate CA\"",
    );
    refused(check(&[]), "no CRL");
    // Stale or future CRLs do not count.
    refused(
        check(&[root_crl.clone(), crl(&mid, &[], (2020, 1), (2021, 1))]),
        "expired on 2021-01-01",
    );
    refused(
        check(&[root_crl.clone(), crl(&mid, &[], (2098, 1), (2099, 1))]),
        "not valid before 2098",
    );
    // A CRL naming the intermediate as issuer but signed by another key.
    let impostor = self_signed(ca_params("Intermediate CA"));
    refused(
        check(&[root_crl, crl(&impostor, &[], (2020, 1), (2099, 1))]),
        "invalid signature",
    );
    // Without CRLs configured, nothing is checked.
    chain::verify(&leaf.cert, peer, &policy(anchors, None, Mode::Fallback)).unwrap();
}

#[test]
fn chains_through_many_look_alikes_stay_bounded() {
    let root = self_signed(ca_params("Root CA"));
    let mid = signed(ca_params("Intermediate CA"), &root);
    // Without an authorityKeyIdentifier every same-named CA is a candidate issuer.
    let mut bare = leaf_params("db", &["db"]);
    bare.use_authority_key_identifier_extension = false;
    let leaf = signed(bare, &mid);
    let fakes: Vec<Cert> = (0..70)
        .map(|_| signed(ca_params("Intermediate CA"), &root).cert)
        .collect();
    let mut peer = fakes[..40].to_vec();
    peer.push(mid.cert.clone());
    verify(&leaf.cert, &peer, std::slice::from_ref(&root.cert)).unwrap();
    refused(
        verify(&leaf.cert, &fakes[..40], std::slice::from_ref(&root.cert)),
        "signature of \"CN=db\" is invalid",
    );
    let mut crowded = fakes.clone();
    crowded.push(mid.cert.clone());
    refused(
        verify(&leaf.cert, &crowded, std::slice::from_ref(&root.cert)),
        "too many signature checks",
    );
}

fn host(cert: &Cert, name: &str) -> Result<(), String> {
    hostname::check(cert, name)
}

#[test]
fn host_names_follow_libpq() {
    let root = self_signed(ca_params("Root CA"));
    let make = |cn: &str, sans: Vec<SanType>| {
        let mut p = leaf_params(cn, &[]);
        p.subject_alt_names = sans;
        signed(p, &root).cert
    };
    let dns = |s: &str| SanType::DnsName(s.try_into().unwrap());
    let ip = |s: &str| SanType::IpAddress(s.parse().unwrap());

    // CN only.
    let cn_only = make("db.example.com", vec![]);
    host(&cn_only, "db.example.com").unwrap();
    host(&cn_only, "DB.Example.COM").unwrap();
    refused(
        host(&cn_only, "other.example.com"),
        "server certificate for \"db.example.com\" does not match host name \"other.example.com\"",
    );
    refused(host(&cn_only, ""), "host name must be specified");

    // A dNSName SAN hides the CN from DNS hosts, not from IP hosts.
    let san = make("127.0.0.1", vec![dns("db.example.com")]);
    host(&san, "db.example.com").unwrap();
    host(&san, "127.0.0.1").unwrap();
    let san_cn_name = make("localhost", vec![dns("db.example.com")]);
    refused(
        host(&san_cn_name, "localhost"),
        "server certificate for \"db.example.com\" does not match host name \"localhost\"",
    );

    // An iPAddress SAN hides the CN from IP hosts, not from DNS hosts.
    let ip_san = make("localhost", vec![ip("127.0.0.1")]);
    host(&ip_san, "127.0.0.1").unwrap();
    host(&ip_san, "localhost").unwrap();
    let ip_san_cn_ip = make("127.0.0.2", vec![ip("127.0.0.1")]);
    refused(
        host(&ip_san_cn_ip, "127.0.0.2"),
        "does not match host name \"127.0.0.2\"",
    );
    // A dNSName holding an address text matches that text.
    let dns_ip = make(
        "x",
        vec![
            dns("db.example.com"),
            SanType::DnsName("127.0.0.1".try_into().unwrap()),
        ],
    );
    host(&dns_ip, "127.0.0.1").unwrap();

    // Wildcards: one whole left-most label.
    let wild = make("x", vec![dns("*.example.com")]);
    host(&wild, "db.example.com").unwrap();
    refused(host(&wild, "a.b.example.com"), "does not match");
    refused(host(&wild, "example.com"), "does not match");

    // Several names: the message counts the others.
    let many = make(
        "x",
        vec![dns("a.example.com"), dns("b.example.com"), ip("10.0.0.1")],
    );
    refused(
        host(&many, "c.example.com"),
        "server certificate for \"a.example.com\" (and 2 other names) does not match host name \"c.example.com\"",
    );
    host(&many, "10.0.0.1").unwrap();
    host(&many, "b.example.com").unwrap();
    let v6 = make("x", vec![ip("::1")]);
    host(&v6, "::1").unwrap();
    refused(host(&v6, "127.0.0.1"), "does not match");
}

mod mutation {
    use proptest::prelude::*;

    use super::*;

    /// DER of a root, an intermediate, a server certificate and a CRL.
    type Material = (Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>);

    /// A small chain to corrupt.
    fn material() -> &'static Material {
        static MATERIAL: std::sync::OnceLock<Material> = std::sync::OnceLock::new();
        MATERIAL.get_or_init(|| {
            let root = self_signed(ca_params("Root CA"));
            let mid = signed(ca_params("Intermediate CA"), &root);
            let leaf = signed(leaf_params("db", &["db.example.com", "10.0.0.1"]), &mid);
            let crl = CertificateRevocationListParams {
                this_update: rcgen::date_time_ymd(2020, 1, 1),
                next_update: rcgen::date_time_ymd(2099, 1, 1),
                crl_number: SerialNumber::from(7u64),
                issuing_distribution_point: None,
                revoked_certs: vec![],
                key_identifier_method: KeyIdMethod::Sha256,
            }
            .signed_by(&mid.issuer)
            .unwrap();
            (
                root.cert.der.clone(),
                mid.cert.der.clone(),
                leaf.cert.der.clone(),
                crl.der().to_vec(),
            )
        })
    }

    fn corrupt(bytes: &[u8], edits: &[(usize, u8)]) -> Vec<u8> {
        let mut out = bytes.to_vec();
        for &(at, value) in edits {
            if out.is_empty() {
                break;
            }
            let i = at % out.len();
            out[i] = value;
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Corrupted certificates and CRLs from a peer or a file are errors or are
        /// refused; nothing panics, and a corrupted chain is never accepted unless the
        /// corruption left the signed bytes intact.
        #[test]
        fn corrupted_chains_never_panic(
            which in 0usize..4,
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
            host in "[a-z0-9.*:]{0,20}",
        ) {
            let (root, mid, leaf, crl) = material();
            let mut parts = [root.clone(), mid.clone(), leaf.clone(), crl.clone()];
            parts[which] = corrupt(&parts[which], &edits);
            let changed = parts[which] != [root, mid, leaf, crl][which].as_slice();
            let [root_der, mid_der, leaf_der, crl_der] = parts;
            let (Ok(root), Ok(mid), Ok(leaf)) =
                (Cert::parse(&root_der), Cert::parse(&mid_der), Cert::parse(&leaf_der))
            else {
                return Ok(());
            };
            let crls: Vec<Crl> = Crl::parse(&crl_der).into_iter().collect();
            let anchors = [root];
            for mode in [Mode::Fallback, Mode::AfterWebPki] {
                let plain = chain::verify(&leaf, std::slice::from_ref(&mid), &policy(&anchors, None, mode));
                let revocation =
                    chain::verify(&leaf, std::slice::from_ref(&mid), &policy(&anchors, Some(&crls), mode));
                // A changed intermediate or server certificate breaks a signature; a
                // changed CRL breaks its signature (or is no CRL at all).
                if changed && (which == 1 || which == 2) {
                    prop_assert!(plain.is_err(), "corrupted certificate {which} accepted");
                }
                if changed {
                    prop_assert!(revocation.is_err() || which == 0, "corruption of part {which} accepted with CRLs");
                }
            }
            let _ = hostname::check(&leaf, &host);
        }
    }
}
