//! Watching the model itself, not only the process: for every served version, what its inputs
//! and outputs look like (histograms with buckets fixed per version, NaN and infinity counts,
//! input ranges), how far its outputs have drifted from a reference profile (PSI per output),
//! and whether its golden-input probe still passes.
//!
//! One [`ModelWatch`] per served version. Its workers record each model call into it (one
//! short lock per call, after the call, on the worker's thread), the supervisor records each
//! probe, and `/metrics` ([`render`]), the admin API and the status page read it. Nothing here
//! touches actix or ONNX Runtime.

mod bins;
mod inputs;
pub mod probe;
pub mod profile;
mod render;
pub mod stream;
mod values;

use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

pub use bins::{psi, Edges};
use probe::{Probe, ProbeOutcome, ProbeRecord};
use profile::{Profile, ProfileBuilder};
pub use render::{render, render_version_up};

use crate::tensor::{NamedTensor, TensorData};
use inputs::InputWatch;
/// Calls `f` with every value of a tensor as `f64`, whatever its element type.
pub use values::visit as visit_values;
use values::{count_nan, visit_sampled, MAX_VALUES_PER_CALL};

/// The monitor's settings (flags `--monitor-outputs`, `--drift-reference-rows`,
/// `--drift-window-rows`).
#[derive(Clone, Copy, Debug)]
pub struct WatchSettings {
    /// Off: workers record nothing and the model's series are absent (the probe still runs).
    pub enabled: bool,
    /// Without a profile, the reference is frozen from this many answered rows.
    pub reference_rows: u64,
    /// Each drift score is computed over this many rows.
    pub window_rows: u64,
    /// A version whose last probe failed answers "not ready" (`--probe-readiness`).
    pub probe_gates_readiness: bool,
}

impl Default for WatchSettings {
    fn default() -> Self {
        WatchSettings {
            enabled: true,
            reference_rows: 1000,
            window_rows: 1000,
            probe_gates_readiness: false,
        }
    }
}

/// Where a version's reference profile came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReferenceSource {
    /// A `profile.json` made by `streamserve profile` from a reference data set.
    Profile,
    /// Frozen from the first answers after load (no profile was published with the version).
    FirstAnswers,
    /// Still collecting the first answers; no drift score yet.
    Collecting,
    /// Output monitoring is off.
    Off,
}

impl ReferenceSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ReferenceSource::Profile => "profile",
            ReferenceSource::FirstAnswers => "first_answers",
            ReferenceSource::Collecting => "collecting",
            ReferenceSource::Off => "off",
        }
    }
}

/// One output's drift against the reference: the population stability index over the
/// reference's buckets, for the last complete window (`None` before the first window, and
/// after a window of nothing but NaN, which `nan_only_window` then says).
#[derive(Clone, Debug, Serialize)]
pub struct OutputDrift {
    pub name: String,
    pub psi: Option<f64>,
    pub nan_only_window: bool,
}

/// The last probe results of a version that has a probe.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeSummary {
    /// The last check passed (true before the first check).
    pub passing: bool,
    pub checks: u64,
    pub failures: u64,
    pub last_error: Option<String>,
}

/// What the monitor knows of one version, for the status page and the admin API.
#[derive(Clone, Debug, Serialize)]
pub struct WatchSummary {
    pub reference: ReferenceSource,
    /// Rows the model answered since it was loaded.
    pub rows: u64,
    pub outputs: Vec<OutputDrift>,
    pub probe: Option<ProbeSummary>,
}

/// The monitor of one served model version.
#[derive(Debug)]
pub struct ModelWatch {
    pub model: String,
    pub version: String,
    settings: WatchSettings,
    model_sha256: String,
    input_names: Vec<String>,
    state: Mutex<State>,
    probe: Option<Probe>,
    probe_record: Mutex<ProbeRecord>,
    /// Set for versions that serve VAD streams.
    stream: Option<stream::StreamStats>,
}

#[derive(Debug)]
struct State {
    rows: u64,
    reference: Reference,
    outputs: Vec<OutputWatch>,
    inputs: Vec<InputWatch>,
}

#[derive(Debug)]
enum Reference {
    Profile,
    FirstAnswers,
    Collecting(Box<ProfileBuilder>),
    Off,
}

/// One output's histogram on the reference's buckets, and its drift window.
#[derive(Debug)]
struct OutputWatch {
    name: String,
    edges: Edges,
    shares: Vec<f64>,
    /// Values per bucket since load (not cumulative; `/metrics` adds them up), of the
    /// values read at the stride.
    counts: Vec<u64>,
    sum: f64,
    /// Every NaN since load, not only the stride's.
    nan: u64,
    window: Vec<u64>,
    window_rows: u64,
    window_nan: u64,
    psi: Option<f64>,
    /// The last complete window held nothing but NaN (so it has no score).
    nan_only_window: bool,
    /// Calls observed: where the next call's stride starts (`values::visit_sampled`).
    calls: usize,
}

impl ModelWatch {
    /// The watch of a version with these inputs and outputs. `profile` (already checked
    /// against the model's sha256) fixes the buckets from the start; without it they are
    /// frozen from the first `reference_rows` answered rows.
    pub fn new(
        identity: (&str, &str, &str),
        interface: (&[String], &[String]),
        settings: WatchSettings,
        profile: Option<Profile>,
        probe: Option<Probe>,
    ) -> ModelWatch {
        let (model, version, sha256) = identity;
        let (inputs, outputs) = interface;
        let (reference, output_watches) = match (settings.enabled, profile) {
            (false, _) => (Reference::Off, Vec::new()),
            (true, Some(profile)) => (Reference::Profile, output_watches(&profile)),
            (true, None) => (
                Reference::Collecting(Box::new(ProfileBuilder::new(outputs))),
                Vec::new(),
            ),
        };
        let input_watches = inputs
            .iter()
            .map(|name| InputWatch {
                name: name.clone(),
                ..InputWatch::default()
            })
            .collect();
        let next_due_ms = crate::telemetry::uptime_ms();
        ModelWatch {
            model: model.to_string(),
            version: version.to_string(),
            settings,
            model_sha256: sha256.to_string(),
            input_names: inputs.to_vec(),
            state: Mutex::new(State {
                rows: 0,
                reference,
                outputs: output_watches,
                inputs: input_watches,
            }),
            probe,
            probe_record: Mutex::new(ProbeRecord {
                next_due_ms,
                ..ProbeRecord::default()
            }),
            stream: None,
        }
    }

    /// The same watch, also adding up what the version's VAD streams found.
    pub fn with_stream_stats(mut self) -> ModelWatch {
        self.stream = Some(stream::StreamStats::default());
        self
    }

    /// The VAD stream totals, for a version that serves streams.
    pub fn stream_stats(&self) -> Option<&stream::StreamStats> {
        self.stream.as_ref()
    }

    /// A watch that records nothing (tests, versions loaded without one).
    pub fn off(model: &str, version: &str) -> ModelWatch {
        let settings = WatchSettings {
            enabled: false,
            ..WatchSettings::default()
        };
        ModelWatch::new((model, version, ""), (&[], &[]), settings, None, None)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one model call: its inputs (in the model's input order), all its outputs, and
    /// the rows it answered.
    pub fn observe(&self, inputs: &[&TensorData], outputs: &[NamedTensor], rows: usize) {
        if !self.settings.enabled {
            return;
        }
        let mut state = self.state();
        let state = &mut *state;
        state.rows += rows as u64;
        for (watch, data) in state.inputs.iter_mut().zip(inputs) {
            watch.observe(data);
        }
        if let Reference::Collecting(builder) = &mut state.reference {
            builder.add_outputs(outputs, rows);
            for watch in &state.inputs {
                if watch.seen {
                    builder.add_input_range(&watch.name, watch.min, watch.max);
                }
            }
            // Rows of NaN answers are no reference: wait for enough finite values in every
            // output, or every later window would be scored against empty buckets.
            let wanted = self.settings.reference_rows;
            if builder.rows() >= wanted && builder.has_finite_rows(wanted) {
                let Reference::Collecting(builder) =
                    std::mem::replace(&mut state.reference, Reference::FirstAnswers)
                else {
                    unreachable!()
                };
                let nan: Vec<(String, u64)> = builder
                    .nan_counts()
                    .map(|(name, n)| (name.to_string(), n))
                    .collect();
                let profile = builder.finish(&self.model_sha256, None);
                state.outputs = output_watches(&profile);
                // The NaN counters go on from what was counted while collecting.
                for watch in &mut state.outputs {
                    if let Some((_, n)) = nan.iter().find(|(name, _)| *name == watch.name) {
                        watch.nan = *n;
                    }
                }
                tracing::info!(
                    model = %self.model, version = %self.version, rows = profile.rows,
                    "drift reference frozen from the first answers (no profile.json published with this version)"
                );
            }
            return;
        }
        for watch in &mut state.outputs {
            if let Some(output) = outputs.iter().find(|o| o.name == watch.name) {
                watch.observe(&output.data, rows as u64, self.settings.window_rows);
            }
        }
    }

    /// What the monitor knows now.
    pub fn summary(&self) -> WatchSummary {
        let state = self.state();
        WatchSummary {
            reference: state.reference.source(),
            rows: state.rows,
            outputs: state
                .outputs
                .iter()
                .map(|o| OutputDrift {
                    name: o.name.clone(),
                    psi: o.psi,
                    nan_only_window: o.nan_only_window,
                })
                .collect(),
            probe: self.probe.as_ref().map(|_| {
                let record = self.probe_record();
                ProbeSummary {
                    passing: record.last_error.is_none(),
                    checks: record.checks,
                    failures: record.failures,
                    last_error: record.last_error.clone(),
                }
            }),
        }
    }

    /// The version's probe, if it has one.
    pub fn probe(&self) -> Option<&Probe> {
        self.probe.as_ref()
    }

    fn probe_record(&self) -> MutexGuard<'_, ProbeRecord> {
        self.probe_record.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a probe check is due at `now_ms` (process uptime); marks it running if so, so
    /// that one check at a time is sent.
    pub fn take_due_probe(&self, now_ms: u64) -> bool {
        let Some(probe) = &self.probe else {
            return false;
        };
        let mut record = self.probe_record();
        if record.running || now_ms < record.next_due_ms {
            return false;
        }
        record.running = true;
        record.next_due_ms = now_ms + probe.every().as_millis() as u64;
        true
    }

    /// Records a probe check's outcome; logs when the probe starts or stops failing.
    pub fn record_probe(&self, outcome: ProbeOutcome) {
        let mut record = self.probe_record();
        record.running = false;
        let outcome = match outcome {
            ProbeOutcome::Passed => Ok(()),
            ProbeOutcome::Failed(error) => Err(error),
            ProbeOutcome::Inconclusive(why) => {
                tracing::debug!(model = %self.model, version = %self.version, %why, "probe inconclusive");
                return;
            }
        };
        record.checks += 1;
        record.last_check_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        match outcome {
            Ok(()) => {
                if let Some(was) = record.last_error.take() {
                    tracing::info!(model = %self.model, version = %self.version, was = %was, "probe passes again");
                }
            }
            Err(error) => {
                record.failures += 1;
                if record.last_error.is_none() {
                    tracing::warn!(model = %self.model, version = %self.version, %error, "probe failed");
                }
                record.last_error = Some(error);
            }
        }
    }

    /// The last probe check failed (false without a probe or before the first check).
    pub fn probe_failing(&self) -> Option<String> {
        self.probe.as_ref()?;
        self.probe_record().last_error.clone()
    }

    /// Whether the probe keeps this version from answering "ready": it failed last, and the
    /// server was told to let probes gate readiness.
    pub fn blocks_readiness(&self) -> bool {
        self.settings.probe_gates_readiness && self.probe_failing().is_some()
    }

    /// The input names, in the model's order.
    pub fn input_names(&self) -> &[String] {
        &self.input_names
    }
}

impl Reference {
    fn source(&self) -> ReferenceSource {
        match self {
            Reference::Profile => ReferenceSource::Profile,
            Reference::FirstAnswers => ReferenceSource::FirstAnswers,
            Reference::Collecting(_) => ReferenceSource::Collecting,
            Reference::Off => ReferenceSource::Off,
        }
    }
}

fn output_watches(profile: &Profile) -> Vec<OutputWatch> {
    profile
        .outputs
        .iter()
        .map(|(name, p)| OutputWatch {
            name: name.clone(),
            counts: vec![0; p.edges.buckets()],
            window: vec![0; p.edges.buckets()],
            edges: p.edges.clone(),
            shares: p.shares.clone(),
            sum: 0.0,
            nan: 0,
            window_rows: 0,
            window_nan: 0,
            psi: None,
            nan_only_window: false,
            calls: 0,
        })
        .collect()
}

impl OutputWatch {
    fn observe(&mut self, data: &TensorData, rows: u64, window_rows: u64) {
        self.calls = self.calls.wrapping_add(1);
        // NaN over every value, not the stride: one NaN in a large output is a wrong answer,
        // and a sample would see it once in a stride's worth of calls.
        let nan = count_nan(data);
        self.nan += nan;
        self.window_nan += nan;
        visit_sampled(data, MAX_VALUES_PER_CALL, self.calls, |v| {
            if v.is_nan() {
                return;
            }
            let bucket = self.edges.bucket(v);
            self.counts[bucket] += 1;
            self.window[bucket] += 1;
            self.sum += v;
        });
        self.window_rows += rows;
        if self.window_rows >= window_rows.max(1) {
            // A window without a single non-NaN value has no distribution to score: its
            // score is cleared rather than the last one kept, which would show an all-NaN
            // model as stable. The NaN counter (and its alert) says what happened.
            self.psi = psi(&self.shares, &self.window);
            self.nan_only_window = self.psi.is_none() && self.window_nan > 0;
            self.window.iter_mut().for_each(|c| *c = 0);
            self.window_rows = 0;
            self.window_nan = 0;
        }
    }
}

/// A version's watch as its workers hold it: set once the version's interface is known
/// (after the first worker loaded), so a worker started before that records nothing.
#[derive(Debug, Default)]
pub struct OnceWatch(std::sync::OnceLock<Arc<ModelWatch>>);

impl OnceWatch {
    pub fn set(&self, watch: Arc<ModelWatch>) {
        let _ = self.0.set(watch);
    }

    pub fn get(&self) -> Option<&ModelWatch> {
        self.0.get().map(|w| &**w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_inconclusive_probe_neither_passes_nor_fails_and_one_check_runs_at_a_time() {
        let probe: Probe =
            serde_json::from_str(r#"{"inputs": [], "outputs": [{"name": "y", "data": [1]}]}"#)
                .unwrap();
        let settings = WatchSettings {
            probe_gates_readiness: true,
            ..WatchSettings::default()
        };
        let watch = ModelWatch::new(("m", "1", ""), (&[], &[]), settings, None, Some(probe));
        let now = crate::telemetry::uptime_ms();
        assert!(watch.take_due_probe(now));
        assert!(!watch.take_due_probe(now + 60_000), "one check at a time");
        watch.record_probe(ProbeOutcome::Failed("wrong".into()));
        assert_eq!(watch.probe_failing().as_deref(), Some("wrong"));
        assert!(watch.blocks_readiness());
        watch.record_probe(ProbeOutcome::Inconclusive("shed".into()));
        assert_eq!(watch.probe_failing().as_deref(), Some("wrong"), "unchanged");
        assert_eq!(watch.summary().probe.unwrap().checks, 1);
        watch.record_probe(ProbeOutcome::Passed);
        assert!(watch.probe_failing().is_none() && !watch.blocks_readiness());
        assert!(
            !watch.take_due_probe(now + 1000),
            "the next is due every_secs later"
        );
        assert!(watch.take_due_probe(now + 31_000));
    }
}
