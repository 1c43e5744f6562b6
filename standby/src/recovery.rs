//! Standby configuration, following `pg_basebackup -R`: `standby.signal` plus
//! `primary_conninfo` (and `primary_slot_name`) appended to `postgresql.auto.conf`.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use pgwire_repl::config::{
    Config, LoadBalanceHosts, ReplicationMode, SslNegotiation, TargetSessionAttrs,
};

/// Builds the `primary_conninfo` value from the connection the clone used, keeping only
/// options the standby's own server version (`standby_major`) understands.
///
/// A host list is kept with its `target_session_attrs` and `load_balance_hosts`, so
/// that the standby's WAL receiver finds the primary after a failover as the clone did.
/// The service name is not written: its options are (the standby's server may not
/// have the service file). Options the standby's libpq does not know are left out with
/// a warning: `load_balance_hosts` and `require_auth` before 16, and
/// `target_session_attrs` other than `any` and `read-write` before 14 (where `primary`
/// becomes `read-write`, its closest older equivalent).
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
    if standby_major < 16 {
        if config.load_balance_hosts == LoadBalanceHosts::Random {
            tracing::warn!("primary_conninfo: load_balance_hosts=random left out: the standby's PostgreSQL {standby_major} does not know it (16+), so its WAL receiver tries the hosts in order");
            config.load_balance_hosts = LoadBalanceHosts::Disable;
        }
        if let Some(policy) = config.require_auth.take() {
            tracing::warn!("primary_conninfo: require_auth={policy} left out: the standby's PostgreSQL {standby_major} does not know it (16+), so its WAL receiver will answer any authentication method the upstream asks for; restrict the method in the upstream's pg_hba.conf instead");
        }
    }
    if standby_major < 14 {
        let attrs = config.target_session_attrs;
        let replacement = match attrs {
            TargetSessionAttrs::Any | TargetSessionAttrs::ReadWrite => attrs,
            TargetSessionAttrs::Primary => TargetSessionAttrs::ReadWrite,
            _ => TargetSessionAttrs::Any,
        };
        if replacement != attrs {
            tracing::warn!(
                "primary_conninfo: target_session_attrs={} written as {}: the standby's PostgreSQL {standby_major} knows only any and read-write (the others need 14+)",
                attrs.as_str(),
                replacement.as_str()
            );
            config.target_session_attrs = replacement;
        }
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
    append_auto_conf(data_dir, &auto_conf_lines(conninfo, slot))
}

/// The lines of recovery settings (`restore_command`, `recovery_target_lsn`, …) for
/// `postgresql.auto.conf`, each value quoted with [`quote_guc`].
///
/// ```
/// let lines = standby::recovery::settings_lines(&[("recovery_target_action", "promote")]);
/// assert_eq!(lines, "# Written by clone-standby\nrecovery_target_action = 'promote'\n");
/// ```
pub fn settings_lines(settings: &[(&str, &str)]) -> String {
    let mut lines = String::from("# Written by clone-standby\n");
    for (name, value) in settings {
        lines.push_str(&format!("{name} = {}\n", quote_guc(value)));
    }
    lines
}

/// Appends `lines` to `postgresql.auto.conf` (the last setting of a name wins), synced,
/// and leaves the file with mode 0600.
pub fn append_auto_conf(data_dir: &Path, lines: &str) -> std::io::Result<()> {
    let auto_conf = data_dir.join("postgresql.auto.conf");
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&auto_conf)?;
    file.write_all(lines.as_bytes())?;
    file.sync_all()?;
    fs::set_permissions(
        &auto_conf,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    Ok(())
}

/// Writes `recovery.signal` (targeted recovery, ending in the action of
/// `recovery_target_action`, or at the end of the archive) and appends `settings` to
/// `postgresql.auto.conf`. PostgreSQL 12 and later read both.
pub fn write_recovery_config(data_dir: &Path, settings: &[(&str, &str)]) -> std::io::Result<()> {
    fs::write(data_dir.join("recovery.signal"), b"")?;
    append_auto_conf(data_dir, &settings_lines(settings))
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
    fn host_lists_keep_their_routing_options_where_the_standby_knows_them() {
        let source = Config::parse(
            "host=a,b port=1,2 user=repl target_session_attrs=primary load_balance_hosts=random require_auth=scram-sha-256 replication=true",
        )
        .unwrap();
        let parsed = |major| Config::parse(&primary_conninfo(&source, major)).unwrap();
        let for_16 = parsed(16);
        assert_eq!(for_16.hosts.len(), 2);
        assert_eq!(for_16.target_session_attrs, TargetSessionAttrs::Primary);
        assert_eq!(for_16.load_balance_hosts, LoadBalanceHosts::Random);
        assert_eq!(for_16.require_auth.unwrap().as_str(), "scram-sha-256");
        let for_15 = parsed(15);
        assert_eq!(for_15.target_session_attrs, TargetSessionAttrs::Primary);
        assert_eq!(for_15.load_balance_hosts, LoadBalanceHosts::Disable);
        assert!(for_15.require_auth.is_none());
        let for_13 = parsed(13);
        assert_eq!(for_13.target_session_attrs, TargetSessionAttrs::ReadWrite);
        let standby = Config::parse("host=a,b target_session_attrs=prefer-standby").unwrap();
        let for_13 = primary_conninfo(&standby, 13);
        assert!(!for_13.contains("target_session_attrs"), "{for_13}");
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
