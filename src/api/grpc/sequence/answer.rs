//! What a gRPC sequence step answers: the stream session's messages (the WebSocket protocol's
//! JSON, `stream::protocol::ServerMessage`) gathered into one `ModelInferResponse` with typed
//! outputs, and the request parameters of a `sequence_start` turned into the WebSocket `start`
//! message, so that both transports take the same options with the same checks.

use std::collections::HashMap;

use serde_json::{Map, Value};

use super::super::convert::contents_of;
use super::super::proto::inference::infer_parameter::ParameterChoice;
use super::super::proto::inference::model_infer_response::InferOutputTensor;
use super::super::proto::inference::{InferParameter, ModelInferResponse};
use crate::actors::stream_session::{Flushed, SUPERSEDED};
use crate::manifest::StreamKind;
use crate::stream::protocol::{ClientMessage, SentMessage as Sent, StartMessage};
use crate::tensor::TensorData;

/// Triton's sequence parameters.
pub const SEQUENCE_ID: &str = "sequence_id";
pub const SEQUENCE_START: &str = "sequence_start";
pub const SEQUENCE_END: &str = "sequence_end";

/// Request parameters every step may carry (read by `convert::decode` or ignored, as
/// Triton's client sends them).
const ANY_STEP: [&str; 3] = ["timeout", "binary_data_output", "priority"];
/// `sequence_start` parameters that go to the top of the `start` message...
const START: [&str; 7] = [
    "sample_rate",
    "results",
    "checkpoints",
    "stream_id",
    "resume",
    "last_seq",
    "gate",
];
/// ...those that go into its `vad` options...
const VAD: [&str; 5] = [
    "threshold",
    "neg_threshold",
    "min_speech_ms",
    "min_silence_ms",
    "speech_pad_ms",
];
/// ...and into its `keyword` options, under their names there.
const KEYWORD: [(&str, &str); 2] = [
    ("keyword_threshold", "threshold"),
    ("refractory_ms", "refractory_ms"),
];

/// How much of a step the stream took: of its `sent` samples, `taken`; and whether it was the
/// last step (`end`).
pub struct Taken {
    pub sent: usize,
    pub taken: usize,
    pub end: bool,
}

/// A parameter's value as JSON.
fn json_of(choice: &ParameterChoice) -> Value {
    match choice {
        ParameterChoice::BoolParam(b) => Value::Bool(*b),
        ParameterChoice::Int64Param(n) => Value::from(*n),
        ParameterChoice::Uint64Param(n) => Value::from(*n),
        ParameterChoice::DoubleParam(x) => Value::from(*x),
        ParameterChoice::StringParam(s) => Value::String(s.clone()),
    }
}

/// The `start` message of a `sequence_start` step, from its parameters (the sequence ones
/// already taken out); `format` is the audio's, from its datatype. A later step may carry no
/// start parameter.
pub fn start_message(
    parameters: &HashMap<String, InferParameter>,
    starting: bool,
    format: &str,
) -> Result<StartMessage, String> {
    let mut start = Map::new();
    let mut vad = Map::new();
    let mut keyword = Map::new();
    start.insert("type".into(), "start".into());
    start.insert("format".into(), format.into());
    for (key, parameter) in parameters {
        if ANY_STEP.contains(&key.as_str()) {
            continue;
        }
        let keyword_option = KEYWORD.iter().find(|(name, _)| name == key).map(|k| k.1);
        let known = START.contains(&key.as_str())
            || VAD.contains(&key.as_str())
            || keyword_option.is_some();
        if !known {
            let keyword_names: Vec<&str> = KEYWORD.iter().map(|k| k.0).collect();
            return Err(format!(
                "parameter '{}' is not a stream option; a sequence_start takes {}, {} and {}",
                crate::untrusted::Untrusted(key),
                START.join(", "),
                VAD.join(", "),
                keyword_names.join(", ")
            ));
        }
        if !starting {
            return Err(format!(
                "parameter '{key}' is a stream option: send it with sequence_start"
            ));
        }
        let Some(choice) = &parameter.parameter_choice else {
            return Err(format!("parameter '{key}' has no value"));
        };
        if let Some(name) = keyword_option {
            keyword.insert(name.into(), json_of(choice));
            continue;
        }
        let target = if VAD.contains(&key.as_str()) {
            &mut vad
        } else {
            &mut start
        };
        target.insert(key.clone(), json_of(choice));
    }
    if !vad.is_empty() {
        start.insert("vad".into(), Value::Object(vad));
    }
    if !keyword.is_empty() {
        start.insert("keyword".into(), Value::Object(keyword));
    }
    match serde_json::from_value::<ClientMessage>(Value::Object(start)) {
        Ok(ClientMessage::Start(start)) => Ok(start),
        Ok(ClientMessage::End) => unreachable!("built as a start message"),
        Err(e) => Err(format!("stream options: {e}")),
    }
}

/// What a step's messages said, gathered.
#[derive(Default)]
pub struct Gathered {
    /// A keyword stream's answer (`score`, `keyword_t`, `keyword_score`) rather than a voice
    /// activity stream's (`probability`, `speech_start`, `speech_end`, `segments`).
    keyword: bool,
    seq: Vec<u64>,
    t: Vec<f64>,
    /// Per result: the speech probability, or the keyword score.
    value: Vec<f32>,
    degraded: Vec<bool>,
    speech_start: Vec<f64>,
    speech_end: Vec<f64>,
    segments: Option<Vec<f64>>,
    keyword_t: Vec<f64>,
    keyword_score: Vec<f32>,
    parameters: HashMap<String, InferParameter>,
    last_seq: Option<u64>,
    /// The version serving the stream (from `started`).
    pub version: Option<String>,
    /// The newest checkpoint was the shutdown's last.
    pub handover: bool,
    /// The session reported an error (its stream is over).
    pub error: Option<String>,
    /// The answer to a resume of a stream that had ended: its end, replayed (parameter
    /// `ended`).
    pub ended: bool,
    /// The stream's summary is in it: the stream is over.
    pub summarized: bool,
}

fn parameter(choice: ParameterChoice) -> InferParameter {
    InferParameter {
        parameter_choice: Some(choice),
    }
}

impl Gathered {
    /// An empty answer for a stream of `kind`.
    pub fn of(kind: StreamKind) -> Gathered {
        Gathered {
            keyword: kind == StreamKind::Keyword,
            ..Gathered::default()
        }
    }

    fn result(&mut self, seq: u64, t: f64, value: f32, degraded: bool) {
        self.seq.push(seq);
        self.t.push(t);
        self.value.push(value);
        self.degraded.push(degraded);
        self.last_seq = Some(seq);
    }

    /// Adds one message of the session (text it wrote itself: a message that does not parse
    /// is a bug, reported as an error rather than dropped).
    pub fn add(&mut self, text: &str) {
        let message = match serde_json::from_str::<Sent>(text) {
            Ok(message) => message,
            Err(e) => {
                self.error = Some(format!("internal: unreadable stream message ({e})"));
                return;
            }
        };
        use ParameterChoice::*;
        let mut set = |key: &str, choice| {
            self.parameters.insert(key.into(), parameter(choice));
        };
        match message {
            Sent::Started {
                stream_id,
                resumed,
                version,
                samples_received,
                chunk_samples,
                next_seq,
                fresh_state,
            } => {
                set("stream_id", StringParam(stream_id));
                set("resumed", BoolParam(resumed));
                set("samples_received", Int64Param(samples_received as i64));
                set("chunk_samples", Int64Param(chunk_samples as i64));
                set("next_seq", Int64Param(next_seq as i64));
                if fresh_state {
                    set("fresh_state", BoolParam(true));
                }
                self.version = Some(version);
            }
            Sent::Checkpoint {
                token,
                samples,
                handover,
            } => {
                set("checkpoint", StringParam(token));
                set("checkpoint_samples", Int64Param(samples as i64));
                self.handover |= handover;
            }
            Sent::Vad {
                seq,
                t,
                probability,
                degraded,
            } => self.result(seq, t, probability, degraded),
            Sent::Score {
                seq,
                t,
                score,
                degraded,
            } => self.result(seq, t, score, degraded),
            Sent::Keyword {
                seq,
                t,
                phrase,
                score,
            } => {
                set("phrase", StringParam(phrase));
                self.keyword_t.push(t);
                self.keyword_score.push(score);
                self.last_seq = Some(seq);
            }
            Sent::SpeechStart { seq, t } => {
                self.speech_start.push(t);
                self.last_seq = Some(seq);
            }
            Sent::SpeechEnd { seq, t } => {
                self.speech_end.push(t);
                self.last_seq = Some(seq);
            }
            Sent::Summary {
                seq,
                duration,
                chunks,
                segments,
                keywords,
                segments_omitted,
            } => {
                set("duration", DoubleParam(duration));
                set("chunks", Int64Param(chunks as i64));
                if let Some(keywords) = keywords {
                    set("keywords", Int64Param(keywords as i64));
                }
                if segments_omitted > 0 {
                    set("segments_omitted", Int64Param(segments_omitted as i64));
                }
                self.segments = Some(segments.iter().flat_map(|s| [s.start, s.end]).collect());
                self.last_seq = Some(seq);
                self.summarized = true;
            }
            Sent::Error { message } => self.error = Some(message),
        }
    }

    /// Settles a step once its flush (or end) is answered (`flushed`; none when the stream did
    /// not take its end), the connection closed non-normally for `closed`, if it was. A resume
    /// that came after the stream took the step's audio (and end) does not make the step
    /// superseded: its audio counted (the resume's `samples_received` says so), so it is
    /// answered with its results, those that went to the newer connection included; so is a
    /// step whose flush came before the resume (it has every result). A step the stream took
    /// none of is answered with the close's reason ("superseded"), one it took part of says
    /// how much.
    pub fn settle(&mut self, flushed: Option<Flushed>, step: Taken, closed: Option<&str>) {
        let superseded = flushed.as_ref().is_some_and(|f| f.superseded);
        let counted = superseded && (step.end || (step.sent > 0 && step.taken == step.sent));
        if superseded && (counted || step.taken > 0) {
            for text in flushed.iter().flat_map(|f| &f.missed) {
                self.add(text);
            }
        }
        let complete_before = flushed.is_some() && !superseded && closed == Some(SUPERSEDED);
        if self.error.is_some() || counted || complete_before {
            return;
        }
        if superseded && step.taken > 0 {
            self.error = Some(format!(
                "superseded by a newer connection to this stream after it took {} of this \
                 step's {} samples: the newer one goes on from its samples_received",
                step.taken, step.sent
            ));
        } else if let Some(reason) = closed {
            self.error = Some(reason.into());
        }
    }

    /// The step's answer: every result as a typed output (raw little-endian bytes when
    /// `raw`), the stream's news as parameters, `last_seq` the last result's `seq` (what a
    /// resume names).
    pub fn into_response(
        mut self,
        model: &str,
        version: &str,
        id: String,
        sequence: InferParameter,
        raw: bool,
    ) -> ModelInferResponse {
        if let Some(last) = self.last_seq {
            self.parameters.insert(
                "last_seq".into(),
                parameter(ParameterChoice::Int64Param(last as i64)),
            );
        }
        self.parameters.insert(SEQUENCE_ID.into(), sequence);
        if self.ended {
            self.parameters
                .insert("ended".into(), parameter(ParameterChoice::BoolParam(true)));
        }
        let chunks = self.seq.len() as i64;
        let value = if self.keyword { "score" } else { "probability" };
        let mut outputs = vec![
            ("seq", vec![chunks], TensorData::Uint64(self.seq)),
            ("t", vec![chunks], TensorData::Fp64(self.t)),
            (value, vec![chunks], TensorData::Fp32(self.value)),
            ("degraded", vec![chunks], TensorData::Bool(self.degraded)),
        ];
        let events = |v: &Vec<f64>| vec![v.len() as i64];
        if self.keyword {
            outputs.push((
                "keyword_t",
                events(&self.keyword_t),
                TensorData::Fp64(self.keyword_t),
            ));
            outputs.push((
                "keyword_score",
                vec![self.keyword_score.len() as i64],
                TensorData::Fp32(self.keyword_score),
            ));
        } else {
            outputs.push((
                "speech_start",
                events(&self.speech_start),
                TensorData::Fp64(self.speech_start),
            ));
            outputs.push((
                "speech_end",
                events(&self.speech_end),
                TensorData::Fp64(self.speech_end),
            ));
        }
        if let Some(segments) = self.segments.filter(|_| !self.keyword) {
            let rows = segments.len() as i64 / 2;
            outputs.push(("segments", vec![rows, 2], TensorData::Fp64(segments)));
        }
        let mut raw_output_contents = Vec::new();
        let outputs = outputs
            .into_iter()
            .map(|(name, shape, data)| {
                let contents = if raw {
                    let mut bytes = Vec::new();
                    data.write_le_bytes(&mut bytes);
                    raw_output_contents.push(bytes);
                    None
                } else {
                    Some(contents_of(&data))
                };
                InferOutputTensor {
                    name: name.into(),
                    datatype: data.datatype().as_str().into(),
                    shape,
                    parameters: HashMap::new(),
                    contents,
                }
            })
            .collect();
        ModelInferResponse {
            model_name: model.into(),
            model_version: version.into(),
            id,
            parameters: self.parameters,
            outputs,
            raw_output_contents,
        }
    }
}

/// Why a sequence handed over under a step is over, should its close have said nothing.
pub const RETIRED: &str =
    "model version taken out of service; resume from the handover checkpoint (sequence_start with resume)";

/// Marks an answer as a sequence's handover (parameter `handover`), and says why
/// (`handover_reason`) when it is not the shutdown's.
pub fn mark_handover(response: &mut ModelInferResponse, reason: Option<&str>) {
    response.parameters.insert(
        "handover".into(),
        parameter(ParameterChoice::BoolParam(true)),
    );
    if let Some(reason) = reason {
        response.parameters.insert(
            "handover_reason".into(),
            parameter(ParameterChoice::StringParam(reason.into())),
        );
    }
}
