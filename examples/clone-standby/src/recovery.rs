//! Standby configuration, following `pg_basebackup -R`: `standby.signal` plus
//! `primary_conninfo` (and `primary_slot_name`) appended to `postgresql.auto.conf`.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use pgwire_repl::config::{Config, ReplicationMode, SslNegotiation};

/// Builds the `primary_conninfo` value from the connection the clone used, keeping only
/// options the standby's own server version (`standby_major`) understands.
pub fn primary_conninfo(source: &Config, standby_major: u32) -> String {
    let mut config = source.clone();
    // The walreceiver sets these itself, as pg_basebackup -R leaves them out.
    config.replication = ReplicationMode::Off;
    config.dbname = None;
    config.fallback_application_name = None;
    if standby_major < 17 {
        config.ssl_negotiation = SslNegotiation::Postgres;
    }
    if standby_major < 16 && config.ssl_root_cert.as_deref() == Some(Path::new("system")) {
        config.ssl_root_cert = None;
    }
    config.to_conninfo_string()
}

/// Quotes a value for postgresql.conf: single quotes, with `'` and `\` doubled, as
/// PostgreSQL's own `escape_quotes` does.
pub fn quote_guc(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            out.push(c);
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// The lines appended to `postgresql.auto.conf`.
///
/// `primary_slot_name` is always written, empty without a slot: a clone of a standby
/// (cascading) copies that standby's `postgresql.auto.conf`, whose own
/// `primary_slot_name` names a slot on *its* upstream; the last setting in the file
/// wins, so the clone never inherits it.
pub fn auto_conf_lines(conninfo: &str, slot: Option<&str>) -> String {
    let mut lines = String::from("# Written by clone-standby\n");
    lines.push_str(&format!("primary_conninfo = {}\n", quote_guc(conninfo)));
    lines.push_str(&format!(
        "primary_slot_name = {}\n",
        quote_guc(slot.unwrap_or(""))
    ));
    lines
}

/// Writes `standby.signal` and appends the settings to `postgresql.auto.conf`, which is
/// left with mode 0600 because `primary_conninfo` may hold a password.
pub fn write_standby_config(
    data_dir: &Path,
    conninfo: &str,
    slot: Option<&str>,
) -> std::io::Result<()> {
    fs::write(data_dir.join("standby.signal"), b"")?;
    let auto_conf = data_dir.join("postgresql.auto.conf");
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&auto_conf)?;
    file.write_all(auto_conf_lines(conninfo, slot).as_bytes())?;
    file.sync_all()?;
    fs::set_permissions(
        &auto_conf,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conninfo_keeps_credentials_and_tls_but_not_replication() {
        let source = Config::parse(
            "host=db1 port=5433 user=repl password='pa ss\\'w' sslmode=verify-full sslrootcert=/etc/ca.crt replication=true dbname=replication sslnegotiation=direct",
        )
        .unwrap();
        let for_16 = primary_conninfo(&source, 16);
        let parsed = Config::parse(&for_16).unwrap();
        assert_eq!(parsed.password.as_deref(), Some("pa ss'w"));
        assert_eq!(parsed.replication, ReplicationMode::Off);
        assert_eq!(parsed.dbname, None);
        assert_eq!(
            parsed.ssl_negotiation,
            SslNegotiation::Postgres,
            "16 does not know sslnegotiation"
        );
        assert!(!for_16.contains("sslnegotiation"));
        let for_17 = primary_conninfo(&source, 17);
        assert!(for_17.contains("sslnegotiation"));
    }

    #[test]
    fn guc_quoting_doubles_quotes_and_backslashes() {
        assert_eq!(quote_guc(r"a'b\c"), r"'a''b\\c'");
        let lines = auto_conf_lines("user=x password='it\\'s'", Some("s1"));
        assert!(
            lines.contains(r"primary_conninfo = 'user=x password=''it\\''s'''"),
            "{lines}"
        );
        assert!(lines.contains("primary_slot_name = 's1'"));
        // Without a slot, an inherited primary_slot_name is overridden.
        assert!(auto_conf_lines("user=x", None).ends_with("primary_slot_name = ''\n"));
    }
}
