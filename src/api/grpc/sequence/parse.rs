//! A sequence step's own parts, read from its request: its sequence parameters (Triton's
//! `sequence_id`, `sequence_start`, `sequence_end`) and its audio.

use std::collections::HashMap;

use super::super::proto::inference::infer_parameter::ParameterChoice;
use super::super::proto::inference::InferParameter;
use super::answer::{SEQUENCE_END, SEQUENCE_ID, SEQUENCE_START};
use crate::actors::stream_session::AUDIO_CREDITS;
use crate::tensor::{NamedTensor, TensorData};

/// A sequence's id: Triton's clients send a number or a string.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum SequenceKey {
    Number(i128),
    Text(String),
}

impl std::fmt::Display for SequenceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SequenceKey::Number(n) => write!(f, "sequence {n}"),
            SequenceKey::Text(s) => write!(f, "sequence '{}'", crate::untrusted::Untrusted(s)),
        }
    }
}

/// A step's sequence parameters, taken out of the request.
pub struct Flags {
    pub key: SequenceKey,
    /// The `sequence_id` parameter as sent, echoed in every answer.
    pub echo: InferParameter,
    pub start: bool,
    pub end: bool,
}

pub fn take_flags(parameters: &mut HashMap<String, InferParameter>) -> Result<Flags, String> {
    let flag = |parameters: &mut HashMap<String, InferParameter>, key: &str| match parameters
        .remove(key)
        .and_then(|p| p.parameter_choice)
    {
        None => Ok(false),
        Some(ParameterChoice::BoolParam(b)) => Ok(b),
        Some(_) => Err(format!("parameter '{key}' must be a bool_param")),
    };
    let start = flag(parameters, SEQUENCE_START)?;
    let end = flag(parameters, SEQUENCE_END)?;
    let echo = parameters
        .remove(SEQUENCE_ID)
        .ok_or_else(|| format!("{SEQUENCE_START} and {SEQUENCE_END} need a {SEQUENCE_ID}"))?;
    let key = match &echo.parameter_choice {
        Some(ParameterChoice::Int64Param(n)) if *n != 0 => SequenceKey::Number(i128::from(*n)),
        Some(ParameterChoice::Uint64Param(n)) if *n != 0 => SequenceKey::Number(i128::from(*n)),
        Some(ParameterChoice::StringParam(s)) if !s.is_empty() && s.len() <= 128 => {
            SequenceKey::Text(s.clone())
        }
        _ => {
            return Err(format!(
                "parameter '{SEQUENCE_ID}' must be a non-zero int64_param/uint64_param or a \
                 string_param of 1 to 128 characters"
            ))
        }
    };
    Ok(Flags {
        key,
        echo,
        start,
        end,
    })
}

/// A step's audio: one input, INT16 (PCM) or FP32 in [-1, 1], shape [N] or [1, N]; none is
/// no audio (an end, or a start that only opens the stream).
pub fn audio_of(inputs: Vec<NamedTensor>) -> Result<Vec<f32>, String> {
    let mut inputs = inputs.into_iter();
    let Some(input) = inputs.next() else {
        return Ok(Vec::new());
    };
    if inputs.next().is_some() {
        return Err(
            "a sequence step has one input, its audio (INT16 PCM or FP32 in [-1, 1])".into(),
        );
    }
    if !matches!(input.shape.as_slice(), [_] | [1, _]) {
        return Err(format!(
            "input '{}': audio has shape [N] or [1, N], got {:?}",
            input.name, input.shape
        ));
    }
    let samples = match input.data {
        TensorData::Int16(pcm) => pcm.iter().map(|&s| f32::from(s) / 32768.0).collect(),
        TensorData::Fp32(samples) => {
            if let Some((i, v)) = samples
                .iter()
                .enumerate()
                .find(|(_, v)| !(v.is_finite() && (-1.0..=1.0).contains(*v)))
            {
                return Err(format!(
                    "input '{}': FP32 sample {i} is {v}, outside [-1, 1]",
                    input.name
                ));
            }
            samples
        }
        other => {
            return Err(format!(
                "input '{}': audio is INT16 (PCM) or FP32 in [-1, 1], not {}",
                input.name,
                other.datatype().as_str()
            ))
        }
    };
    if samples.len() > AUDIO_CREDITS {
        return Err(format!(
            "input '{}': {} samples in one step; at most {AUDIO_CREDITS} (split the audio)",
            input.name,
            samples.len()
        ));
    }
    Ok(samples)
}
