//! Building the `BASE_BACKUP` command for each server version (pure).
//!
//! 13/14 only understand the old space-separated syntax; 15+ only the parenthesised one
//! (`repl_gram.y`, `basebackup.c : parse_basebackup_options()`).

use std::time::Duration;

use crate::error::{Error, Result};
use pgwire_repl::proto::frontend::quote_literal;

/// Whether and how the server sends a backup manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ManifestMode {
    /// Send a manifest (the default here, as in pg_basebackup).
    #[default]
    Yes,
    /// Send a manifest with every path hex-encoded (`Encoded-Path`).
    ForceEncode,
    /// No manifest: nothing can be verified.
    No,
}

/// The per-file checksum algorithm of the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum ChecksumAlgorithm {
    /// No checksums; only sizes are checked.
    None,
    /// CRC-32C (the default).
    #[default]
    Crc32c,
    /// SHA-224.
    Sha224,
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl ChecksumAlgorithm {
    /// The name PostgreSQL uses (`CRC32C`, `SHA256`, `NONE`, …).
    pub fn name(self) -> &'static str {
        match self {
            ChecksumAlgorithm::None => "NONE",
            ChecksumAlgorithm::Crc32c => "CRC32C",
            ChecksumAlgorithm::Sha224 => "SHA224",
            ChecksumAlgorithm::Sha256 => "SHA256",
            ChecksumAlgorithm::Sha384 => "SHA384",
            ChecksumAlgorithm::Sha512 => "SHA512",
        }
    }

    /// Parses a name in any case, as `pg_checksum_parse_type()` does.
    pub fn parse(name: &str) -> Option<ChecksumAlgorithm> {
        Some(match name.to_ascii_uppercase().as_str() {
            "NONE" => ChecksumAlgorithm::None,
            "CRC32C" => ChecksumAlgorithm::Crc32c,
            "SHA224" => ChecksumAlgorithm::Sha224,
            "SHA256" => ChecksumAlgorithm::Sha256,
            "SHA384" => ChecksumAlgorithm::Sha384,
            "SHA512" => ChecksumAlgorithm::Sha512,
            _ => return None,
        })
    }
}

/// A server-side compression method (PostgreSQL 15+).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionMethod {
    /// gzip (levels 1–9).
    Gzip,
    /// LZ4 frames (levels 0–12).
    Lz4,
    /// zstd (levels −131072…22; workers; long distance mode on 16+).
    Zstd,
}

impl CompressionMethod {
    fn name(self) -> &'static str {
        match self {
            CompressionMethod::Gzip => "gzip",
            CompressionMethod::Lz4 => "lz4",
            CompressionMethod::Zstd => "zstd",
        }
    }

    /// The archive-name suffix the server appends (`.gz`, `.lz4`, `.zst`).
    pub fn suffix(self) -> &'static str {
        match self {
            CompressionMethod::Gzip => ".gz",
            CompressionMethod::Lz4 => ".lz4",
            CompressionMethod::Zstd => ".zst",
        }
    }
}

/// Server-side compression of the archives (PostgreSQL 15+); the client decompresses as
/// the data streams in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerCompression {
    /// The method.
    pub method: CompressionMethod,
    /// The level, or the server's default.
    pub level: Option<i32>,
    /// zstd worker threads on the server.
    pub workers: Option<u32>,
    /// zstd long-distance matching (16+).
    pub long: bool,
}

impl ServerCompression {
    /// The method with the server's default level.
    pub fn new(method: CompressionMethod) -> ServerCompression {
        ServerCompression {
            method,
            level: None,
            workers: None,
            long: false,
        }
    }

    /// Sets the level.
    pub fn level(mut self, level: i32) -> ServerCompression {
        self.level = Some(level);
        self
    }
}

/// The checkpoint the server takes before the backup starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Checkpoint {
    /// As fast as possible (the default here, as `pg_basebackup -c fast`).
    #[default]
    Fast,
    /// Spread out over `checkpoint_completion_target` — the first reply can take minutes.
    Spread,
}

/// The options of one `BASE_BACKUP` command.
///
/// ```
/// use basebackup::{BackupOptions, build_command};
/// let opts = BackupOptions::default().label("nightly").wal(true);
/// assert_eq!(
///     build_command(&opts, 15).unwrap(),
///     "BASE_BACKUP ( LABEL 'nightly', PROGRESS, CHECKPOINT 'fast', WAL, WAIT false, MANIFEST 'yes', MANIFEST_CHECKSUMS 'CRC32C', TARGET 'client' )"
/// );
/// assert_eq!(
///     build_command(&opts, 14).unwrap(),
///     "BASE_BACKUP LABEL 'nightly' PROGRESS FAST WAL NOWAIT MANIFEST 'yes' MANIFEST_CHECKSUMS 'CRC32C'"
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupOptions {
    /// The label written to `backup_label`.
    pub label: String,
    /// Ask the server to estimate the sizes first (needed for a progress total).
    pub progress: bool,
    /// Fast or spread checkpoint.
    pub checkpoint: Checkpoint,
    /// Include the WAL needed for consistency in `base.tar` (`-X fetch`).
    pub wal: bool,
    /// Wait for the last WAL segment to be archived; `false` (the default) when the WAL is
    /// fetched or streamed by the client.
    pub wait: bool,
    /// Server-side throttling in kB/s (32…1048576).
    pub max_rate: Option<u32>,
    /// Send `tablespace_map` instead of `pg_tblspc` links.
    pub tablespace_map: bool,
    /// Let the server verify page checksums (when the cluster has them).
    pub verify_checksums: bool,
    /// The manifest mode.
    pub manifest: ManifestMode,
    /// The manifest's per-file checksum algorithm.
    pub manifest_checksums: ChecksumAlgorithm,
    /// Server-side compression (15+).
    pub compression: Option<ServerCompression>,
    /// Server-side compression exactly as a user typed it: the algorithm name and, when
    /// given, the detail (`level=3,workers=2`), sent as `COMPRESSION` and
    /// `COMPRESSION_DETAIL` instead of the text built from [`BackupOptions::compression`],
    /// so that the server checks the specification and reports a mistake in its own
    /// words (as `pg_basebackup --compress server-…` passes it through unparsed).
    /// [`BackupOptions::compression`] must still name the method, for decoding.
    pub compression_as_given: Option<(String, Option<String>)>,
    /// Where the server puts the backup (15+): `None` sends it to this client (`TARGET
    /// 'client'`); otherwise the target name and its detail, sent as `TARGET` and
    /// `TARGET_DETAIL` as given, e.g. `("server", Some("/srv/backups/1"))` to have the
    /// server write the archives itself, or `("blackhole", None)` to discard them (for
    /// testing). With a target, no archive data comes to the client: finish the backup
    /// with [`BaseBackup::finish_elsewhere`](crate::BaseBackup::finish_elsewhere).
    pub target: Option<(String, Option<String>)>,
    /// Send only what changed since the backup whose manifest was uploaded on the same
    /// connection (`INCREMENTAL`, 17+; see
    /// [`ReplicationClient::upload_manifest`](pgwire_repl::ReplicationClient::upload_manifest)).
    pub incremental: bool,
    /// Fail with a `Timeout` error when the server sends nothing for this long during the
    /// copy (each read of the archive and manifest stream). A healthy server never pauses
    /// that long mid-copy, even with `max_rate`; without a limit a stalled server or link
    /// would hang the backup forever. Default 300 s (`DEFAULT_IDLE_TIMEOUT`); `None` waits
    /// forever, as pg_basebackup does. Not applied while the server takes its checkpoint
    /// or sizes the tablespaces, which can legitimately take longer. Not sent to the server.
    pub idle_timeout: Option<Duration>,
}

/// The default idle timeout of the copy (the `idle_timeout` field of [`BackupOptions`]):
/// 300 s.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

impl Default for BackupOptions {
    fn default() -> BackupOptions {
        BackupOptions {
            label: "pgrepl base backup".into(),
            progress: true,
            checkpoint: Checkpoint::Fast,
            wal: false,
            wait: false,
            max_rate: None,
            tablespace_map: false,
            verify_checksums: true,
            manifest: ManifestMode::Yes,
            manifest_checksums: ChecksumAlgorithm::Crc32c,
            compression: None,
            compression_as_given: None,
            target: None,
            incremental: false,
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
        }
    }
}

impl BackupOptions {
    /// Sets the label.
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }
    /// Includes the WAL (`-X fetch`).
    pub fn wal(mut self, on: bool) -> Self {
        self.wal = on;
        self
    }
    /// Sets the server-side rate limit in kB/s.
    pub fn max_rate(mut self, kb_per_s: u32) -> Self {
        self.max_rate = Some(kb_per_s);
        self
    }
    /// Sets the manifest checksum algorithm.
    pub fn manifest_checksums(mut self, alg: ChecksumAlgorithm) -> Self {
        self.manifest_checksums = alg;
        self
    }
    /// Sets server-side compression (15+).
    pub fn compression(mut self, c: ServerCompression) -> Self {
        self.compression = Some(c);
        self
    }
    /// Sets the idle timeout of the copy (`None`: wait forever).
    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.idle_timeout = timeout;
        self
    }
}

/// Builds the `BASE_BACKUP` command text for a server of major version `server_major`.
///
/// Fails with a `Usage` error for invalid option values and `Unsupported` for options
/// the server version lacks (server-side compression before 15, `long` before 16).
pub fn build_command(opts: &BackupOptions, server_major: u32) -> Result<String> {
    if let Some(rate) = opts.max_rate {
        if !(32..=1_048_576).contains(&rate) {
            return Err(Error::usage(
                format!("max rate {rate} kB/s is out of range"),
                "use a value from 32 to 1048576 kB/s, or no limit",
            ));
        }
    }
    if opts.manifest == ManifestMode::No && opts.manifest_checksums != ChecksumAlgorithm::Crc32c {
        return Err(Error::usage(
            "a manifest checksum algorithm was chosen but the manifest is off",
            "turn the manifest on or keep the default algorithm",
        ));
    }
    let manifest = match opts.manifest {
        ManifestMode::Yes => "yes",
        ManifestMode::ForceEncode => "force-encode",
        ManifestMode::No => "no",
    };
    if opts.incremental && server_major < 17 {
        return Err(Error::unsupported("incremental backups", 17, server_major));
    }
    if server_major < 15 {
        if opts.target.is_some() {
            return Err(Error::unsupported("backup targets", 15, server_major));
        }
        if opts.compression.is_some() || opts.compression_as_given.is_some() {
            return Err(Error::unsupported(
                "server-side compression",
                15,
                server_major,
            ));
        }
        let mut cmd = format!("BASE_BACKUP LABEL {}", quote_literal(&opts.label));
        if opts.progress {
            cmd.push_str(" PROGRESS");
        }
        if opts.checkpoint == Checkpoint::Fast {
            cmd.push_str(" FAST");
        }
        if opts.wal {
            cmd.push_str(" WAL");
        }
        if !opts.wait {
            cmd.push_str(" NOWAIT");
        }
        if let Some(rate) = opts.max_rate {
            cmd.push_str(&format!(" MAX_RATE {rate}"));
        }
        if opts.tablespace_map {
            cmd.push_str(" TABLESPACE_MAP");
        }
        if !opts.verify_checksums {
            cmd.push_str(" NOVERIFY_CHECKSUMS");
        }
        cmd.push_str(&format!(" MANIFEST '{manifest}'"));
        if opts.manifest != ManifestMode::No {
            cmd.push_str(&format!(
                " MANIFEST_CHECKSUMS '{}'",
                opts.manifest_checksums.name()
            ));
        }
        return Ok(cmd);
    }
    let mut parts = vec![format!("LABEL {}", quote_literal(&opts.label))];
    if opts.progress {
        parts.push("PROGRESS".into());
    }
    parts.push(match opts.checkpoint {
        Checkpoint::Fast => "CHECKPOINT 'fast'".into(),
        Checkpoint::Spread => "CHECKPOINT 'spread'".into(),
    });
    if opts.wal {
        parts.push("WAL".into());
    }
    parts.push(format!("WAIT {}", opts.wait));
    if let Some(rate) = opts.max_rate {
        parts.push(format!("MAX_RATE {rate}"));
    }
    if opts.tablespace_map {
        parts.push("TABLESPACE_MAP".into());
    }
    if !opts.verify_checksums {
        parts.push("VERIFY_CHECKSUMS false".into());
    }
    parts.push(format!("MANIFEST '{manifest}'"));
    if opts.manifest != ManifestMode::No {
        parts.push(format!(
            "MANIFEST_CHECKSUMS '{}'",
            opts.manifest_checksums.name()
        ));
    }
    match &opts.target {
        None => parts.push("TARGET 'client'".into()),
        Some((name, detail)) => {
            parts.push(format!("TARGET {}", quote_literal(name)));
            if let Some(detail) = detail {
                parts.push(format!("TARGET_DETAIL {}", quote_literal(detail)));
            }
        }
    }
    if opts.incremental {
        parts.push("INCREMENTAL".into());
    }
    if let Some((algorithm, detail)) = &opts.compression_as_given {
        parts.push(format!("COMPRESSION {}", quote_literal(algorithm)));
        if let Some(detail) = detail {
            parts.push(format!("COMPRESSION_DETAIL {}", quote_literal(detail)));
        }
    } else if let Some(c) = &opts.compression {
        parts.push(format!("COMPRESSION '{}'", c.method.name()));
        let mut detail = Vec::new();
        if let Some(level) = c.level {
            detail.push(format!("level={level}"));
        }
        if let Some(workers) = c.workers {
            if c.method != CompressionMethod::Zstd {
                return Err(Error::usage(
                    format!("{} does not support workers", c.method.name()),
                    "workers apply to zstd only",
                ));
            }
            detail.push(format!("workers={workers}"));
        }
        if c.long {
            if c.method != CompressionMethod::Zstd {
                return Err(Error::usage(
                    format!("{} does not support long-distance mode", c.method.name()),
                    "long applies to zstd only",
                ));
            }
            if server_major < 16 {
                return Err(Error::unsupported(
                    "zstd long-distance mode",
                    16,
                    server_major,
                ));
            }
            detail.push("long".into());
        }
        if !detail.is_empty() {
            parts.push(format!("COMPRESSION_DETAIL '{}'", detail.join(",")));
        }
    }
    Ok(format!("BASE_BACKUP ( {} )", parts.join(", ")))
}

#[cfg(test)]
mod tests {

    #[test]
    fn compression_as_given_is_sent_verbatim() {
        let opts = BackupOptions {
            compression_as_given: Some(("gzip".into(), Some("level=236".into()))),
            ..BackupOptions::default()
        };
        let cmd = build_command(&opts, 15).unwrap();
        assert!(
            cmd.contains("COMPRESSION 'gzip', COMPRESSION_DETAIL 'level=236'"),
            "{cmd}"
        );
        let opts = BackupOptions {
            compression_as_given: Some(("it's".into(), None)),
            ..BackupOptions::default()
        };
        assert!(build_command(&opts, 16)
            .unwrap()
            .contains("COMPRESSION 'it''s'"));
        assert!(build_command(&opts, 14).is_err());
    }

    #[test]
    fn targets() {
        let opts = BackupOptions {
            target: Some(("server".into(), Some("/srv/b".into()))),
            ..BackupOptions::default()
        };
        let cmd = build_command(&opts, 15).unwrap();
        assert!(
            cmd.contains("TARGET 'server', TARGET_DETAIL '/srv/b'"),
            "{cmd}"
        );
        assert!(!cmd.contains("'client'"));
        assert!(build_command(&opts, 14).is_err());
    }

    use super::*;

    #[test]
    fn old_syntax_all_options() {
        let opts = BackupOptions {
            label: "it's".into(),
            progress: false,
            checkpoint: Checkpoint::Spread,
            wal: true,
            wait: true,
            max_rate: Some(32),
            tablespace_map: true,
            verify_checksums: false,
            manifest: ManifestMode::ForceEncode,
            manifest_checksums: ChecksumAlgorithm::Sha512,
            compression: None,
            compression_as_given: None,
            target: None,
            incremental: false,
            idle_timeout: None,
        };
        assert_eq!(
            build_command(&opts, 13).unwrap(),
            "BASE_BACKUP LABEL 'it''s' WAL MAX_RATE 32 TABLESPACE_MAP NOVERIFY_CHECKSUMS MANIFEST 'force-encode' MANIFEST_CHECKSUMS 'SHA512'"
        );
    }

    #[test]
    fn incremental_needs_17() {
        let opts = BackupOptions {
            compression_as_given: None,
            target: None,
            incremental: true,
            ..BackupOptions::default()
        };
        assert!(build_command(&opts, 17)
            .unwrap()
            .ends_with("TARGET 'client', INCREMENTAL )"));
        assert_eq!(
            build_command(&opts, 16).unwrap_err().kind(),
            crate::ErrorKind::Unsupported
        );
    }

    #[test]
    fn new_syntax_compression() {
        let mut c = ServerCompression::new(CompressionMethod::Zstd).level(5);
        c.workers = Some(2);
        c.long = true;
        let opts = BackupOptions {
            manifest: ManifestMode::No,
            ..BackupOptions::default()
        }
        .compression(c)
        .max_rate(100);
        assert_eq!(
            build_command(&opts, 16).unwrap(),
            "BASE_BACKUP ( LABEL 'pgrepl base backup', PROGRESS, CHECKPOINT 'fast', WAIT false, MAX_RATE 100, MANIFEST 'no', TARGET 'client', COMPRESSION 'zstd', COMPRESSION_DETAIL 'level=5,workers=2,long' )"
        );
        assert_eq!(
            build_command(&opts, 15).unwrap_err().kind(),
            crate::ErrorKind::Unsupported
        );
        let e = build_command(&opts, 14).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Unsupported);
        assert!(e.to_string().contains("server-side compression"), "{e}");
    }

    #[test]
    fn rejects_bad_values() {
        let opts = BackupOptions::default().max_rate(31);
        assert_eq!(
            build_command(&opts, 15).unwrap_err().kind(),
            crate::ErrorKind::Usage
        );
        let mut c = ServerCompression::new(CompressionMethod::Gzip);
        c.workers = Some(2);
        let opts = BackupOptions::default().compression(c);
        assert_eq!(
            build_command(&opts, 15).unwrap_err().kind(),
            crate::ErrorKind::Usage
        );
    }

    #[test]
    fn checksum_names() {
        assert_eq!(
            ChecksumAlgorithm::parse("sha256"),
            Some(ChecksumAlgorithm::Sha256)
        );
        assert_eq!(ChecksumAlgorithm::parse("bogus"), None);
    }
}
