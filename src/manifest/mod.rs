//! The model directory's manifest (`models.toml`): which models exist, in which versions,
//! where their files are, the sha256 each must have, and how each is served.
//!
//! This file holds what the rest of the server uses: [`Manifest`] and its resolved
//! [`ModelEntry`]s, and the order of versions. The rest is split by concern:
//! - `types`: the value types a manifest's keys take (device, batch axis, input declarations).
//! - `raw`: the file format as written, which serde reads, misspelt keys refused.
//! - `resolve`: reading the file, applying `[defaults]` and checking each entry.
//! - `sha256`: hashing model files against the manifest.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

mod raw;
mod resolve;
mod sha256;
mod stream;
mod types;

pub use sha256::{sha256_file, verify_sha256};
pub use stream::{
    audio_window, ConstantDecl, GateDecl, OutputDecl, StageDecl, StreamDecl, StreamKind, WindowDecl,
};
pub use types::{AllowedValue, BatchAxis, Device, InputDecl, LoadPolicy};

pub const MANIFEST_FILE: &str = "models.toml";

/// Dynamic micro-batching settings for one model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batching {
    /// Largest number of rows (requests' batch dimensions added up) in one model call.
    /// 0 means the model has no batch axis and every request runs alone, as sent.
    pub max_batch_size: usize,
    /// Longest time the oldest queued request waits for others to join its batch.
    pub max_queue_delay: Duration,
}

/// One model version as the manifest describes it, with defaults applied and its file path
/// resolved against the model directory.
#[derive(Clone, Debug)]
pub struct ModelEntry {
    pub name: String,
    pub version: String,
    pub file: PathBuf,
    pub sha256: String,
    pub device: Device,
    /// Serve on CPU when the requested GPU cannot be used, instead of refusing the model.
    pub allow_cpu_fallback: bool,
    pub replicas: usize,
    /// Replica autoscaling bounds (both default to `replicas`: no autoscaling).
    pub min_replicas: usize,
    pub max_replicas: usize,
    pub intra_threads: usize,
    pub batching: Batching,
    /// Requests allowed to wait in the router's queue before new ones get 429.
    pub max_queue: usize,
    /// Latency objective for queueing: above this predicted wait the model counts as
    /// overloaded and new requests go to its fallback (if it has one).
    pub slo: Option<Duration>,
    /// A batch running longer than this means the worker is hung: it is replaced.
    pub hang_timeout: Duration,
    /// Load on the first request instead of at startup.
    pub lazy: bool,
    /// Unload after this long without a request (scale to zero); loads again on demand.
    pub idle_unload: Option<Duration>,
    pub fallback: Option<String>,
    /// Batch axis per tensor name, for tensors whose batch axis is not 0.
    pub batch_axes: BTreeMap<String, BatchAxis>,
    /// Set for models that serve WebSocket streams: how their stream steps.
    pub stream: Option<std::sync::Arc<StreamDecl>>,
    /// Accept NaN and infinities in float inputs (refused with 400 by default).
    pub allow_non_finite: bool,
    /// Declared constraints per input name.
    pub inputs: BTreeMap<String, InputDecl>,
    pub description: String,
    pub source: String,
}

#[derive(Clone, Debug)]
pub struct Manifest {
    pub dir: PathBuf,
    pub models: Vec<ModelEntry>,
}

/// Orders versions numerically where both are numbers, else as strings; the highest is the
/// default version of a model.
pub fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        _ => a.cmp(b),
    }
}

#[cfg(test)]
mod tests;
