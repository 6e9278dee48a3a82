//! A model version's reference profile: what its outputs (and the ranges of its inputs) looked
//! like on a reference data set, the yardstick that drift is measured against. It is made once
//! (`streamserve profile`, or frozen from the first answers after load), kept as
//! `profile.json` beside the model file, and tied to the model by its sha256: a profile made
//! for other weights is refused, not silently used.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::bins::{Edges, BUCKETS};
use super::values::{visit_sampled, Reservoir, MAX_VALUES_PER_CALL};
use crate::tensor::NamedTensor;

/// The profile's file name, in the directory of the model file it describes.
pub const PROFILE_FILE: &str = "profile.json";

/// The version of the file's format.
const FORMAT: u32 = 1;

/// Values kept per output to cut its buckets from.
const SAMPLE_CAPACITY: usize = 100_000;

/// The profile of one model version.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub format: u32,
    /// The model file this profile describes.
    pub model_sha256: String,
    /// The reference data set it was made from (absent when frozen from live answers).
    #[serde(default)]
    pub data_sha256: Option<String>,
    /// Rows the model answered to make it.
    pub rows: u64,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
    pub outputs: BTreeMap<String, OutputProfile>,
    #[serde(default)]
    pub inputs: BTreeMap<String, InputRange>,
}

/// One output's buckets and the reference's share of values in each (`+Inf` last).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputProfile {
    pub edges: Edges,
    pub shares: Vec<f64>,
}

/// The finite range an input took in the reference data.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputRange {
    pub min: f64,
    pub max: f64,
}

impl Profile {
    /// Where the profile of the model file `model_file` lives.
    pub fn path_beside(model_file: &Path) -> PathBuf {
        model_file
            .parent()
            .unwrap_or(Path::new("."))
            .join(PROFILE_FILE)
    }

    /// The profile beside `model_file`, if there is one; an unreadable profile, or one made
    /// for another model file, is an error that says which.
    pub fn load_beside(model_file: &Path, model_sha256: &str) -> Result<Option<Profile>, String> {
        let path = Profile::path_beside(model_file);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let profile: Profile = serde_json::from_str(&text)
            .map_err(|e| format!("{} is not a profile: {e}", path.display()))?;
        profile
            .check(model_sha256)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Some(profile))
    }

    fn check(&self, model_sha256: &str) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!("format {} is not {FORMAT}", self.format));
        }
        if !self.model_sha256.eq_ignore_ascii_case(model_sha256) {
            return Err(format!(
                "made for the model with sha256 {}, not this one ({model_sha256})",
                self.model_sha256
            ));
        }
        for (name, output) in &self.outputs {
            let sorted = output.edges.0.windows(2).all(|w| w[0] < w[1]);
            if !sorted || output.shares.len() != output.edges.buckets() {
                return Err(format!(
                    "output '{name}': edges must increase and there must be one share per bucket"
                ));
            }
        }
        Ok(())
    }
}

/// Collects what a profile is made of, model call by model call.
#[derive(Debug)]
pub struct ProfileBuilder {
    outputs: Vec<(String, Reservoir)>,
    inputs: BTreeMap<String, InputRange>,
    rows: u64,
    /// Calls added: where the next call's stride starts (`values::visit_sampled`).
    calls: usize,
}

impl ProfileBuilder {
    pub fn new(outputs: &[String]) -> ProfileBuilder {
        ProfileBuilder {
            outputs: outputs
                .iter()
                .map(|name| (name.clone(), Reservoir::new(SAMPLE_CAPACITY)))
                .collect(),
            inputs: BTreeMap::new(),
            rows: 0,
            calls: 0,
        }
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Adds one model call's outputs (matched by name) and the `rows` it answered.
    pub fn add_outputs(&mut self, outputs: &[NamedTensor], rows: usize) {
        self.calls = self.calls.wrapping_add(1);
        for (name, reservoir) in &mut self.outputs {
            if let Some(output) = outputs.iter().find(|o| &o.name == name) {
                visit_sampled(&output.data, MAX_VALUES_PER_CALL, self.calls, |v| {
                    reservoir.offer(v)
                });
            }
        }
        self.rows += rows as u64;
    }

    /// Widens the recorded range of input `name` to cover `[min, max]`.
    pub fn add_input_range(&mut self, name: &str, min: f64, max: f64) {
        if !(min.is_finite() && max.is_finite()) {
            return;
        }
        let range = self
            .inputs
            .entry(name.to_string())
            .or_insert(InputRange { min, max });
        range.min = range.min.min(min);
        range.max = range.max.max(max);
    }

    /// The profile of what was added.
    pub fn finish(self, model_sha256: &str, data_sha256: Option<String>) -> Profile {
        let outputs = self
            .outputs
            .into_iter()
            .map(|(name, reservoir)| {
                let mut values = reservoir.into_values();
                let edges = Edges::from_quantiles(&mut values, BUCKETS);
                let shares = edges.shares(&values);
                (name, OutputProfile { edges, shares })
            })
            .collect();
        Profile {
            format: FORMAT,
            model_sha256: model_sha256.to_string(),
            data_sha256,
            rows: self.rows,
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            outputs,
            inputs: self.inputs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::TensorData;

    #[test]
    fn a_profile_is_tied_to_its_model_and_checked_when_read() {
        let dir = std::env::temp_dir().join(format!("profile-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let model = dir.join("model.onnx");
        assert!(Profile::load_beside(&model, "aa").unwrap().is_none());

        let mut builder = ProfileBuilder::new(&["y".to_string()]);
        let y = NamedTensor {
            name: "y".into(),
            shape: vec![100],
            data: TensorData::Fp32((0..100).map(|i| i as f32).collect()),
        };
        builder.add_outputs(&[y], 100);
        builder.add_input_range("x", -1.0, 2.0);
        let profile = builder.finish("aa", None);
        assert_eq!(profile.rows, 100);
        assert_eq!(
            profile.outputs["y"].shares.len(),
            profile.outputs["y"].edges.buckets()
        );
        let path = Profile::path_beside(&model);
        std::fs::write(&path, serde_json::to_string(&profile).unwrap()).unwrap();

        assert!(Profile::load_beside(&model, "AA").unwrap().is_some());
        let other = Profile::load_beside(&model, "bb").unwrap_err();
        assert!(other.contains("not this one"), "{other}");
        std::fs::write(&path, "{}").unwrap();
        assert!(Profile::load_beside(&model, "aa").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
