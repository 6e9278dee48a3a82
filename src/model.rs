//! What a served model version looks like to the rest of the server ([`ModelInfo`]), the
//! validated request that travels to its router ([`InferRequest`]), and the answer that comes
//! back ([`InferResponse`]).
//!
//! Validation happens once, here, before a request is queued: the router and workers can then
//! batch and pack without re-checking anything.

use std::time::Duration;

use crate::error::ServeError;
use crate::manifest::{BatchAxis, Batching, Device, StreamDecl, StreamKind};
use crate::rules::{self, InputRule};
use crate::runtime::TensorSpec;
use crate::tensor::{element_count, NamedTensor, TensorData};

/// The platform string of the Open Inference Protocol's model metadata.
pub const PLATFORM: &str = "onnxruntime_onnx";

#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub name: String,
    pub version: String,
    /// The inputs as the model declares them, except that an input the manifest declares
    /// shapes for shows the first of them (what metadata advertises).
    pub inputs: Vec<TensorSpec>,
    /// The manifest's rules per input (same order as `inputs`; most have none).
    pub input_rules: Vec<InputRule>,
    /// NaN and infinities in float inputs are accepted only when the manifest allows them.
    pub allow_non_finite: bool,
    pub outputs: Vec<TensorSpec>,
    pub batching: Batching,
    /// Batch axis of each input and output (same order as `inputs` / `outputs`).
    pub input_axes: Vec<BatchAxis>,
    pub output_axes: Vec<BatchAxis>,
    /// Set for models that serve WebSocket streams: how their stream steps.
    pub stream: Option<std::sync::Arc<StreamDecl>>,
    pub device: Device,
    pub replicas: usize,
    pub max_queue: usize,
    pub fallback: Option<String>,
    /// The manifest's `slo_ms`: a request (or stream chunk) that would wait longer goes to
    /// the fallback.
    pub slo: Option<std::time::Duration>,
    pub sha256: String,
    pub description: String,
    pub source: String,
    /// What serving this version takes, as the registry estimates it.
    pub resources: Resources,
}

impl ModelInfo {
    /// What the model's streams produce, if it serves streams.
    pub fn stream_kind(&self) -> Option<StreamKind> {
        self.stream.as_ref().map(|s| s.kind)
    }

    /// Why `fallback` cannot answer this model's requests, if it cannot: a request validated
    /// for this model goes to the fallback as it is, so every input must be there with the
    /// same type, rank and fixed dimensions (a free dimension, -1, matches any), and every
    /// output this model answers with too. The manifest only names a fallback; what its
    /// model takes is known once both are loaded.
    pub fn fallback_mismatch(&self, fallback: &ModelInfo) -> Option<String> {
        let differs = |what: &str, ours: &[TensorSpec], theirs: &[TensorSpec]| {
            ours.iter().find_map(|spec| {
                let Some(other) = theirs.iter().find(|t| t.name == spec.name) else {
                    return Some(format!("it has no {what} '{}'", spec.name));
                };
                let dims_agree = spec.shape.len() == other.shape.len()
                    && spec
                        .shape
                        .iter()
                        .zip(&other.shape)
                        .all(|(a, b)| a == b || *a < 0 || *b < 0);
                (other.datatype != spec.datatype || !dims_agree).then(|| {
                    format!(
                        "its {what} '{}' is {} {:?}, not {} {:?}",
                        spec.name, other.datatype, other.shape, spec.datatype, spec.shape
                    )
                })
            })
        };
        let why = differs("input", &self.inputs, &fallback.inputs)
            .or_else(|| differs("output", &self.outputs, &fallback.outputs))?;
        Some(format!(
            "fallback '{}' of model '{}' cannot take its requests: {why}",
            fallback.name, self.name
        ))
    }
}

/// Resource needs of a model version: CPU threads of its replicas, and a memory estimate
/// (twice the model file per replica: weights plus ONNX Runtime's working memory), on the
/// device it runs on.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Resources {
    pub cpu_threads: usize,
    pub ram_mb: u64,
    pub vram_mb: u64,
    pub model_file_bytes: u64,
}

/// A request that passed validation: inputs in the model's input order, the number of rows
/// it adds to a batch, and the indices of the outputs to return.
#[derive(Debug)]
pub struct InferRequest {
    pub inputs: Vec<NamedTensor>,
    pub rows: usize,
    pub outputs: Vec<usize>,
}

impl InferRequest {
    /// Requests may share a model call only when every batched input agrees on every axis but
    /// its batch axis, and every shared input is identical.
    pub fn batches_with(&self, other: &InferRequest, axes: &[BatchAxis]) -> bool {
        self.inputs
            .iter()
            .zip(&other.inputs)
            .zip(axes)
            .all(|((a, b), axis)| match *axis {
                BatchAxis::Axis(k) => {
                    a.shape.len() == b.shape.len()
                        && a.shape
                            .iter()
                            .zip(&b.shape)
                            .enumerate()
                            .all(|(i, (x, y))| i == k || x == y)
                }
                BatchAxis::Shared => a.shape == b.shape && a.data == b.data,
            })
    }
}

#[derive(Debug)]
pub struct InferResponse {
    pub outputs: Vec<NamedTensor>,
    /// Rows in the model call that served this request (its own plus its batch mates').
    pub batch_size: usize,
    pub queue_time: Duration,
    pub compute_time: Duration,
    /// The model and version whose worker computed this answer.
    pub served_by: std::sync::Arc<(String, String)>,
    /// True when the requested model handed the request to its fallback.
    pub degraded: bool,
}

impl ModelInfo {
    pub fn batched(&self) -> bool {
        self.batching.max_batch_size > 0
    }

    /// Checks inputs against the model's declared interface, orders them as the model expects
    /// and resolves the requested output names. Every error says which input and why.
    pub fn validate(
        &self,
        mut inputs: Vec<NamedTensor>,
        requested_outputs: Option<Vec<String>>,
    ) -> Result<InferRequest, ServeError> {
        let name = &self.name;
        for (i, input) in inputs.iter().enumerate() {
            if !self.inputs.iter().any(|s| s.name == input.name) {
                return Err(ServeError::invalid(format!(
                    "model '{name}' has no input '{}' (inputs: {})",
                    input.name,
                    names(&self.inputs)
                )));
            }
            if inputs[..i].iter().any(|other| other.name == input.name) {
                return Err(ServeError::invalid(format!(
                    "input '{}' is given twice",
                    input.name
                )));
            }
        }
        let mut ordered = Vec::with_capacity(self.inputs.len());
        for (spec, axis) in self.inputs.iter().zip(&self.input_axes) {
            let Some(pos) = inputs.iter().position(|t| t.name == spec.name) else {
                return Err(ServeError::invalid(format!(
                    "model '{name}' needs input '{}' ({} {:?}), which the request lacks",
                    spec.name, spec.datatype, spec.shape
                )));
            };
            let tensor = inputs.swap_remove(pos);
            self.check_tensor(ordered.len(), *axis, &tensor)?;
            ordered.push(tensor);
        }
        for i in 0..ordered.len() {
            rules::check_pairing(&self.inputs, &self.input_rules, i, &ordered)
                .map_err(ServeError::InvalidRequest)?;
        }

        let rows = if self.batched() {
            let mut batch: Option<(i64, &str)> = None;
            for (tensor, axis) in ordered.iter().zip(&self.input_axes) {
                let BatchAxis::Axis(k) = *axis else { continue };
                let here = tensor.shape[k];
                match batch {
                    None => batch = Some((here, &tensor.name)),
                    Some((rows, first)) if rows != here => {
                        return Err(ServeError::invalid(format!(
                            "inputs disagree on the batch size: '{first}' has {rows} rows, '{}' has {here}",
                            tensor.name
                        )))
                    }
                    Some(_) => {}
                }
            }
            let rows = batch.map_or(1, |(rows, _)| rows as usize);
            if rows > self.batching.max_batch_size {
                return Err(ServeError::invalid(format!(
                    "batch of {rows} rows exceeds model '{name}' max_batch_size of {}",
                    self.batching.max_batch_size
                )));
            }
            rows
        } else {
            1
        };

        let outputs = match requested_outputs {
            None => (0..self.outputs.len()).collect(),
            Some(requested) => {
                let mut indices = Vec::with_capacity(requested.len());
                for wanted in requested {
                    let Some(i) = self.outputs.iter().position(|s| s.name == wanted) else {
                        return Err(ServeError::invalid(format!(
                            "model '{name}' has no output '{wanted}' (outputs: {})",
                            names(&self.outputs)
                        )));
                    };
                    if indices.contains(&i) {
                        return Err(ServeError::invalid(format!(
                            "output '{wanted}' is requested twice"
                        )));
                    }
                    indices.push(i);
                }
                indices
            }
        };
        Ok(InferRequest {
            inputs: ordered,
            rows,
            outputs,
        })
    }

    /// Checks input `i`: datatype, shape (the spec's, or one of the manifest's declared shapes),
    /// element count, declared values, and that floats are finite.
    fn check_tensor(
        &self,
        i: usize,
        axis: BatchAxis,
        tensor: &NamedTensor,
    ) -> Result<(), ServeError> {
        let spec = &self.inputs[i];
        let rule = self.input_rules.get(i);
        let input = &spec.name;
        if tensor.data.datatype() != spec.datatype {
            return Err(ServeError::invalid(format!(
                "input '{input}' must be {}, got {}",
                spec.datatype,
                tensor.data.datatype()
            )));
        }
        if let Some(got) = tensor.shape.iter().find(|&&d| d < 0) {
            return Err(ServeError::invalid(format!(
                "input '{input}' has negative dimension {got} in shape {:?}",
                tensor.shape
            )));
        }
        if rule.is_some_and(|r| r.shapes.len() > 1) {
            rules::check_shapes(&self.name, &self.inputs, &self.input_rules, i, tensor)
                .map_err(ServeError::InvalidRequest)?;
        } else {
            if tensor.shape.len() != spec.shape.len() {
                return Err(ServeError::invalid(format!(
                    "input '{input}' must have {} dimensions {:?}, got shape {:?}",
                    spec.shape.len(),
                    spec.shape,
                    tensor.shape
                )));
            }
            for (axis, (&want, &got)) in spec.shape.iter().zip(&tensor.shape).enumerate() {
                if want >= 0 && want != got {
                    return Err(ServeError::invalid(format!(
                        "input '{input}' dimension {axis} must be {want}, got shape {:?} (expected {:?})",
                        tensor.shape, spec.shape
                    )));
                }
            }
        }
        let batch_dim = match axis {
            BatchAxis::Axis(k) if self.batched() => tensor.shape.get(k).copied(),
            _ => None,
        };
        if batch_dim == Some(0) {
            return Err(ServeError::invalid(format!(
                "input '{input}' has an empty batch (shape {:?})",
                tensor.shape
            )));
        }
        let expected = element_count(&tensor.shape).ok_or_else(|| {
            ServeError::invalid(format!(
                "input '{input}' shape {:?} is too large",
                tensor.shape
            ))
        })?;
        if expected != tensor.data.len() {
            return Err(ServeError::invalid(format!(
                "input '{input}' shape {:?} needs {expected} elements, got {}",
                tensor.shape,
                tensor.data.len()
            )));
        }
        if let Some(rule) = rule {
            rules::check_values(input, &rule.values, &tensor.data)
                .map_err(ServeError::InvalidRequest)?;
        }
        if !self.allow_non_finite {
            if let Some((element, value)) = first_non_finite(&tensor.data) {
                return Err(ServeError::invalid(format!(
                    "input '{input}' element {element} is {value}: model '{}' takes finite {} values only",
                    self.name, spec.datatype
                )));
            }
        }
        Ok(())
    }

    /// One request that passes validation: zeros (or each input's first declared value) in
    /// the advertised shapes, dynamic dimensions 1. For smoke tests of a freshly loaded
    /// version.
    pub fn example_inputs(&self) -> Vec<NamedTensor> {
        self.inputs
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let shape: Vec<i64> = spec.shape.iter().map(|&d| d.max(1)).collect();
                let count = element_count(&shape).unwrap_or(0);
                let value = self
                    .input_rules
                    .get(i)
                    .and_then(|r| r.values.first().copied());
                NamedTensor {
                    name: spec.name.clone(),
                    shape,
                    data: rules::filled(spec.datatype, count, value),
                }
            })
            .collect()
    }
}

/// The first NaN or infinity of a float tensor: its index and how it reads. One pass over
/// the data, cheap beside decoding it; integer tensors are skipped.
fn first_non_finite(data: &TensorData) -> Option<(usize, String)> {
    let (i, value) = match data {
        TensorData::Fp32(v) => v
            .iter()
            .position(|x| !x.is_finite())
            .map(|i| (i, v[i] as f64))?,
        TensorData::Fp64(v) => v.iter().position(|x| !x.is_finite()).map(|i| (i, v[i]))?,
        _ => return None,
    };
    Some((
        i,
        if value.is_nan() {
            "NaN".into()
        } else {
            format!("{value}")
        },
    ))
}

fn names(specs: &[TensorSpec]) -> String {
    specs
        .iter()
        .map(|s| s.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DataType;

    fn info() -> ModelInfo {
        ModelInfo {
            name: "m".into(),
            version: "1".into(),
            inputs: vec![
                TensorSpec {
                    name: "x".into(),
                    datatype: DataType::Fp32,
                    shape: vec![-1, 2],
                },
                TensorSpec {
                    name: "y".into(),
                    datatype: DataType::Int64,
                    shape: vec![-1, 1],
                },
            ],
            outputs: vec![TensorSpec {
                name: "z".into(),
                datatype: DataType::Fp32,
                shape: vec![-1, 2],
            }],
            batching: Batching {
                max_batch_size: 4,
                max_queue_delay: Duration::ZERO,
            },
            input_rules: vec![InputRule::default(); 2],
            allow_non_finite: false,
            input_axes: vec![BatchAxis::Axis(0); 2],
            output_axes: vec![BatchAxis::Axis(0)],
            stream: None,
            device: Device::Cpu,
            replicas: 1,
            max_queue: 8,
            fallback: None,
            slo: None,
            sha256: String::new(),
            description: String::new(),
            source: String::new(),
            resources: Resources::default(),
        }
    }

    #[test]
    fn a_fallback_must_take_every_input_and_give_every_output() {
        let primary = info();
        let mut fallback = info();
        fallback.name = "f".into();
        assert_eq!(primary.fallback_mismatch(&fallback), None);
        // A free dimension matches a fixed one; extra outputs are harmless.
        fallback.inputs[0].shape = vec![-1, -1];
        fallback.outputs.push(fallback.outputs[0].clone());
        fallback.outputs[1].name = "extra".into();
        assert_eq!(primary.fallback_mismatch(&fallback), None);
        let why = |change: fn(&mut ModelInfo)| {
            let mut fallback = info();
            fallback.name = "f".into();
            change(&mut fallback);
            primary.fallback_mismatch(&fallback).expect("a mismatch")
        };
        assert!(why(|f| f.inputs[1].name = "w".into()).contains("no input 'y'"));
        assert!(why(|f| f.inputs[0].datatype = DataType::Fp64).contains("input 'x' is FP64"));
        assert!(why(|f| f.inputs[0].shape = vec![-1, 3]).contains("[-1, 3]"));
        assert!(why(|f| f.inputs[0].shape = vec![-1, 2, 1]).contains("input 'x'"));
        assert!(why(|f| f.outputs[0].name = "q".into()).contains("no output 'z'"));
    }

    fn x(rows: i64) -> NamedTensor {
        NamedTensor {
            name: "x".into(),
            shape: vec![rows, 2],
            data: TensorData::Fp32(vec![0.0; rows as usize * 2]),
        }
    }
    fn y(rows: i64) -> NamedTensor {
        NamedTensor {
            name: "y".into(),
            shape: vec![rows, 1],
            data: TensorData::Int64(vec![0; rows as usize]),
        }
    }

    fn err(result: Result<InferRequest, ServeError>) -> String {
        result.unwrap_err().to_string()
    }

    #[test]
    fn orders_inputs_and_counts_rows() {
        let req = info().validate(vec![y(3), x(3)], None).unwrap();
        assert_eq!(req.inputs[0].name, "x");
        assert_eq!(req.rows, 3);
        assert_eq!(req.outputs, vec![0]);
    }

    #[test]
    fn precise_errors() {
        let m = info();
        assert!(err(m.validate(vec![x(1)], None)).contains("needs input 'y'"));
        assert!(err(m.validate(vec![x(1), y(1), y(1)], None)).contains("given twice"));
        assert!(err(m.validate(vec![x(5), y(5)], None)).contains("max_batch_size"));
        assert!(err(m.validate(vec![x(2), y(1)], None)).contains("disagree"));
        assert!(err(m.validate(vec![x(1), y(1)], Some(vec!["q".into()]))).contains("no output 'q'"));
        let mut bad = x(1);
        bad.data = TensorData::Fp32(vec![0.0; 3]);
        assert!(err(m.validate(vec![bad, y(1)], None)).contains("needs 2 elements, got 3"));
        let mut wrong_type = y(1);
        wrong_type.data = TensorData::Fp32(vec![0.0]);
        assert!(err(m.validate(vec![x(1), wrong_type], None)).contains("must be INT64, got FP32"));
        let mut wrong_dim = x(1);
        wrong_dim.shape = vec![2, 1];
        assert!(err(m.validate(vec![wrong_dim, y(2)], None)).contains("dimension 1 must be 2"));
    }

    #[test]
    fn non_finite_floats_are_refused_unless_allowed() {
        let mut m = info();
        for (value, shown) in [
            (f32::NAN, "NaN"),
            (f32::INFINITY, "inf"),
            (f32::NEG_INFINITY, "-inf"),
        ] {
            let mut bad = x(2);
            bad.data = TensorData::Fp32(vec![0.0, 1.0, value, 2.0]);
            let e = err(m.validate(vec![bad, y(2)], None));
            assert!(
                e.contains("input 'x' element 2 is")
                    && e.contains(shown)
                    && e.contains("finite FP32 values only"),
                "{e}"
            );
        }
        m.allow_non_finite = true;
        let mut bad = x(1);
        bad.data = TensorData::Fp32(vec![f32::NAN, f32::INFINITY]);
        assert!(m.validate(vec![bad, y(1)], None).is_ok());
    }

    /// Silero VAD's interface with the bundled manifest's declarations.
    fn vad() -> ModelInfo {
        let entry = crate::rules::tests::entry(crate::rules::tests::VAD);
        let mut inputs = crate::rules::tests::vad_specs();
        let input_axes = vec![BatchAxis::Axis(0), BatchAxis::Axis(1), BatchAxis::Shared];
        let input_rules = rules::resolve(&entry, &mut inputs, &input_axes).unwrap();
        ModelInfo {
            name: "vad".into(),
            inputs,
            input_rules,
            input_axes,
            output_axes: vec![],
            outputs: vec![],
            ..info()
        }
    }

    fn vad_request(samples: i64, sr: i64) -> Vec<NamedTensor> {
        vec![
            NamedTensor {
                name: "input".into(),
                shape: vec![1, samples],
                data: TensorData::Fp32(vec![0.0; samples as usize]),
            },
            NamedTensor {
                name: "state".into(),
                shape: vec![2, 1, 128],
                data: TensorData::Fp32(vec![0.0; 256]),
            },
            NamedTensor {
                name: "sr".into(),
                shape: vec![],
                data: TensorData::Int64(vec![sr]),
            },
        ]
    }

    #[test]
    fn declared_shapes_and_values_are_enforced_together() {
        let m = vad();
        assert!(m.validate(vad_request(576, 16000), None).is_ok());
        assert!(m.validate(vad_request(288, 8000), None).is_ok());
        assert_eq!(
            err(m.validate(vad_request(1, 16000), None)),
            "input 'input' has shape [1, 1], but model 'vad' takes [-1, 576] (with sr = 16000) \
             or [-1, 288] (with sr = 8000) (-1: any size)"
        );
        assert!(
            err(m.validate(vad_request(100_000, 16000), None)).contains("has shape [1, 100000]")
        );
        assert_eq!(
            err(m.validate(vad_request(576, 12345), None)),
            "input 'sr' must be one of 16000, 8000; got 12345"
        );
        assert_eq!(
            err(m.validate(vad_request(288, 16000), None)),
            "input 'input' has shape [1, 288], which goes with sr = 8000, but sr is 16000: \
             with sr = 16000 it must be [-1, 576] (-1: any size)"
        );
    }

    #[test]
    fn example_inputs_pass_validation() {
        let m = vad();
        let inputs = m.example_inputs();
        assert_eq!(inputs[0].shape, vec![1, 576]);
        assert_eq!(inputs[2].data, TensorData::Int64(vec![16000]));
        assert!(m.validate(inputs, None).is_ok());
        assert!(info().validate(info().example_inputs(), None).is_ok());
    }
}
