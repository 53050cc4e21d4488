//! Opening the store a history URL names: a directory (the default) or S3.

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::local::LocalFileSystem;
use object_store::multipart::MultipartStore;
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};

use super::HistoryError;

/// S3 settings beyond what the environment gives (`AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL`,
/// `AWS_ALLOW_HTTP`). Explicit values win over the environment.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// A custom endpoint (`http://127.0.0.1:3900` for Garage, `MinIO`, Ceph).
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// A static key instead of the environment's.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Plain HTTP to the endpoint. Allowed without asking for loopback endpoints.
    pub allow_http: Option<bool>,
    /// Retries inside one request; the uploader retries whole uploads beyond these.
    pub request_retries: usize,
    /// Give up on one request (with its retries) after this long.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// Create a missing directory (writers); readers leave this off so a typo is an error.
    pub create_dir: bool,
    /// A directory store fsyncs each object (and its directory) before a
    /// put returns, as S3 makes it durable before answering: a staged
    /// migration's barrier must survive a crash. Off for the history,
    /// whose spool keeps a segment until its upload is complete.
    pub fsync: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            endpoint: None,
            region: None,
            access_key_id: None,
            secret_access_key: None,
            allow_http: None,
            request_retries: 2,
            request_timeout: Duration::from_mins(1),
            connect_timeout: Duration::from_secs(5),
            create_dir: true,
            fsync: false,
        }
    }
}

/// An opened history location. Cheap to clone.
#[derive(Clone)]
pub struct HistoryStore {
    url: String,
    pub(crate) store: Arc<dyn ObjectStore>,
    /// S3's resumable multipart API; `None` for a directory (whole-file puts are atomic there).
    pub(super) multipart: Option<Arc<dyn MultipartStore>>,
    prefix: Vec<String>,
}

impl std::fmt::Debug for HistoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HistoryStore")
            .field("url", &self.url)
            .field("store", &self.store)
            .field("multipart", &self.multipart.is_some())
            .field("prefix", &self.prefix)
            .finish()
    }
}

fn bad(url: &str, why: impl Into<String>) -> HistoryError {
    HistoryError::BadUrl {
        url: url.to_owned(),
        why: why.into(),
    }
}

/// Is the endpoint on this machine (where plain HTTP is harmless)?
fn is_loopback(endpoint: &str) -> bool {
    let rest = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
        .unwrap_or(endpoint);
    let host = rest.split('/').next().unwrap_or("");
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Retries inside one request.
fn retry_config(opts: &StoreOptions) -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            base: 2.0,
        },
        max_retries: opts.request_retries,
        retry_timeout: opts.request_timeout,
    }
}

/// A container name Azure accepts: 3–63 of lowercase letters, digits and
/// `-`, starting with a letter or digit, no `--`.
fn valid_container(c: &str) -> bool {
    (3..=63).contains(&c.len())
        && c.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && c.as_bytes()[0].is_ascii_alphanumeric()
        && !c.contains("--")
        && !c.ends_with('-')
}

/// A bucket name S3 accepts: 3–63 of lowercase letters, digits, `-` and `.`.
fn valid_bucket(b: &str) -> bool {
    (3..=63).contains(&b.len())
        && b.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
        && b.as_bytes()[0].is_ascii_alphanumeric()
}

fn prefix_parts(url: &str, path: &str) -> Result<Vec<String>, HistoryError> {
    let parts: Vec<String> = path
        .split('/')
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect();
    if parts.iter().any(|p| p == "." || p == "..") {
        return Err(bad(url, "the prefix may not contain `.` or `..`"));
    }
    Ok(parts)
}

impl HistoryStore {
    /// Opens `url` with default options: see [`HistoryStore::open_with`].
    pub fn open(url: &str) -> Result<HistoryStore, HistoryError> {
        HistoryStore::open_with(url, &StoreOptions::default())
    }

    /// Opens a history location: a directory path or `file:///dir` (created if
    /// missing), or `s3://bucket/prefix` with credentials from the environment.
    pub fn open_with(url: &str, opts: &StoreOptions) -> Result<HistoryStore, HistoryError> {
        let trimmed = url.trim();
        if trimmed.is_empty() {
            return Err(bad(
                url,
                "it is empty; give a directory, file:///dir or s3://bucket/prefix",
            ));
        }
        if let Some(rest) = trimmed.strip_prefix("s3://") {
            return HistoryStore::open_s3(url, rest, opts);
        }
        if let Some(rest) = trimmed.strip_prefix("az://") {
            return HistoryStore::open_azure(url, rest, opts);
        }
        let dir = if let Some(path) = trimmed.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(bad(
                    url,
                    "a file:// URL needs an absolute path (file:///dir)",
                ));
            }
            path
        } else if let Some((scheme, _)) = trimmed.split_once("://") {
            return Err(bad(
                url,
                format!(
                    "the scheme {scheme}:// is not supported; give a directory, file:///dir, s3://bucket/prefix or az://container/prefix"
                ),
            ));
        } else {
            trimmed
        };
        if opts.create_dir {
            std::fs::create_dir_all(dir)
                .map_err(|e| bad(url, format!("cannot create the directory {dir}: {e}")))?;
        } else if !std::path::Path::new(dir).is_dir() {
            return Err(bad(url, format!("there is no history directory {dir}")));
        }
        let local = LocalFileSystem::new_with_prefix(dir)
            .map_err(|source| HistoryError::Open {
                url: url.to_owned(),
                source,
            })?
            .with_fsync(opts.fsync);
        Ok(HistoryStore {
            url: url.to_owned(),
            store: Arc::new(local),
            multipart: None,
            prefix: Vec::new(),
        })
    }

    fn open_s3(url: &str, rest: &str, opts: &StoreOptions) -> Result<HistoryStore, HistoryError> {
        let (bucket, path) = rest.split_once('/').unwrap_or((rest, ""));
        if !valid_bucket(bucket) {
            return Err(bad(
                url,
                format!(
                    "{bucket:?} is not a bucket name (3 to 63 lowercase letters, digits, `-` or `.`)"
                ),
            ));
        }
        let prefix = prefix_parts(url, path)?;
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        let endpoint = opts.endpoint.clone().or_else(|| {
            ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"]
                .iter()
                .find_map(|k| std::env::var(k).ok())
        });
        if let Some(endpoint) = &opts.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(region) = &opts.region {
            builder = builder.with_region(region);
        }
        if let Some(id) = &opts.access_key_id {
            builder = builder.with_access_key_id(id);
        }
        if let Some(secret) = &opts.secret_access_key {
            builder = builder.with_secret_access_key(secret);
        }
        let env_allows_http =
            std::env::var("AWS_ALLOW_HTTP").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
        let mut allow_http = opts.allow_http.unwrap_or(env_allows_http);
        if let Some(endpoint) = &endpoint
            && endpoint.starts_with("http://")
        {
            let allowed = opts
                .allow_http
                .unwrap_or(env_allows_http || is_loopback(endpoint));
            if !allowed {
                return Err(bad(
                    url,
                    format!(
                        "the endpoint {endpoint} is plain HTTP on another host; use https, or allow it (AWS_ALLOW_HTTP=true)"
                    ),
                ));
            }
            allow_http = true;
        }
        let retry = retry_config(opts);
        // These replace the builder's client options, the environment's
        // AWS_ALLOW_HTTP included: hence `allow_http` is decided above.
        let client = ClientOptions::new()
            .with_allow_http(allow_http)
            .with_timeout(opts.request_timeout)
            .with_connect_timeout(opts.connect_timeout);
        let s3 = builder
            .with_retry(retry)
            .with_client_options(client)
            .build()
            .map_err(|source| HistoryError::Open {
                url: url.to_owned(),
                source,
            })?;
        let s3 = Arc::new(s3);
        Ok(HistoryStore {
            url: url.to_owned(),
            store: Arc::clone(&s3) as Arc<dyn ObjectStore>,
            multipart: Some(s3 as Arc<dyn MultipartStore>),
            prefix,
        })
    }

    /// Azure Blob Storage: `az://container/prefix`, the account and its
    /// credentials from `AZURE_*` variables (`AZURE_STORAGE_ACCOUNT_NAME`,
    /// `AZURE_STORAGE_ACCOUNT_KEY` or a SAS or bearer token;
    /// `AZURE_STORAGE_USE_EMULATOR=true` and `AZURITE_BLOB_STORAGE_URL` for
    /// Azurite), the endpoint from `opts` or `AZURE_ENDPOINT`.
    fn open_azure(
        url: &str,
        rest: &str,
        opts: &StoreOptions,
    ) -> Result<HistoryStore, HistoryError> {
        let (container, path) = rest.split_once('/').unwrap_or((rest, ""));
        if !valid_container(container) {
            return Err(bad(
                url,
                format!(
                    "{container:?} is not a container name (3 to 63 lowercase letters, digits or `-`)"
                ),
            ));
        }
        let prefix = prefix_parts(url, path)?;
        let mut builder = MicrosoftAzureBuilder::from_env().with_container_name(container);
        if let Some(endpoint) = &opts.endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        if let Some(id) = &opts.access_key_id {
            builder = builder.with_account(id);
        }
        if let Some(secret) = &opts.secret_access_key {
            builder = builder.with_access_key(secret);
        }
        let endpoint = opts
            .endpoint
            .clone()
            .or_else(|| std::env::var("AZURE_ENDPOINT").ok());
        let allow_http = opts.allow_http.unwrap_or_else(|| {
            endpoint
                .as_deref()
                .is_some_and(|e| e.starts_with("http://") && is_loopback(e))
        });
        let azure = builder
            .with_retry(retry_config(opts))
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(allow_http)
                    .with_timeout(opts.request_timeout)
                    .with_connect_timeout(opts.connect_timeout),
            )
            .build()
            .map_err(|source| HistoryError::Open {
                url: url.to_owned(),
                source,
            })?;
        let azure = Arc::new(azure);
        Ok(HistoryStore {
            url: url.to_owned(),
            store: Arc::clone(&azure) as Arc<dyn ObjectStore>,
            multipart: Some(azure as Arc<dyn MultipartStore>),
            prefix,
        })
    }

    /// The URL this store was opened from.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The object path of `parts` under the URL's prefix.
    pub(crate) fn path<'a>(&self, parts: impl IntoIterator<Item = &'a str>) -> ObjectPath {
        self.prefix
            .iter()
            .cloned()
            .chain(parts.into_iter().map(str::to_owned))
            .collect()
    }

    /// The path components of `location` below the prefix, or `None` if it is not below it.
    pub(crate) fn relative(&self, location: &ObjectPath) -> Option<Vec<String>> {
        let mut parts = location.parts();
        for p in &self.prefix {
            if parts.next()?.as_ref() != p {
                return None;
            }
        }
        Some(parts.map(|p| p.as_ref().to_owned()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn why(url: &str) -> String {
        match HistoryStore::open(url) {
            Err(HistoryError::BadUrl { why, .. }) => why,
            Err(e) => panic!("{url}: unexpected error {e}"),
            Ok(_) => panic!("{url}: opened"),
        }
    }

    #[test]
    fn bad_urls_say_what_to_give() {
        assert!(why("").contains("s3://bucket/prefix"));
        assert!(why("gs://bucket/x").contains("gs:// is not supported"));
        assert!(why("az://Bad_Container/x").contains("not a container name"));
        assert!(why("az://a--b/x").contains("not a container name"));
        assert!(why("s3://Bad_Bucket/x").contains("not a bucket name"));
        assert!(why("s3:///x").contains("not a bucket name"));
        assert!(why("s3://bucket/a/../b").contains("`..`"));
        assert!(why("file://relative/dir").contains("absolute path"));
        let missing = HistoryStore::open_with(
            "/nonexistent/tern-history",
            &StoreOptions {
                create_dir: false,
                ..StoreOptions::default()
            },
        )
        .expect_err("a reader does not create a directory");
        assert!(
            missing.to_string().contains("no history directory"),
            "{missing}"
        );
    }

    #[test]
    fn plain_http_is_allowed_only_on_loopback() {
        let opts = |endpoint: &str| StoreOptions {
            endpoint: Some(endpoint.into()),
            region: Some("garage".into()),
            ..StoreOptions::default()
        };
        assert!(HistoryStore::open_with("s3://bucket/p", &opts("http://127.0.0.1:3900")).is_ok());
        assert!(HistoryStore::open_with("s3://bucket/p", &opts("http://localhost:3900")).is_ok());
        assert!(HistoryStore::open_with("s3://bucket/p", &opts("http://[::1]:3900")).is_ok());
        let err = HistoryStore::open_with("s3://bucket/p", &opts("http://10.1.2.3:3900"))
            .expect_err("plain http to another host is refused");
        assert!(err.to_string().contains("AWS_ALLOW_HTTP"), "{err}");
    }

    #[test]
    fn a_directory_is_created_and_paths_sit_under_the_prefix() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().join("hist");
        let store = HistoryStore::open(root.to_str().expect("utf-8 path")).expect("opens");
        assert!(root.is_dir());
        let s3 = HistoryStore::open_with(
            "s3://bucket/a/b/",
            &StoreOptions {
                endpoint: Some("http://127.0.0.1:1".into()),
                ..StoreOptions::default()
            },
        )
        .expect("opens without contacting the server");
        let p = s3.path(["h", "d", "x.trace"]);
        assert_eq!(p.as_ref(), "a/b/h/d/x.trace");
        assert_eq!(
            s3.relative(&p),
            Some(vec!["h".into(), "d".into(), "x.trace".into()])
        );
        assert_eq!(s3.relative(&ObjectPath::from("a/c/x")), None);
        assert_eq!(store.path(["h"]).as_ref(), "h");
    }
}
