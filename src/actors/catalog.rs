//! The catalog of served models: which names and versions exist, which version is the
//! default, and where each version's router is.
//!
//! Exactly one writer (the supervisor) publishes a new immutable [`Catalog`] snapshot; request
//! handlers read the current snapshot without locks, so a lookup costs one atomic load.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

pub use super::served::ServedModel;
use crate::error::ServeError;
use crate::manifest::{compare_versions, ModelEntry};
use crate::model::ModelInfo;

/// One version's state in the catalog.
#[derive(Clone)]
pub enum VersionState {
    Serving(ServedModel),
    /// Listed in the manifest but refused (bad hash, load failure), with the reason.
    Unavailable {
        entry: Arc<ModelEntry>,
        reason: String,
    },
    /// Not loaded (lazy, or unloaded after idling): the first request loads it.
    Cold {
        entry: Arc<ModelEntry>,
        /// Why the last attempt to load it failed, if it did (e.g. memory it did not fit).
        last_error: Option<String>,
    },
    /// Being loaded; requests wait for it.
    Loading {
        entry: Arc<ModelEntry>,
    },
}

impl VersionState {
    pub fn label(&self) -> &'static str {
        match self {
            VersionState::Serving(served) if served.health.ready() => "READY",
            VersionState::Serving(_) | VersionState::Unavailable { .. } => "UNAVAILABLE",
            VersionState::Cold { .. } => "UNLOADED",
            VersionState::Loading { .. } => "LOADING",
        }
    }
}

/// A version receiving a share of a model's default traffic while it proves itself.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Canary {
    pub version: String,
    pub percent: u32,
}

#[derive(Clone, Default)]
pub struct ModelVersions {
    pub versions: BTreeMap<String, VersionState>,
    /// The version a deployment made the default.
    pub default_override: Option<String>,
    /// The manifest's default: its highest eagerly loaded version (lazy versions are
    /// candidates for a deployment), or its highest version if all are lazy.
    pub manifest_default: Option<String>,
    pub canary: Option<Canary>,
    /// A model registry routes it: its default is the one the registry pinned, even before
    /// that version is listed here (requests wait for it rather than go to another).
    pub fleet_managed: bool,
}

impl ModelVersions {
    /// The deployed default if one was set, else the manifest's default, else the highest
    /// version that can serve, else the highest listed.
    pub fn default_version(&self) -> Option<&str> {
        let listed = |v: &&str| self.fleet_managed || self.versions.contains_key(*v);
        if let Some(version) = self.default_override.as_deref().filter(listed) {
            return Some(version);
        }
        if let Some(version) = self.manifest_default.as_deref().filter(listed) {
            return Some(version);
        }
        let serving = self
            .versions
            .iter()
            .filter(|(_, s)| !matches!(s, VersionState::Unavailable { .. }))
            .map(|(v, _)| v.as_str())
            .max_by(|a, b| compare_versions(a, b));
        serving.or_else(|| {
            self.versions
                .keys()
                .map(String::as_str)
                .max_by(|a, b| compare_versions(a, b))
        })
    }

    pub fn sorted_versions(&self) -> Vec<String> {
        let mut versions: Vec<String> = self.versions.keys().cloned().collect();
        versions.sort_by(|a, b| compare_versions(a, b));
        versions
    }
}

#[derive(Clone, Default)]
pub struct Catalog {
    pub models: BTreeMap<String, ModelVersions>,
}

impl Catalog {
    /// The model monitors of every serving version, in name and version order.
    pub fn watches(&self) -> Vec<std::sync::Arc<crate::monitor::ModelWatch>> {
        self.models
            .values()
            .flat_map(|m| m.versions.values())
            .filter_map(|state| match state {
                VersionState::Serving(served) => Some(served.watch.clone()),
                _ => None,
            })
            .collect()
    }

    /// The sha256 of a listed version's file, whatever its state now: a version unloaded
    /// since it answered still names the file that computed the answer.
    pub fn sha256_of(&self, name: &str, version: &str) -> Option<&str> {
        Some(match self.models.get(name)?.versions.get(version)? {
            VersionState::Serving(served) => &served.info.sha256,
            VersionState::Unavailable { entry, .. }
            | VersionState::Cold { entry, .. }
            | VersionState::Loading { entry } => &entry.sha256,
        })
    }

    /// Finds a serving model version; the default version when `version` is `None`. The
    /// handle is held ([`ServedModel::held`]) for as long as the caller keeps it.
    pub fn resolve(&self, name: &str, version: Option<&str>) -> Result<ServedModel, ServeError> {
        let model = self
            .models
            .get(name)
            .ok_or_else(|| ServeError::ModelNotFound(name.to_string()))?;
        let version = match version {
            Some(v) => v,
            None => match &model.canary {
                Some(canary) if canary_pick(canary.percent) => canary.version.as_str(),
                _ => model.default_version().unwrap_or_default(),
            },
        };
        match model.versions.get(version) {
            // Held: the version is not unloaded for idleness while the caller has it.
            Some(VersionState::Serving(served)) => Ok(served.held()),
            Some(VersionState::Unavailable { reason, .. }) => Err(ServeError::ModelUnavailable {
                model: format!("{name}:{version}"),
                reason: reason.clone(),
            }),
            Some(VersionState::Cold { .. } | VersionState::Loading { .. }) => {
                Err(ServeError::ModelCold {
                    model: name.to_string(),
                    version: version.to_string(),
                })
            }
            // The registry's default, not fetched here yet.
            None if model.fleet_managed && model.default_override.as_deref() == Some(version) => {
                Err(ServeError::NotReady {
                    model: name.to_string(),
                    reason: format!("version {version} is still being fetched from the registry"),
                    retry_after: std::time::Duration::from_secs(5),
                })
            }
            None => Err(ServeError::VersionNotFound {
                model: name.to_string(),
                version: version.to_string(),
                available: model.sorted_versions().join(", "),
            }),
        }
    }

    /// The version of `name` a request to it goes to, if that one can take `of`'s requests
    /// now: serving with a healthy replica, and its model takes the same inputs and gives the
    /// same outputs ([`ModelInfo::fallback_mismatch`]). What a model's fallback must be to take
    /// a request, for the router's handoffs and for the door's overflow alike. `Err`: it serves,
    /// but its model cannot take `of`'s requests, and why.
    pub fn ready_fallback(
        &self,
        name: &str,
        of: &ModelInfo,
    ) -> Result<Option<ServedModel>, String> {
        let Some(fallback) = self
            .resolve(name, None)
            .ok()
            .filter(|served| served.health.ready())
        else {
            return Ok(None);
        };
        match of.fallback_mismatch(&fallback.info) {
            Some(why) => Err(why),
            None => Ok(Some(fallback)),
        }
    }

    /// Ready when every serving version has at least one healthy replica, and some listed
    /// version can serve (is serving, loading, or loadable on a request). A refused model
    /// leaves the server ready for the others; one that lists only refused versions (a bad
    /// hash, a memory budget nothing fits) is not ready, rather than ready for nothing.
    pub fn ready(&self) -> bool {
        let mut versions = self.models.values().flat_map(|m| m.versions.values());
        let (mut listed, mut can_serve) = (false, false);
        let healthy = versions.all(|state| {
            listed = true;
            match state {
                VersionState::Serving(served) => {
                    can_serve = true;
                    served.health.ready()
                }
                VersionState::Loading { .. }
                | VersionState::Cold {
                    last_error: None, ..
                } => {
                    can_serve = true;
                    true
                }
                VersionState::Cold { .. } | VersionState::Unavailable { .. } => true,
            }
        });
        healthy && (can_serve || !listed)
    }
}

/// The published catalog. Only the supervisor publishes; everyone else reads snapshots.
#[derive(Default)]
pub struct SharedCatalog {
    catalog: ArcSwap<Catalog>,
}

impl SharedCatalog {
    pub fn snapshot(&self) -> Arc<Catalog> {
        self.catalog.load_full()
    }

    /// Only the supervisor publishes.
    pub(super) fn publish(&self, catalog: Catalog) {
        self.catalog.store(Arc::new(catalog));
    }
}

/// Whether this request goes to the canary: `percent` of requests, spread evenly.
fn canary_pick(percent: u32) -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // Fibonacci hashing scatters consecutive requests over 0..100.
    ((n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % 100) < percent as u64
}
