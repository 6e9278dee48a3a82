//! The Open Inference Protocol (KServe v2) wire format: decoding an inference request, JSON or
//! JSON plus the binary tensor data extension, into tensors; encoding the answer the same way.
//!
//! JSON tensor data is parsed straight into typed vectors (nested or flat arrays, no
//! intermediate `serde_json::Value` tree), because for large tensors that tree costs more than
//! the inference.

use std::fmt;

use serde::de::{DeserializeSeed, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::error::ServeError;
use crate::model::{InferResponse, ModelInfo};
use crate::tensor::{element_count, DataType, NamedTensor, TensorData};
use crate::with_element_type;

/// Header that announces the binary tensor data extension: the length of the JSON part.
pub const HEADER_CONTENT_LENGTH: &str = "Inference-Header-Content-Length";

#[derive(Deserialize)]
struct RequestJson<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(borrow)]
    inputs: Vec<InputJson<'a>>,
    #[serde(default)]
    outputs: Option<Vec<OutputJson>>,
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
    let request: RequestJson<'_> = serde_json::from_slice(json)
        .map_err(|e| ServeError::invalid(format!("malformed inference request JSON: {e}")))?;
    let binary_default = flag(&request.parameters, "binary_data_output")?.unwrap_or(false);
    let timeout_us = match request.parameters.as_ref().and_then(|p| p.get("timeout")) {
        None => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| {
            ServeError::invalid("parameter 'timeout' must be a whole number of microseconds")
        })?),
    };

    let mut inputs = Vec::with_capacity(request.inputs.len());
    for input in request.inputs {
        let name = input.name;
        let datatype = DataType::parse(&input.datatype).ok_or_else(|| {
            ServeError::invalid(format!(
                "input '{name}': datatype '{}' is not supported (use one of {})",
                input.datatype,
                DataType::ALL.map(DataType::as_str).join(", ")
            ))
        })?;
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
                    return Err(ServeError::invalid(format!(
                        "input '{name}' declares binary_data_size {size} but only {} binary bytes remain",
                        binary.len()
                    )));
                }
                let (mine, rest) = binary.split_at(size);
                binary = rest;
                TensorData::from_le_bytes(datatype, mine)
                    .map_err(|e| ServeError::invalid(format!("input '{name}': {e}")))?
            }
            (None, Some(raw)) => {
                // The shape is only declared: reserve no more than the JSON text can hold
                // (every element takes at least a digit and a separator).
                let capacity = element_count(&input.shape)
                    .unwrap_or(0)
                    .min(raw.get().len() / 2 + 1);
                parse_json_data(raw, datatype, capacity)
                    .map_err(|e| ServeError::invalid(format!("input '{name}': {e}")))?
            }
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

    let (outputs, binary_outputs) = match request.outputs {
        None => (None, Vec::new()),
        Some(list) => {
            let mut names = Vec::with_capacity(list.len());
            let mut binary = Vec::with_capacity(list.len());
            for output in list {
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

fn flag(parameters: &Option<Map<String, Value>>, key: &str) -> Result<Option<bool>, ServeError> {
    match parameters.as_ref().and_then(|p| p.get(key)) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(ServeError::invalid(format!(
            "parameter '{key}' must be true or false, got {other}"
        ))),
    }
}

fn parse_json_data(
    raw: &RawValue,
    datatype: DataType,
    capacity: usize,
) -> Result<TensorData, String> {
    with_element_type!(datatype, T, Wrap => {
        let mut out: Vec<T> = Vec::with_capacity(capacity);
        let mut de = serde_json::Deserializer::from_str(raw.get());
        Flatten { out: &mut out }.deserialize(&mut de).map_err(|e| e.to_string())?;
        Ok(Wrap(out))
    })
}

/// A tensor element that can be read from a JSON number or boolean, exactly.
trait JsonElement: Sized {
    const DATATYPE: DataType;
    fn from_i64(v: i64) -> Option<Self>;
    fn from_u64(v: u64) -> Option<Self>;
    fn from_f64(v: f64) -> Option<Self>;
    fn from_bool(_: bool) -> Option<Self> {
        None
    }
}

macro_rules! integer_element {
    ($($t:ty => $dt:ident),*) => {$(
        impl JsonElement for $t {
            const DATATYPE: DataType = DataType::$dt;
            fn from_i64(v: i64) -> Option<Self> { <$t>::try_from(v).ok() }
            fn from_u64(v: u64) -> Option<Self> { <$t>::try_from(v).ok() }
            // Integral floats such as 3.0 are accepted; 3.5 is not.
            fn from_f64(v: f64) -> Option<Self> {
                if v.fract() == 0.0 && v >= <$t>::MIN as f64 && v <= <$t>::MAX as f64 { Some(v as $t) } else { None }
            }
        }
    )*};
}
integer_element!(u8 => Uint8, u16 => Uint16, u32 => Uint32, u64 => Uint64, i8 => Int8, i16 => Int16, i32 => Int32, i64 => Int64);

macro_rules! float_element {
    ($($t:ty => $dt:ident),*) => {$(
        impl JsonElement for $t {
            const DATATYPE: DataType = DataType::$dt;
            fn from_i64(v: i64) -> Option<Self> { Some(v as $t) }
            fn from_u64(v: u64) -> Option<Self> { Some(v as $t) }
            fn from_f64(v: f64) -> Option<Self> { Some(v as $t) }
        }
    )*};
}
float_element!(f32 => Fp32, f64 => Fp64);

impl JsonElement for bool {
    const DATATYPE: DataType = DataType::Bool;
    fn from_i64(_: i64) -> Option<Self> {
        None
    }
    fn from_u64(_: u64) -> Option<Self> {
        None
    }
    fn from_f64(_: f64) -> Option<Self> {
        None
    }
    fn from_bool(v: bool) -> Option<Self> {
        Some(v)
    }
}

/// Appends every scalar of an arbitrarily nested JSON array to `out`, in row-major order.
struct Flatten<'v, T> {
    out: &'v mut Vec<T>,
}

impl<'de, T: JsonElement> DeserializeSeed<'de> for Flatten<'_, T> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de, T: JsonElement> Visitor<'de> for Flatten<'_, T> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "an array of {} values", T::DATATYPE)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let out = self.out;
        while seq.next_element_seed(Flatten { out: &mut *out })?.is_some() {}
        Ok(())
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        push(self.out, T::from_i64(v), v)
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        push(self.out, T::from_u64(v), v)
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        push(self.out, T::from_f64(v), v)
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<(), E> {
        push(self.out, T::from_bool(v), v)
    }
}

fn push<T: JsonElement, E: serde::de::Error>(
    out: &mut Vec<T>,
    value: Option<T>,
    shown: impl fmt::Display,
) -> Result<(), E> {
    match value {
        Some(v) => {
            out.push(v);
            Ok(())
        }
        None => Err(E::custom(format!(
            "element {} ({shown}) is not a valid {}",
            out.len(),
            T::DATATYPE
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
    data: Option<&'a TensorData>,
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
                    data: Some(&output.data),
                }
            }
        })
        .collect();
    let json = ResponseJson {
        model_name: &info.name,
        model_version: &info.version,
        id: request.id.as_deref(),
        parameters: serde_json::json!({
            "batch_size": response.batch_size,
            "queue_time_us": response.queue_time.as_micros() as u64,
            "compute_time_us": response.compute_time.as_micros() as u64,
            "degraded": response.degraded,
            "served_by": format!("{}:{}", response.served_by.0, response.served_by.1),
        }),
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
}
