//! The registry of served models: which names and versions exist, which version is the
//! default, and where each version's router is.
//!
//! Exactly one writer (the supervisor) publishes a new immutable [`Catalog`] snapshot; request
//! handlers read the current snapshot without locks, so a lookup costs one atomic load.

use std::collections::BTreeMap;
use std::sync::Arc;

use actix::Addr;
use arc_swap::ArcSwap;

use super::router::{ModelHealth, Router};
use crate::error::ServeError;
use crate::manifest::{compare_versions, ModelEntry};
use crate::model::ModelInfo;

/// A version that is being served.
#[derive(Clone)]
pub struct ServedModel {
    pub info: Arc<ModelInfo>,
    pub router: Addr<Router>,
    pub health: Arc<ModelHealth>,
}

/// One version's state in the catalog.
#[derive(Clone)]
pub enum VersionState {
    Serving(ServedModel),
    /// Listed in the manifest but refused (bad hash, load failure), with the reason.
    Unavailable {
        entry: Arc<ModelEntry>,
        reason: String,
    },
}

#[derive(Clone, Default)]
pub struct ModelVersions {
    pub versions: BTreeMap<String, VersionState>,
}

impl ModelVersions {
    /// The highest version that is serving, else the highest listed.
    pub fn default_version(&self) -> Option<&str> {
        let serving = self
            .versions
            .iter()
            .filter(|(_, s)| matches!(s, VersionState::Serving(_)))
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
    /// Finds a serving model version; the default version when `version` is `None`.
    pub fn resolve(&self, name: &str, version: Option<&str>) -> Result<ServedModel, ServeError> {
        let model = self
            .models
            .get(name)
            .ok_or_else(|| ServeError::ModelNotFound(name.to_string()))?;
        let version = match version {
            Some(v) => v,
            None => model.default_version().unwrap_or_default(),
        };
        match model.versions.get(version) {
            Some(VersionState::Serving(served)) => Ok(served.clone()),
            Some(VersionState::Unavailable { reason, .. }) => Err(ServeError::ModelUnavailable {
                model: format!("{name}:{version}"),
                reason: reason.clone(),
            }),
            None => Err(ServeError::VersionNotFound {
                model: name.to_string(),
                version: version.to_string(),
                available: model.sorted_versions().join(", "),
            }),
        }
    }

    /// Ready when every serving version has at least one healthy replica.
    pub fn ready(&self) -> bool {
        self.models
            .values()
            .flat_map(|m| m.versions.values())
            .all(|state| match state {
                VersionState::Serving(served) => served.health.ready(),
                VersionState::Unavailable { .. } => true,
            })
    }
}

#[derive(Default)]
pub struct Registry {
    catalog: ArcSwap<Catalog>,
}

impl Registry {
    pub fn snapshot(&self) -> Arc<Catalog> {
        self.catalog.load_full()
    }

    /// Only the supervisor publishes.
    pub(super) fn publish(&self, catalog: Catalog) {
        self.catalog.store(Arc::new(catalog));
    }
}
