//! The `mlp` interface on the wire: request bodies (JSON arrays or binary tensor data) built
//! once and sent over and over, and the check of every answer, so that a 200 with the wrong
//! outputs counts as an error and what the server says about serving it is kept.

use bytes::Bytes;
use serde::Deserialize;

use super::HEADER_CONTENT_LENGTH;
use crate::{mlp, SplitMix64};

/// One request body, built once per task and sent over and over (a cheap `Bytes` clone).
#[derive(Clone, Debug)]
pub struct RequestBody {
    pub body: Bytes,
    /// `Some(json length)` when the body uses the binary tensor data extension.
    pub json_length: Option<usize>,
}

/// An Open Inference Protocol request for the `mlp` interface: `features` FP32
/// `[rows, 256]`, filled with deterministic pseudo-random numbers from `seed`.
pub fn mlp_request(rows: usize, seed: u64, binary: bool) -> RequestBody {
    let values = SplitMix64::new(seed).f32_vec(rows * mlp::FEATURES);
    let shape = [rows, mlp::FEATURES];
    if binary {
        let nbytes = values.len() * 4;
        let json = serde_json::json!({
            "inputs": [{
                "name": mlp::INPUT, "shape": shape, "datatype": "FP32",
                "parameters": { "binary_data_size": nbytes },
            }],
            "parameters": { "binary_data_output": true },
        });
        let mut body = serde_json::to_vec(&json).expect("request JSON serialises");
        let json_length = body.len();
        body.reserve(nbytes);
        for v in &values {
            body.extend_from_slice(&v.to_le_bytes());
        }
        RequestBody {
            body: body.into(),
            json_length: Some(json_length),
        }
    } else {
        // Keys in the order Triton's and KServe's clients write them, `data` last (`json!`
        // would sort them, `data` first): the server reads data that follows its datatype
        // and shape in one pass.
        #[derive(serde::Serialize)]
        struct Input<'a> {
            name: &'a str,
            shape: [usize; 2],
            datatype: &'a str,
            data: &'a [f32],
        }
        #[derive(serde::Serialize)]
        struct Request<'a> {
            inputs: [Input<'a>; 1],
        }
        let request = Request {
            inputs: [Input {
                name: mlp::INPUT,
                shape,
                datatype: "FP32",
                data: &values,
            }],
        };
        RequestBody {
            body: serde_json::to_vec(&request)
                .expect("request JSON serialises")
                .into(),
            json_length: None,
        }
    }
}

#[derive(Deserialize)]
struct ResponseJson {
    #[serde(default)]
    parameters: Option<ResponseParameters>,
    outputs: Vec<OutputJson>,
}

#[derive(Deserialize)]
struct ResponseParameters {
    #[serde(default)]
    batch_size: Option<u64>,
    #[serde(default)]
    queue_time_us: Option<u64>,
    #[serde(default)]
    compute_time_us: Option<u64>,
    /// True when the model's fallback served the request (overload).
    #[serde(default)]
    degraded: Option<bool>,
}

/// What the server says about how it served one request (response `parameters`); zero where
/// it did not say.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerSide {
    /// Rows in the model call that served the request (its own and its batch mates').
    pub batch_size: u64,
    /// From the request's arrival to its batch starting, in microseconds.
    pub queue_us: u64,
    /// The model call, in microseconds.
    pub compute_us: u64,
    /// Requests served by the model's fallback (`parameters.degraded`): 0 or 1 for one answer.
    pub degraded: u64,
}

#[derive(Deserialize)]
struct OutputJson {
    name: String,
    datatype: String,
    shape: Vec<i64>,
    #[serde(default)]
    data: Option<Vec<f32>>,
    #[serde(default)]
    parameters: Option<OutputParameters>,
}

#[derive(Deserialize)]
struct OutputParameters {
    #[serde(default)]
    binary_data_size: Option<usize>,
}

impl ServerSide {
    pub fn add(&mut self, other: &ServerSide) {
        self.batch_size += other.batch_size;
        self.queue_us += other.queue_us;
        self.compute_us += other.compute_us;
        self.degraded += other.degraded;
    }
}

/// Checks a 200 answer: every output FP32 `[rows, 16]` with exactly that much data, inline or
/// in the binary section. Returns what the server says about how it served the request.
pub fn check_mlp_response(
    body: &[u8],
    json_length: Option<usize>,
    rows: usize,
) -> Result<ServerSide, String> {
    let (json, binary) = match json_length {
        None => (body, &[][..]),
        Some(n) if n <= body.len() => body.split_at(n),
        Some(n) => {
            return Err(format!(
                "{HEADER_CONTENT_LENGTH} is {n} but the body has {} bytes",
                body.len()
            ))
        }
    };
    let parsed: ResponseJson =
        serde_json::from_slice(json).map_err(|e| format!("response JSON does not parse: {e}"))?;
    if parsed.outputs.is_empty() {
        return Err("response has no outputs".into());
    }
    let elements = rows * mlp::OUTPUT_WIDTH;
    let mut binary_expected = 0;
    for out in &parsed.outputs {
        let want = [rows as i64, mlp::OUTPUT_WIDTH as i64];
        if out.shape != want {
            return Err(format!(
                "output '{}' has shape {:?}, expected {:?}",
                out.name, out.shape, want
            ));
        }
        if out.datatype != "FP32" {
            return Err(format!(
                "output '{}' is {}, expected FP32",
                out.name, out.datatype
            ));
        }
        match (
            &out.data,
            out.parameters.as_ref().and_then(|p| p.binary_data_size),
        ) {
            (Some(data), None) if data.len() == elements => {}
            (Some(data), None) => {
                return Err(format!(
                    "output '{}' has {} values, expected {elements}",
                    out.name,
                    data.len()
                ))
            }
            (None, Some(size)) if size == elements * 4 => binary_expected += size,
            (None, Some(size)) => {
                return Err(format!(
                    "output '{}' has {size} binary bytes, expected {}",
                    out.name,
                    elements * 4
                ))
            }
            (Some(_), Some(_)) => {
                return Err(format!(
                    "output '{}' has both data and binary_data_size",
                    out.name
                ))
            }
            (None, None) => return Err(format!("output '{}' has no data", out.name)),
        }
    }
    if binary.len() != binary_expected {
        return Err(format!(
            "binary section has {} bytes, outputs claim {binary_expected}",
            binary.len()
        ));
    }
    Ok(parsed
        .parameters
        .map_or(ServerSide::default(), |p| ServerSide {
            batch_size: p.batch_size.unwrap_or(0),
            queue_us: p.queue_time_us.unwrap_or(0),
            compute_us: p.compute_time_us.unwrap_or(0),
            degraded: u64::from(p.degraded.unwrap_or(false)),
        }))
}
