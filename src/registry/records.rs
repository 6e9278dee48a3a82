//! The registry's documents, as JSON: a version's record, a model's desired state (its
//! default, the rollout in progress, its history) and an instance's heartbeat report.
//! docs/registry.md shows each with an example; `format` lets a later reader refuse a newer
//! document instead of misreading it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The format these types write; a document with a higher one is refused.
pub const FORMAT: u32 = 1;

/// How a new version takes over a model's traffic across the fleet (docs/registry.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Loaded beside the old version everywhere, then switched everywhere at once.
    BlueGreen,
    /// A growing share of the whole service's traffic, step by step, judged on errors and
    /// latency against the stable version.
    Canary,
    /// Instances switch one at a time, each after the previous one stayed healthy on the new
    /// version for `hold_secs`.
    Rolling,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Strategy::BlueGreen => "blue_green",
            Strategy::Canary => "canary",
            Strategy::Rolling => "rolling",
        }
    }
}

/// One published version: `models/<name>/<version>/version.json`. Written once, never
/// overwritten.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VersionRecord {
    pub format: u32,
    pub name: String,
    pub version: String,
    /// The model file's object name, beside this record (`<sha256>.onnx`).
    pub file: String,
    pub sha256: String,
    pub size: u64,
    /// Serving settings: the keys of a `[[models]]` entry in `models.toml` other than name,
    /// version, file and sha256 (replicas, batching, fallback, inputs, ...).
    #[serde(default)]
    pub settings: toml::Table,
    /// Inputs and outputs as the ONNX file declares them, read when it was pushed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<Interface>,
    #[serde(default)]
    pub description: String,
    /// Where the model came from (training run, commit, dataset): free text.
    #[serde(default)]
    pub source: String,
    pub pushed_by: String,
    pub pushed_at_ms: u64,
    /// The version's drift reference (`profile.json`, checked against `sha256`) and its
    /// golden-input probe (`probe.json`), when they were beside the model file it was pushed
    /// from; instances write them back beside their copy of the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Interface {
    pub inputs: Vec<TensorDecl>,
    pub outputs: Vec<TensorDecl>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TensorDecl {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
}

/// A model's desired state: `models/<name>/desired.json`. Written by `registry deploy` and
/// `rollback`, and by instances when a rollout moves on; always with `If-Match`, so that two
/// writers never overwrite each other.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Desired {
    pub format: u32,
    pub model: String,
    /// The version that takes the model's traffic outside a rollout's share.
    pub default: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
    /// What happened to the model, oldest first; the last [`HISTORY_KEPT`] entries.
    #[serde(default)]
    pub history: Vec<Event>,
}

/// Entries of a model's history kept in its desired state.
pub const HISTORY_KEPT: usize = 100;

impl Desired {
    pub fn new(model: &str) -> Desired {
        Desired {
            format: FORMAT,
            model: model.to_string(),
            ..Desired::default()
        }
    }

    /// Appends to the history, dropping the oldest beyond [`HISTORY_KEPT`].
    pub fn record(&mut self, event: Event) {
        self.history.push(event);
        let over = self.history.len().saturating_sub(HISTORY_KEPT);
        self.history.drain(..over);
    }
}

/// A rollout in progress.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Rollout {
    /// Unique per rollout, so that reports about an earlier one are not taken for this one.
    pub id: String,
    pub strategy: Strategy,
    pub version: String,
    /// The default when it started (what a rollback returns to); none for a first version.
    pub from: Option<String>,
    pub started_at_ms: u64,
    pub started_by: String,
    /// Canary: the new version's share of traffic at each step, in percent, ending at 100.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<u32>,
    /// Canary: seconds per step, timed from `started_at_ms` on every instance alike.
    #[serde(default)]
    pub step_secs: u64,
    /// Rolling: seconds an instance must stay healthy on the new version before the next
    /// one switches.
    #[serde(default)]
    pub hold_secs: u64,
    /// Whether instances send a request of zeros through the new version before it serves.
    pub smoke_test: bool,
    /// Rolling: the instances that switched, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub switched: Vec<Switched>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Switched {
    pub instance: String,
    pub at_ms: u64,
}

/// One entry of a model's history.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub at_ms: u64,
    pub event: EventKind,
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
    pub by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A rollout started.
    Deploy,
    /// Blue/green: every instance had the new version loaded; all switched.
    Switched,
    /// Canary: every step passed; the canary is the default.
    Promoted,
    /// Rolling: every instance switched and held.
    RolledOut,
    /// A rollout was stopped (a failed gate, an operator) or the default was put back.
    RolledBack,
}

impl EventKind {
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Deploy => "deploy",
            EventKind::Switched => "switched",
            EventKind::Promoted => "promoted",
            EventKind::RolledOut => "rolled_out",
            EventKind::RolledBack => "rolled_back",
        }
    }
}

/// An instance's heartbeat: `instances/<id>.json`, rewritten every poll.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct InstanceReport {
    pub format: u32,
    pub id: String,
    /// Where it can be reached, if it was told (`--advertise-url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    pub streamserve: String,
    /// Random, new at every process start: a report under this id written by another boot
    /// while this process runs means two processes were given the same `--instance-id`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub boot: String,
    /// Set while another process writes this id's report too (a duplicate `--instance-id`):
    /// what this one saw of it. The two overwrite each other's report, so the fleet counts
    /// them as one instance and reads each one's part in a rollout only half the time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate: Option<String>,
    pub started_at_ms: u64,
    pub heartbeat_at_ms: u64,
    pub poll_ms: u64,
    /// Why its last poll of the registry failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_error: Option<String>,
    pub models: BTreeMap<String, ModelReport>,
}

/// What an instance serves of one model.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ModelReport {
    /// The version requests without a version go to here.
    pub default: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryShare>,
    /// Every version it knows, with its state and counters.
    pub versions: BTreeMap<String, VersionReport>,
    /// Its part in the model's rollout, if one is running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutReport>,
    /// Versions of the desired state it could not get (download, checksum), with why.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unavailable: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CanaryShare {
    pub version: String,
    pub percent: u32,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct VersionReport {
    /// READY, UNAVAILABLE, LOADING or UNLOADED.
    pub state: String,
    pub requests: u64,
    pub errors: u64,
}

/// An instance's part in a rollout.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RolloutReport {
    /// The rollout this is about.
    pub id: String,
    /// The new version is loaded here (and passed its smoke test).
    pub prepared: bool,
    /// Why it cannot go on here: the new version would not load, or failed its gate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
    /// Canary: the last step this instance judged and passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passed_step: Option<usize>,
    /// Rolling: since when the new version has been the default here, healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_since_ms: Option<u64>,
}
