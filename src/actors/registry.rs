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
use crate::manifest::{compare_versions, Device, ModelEntry};
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
#[derive(Clone, Debug, serde::Serialize)]
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
}

impl ModelVersions {
    /// The deployed default if one was set, else the manifest's default, else the highest
    /// version that can serve, else the highest listed.
    pub fn default_version(&self) -> Option<&str> {
        let listed = |v: &&str| self.versions.contains_key(*v);
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
    /// Finds a serving model version; the default version when `version` is `None`.
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
            Some(VersionState::Serving(served)) => Ok(served.clone()),
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
                _ => true,
            })
    }
}

pub struct Registry {
    catalog: ArcSwap<Catalog>,
    /// CPU threads that replicas may use, shared by all models' routers.
    pub cpu_budget: CpuBudget,
    /// Memory per device (RAM, VRAM per GPU) that replicas may use.
    pub memory: MemoryBudget,
}

/// Memory per device, in MiB: RAM for CPU replicas, VRAM for each GPU's. A version whose
/// replicas would not fit is refused when it loads, and autoscaling adds a replica only where it
/// fits, so models are packed onto devices by what they need. A replica is estimated at twice its
/// model file (weights plus ONNX Runtime's working memory).
#[derive(Debug)]
pub struct MemoryBudget {
    ram: std::sync::atomic::AtomicI64,
    pub ram_total_mb: i64,
    vram: Vec<std::sync::atomic::AtomicI64>,
    /// Per GPU; 0: VRAM is not budgeted.
    pub vram_total_mb: i64,
}

impl MemoryBudget {
    pub fn new(ram_mb: u64, vram_mb_per_gpu: u64) -> MemoryBudget {
        MemoryBudget {
            ram: std::sync::atomic::AtomicI64::new(ram_mb as i64),
            ram_total_mb: ram_mb as i64,
            vram: (0..16)
                .map(|_| std::sync::atomic::AtomicI64::new(vram_mb_per_gpu as i64))
                .collect(),
            vram_total_mb: vram_mb_per_gpu as i64,
        }
    }

    fn pool(&self, device: Device) -> Option<(&std::sync::atomic::AtomicI64, i64)> {
        match device {
            Device::Cpu => Some((&self.ram, self.ram_total_mb)),
            Device::Cuda(n) if self.vram_total_mb > 0 => {
                self.vram.get(n as usize).map(|a| (a, self.vram_total_mb))
            }
            Device::Cuda(_) => None,
        }
    }

    /// Takes `mb` on `device` if it fits; the error says how much is left.
    pub fn try_take(&self, device: Device, mb: u64) -> Result<(), String> {
        use std::sync::atomic::Ordering;
        let Some((pool, total)) = self.pool(device) else {
            return Ok(());
        };
        let want = mb as i64;
        pool.fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
            (left >= want).then_some(left - want)
        })
        .map(|_| ())
        .map_err(|left| {
            format!("needs about {mb} MiB on {device}, {left} MiB of its {total} MiB budget left")
        })
    }

    pub fn give_back(&self, device: Device, mb: u64) {
        if let Some((pool, _)) = self.pool(device) {
            pool.fetch_add(mb as i64, std::sync::atomic::Ordering::AcqRel);
        }
    }
}

/// Estimated memory of one replica of a model file, in MiB.
pub fn replica_memory_mb(model_file_bytes: u64) -> u64 {
    (model_file_bytes * 2).div_ceil(1 << 20)
}

/// What the machine has now, in MiB (`MemAvailable`), for a default RAM budget.
pub fn available_ram_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(u64::MAX >> 24, |kb| kb / 1024)
}

/// A budget of CPU threads (ONNX Runtime intra-op threads across all replicas). Routers take
/// from it to add replicas under load and give back when they scale down or unload, so models
/// share the machine by what they need. A plain atomic: taking never blocks anyone.
#[derive(Debug)]
pub struct CpuBudget {
    available: std::sync::atomic::AtomicI64,
    pub total: i64,
}

impl CpuBudget {
    pub fn new(total: usize) -> CpuBudget {
        CpuBudget {
            available: std::sync::atomic::AtomicI64::new(total as i64),
            total: total as i64,
        }
    }

    /// Takes `threads` if that many are left.
    pub fn try_take(&self, threads: usize) -> bool {
        use std::sync::atomic::Ordering;
        let threads = threads as i64;
        self.available
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                (left >= threads).then_some(left - threads)
            })
            .is_ok()
    }

    /// Takes `threads` even beyond the budget (a version's initial replicas); returns whether
    /// it fitted.
    pub fn take(&self, threads: usize) -> bool {
        self.available
            .fetch_sub(threads as i64, std::sync::atomic::Ordering::AcqRel)
            >= threads as i64
    }

    pub fn give_back(&self, threads: usize) {
        self.available
            .fetch_add(threads as i64, std::sync::atomic::Ordering::AcqRel);
    }

    pub fn available(&self) -> i64 {
        self.available.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new(
            std::thread::available_parallelism().map_or(2, |n| n.get()),
            available_ram_mb(),
            0,
        )
    }
}

impl Registry {
    pub fn new(cpu_threads: usize, ram_mb: u64, vram_mb_per_gpu: u64) -> Registry {
        Registry {
            catalog: ArcSwap::default(),
            cpu_budget: CpuBudget::new(cpu_threads),
            memory: MemoryBudget::new(ram_mb, vram_mb_per_gpu),
        }
    }

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
