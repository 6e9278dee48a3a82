//! The registry's storage: one object store (S3 and what speaks its protocol, GCS, Azure, or a
//! local directory) under a prefix, through the `object_store` crate, with the few operations
//! the registry needs: JSON documents read with their ETag (and re-read only when it changed),
//! written only if nobody wrote them since (`If-Match`) or only if absent (`If-None-Match: *`),
//! listings, and model files streamed up and down.
//!
//! Credentials and endpoints come the standard way, from the environment (`AWS_ENDPOINT_URL`,
//! `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `GOOGLE_*`, `AZURE_*`), and
//! are never logged: a store prints as its URI, which holds no secret.
//!
//! A local directory cannot compare-and-swap through `object_store` (`PutMode::Update` is not
//! implemented there), so for it a conditional write holds an advisory lock on the directory's
//! `.lock` file (flock) around read-compare-write; every process on the machine honours it.

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{
    ClientOptions, GetOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    RetryConfig, UpdateVersion,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::RegistryError;

mod secrets;
mod transfer;
use secrets::{refuse_userinfo, short};
pub use transfer::Expected;

/// An open registry store.
#[derive(Clone)]
pub struct Store {
    /// Short calls (documents, listings): a few seconds each, retried a little, so that an
    /// unreachable registry is noticed within one poll.
    control: Arc<dyn ObjectStore>,
    /// Model files: no overall time limit (they may be large), only on connecting and on
    /// each read.
    bulk: Arc<dyn ObjectStore>,
    prefix: Path,
    /// For a local directory: its root, whose `.lock` serialises conditional writes.
    local_root: Option<PathBuf>,
    uri: String,
}

/// Which version of an object a write is conditional on: its ETag, and the store's own
/// version id where it has one (GCS's generation, which its conditional writes need).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tag {
    pub etag: Option<String>,
    pub version: Option<String>,
}

/// A document as read, with the version to write it back against.
#[derive(Debug, Clone)]
pub struct Versioned<T> {
    pub value: T,
    pub tag: Tag,
}

/// What a conditional read found.
#[derive(Debug)]
pub enum Read<T> {
    Missing,
    /// The document still has the ETag the caller has.
    Unchanged,
    Found(Versioned<T>),
}

/// When a write may happen.
#[derive(Debug, Clone)]
pub enum WriteIf {
    /// Always (the caller owns the document: an instance's own report).
    Always,
    /// Only if nothing is there yet (a version record: versions are immutable).
    Absent,
    /// Only if the document is still this version (desired state: two writers race).
    Matches(Tag),
}

/// The initial retry and connect settings of control calls.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A model file read that stalls this long fails (and is retried on the next poll).
const BULK_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest registry document read (records, desired states and reports are a few KB).
pub const MAX_DOCUMENT_BYTES: u64 = 1024 * 1024;
/// Parts of a multipart upload.
const UPLOAD_PART: usize = 8 * 1024 * 1024;

/// The directory a registry URI names, where it names one (`file:///dir` or a plain path)
/// rather than an object store.
pub fn local_dir(uri: &str) -> Option<PathBuf> {
    let uri = uri.trim();
    match uri.strip_prefix("file://") {
        Some(path) => Some(PathBuf::from(path)),
        None if !uri.contains("://") => Some(PathBuf::from(uri)),
        None => None,
    }
}

impl Store {
    /// Opens the store a URI names: `s3://bucket/prefix` (endpoint and keys from `AWS_*`; an
    /// `http://` endpoint is allowed as such, for MinIO and local test servers), `gs://`,
    /// `az://` / `abfs://`, `file:///abs/dir`, or a plain directory path.
    pub fn open(uri: &str) -> Result<Store, RegistryError> {
        let uri = uri.trim();
        if uri.is_empty() {
            return Err(RegistryError::Config("the registry URI is empty".into()));
        }
        if let Some(dir) = local_dir(uri) {
            return Store::open_local(&dir, uri);
        }
        refuse_userinfo(uri)?;
        // TLS through rustls with ring; idempotent (an error means one is installed).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let url = url::Url::parse(uri)
            .map_err(|e| RegistryError::Config(format!("registry URI '{uri}': {e}")))?;
        let prefix = Path::from(url.path().trim_matches('/'));
        let control = open_remote(&url, Client::Control)?;
        let bulk = open_remote(&url, Client::Bulk)?;
        Ok(Store {
            control,
            bulk,
            prefix,
            local_root: None,
            uri: uri.to_string(),
        })
    }

    fn open_local(dir: &FsPath, uri: &str) -> Result<Store, RegistryError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            RegistryError::Config(format!(
                "cannot create registry directory {}: {e}",
                dir.display()
            ))
        })?;
        let root = dir.canonicalize().map_err(|e| {
            RegistryError::Config(format!("registry directory {}: {e}", dir.display()))
        })?;
        let fs = object_store::local::LocalFileSystem::new_with_prefix(&root)
            .map_err(|e| {
                RegistryError::Config(format!("registry directory {}: {e}", root.display()))
            })?
            .with_automatic_cleanup(true);
        let fs: Arc<dyn ObjectStore> = Arc::new(fs);
        Ok(Store {
            control: fs.clone(),
            bulk: fs,
            prefix: Path::default(),
            local_root: Some(root),
            uri: uri.to_string(),
        })
    }

    /// The URI it was opened with (no secrets: those come from the environment).
    pub fn uri(&self) -> &str {
        &self.uri
    }

    fn path(&self, key: &str) -> Path {
        let mut path = self.prefix.clone();
        for part in key.split('/').filter(|p| !p.is_empty()) {
            path = path.clone().join(part);
        }
        path
    }

    /// Reads a JSON document (at most [`MAX_DOCUMENT_BYTES`]); with `known` (the version
    /// the caller holds), answers [`Read::Unchanged`] without the body when it still is.
    pub async fn read_json<T: DeserializeOwned>(
        &self,
        key: &str,
        known: Option<&Tag>,
    ) -> Result<Read<T>, RegistryError> {
        let options = GetOptions {
            if_none_match: known.and_then(|tag| tag.etag.clone()),
            ..GetOptions::default()
        };
        let got = match self.control.get_opts(&self.path(key), options).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(Read::Missing),
            Err(object_store::Error::NotModified { .. }) => return Ok(Read::Unchanged),
            Err(e) => return Err(self.failed("read", key, e)),
        };
        if got.meta.size > MAX_DOCUMENT_BYTES {
            return Err(RegistryError::Corrupt(format!(
                "{key}: {} bytes, more than a registry document may be ({MAX_DOCUMENT_BYTES})",
                got.meta.size
            )));
        }
        let tag = Tag {
            etag: got.meta.e_tag.clone(),
            version: got.meta.version.clone(),
        };
        let bytes = got.bytes().await.map_err(|e| self.failed("read", key, e))?;
        let value = serde_json::from_slice(&bytes)
            .map_err(|e| RegistryError::Corrupt(format!("{key}: not a valid document: {e}")))?;
        Ok(Read::Found(Versioned { value, tag }))
    }

    /// Writes a JSON document if `condition` holds; [`RegistryError::Conflict`] if it does
    /// not. Returns its new version.
    pub async fn write_json<T: Serialize>(
        &self,
        key: &str,
        value: &T,
        condition: WriteIf,
    ) -> Result<Tag, RegistryError> {
        let body = serde_json::to_vec_pretty(value).expect("registry documents serialize");
        self.write_bytes(key, Bytes::from(body), condition).await
    }

    async fn write_bytes(
        &self,
        key: &str,
        body: Bytes,
        condition: WriteIf,
    ) -> Result<Tag, RegistryError> {
        let path = self.path(key);
        if let (Some(root), WriteIf::Matches(tag)) = (&self.local_root, &condition) {
            let etag = tag.etag.clone().unwrap_or_default();
            return self
                .write_local_if_matches(root, &path, key, body, &etag)
                .await;
        }
        // Writing over a version that is gone (deleted since it was read) is losing the race
        // too, however the store words it.
        let over_a_version = matches!(condition, WriteIf::Matches(_));
        let mode = match condition {
            WriteIf::Always => PutMode::Overwrite,
            WriteIf::Absent => PutMode::Create,
            WriteIf::Matches(tag) => PutMode::Update(UpdateVersion {
                e_tag: tag.etag,
                version: tag.version,
            }),
        };
        let options = PutOptions {
            mode,
            ..PutOptions::default()
        };
        match self
            .control
            .put_opts(&path, PutPayload::from_bytes(body), options)
            .await
        {
            Ok(put) => Ok(Tag {
                etag: put.e_tag,
                version: put.version,
            }),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Err(RegistryError::Conflict(key.to_string())),
            Err(object_store::Error::NotFound { .. }) if over_a_version => {
                Err(RegistryError::Conflict(key.to_string()))
            }
            Err(e) => Err(self.failed("write", key, e)),
        }
    }

    /// A local compare-and-swap: under the directory's lock, the document must still have
    /// `etag` (or be absent, when the caller read it absent: `etag` is then empty).
    async fn write_local_if_matches(
        &self,
        root: &FsPath,
        path: &Path,
        key: &str,
        body: Bytes,
        etag: &str,
    ) -> Result<Tag, RegistryError> {
        let lock = LocalLock::take(root).await?;
        let current = match self.control.head(path).await {
            Ok(meta) => meta.e_tag,
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => return Err(self.failed("write", key, e)),
        };
        if current.as_deref().unwrap_or("") != etag {
            return Err(RegistryError::Conflict(key.to_string()));
        }
        let put = self
            .control
            .put(path, PutPayload::from_bytes(body))
            .await
            .map_err(|e| self.failed("write", key, e))?;
        drop(lock);
        Ok(Tag {
            etag: put.e_tag,
            version: put.version,
        })
    }

    /// The names directly under `key/` (its "folders").
    pub async fn list_dirs(&self, key: &str) -> Result<Vec<String>, RegistryError> {
        Ok(self.list(key).await?.0)
    }

    /// The object names directly under `key/` (not in its folders; hidden ones left out).
    pub async fn list_files(&self, key: &str) -> Result<Vec<String>, RegistryError> {
        Ok(self.list(key).await?.1)
    }

    /// One level under `key/`: its folders' names and its objects' names, each sorted.
    ///
    /// A key the store holds that is no valid path (`models//notes.txt`: an empty segment)
    /// fails the whole listing inside `object_store`; that is [`RegistryError::Corrupt`]
    /// ("bad key in registry", naming it), not unreachability, so that callers can go on
    /// with the names they know.
    async fn list(&self, key: &str) -> Result<(Vec<String>, Vec<String>), RegistryError> {
        let listed = match self
            .control
            .list_with_delimiter(Some(&self.path(key)))
            .await
        {
            Ok(listed) => listed,
            Err(object_store::Error::InvalidPath { source }) => {
                return Err(RegistryError::Corrupt(format!(
                    "{BAD_KEY} under {key}/: {} (remove or rename that object)",
                    crate::untrusted::Untrusted(&source.to_string())
                )))
            }
            Err(e) => return Err(self.failed("list", key, e)),
        };
        let sorted = |mut names: Vec<String>| {
            names.sort();
            names
        };
        let dirs = listed.common_prefixes.iter().filter_map(|p| p.filename());
        let files = listed
            .objects
            .iter()
            .filter_map(|o| o.location.filename())
            .filter(|name| !name.starts_with('.'));
        Ok((
            sorted(dirs.map(str::to_string).collect()),
            sorted(files.map(str::to_string).collect()),
        ))
    }

    pub async fn delete(&self, key: &str) -> Result<(), RegistryError> {
        match self.control.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.failed("delete", key, e)),
        }
    }

    /// Whether an object exists.
    pub async fn exists(&self, key: &str) -> Result<bool, RegistryError> {
        match self.control.head(&self.path(key)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.failed("read", key, e)),
        }
    }

    fn failed(&self, what: &str, key: &str, e: object_store::Error) -> RegistryError {
        RegistryError::Unreachable(format!("{what} {key} in {}: {}", self.uri, short(&e)))
    }
}

/// How a listing's error about a key that is no valid path begins (see [`Store`]'s `list`).
pub const BAD_KEY: &str = "bad key in registry";

/// Which client a store gets: see [`Store`]'s fields.
#[derive(Clone, Copy)]
enum Client {
    Control,
    Bulk,
}

fn open_remote(url: &url::Url, client: Client) -> Result<Arc<dyn ObjectStore>, RegistryError> {
    let mut options = ClientOptions::new().with_connect_timeout(CONNECT_TIMEOUT);
    options = match client {
        Client::Control => options.with_timeout(CONTROL_TIMEOUT),
        Client::Bulk => options
            .with_timeout_disabled()
            .with_read_timeout(BULK_READ_TIMEOUT),
    };
    let retry = RetryConfig {
        max_retries: 2,
        retry_timeout: Duration::from_secs(10),
        backoff: object_store::BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            base: 2.0,
        },
    };
    let bad =
        |e: object_store::Error| RegistryError::Config(format!("registry {url}: {}", short(&e)));
    match url.scheme() {
        "s3" | "s3a" | "https" | "http" => {
            let endpoint = ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"]
                .iter()
                .find_map(|key| std::env::var(key).ok())
                .unwrap_or_default();
            // A plain-HTTP endpoint (MinIO, a local test server) is meant as written.
            if endpoint.starts_with("http://") || url.scheme() == "http" {
                options = options.with_allow_http(true);
            }
            let mut builder = object_store::aws::AmazonS3Builder::from_env()
                .with_url(url.as_str())
                .with_client_options(options)
                .with_retry(retry);
            // Path-style addressing works with every S3-compatible server (MinIO, moto, R2,
            // Tigris); virtual-hosted style only where DNS has a name per bucket.
            if std::env::var_os("AWS_VIRTUAL_HOSTED_STYLE_REQUEST").is_none() {
                builder = builder.with_virtual_hosted_style_request(false);
            }
            Ok(Arc::new(builder.build().map_err(bad)?))
        }
        "gs" => Ok(Arc::new(
            object_store::gcp::GoogleCloudStorageBuilder::from_env()
                .with_url(url.as_str())
                .with_client_options(options)
                .with_retry(retry)
                .build()
                .map_err(bad)?,
        )),
        "az" | "azure" | "abfs" | "abfss" | "adl" => Ok(Arc::new(
            object_store::azure::MicrosoftAzureBuilder::from_env()
                .with_url(url.as_str())
                .with_client_options(options)
                .with_retry(retry)
                .build()
                .map_err(bad)?,
        )),
        other => Err(RegistryError::Config(format!(
            "registry URI scheme '{other}:' is not supported; use s3://, gs://, az://, file:// or a path"
        ))),
    }
}

/// An exclusive advisory lock on a local registry's `.lock` file, released when dropped.
struct LocalLock(std::fs::File);

impl LocalLock {
    async fn take(root: &FsPath) -> Result<LocalLock, RegistryError> {
        let path = root.join(".lock");
        tokio::task::spawn_blocking(move || {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|e| {
                    RegistryError::Local(format!("cannot open {}: {e}", path.display()))
                })?;
            use std::os::fd::AsRawFd;
            // SAFETY: flock on a descriptor this function owns.
            let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if locked != 0 {
                return Err(RegistryError::Local(format!(
                    "cannot lock {}: {}",
                    path.display(),
                    std::io::Error::last_os_error()
                )));
            }
            Ok(LocalLock(file))
        })
        .await
        .map_err(|e| RegistryError::Local(format!("lock task: {e}")))?
    }
}

impl Drop for LocalLock {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: unlocking the descriptor this value owns.
        unsafe {
            libc::flock(self.0.as_raw_fd(), libc::LOCK_UN);
        }
    }
}
