//! How a model serves streams, as the manifest declares it ([`StreamDecl`]): the stream's
//! stages, each a model that runs on a sliding window of the audio or of the previous stage's
//! output, with the recurrent state it carries from step to step and the constant inputs it
//! takes; and what the last stage's output means (voice activity, or a keyword score).
//!
//! `stream = "vad"` is shorthand for Silero VAD's declaration ([`StreamDecl::silero_vad`]);
//! anything else is written out as a table (docs/streaming.md, "Declaring a stream"). Only
//! the declaration's shape is checked here; whether the models have the tensors it names is
//! checked when the stream's models are known (`stream::pipeline`).

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

/// What the stream's results are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamKind {
    /// A speech probability per step: `vad` results, `speech_start` / `speech_end` events.
    Vad,
    /// A score per step for one phrase: `keyword` events when it crosses the threshold.
    Keyword,
}

/// A model's stream declaration: the model itself is the last stage.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StreamDecl {
    pub kind: StreamKind,
    /// Sample rates a client may stream at. (A `start` that names none asks for 16000, which
    /// a declaration without it refuses: such a model's clients must name their rate.)
    #[serde(default = "default_rates")]
    pub sample_rates: Vec<u32>,
    /// The phrase a keyword stream detects (sent with each event).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phrase: Option<String>,
    /// Models that run before this one, in order; the first reads the audio.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<StageDecl>,
    // How this model (the last stage) steps: the keys of [`StageDecl`] but `model`, spelt
    // out because serde cannot combine `flatten` with `deny_unknown_fields`.
    pub input: WindowDecl,
    pub output: OutputDecl,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub state: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub constants: BTreeMap<String, ConstantDecl>,
    /// A voice activity model that lets one stage (and those after it) run only around speech.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<GateDecl>,
}

/// A gate: the stream's audio also goes through a voice activity model (one with `stream =
/// "vad"` or another `kind = "vad"` declaration of one stage), and step `k` of `stage` runs only
/// when that model heard speech within `[t - hangover_ms, t + lookback]` of the step's audio
/// time `t`. The lookback is what the stages after `stage` look back over, so that their
/// results around speech equal the ungated stream's; the steps it takes are run late, when
/// the speech that calls for them is heard. Skipped steps break the stages after `stage`:
/// they start again, from their prefill, on the next step that runs.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GateDecl {
    pub model: String,
    /// The gated stage, by model name; not the first (which reads the audio the gate reads).
    pub stage: String,
    /// A gate step hears speech when its probability is at least this.
    #[serde(default = "half")]
    pub threshold: f32,
    /// Steps keep running this long after the last speech the gate heard.
    #[serde(default = "second")]
    pub hangover_ms: f64,
}

/// One stage: a model, and how it steps.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StageDecl {
    pub model: String,
    /// The windowed input.
    pub input: WindowDecl,
    /// The output that carries the stage's result (frames for the next stage, or the score).
    pub output: OutputDecl,
    /// Recurrent state: input name <- the output name that feeds it at the next step (zeros
    /// at the first).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub state: BTreeMap<String, String>,
    /// Inputs that take the same value at every step: a number, or `"sample_rate"`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub constants: BTreeMap<String, ConstantDecl>,
}

/// A sliding window over the stage's source: step `k` sees frames `[k*hop, k*hop + window)`
/// of a buffer that starts with `prefill` frames of `pad`. A frame is one audio sample, or
/// one frame of the previous stage's output.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WindowDecl {
    /// The model input the window goes to.
    pub tensor: String,
    /// Window and hop in frames (stages after the first)...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hop: Option<usize>,
    /// ...or in milliseconds of audio (the first stage), so that they scale with the rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hop_ms: Option<f64>,
    /// Frames of `pad` the buffer starts with; `window - hop` when absent (the first step
    /// then comes after one hop).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill: Option<usize>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pad: f32,
}

/// The output a stage's result comes from, and how many frames one step makes of it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OutputDecl {
    pub tensor: String,
    pub frames: usize,
}

impl<'de> Deserialize<'de> for OutputDecl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<OutputDecl, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            tensor: String,
            #[serde(default = "one")]
            frames: usize,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Name(String),
            Table(Table),
        }
        match Raw::deserialize(deserializer).map_err(|_| {
            serde::de::Error::custom(
                "output must be a tensor name or { tensor = \"...\", frames = N }",
            )
        })? {
            Raw::Name(tensor) => Ok(OutputDecl { tensor, frames: 1 }),
            Raw::Table(t) => Ok(OutputDecl {
                tensor: t.tensor,
                frames: t.frames,
            }),
        }
    }
}

/// A constant input's value.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum ConstantDecl {
    Number(f64),
    /// The stream's sample rate.
    SampleRate,
}

impl<'de> Deserialize<'de> for ConstantDecl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<ConstantDecl, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(f64),
            Word(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Number(n) => Ok(ConstantDecl::Number(n)),
            Raw::Word(w) if w == "sample_rate" => Ok(ConstantDecl::SampleRate),
            Raw::Word(w) => Err(serde::de::Error::custom(format!(
                "a constant is a number or \"sample_rate\", got \"{w}\""
            ))),
        }
    }
}

fn default_rates() -> Vec<u32> {
    vec![16000]
}
fn one() -> usize {
    1
}
fn half() -> f32 {
    0.5
}
fn second() -> f64 {
    1000.0
}
fn is_zero(x: &f32) -> bool {
    *x == 0.0
}

impl StreamDecl {
    /// Silero VAD's stream: 512 samples (+64 of context) at 16 kHz, 256 (+32) at 8 kHz, as
    /// its own wrapper steps it; recurrent `state`; the rate as `sr`.
    pub fn silero_vad() -> StreamDecl {
        StreamDecl {
            kind: StreamKind::Vad,
            sample_rates: vec![16000, 8000],
            phrase: None,
            stages: Vec::new(),
            input: WindowDecl {
                tensor: "input".into(),
                window: None,
                hop: None,
                window_ms: Some(36.0),
                hop_ms: Some(32.0),
                prefill: None,
                pad: 0.0,
            },
            output: OutputDecl {
                tensor: "output".into(),
                frames: 1,
            },
            state: BTreeMap::from([("state".into(), "stateN".into())]),
            constants: BTreeMap::from([("sr".into(), ConstantDecl::SampleRate)]),
            gate: None,
        }
    }

    /// The stages in order, this model (`own_name`) last.
    pub fn stages(&self, own_name: &str) -> Vec<StageDecl> {
        let mut stages = self.stages.clone();
        stages.push(StageDecl {
            model: own_name.to_string(),
            input: self.input.clone(),
            output: self.output.clone(),
            state: self.state.clone(),
            constants: self.constants.clone(),
        });
        stages
    }

    /// Checks what can be checked without the models: windows, hops and rates.
    pub fn validate(&self, own_name: &str) -> Result<(), String> {
        if self.sample_rates.is_empty() || self.sample_rates.contains(&0) {
            return Err("sample_rates must list at least one rate above 0".into());
        }
        if self.kind == StreamKind::Keyword && self.phrase.as_deref().unwrap_or("").is_empty() {
            return Err("a keyword stream needs its `phrase`".into());
        }
        let stages = self.stages(own_name);
        for (i, step) in stages.iter().enumerate() {
            let model = &step.model;
            let at = |what: String| format!("stage {i} ({model}): {what}");
            if i + 1 < stages.len() && model == own_name {
                return Err(at("a model cannot be a stage of its own stream".into()));
            }
            let w = &step.input;
            if i == 0 {
                if w.window.is_some() || w.hop.is_some() {
                    return Err(at(
                        "the first stage reads audio: give window_ms and hop_ms".into()
                    ));
                }
                for rate in &self.sample_rates {
                    audio_window(w, *rate).map_err(&at)?;
                }
            } else {
                if w.window_ms.is_some() || w.hop_ms.is_some() {
                    return Err(at("window_ms / hop_ms are for the first stage; later stages count frames (window, hop)".into()));
                }
                let (window, hop) = (w.window.unwrap_or(0), w.hop.unwrap_or(0));
                check_window(window, hop, w.prefill).map_err(&at)?;
            }
            if step.output.frames == 0 {
                return Err(at("output frames must be at least 1".into()));
            }
        }
        if let Some(gate) = &self.gate {
            let gated = stages.iter().position(|s| s.model == gate.stage);
            match gated {
                None => {
                    return Err(format!(
                        "gate.stage '{}' is not a stage of this stream",
                        gate.stage
                    ))
                }
                Some(0) => {
                    return Err(format!(
                        "gate.stage '{}' reads the audio; gate a later stage",
                        gate.stage
                    ))
                }
                Some(_) => {}
            }
            if !(0.0..=1.0).contains(&gate.threshold) {
                return Err("gate.threshold must be between 0 and 1".into());
            }
            if !(gate.hangover_ms.is_finite() && gate.hangover_ms >= 0.0) {
                return Err("gate.hangover_ms must be 0 or more".into());
            }
            if gate.model == own_name || stages.iter().any(|s| s.model == gate.model) {
                return Err(format!(
                    "gate.model '{}' is a stage of this stream; the gate is a model of its own",
                    gate.model
                ));
            }
        }
        Ok(())
    }
}

/// The most new audio one step of the first stage may take, in samples. A stream holds at
/// most 65,536 samples of its client's audio (`actors::stream_session::AUDIO_CREDITS`), and
/// stops reading its socket until a step takes some: a step must be able to run with the
/// largest frame a client may send (64 KiB: 32,768 PCM16 samples) still waiting for room,
/// or the stream waits for itself for ever.
const MAX_HOP_SAMPLES: usize = 32_768;
const _: () = assert!(
    MAX_HOP_SAMPLES + 64 * 1024 / 2 <= crate::actors::stream_session::AUDIO_CREDITS,
    "a step's audio and the largest frame must fit in a stream's buffer"
);

/// The first stage's window and hop in samples at `rate`.
pub fn audio_window(w: &WindowDecl, rate: u32) -> Result<(usize, usize), String> {
    let samples = |ms: Option<f64>, what: &str| -> Result<usize, String> {
        let ms = ms.ok_or_else(|| format!("the first stage needs {what}"))?;
        let exact = ms * f64::from(rate) / 1000.0;
        if !(exact >= 1.0 && exact.fract() == 0.0 && exact < 1e7) {
            return Err(format!(
                "{what} = {ms} is not a whole number of samples at {rate} Hz"
            ));
        }
        Ok(exact as usize)
    };
    let window = samples(w.window_ms, "window_ms")?;
    let hop = samples(w.hop_ms, "hop_ms")?;
    check_window(window, hop, w.prefill)?;
    // The stream's chunk is the hop: each step takes one hop of new audio, and a result's
    // time (a `vad` result's chunk start) counts back one hop from where the step reached.
    // Another prefill would make the first step take more or less than a hop.
    if w.prefill.is_some_and(|p| p != window - hop) {
        return Err(format!(
            "the first stage's prefill is its context, window - hop ({} samples at {rate} Hz): leave it out",
            window - hop
        ));
    }
    if hop > MAX_HOP_SAMPLES {
        return Err(format!(
            "hop_ms = {} is {hop} samples at {rate} Hz; a step may take at most {MAX_HOP_SAMPLES} (a stream buffers 65536 samples of audio)",
            w.hop_ms.unwrap_or_default()
        ));
    }
    Ok((window, hop))
}

fn check_window(window: usize, hop: usize, prefill: Option<usize>) -> Result<(), String> {
    if window == 0 || hop == 0 || hop > window {
        return Err(format!(
            "need 0 < hop <= window, got window {window}, hop {hop}"
        ));
    }
    if prefill.is_some_and(|p| p >= window) {
        return Err(format!("prefill must be below the window ({window})"));
    }
    Ok(())
}

/// The manifest's `stream` key: `"vad"` or a table (whose misspelt keys are errors that
/// name the key, which an untagged enum would swallow).
pub(super) fn deserialize_stream<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<StreamDecl>, D::Error> {
    struct Visit;
    impl<'de> serde::de::Visitor<'de> for Visit {
        type Value = StreamDecl;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("\"vad\" or a table declaring the stream")
        }
        fn visit_str<E: serde::de::Error>(self, word: &str) -> Result<StreamDecl, E> {
            match word {
                "vad" => Ok(StreamDecl::silero_vad()),
                _ => Err(E::custom(format!(
                    "stream must be \"vad\" or a table declaring the stream, got \"{word}\""
                ))),
            }
        }
        fn visit_map<M: serde::de::MapAccess<'de>>(self, map: M) -> Result<StreamDecl, M::Error> {
            StreamDecl::deserialize(serde::de::value::MapAccessDeserializer::new(map))
        }
    }
    deserializer.deserialize_any(Visit).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first(window_ms: f64, hop_ms: f64, prefill: Option<usize>) -> StreamDecl {
        let mut decl = StreamDecl::silero_vad();
        decl.input.window_ms = Some(window_ms);
        decl.input.hop_ms = Some(hop_ms);
        decl.input.prefill = prefill;
        decl
    }

    #[test]
    fn the_first_stage_takes_one_hop_a_step_and_fits_the_streams_buffer() {
        assert!(StreamDecl::silero_vad().validate("vad").is_ok());
        // Its context spelt out is fine; any other prefill is refused, at every rate.
        assert!(first(36.0, 32.0, Some(64)).validate("vad").is_err()); // 32 at 8 kHz
        let mut at_16k = first(36.0, 32.0, Some(64));
        at_16k.sample_rates = vec![16000];
        assert!(at_16k.validate("vad").is_ok());
        let err = first(36.0, 32.0, Some(560)).validate("vad").unwrap_err();
        assert!(err.contains("prefill is its context"), "{err}");
        let err = first(36.0, 32.0, Some(0)).validate("vad").unwrap_err();
        assert!(
            err.contains("window - hop (64 samples at 16000 Hz)"),
            "{err}"
        );
        // Two seconds a step at 16 kHz fit; five do not.
        assert!(first(2048.0, 2048.0, None).validate("vad").is_ok());
        let err = first(5000.0, 5000.0, None).validate("vad").unwrap_err();
        assert!(err.contains("80000 samples at 16000 Hz"), "{err}");
    }
}
