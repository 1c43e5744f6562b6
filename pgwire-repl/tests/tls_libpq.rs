//! Differential test against libpq: for each certificate recipe × sslmode × host name
//! (and CRL and protocol-version options), this client must connect or refuse exactly
//! as `psql` does, against the same real server.
//!
//! The oracle is PostgreSQL 15's `psql` (`/usr/bin/psql`, libpq 15 with OpenSSL), run
//! with an empty environment and an empty home directory. The server is the one
//! `PGREPL_TEST_PG` selects; psql 15 talks to all of them. One server serves every
//! recipe: its certificate and key are swapped and reloaded between recipes.
//!
//! A verdict is `refused`, `plain` (connected without TLS, which `prefer` may do) or
//! the TLS version in use, as `pg_stat_ssl` reports it. The test prints the whole table
//! and fails on any disagreement.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use pgwire_repl::config::Config;
use pgwire_repl::SqlClient;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use testkit::{Cluster, ClusterOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PSQL: &str = "/usr/bin/psql";
const OPENSSL: &str = "/usr/bin/openssl";
const VERDICT_SQL: &str = "SELECT coalesce((SELECT version FROM pg_stat_ssl WHERE pid = pg_backend_pid() AND ssl), 'plain')";

const MODES: [&str; 4] = ["prefer", "require", "verify-ca", "verify-full"];
const HOSTS: [&str; 5] = [
    "host=localhost hostaddr=127.0.0.1",
    "host=127.0.0.1",
    "host=db.example.com hostaddr=127.0.0.1",
    "host=a.b.example.com hostaddr=127.0.0.1",
    "hostaddr=127.0.0.1",
];

/// A server certificate set-up and what the client trusts.
struct Recipe {
    name: String,
    /// The server's certificate chain (PEM), server certificate first.
    chain: String,
    /// The server's private key (PEM).
    key: String,
    /// The client's `sslrootcert` file.
    root: PathBuf,
    /// Extra client options to try, each a row group ("" = none).
    variants: Vec<String>,
}

fn run(cmd: &mut Command) -> String {
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        output.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs the openssl command in `dir`.
fn openssl(dir: &Path, args: &str) -> String {
    run(Command::new(OPENSSL)
        .current_dir(dir)
        .args(args.split_whitespace()))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path.to_path_buf()
}

/// The recipes made with the openssl command line, as people follow them.
fn openssl_recipes(dir: &Path) -> Vec<Recipe> {
    let d = |name: &str| dir.join(name);
    let mut recipes = Vec::new();

    // (a) A self-signed server certificate (CA:TRUE, no subjectAltName) used as its own
    // root, as in seed scripts: server.crt copied to the client as root.crt.
    openssl(
        dir,
        "req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=db.example.com -keyout self.key -out self.crt",
    );
    recipes.push(Recipe {
        name: "openssl: self-signed CA:TRUE as its own root".into(),
        chain: read(&d("self.crt")),
        key: read(&d("self.key")),
        root: d("self.crt"),
        variants: vec![String::new()],
    });

    // (b) PostgreSQL's documentation (Secure TCP/IP Connections with SSL, Creating
    // Certificates): a root CA, and a server certificate signed with `openssl x509 -req`,
    // which is X.509 v1.
    openssl(
        dir,
        "req -new -x509 -days 365 -nodes -text -out root.crt -keyout root.key -subj /CN=root.example.com",
    );
    openssl(
        dir,
        "req -new -nodes -text -out server.csr -keyout server.key -subj /CN=db.example.com",
    );
    openssl(
        dir,
        "x509 -req -in server.csr -text -days 365 -CA root.crt -CAkey root.key -CAcreateserial -out server.crt",
    );
    assert!(
        openssl(dir, "x509 -in server.crt -noout -text").contains("Version: 1 (0x0)"),
        "the documentation's recipe should give a v1 certificate"
    );
    recipes.push(Recipe {
        name: "openssl: documentation recipe (v1 server certificate)".into(),
        chain: read(&d("server.crt")),
        key: read(&d("server.key")),
        root: d("root.crt"),
        variants: vec![String::new()],
    });

    // The documentation's chain: a v3_ca intermediate, the v1 server certificate below.
    openssl(
        dir,
        "req -new -nodes -text -out intermediate.csr -keyout intermediate.key -subj /CN=intermediate.example.com",
    );
    openssl(
        dir,
        "x509 -req -in intermediate.csr -text -days 365 -extfile /etc/ssl/openssl.cnf -extensions v3_ca -CA root.crt -CAkey root.key -CAcreateserial -out intermediate.crt",
    );
    openssl(
        dir,
        "x509 -req -in server.csr -text -days 365 -CA intermediate.crt -CAkey intermediate.key -CAcreateserial -out server-int.crt",
    );
    recipes.push(Recipe {
        name: "openssl: documentation chain (v3_ca intermediate, v1 server)".into(),
        chain: read(&d("server-int.crt")) + &read(&d("intermediate.crt")),
        key: read(&d("server.key")),
        root: d("root.crt"),
        variants: vec![String::new()],
    });

    // A v1 intermediate (no -extensions): OpenSSL 3 refuses it as a CA.
    openssl(
        dir,
        "x509 -req -in intermediate.csr -days 365 -CA root.crt -CAkey root.key -CAcreateserial -out intermediate-v1.crt",
    );
    openssl(
        dir,
        "x509 -req -in server.csr -days 365 -CA intermediate-v1.crt -CAkey intermediate.key -CAcreateserial -out server-int-v1.crt",
    );
    recipes.push(Recipe {
        name: "openssl: v1 intermediate".into(),
        chain: read(&d("server-int-v1.crt")) + &read(&d("intermediate-v1.crt")),
        key: read(&d("server.key")),
        root: d("root.crt"),
        variants: vec![String::new()],
    });

    // (c) A v3 certificate with the host name only in the CN.
    write(
        &d("cn-only.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
    );
    openssl(
        dir,
        "x509 -req -in server.csr -days 365 -CA root.crt -CAkey root.key -CAcreateserial -extfile cn-only.ext -out cn-only.crt",
    );
    recipes.push(Recipe {
        name: "openssl: v3, host name in the CN only".into(),
        chain: read(&d("cn-only.crt")),
        key: read(&d("server.key")),
        root: d("root.crt"),
        variants: vec![String::new()],
    });

    // A self-signed v1 certificate (x509 -req -signkey) as its own root.
    openssl(
        dir,
        "x509 -req -in server.csr -days 30 -signkey server.key -out self-v1.crt",
    );
    recipes.push(Recipe {
        name: "openssl: self-signed v1 as its own root".into(),
        chain: read(&d("self-v1.crt")),
        key: read(&d("server.key")),
        root: d("self-v1.crt"),
        variants: vec![String::new()],
    });
    recipes
}

/// An rcgen CA (or leaf), with what is needed to sign below it.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ec_key() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name = name(cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.use_authority_key_identifier_extension = true;
    p
}

fn root_ca(params: CertificateParams) -> Ca {
    let key = ec_key();
    let cert = params.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

fn sub_ca(params: CertificateParams, by: &Ca) -> Ca {
    let key = ec_key();
    let cert = params.signed_by(&key, &by.issuer).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

fn leaf_params(cn: &str, sans: Vec<SanType>) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name = name(cn);
    p.subject_alt_names = sans;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.use_authority_key_identifier_extension = true;
    p
}

/// A leaf signed by `by`: (certificate PEM, key PEM, serial).
fn leaf(mut params: CertificateParams, by: &Ca, serial: u64) -> (String, String, u64) {
    params.serial_number = Some(SerialNumber::from(serial));
    let key = ec_key();
    let cert = params.signed_by(&key, &by.issuer).unwrap();
    (cert.pem(), key.serialize_pem(), serial)
}

fn dns(name: &str) -> SanType {
    SanType::DnsName(name.try_into().unwrap())
}

fn ip(addr: &str) -> SanType {
    SanType::IpAddress(addr.parse().unwrap())
}

fn crl_pem(by: &Ca, revoked: &[u64]) -> String {
    CertificateRevocationListParams {
        this_update: rcgen::date_time_ymd(2020, 1, 1),
        next_update: rcgen::date_time_ymd(2099, 1, 1),
        crl_number: SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|&serial| RevokedCertParams {
                serial_number: SerialNumber::from(serial),
                revocation_time: rcgen::date_time_ymd(2024, 1, 1),
                reason_code: None,
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&by.issuer)
    .unwrap()
    .pem()
    .unwrap()
}

/// The recipes made with rcgen.
fn rcgen_recipes(dir: &Path) -> Vec<Recipe> {
    let root = root_ca(ca_params("pgrepl differential root"));
    let root_file = write(&dir.join("rcgen-root.crt"), &root.pem);
    let mut recipes = Vec::new();
    let mut add =
        |name: &str, (cert, key, _): (String, String, u64), extra_chain: &str, root: &Path| {
            recipes.push(Recipe {
                name: name.to_string(),
                chain: cert + extra_chain,
                key,
                root: root.to_path_buf(),
                variants: vec![String::new()],
            });
        };

    add(
        "rcgen: SAN localhost, 127.0.0.1",
        leaf(
            leaf_params("localhost", vec![dns("localhost"), ip("127.0.0.1")]),
            &root,
            10,
        ),
        "",
        &root_file,
    );
    add(
        "rcgen: SAN dNSName only, CN 127.0.0.1",
        leaf(
            leaf_params("127.0.0.1", vec![dns("db.example.com")]),
            &root,
            11,
        ),
        "",
        &root_file,
    );
    add(
        "rcgen: wildcard *.example.com",
        leaf(leaf_params("wild", vec![dns("*.example.com")]), &root, 12),
        "",
        &root_file,
    );
    add(
        "rcgen: iPAddress SAN only, CN localhost",
        leaf(leaf_params("localhost", vec![ip("127.0.0.1")]), &root, 13),
        "",
        &root_file,
    );
    add(
        "rcgen: name mismatch (other.example.org)",
        leaf(
            leaf_params("other.example.org", vec![dns("other.example.org")]),
            &root,
            14,
        ),
        "",
        &root_file,
    );
    let mut ca_leaf = leaf_params("localhost", vec![dns("localhost")]);
    ca_leaf.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_leaf.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
    ];
    add(
        "rcgen: CA:TRUE server certificate under a root",
        leaf(ca_leaf, &root, 15),
        "",
        &root_file,
    );
    let mut client_only = leaf_params("localhost", vec![dns("localhost")]);
    client_only.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    add(
        "rcgen: extendedKeyUsage clientAuth only",
        leaf(client_only, &root, 16),
        "",
        &root_file,
    );

    // Roots WebPKI accepts as trust anchors and OpenSSL does not accept as CAs.
    let mut no_cert_sign = ca_params("pgrepl root without keyCertSign");
    no_cert_sign.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let no_cert_sign = root_ca(no_cert_sign);
    let no_cert_sign_file = write(&dir.join("rcgen-no-certsign.crt"), &no_cert_sign.pem);
    add(
        "rcgen: root whose keyUsage lacks keyCertSign",
        leaf(
            leaf_params("localhost", vec![dns("localhost")]),
            &no_cert_sign,
            17,
        ),
        "",
        &no_cert_sign_file,
    );
    let mut not_ca = ca_params("pgrepl root without CA marks");
    not_ca.is_ca = IsCa::NoCa;
    not_ca.key_usages = Vec::new();
    let not_ca = root_ca(not_ca);
    let not_ca_file = write(&dir.join("rcgen-not-ca.crt"), &not_ca.pem);
    add(
        "rcgen: root without basicConstraints or keyUsage",
        leaf(
            leaf_params("localhost", vec![dns("localhost")]),
            &not_ca,
            18,
        ),
        "",
        &not_ca_file,
    );
    let mut sign_only = leaf_params("localhost", vec![dns("localhost")]);
    sign_only.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    add(
        "rcgen: server keyUsage keyCertSign only",
        leaf(sign_only, &root, 19),
        "",
        &root_file,
    );

    let mid = sub_ca(ca_params("pgrepl differential intermediate"), &root);
    let mid_file = write(&dir.join("rcgen-intermediate.crt"), &mid.pem);
    let below_mid = leaf(leaf_params("localhost", vec![dns("localhost")]), &mid, 20);
    add(
        "rcgen: chain with an intermediate",
        below_mid.clone(),
        &mid.pem,
        &root_file,
    );
    add(
        "rcgen: intermediate not sent by the server",
        below_mid.clone(),
        "",
        &root_file,
    );
    add(
        "rcgen: sslrootcert holds only the intermediate",
        below_mid,
        &mid.pem,
        &mid_file,
    );

    let other = root_ca(ca_params("pgrepl unrelated root"));
    let other_file = write(&dir.join("rcgen-other.crt"), &other.pem);
    add(
        "rcgen: wrong CA in sslrootcert",
        leaf(leaf_params("localhost", vec![dns("localhost")]), &root, 30),
        "",
        &other_file,
    );

    let mut expired = leaf_params("localhost", vec![dns("localhost")]);
    expired.not_before = rcgen::date_time_ymd(2000, 1, 1);
    expired.not_after = rcgen::date_time_ymd(2001, 1, 1);
    add("rcgen: expired", leaf(expired, &root, 31), "", &root_file);
    let mut future = leaf_params("localhost", vec![dns("localhost")]);
    future.not_before = rcgen::date_time_ymd(2090, 1, 1);
    future.not_after = rcgen::date_time_ymd(2091, 1, 1);
    add(
        "rcgen: not yet valid",
        leaf(future, &root, 32),
        "",
        &root_file,
    );
    let mut old_root = ca_params("pgrepl expired root");
    old_root.not_before = rcgen::date_time_ymd(2000, 1, 1);
    old_root.not_after = rcgen::date_time_ymd(2001, 1, 1);
    let old_root = root_ca(old_root);
    let old_root_file = write(&dir.join("rcgen-old-root.crt"), &old_root.pem);
    add(
        "rcgen: valid server certificate under an expired root",
        leaf(
            leaf_params("localhost", vec![dns("localhost")]),
            &old_root,
            33,
        ),
        "",
        &old_root_file,
    );

    // Revocation: one server certificate, CRLs that revoke it, do not, or belong to
    // another CA; as a file (sslcrl) and as an OpenSSL hashed directory (sslcrldir).
    let revoked = leaf(leaf_params("localhost", vec![dns("localhost")]), &root, 40);
    let revoking = write(&dir.join("revoking.crl"), &crl_pem(&root, &[40]));
    let clean = write(&dir.join("clean.crl"), &crl_pem(&root, &[41]));
    let unrelated = write(&dir.join("unrelated.crl"), &crl_pem(&other, &[40]));
    let hash = openssl(dir, "crl -hash -noout -in revoking.crl");
    let crl_dir = dir.join("crldir");
    std::fs::create_dir_all(&crl_dir).unwrap();
    write(
        &crl_dir.join(format!("{}.r0", hash.trim())),
        &read(&revoking),
    );
    recipes.push(Recipe {
        name: "rcgen: revocation".into(),
        chain: revoked.0,
        key: revoked.1,
        root: root_file.clone(),
        variants: vec![
            String::new(),
            format!("sslcrl='{}'", revoking.display()),
            format!("sslcrl='{}'", clean.display()),
            format!("sslcrl='{}'", unrelated.display()),
            format!("sslcrldir='{}'", crl_dir.display()),
        ],
    });
    recipes
}

/// A client verdict: `refused`, `plain` or the TLS version.
#[derive(Debug, Clone)]
struct Verdict {
    outcome: String,
    detail: String,
}

fn psql_verdict(conninfo: &str, home: &Path) -> Verdict {
    let output = Command::new(PSQL)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", home)
        .env("LC_ALL", "C")
        .args(["-X", "-A", "-t", "-d", conninfo, "-c", VERDICT_SQL])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {PSQL}: {e} (install postgresql-client-15)"));
    if output.status.success() {
        Verdict {
            outcome: String::from_utf8_lossy(&output.stdout).trim().to_string(),
            detail: String::new(),
        }
    } else {
        Verdict {
            outcome: "refused".into(),
            detail: String::from_utf8_lossy(&output.stderr)
                .trim()
                .replace('\n', " | "),
        }
    }
}

async fn our_verdict(conninfo: &str) -> Verdict {
    let config = match Config::parse(conninfo) {
        Ok(config) => config,
        Err(e) => {
            return Verdict {
                outcome: "refused".into(),
                detail: e.to_string(),
            }
        }
    };
    match SqlClient::connect(&config).await {
        Ok(mut client) => {
            let value = client.query_value(VERDICT_SQL).await;
            let _ = client.close().await;
            match value {
                Ok(Some(v)) => Verdict {
                    outcome: v,
                    detail: String::new(),
                },
                other => Verdict {
                    outcome: "error".into(),
                    detail: format!("{other:?}"),
                },
            }
        }
        Err(e) => Verdict {
            outcome: "refused".into(),
            detail: e.to_string().replace('\n', " | "),
        },
    }
}

/// Accepts any certificate and remembers the server's: to see which certificate the
/// server presents after a reload.
#[derive(Debug, Default)]
struct Capture(Mutex<Option<Vec<u8>>>);

impl ServerCertVerifier for Capture {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.0.lock().unwrap() = Some(end_entity.to_vec());
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The DER of the certificate the server presents now.
async fn served_certificate(port: u16) -> Vec<u8> {
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    socket
        .write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .unwrap();
    let mut answer = [0u8; 1];
    socket.read_exact(&mut answer).await.unwrap();
    assert_eq!(answer[0], b'S', "the server must accept TLS");
    let capture = Arc::new(Capture::default());
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(capture.clone())
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let _ = connector
        .connect(ServerName::try_from("probe.invalid").unwrap(), socket)
        .await;
    let der = capture.0.lock().unwrap().take();
    der.expect("the server presented no certificate")
}

fn first_cert_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .expect("a certificate in the chain")
        .unwrap()
        .to_vec()
}

async fn install(cluster: &Cluster, recipe: &Recipe) {
    cluster.set_server_certificate(&recipe.chain, &recipe.key);
    cluster.reload().await;
    assert_eq!(
        served_certificate(cluster.port()).await,
        first_cert_der(&recipe.chain),
        "after the reload the server must present the certificate of {:?}; server log:\n{}",
        recipe.name,
        cluster.log()
    );
}

async fn reset_versions(cluster: &Cluster) {
    cluster
        .execute("ALTER SYSTEM RESET ssl_max_protocol_version")
        .await;
    cluster
        .execute("ALTER SYSTEM RESET ssl_min_protocol_version")
        .await;
}

struct Row {
    group: String,
    options: String,
    mode: String,
    host: String,
    psql: Verdict,
    ours: Verdict,
}

async fn compare(
    rows: &mut Vec<Row>,
    home: &Path,
    group: &str,
    conninfo: String,
    mode: &str,
    host: &str,
    options: &str,
) {
    let (psql, ours) = {
        let conninfo_psql = conninfo.clone();
        let home = home.to_path_buf();
        let psql = tokio::task::spawn_blocking(move || psql_verdict(&conninfo_psql, &home));
        let ours = our_verdict(&conninfo).await;
        (psql.await.unwrap(), ours)
    };
    rows.push(Row {
        group: group.to_string(),
        options: options.to_string(),
        mode: mode.to_string(),
        host: host.to_string(),
        psql,
        ours,
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_verdict_matches_libpq() {
    let started = Instant::now();
    assert!(
        Path::new(PSQL).exists(),
        "{PSQL} (psql 15, libpq with OpenSSL) is the oracle of this test: install postgresql-client-15"
    );
    assert!(
        Path::new(OPENSSL).exists(),
        "{OPENSSL} is needed: install openssl"
    );
    // Both clients must see the same ~/.postgresql: psql gets an empty home, so this
    // process must not have default certificates either.
    if let Some(home) = std::env::var_os("HOME") {
        let dot = Path::new(&home).join(".postgresql");
        assert!(
            !dot.exists(),
            "{} exists; its root.crt/root.crl/postgresql.crt would change this client's verdicts but not psql's (which runs with an empty HOME): move it away for this test",
            dot.display()
        );
    }
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let home = dir.join("home");
    std::fs::create_dir(&home).unwrap();

    let cluster = Cluster::start(ClusterOptions::new().tls(true));
    let port = cluster.port();
    let mut recipes = openssl_recipes(dir);
    recipes.extend(rcgen_recipes(dir));

    let mut rows = Vec::new();
    for recipe in &recipes {
        install(&cluster, recipe).await;
        for options in &recipe.variants {
            for mode in MODES {
                for host in HOSTS {
                    let conninfo = format!(
                        "{host} port={port} user=postgres dbname=postgres connect_timeout=10 sslmode={mode} sslrootcert='{}' {options}",
                        recipe.root.display()
                    );
                    compare(
                        &mut rows,
                        &home,
                        &recipe.name,
                        conninfo,
                        mode,
                        host,
                        options,
                    )
                    .await;
                }
            }
        }
    }

    // Protocol version floors and ceilings, with a certificate both accept.
    let baseline = recipes
        .iter()
        .find(|r| r.name.starts_with("rcgen: SAN localhost"))
        .unwrap();
    install(&cluster, baseline).await;
    let version_rows = [
        ("server default", "ssl_min_protocol_version=TLSv1.3"),
        ("server default", "ssl_max_protocol_version=TLSv1.2"),
        (
            "server default",
            "ssl_min_protocol_version=TLSv1 ssl_max_protocol_version=TLSv1.2",
        ),
        ("server ssl_max_protocol_version=TLSv1.2", ""),
        (
            "server ssl_max_protocol_version=TLSv1.2",
            "ssl_min_protocol_version=TLSv1.3",
        ),
        (
            "server ssl_min_protocol_version=TLSv1.3",
            "ssl_max_protocol_version=TLSv1.2",
        ),
        (
            "server ssl_min_protocol_version=TLSv1.3",
            "ssl_min_protocol_version=TLSv1.2",
        ),
    ];
    let mut server_setting = "";
    for (server, client) in version_rows {
        if server != server_setting {
            reset_versions(&cluster).await;
            if let Some(setting) = server.strip_prefix("server ") {
                if let Some((name, value)) = setting.split_once('=') {
                    cluster
                        .execute(&format!("ALTER SYSTEM SET {name} = '{value}'"))
                        .await;
                }
            }
            cluster.reload().await;
            server_setting = server;
        }
        for mode in ["require", "verify-full"] {
            let host = HOSTS[0];
            let conninfo = format!(
                "{host} port={port} user=postgres dbname=postgres connect_timeout=10 sslmode={mode} sslrootcert='{}' {client}",
                baseline.root.display()
            );
            compare(&mut rows, &home, server, conninfo, mode, host, client).await;
        }
    }
    reset_versions(&cluster).await;
    cluster.reload().await;

    // The table.
    let mut table = String::new();
    let mut disagreements = Vec::new();
    let mut connected = 0;
    for row in &rows {
        let same = row.psql.outcome == row.ours.outcome;
        if row.ours.outcome != "refused" {
            connected += 1;
        }
        let _ = writeln!(
            table,
            "{} | {:<62} | {:<38} | {:<11} | {:<42} | psql {:<8} | ours {:<8}",
            if same { "  " } else { "!!" },
            row.group,
            row.options.split('/').next_back().unwrap_or(""),
            row.mode,
            row.host,
            row.psql.outcome,
            row.ours.outcome
        );
        if !same {
            disagreements.push(format!(
                "{} / {} / sslmode={} / {}:\n    psql: {} {}\n    ours: {} {}",
                row.group,
                row.options,
                row.mode,
                row.host,
                row.psql.outcome,
                row.psql.detail,
                row.ours.outcome,
                row.ours.detail
            ));
        }
    }
    println!(
        "{table}\n{} cases, {} connected, {} disagreements, server {}, {:.1} s",
        rows.len(),
        connected,
        disagreements.len(),
        cluster.version(),
        started.elapsed().as_secs_f64()
    );
    // The table must exercise both outcomes, or it proves nothing.
    assert!(
        connected > 50 && connected + 50 < rows.len(),
        "too one-sided a table:\n{table}"
    );
    assert!(
        disagreements.is_empty(),
        "{} verdicts differ from libpq's:\n{}",
        disagreements.len(),
        disagreements.join("\n")
    );
}
