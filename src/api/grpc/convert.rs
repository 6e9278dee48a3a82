//! The gRPC form of an inference request and its answer: `ModelInferRequest` into tensors
//! (typed `contents` or `raw_input_contents`, little-endian as in REST's binary extension),
//! and an [`InferResponse`] into a `ModelInferResponse`. Datatype names, raw bytes and the
//! answer's parameters are the ones `kserve.rs` and `tensor.rs` define for REST.
//!
//! Outputs come back in the form the inputs came in: raw when the request used
//! `raw_input_contents` (as `tritonclient.grpc` does, whose `as_numpy` reads raw outputs
//! only), typed `contents` otherwise (readable in `grpcurl`); the request parameter
//! `binary_data_output` (bool) chooses explicitly.

use std::collections::HashMap;
use std::time::Duration;

use super::proto::inference::infer_parameter::ParameterChoice;
use super::proto::inference::model_infer_response::InferOutputTensor;
use super::proto::inference::{
    InferParameter, InferTensorContents, ModelInferRequest, ModelInferResponse,
};
use crate::api::kserve::{self, AnswerParameter};
use crate::error::ServeError;
use crate::model::{InferResponse, ModelInfo};
use crate::tensor::{element_count, DataType, NamedTensor, TensorData};

/// Triton's sequence parameters: a unary call cannot carry them (sequences are streams).
const SEQUENCE_PARAMETERS: [&str; 3] = ["sequence_id", "sequence_start", "sequence_end"];

/// A decoded (not yet validated) gRPC inference request.
#[derive(Debug)]
pub struct Decoded {
    pub inputs: Vec<NamedTensor>,
    /// `None`: every output.
    pub outputs: Option<Vec<String>>,
    /// Answer in `raw_output_contents` rather than typed `contents`.
    pub raw_output: bool,
    /// Triton's `timeout` request parameter (microseconds; 0, as in Triton, is none).
    pub timeout: Option<Duration>,
}

/// Takes the tensors out of `request` (its names and id stay for the answer).
pub fn decode(request: &mut ModelInferRequest) -> Result<Decoded, ServeError> {
    let parameters = &request.parameters;
    if let Some(key) = SEQUENCE_PARAMETERS
        .iter()
        .find(|key| parameters.contains_key(**key))
    {
        return Err(ServeError::invalid(format!(
            "parameter '{key}': sequences (sequence_id, sequence_start, sequence_end) are \
             speech streams, served on ModelStreamInfer to a model that serves streams \
             (docs/streaming.md)"
        )));
    }
    // Triton's `timeout`: 0, as in Triton, is no timeout (not a deadline already passed).
    let timeout = match parameters
        .get("timeout")
        .and_then(|p| p.parameter_choice.as_ref())
    {
        None => None,
        Some(ParameterChoice::Int64Param(us)) if *us >= 0 => Some(*us as u64),
        Some(ParameterChoice::Uint64Param(us)) => Some(*us),
        Some(_) => {
            return Err(ServeError::invalid(
                "parameter 'timeout' must be a whole number of microseconds, 0 for none \
                 (int64_param)",
            ))
        }
    }
    .filter(|&us| us > 0)
    .map(Duration::from_micros);
    let raw = std::mem::take(&mut request.raw_input_contents);
    let raw_output = match parameters
        .get("binary_data_output")
        .and_then(|p| p.parameter_choice.as_ref())
    {
        None => !raw.is_empty(),
        Some(ParameterChoice::BoolParam(b)) => *b,
        Some(_) => {
            return Err(ServeError::invalid(
                "parameter 'binary_data_output' must be a bool_param",
            ))
        }
    };
    if !raw.is_empty() && raw.len() != request.inputs.len() {
        return Err(ServeError::invalid(format!(
            "raw_input_contents has {} entries for {} inputs: give one per input, in order, or none",
            raw.len(),
            request.inputs.len()
        )));
    }
    let mut raw = raw.into_iter();
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for input in std::mem::take(&mut request.inputs) {
        let name = input.name;
        let datatype = kserve::parse_datatype(&name, &input.datatype)?;
        let contents = input.contents.unwrap_or_default();
        let data = match raw.next() {
            Some(bytes) => {
                if let Some(field) = filled_fields(&contents).first() {
                    return Err(ServeError::invalid(format!(
                        "input '{name}' has both {field} and raw_input_contents; send one"
                    )));
                }
                raw_tensor(&name, datatype, &input.shape, &bytes)?
            }
            None => typed_tensor(&name, datatype, &input.shape, contents)?,
        };
        inputs.push(NamedTensor {
            name,
            shape: input.shape,
            data,
        });
    }
    let outputs = if request.outputs.is_empty() {
        None
    } else {
        let mut names = Vec::with_capacity(request.outputs.len());
        for output in std::mem::take(&mut request.outputs) {
            if output.parameters.contains_key("classification") {
                return Err(ServeError::invalid(format!(
                    "output '{}': the classification extension is not supported",
                    output.name
                )));
            }
            names.push(output.name);
        }
        Some(names)
    };
    Ok(Decoded {
        inputs,
        outputs,
        raw_output,
        timeout,
    })
}

/// Raw little-endian bytes of one input, which must be exactly what its shape needs.
fn raw_tensor(
    name: &str,
    datatype: DataType,
    shape: &[i64],
    bytes: &[u8],
) -> Result<TensorData, ServeError> {
    if let Some(count) = element_count(shape) {
        let want = count.saturating_mul(datatype.element_size());
        if bytes.len() != want {
            return Err(ServeError::invalid(format!(
                "input '{name}': raw_input_contents has {} bytes, but shape {shape:?} of {datatype} \
                 needs {want} ({count} elements of {} bytes)",
                bytes.len(),
                datatype.element_size()
            )));
        }
    }
    TensorData::from_le_bytes(datatype, bytes)
        .map_err(|e| ServeError::invalid(format!("input '{name}': {e}")))
}

/// The typed contents fields that hold values, by their protocol names.
fn filled_fields(c: &InferTensorContents) -> Vec<&'static str> {
    [
        ("bool_contents", c.bool_contents.is_empty()),
        ("int_contents", c.int_contents.is_empty()),
        ("int64_contents", c.int64_contents.is_empty()),
        ("uint_contents", c.uint_contents.is_empty()),
        ("uint64_contents", c.uint64_contents.is_empty()),
        ("fp32_contents", c.fp32_contents.is_empty()),
        ("fp64_contents", c.fp64_contents.is_empty()),
        ("bytes_contents", c.bytes_contents.is_empty()),
    ]
    .into_iter()
    .filter(|(_, empty)| !empty)
    .map(|(field, _)| field)
    .collect()
}

/// The contents field a datatype's values travel in.
fn field_of(datatype: DataType) -> &'static str {
    match datatype {
        DataType::Bool => "bool_contents",
        DataType::Int8 | DataType::Int16 | DataType::Int32 => "int_contents",
        DataType::Int64 => "int64_contents",
        DataType::Uint8 | DataType::Uint16 | DataType::Uint32 => "uint_contents",
        DataType::Uint64 => "uint64_contents",
        DataType::Fp32 => "fp32_contents",
        DataType::Fp64 => "fp64_contents",
    }
}

/// Typed contents of one input: the field its datatype calls for and no other.
fn typed_tensor(
    name: &str,
    datatype: DataType,
    shape: &[i64],
    contents: InferTensorContents,
) -> Result<TensorData, ServeError> {
    let want = field_of(datatype);
    let filled = filled_fields(&contents);
    if let Some(other) = filled.iter().find(|f| **f != want) {
        return Err(ServeError::invalid(format!(
            "input '{name}' is {datatype}: its values go in {want}, not {other}"
        )));
    }
    if filled.is_empty() && element_count(shape) != Some(0) {
        return Err(ServeError::invalid(format!(
            "input '{name}' has no data (give contents.{want} or raw_input_contents)"
        )));
    }
    fn narrow<T: TryFrom<W>, W: Copy + std::fmt::Display>(
        name: &str,
        datatype: DataType,
        values: Vec<W>,
    ) -> Result<Vec<T>, ServeError> {
        values
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                T::try_from(v).map_err(|_| {
                    ServeError::invalid(format!(
                        "input '{name}' element {i}: {v} is out of range for {datatype}"
                    ))
                })
            })
            .collect()
    }
    let c = contents;
    Ok(match datatype {
        DataType::Bool => TensorData::Bool(c.bool_contents),
        DataType::Int8 => TensorData::Int8(narrow(name, datatype, c.int_contents)?),
        DataType::Int16 => TensorData::Int16(narrow(name, datatype, c.int_contents)?),
        DataType::Int32 => TensorData::Int32(c.int_contents),
        DataType::Int64 => TensorData::Int64(c.int64_contents),
        DataType::Uint8 => TensorData::Uint8(narrow(name, datatype, c.uint_contents)?),
        DataType::Uint16 => TensorData::Uint16(narrow(name, datatype, c.uint_contents)?),
        DataType::Uint32 => TensorData::Uint32(c.uint_contents),
        DataType::Uint64 => TensorData::Uint64(c.uint64_contents),
        DataType::Fp32 => TensorData::Fp32(c.fp32_contents),
        DataType::Fp64 => TensorData::Fp64(c.fp64_contents),
    })
}

/// One output's values as typed contents.
pub(super) fn contents_of(data: &TensorData) -> InferTensorContents {
    let mut c = InferTensorContents::default();
    match data {
        TensorData::Bool(v) => c.bool_contents = v.clone(),
        TensorData::Int8(v) => c.int_contents = v.iter().map(|&x| x.into()).collect(),
        TensorData::Int16(v) => c.int_contents = v.iter().map(|&x| x.into()).collect(),
        TensorData::Int32(v) => c.int_contents = v.clone(),
        TensorData::Int64(v) => c.int64_contents = v.clone(),
        TensorData::Uint8(v) => c.uint_contents = v.iter().map(|&x| x.into()).collect(),
        TensorData::Uint16(v) => c.uint_contents = v.iter().map(|&x| x.into()).collect(),
        TensorData::Uint32(v) => c.uint_contents = v.clone(),
        TensorData::Uint64(v) => c.uint64_contents = v.clone(),
        TensorData::Fp32(v) => c.fp32_contents = v.clone(),
        TensorData::Fp64(v) => c.fp64_contents = v.clone(),
    }
    c
}

/// A parameter value of the protocol.
pub fn parameter(choice: ParameterChoice) -> InferParameter {
    InferParameter {
        parameter_choice: Some(choice),
    }
}

/// The answer's parameters, the same ones REST's carry.
pub fn answer_parameters(response: &InferResponse) -> HashMap<String, InferParameter> {
    kserve::answer_parameters(response)
        .into_iter()
        .map(|(key, value)| {
            let choice = match value {
                AnswerParameter::Int(n) => {
                    ParameterChoice::Int64Param(i64::try_from(n).unwrap_or(i64::MAX))
                }
                AnswerParameter::Bool(b) => ParameterChoice::BoolParam(b),
                AnswerParameter::Text(t) => ParameterChoice::StringParam(t),
            };
            (key.to_string(), parameter(choice))
        })
        .collect()
}

/// The answer to a request with id `id`, outputs raw or typed as `raw_output` says.
pub fn encode(
    info: &ModelInfo,
    id: String,
    raw_output: bool,
    response: &InferResponse,
) -> ModelInferResponse {
    let mut raw_output_contents = Vec::new();
    let outputs = response
        .outputs
        .iter()
        .map(|output| {
            let contents = if raw_output {
                let mut bytes = Vec::new();
                output.data.write_le_bytes(&mut bytes);
                raw_output_contents.push(bytes);
                None
            } else {
                Some(contents_of(&output.data))
            };
            InferOutputTensor {
                name: output.name.clone(),
                datatype: output.data.datatype().as_str().to_string(),
                shape: output.shape.clone(),
                parameters: HashMap::new(),
                contents,
            }
        })
        .collect();
    ModelInferResponse {
        model_name: info.name.clone(),
        model_version: info.version.clone(),
        id,
        parameters: answer_parameters(response),
        outputs,
        raw_output_contents,
    }
}

#[cfg(test)]
mod tests {
    use super::super::proto::inference::model_infer_request::{
        InferInputTensor, InferRequestedOutputTensor,
    };
    use super::*;

    fn input(
        name: &str,
        datatype: &str,
        shape: &[i64],
        c: InferTensorContents,
    ) -> InferInputTensor {
        InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape: shape.to_vec(),
            parameters: HashMap::new(),
            contents: Some(c),
        }
    }

    fn err(mut request: ModelInferRequest) -> String {
        decode(&mut request).unwrap_err().to_string()
    }

    #[test]
    fn typed_and_raw_inputs_decode_to_the_same_tensors() {
        let typed = InferTensorContents {
            int_contents: vec![7, -1],
            ..Default::default()
        };
        let mut request = ModelInferRequest {
            inputs: vec![input("x", "INT16", &[2], typed)],
            outputs: vec![InferRequestedOutputTensor {
                name: "z".into(),
                parameters: HashMap::new(),
            }],
            ..Default::default()
        };
        let decoded = decode(&mut request).unwrap();
        assert_eq!(decoded.inputs[0].data, TensorData::Int16(vec![7, -1]));
        assert_eq!(decoded.outputs, Some(vec!["z".to_string()]));
        assert!(!decoded.raw_output, "typed in, typed out");

        let mut bytes = Vec::new();
        TensorData::Int16(vec![7, -1]).write_le_bytes(&mut bytes);
        let mut request = ModelInferRequest {
            inputs: vec![input("x", "INT16", &[2], Default::default())],
            raw_input_contents: vec![bytes],
            ..Default::default()
        };
        let decoded = decode(&mut request).unwrap();
        assert_eq!(decoded.inputs[0].data, TensorData::Int16(vec![7, -1]));
        assert!(decoded.raw_output, "raw in, raw out");
        assert!(decoded.outputs.is_none());
    }

    #[test]
    fn bad_inputs_say_what_is_wrong() {
        let ints = InferTensorContents {
            int_contents: vec![1, 2],
            ..Default::default()
        };
        let wrong_field = ModelInferRequest {
            inputs: vec![input("x", "FP32", &[2], ints.clone())],
            ..Default::default()
        };
        assert_eq!(
            err(wrong_field),
            "input 'x' is FP32: its values go in fp32_contents, not int_contents"
        );
        let too_big = ModelInferRequest {
            inputs: vec![input(
                "x",
                "INT8",
                &[1],
                InferTensorContents {
                    int_contents: vec![300],
                    ..Default::default()
                },
            )],
            ..Default::default()
        };
        assert!(err(too_big).contains("300 is out of range for INT8"));
        let short_raw = ModelInferRequest {
            inputs: vec![input("x", "FP32", &[2, 2], Default::default())],
            raw_input_contents: vec![vec![0; 12]],
            ..Default::default()
        };
        assert_eq!(
            err(short_raw),
            "input 'x': raw_input_contents has 12 bytes, but shape [2, 2] of FP32 needs 16 \
             (4 elements of 4 bytes)"
        );
        let count = ModelInferRequest {
            inputs: vec![
                input("x", "FP32", &[1], Default::default()),
                input("y", "FP32", &[1], Default::default()),
            ],
            raw_input_contents: vec![vec![0; 4]],
            ..Default::default()
        };
        assert!(err(count).contains("raw_input_contents has 1 entries for 2 inputs"));
        let both = ModelInferRequest {
            inputs: vec![input("x", "INT32", &[2], ints)],
            raw_input_contents: vec![vec![0; 8]],
            ..Default::default()
        };
        assert!(err(both).contains("both int_contents and raw_input_contents"));
        let empty = ModelInferRequest {
            inputs: vec![input("x", "FP32", &[2], Default::default())],
            ..Default::default()
        };
        assert!(err(empty).contains("has no data"));
        let bytes = ModelInferRequest {
            inputs: vec![input("x", "BYTES", &[1], Default::default())],
            ..Default::default()
        };
        assert!(err(bytes).contains("datatype 'BYTES' is not supported"));
        let mut sequence = ModelInferRequest::default();
        sequence.parameters.insert(
            "sequence_id".into(),
            parameter(ParameterChoice::Uint64Param(1)),
        );
        assert!(err(sequence).contains("served on ModelStreamInfer"));
    }

    #[test]
    fn timeout_and_output_form_parameters() {
        let mut request = ModelInferRequest {
            inputs: vec![input("x", "FP32", &[0], Default::default())],
            ..Default::default()
        };
        request.parameters.insert(
            "timeout".into(),
            parameter(ParameterChoice::Int64Param(2500)),
        );
        request.parameters.insert(
            "binary_data_output".into(),
            parameter(ParameterChoice::BoolParam(true)),
        );
        let decoded = decode(&mut request).unwrap();
        assert_eq!(decoded.timeout, Some(Duration::from_micros(2500)));
        assert!(decoded.raw_output);
        // 0 is Triton's "no timeout", in either integer form.
        for zero in [
            ParameterChoice::Int64Param(0),
            ParameterChoice::Uint64Param(0),
        ] {
            let mut request = ModelInferRequest::default();
            request.parameters.insert("timeout".into(), parameter(zero));
            assert_eq!(decode(&mut request).unwrap().timeout, None);
        }
        let mut request = ModelInferRequest::default();
        request.parameters.insert(
            "timeout".into(),
            parameter(ParameterChoice::StringParam("soon".into())),
        );
        assert!(err(request).contains("'timeout'"));
    }

    #[test]
    fn every_datatype_round_trips_through_typed_contents() {
        use crate::tensor::sample_le_bytes;
        for dt in DataType::ALL {
            let bytes = sample_le_bytes(dt, 3);
            let data = TensorData::from_le_bytes(dt, &bytes).unwrap();
            let mut request = ModelInferRequest {
                inputs: vec![input("x", dt.as_str(), &[3], contents_of(&data))],
                ..Default::default()
            };
            let decoded = decode(&mut request).unwrap();
            assert_eq!(decoded.inputs[0].data, data, "{dt}");
        }
    }
}
