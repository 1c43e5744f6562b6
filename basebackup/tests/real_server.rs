//! Backups of real servers (PGREPL_TEST_PG=13…18): restore and compare, corruption,
//! max rate, server-side compression.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use basebackup::{
    BackupOptions, BaseBackup, ChecksumAlgorithm, CompressionMethod, ErrorKind, ManifestMode,
    PlainDirSink, ServerCompression, SinkOptions, TablespaceMapping, TarSink,
};
use pgwire_repl::ReplicationClient;
use testkit::{Cluster, ClusterOptions};

fn as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn give_to_server(path: &Path) {
    if as_root() {
        let status = std::process::Command::new("chown")
            .arg("-R")
            .arg("postgres:postgres")
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success());
    }
}

/// A temporary directory the server's OS user can traverse.
fn scratch() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("bbtest-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

const QUERY: &str = "SELECT count(*)::text || ':' || sum(hashtext(t::text))::text FROM ";

async fn source_with_tablespace() -> (Cluster, PathBuf) {
    let cluster = Cluster::start(ClusterOptions::new());
    let ts = cluster.base_dir().join("ts1");
    std::fs::create_dir(&ts).unwrap();
    give_to_server(&ts);
    cluster
        .execute(&format!(
            "CREATE TABLESPACE ts1 LOCATION '{}'",
            ts.display()
        ))
        .await;
    cluster
        .execute("CREATE TABLE t AS SELECT g, md5(g::text) AS s FROM generate_series(1, 20000) g")
        .await;
    cluster
        .execute("CREATE TABLE tts TABLESPACE ts1 AS SELECT g, repeat(g::text, 5) AS s FROM generate_series(1, 5000) g")
        .await;
    cluster.execute("CHECKPOINT").await;
    (cluster, ts)
}

async fn fingerprint(c: &Cluster) -> (String, String) {
    (
        c.query_value(&format!("{QUERY} t t")).await.unwrap(),
        c.query_value(&format!("{QUERY} tts t")).await.unwrap(),
    )
}

fn no_sync() -> SinkOptions {
    SinkOptions {
        no_sync: true,
        ..SinkOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_and_tar_backups_restore_and_match() {
    let (source, ts) = source_with_tablespace().await;
    let expected = fingerprint(&source).await;
    let work = scratch();

    // Plain, with the tablespace mapped, WAL fetched, fsync on, progress reported.
    let data = work.path().join("plain");
    let new_ts = work.path().join("plain_ts");
    let mut mapping = TablespaceMapping::default();
    mapping
        .parse_arg(&format!("{}={}", ts.display(), new_ts.display()))
        .unwrap();
    let client = ReplicationClient::connect(&source.config("postgres"))
        .await
        .unwrap();
    let mut backup = BaseBackup::start(client, BackupOptions::default().wal(true))
        .await
        .unwrap();
    assert!(!backup.start_lsn().is_invalid());
    assert_eq!(backup.read_tablespaces().await.unwrap().len(), 2);
    let reports = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let r2 = reports.clone();
    let started = Instant::now();
    let (result, _sink) = backup
        .receive(
            PlainDirSink::new(&data).tablespace_mapping(mapping),
            Some(Box::new(move |p: &basebackup::Progress| {
                r2.lock().unwrap().push(p.clone())
            })),
        )
        .await
        .unwrap();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "plain backup: {} bytes in {secs:.2} s ({:.0} MB/s)",
        result.bytes,
        result.bytes as f64 / secs / 1e6
    );
    assert!(result.end_lsn > result.start_lsn);
    let reports = reports.lock().unwrap().clone();
    let last = reports.last().unwrap();
    assert!(last.total_estimate.is_some());
    assert_eq!(last.archive, "base.tar");
    assert!(reports.iter().any(|p| p.tablespace.is_some()));
    assert!(data.join("backup_manifest").exists() && !data.join("backup_manifest.tmp").exists());
    let mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    let link = std::fs::read_dir(data.join("pg_tblspc"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert_eq!(std::fs::read_link(&link).unwrap(), new_ts);
    let manifest = basebackup::verify_backup(&data).unwrap();
    assert_eq!(manifest.version, if source.major() >= 17 { 2 } else { 1 });

    if source.major() == 15 {
        let out = std::process::Command::new("/usr/lib/postgresql/15/bin/pg_verifybackup")
            .arg(&data)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        eprintln!("pg_verifybackup: {text}");
        assert!(
            out.status.success() && text.contains("backup successfully verified"),
            "{text}"
        );
    }

    // Tar format with TABLESPACE_MAP, as pg_basebackup -Ft, client-side zstd.
    let tar_dir = work.path().join("tar");
    let opts = BackupOptions {
        tablespace_map: true,
        ..BackupOptions::default().wal(true)
    };
    let client = ReplicationClient::connect(&source.config("postgres"))
        .await
        .unwrap();
    let (tar_result, _) = BaseBackup::start(client, opts)
        .await
        .unwrap()
        .receive(
            Box::new(TarSink::new(&tar_dir).zstd(Some(1)).options(no_sync())),
            None,
        )
        .await
        .unwrap();
    let oid = tar_result
        .manifest
        .as_ref()
        .unwrap()
        .files
        .iter()
        .find_map(|f| {
            let p = String::from_utf8_lossy(&f.path).to_string();
            p.strip_prefix("pg_tblspc/")
                .map(|r| r.split('/').next().unwrap().to_string())
        });
    let oid = oid.unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&tar_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            format!("{oid}.tar.zst"),
            "backup_manifest".into(),
            "base.tar.zst".into()
        ]
    );
    // The archive ends with the tar trailer, also from 13/14 servers, which leave it out.
    let raw = zstd::stream::decode_all(std::fs::File::open(tar_dir.join("base.tar.zst")).unwrap())
        .unwrap();
    assert_eq!(raw.len() % 512, 0);
    assert!(raw[raw.len() - 1024..].iter().all(|&b| b == 0));
    let restored_tar = work.path().join("fromtar");
    let restored_ts = work.path().join("fromtar_ts");
    untar(&tar_dir.join("base.tar.zst"), &restored_tar);
    untar(&tar_dir.join(format!("{oid}.tar.zst")), &restored_ts);
    std::fs::write(
        restored_tar.join("tablespace_map"),
        format!("{oid} {}\n", restored_ts.display()),
    )
    .unwrap();
    // Not reachable through a link yet: the server creates it from tablespace_map.
    give_to_server(&restored_ts);

    // Start servers on both restored copies and compare.
    drop(reports);
    for dir in [&data, &restored_tar] {
        let restored = Cluster::start_on_data_dir(dir, ClusterOptions::new());
        assert_eq!(
            fingerprint(&restored).await,
            expected,
            "restored from {}",
            dir.display()
        );
    }
}

/// Reads a `.tar.zst`, `.tar.gz` or `.tar` archive, decompressed.
fn decompressing(archive: &Path) -> Box<dyn std::io::Read> {
    let file = std::fs::File::open(archive).unwrap();
    match archive.extension().and_then(|e| e.to_str()) {
        Some("zst") => Box::new(zstd::stream::read::Decoder::new(file).unwrap()),
        Some("gz") => Box::new(flate2::read::MultiGzDecoder::new(file)),
        Some("tar") => Box::new(file),
        other => panic!("{}: unexpected suffix {other:?}", archive.display()),
    }
}

fn untar(archive: &Path, into: &Path) {
    std::fs::create_dir_all(into).unwrap();
    let mut a = tar::Archive::new(decompressing(archive));
    a.set_preserve_permissions(true);
    a.unpack(into).unwrap();
}

/// Tar format with server-side compression keeps the archives as the server compressed
/// them (`base.tar.zst`, `<oid>.tar.zst`), as pg_basebackup does; the backup is verified
/// in the stream, without pg_verifybackup, and restores into a server that starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tar_with_server_compression_stores_the_compressed_archives() {
    let (source, _ts) = source_with_tablespace().await;
    let expected = fingerprint(&source).await;
    let work = scratch();
    let tar_dir = work.path().join("tar");
    let take = |method: CompressionMethod| {
        let opts = BackupOptions {
            tablespace_map: true,
            ..BackupOptions::default()
                .wal(true)
                .compression(ServerCompression::new(method).level(3))
        };
        let (config, tar_dir) = (source.config("postgres"), tar_dir.clone());
        async move {
            basebackup::backup(&config, opts, TarSink::new(&tar_dir).options(no_sync()))
                .await
                .map(|(result, _sink)| result)
        }
    };
    let result = match take(CompressionMethod::Zstd).await {
        Err(e) if source.major() < 15 => {
            // 13/14 cannot compress on the server; the refusal leaves nothing.
            assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
            assert!(!tar_dir.exists());
            eprintln!(
                "PostgreSQL {}: server compression refused as expected: {e}",
                source.major()
            );
            return;
        }
        // The embedded 16-18 server builds lack zstd (Debian's 15 has it): the refusal
        // must be a server error that leaves nothing, and gzip, which every build has,
        // shows the archives are stored as sent.
        Err(e)
            if source.major() != 15
                && e.to_string()
                    .contains("this build does not support compression") =>
        {
            assert_eq!(e.kind(), ErrorKind::Server, "{e}");
            assert!(
                !tar_dir.exists(),
                "a refused backup must leave no directory"
            );
            eprintln!(
                "PostgreSQL {}: zstd not in this server build ({e}); storing gzip instead",
                source.major()
            );
            (
                CompressionMethod::Gzip,
                take(CompressionMethod::Gzip).await.unwrap(),
            )
        }
        r => (
            CompressionMethod::Zstd,
            r.unwrap_or_else(|e| panic!("PostgreSQL {}: {e}", source.major())),
        ),
    };
    assert!(source.major() >= 15, "13/14 must refuse server compression");
    let (method, result) = result;
    assert!(source.major() != 15 || method == CompressionMethod::Zstd);
    // Verified against the manifest while streaming.
    let manifest = result.manifest.as_ref().unwrap();
    // (The received files also count the WAL, which the manifest does not list.)
    assert!(manifest.files.len() > 100 && result.files >= manifest.files.len());
    let oid = manifest
        .files
        .iter()
        .find_map(|f| {
            let p = String::from_utf8_lossy(&f.path).to_string();
            p.strip_prefix("pg_tblspc/")
                .map(|r| r.split('/').next().unwrap().to_string())
        })
        .unwrap();
    let suffix = method.suffix();
    let (base, ts_archive) = (format!("base.tar{suffix}"), format!("{oid}.tar{suffix}"));
    let mut names: Vec<String> = std::fs::read_dir(&tar_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut expected_names = vec![ts_archive.clone(), "backup_manifest".into(), base.clone()];
    expected_names.sort();
    assert_eq!(names, expected_names);

    // Much smaller than the data, and a valid tar archive once decompressed.
    let compressed = std::fs::metadata(tar_dir.join(&base)).unwrap().len();
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut decompressing(&tar_dir.join(&base)), &mut raw).unwrap();
    eprintln!("{base}: {compressed} bytes, {} decompressed", raw.len());
    assert!(
        compressed * 4 < raw.len() as u64,
        "{base} is {compressed} bytes for {} bytes of tar",
        raw.len()
    );
    assert_eq!(raw.len() % 512, 0);
    assert!(raw[raw.len() - 1024..].iter().all(|&b| b == 0));
    let mut archive = tar::Archive::new(&raw[..]);
    let mut pg_version = None;
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.path().unwrap() == Path::new("PG_VERSION") {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut entry, &mut text).unwrap();
            pg_version = Some(text);
        }
    }
    assert_eq!(
        pg_version.as_deref().map(str::trim),
        Some(source.major().to_string().as_str())
    );

    // Restored with tar and a decompressor, the copy starts and holds the same data.
    let restored = work.path().join("restored");
    let restored_ts = work.path().join("restored_ts");
    untar(&tar_dir.join(&base), &restored);
    untar(&tar_dir.join(&ts_archive), &restored_ts);
    assert!(!restored.join("pg_tblspc").join(&oid).exists());
    std::fs::write(
        restored.join("tablespace_map"),
        format!("{oid} {}\n", restored_ts.display()),
    )
    .unwrap();
    give_to_server(&restored_ts);
    let copy = Cluster::start_on_data_dir(&restored, ClusterOptions::new());
    assert_eq!(fingerprint(&copy).await, expected);
}

/// A loopback proxy that changes one byte of the first `marker` it sees from the server.
async fn corrupting_proxy(server_port: u16, marker: &'static [u8]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let server = tokio::net::TcpStream::connect(("127.0.0.1", server_port))
            .await
            .unwrap();
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut cr, &mut sw).await;
        });
        let mut buf = vec![0u8; 1 << 16];
        let mut done = false;
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if !done {
                if let Some(i) = buf[..n].windows(marker.len()).position(|w| w == marker) {
                    buf[i + marker.len() / 2] ^= 0x01;
                    done = true;
                }
            }
            if cw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corruption_is_detected_and_cleaned_up() {
    let source = Cluster::start(ClusterOptions::new());
    source
        .execute("CREATE TABLE marked AS SELECT g, repeat('Q', 200) AS s FROM generate_series(1, 2000) g")
        .await;
    source.execute("CHECKPOINT").await;
    let file = source
        .query_value("SELECT pg_relation_filepath('marked')")
        .await
        .unwrap();
    let port = corrupting_proxy(source.port(), &[b'Q'; 200]).await;
    let config = pgwire_repl::Config::parse(&format!(
        "host=127.0.0.1 port={port} user=postgres sslmode=disable"
    ))
    .unwrap();
    let work = scratch();
    let target = work.path().join("corrupt");
    let err = basebackup::backup(
        &config,
        BackupOptions::default(),
        Box::new(PlainDirSink::new(&target).options(no_sync())),
    )
    .await
    .unwrap_err();
    eprintln!("{err}");
    assert_eq!(err.kind(), ErrorKind::Verify, "{err}");
    assert_eq!(err.path(), Some(file.as_str()), "{err}");
    assert!(
        !target.exists(),
        "the failed backup's directory was not removed"
    );

    // A good backup, then damage on disk: verify_backup names the file.
    // A file name that is not UTF-8 (manifest Encoded-Path) is backed up too.
    let odd = std::ffi::OsStr::from_bytes(b"FOO\xe0\xe0\xe0BAR");
    std::fs::write(source.data_dir().join(odd), b"odd").unwrap();
    let good = work.path().join("good");
    basebackup::backup(
        &source.config("postgres"),
        BackupOptions::default().wal(true),
        Box::new(PlainDirSink::new(&good).options(no_sync())),
    )
    .await
    .unwrap();
    basebackup::verify_backup(&good).unwrap();
    assert_eq!(std::fs::read(good.join(odd)).unwrap(), b"odd");
    let victim = good.join(&file);
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&victim, &bytes).unwrap();
    let e = basebackup::verify_backup(&good).unwrap_err();
    assert_eq!(
        (e.kind(), e.path()),
        (ErrorKind::Verify, Some(file.as_str())),
        "{e}"
    );
    // The async form says the same, without blocking the runtime's workers.
    let e = basebackup::verify_backup_async(good.clone(), Default::default())
        .await
        .unwrap_err();
    assert_eq!(
        (e.kind(), e.path()),
        (ErrorKind::Verify, Some(file.as_str())),
        "{e}"
    );
    bytes[100] ^= 0xff;
    std::fs::write(&victim, &bytes).unwrap();
    let map = good.join("global/pg_filenode.map");
    let map_bytes = std::fs::read(&map).unwrap();
    std::fs::remove_file(&map).unwrap();
    let e = basebackup::verify_backup(&good).unwrap_err();
    assert_eq!(e.path(), Some("global/pg_filenode.map"), "{e}");
    assert!(e.to_string().contains("missing"), "{e}");
    std::fs::write(&map, &map_bytes).unwrap();
    // An unexpected file.
    std::fs::write(good.join("base/extra"), b"x").unwrap();
    let e = basebackup::verify_backup(&good).unwrap_err();
    assert_eq!(e.path(), Some("base/extra"), "{e}");
    std::fs::remove_file(good.join("base/extra")).unwrap();
    let manifest = basebackup::verify_backup(&good).unwrap();
    let again = basebackup::verify_backup_async(good.clone(), Default::default())
        .await
        .unwrap();
    assert_eq!(again.files.len(), manifest.files.len());

    // Damaged WAL: the page holding the start LSN.
    let range = manifest.wal_ranges[0];
    let seg_size = pgwire_repl::WalSegmentSize::DEFAULT;
    let name = range.start.wal_file_name(range.timeline, seg_size);
    let seg = good.join("pg_wal").join(&name);
    let original = std::fs::read(&seg).unwrap();
    let mut damaged = original.clone();
    let page = (range.start.segment_offset(seg_size) / 8192 * 8192) as usize;
    if page == 0 {
        damaged[8] ^= 0xff; // the address in the long header
    } else {
        damaged[page..page + 8192].fill(0);
    }
    std::fs::write(&seg, &damaged).unwrap();
    let e = basebackup::verify_backup(&good).unwrap_err();
    assert_eq!(e.path(), Some(format!("pg_wal/{name}").as_str()), "{e}");
    // Missing WAL.
    std::fs::remove_file(&seg).unwrap();
    let e = basebackup::verify_backup(&good).unwrap_err();
    assert_eq!(e.path(), Some(format!("pg_wal/{name}").as_str()), "{e}");
    assert!(e.to_string().contains("missing"), "{e}");
    let opts = basebackup::VerifyOptions {
        skip_wal: true,
        ..Default::default()
    };
    basebackup::verify_backup_with(&good, &opts).unwrap();
    std::fs::write(&seg, &original).unwrap();

    // A non-empty target is refused and left alone.
    let e = basebackup::backup(
        &source.config("postgres"),
        BackupOptions::default(),
        Box::new(PlainDirSink::new(&good)),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Usage, "{e}");
    assert!(good.join("PG_VERSION").exists());
}

/// Counts bytes; writes nothing.
struct Discard;
impl basebackup::BackupSink for Discard {
    fn begin_backup(&mut self, _: &basebackup::BackupInfo) -> basebackup::Result<()> {
        Ok(())
    }
    fn begin_archive(&mut self, _: &basebackup::ArchiveInfo) -> basebackup::Result<()> {
        Ok(())
    }
    fn end_archive(&mut self, _: bool) -> basebackup::Result<()> {
        Ok(())
    }
    fn commit(&mut self, _: Option<&[u8]>) -> basebackup::Result<()> {
        Ok(())
    }
    fn abort(&mut self, _: &basebackup::Error) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_rate_and_server_compression() {
    let source = Cluster::start(ClusterOptions::new());
    let config = source.config("postgres");
    let t = Instant::now();
    let (plain, _) = basebackup::backup(&config, BackupOptions::default(), Discard)
        .await
        .unwrap();
    let fast = t.elapsed();
    // A rate at which the whole backup takes about 1.5 s.
    let rate = ((plain.bytes as f64 / 1024.0 / 1.5) as u32).clamp(32, 1_048_576);
    let t = Instant::now();
    basebackup::backup(
        &config,
        BackupOptions::default().max_rate(rate),
        Box::new(Discard),
    )
    .await
    .unwrap();
    let slow = t.elapsed();
    eprintln!("unthrottled {fast:?}, MAX_RATE {rate} kB/s: {slow:?}");
    assert!(
        slow >= Duration::from_millis(1000) && slow > fast,
        "{slow:?} vs {fast:?}"
    );

    // Every manifest mode and checksum algorithm is verified in the stream.
    for (mode, alg) in [
        (ManifestMode::ForceEncode, ChecksumAlgorithm::Sha256),
        (ManifestMode::Yes, ChecksumAlgorithm::Sha224),
        (ManifestMode::Yes, ChecksumAlgorithm::Sha384),
        (ManifestMode::Yes, ChecksumAlgorithm::Sha512),
        (ManifestMode::Yes, ChecksumAlgorithm::None),
    ] {
        let opts = BackupOptions {
            manifest: mode,
            ..BackupOptions::default().manifest_checksums(alg)
        };
        let (r, _) = basebackup::backup(&config, opts, Discard).await.unwrap();
        let m = r.manifest.unwrap();
        assert!(m.files.len() > 100 && m.files.iter().all(|f| f.algorithm == alg));
    }
    let opts = BackupOptions {
        manifest: ManifestMode::No,
        ..BackupOptions::default()
    };
    let (r, _) = basebackup::backup(&config, opts, Discard).await.unwrap();
    assert!(r.manifest.is_none() && r.files > 100);

    let work = scratch();
    for method in [
        CompressionMethod::Gzip,
        CompressionMethod::Lz4,
        CompressionMethod::Zstd,
    ] {
        let opts = BackupOptions::default()
            .wal(true)
            .compression(ServerCompression::new(method).level(1));
        let target = work.path().join(format!("{method:?}"));
        let r = basebackup::backup(
            &config,
            opts,
            Box::new(PlainDirSink::new(&target).options(no_sync())),
        )
        .await;
        if source.major() < 15 {
            let e = r.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
            assert!(!target.exists());
            continue;
        }
        match r {
            // The embedded 16-18 server builds lack lz4 and zstd; Debian's 15 has all
            // three, and gzip must work everywhere. A refusal is a server error that
            // leaves nothing behind.
            Err(e)
                if source.major() != 15
                    && method != CompressionMethod::Gzip
                    && e.to_string()
                        .contains("this build does not support compression") =>
            {
                assert_eq!(e.kind(), ErrorKind::Server, "{e}");
                assert!(!target.exists(), "a refused backup must leave no directory");
                eprintln!("{method:?} not available in this server build: {e}");
                continue;
            }
            r => r.unwrap_or_else(|e| panic!("{method:?}: {e}")),
        };
        basebackup::verify_backup(&target).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_checksum_failure_fails_the_backup() {
    let source = Cluster::start(ClusterOptions::new().data_checksums(true));
    source
        .execute("CREATE TABLE bad AS SELECT g FROM generate_series(1, 1000) g")
        .await;
    source.execute("CHECKPOINT").await;
    let file = source
        .query_value("SELECT pg_relation_filepath('bad')")
        .await
        .unwrap();
    let path = source.data_dir().join(&file);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[4000] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let work = scratch();
    let target = work.path().join("xx001");
    let err = basebackup::backup(
        &source.config("postgres"),
        BackupOptions::default(),
        Box::new(PlainDirSink::new(&target).options(no_sync())),
    )
    .await
    .unwrap_err();
    assert_eq!(err.sqlstate(), Some("XX001"), "{err}");
    assert!(err.to_string().contains("damaged data pages"), "{err}");
    assert!(!target.exists());
}

/// The embedder example, compiled here as a module so that its exact code runs against
/// the test server (its `main` is for `cargo run --example hashing_sink`).
#[allow(dead_code)]
#[path = "../examples/hashing_sink.rs"]
mod hashing_sink;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hashing_sink_example_counts_and_hashes_a_real_backup() {
    use sha2::Digest;
    let (source, _ts) = source_with_tablespace().await;
    let conninfo = source.unix_conninfo("postgres");
    // Server-compressed archives where the server can (gzip is in every 15+ build):
    // the sink sees both the stream as sent and the decompressed one.
    let mut options = BackupOptions::default();
    if source.major() >= 15 {
        options = options.compression(ServerCompression::new(CompressionMethod::Gzip).level(1));
    }
    let (result, totals) = hashing_sink::hash_backup(&conninfo, options)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(totals.committed);
    let manifest = result.manifest.as_ref().unwrap();

    // Every file, once, with the manifest's paths and sizes.
    assert_eq!(totals.files, result.files);
    let listed: std::collections::BTreeSet<String> = manifest
        .files
        .iter()
        .map(|f| String::from_utf8_lossy(&f.path).into_owned())
        .collect();
    let hashed: std::collections::BTreeSet<String> = totals.file_sha256.keys().cloned().collect();
    assert_eq!(hashed, listed);
    assert_eq!(
        totals.file_bytes,
        manifest.files.iter().map(|f| f.size).sum::<u64>()
    );
    assert!(hashed.iter().any(|p| p.starts_with("pg_tblspc/")));
    assert_eq!(totals.links, 1, "the tablespace link");
    assert!(totals.directories > 10);

    // The hashes are of the files' real contents.
    for path in ["PG_VERSION", "base/1/PG_VERSION"] {
        let on_disk = std::fs::read(source.data_dir().join(path)).unwrap();
        let expected: String = sha2::Sha256::digest(&on_disk)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(totals.file_sha256[path], expected, "{path}");
    }

    // One archive per tablespace, base last; compressed as asked.
    let names: Vec<&str> = totals.archives.iter().map(|a| a.name.as_str()).collect();
    let suffix = if source.major() >= 15 { ".gz" } else { "" };
    assert_eq!(names.len(), 2);
    assert!(names[0].ends_with(&format!(".tar{suffix}")) && names[0] != names[1]);
    assert_eq!(names[1], format!("base.tar{suffix}"));
    for a in &totals.archives {
        assert_eq!(a.tar_sha256.len(), 64);
        assert!(a.tar_bytes > 0);
        if source.major() >= 15 {
            assert!(
                a.compressed_bytes > 0 && a.compressed_bytes < a.tar_bytes,
                "{a:?}"
            );
            assert!(a.compressed_sha256.is_some());
        } else {
            assert_eq!(
                (a.compressed_bytes, a.compressed_sha256.as_deref()),
                (0, None)
            );
        }
    }
    assert_eq!(totals.manifest_sha256.as_ref().map(String::len), Some(64));
}

/// Keeps each archive as it arrived (compressed by the server, or plain) and the
/// manifest, in memory, as an object-store upload would.
#[derive(Default)]
struct AsArrived {
    archives: Vec<(String, bool, Vec<u8>)>,
    manifest: Option<Vec<u8>>,
}

impl basebackup::AsyncBackupSink for AsArrived {
    async fn begin_backup(&mut self, _: &basebackup::BackupInfo) -> basebackup::Result<()> {
        Ok(())
    }
    async fn begin_archive(&mut self, archive: &basebackup::ArchiveInfo) -> basebackup::Result<()> {
        self.archives.push((
            archive.name.clone(),
            archive.compression.is_some(),
            Vec::new(),
        ));
        Ok(())
    }
    async fn compressed_bytes(&mut self, data: basebackup::Bytes) -> basebackup::Result<()> {
        tokio::task::yield_now().await;
        self.archives.last_mut().unwrap().2.extend_from_slice(&data);
        Ok(())
    }
    async fn archive_bytes(&mut self, data: basebackup::Bytes) -> basebackup::Result<()> {
        let (_, compressed, bytes) = self.archives.last_mut().unwrap();
        if !*compressed {
            tokio::task::yield_now().await;
            bytes.extend_from_slice(&data);
        }
        Ok(())
    }
    fn wants_entries(&self) -> bool {
        false
    }
    async fn end_archive(&mut self, trailer_present: bool) -> basebackup::Result<()> {
        let (_, compressed, bytes) = self.archives.last_mut().unwrap();
        if !trailer_present && !*compressed {
            bytes.extend_from_slice(&[0u8; 1024]);
        }
        Ok(())
    }
    async fn commit(&mut self, manifest: Option<basebackup::Bytes>) -> basebackup::Result<()> {
        self.manifest = manifest.map(|m| m.to_vec());
        Ok(())
    }
    async fn abort(&mut self, _: &basebackup::Error) {
        self.archives.clear();
    }
}

/// An asynchronous sink stores the archives as they arrived (server-compressed on 15+)
/// while the backup is verified on the decompressed stream; restored by hand, the
/// backup passes verify_backup (and pg_verifybackup on 15).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_sink_stores_the_archives_as_sent_and_they_verify() {
    let source = Cluster::start(ClusterOptions::new());
    source
        .execute("CREATE TABLE t AS SELECT g, md5(g::text) AS s FROM generate_series(1, 20000) g")
        .await;
    let mut options = BackupOptions::default().wal(true);
    if source.major() >= 15 {
        options = options.compression(ServerCompression::new(CompressionMethod::Gzip).level(1));
    }
    let client = ReplicationClient::connect(&source.config("postgres"))
        .await
        .unwrap();
    let (result, sink) = BaseBackup::start(client, options)
        .await
        .unwrap()
        .receive_async(AsArrived::default(), None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(result.files > 100);
    let [(name, compressed, bytes)] = &sink.archives[..] else {
        panic!("expected one archive, got {}", sink.archives.len());
    };
    assert_eq!(*compressed, source.major() >= 15, "{name}");
    assert_eq!(
        name,
        if *compressed {
            "base.tar.gz"
        } else {
            "base.tar"
        }
    );
    if *compressed {
        assert!(
            (bytes.len() as u64) * 2 < result.bytes,
            "{name}: {} bytes stored for {} bytes of tar",
            bytes.len(),
            result.bytes
        );
    }
    let work = scratch();
    let stored = work.path().join(name);
    std::fs::write(&stored, bytes).unwrap();
    let restored = work.path().join("restored");
    untar(&stored, &restored);
    std::fs::write(
        restored.join("backup_manifest"),
        sink.manifest.as_deref().unwrap(),
    )
    .unwrap();
    let manifest = basebackup::verify_backup_async(restored.clone(), Default::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(manifest.files.len(), result.manifest.unwrap().files.len());
    if source.major() == 15 {
        let out = std::process::Command::new("/usr/lib/postgresql/15/bin/pg_verifybackup")
            .arg(&restored)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && text.contains("backup successfully verified"),
            "{text}"
        );
    }
}
