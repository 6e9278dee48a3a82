//! The value types of a manifest's keys, with the parsing and messages of each: where a model
//! runs (`device`), where a tensor's batch axis is, the stream kind, the load policy, and what
//! an `inputs` declaration may constrain.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

/// Where a model's sessions run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// A CUDA GPU by index.
    Cuda(i32),
}

impl FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Device, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<i32>().ok())
                .filter(|n| *n >= 0)
                .map(Device::Cuda)
                .ok_or_else(|| format!("device must be \"cpu\" or \"cuda:N\", got \"{s}\"")),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl<'de> Deserialize<'de> for Device {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Device, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Where a tensor's batch dimension is when requests are stacked into one model call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchAxis {
    /// Requests are stacked along this axis (0 for most tensors; 1 for e.g. an RNN state
    /// shaped `[layers, batch, hidden]`).
    Axis(usize),
    /// Not batched: every request in a batch must carry the same value (e.g. a sample rate
    /// scalar), and outputs of this kind go to every request whole.
    Shared,
}

impl<'de> Deserialize<'de> for BatchAxis {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<BatchAxis, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Axis(usize),
            Word(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Axis(n) => Ok(BatchAxis::Axis(n)),
            Raw::Word(w) if w == "shared" => Ok(BatchAxis::Shared),
            Raw::Word(w) => Err(serde::de::Error::custom(format!(
                "batch axis must be an axis number or \"shared\", got \"{w}\""
            ))),
        }
    }
}

/// When a model version is loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadPolicy {
    /// At startup (the server is ready once it is).
    #[default]
    Eager,
    /// On the first request that needs it; that request waits for the load.
    Lazy,
}

/// What the manifest declares about one model input beyond what the ONNX file says: ONNX
/// files often leave dimensions dynamic that the model really needs fixed (Silero VAD says
/// `[-1, -1]` and needs `[-1, 576]`), or take a scalar that only some values make sense for.
/// Requests are checked against it before they are queued, so that a bad one gets a 400 with
/// the reason instead of an ONNX Runtime error from inside the model.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InputDecl {
    /// Shapes the input may have (`-1`: any size there); the first is the one metadata
    /// advertises. Empty: the model's own shape.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shapes: Vec<Vec<i64>>,
    /// Values every element must be one of. Empty: any value.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<AllowedValue>,
    /// Another input whose value picks the shape: `shapes[i]` goes with its `values[i]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paired_with: Option<String>,
}

/// A number from an input's `values` list, compared with tensor elements by value.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum AllowedValue {
    Int(i64),
    Float(f64),
}

impl fmt::Display for AllowedValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllowedValue::Int(v) => write!(f, "{v}"),
            AllowedValue::Float(v) => write!(f, "{v}"),
        }
    }
}
