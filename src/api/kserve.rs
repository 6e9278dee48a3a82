//! The Open Inference Protocol (KServe v2) wire format: decoding an inference request, JSON or
//! JSON plus the binary tensor data extension, into tensors; encoding the answer the same way.
//! What the REST and gRPC forms of the protocol share lives here too: datatype names, the
//! parameters every answer carries, Triton's configuration dims, the server's extensions.
//!
//! The body must be a JSON object. JSON tensor data is parsed straight into typed vectors,
//! its nesting checked against the shape, and written back with non-finite floats spelt out
//! (`json_tensor.rs`; the one-pass input reader is `json_tensor/eager.rs`); binary outputs
//! carry NaN and infinities as they are. An empty `outputs` list asks for every output, as an
//! absent one does, and Triton's `timeout` of 0 is no timeout, both as Triton reads them.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::json_tensor::{self, EagerInput, InputData, JsonData, JSON_TEXT_LEN};
use crate::error::ServeError;
use crate::manifest::BatchAxis;
use crate::model::{InferResponse, ModelInfo};
use crate::tensor::{DataType, NamedTensor, TensorData};

/// Header that announces the binary tensor data extension: the length of the JSON part.
pub const HEADER_CONTENT_LENGTH: &str = "Inference-Header-Content-Length";

/// The protocol extensions the server metadata lists (REST and gRPC alike).
pub const SERVER_EXTENSIONS: [&str; 2] = ["binary_tensor_data", "model_repository"];

/// An input's datatype by its protocol name (`"FP32"`), or an error that names the input and
/// the supported types.
pub fn parse_datatype(input: &str, datatype: &str) -> Result<DataType, ServeError> {
    DataType::parse(datatype).ok_or_else(|| {
        ServeError::invalid(format!(
            "input '{input}': datatype '{datatype}' is not supported (use one of {})",
            DataType::ALL.map(DataType::as_str).join(", ")
        ))
    })
}

/// A value of an answer's parameters.
#[derive(Clone, Debug, PartialEq)]
pub enum AnswerParameter {
    Int(u64),
    Bool(bool),
    Text(String),
}

/// The parameters every inference answer carries, in both protocols: the batch it ran in, its
/// queue and compute time, whether a fallback served it, and which model version did.
pub fn answer_parameters(response: &InferResponse) -> [(&'static str, AnswerParameter); 5] {
    use AnswerParameter::*;
    [
        ("batch_size", Int(response.batch_size as u64)),
        ("queue_time_us", Int(response.queue_time.as_micros() as u64)),
        (
            "compute_time_us",
            Int(response.compute_time.as_micros() as u64),
        ),
        ("degraded", Bool(response.degraded)),
        (
            "served_by",
            Text(format!("{}:{}", response.served_by.0, response.served_by.1)),
        ),
    ]
}

/// A tensor's dims in Triton's model configuration: with batching on, without the batch axis
/// (wherever the manifest's batch_axes puts it; a shared input such as a scalar keeps all its
/// dims).
pub fn config_dims(info: &ModelInfo, shape: &[i64], axis: &BatchAxis) -> Vec<i64> {
    let skip = match axis {
        BatchAxis::Axis(k) if info.batched() => Some(*k),
        _ => None,
    };
    let kept = shape.iter().enumerate().filter(|(i, _)| Some(*i) != skip);
    kept.map(|(_, &d)| d).collect()
}

const NOT_AN_OBJECT: &str = "the request body must be a JSON object with \"inputs\"";

/// Reads `T` from a JSON object only: serde's derived struct impls also take a JSON array of
/// the fields in order, so without this `[null, null, [...]]` would pass for a request.
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
            type Value = Object<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Object<T>, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Object)
            }
        }
        deserializer.deserialize_map(ObjectVisitor(PhantomData))
    }
}

/// The request as JSON; `I` is how each input is read: [`EagerInput`] first, then
/// [`InputJson`] for the exact error when that fails.
#[derive(Deserialize)]
#[serde(bound(deserialize = "I: Deserialize<'de>"))]
struct RequestJson<I> {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    inputs: Vec<Object<I>>,
    #[serde(default)]
    outputs: Option<Vec<Object<OutputJson>>>,
}

#[derive(Deserialize)]
struct InputJson<'a> {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

impl<'a> From<InputJson<'a>> for EagerInput<'a> {
    fn from(input: InputJson<'a>) -> EagerInput<'a> {
        EagerInput {
            name: input.name,
            shape: input.shape,
            datatype: input.datatype,
            parameters: input.parameters,
            data: input.data.map(InputData::Raw),
        }
    }
}

impl<I> RequestJson<I> {
    fn inputs_into<J: From<I>>(self) -> RequestJson<J> {
        RequestJson {
            id: self.id,
            parameters: self.parameters,
            inputs: self
                .inputs
                .into_iter()
                .map(|Object(i)| Object(J::from(i)))
                .collect(),
            outputs: self.outputs,
        }
    }
}

#[derive(Deserialize)]
struct OutputJson {
    name: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
}

/// A decoded (not yet validated) inference request.
#[derive(Debug)]
pub struct DecodedRequest {
    pub id: Option<String>,
    pub inputs: Vec<NamedTensor>,
    /// `None`: return every output.
    pub outputs: Option<Vec<String>>,
    /// Per requested output (same order), whether its data goes in the binary section.
    pub binary_outputs: Vec<bool>,
    /// Request-level `binary_data_output`: the default for outputs not listed.
    pub binary_default: bool,
    /// Triton's `timeout` request parameter, in microseconds.
    pub timeout_us: Option<u64>,
}

/// Decodes a request body. `json_length` is the `Inference-Header-Content-Length` header, if
/// any: the JSON then ends there and the binary tensor data follows.
pub fn decode(body: &[u8], json_length: Option<usize>) -> Result<DecodedRequest, ServeError> {
    let (json, mut binary) = match json_length {
        None => (body, &[][..]),
        Some(n) if n <= body.len() => body.split_at(n),
        Some(n) => {
            return Err(ServeError::invalid(format!(
                "{HEADER_CONTENT_LENGTH} is {n} but the body has only {} bytes",
                body.len()
            )))
        }
    };
    JSON_TEXT_LEN.with(|n| n.set(json.len()));
    let eager = serde_json::from_slice::<Object<RequestJson<EagerInput>>>(json);
    let request = match eager.or_else(|_| {
        serde_json::from_slice::<Object<RequestJson<InputJson>>>(json)
            .map(|Object(r)| Object(r.inputs_into()))
    }) {
        Ok(Object(request)) => request,
        Err(e) => {
            let first = json.iter().find(|b| !b" \t\r\n".contains(b));
            return Err(ServeError::invalid(
                if e.is_data() && first != Some(&b'{') {
                    NOT_AN_OBJECT.to_string()
                } else {
                    format!(
                        "malformed inference request JSON: {e}{}",
                        json_length_hint(&e, json_length)
                    )
                },
            ));
        }
    };
    let binary_default = flag(&request.parameters, "binary_data_output")?.unwrap_or(false);
    // Triton's `timeout`: 0, as in Triton, is no timeout (not a deadline already passed).
    let timeout_us = match request.parameters.as_ref().and_then(|p| p.get("timeout")) {
        None => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| {
            ServeError::invalid(format!(
                "parameter 'timeout' must be a whole number of microseconds from 0 (none) to {}, got {v}",
                u64::MAX
            ))
        })?)
        .filter(|&us| us > 0),
    };

    let mut inputs = Vec::with_capacity(request.inputs.len());
    for Object(input) in request.inputs {
        let name = input.name;
        let datatype = parse_datatype(&name, &input.datatype)?;
        let binary_size = input
            .parameters
            .as_ref()
            .and_then(|p| p.get("binary_data_size"))
            .map(|v| {
                v.as_u64().map(|n| n as usize).ok_or_else(|| {
                    ServeError::invalid(format!(
                        "input '{name}': binary_data_size must be a non-negative integer"
                    ))
                })
            })
            .transpose()?;
        let data = match (binary_size, input.data) {
            (Some(_), Some(_)) => {
                return Err(ServeError::invalid(format!(
                    "input '{name}' has both JSON data and binary_data_size; send one"
                )))
            }
            (Some(size), None) => {
                if size > binary.len() {
                    let hint = match json_length {
                        None => format!(
                            " (no {HEADER_CONTENT_LENGTH} header: binary tensor data needs it)"
                        ),
                        Some(_) => String::new(),
                    };
                    return Err(ServeError::invalid(format!(
                        "input '{name}' declares binary_data_size {size} but only {} binary bytes remain{hint}",
                        binary.len()
                    )));
                }
                let (mine, rest) = binary.split_at(size);
                binary = rest;
                TensorData::from_le_bytes(datatype, mine)
                    .map_err(|e| ServeError::invalid(format!("input '{name}': {e}")))?
            }
            (None, Some(InputData::Parsed(data))) => data,
            (None, Some(InputData::Raw(raw))) => json_tensor::parse(raw, datatype, &input.shape)
                .map_err(|e| ServeError::invalid(format!("input '{name}': {e}")))?,
            (None, None) => {
                return Err(ServeError::invalid(format!(
                    "input '{name}' has no data (give \"data\" or parameters.binary_data_size)"
                )))
            }
        };
        inputs.push(NamedTensor {
            name,
            shape: input.shape,
            data,
        });
    }
    if !binary.is_empty() {
        return Err(ServeError::invalid(format!(
            "{} bytes of binary data follow the JSON but no input claims them",
            binary.len()
        )));
    }

    // An empty `outputs` asks for every output, as an absent one does (Triton's REST and gRPC,
    // and this server's gRPC, read it so): not for a model run whose answers are all dropped.
    let (outputs, binary_outputs) = match request.outputs.filter(|list| !list.is_empty()) {
        None => (None, Vec::new()),
        Some(list) => {
            let mut names = Vec::with_capacity(list.len());
            let mut binary = Vec::with_capacity(list.len());
            for Object(output) in list {
                if output
                    .parameters
                    .as_ref()
                    .is_some_and(|p| p.contains_key("classification"))
                {
                    return Err(ServeError::invalid(format!(
                        "output '{}': the classification extension is not supported",
                        output.name
                    )));
                }
                binary.push(flag(&output.parameters, "binary_data")?.unwrap_or(binary_default));
                names.push(output.name);
            }
            (Some(names), binary)
        }
    };
    Ok(DecodedRequest {
        id: request.id,
        inputs,
        outputs,
        binary_outputs,
        binary_default,
        timeout_us,
    })
}

/// What to check when the JSON part ends in the wrong place, which is most often the
/// `Inference-Header-Content-Length` header: missing before binary tensor data (the bytes after
/// the JSON read as trailing characters), or not the JSON's length in bytes.
fn json_length_hint(e: &serde_json::Error, json_length: Option<usize>) -> String {
    let trailing = e.to_string().starts_with("trailing characters");
    match json_length {
        None if trailing => format!(
            " (binary tensor data after the JSON needs the {HEADER_CONTENT_LENGTH} header: \
             the length of the JSON part in bytes)"
        ),
        Some(n) if trailing || e.is_eof() => format!(
            " (the JSON part is cut at {HEADER_CONTENT_LENGTH} = {n} bytes: the header must be \
             the length of the JSON part in bytes)"
        ),
        _ => String::new(),
    }
}

fn flag(parameters: &Option<Map<String, Value>>, key: &str) -> Result<Option<bool>, ServeError> {
    match parameters.as_ref().and_then(|p| p.get(key)) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(ServeError::invalid(format!(
            "parameter '{key}' must be true or false, got {other}"
        ))),
    }
}

#[derive(Serialize)]
struct OutputTensorJson<'a> {
    name: &'a str,
    datatype: DataType,
    shape: &'a [i64],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<JsonData<'a>>,
}

#[derive(Serialize)]
struct ResponseJson<'a> {
    model_name: &'a str,
    model_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    parameters: Value,
    outputs: Vec<OutputTensorJson<'a>>,
}

/// An encoded response body: JSON alone, or JSON followed by binary output data, in which case
/// `json_length` goes in the `Inference-Header-Content-Length` response header.
pub struct EncodedResponse {
    pub body: Vec<u8>,
    pub json_length: Option<usize>,
}

pub fn encode(
    info: &ModelInfo,
    request: &DecodedRequest,
    response: &InferResponse,
) -> EncodedResponse {
    let binary_for = |i: usize| {
        request
            .binary_outputs
            .get(i)
            .copied()
            .unwrap_or(request.binary_default)
    };
    let mut binary_section = Vec::new();
    let outputs = response
        .outputs
        .iter()
        .enumerate()
        .map(|(i, output)| {
            if binary_for(i) {
                let before = binary_section.len();
                output.data.write_le_bytes(&mut binary_section);
                OutputTensorJson {
                    name: &output.name,
                    datatype: output.data.datatype(),
                    shape: &output.shape,
                    parameters: Some(
                        serde_json::json!({ "binary_data_size": binary_section.len() - before }),
                    ),
                    data: None,
                }
            } else {
                OutputTensorJson {
                    name: &output.name,
                    datatype: output.data.datatype(),
                    shape: &output.shape,
                    parameters: None,
                    data: Some(JsonData(&output.data)),
                }
            }
        })
        .collect();
    let json = ResponseJson {
        model_name: &info.name,
        model_version: &info.version,
        id: request.id.as_deref(),
        parameters: answer_parameters(response)
            .into_iter()
            .map(|(key, value)| {
                let value = match value {
                    AnswerParameter::Int(n) => Value::from(n),
                    AnswerParameter::Bool(b) => Value::from(b),
                    AnswerParameter::Text(t) => Value::from(t),
                };
                (key.to_string(), value)
            })
            .collect::<Map<_, _>>()
            .into(),
        outputs,
    };
    let mut body = serde_json::to_vec(&json).expect("response JSON serialises");
    if binary_section.is_empty()
        && !request.binary_outputs.iter().any(|b| *b)
        && !request.binary_default
    {
        return EncodedResponse {
            body,
            json_length: None,
        };
    }
    let json_length = body.len();
    body.extend_from_slice(&binary_section);
    EncodedResponse {
        body,
        json_length: Some(json_length),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_and_flat_json_data() {
        let body = br#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2.5],[3,4]]},
                                   {"name":"y","shape":[3],"datatype":"BOOL","data":[true,false,true]}]}"#;
        let req = decode(body, None).unwrap();
        assert_eq!(
            req.inputs[0].data,
            TensorData::Fp32(vec![1.0, 2.5, 3.0, 4.0])
        );
        assert_eq!(
            req.inputs[1].data,
            TensorData::Bool(vec![true, false, true])
        );
        assert!(req.outputs.is_none());
    }

    #[test]
    fn binary_extension_inputs() {
        let json = br#"{"inputs":[{"name":"x","shape":[2],"datatype":"INT32","parameters":{"binary_data_size":8}}],
                        "outputs":[{"name":"z","parameters":{"binary_data":true}}]}"#;
        let mut body = json.to_vec();
        body.extend_from_slice(&7i32.to_le_bytes());
        body.extend_from_slice(&(-1i32).to_le_bytes());
        let req = decode(&body, Some(json.len())).unwrap();
        assert_eq!(req.inputs[0].data, TensorData::Int32(vec![7, -1]));
        assert_eq!(req.binary_outputs, vec![true]);
        // A byte too many is refused, not silently ignored.
        body.push(0);
        assert!(decode(&body, Some(json.len()))
            .unwrap_err()
            .to_string()
            .contains("no input claims"));
    }

    #[test]
    fn bad_elements_are_named() {
        let body = br#"{"inputs":[{"name":"a","shape":[2],"datatype":"INT64","data":[1, 1.5]}]}"#;
        let err = decode(body, None).unwrap_err().to_string();
        assert!(
            err.contains("input 'a'") && err.contains("element 1") && err.contains("INT64"),
            "{err}"
        );
        let body = br#"{"inputs":[{"name":"a","shape":[1],"datatype":"UINT8","data":[300]}]}"#;
        assert!(decode(body, None).is_err());
        let body = br#"{"inputs":[{"name":"a","shape":[1],"datatype":"BOOL","data":[1]}]}"#;
        assert!(decode(body, None).is_err());
        let body = br#"{"inputs":[{"name":"a","shape":[1],"datatype":"BF16","data":[1]}]}"#;
        assert!(decode(body, None)
            .unwrap_err()
            .to_string()
            .contains("not supported"));
        assert!(decode(b"{not json", None)
            .unwrap_err()
            .to_string()
            .contains("malformed"));
    }

    #[test]
    fn data_read_in_one_pass_or_two_decodes_alike() {
        // `data` after its datatype and shape is parsed as it is read; before them, or with
        // anything unusual, the request is read again the old way, with the old messages.
        let after = br#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[1,2.5]}]}"#;
        let before = br#"{"inputs":[{"data":[1,2.5],"name":"x","shape":[2],"datatype":"FP32"}]}"#;
        for body in [&after[..], &before[..]] {
            let req = decode(body, None).unwrap();
            assert_eq!(req.inputs[0].data, TensorData::Fp32(vec![1.0, 2.5]));
        }
        for data in ["null", ""] {
            let body = format!(
                r#"{{"inputs":[{{"name":"x","shape":[1],"datatype":"FP32"{}}}]}}"#,
                if data.is_empty() {
                    String::new()
                } else {
                    format!(r#","data":{data}"#)
                }
            );
            assert!(decode_err(&body).contains("has no data"), "{body}");
        }
        let repeated =
            r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1],"data":[2]}]}"#;
        assert!(decode_err(repeated).contains("duplicate field `data`"));
        let ragged =
            r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2],[3]]}]}"#;
        let err = decode_err(ragged);
        assert!(err.starts_with("input 'x': data[1] has 1 element"), "{err}");
        // The two-pass reading bounds what it reserves by the text; so does the one pass.
        let huge = br#"{"inputs":[{"name":"x","shape":[33554432],"datatype":"FP32","data":[1]}]}"#;
        let TensorData::Fp32(data) = decode(huge, None).unwrap().inputs.remove(0).data else {
            panic!("FP32")
        };
        assert!(data.capacity() <= huge.len(), "{}", data.capacity());
        // Many such inputs share the one bound: together they reserve no more than the text.
        let one = r#"{"name":"x","shape":[33554432],"datatype":"FP32","data":[1]}"#;
        let many = format!(r#"{{"inputs":[{}]}}"#, vec![one; 200].join(","));
        let reserved: usize = decode(many.as_bytes(), None)
            .unwrap()
            .inputs
            .iter()
            .map(|t| match &t.data {
                TensorData::Fp32(v) => v.capacity(),
                other => panic!("{other:?}"),
            })
            .sum();
        assert!(reserved <= many.len() / 2 + 200, "{reserved}");
    }

    fn decode_err(body: &str) -> String {
        decode(body.as_bytes(), None).unwrap_err().to_string()
    }

    #[test]
    fn only_a_json_object_is_a_request() {
        for body in [
            "[]",
            " [{\"inputs\": []}]",
            "[null, null, [], null]",
            "5",
            "\"inputs\"",
        ] {
            assert_eq!(decode_err(body), NOT_AN_OBJECT, "{body}");
        }
        // Inputs and outputs must be objects too, not arrays of their fields.
        let err = decode_err(r#"{"inputs": [["x", [1], "FP32", null, [1]]]}"#);
        assert!(err.contains("expected a JSON object"), "{err}");
        let err = decode_err(r#"{"inputs": [], "outputs": [["z"]]}"#);
        assert!(err.contains("expected a JSON object"), "{err}");
        assert!(decode_err("").contains("malformed"));
        assert!(decode_err(r#"{"inputs": {"name": "x"}}"#).contains("malformed"));
    }
}
