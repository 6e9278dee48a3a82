//! The stream engine: a stream's stages, as its manifest declaration says, resolved against
//! the models that serve them ([`Layout`]), and one stream's progress through them
//! ([`PipelineState`]): the buffer of frames each stage slides its window over, the recurrent
//! state each carries, and the audio consumed. No actors and no I/O: the session asks for the
//! next step, sends it through the stage model's router (where it is batched with other
//! streams' steps), and hands the answer back.
//!
//! Step `k` of a stage sees frames `[k*hop, k*hop + window)` of a buffer that started with
//! `prefill` frames of `pad`; the frames a step makes go to the next stage's buffer, stamped
//! with the audio time (in samples) its input reached. A stream's results depend on its own
//! audio only, so a stream batched with others gets what it would get alone.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::manifest::{audio_window, BatchAxis, ConstantDecl, StageDecl, StreamDecl};
use crate::model::{InferRequest, ModelInfo};
use crate::tensor::{DataType, NamedTensor, TensorData};

/// One stage resolved against its model.
#[derive(Clone, Debug)]
pub struct StageLayout {
    pub model: String,
    input_names: Vec<String>,
    window_input: usize,
    window_shape: Vec<i64>,
    pub window: usize,
    pub hop: usize,
    prefill: usize,
    pad: f32,
    /// Elements per input frame (1 for audio).
    frame_len: usize,
    output: usize,
    frames_out: usize,
    out_frame_len: usize,
    recurrent: Vec<Recurrent>,
    constants: Vec<(usize, Vec<i64>, TensorData)>,
}

#[derive(Clone, Debug)]
struct Recurrent {
    input: usize,
    output: usize,
    shape: Vec<i64>,
    len: usize,
}

/// A stream's stages at one sample rate; the first reads the audio.
#[derive(Clone, Debug)]
pub struct Layout {
    pub stages: Vec<StageLayout>,
    pub sample_rate: u32,
}

impl Layout {
    /// Resolves `decl` (of the model `infos.last()`) against its stages' models, in order.
    pub fn resolve(
        decl: &StreamDecl,
        infos: &[&ModelInfo],
        sample_rate: u32,
    ) -> Result<Layout, String> {
        if !decl.sample_rates.contains(&sample_rate) {
            let rates: Vec<String> = decl.sample_rates.iter().map(u32::to_string).collect();
            return Err(format!(
                "sample_rate must be {}, got {sample_rate}",
                rates.join(" or ")
            ));
        }
        let own = infos.last().ok_or("a stream needs a model")?;
        let stages = decl.stages(&own.name);
        if stages.len() != infos.len() {
            return Err("the stream's stages and models differ in number".into());
        }
        let mut frame_len = 1;
        let mut resolved = Vec::with_capacity(stages.len());
        let last = stages.len() - 1;
        for (i, (stage, info)) in stages.iter().zip(infos).enumerate() {
            let layout = resolve_stage(stage, info, (i == 0, i == last), frame_len, sample_rate)
                .map_err(|e| format!("stream stage {i} ({}): {e}", stage.model))?;
            frame_len = layout.out_frame_len;
            resolved.push(layout);
        }
        Ok(Layout {
            stages: resolved,
            sample_rate,
        })
    }

    /// Audio samples per step of the first stage: the stream's chunk.
    pub fn chunk_samples(&self) -> usize {
        self.stages[0].hop
    }
}

fn resolve_stage(
    stage: &StageDecl,
    info: &ModelInfo,
    (reads_audio, last): (bool, bool),
    frame_len: usize,
    sample_rate: u32,
) -> Result<StageLayout, String> {
    let input = |name: &str| {
        info.inputs
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| format!("the model has no input '{name}'"))
    };
    let output = |name: &str| {
        info.outputs
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| format!("the model has no output '{name}'"))
    };
    let fp32_row_shape = |index: usize, is_input: bool| -> Result<(Vec<i64>, usize), String> {
        let (spec, axis) = if is_input {
            (&info.inputs[index], &info.input_axes[index])
        } else {
            (&info.outputs[index], &info.output_axes[index])
        };
        if spec.datatype != DataType::Fp32 {
            return Err(format!("'{}' must be FP32", spec.name));
        }
        let BatchAxis::Axis(axis) = *axis else {
            return Err(format!("'{}' must have a batch axis", spec.name));
        };
        let mut shape = spec.shape.clone();
        if axis >= shape.len() {
            return Err(format!("'{}' has no axis {axis} to batch on", spec.name));
        }
        shape[axis] = 1;
        let fixed = shape.iter().all(|&d| d >= 1);
        Ok((
            shape.clone(),
            if fixed {
                shape.iter().product::<i64>() as usize
            } else {
                0
            },
        ))
    };

    let w = &stage.input;
    let (window, hop) = if reads_audio {
        audio_window(w, sample_rate)?
    } else {
        (w.window.unwrap_or(0), w.hop.unwrap_or(0))
    };
    let window_input = input(&w.tensor)?;
    let (mut window_shape, fixed_len) = fp32_row_shape(window_input, true)?;
    let window_len = window * frame_len;
    if fixed_len != window_len {
        // A [batch, n] input whose n the file leaves open (or the manifest declares per
        // rate, as Silero's): the window goes in flat.
        if window_shape.len() != 2 {
            return Err(format!(
                "input '{}' of shape {:?} cannot take a window of {window} frames of {frame_len}",
                w.tensor, info.inputs[window_input].shape
            ));
        }
        let other = usize::from(window_shape[0] == 1);
        window_shape[other] = window_len as i64;
    }
    let output_index = output(&stage.output.tensor)?;
    let (_, out_len) = fp32_row_shape(output_index, false)?;
    let frames_out = stage.output.frames;
    // The last stage's output is read for its first value: its size may be left open.
    let open_ok = last && frames_out == 1;
    if (out_len == 0 && !open_ok) || !out_len.is_multiple_of(frames_out) {
        return Err(format!(
            "output '{}' must have fixed dimensions that divide into {frames_out} frames",
            stage.output.tensor
        ));
    }
    let mut recurrent = Vec::new();
    for (input_name, output_name) in &stage.state {
        let input_index = input(input_name)?;
        let (shape, len) = fp32_row_shape(input_index, true)?;
        let output_index = output(output_name)?;
        // ONNX files often leave the output's dimensions open; its size is checked per step.
        let (_, out) = fp32_row_shape(output_index, false)?;
        if len == 0 || (out != 0 && out != len) {
            return Err(format!(
                "state '{input_name}' must have fixed dimensions, and '{output_name}' its size"
            ));
        }
        recurrent.push(Recurrent {
            input: input_index,
            output: output_index,
            shape,
            len,
        });
    }
    let mut constants = Vec::new();
    for (name, value) in &stage.constants {
        let index = input(name)?;
        let spec = &info.inputs[index];
        let value = match value {
            ConstantDecl::Number(n) => *n,
            ConstantDecl::SampleRate => f64::from(sample_rate),
        };
        let shape: Vec<i64> = spec.shape.iter().map(|&d| d.max(1)).collect();
        let n = shape.iter().product::<i64>() as usize;
        let data = match spec.datatype {
            DataType::Int64 => TensorData::Int64(vec![value as i64; n]),
            DataType::Int32 => TensorData::Int32(vec![value as i32; n]),
            DataType::Fp32 => TensorData::Fp32(vec![value as f32; n]),
            DataType::Fp64 => TensorData::Fp64(vec![value; n]),
            other => return Err(format!("constant '{name}' cannot be {other}")),
        };
        constants.push((index, shape, data));
    }
    let covered = 1 + recurrent.len() + constants.len();
    if covered != info.inputs.len() {
        return Err(format!(
            "the model has {} inputs; the declaration feeds {covered} (window, state, constants)",
            info.inputs.len()
        ));
    }
    Ok(StageLayout {
        model: info.name.clone(),
        input_names: info.inputs.iter().map(|s| s.name.clone()).collect(),
        window_input,
        window_shape,
        window,
        hop,
        prefill: w.prefill.unwrap_or(window - hop),
        pad: w.pad,
        frame_len,
        output: output_index,
        frames_out,
        out_frame_len: out_len / frames_out,
        recurrent,
        constants,
    })
}

/// One stage's progress: its buffer (from the next step's first frame on), the audio time of
/// each frame (stages after the first), its step count and recurrent state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageState {
    frames: VecDeque<f32>,
    times: VecDeque<u64>,
    steps: u64,
    states: Vec<Vec<f32>>,
}

/// One stream's progress through its stages: all a checkpoint needs to go on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PipelineState {
    stages: Vec<StageState>,
    /// Audio samples received, and covered by the first stage's completed steps.
    pub audio_in: u64,
    pub audio_done: u64,
    /// The last audio was padded with silence to a whole window (the stream is ending).
    padded: bool,
}

/// What a completed step produced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepDone {
    /// Audio time the step's input reached, in samples (padding included).
    pub time: u64,
    /// New audio samples the step consumed (first stage only; 0 for the others).
    pub audio_taken: u64,
    /// The first element of the stage's output: the last stage's probability or score.
    pub value: f32,
}

impl PipelineState {
    /// A new stream: every buffer holds its prefill, every state is zeros.
    pub fn new(layout: &Layout) -> PipelineState {
        PipelineState {
            stages: layout
                .stages
                .iter()
                .enumerate()
                .map(|(i, s)| StageState {
                    frames: std::iter::repeat_n(s.pad, s.prefill * s.frame_len).collect(),
                    // The first stage's frames are audio samples: their time is their index.
                    times: std::iter::repeat_n(0, if i == 0 { 0 } else { s.prefill }).collect(),
                    steps: 0,
                    states: s.recurrent.iter().map(|r| vec![0.0; r.len]).collect(),
                })
                .collect(),
            audio_in: 0,
            audio_done: 0,
            padded: false,
        }
    }

    /// A fresh start at `samples` of audio (a stream that goes on from a checkpoint on another
    /// model version, whose state does not carry over).
    pub fn fresh_at(layout: &Layout, samples: u64) -> PipelineState {
        let mut progress = PipelineState::new(layout);
        progress.audio_in = samples;
        progress.audio_done = samples;
        progress
    }

    /// Whether a checkpoint's progress fits `layout` (same stages, state sizes and frames).
    pub fn fits(&self, layout: &Layout) -> bool {
        self.stages.len() == layout.stages.len()
            && !self.padded
            && self.audio_in == self.audio_done
            && self
                .stages
                .iter()
                .zip(&layout.stages)
                .enumerate()
                .all(|(i, (p, s))| {
                    p.states.len() == s.recurrent.len()
                        && p.states
                            .iter()
                            .zip(&s.recurrent)
                            .all(|(v, r)| v.len() == r.len)
                        && p.frames.len().is_multiple_of(s.frame_len)
                        && (i == 0 || p.times.len() == p.frames.len() / s.frame_len)
                })
    }

    /// The progress as of the last completed step, for a checkpoint: audio after it is the
    /// client's to send again, so the first stage's buffer keeps only what it stepped over.
    pub fn snapshot(&self) -> PipelineState {
        let mut snapshot = self.clone();
        let pending = self.audio_pending() as usize;
        let first = &mut snapshot.stages[0].frames;
        first.truncate(first.len().saturating_sub(pending));
        snapshot.audio_in = snapshot.audio_done;
        snapshot
    }

    pub fn push_audio(&mut self, samples: &[f32]) {
        self.audio_in += samples.len() as u64;
        self.stages[0].frames.extend(samples);
    }

    /// Audio samples received but not yet covered by a completed step.
    pub fn audio_pending(&self) -> u64 {
        self.audio_in - self.audio_done
    }

    /// The stage to step next, if any: the last that has a window ready, so that results
    /// come out before more audio goes in. With `ending`, the audio left over is padded with
    /// silence to a last window.
    pub fn next_step(&mut self, layout: &Layout, ending: bool) -> Option<usize> {
        let ready = |p: &StageState, s: &StageLayout| p.frames.len() >= s.window * s.frame_len;
        if let Some(stage) = (0..layout.stages.len())
            .rev()
            .find(|&i| ready(&self.stages[i], &layout.stages[i]))
        {
            return Some(stage);
        }
        if ending && !self.padded && self.audio_pending() > 0 {
            self.padded = true;
            let first = &layout.stages[0];
            self.stages[0].frames.resize(first.window, 0.0);
            return Some(0);
        }
        None
    }

    /// The request for `stage`'s next step (which [`PipelineState::next_step`] said is ready).
    pub fn request(&self, layout: &Layout, stage: usize) -> InferRequest {
        let s = &layout.stages[stage];
        let p = &self.stages[stage];
        let mut inputs: Vec<NamedTensor> = s
            .input_names
            .iter()
            .map(|name| NamedTensor {
                name: name.clone(),
                shape: Vec::new(),
                data: TensorData::Fp32(Vec::new()),
            })
            .collect();
        let window: Vec<f32> = p.frames.range(..s.window * s.frame_len).copied().collect();
        inputs[s.window_input].shape = s.window_shape.clone();
        inputs[s.window_input].data = TensorData::Fp32(window);
        for (r, state) in s.recurrent.iter().zip(&p.states) {
            inputs[r.input].shape = r.shape.clone();
            inputs[r.input].data = TensorData::Fp32(state.clone());
        }
        for (index, shape, data) in &s.constants {
            inputs[*index].shape = shape.clone();
            inputs[*index].data = data.clone();
        }
        let mut outputs = vec![s.output];
        outputs.extend(s.recurrent.iter().map(|r| r.output));
        InferRequest {
            inputs,
            rows: 1,
            outputs,
        }
    }

    /// Takes `stage`'s answer (outputs in the order [`PipelineState::request`] asked for): slides
    /// its window on, keeps its state, and passes its frames to the next stage.
    pub fn complete(
        &mut self,
        layout: &Layout,
        stage: usize,
        outputs: &[TensorData],
    ) -> Result<StepDone, String> {
        let s = &layout.stages[stage];
        let expected = s.frames_out * s.out_frame_len;
        let values = match outputs.first() {
            Some(TensorData::Fp32(v))
                if v.len() == expected || (expected == 0 && !v.is_empty()) =>
            {
                v
            }
            _ => {
                return Err(format!(
                    "model '{}' answered a stream step with an output of an unexpected shape",
                    s.model
                ))
            }
        };
        for (i, r) in s.recurrent.iter().enumerate() {
            match outputs.get(1 + i) {
                Some(TensorData::Fp32(v)) if v.len() == r.len => {
                    self.stages[stage].states[i].copy_from_slice(v)
                }
                _ => {
                    return Err(format!(
                        "model '{}' answered a stream step with a state of an unexpected shape",
                        s.model
                    ))
                }
            }
        }
        let (time, audio_taken) = if stage == 0 {
            let covers = if self.stages[0].steps == 0 {
                s.window - s.prefill
            } else {
                s.hop
            };
            let time = self.audio_done + covers as u64;
            let done = time.min(self.audio_in);
            let taken = done - self.audio_done;
            self.audio_done = done;
            (time, taken)
        } else {
            (self.stages[stage].times[s.window - 1], 0)
        };
        let p = &mut self.stages[stage];
        p.steps += 1;
        p.frames.drain(..s.hop * s.frame_len);
        if stage > 0 {
            p.times.drain(..s.hop);
        }
        if let Some(next) = self.stages.get_mut(stage + 1) {
            next.frames.extend(values.iter().copied());
            next.times.extend(std::iter::repeat_n(time, s.frames_out));
        }
        Ok(StepDone {
            time,
            audio_taken,
            value: values[0],
        })
    }
}

#[cfg(test)]
impl PipelineState {
    /// A one-stage progress with Silero's sizes, for tests of what carries it.
    pub fn example() -> PipelineState {
        PipelineState {
            stages: vec![StageState {
                frames: std::iter::repeat_n(0.5, 64).collect(),
                times: VecDeque::new(),
                steps: 100,
                states: vec![(0..256).map(|i| i as f32 * 0.01).collect()],
            }],
            audio_in: 51_200,
            audio_done: 51_200,
            padded: false,
        }
    }
}

#[cfg(test)]
#[path = "pipeline_tests.rs"]
mod tests;
