//! `models.toml` as written: the keys serde reads, before defaults are applied. Every struct
//! denies unknown fields, so a misspelt key is an error rather than silently ignored.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::stream::StreamDecl;
use super::types::{BatchAxis, Device, InputDecl, LoadPolicy};

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDefaults {
    pub(super) device: Option<Device>,
    pub(super) allow_cpu_fallback: Option<bool>,
    pub(super) replicas: Option<usize>,
    pub(super) min_replicas: Option<usize>,
    pub(super) max_replicas: Option<usize>,
    pub(super) intra_threads: Option<usize>,
    pub(super) max_batch_size: Option<usize>,
    pub(super) max_queue_delay_ms: Option<f64>,
    pub(super) max_queue: Option<usize>,
    pub(super) slo_ms: Option<u64>,
    pub(super) hang_timeout_ms: Option<u64>,
    pub(super) load: Option<LoadPolicy>,
    pub(super) idle_unload_secs: Option<u64>,
    pub(super) allow_non_finite: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawModel {
    pub(super) name: String,
    pub(super) version: String,
    pub(super) file: PathBuf,
    pub(super) sha256: String,
    // The same keys as [defaults]; spelled out because serde cannot combine `flatten` with
    // `deny_unknown_fields`, and a misspelt key must be an error, not silently ignored.
    pub(super) device: Option<Device>,
    pub(super) allow_cpu_fallback: Option<bool>,
    pub(super) replicas: Option<usize>,
    pub(super) min_replicas: Option<usize>,
    pub(super) max_replicas: Option<usize>,
    pub(super) intra_threads: Option<usize>,
    pub(super) max_batch_size: Option<usize>,
    pub(super) max_queue_delay_ms: Option<f64>,
    pub(super) max_queue: Option<usize>,
    pub(super) slo_ms: Option<u64>,
    pub(super) hang_timeout_ms: Option<u64>,
    pub(super) load: Option<LoadPolicy>,
    pub(super) idle_unload_secs: Option<u64>,
    pub(super) allow_non_finite: Option<bool>,
    pub(super) fallback: Option<String>,
    #[serde(default)]
    pub(super) batch_axes: BTreeMap<String, BatchAxis>,
    #[serde(default)]
    pub(super) inputs: BTreeMap<String, InputDecl>,
    #[serde(default, deserialize_with = "super::stream::deserialize_stream")]
    pub(super) stream: Option<StreamDecl>,
    #[serde(default)]
    pub(super) description: String,
    #[serde(default)]
    pub(super) source: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawManifest {
    #[serde(default)]
    pub(super) defaults: RawDefaults,
    #[serde(default)]
    pub(super) models: Vec<RawModel>,
}
