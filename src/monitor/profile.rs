//! A model version's reference profile: what its outputs (and the ranges of its inputs) looked
//! like on a reference data set, the yardstick that drift is measured against. It is made once
//! (`streamserve profile`, or frozen from the first answers after load), kept as
//! `profile.json` beside the model file, and tied to the model by its sha256: a profile made
//! for other weights is refused, not silently used.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::bins::{Edges, BUCKETS};
use super::values::{count_nan, visit_sampled, Reservoir, MAX_VALUES_PER_CALL};
use crate::tensor::NamedTensor;

/// The profile's file name, in the directory of the model file it describes.
pub const PROFILE_FILE: &str = "profile.json";

/// The version of the file's format.
const FORMAT: u32 = 1;

/// Values kept per output to cut its buckets from.
const SAMPLE_CAPACITY: usize = 100_000;

/// How far a profile's shares may sum from 1: rounding in a hand-edited file (three
/// decimals), not a missing bucket.
const SHARES_SUM_TOLERANCE: f64 = 1e-3;

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
        self.check_outputs()
    }

    /// Checks that every output's buckets can measure drift: finite, increasing edges, one
    /// share per bucket, and shares that are a distribution (none negative, summing to 1).
    /// A profile of an output that had no finite value (shares `[0.0]`) would score every
    /// later window as a large shift, so it is refused, not used.
    pub fn check_outputs(&self) -> Result<(), String> {
        for (name, output) in &self.outputs {
            let edges = &output.edges.0;
            let sorted = edges.windows(2).all(|w| w[0] < w[1]);
            if !sorted
                || edges.iter().any(|e| !e.is_finite())
                || output.shares.len() != output.edges.buckets()
            {
                return Err(format!(
                    "output '{name}': edges must be finite and increase, and there must be one share per bucket"
                ));
            }
            let sum: f64 = output.shares.iter().sum();
            let bad_share = output.shares.iter().any(|s| !s.is_finite() || *s < 0.0);
            if bad_share || (sum - 1.0).abs() > SHARES_SUM_TOLERANCE {
                return Err(format!(
                    "output '{name}': shares must be >= 0 and sum to 1 (they sum to {sum}); \
                     was the reference data set's output all NaN?"
                ));
            }
        }
        Ok(())
    }
}

/// Collects what a profile is made of, model call by model call.
#[derive(Debug)]
pub struct ProfileBuilder {
    outputs: Vec<OutputSample>,
    inputs: BTreeMap<String, InputRange>,
    rows: u64,
    /// Calls added: where the next call's stride starts (`values::visit_sampled`).
    calls: usize,
}

/// One output's sample, how many of the values read were finite, and how many of all its
/// values were NaN: a reference is cut from finite values only, so rows of NaN answers must
/// not count towards it.
#[derive(Debug)]
struct OutputSample {
    name: String,
    reservoir: Reservoir,
    finite: u64,
    nan: u64,
    /// Rows' worth of finite values: each call's rows times the share of its values read
    /// that were finite.
    finite_rows: f64,
}

impl ProfileBuilder {
    pub fn new(outputs: &[String]) -> ProfileBuilder {
        ProfileBuilder {
            outputs: outputs
                .iter()
                .map(|name| OutputSample {
                    name: name.clone(),
                    reservoir: Reservoir::new(SAMPLE_CAPACITY),
                    finite: 0,
                    nan: 0,
                    finite_rows: 0.0,
                })
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
        for sample in &mut self.outputs {
            if let Some(output) = outputs.iter().find(|o| o.name == sample.name) {
                // Every NaN, as the watch counts once the reference is frozen: its counter goes
                // on from this one.
                sample.nan += count_nan(&output.data);
                let (mut read, mut finite) = (0u64, 0u64);
                visit_sampled(&output.data, MAX_VALUES_PER_CALL, self.calls, |v| {
                    read += 1;
                    if v.is_finite() {
                        finite += 1;
                    }
                    sample.reservoir.offer(v);
                });
                sample.finite += finite;
                if read > 0 {
                    sample.finite_rows += rows as f64 * finite as f64 / read as f64;
                }
            }
        }
        self.rows += rows as u64;
    }

    /// Whether every output gave at least `rows` rows' worth of finite values: what a
    /// reference frozen from live answers waits for, however many rows of NaN came first.
    pub fn has_finite_rows(&self, rows: u64) -> bool {
        self.outputs.iter().all(|o| o.finite_rows >= rows as f64)
    }

    /// The outputs that gave no finite value at all.
    pub fn without_finite_values(&self) -> Vec<&str> {
        self.outputs
            .iter()
            .filter(|o| o.finite == 0)
            .map(|o| o.name.as_str())
            .collect()
    }

    /// NaN values per output so far (every value, not only those sampled), in the builder's
    /// output order.
    pub fn nan_counts(&self) -> impl Iterator<Item = (&str, u64)> {
        self.outputs.iter().map(|o| (o.name.as_str(), o.nan))
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
            .map(
                |OutputSample {
                     name, reservoir, ..
                 }| {
                    let mut values = reservoir.into_values();
                    let edges = Edges::from_quantiles(&mut values, BUCKETS);
                    let shares = edges.shares(&values);
                    (name, OutputProfile { edges, shares })
                },
            )
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

    #[test]
    fn nan_answers_count_for_no_reference_and_a_profile_without_a_distribution_is_refused() {
        let y = |values: Vec<f32>| NamedTensor {
            name: "y".into(),
            shape: vec![values.len() as i64],
            data: TensorData::Fp32(values),
        };
        let mut builder = ProfileBuilder::new(&["y".to_string()]);
        builder.add_outputs(&[y(vec![f32::NAN; 64])], 64);
        assert_eq!(builder.rows(), 64);
        assert!(!builder.has_finite_rows(64), "rows of NaN are no reference");
        assert_eq!(builder.without_finite_values(), vec!["y"]);
        assert_eq!(builder.nan_counts().collect::<Vec<_>>(), vec![("y", 64)]);
        builder.add_outputs(&[y((0..32).map(|i| i as f32).collect())], 32);
        assert!(!builder.has_finite_rows(64));
        builder.add_outputs(&[y((0..64).map(|i| i as f32 * 0.5).collect())], 32);
        assert!(builder.has_finite_rows(64));
        assert!(builder.finish("aa", None).check_outputs().is_ok());

        let output = |edges: Vec<f64>, shares: Vec<f64>| {
            let mut profile = ProfileBuilder::new(&[]).finish("aa", None);
            profile.outputs.insert(
                "y".into(),
                OutputProfile {
                    edges: Edges(edges),
                    shares,
                },
            );
            profile.check_outputs()
        };
        let poisoned = output(vec![], vec![0.0]).unwrap_err();
        assert!(poisoned.contains("sum to 1"), "{poisoned}");
        assert!(
            output(vec![0.0], vec![1.5, -0.5]).is_err(),
            "no negative share"
        );
        assert!(output(vec![f64::NAN], vec![0.5, 0.5]).is_err());
        assert!(output(vec![0.0, 1.0], vec![0.333, 0.333, 0.334]).is_ok());
    }
}
