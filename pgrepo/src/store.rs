//! Opening a repository's object store from its URL and the standard variables.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};

use crate::error::{Error, Result};

/// A secret that never shows in `Debug` or `Display`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// How to reach the object store. Every field left `None` comes from the standard
/// variables, read as the AWS CLI and `object_store` read them: `AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` (or
/// `AWS_DEFAULT_REGION`), `AWS_ENDPOINT_URL` and `AWS_ALLOW_HTTP`. A field that is set
/// overrides its variable.
///
/// ```
/// use pgrepo::StoreOptions;
/// let options = StoreOptions {
///     endpoint: Some("http://127.0.0.1:3900".into()),
///     allow_http: Some(true),
///     ..StoreOptions::default()
/// };
/// // Secrets never show.
/// let shown = format!("{:?}", StoreOptions { secret_access_key: Some(pgrepo::Secret::new("hunter2")), ..options });
/// assert!(!shown.contains("hunter2"));
/// ```
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// The access key id.
    pub access_key_id: Option<String>,
    /// The secret access key.
    pub secret_access_key: Option<Secret>,
    /// A session token (temporary credentials).
    pub session_token: Option<Secret>,
    /// The region.
    pub region: Option<String>,
    /// An S3-compatible endpoint (`http://host:port`); requests then use path style,
    /// which every S3-compatible store understands.
    pub endpoint: Option<String>,
    /// Allow plain `http://` endpoints.
    pub allow_http: Option<bool>,
    /// Give up on a request that has not answered after this long (it is retried).
    pub request_timeout: Option<Duration>,
    /// Retries of transient errors, with exponential backoff.
    pub max_retries: Option<usize>,
}

/// Which kind of store a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `s3://bucket/prefix`: Amazon S3 or any S3-compatible store.
    S3,
    /// `file:///path`: a local directory (tests, a mounted file system).
    File,
    /// `memory://name`: in memory, for tests; gone with the process.
    Memory,
    /// `gs://bucket/prefix` (with the crate's `gcp` feature).
    Gcs,
    /// `az://container/prefix` (with the crate's `azure` feature).
    Azure,
}

/// A parsed repository URL: the store and the prefix inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoUrl {
    /// The kind of store.
    pub scheme: Scheme,
    /// The bucket or container (empty for `file` and `memory`).
    pub bucket: String,
    /// The prefix inside the bucket, or the directory for `file`.
    pub prefix: String,
}

impl RepoUrl {
    /// Parses `s3://bucket/prefix`, `gs://…`, `az://…`, `file:///abs/path` or
    /// `memory://name`. Credentials in the URL are refused: they would show in process
    /// listings and shell histories.
    ///
    /// ```
    /// use pgrepo::{RepoUrl, Scheme};
    /// let url = RepoUrl::parse("s3://backups/prod/db1").unwrap();
    /// assert_eq!((url.scheme, url.bucket.as_str(), url.prefix.as_str()), (Scheme::S3, "backups", "prod/db1"));
    /// assert!(RepoUrl::parse("s3://key:secret@backups/x").is_err());
    /// assert!(RepoUrl::parse("/srv/backups").is_err());
    /// ```
    pub fn parse(url: &str) -> Result<RepoUrl> {
        let advice = "name the repository as s3://BUCKET/PREFIX (or gs://, az://, \
                      file:///ABSOLUTE/PATH)";
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| Error::usage(format!("repository URL {url:?} has no scheme"), advice))?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "s3" | "s3a" => Scheme::S3,
            "file" => Scheme::File,
            "memory" => Scheme::Memory,
            "gs" => Scheme::Gcs,
            "az" | "azure" => Scheme::Azure,
            other => {
                return Err(Error::usage(
                    format!("repository URL scheme {other:?} is not supported"),
                    advice,
                ))
            }
        };
        if rest.contains('?') || rest.contains('#') {
            return Err(Error::usage(
                "repository URL has a query or fragment",
                "pass store settings as options or AWS_* variables, not in the URL",
            ));
        }
        match scheme {
            Scheme::File => {
                if !rest.starts_with('/') {
                    return Err(Error::usage(
                        format!("file repository URL {url:?} is not absolute"),
                        "write file:///absolute/path",
                    ));
                }
                Ok(RepoUrl {
                    scheme,
                    bucket: String::new(),
                    prefix: rest.trim_end_matches('/').to_string(),
                })
            }
            _ => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.contains('@') {
                    return Err(Error::usage(
                        "repository URL carries credentials",
                        "remove them from the URL; use AWS_ACCESS_KEY_ID and \
                         AWS_SECRET_ACCESS_KEY (or the options) instead",
                    ));
                }
                if bucket.is_empty() && scheme != Scheme::Memory {
                    return Err(Error::usage(
                        format!("repository URL {url:?} names no bucket"),
                        advice,
                    ));
                }
                Ok(RepoUrl {
                    scheme,
                    bucket: bucket.to_string(),
                    prefix: prefix.trim_matches('/').to_string(),
                })
            }
        }
    }
}

impl fmt::Display for RepoUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.scheme {
            Scheme::S3 => "s3",
            Scheme::File => "file",
            Scheme::Memory => "memory",
            Scheme::Gcs => "gs",
            Scheme::Azure => "az",
        };
        match self.scheme {
            Scheme::File => write!(f, "file://{}", self.prefix),
            _ if self.prefix.is_empty() => write!(f, "{scheme}://{}", self.bucket),
            _ => write!(f, "{scheme}://{}/{}", self.bucket, self.prefix),
        }
    }
}

/// Builds the object store for `url`; returns it with the prefix inside it.
pub(crate) fn open_store(
    url: &RepoUrl,
    options: &StoreOptions,
) -> Result<(Arc<dyn ObjectStore>, Path)> {
    let retry = RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            base: 2.0,
        },
        max_retries: options.max_retries.unwrap_or(8),
        retry_timeout: Duration::from_secs(120),
    };
    let client = ClientOptions::new()
        .with_timeout(options.request_timeout.unwrap_or(Duration::from_secs(60)))
        .with_connect_timeout(Duration::from_secs(10));
    let built = |e: object_store::Error| Error::store(format!("opening repository {url}"), e);
    match url.scheme {
        Scheme::S3 => {
            let mut builder = AmazonS3Builder::from_env().with_bucket_name(&url.bucket);
            if let Some(v) = &options.access_key_id {
                builder = builder.with_access_key_id(v);
            }
            if let Some(v) = &options.secret_access_key {
                builder = builder.with_secret_access_key(v.expose());
            }
            if let Some(v) = &options.session_token {
                builder = builder.with_token(v.expose());
            }
            if let Some(v) = &options.region {
                builder = builder.with_region(v);
            }
            let endpoint = options
                .endpoint
                .clone()
                .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok());
            if let Some(v) = &endpoint {
                // S3-compatible stores (Garage, MinIO, Ceph) want path-style requests.
                builder = builder
                    .with_endpoint(v)
                    .with_virtual_hosted_style_request(false);
            }
            let mut client = client;
            if let Some(allow) = options.allow_http {
                client = client.with_allow_http(allow);
            } else if let Ok(v) = std::env::var("AWS_ALLOW_HTTP") {
                client = client.with_allow_http(matches!(
                    v.to_ascii_lowercase().as_str(),
                    "1" | "true" | "yes" | "on"
                ));
            }
            let store = builder
                .with_client_options(client)
                .with_retry(retry)
                .build()
                .map_err(built)?;
            Ok((Arc::new(store), Path::from(url.prefix.as_str())))
        }
        Scheme::File => {
            std::fs::create_dir_all(&url.prefix).map_err(|e| {
                Error::io(
                    "creating the repository directory",
                    std::path::Path::new(&url.prefix),
                    e,
                )
            })?;
            let store = object_store::local::LocalFileSystem::new_with_prefix(&url.prefix)
                .map_err(built)?;
            Ok((Arc::new(store), Path::default()))
        }
        Scheme::Memory => Ok((
            Arc::new(object_store::memory::InMemory::new()),
            Path::from(url.prefix.as_str()),
        )),
        Scheme::Gcs => open_gcs(url, retry, client),
        Scheme::Azure => open_azure(url, retry, client),
    }
}

#[cfg(feature = "gcp")]
fn open_gcs(
    url: &RepoUrl,
    retry: RetryConfig,
    client: ClientOptions,
) -> Result<(Arc<dyn ObjectStore>, Path)> {
    let store = object_store::gcp::GoogleCloudStorageBuilder::from_env()
        .with_bucket_name(&url.bucket)
        .with_client_options(client)
        .with_retry(retry)
        .build()
        .map_err(|e| Error::store(format!("opening repository {url}"), e))?;
    Ok((Arc::new(store), Path::from(url.prefix.as_str())))
}

#[cfg(not(feature = "gcp"))]
fn open_gcs(
    url: &RepoUrl,
    _: RetryConfig,
    _: ClientOptions,
) -> Result<(Arc<dyn ObjectStore>, Path)> {
    Err(Error::usage(
        format!("{url}: Google Cloud Storage support is not built in"),
        "build with the pgrepo crate's `gcp` feature",
    ))
}

#[cfg(feature = "azure")]
fn open_azure(
    url: &RepoUrl,
    retry: RetryConfig,
    client: ClientOptions,
) -> Result<(Arc<dyn ObjectStore>, Path)> {
    let store = object_store::azure::MicrosoftAzureBuilder::from_env()
        .with_container_name(&url.bucket)
        .with_client_options(client)
        .with_retry(retry)
        .build()
        .map_err(|e| Error::store(format!("opening repository {url}"), e))?;
    Ok((Arc::new(store), Path::from(url.prefix.as_str())))
}

#[cfg(not(feature = "azure"))]
fn open_azure(
    url: &RepoUrl,
    _: RetryConfig,
    _: ClientOptions,
) -> Result<(Arc<dyn ObjectStore>, Path)> {
    Err(Error::usage(
        format!("{url}: Azure Blob Storage support is not built in"),
        "build with the pgrepo crate's `azure` feature",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any text parses or is refused without a panic, and what parses survives a
        /// round trip through its own display.
        #[test]
        fn any_url_parses_or_is_refused(url in "(s3|file|memory|gs|az|ftp)?(:|://)?[a-z0-9@:/._?#-]{0,40}") {
            if let Ok(parsed) = RepoUrl::parse(&url) {
                let again = RepoUrl::parse(&parsed.to_string()).unwrap();
                prop_assert_eq!(again, parsed);
            }
        }
    }

    #[test]
    fn urls_round_trip_and_bad_ones_are_refused() {
        for url in ["s3://b/p/q", "s3://b", "file:///srv/repo", "memory://t/x"] {
            assert_eq!(RepoUrl::parse(url).unwrap().to_string(), url);
        }
        assert_eq!(RepoUrl::parse("s3://b/p/").unwrap().prefix, "p");
        for bad in [
            "",
            "s3:/b",
            "ftp://h/x",
            "file://relative",
            "s3:///prefix",
            "s3://AKIA:secret@b/x",
            "s3://b/x?region=y",
        ] {
            let err = RepoUrl::parse(bad).unwrap_err();
            assert!(!err.to_string().contains("secret"), "{err}");
        }
    }
}
