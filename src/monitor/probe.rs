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

use crate::tensor::{DataType, NamedTensor, TensorData};

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

    /// A probe made from one golden input and the answer the model gave it. Each input is
    /// written in its own type (an INT64 beyond 2^53 through `f64` would come back as another
    /// number, or as one the server refuses); a NaN or infinity, in the input or the answer,
    /// has no JSON number and is refused.
    pub fn write_json(
        inputs: &[NamedTensor],
        answer: &[NamedTensor],
    ) -> Result<String, ProbeWriteError> {
        let inputs = inputs
            .iter()
            .map(|t| {
                if let Some(index) = first_non_finite(&t.data) {
                    return Err(ProbeWriteError::NonFiniteInput {
                        name: t.name.clone(),
                        index,
                    });
                }
                Ok(InputOut {
                    name: &t.name,
                    shape: &t.shape,
                    datatype: t.data.datatype().as_str(),
                    data: typed_json(&t.data),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let outputs = answer
            .iter()
            .map(|t| {
                let mut data = Vec::new();
                super::values::visit(&t.data, |v| data.push(v));
                match data.iter().position(|v| !v.is_finite()) {
                    Some(index) => Err(ProbeWriteError::NonFiniteOutput {
                        name: t.name.clone(),
                        index,
                    }),
                    None => Ok(OutputOut {
                        name: &t.name,
                        data,
                    }),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let probe = ProbeOut {
            inputs,
            outputs,
            atol: default_atol(),
            rtol: default_rtol(),
            every_secs: DEFAULT_EVERY_SECS,
        };
        Ok(serde_json::to_string_pretty(&probe).expect("JSON values serialize"))
    }
}

/// Why no probe could be written from a request and its answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProbeWriteError {
    #[error("input '{name}' value {index} is not finite: a probe's input must be JSON numbers")]
    NonFiniteInput { name: String, index: usize },
    #[error("the answer's output '{name}' value {index} is not finite (NaN or infinity): a probe cannot expect it")]
    NonFiniteOutput { name: String, index: usize },
}

#[derive(serde::Serialize)]
struct ProbeOut<'a> {
    inputs: Vec<InputOut<'a>>,
    outputs: Vec<OutputOut<'a>>,
    atol: f64,
    rtol: f64,
    every_secs: u64,
}

#[derive(serde::Serialize)]
struct InputOut<'a> {
    name: &'a str,
    shape: &'a [i64],
    datatype: &'static str,
    data: Box<RawValue>,
}

#[derive(serde::Serialize)]
struct OutputOut<'a> {
    name: &'a str,
    data: Vec<f64>,
}

/// A tensor's values as a JSON array of its own element type: integers exactly, floats in
/// their shortest form that reads back as the same value, booleans as booleans.
fn typed_json(data: &TensorData) -> Box<RawValue> {
    let text = crate::with_tensor_data!(data, v => serde_json::to_string(v));
    RawValue::from_string(text.expect("finite values serialize")).expect("serde_json wrote JSON")
}

/// The index of the first NaN or infinity of a float tensor.
fn first_non_finite(data: &TensorData) -> Option<usize> {
    match data {
        TensorData::Fp32(v) => v.iter().position(|x| !x.is_finite()),
        TensorData::Fp64(v) => v.iter().position(|x| !x.is_finite()),
        _ => None,
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

    #[test]
    fn a_written_probe_keeps_each_input_type_and_refuses_non_finite_values() {
        let tensor = |name: &str, data: TensorData| NamedTensor {
            name: name.into(),
            shape: vec![1, data.len() as i64],
            data,
        };
        let inputs = [
            tensor("a", TensorData::Int64(vec![i64::MAX, -3])),
            tensor("u", TensorData::Uint64(vec![u64::MAX])),
            tensor("x", TensorData::Fp32(vec![0.1, 3e38])),
            tensor("m", TensorData::Bool(vec![true, false])),
        ];
        let answer = [tensor("y", TensorData::Fp32(vec![1.5]))];
        let text = Probe::write_json(&inputs, &answer).unwrap();
        let probe: Probe = serde_json::from_str(&text).unwrap();
        let decoded = probe.inputs().unwrap();
        for (read, written) in decoded.iter().zip(&inputs) {
            assert_eq!(read.data, written.data, "{text}");
        }
        assert!(probe.judge(&answer).is_ok());

        let nan = [tensor("y", TensorData::Fp32(vec![1.0, f32::NAN]))];
        assert_eq!(
            Probe::write_json(&inputs, &nan),
            Err(ProbeWriteError::NonFiniteOutput {
                name: "y".into(),
                index: 1
            })
        );
        let inf = [tensor("x", TensorData::Fp64(vec![f64::INFINITY]))];
        assert!(matches!(
            Probe::write_json(&inf, &answer),
            Err(ProbeWriteError::NonFiniteInput { .. })
        ));
    }
}
