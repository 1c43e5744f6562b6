//! Tests of the Garage harness itself: a single node and a three-node cluster, used
//! through the `object_store` S3 client as the backup code will use them.

use std::time::{Duration, Instant};

use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};
use testkit::Garage;

const MIB: usize = 1024 * 1024;

/// An S3 client for `bucket` through `endpoint`, configured from the harness.
fn client(garage: &Garage, endpoint: &str, bucket: &str, retries: bool) -> AmazonS3 {
    // The client options hold allow_http too: set them first, as a whole.
    let mut builder = AmazonS3Builder::new()
        .with_client_options(ClientOptions::new().with_timeout(Duration::from_secs(20)))
        .with_endpoint(endpoint)
        .with_allow_http(true)
        .with_virtual_hosted_style_request(false)
        .with_region(garage.region())
        .with_bucket_name(bucket)
        .with_access_key_id(garage.access_key_id())
        .with_secret_access_key(garage.secret_access_key());
    if !retries {
        builder = builder.with_retry(RetryConfig {
            max_retries: 0,
            ..RetryConfig::default()
        });
    }
    builder
        .build()
        .unwrap_or_else(|e| panic!("building the S3 client for {endpoint}: {e}"))
}

/// `len` bytes that do not compress (xorshift), different for each `seed`.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut bytes = Vec::with_capacity(len + 8);
    while bytes.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(len);
    bytes
}

async fn get(store: &AmazonS3, path: &Path) -> Vec<u8> {
    let result = store
        .get(path)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    result
        .bytes()
        .await
        .unwrap_or_else(|e| panic!("reading GET {path}: {e}"))
        .to_vec()
}

async fn put(store: &AmazonS3, path: &Path, data: &[u8]) {
    store
        .put(path, PutPayload::from(data.to_vec()))
        .await
        .unwrap_or_else(|e| panic!("PUT {path} ({} bytes): {e}", data.len()));
}

/// Puts, gets, lists, uploads 12 MiB in 5 MiB parts and deletes under `prefix`.
async fn round_trip(store: &AmazonS3, prefix: &str) {
    let small = Path::from(format!("{prefix}/small"));
    let medium = Path::from(format!("{prefix}/medium"));
    let large = Path::from(format!("{prefix}/large"));

    put(store, &small, b"hello, garage").await;
    assert_eq!(get(store, &small).await, b"hello, garage");

    let medium_data = noise(64 * 1024 + 17, 1);
    put(store, &medium, &medium_data).await;
    assert_eq!(get(store, &medium).await, medium_data);

    // Multipart: every part but the last must be at least 5 MiB.
    let large_data = noise(12 * MIB + 123, 2);
    let mut upload = store
        .put_multipart(&large)
        .await
        .unwrap_or_else(|e| panic!("starting the multipart upload of {large}: {e}"));
    for part in large_data.chunks(5 * MIB) {
        upload
            .put_part(PutPayload::from(part.to_vec()))
            .await
            .unwrap_or_else(|e| panic!("uploading a part of {large}: {e}"));
    }
    upload
        .complete()
        .await
        .unwrap_or_else(|e| panic!("completing the multipart upload of {large}: {e}"));
    let head = store
        .head(&large)
        .await
        .unwrap_or_else(|e| panic!("HEAD {large}: {e}"));
    assert_eq!(head.size, large_data.len() as u64);
    assert!(get(store, &large).await == large_data, "{large} changed");
    let range = store
        .get_range(&large, 5 * MIB as u64 - 10..5 * MIB as u64 + 10)
        .await
        .unwrap_or_else(|e| panic!("ranged GET {large}: {e}"));
    assert_eq!(&range[..], &large_data[5 * MIB - 10..5 * MIB + 10]);

    let prefix_path = Path::from(prefix);
    let mut listed: Vec<(String, u64)> = store
        .list(Some(&prefix_path))
        .map_ok(|meta| (meta.location.to_string(), meta.size))
        .try_collect()
        .await
        .unwrap_or_else(|e| panic!("LIST {prefix}: {e}"));
    listed.sort();
    assert_eq!(
        listed,
        vec![
            (large.to_string(), large_data.len() as u64),
            (medium.to_string(), medium_data.len() as u64),
            (small.to_string(), 13),
        ]
    );

    store
        .delete(&small)
        .await
        .unwrap_or_else(|e| panic!("DELETE {small}: {e}"));
    match store.get(&small).await {
        Err(object_store::Error::NotFound { .. }) => {}
        other => panic!("GET of the deleted {small}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_round_trips_objects() {
    let started = Instant::now();
    let garage = Garage::start();
    eprintln!(
        "Garage::start() took {:?} ({})",
        started.elapsed(),
        garage.version()
    );

    assert_eq!(garage.node_count(), 1);
    assert_eq!(garage.region(), "garage");
    assert_eq!(garage.bucket(), "pgrepl-test");
    assert_eq!(
        garage.endpoint(),
        format!("http://127.0.0.1:{}", garage.s3_port())
    );
    assert_eq!(garage.url("/base/1/"), "s3://pgrepl-test/base/1/");
    assert!(garage.access_key_id().starts_with("GK"));
    let env = garage.env();
    let var = |name: &str| {
        env.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("{name} is missing from env()"))
    };
    assert_eq!(var("AWS_ACCESS_KEY_ID"), garage.access_key_id());
    assert_eq!(var("AWS_SECRET_ACCESS_KEY"), garage.secret_access_key());
    assert_eq!(var("AWS_REGION"), "garage");
    assert_eq!(var("AWS_ENDPOINT_URL"), garage.endpoint());
    assert_eq!(var("AWS_ALLOW_HTTP"), "true");

    let store = client(&garage, &garage.endpoint(), garage.bucket(), true);
    let timed = Instant::now();
    round_trip(&store, "single").await;
    eprintln!("single node round trip took {:?}", timed.elapsed());

    garage.create_bucket("second-bucket");
    let second = client(&garage, &garage.endpoint(), "second-bucket", true);
    let path = Path::from("x/y");
    put(&second, &path, b"in the second bucket").await;
    assert_eq!(get(&second, &path).await, b"in the second bucket");
    match store.get(&path).await {
        Err(object_store::Error::NotFound { .. }) => {}
        other => panic!("the default bucket sees the second bucket's object: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_keep_serving_with_one_node_down() {
    let started = Instant::now();
    let mut garage = Garage::start_cluster(3);
    eprintln!("Garage::start_cluster(3) took {:?}", started.elapsed());
    assert_eq!(garage.node_count(), 3);

    let store = client(&garage, &garage.endpoint(), garage.bucket(), true);
    let timed = Instant::now();
    round_trip(&store, "healthy").await;
    eprintln!("3-node round trip took {:?}", timed.elapsed());
    let before = Path::from("before-the-crash");
    let before_data = noise(300 * 1024, 3);
    put(&store, &before, &before_data).await;

    // replication_factor 3: reads and writes need 2 of the 3 nodes.
    garage.stop_node(2);
    let store = client(&garage, &garage.endpoint(), garage.bucket(), false);
    let timed = Instant::now();
    assert!(get(&store, &before).await == before_data);
    eprintln!(
        "with node 2 down: first GET of 300 KiB took {:?}",
        timed.elapsed()
    );
    let timed = Instant::now();
    let after = Path::from("after-the-crash");
    let after_data = noise(300 * 1024, 4);
    put(&store, &after, &after_data).await;
    eprintln!(
        "with node 2 down: first PUT of 300 KiB took {:?}",
        timed.elapsed()
    );
    let timed = Instant::now();
    assert!(get(&store, &after).await == after_data);
    eprintln!(
        "with node 2 down: GET of 300 KiB took {:?}",
        timed.elapsed()
    );
    let timed = Instant::now();
    round_trip(&store, "degraded").await;
    eprintln!("with node 2 down: round trip took {:?}", timed.elapsed());

    // Node 1 serves the same store.
    let via_node_1 = client(&garage, &garage.node_endpoint(1), garage.bucket(), false);
    assert!(get(&via_node_1, &after).await == after_data);

    // A paused store answers nothing until it is resumed.
    for _ in 0..2 {
        garage.pause();
        let stalled = tokio::time::timeout(Duration::from_secs(1), store.head(&after)).await;
        assert!(stalled.is_err(), "a paused store answered: {stalled:?}");
        garage.resume();
        assert!(get(&store, &after).await == after_data);
    }

    // Without a quorum (2 of 3 nodes down), a write fails rather than succeeds.
    garage.stop_node(1);
    let timed = Instant::now();
    let lonely = Path::from("no-quorum");
    let result = tokio::time::timeout(
        Duration::from_secs(60),
        store.put(&lonely, PutPayload::from(noise(1024, 5))),
    )
    .await;
    match result {
        Ok(Ok(_)) => panic!("a write succeeded on one node of three"),
        Ok(Err(err)) => eprintln!(
            "with 2 of 3 nodes down: PUT failed after {:?}: {err}",
            timed.elapsed()
        ),
        Err(_) => eprintln!("with 2 of 3 nodes down: PUT hung for 60 s"),
    }
}
