//! A version's probe: a golden input and the answer it must give, within a tolerance, kept as
//! `probe.json` beside the model file. The supervisor sends it through the version's real
//! router every `every_secs` and before a deployment gives the version traffic; a failing
//! probe shows in `/metrics`, the log, the status page, readiness (with `--probe-readiness`),
//! and fails a canary or rolling step, which rolls back.
//!
//! The file is not tied to one model file's sha256 on purpose: the same probe travels with
//! the next version, which is exactly what it must still answer.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::tensor::{DataType, NamedTensor};

/// The probe's file name, in the directory of the model file.
pub const PROBE_FILE: &str = "probe.json";

/// How often a probe runs when its file does not say.
pub const DEFAULT_EVERY_SECS: u64 = 30;

/// Largest probe file read: a golden input is one small request.
const MAX_PROBE_BYTES: u64 = 4 << 20;

/// A tensor as KServe v2's JSON writes it (the `inputs` of a request, the `outputs` of an
/// answer).
#[derive(Debug, Deserialize)]
pub struct TensorJson {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
    pub data: Box<RawValue>,
}

impl TensorJson {
    /// The tensor, decoded as the REST API decodes a request's input.
    pub fn decode(&self) -> Result<NamedTensor, String> {
        let datatype = DataType::parse(&self.datatype)
            .ok_or_else(|| format!("'{}': unknown datatype {}", self.name, self.datatype))?;
        let data = crate::api::json_tensor::parse(&self.data, datatype, &self.shape)
            .map_err(|e| format!("'{}': {e}", self.name))?;
        Ok(NamedTensor {
            name: self.name.clone(),
            shape: self.shape.clone(),
            data,
        })
    }
}

/// One expected output: its values, within `|got - want| <= atol + rtol * |want|`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expected {
    pub name: String,
    pub data: Vec<f64>,
    #[serde(default)]
    pub atol: Option<f64>,
    #[serde(default)]
    pub rtol: Option<f64>,
}

/// The contents of `probe.json`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    pub inputs: Vec<TensorJson>,
    pub outputs: Vec<Expected>,
    #[serde(default = "default_atol")]
    pub atol: f64,
    #[serde(default = "default_rtol")]
    pub rtol: f64,
    #[serde(default = "default_every")]
    pub every_secs: u64,
}

fn default_atol() -> f64 {
    1e-4
}
fn default_rtol() -> f64 {
    1e-3
}
fn default_every() -> u64 {
    DEFAULT_EVERY_SECS
}

impl Probe {
    pub fn path_beside(model_file: &Path) -> PathBuf {
        model_file
            .parent()
            .unwrap_or(Path::new("."))
            .join(PROBE_FILE)
    }

    /// The probe beside `model_file`, if any; a probe that cannot be read or decoded is an
    /// error, so that a typo does not silently turn the check off.
    pub fn load_beside(model_file: &Path) -> Result<Option<Probe>, String> {
        let path = Probe::path_beside(model_file);
        let text = match std::fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
            Ok(m) if m.len() > MAX_PROBE_BYTES => {
                return Err(format!(
                    "{} is over {MAX_PROBE_BYTES} bytes",
                    path.display()
                ))
            }
            Ok(_) => std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
        };
        let probe: Probe = serde_json::from_str(&text)
            .map_err(|e| format!("{} is not a probe: {e}", path.display()))?;
        probe
            .check_shape()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Some(probe))
    }

    fn check_shape(&self) -> Result<(), String> {
        self.inputs()?;
        if self.outputs.is_empty() {
            return Err("a probe expects at least one output".into());
        }
        let bad = |t: f64| !t.is_finite() || t < 0.0;
        if bad(self.atol) || bad(self.rtol) || self.every_secs == 0 {
            return Err("atol and rtol must be finite and >= 0, every_secs >= 1".into());
        }
        Ok(())
    }

    pub fn every(&self) -> Duration {
        Duration::from_secs(self.every_secs)
    }

    /// The golden inputs, decoded.
    pub fn inputs(&self) -> Result<Vec<NamedTensor>, String> {
        self.inputs.iter().map(TensorJson::decode).collect()
    }

    /// The output names the probe checks, in its order (what it asks the model for).
    pub fn output_names(&self) -> Vec<String> {
        self.outputs.iter().map(|e| e.name.clone()).collect()
    }

    /// Checks the model's answer; the error names the first value out of tolerance.
    pub fn judge(&self, answer: &[NamedTensor]) -> Result<(), String> {
        for expected in &self.outputs {
            let Some(got) = answer.iter().find(|t| t.name == expected.name) else {
                return Err(format!("output '{}' is missing", expected.name));
            };
            let mut values = Vec::with_capacity(expected.data.len());
            super::values::visit(&got.data, |v| values.push(v));
            if values.len() != expected.data.len() {
                return Err(format!(
                    "output '{}' has {} values, expected {}",
                    expected.name,
                    values.len(),
                    expected.data.len()
                ));
            }
            let atol = expected.atol.unwrap_or(self.atol);
            let rtol = expected.rtol.unwrap_or(self.rtol);
            for (i, (&g, &w)) in values.iter().zip(&expected.data).enumerate() {
                let ok = (g - w).abs() <= atol + rtol * w.abs();
                if !ok {
                    return Err(format!(
                        "output '{}'[{i}] is {g}, expected {w} (atol {atol}, rtol {rtol})",
                        expected.name
                    ));
                }
            }
        }
        Ok(())
    }

    /// A probe made from one golden input and the answer the model gave it.
    pub fn write_json(inputs: &[NamedTensor], answer: &[NamedTensor]) -> String {
        let tensor = |t: &NamedTensor| {
            let mut values = Vec::new();
            super::values::visit(&t.data, |v| values.push(v));
            (t.name.clone(), t.shape.clone(), t.data.datatype(), values)
        };
        let inputs: Vec<serde_json::Value> = inputs
            .iter()
            .map(tensor)
            .map(|(name, shape, dt, data)| {
                let data: serde_json::Value = match dt {
                    DataType::Bool => data.iter().map(|&v| v != 0.0).collect(),
                    _ => data.into(),
                };
                serde_json::json!({ "name": name, "shape": shape, "datatype": dt.as_str(), "data": data })
            })
            .collect();
        let outputs: Vec<serde_json::Value> = answer
            .iter()
            .map(tensor)
            .map(|(name, _, _, data)| serde_json::json!({ "name": name, "data": data }))
            .collect();
        let probe = serde_json::json!({
            "inputs": inputs, "outputs": outputs,
            "atol": default_atol(), "rtol": default_rtol(), "every_secs": DEFAULT_EVERY_SECS,
        });
        serde_json::to_string_pretty(&probe).expect("JSON values serialize")
    }
}

/// What one probe check found.
#[derive(Clone, Debug, PartialEq)]
pub enum ProbeOutcome {
    Passed,
    /// The version answered wrongly, or could not answer.
    Failed(String),
    /// The version was not checked: its fallback answered, or the server shed or timed out the
    /// probe under load. Neither a pass nor a failure, so that an overload does not roll back a
    /// good canary.
    Inconclusive(String),
}

/// What the probe said last, and how often it ran and failed.
#[derive(Clone, Debug, Default)]
pub struct ProbeRecord {
    pub checks: u64,
    pub failures: u64,
    /// The last check's error; `None` when it passed (or before the first).
    pub last_error: Option<String>,
    /// Seconds since the Unix epoch of the last check.
    pub last_check_unix: f64,
    /// A check is on its way (the supervisor sends one at a time).
    pub running: bool,
    /// When the next check is due, in milliseconds of the process's uptime.
    pub next_due_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::TensorData;

    fn probe(text: &str) -> Probe {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn judge_passes_within_tolerance_and_names_the_first_value_out_of_it() {
        let p = probe(
            r#"{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}],
                "outputs":[{"name":"y","data":[1.0, 100.0]}], "atol":0.01, "rtol":0.01}"#,
        );
        assert!(p.check_shape().is_ok());
        let y = |a: f32, b: f32| NamedTensor {
            name: "y".into(),
            shape: vec![1, 2],
            data: TensorData::Fp32(vec![a, b]),
        };
        assert!(p.judge(&[y(1.005, 100.9)]).is_ok());
        let err = p.judge(&[y(1.0, 102.0)]).unwrap_err();
        assert!(err.starts_with("output 'y'[1] is 102"), "{err}");
        assert!(p.judge(&[]).unwrap_err().contains("missing"));
    }

    #[test]
    fn a_probe_file_is_checked_when_read() {
        let dir = std::env::temp_dir().join(format!("probe-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let model = dir.join("model.onnx");
        assert!(Probe::load_beside(&model).unwrap().is_none());
        std::fs::write(dir.join(PROBE_FILE), r#"{"inputs":[],"outputs":[]}"#).unwrap();
        assert!(Probe::load_beside(&model)
            .unwrap_err()
            .contains("at least one output"));
        std::fs::write(
            dir.join(PROBE_FILE),
            r#"{"inputs":[], "outputs":[{"name":"y","data":[1]}], "colour":1}"#,
        )
        .unwrap();
        assert!(
            Probe::load_beside(&model).is_err(),
            "unknown keys are refused"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
