//! libpq's host-name check for `sslmode=verify-full`
//! (`pq_verify_peer_name_matches_certificate` in `fe-secure-common.c` and
//! `pgtls_verify_peer_name_matches_certificate_guts` in `fe-secure-openssl.c`).
//!
//! * The host is the `host` connection option, never `hostaddr`.
//! * A host that parses as an IPv4 address (with `inet_aton`, so `127.1` counts) or an
//!   IPv6 address is an IP host; anything else is a DNS host.
//! * Every subjectAltName is examined in order: dNSName entries are compared with the
//!   host as text, iPAddress entries as addresses. The first match (or error) ends the
//!   search.
//! * The subject's first commonName is compared only when the certificate has no
//!   subjectAltName of the host's kind (dNSName for a DNS host, iPAddress for an IP
//!   host), and nothing matched before.
//! * Text comparison ignores ASCII case. A name of the form `*.rest` matches a host
//!   that ends in `.rest` and has no other dot before it, so the `*` stands for exactly
//!   one whole, non-empty, left-most label. A `*` anywhere else is an ordinary
//!   character.
//! * A name with an embedded NUL byte, or an iPAddress that is neither 4 nor 16 bytes
//!   long, is an error.

use std::net::Ipv6Addr;

use super::x509::{AltName, Cert};

/// Checks `host` against the certificate the way libpq does. The error is libpq's
/// message (or close to it).
pub(crate) fn check(cert: &Cert, host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("host name must be specified for a verified SSL connection".into());
    }
    let host_is_ip = inet_aton(host).is_some() || host.parse::<Ipv6Addr>().is_ok();
    let mut names: Vec<String> = Vec::new();
    let mut check_cn = true;
    let mut matched = false;
    for alt in cert.ext.alt_names.iter().flatten() {
        let outcome = match alt {
            AltName::Dns(name) => {
                if !host_is_ip {
                    check_cn = false;
                }
                names.push(String::from_utf8_lossy(name).into_owned());
                name_matches(name, host)?
            }
            AltName::Ip(ip) => {
                if host_is_ip {
                    check_cn = false;
                }
                names.push(show_ip(ip));
                ip_matches(ip, host)?
            }
            AltName::Other => false,
        };
        if outcome {
            matched = true;
            break;
        }
    }
    if !matched && check_cn {
        if let Some(cn) = cert.first_common_name() {
            names.push(String::from_utf8_lossy(cn).into_owned());
            matched = name_matches(cn, host)?;
        }
    }
    if matched {
        return Ok(());
    }
    Err(match names.as_slice() {
        [] => "could not get server's host name from server certificate".to_string(),
        [one] => format!("server certificate for \"{one}\" does not match host name \"{host}\""),
        [first, rest @ ..] => format!(
            "server certificate for \"{first}\" (and {} other name{}) does not match host name \"{host}\"",
            rest.len(),
            if rest.len() == 1 { "" } else { "s" }
        ),
    })
}

/// libpq's `pq_verify_peer_name_matches_certificate_name`: exact (ASCII
/// case-insensitive) or wildcard match; an embedded NUL is an error.
pub(crate) fn name_matches(name: &[u8], host: &str) -> Result<bool, String> {
    if name.contains(&0) {
        return Err("SSL certificate's name contains embedded null".into());
    }
    let host = host.as_bytes();
    Ok(name.eq_ignore_ascii_case(host) || wildcard_matches(name, host))
}

/// libpq's `wildcard_certificate_match`.
fn wildcard_matches(pattern: &[u8], host: &[u8]) -> bool {
    let (lenpat, lenstr) = (pattern.len(), host.len());
    if lenpat < 3 || pattern[0] != b'*' || pattern[1] != b'.' || lenpat > lenstr {
        return false;
    }
    // The host must end with the pattern minus its '*'.
    let start = lenstr - lenpat + 1;
    if !pattern[1..].eq_ignore_ascii_case(&host[start..]) {
        return false;
    }
    // No dot may come before the part the '*' stands for (one label only).
    let first_dot = host.iter().position(|&c| c == b'.').unwrap_or(lenstr);
    first_dot >= lenstr - lenpat
}

/// libpq's `pq_verify_peer_name_matches_certificate_ip`.
fn ip_matches(ip: &[u8], host: &str) -> Result<bool, String> {
    match ip.len() {
        4 => Ok(inet_aton(host).is_some_and(|addr| addr == ip)),
        16 => Ok(host
            .parse::<Ipv6Addr>()
            .is_ok_and(|addr| addr.octets() == ip)),
        n => Err(format!(
            "certificate contains IP address with invalid length {n}"
        )),
    }
}

fn show_ip(ip: &[u8]) -> String {
    if let Ok(v4) = <[u8; 4]>::try_from(ip) {
        std::net::Ipv4Addr::from(v4).to_string()
    } else if let Ok(v6) = <[u8; 16]>::try_from(ip) {
        Ipv6Addr::from(v6).to_string()
    } else {
        format!("(an IP address of {} bytes)", ip.len())
    }
}

/// glibc's `inet_aton`: one to four parts separated by dots, each decimal, octal
/// (leading `0`) or hexadecimal (`0x`), the last part filling the remaining bytes;
/// anything after white space is ignored.
pub(crate) fn inet_aton(text: &str) -> Option<[u8; 4]> {
    let text = text
        .split(|c: char| c.is_ascii_whitespace())
        .next()
        .unwrap_or("");
    let mut parts: Vec<u64> = Vec::with_capacity(4);
    let mut last_without_digits = false;
    for part in text.split('.') {
        if parts.len() == 4 {
            return None;
        }
        let (digits, radix) =
            if let Some(hex) = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
                (hex, 16)
            } else if part.len() > 1 && part.starts_with('0') {
                (&part[1..], 8)
            } else {
                (part, 10)
            };
        if part.is_empty() {
            return None;
        }
        // glibc wants a digit in the last part; "0x" alone has none.
        last_without_digits = radix == 16 && digits.is_empty();
        let value = if digits.is_empty() {
            0
        } else {
            if !digits.chars().all(|c| c.is_digit(radix)) {
                return None;
            }
            u64::from_str_radix(digits, radix).ok()?
        };
        if value > u64::from(u32::MAX) {
            return None;
        }
        parts.push(value);
    }
    if last_without_digits {
        return None;
    }
    let (last, front) = parts.split_last()?;
    let mut value: u64 = 0;
    for (i, &part) in front.iter().enumerate() {
        if part > 255 {
            return None;
        }
        value |= part << (24 - 8 * i);
    }
    let room = 32 - 8 * front.len();
    if room < 32 && *last >= (1u64 << room) {
        return None;
    }
    value |= *last;
    Some(u32::try_from(value).ok()?.to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inet_aton_accepts_what_glibc_accepts() {
        assert_eq!(inet_aton("127.0.0.1"), Some([127, 0, 0, 1]));
        assert_eq!(inet_aton("127.1"), Some([127, 0, 0, 1]));
        assert_eq!(inet_aton("10.1.2"), Some([10, 1, 0, 2]));
        assert_eq!(inet_aton("0x7f.0.0.1"), Some([127, 0, 0, 1]));
        assert_eq!(inet_aton("0177.0.0.1"), Some([127, 0, 0, 1]));
        assert_eq!(inet_aton("2130706433"), Some([127, 0, 0, 1]));
        assert_eq!(inet_aton("127.0.0.1 trailing"), Some([127, 0, 0, 1]));
        assert_eq!(inet_aton("0"), Some([0, 0, 0, 0]));
        assert_eq!(inet_aton("0x.1"), Some([0, 0, 0, 1]));
        for bad in [
            "",
            "localhost",
            "1.2.3.4.5",
            "256.0.0.1",
            "1.2.3.256",
            "1..2",
            "08.1.1.1",
            "1.2.3.4.",
            "1.65536.1",
            "4294967296",
            "db1.example.com",
            "::1",
            "0x",
            "1.0x",
        ] {
            assert_eq!(inet_aton(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn wildcards_follow_libpq() {
        let yes = [
            ("*.example.com", "db.example.com"),
            ("*.EXAMPLE.com", "DB.example.COM"),
            ("*.com", "example.com"),
            ("*.example.com", "x.example.com"),
        ];
        for (pattern, host) in yes {
            assert!(
                name_matches(pattern.as_bytes(), host).unwrap(),
                "{pattern} {host}"
            );
        }
        let no = [
            ("*.example.com", "a.b.example.com"),
            ("*.example.com", "example.com"),
            ("*.example.com", ".example.com"),
            ("*.example.com", "db.example.org"),
            ("db*.example.com", "db1.example.com"),
            ("*", "localhost"),
            ("*.", "a."),
            ("a.*.example.com", "a.b.example.com"),
            ("*example.com", "myexample.com"),
        ];
        for (pattern, host) in no {
            assert!(
                !name_matches(pattern.as_bytes(), host).unwrap(),
                "{pattern} {host}"
            );
        }
        // A literal '*' host matches a literal name.
        assert!(name_matches(b"db*.example.com", "DB*.example.com").unwrap());
        assert!(name_matches(b"db\0.example.com", "db").is_err());
    }

    #[test]
    fn ip_entries_compare_addresses() {
        assert!(ip_matches(&[127, 0, 0, 1], "127.0.0.1").unwrap());
        assert!(ip_matches(&[127, 0, 0, 1], "127.1").unwrap());
        assert!(!ip_matches(&[127, 0, 0, 2], "127.0.0.1").unwrap());
        assert!(!ip_matches(&[127, 0, 0, 1], "localhost").unwrap());
        let v6 = "::1".parse::<Ipv6Addr>().unwrap().octets();
        assert!(ip_matches(&v6, "::1").unwrap());
        assert!(ip_matches(&v6, "0:0:0:0:0:0:0:1").unwrap());
        assert!(!ip_matches(&v6, "127.0.0.1").unwrap());
        assert!(ip_matches(&[1, 2, 3], "1.2.3.4").is_err());
    }
}
