//! The stream engine: one stream's progress through its stages, as its manifest declaration
//! says and `stream::layout` resolves them ([`PipelineState`]): the buffer of frames each
//! stage slides its window over, the recurrent state each carries, and the audio consumed. No actors and no I/O: the session asks for the
//! next step, sends it through the stage model's router (where it is batched with other
//! streams' steps), and hands the answer back.
//!
//! Step `k` of a stage sees frames `[k*hop, k*hop + window)` of a buffer that started with
//! `prefill` frames of `pad`; the frames a step makes go to the next stage's buffer, stamped
//! with the audio time (in samples) its input reached. A stream's results depend on its own
//! audio only, so a stream batched with others gets what it would get alone.
//!
//! A stream may have a gate (`stream::gate`): a voice activity model beside the first stage,
//! stepped here as the stage one past the last, that lets a later stage run only around
//! speech.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::gate::{GateState, Verdict};
pub use super::layout::{Layout, StageLayout};
use crate::model::InferRequest;
use crate::tensor::TensorData;

/// One stage's progress: its buffer (from the next step's first frame on), the audio time of
/// each frame (stages after the first), its step count and recurrent state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageState {
    frames: VecDeque<f32>,
    times: VecDeque<u64>,
    steps: u64,
    states: Vec<Vec<f32>>,
}

impl StageState {
    /// A stage before its first step: the buffer holds the prefill, the state is zeros.
    fn start(s: &StageLayout, reads_audio: bool) -> StageState {
        StageState {
            frames: std::iter::repeat_n(s.pad, s.prefill * s.frame_len).collect(),
            // An audio stage's frames are samples: their time is their index.
            times: std::iter::repeat_n(0, if reads_audio { 0 } else { s.prefill }).collect(),
            steps: 0,
            states: s.recurrent.iter().map(|r| vec![0.0; r.len]).collect(),
        }
    }

    fn ready(&self, s: &StageLayout) -> bool {
        self.frames.len() >= s.window * s.frame_len
    }

    fn fits(&self, s: &StageLayout, reads_audio: bool) -> bool {
        self.states.len() == s.recurrent.len()
            && self
                .states
                .iter()
                .zip(&s.recurrent)
                .all(|(v, r)| v.len() == r.len)
            && self.frames.len().is_multiple_of(s.frame_len)
            && (reads_audio || self.times.len() == self.frames.len() / s.frame_len)
    }

    /// The audio time an audio stage's step reaches, from where its steps so far reached.
    fn audio_step_end(&self, s: &StageLayout, reached: u64) -> u64 {
        let covers = if self.steps == 0 {
            s.window - s.prefill
        } else {
            s.hop
        };
        reached + covers as u64
    }
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
    /// (Checkpoints are postcard, which needs every field written, `None`s too.)
    gate: Option<GateProgress>,
}

/// The gate's own stage (its buffer of audio and recurrent state) and what it heard.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct GateProgress {
    stage: StageState,
    state: GateState,
}

impl GateProgress {
    /// How far the gate's buffer reaches in the stream's audio, when the stream has received
    /// `audio_in` samples: past it by the audio the gate will skip (heard before a resume).
    fn received(&self, audio_in: u64) -> u64 {
        audio_in + self.state.skip
    }
}

/// What a completed step produced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepDone {
    /// Audio time the step's input reached, in samples (padding included).
    pub time: u64,
    /// `time` within the audio received: the same but for steps of the stream's last window,
    /// which the stream completed with silence; theirs is where the audio ended. What a
    /// result may claim to have heard: never a time after the last sample received.
    pub heard: u64,
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
                .map(|(i, s)| StageState::start(s, i == 0))
                .collect(),
            audio_in: 0,
            audio_done: 0,
            padded: false,
            gate: (layout.gate.as_ref()).map(|g| GateProgress {
                stage: StageState::start(&g.stage, true),
                state: GateState::default(),
            }),
        }
    }

    /// A fresh start at `samples` of audio (a stream that goes on from a checkpoint on another
    /// model version, whose state does not carry over).
    pub fn fresh_at(layout: &Layout, samples: u64) -> PipelineState {
        let mut progress = PipelineState::new(layout);
        progress.audio_in = samples;
        progress.audio_done = samples;
        if let Some(gate) = &mut progress.gate {
            gate.state.heard = samples;
        }
        progress
    }

    /// Whether a checkpoint's progress fits `layout` (same stages, state sizes and frames).
    pub fn fits(&self, layout: &Layout) -> bool {
        let gate_fits = match (&self.gate, &layout.gate) {
            (None, None) => true,
            (Some(p), Some(g)) => !p.state.padded && p.stage.fits(&g.stage, true),
            _ => false,
        };
        self.stages.len() == layout.stages.len()
            && !self.padded
            && self.audio_in == self.audio_done
            && gate_fits
            && (self.stages.iter().zip(&layout.stages).enumerate())
                .all(|(i, (p, s))| p.fits(s, i == 0))
    }

    /// The progress as of the last completed step, for a checkpoint: audio after it is the
    /// client's to send again, so the first stage's buffer keeps only what it stepped over.
    pub fn snapshot(&self) -> PipelineState {
        let mut snapshot = self.clone();
        let pending = self.audio_pending() as usize;
        let first = &mut snapshot.stages[0].frames;
        first.truncate(first.len().saturating_sub(pending));
        let resume_at = self.audio_done;
        if let Some(gate) = &mut snapshot.gate {
            // The client sends the audio from `resume_at` again. The gate keeps what it has
            // not heard before that, and skips what it heard after it.
            let received = gate.received(self.audio_in);
            let keep_to = gate.state.heard.max(resume_at);
            let frames = &mut gate.stage.frames;
            frames.truncate(frames.len().saturating_sub((received - keep_to) as usize));
            gate.state.skip = keep_to - resume_at;
        }
        snapshot.audio_in = snapshot.audio_done;
        snapshot
    }

    pub fn push_audio(&mut self, samples: &[f32]) {
        self.audio_in += samples.len() as u64;
        self.stages[0].frames.extend(samples);
        if let Some(gate) = &mut self.gate {
            let heard_already = gate.state.skip.min(samples.len() as u64);
            gate.state.skip -= heard_already;
            gate.stage.frames.extend(&samples[heard_already as usize..]);
        }
    }

    /// Steps the gate let its stage skip so far (0 without a gate).
    pub fn gated_skips(&self) -> u64 {
        self.gate.as_ref().map_or(0, |g| g.state.skipped)
    }

    /// Audio samples received but not yet covered by a completed step.
    pub fn audio_pending(&self) -> u64 {
        self.audio_in - self.audio_done
    }

    /// The stage to step next, if any: the last that has a window ready, so that results
    /// come out before more audio goes in. With `ending`, the audio left over is padded with
    /// silence to a last window.
    ///
    /// The gate is the stage one past the last: it steps before the first stage, so that it
    /// is never more than a window behind.
    pub fn next_step(&mut self, layout: &Layout, ending: bool) -> Option<usize> {
        let gate_index = layout.stages.len();
        'decide: loop {
            for i in (1..layout.stages.len()).rev() {
                if !self.stages[i].ready(&layout.stages[i]) {
                    continue;
                }
                match self.verdict(layout, i, ending) {
                    Verdict::Run => return Some(i),
                    Verdict::Wait => {}
                    Verdict::Skip => {
                        self.skip(layout, i);
                        continue 'decide;
                    }
                }
            }
            break;
        }
        if let (Some(p), Some(g)) = (&mut self.gate, &layout.gate) {
            if p.stage.ready(&g.stage) {
                return Some(gate_index);
            }
            if ending && !p.state.padded && p.received(self.audio_in) > p.state.heard {
                p.state.padded = true;
                p.stage.frames.resize(g.stage.window, 0.0);
                return Some(gate_index);
            }
        }
        if self.stages[0].ready(&layout.stages[0]) {
            return Some(0);
        }
        if ending && !self.padded && self.audio_pending() > 0 {
            self.padded = true;
            let first = &layout.stages[0];
            self.stages[0].frames.resize(first.window, 0.0);
            return Some(0);
        }
        None
    }

    /// Whether the gate lets `stage`'s ready step run now.
    fn verdict(&self, layout: &Layout, stage: usize, ending: bool) -> Verdict {
        let (Some(p), Some(g)) = (&self.gate, &layout.gate) else {
            return Verdict::Run;
        };
        if stage != g.gated {
            return Verdict::Run;
        }
        let s = &layout.stages[stage];
        let t = self.stages[stage].times[s.window - 1];
        let exhausted = ending
            && !p.stage.ready(&g.stage)
            && (p.state.padded || p.received(self.audio_in) == p.state.heard);
        p.state.verdict(g, t, exhausted)
    }

    /// Skips the gated `stage`'s step: its window slides on, and the stages after it start
    /// again (their windows would span the gap).
    fn skip(&mut self, layout: &Layout, stage: usize) {
        let s = &layout.stages[stage];
        let p = &mut self.stages[stage];
        let t = p.times[s.window - 1];
        p.steps += 1;
        p.frames.drain(..s.hop * s.frame_len);
        p.times.drain(..s.hop);
        for (later, l) in self.stages.iter_mut().zip(&layout.stages).skip(stage + 1) {
            *later = StageState::start(l, false);
        }
        if let (Some(p), Some(g)) = (&mut self.gate, &layout.gate) {
            p.state.skipped += 1;
            p.state.decided(g, t);
        }
    }

    /// Whether a stage after the first (or the gate) has a step it can take now: the audio
    /// stepped so far has work left downstream.
    pub fn downstream_ready(&self, layout: &Layout) -> bool {
        let gate_ready =
            matches!((&self.gate, &layout.gate), (Some(p), Some(g)) if p.stage.ready(&g.stage));
        gate_ready
            || (1..layout.stages.len()).any(|i| {
                self.stages[i].ready(&layout.stages[i])
                    && self.verdict(layout, i, false) != Verdict::Wait
            })
    }

    fn stage(&self, stage: usize) -> &StageState {
        match self.stages.get(stage) {
            Some(p) => p,
            None => &self.gate.as_ref().expect("the gate's progress").stage,
        }
    }

    /// The request for `stage`'s next step (which [`PipelineState::next_step`] said is ready).
    pub fn request(&self, layout: &Layout, stage: usize) -> InferRequest {
        let s = layout.stage(stage);
        let p = self.stage(stage);
        let window: Vec<f32> = p.frames.range(..s.window * s.frame_len).copied().collect();
        InferRequest {
            inputs: s.inputs(window, &p.states),
            rows: 1,
            outputs: s.outputs(),
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
        let s = layout.stage(stage);
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
        let p = self.stage_mut(stage);
        for (i, r) in s.recurrent.iter().enumerate() {
            match outputs.get(1 + i) {
                Some(TensorData::Fp32(v)) if v.len() == r.len => p.states[i].copy_from_slice(v),
                _ => {
                    return Err(format!(
                        "model '{}' answered a stream step with a state of an unexpected shape",
                        s.model
                    ))
                }
            }
        }
        let value = values[0];
        if stage == layout.stages.len() {
            return Ok(self.gate_heard(layout, value));
        }
        let (time, audio_taken) = if stage == 0 {
            let time = self.stages[0].audio_step_end(s, self.audio_done);
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
        if let (Some(gate), Some(g)) = (&mut self.gate, &layout.gate) {
            if stage == g.gated {
                gate.state.decided(g, time);
            }
        }
        Ok(StepDone {
            time,
            // A step's frames came from audio received, but the last window's were padded
            // with silence past it: no step of any stage reached further than the audio.
            heard: time.min(self.audio_in),
            audio_taken,
            value,
        })
    }

    /// The gate's step answered `probability` (its state is kept already).
    fn gate_heard(&mut self, layout: &Layout, probability: f32) -> StepDone {
        let g = layout.gate.as_ref().expect("a gated layout");
        let audio_in = self.audio_in;
        let gate = self.gate.as_mut().expect("a gated stream");
        let time = gate.stage.audio_step_end(&g.stage, gate.state.heard);
        gate.state.heard = time.min(gate.received(audio_in));
        gate.stage.steps += 1;
        gate.stage.frames.drain(..g.stage.hop);
        gate.state.hear(g, time, probability);
        StepDone {
            time,
            heard: time.min(audio_in),
            audio_taken: 0,
            value: probability,
        }
    }

    fn stage_mut(&mut self, stage: usize) -> &mut StageState {
        match self.stages.get_mut(stage) {
            Some(p) => p,
            None => &mut self.gate.as_mut().expect("the gate's progress").stage,
        }
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
            gate: None,
        }
    }
}

#[cfg(test)]
#[path = "pipeline_tests.rs"]
pub(super) mod tests;
