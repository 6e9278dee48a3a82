//! The model registry: a shared store (object storage, or a local directory for one machine)
//! where whoever trains a model publishes its versions, and where the desired state of each
//! model lives (its default version, the rollout in progress, its history). Every serving
//! instance reads it, reports itself there, and converges to it.
//!
//! Layout under the registry's URI (docs/registry.md has the formats):
//!
//! ```text
//! models/<name>/<version>/version.json    the version record (immutable)
//! models/<name>/<version>/<sha256>.onnx   the model file it names
//! models/<name>/desired.json              desired state: default, rollout, history
//! instances/<id>.json                     each instance's heartbeat and what it serves
//! ```
//!
//! The parts: [`store`] (the object store), [`records`] (the documents), [`cache`] (an
//! instance's verified local copies), [`fleet`] (the pure rules of the fleet strategies), and
//! [`ops`] (publishing and deploying, what the `streamserve registry` commands do).

pub mod cache;
pub mod fleet;
pub mod ops;
pub mod records;
pub mod store;

pub use store::Store;

/// The version record of `name:version`.
pub fn version_key(name: &str, version: &str) -> String {
    format!("models/{name}/{version}/version.json")
}

/// The model file of `name:version` with this sha256.
pub fn file_key(name: &str, version: &str, sha256: &str) -> String {
    format!("models/{name}/{version}/{sha256}.onnx")
}

/// The desired state of `name`.
pub fn desired_key(name: &str) -> String {
    format!("models/{name}/desired.json")
}

/// The heartbeat of instance `id`.
pub fn instance_key(id: &str) -> String {
    format!("instances/{id}.json")
}

pub const MODELS_DIR: &str = "models";
pub const INSTANCES_DIR: &str = "instances";

/// What can go wrong with the registry, each with the words an operator needs.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    /// The URI or its settings are wrong.
    #[error("{0}")]
    Config(String),
    /// The store did not answer (network, credentials, server error).
    #[error("registry unreachable: {0}")]
    Unreachable(String),
    /// Someone else wrote the document first (a racing deploy), or the version exists.
    #[error("{0} was changed by someone else")]
    Conflict(String),
    #[error("{0} is not in the registry")]
    NotFound(String),
    /// A document or a file is not what it must be (bad JSON, sha256 mismatch).
    #[error("{0}")]
    Corrupt(String),
    /// A request that cannot be carried out as asked (bad name, a rollout already running).
    #[error("{0}")]
    Refused(String),
    /// The local side: a file to read, the cache to write.
    #[error("{0}")]
    Local(String),
}

impl RegistryError {
    /// The same error, its text followed by `note`.
    pub fn with_note(self, note: &str) -> RegistryError {
        let add = |text: String| format!("{text}; {note}");
        match self {
            RegistryError::Config(t) => RegistryError::Config(add(t)),
            RegistryError::Unreachable(t) => RegistryError::Unreachable(add(t)),
            RegistryError::Conflict(t) => RegistryError::Conflict(add(t)),
            RegistryError::NotFound(t) => RegistryError::NotFound(add(t)),
            RegistryError::Corrupt(t) => RegistryError::Corrupt(add(t)),
            RegistryError::Refused(t) => RegistryError::Refused(add(t)),
            RegistryError::Local(t) => RegistryError::Local(add(t)),
        }
    }
}

/// Model names and versions become object keys and file names: letters, digits, `_-.`, not
/// starting with a dot, at most 64 characters.
pub fn check_name(what: &str, value: &str) -> Result<(), RegistryError> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && !value.starts_with('.')
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::Refused(format!(
            "{what} '{}' must be 1-64 letters, digits, '_', '-' or '.', not starting with '.'",
            crate::untrusted::Untrusted(value)
        )))
    }
}

/// Milliseconds since the Unix epoch: the registry's clock (instances compare heartbeats and
/// rollout step times with it, so their clocks must agree to within a poll interval: NTP).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `at_ms` as an RFC 3339 time, for people.
pub fn rfc3339(at_ms: u64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(at_ms);
    humantime::format_rfc3339_seconds(at).to_string()
}

/// Who is acting: `$USER@host`, for version records and history.
pub fn whoami() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into());
    format!("{user}@{host}")
}
