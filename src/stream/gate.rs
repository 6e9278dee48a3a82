//! A stream's gate: a voice activity model that hears the stream's audio beside its first
//! stage, so that one later stage, and the stages after it, run only around speech (a keyword
//! spotter then spends no embedding calls on silence). The rule, from the manifest's
//! `gate` (`manifest::GateDecl`): step `k` of the gated stage, whose input reached audio time
//! `t`, runs when the gate heard speech at some time in `[t - hangover, t + lookback]`, and is
//! skipped otherwise. `lookback` is the audio the later stages' windows span, so a later
//! stage's result at a time with speech in the hangover before it equals the ungated one.
//!
//! Deciding may wait for the gate to hear up to `t + lookback`; the steps it holds back run
//! as soon as speech is heard, and are skipped once the gate is past them (or the stream
//! ends). The decision depends on the stream's own audio only, so a gated stream gives the
//! same results alone, batched with others, or resumed from a checkpoint.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::layout::GateLayout;

/// What the gate has heard in one stream (its model's own buffer and state are a stage's,
/// kept beside this by `stream::pipeline`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GateState {
    /// Audio time covered by the gate's completed steps.
    pub(super) heard: u64,
    /// Samples of the audio to come that the gate heard already: a stream restored from a
    /// checkpoint taken while its first stage was behind the gate.
    pub(super) skip: u64,
    pub(super) padded: bool,
    /// Audio times of the gate's steps that heard speech, oldest first; those no step still
    /// to decide can use are dropped.
    speech: VecDeque<u64>,
    /// Steps of the gated stage skipped so far.
    pub skipped: u64,
}

/// What the gated stage's next step does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Run,
    Skip,
    /// The gate has not heard far enough to say.
    Wait,
}

impl GateState {
    /// The verdict on a gated step whose input reached `t`; `exhausted`: the gate will hear
    /// nothing more (the stream is ending and the gate has stepped over all its audio).
    pub fn verdict(&self, gate: &GateLayout, t: u64, exhausted: bool) -> Verdict {
        let (from, to) = (t.saturating_sub(gate.hangover), t + gate.lookback);
        if self.speech.iter().any(|&s| (from..=to).contains(&s)) {
            Verdict::Run
        } else if self.heard >= to || exhausted {
            Verdict::Skip
        } else {
            Verdict::Wait
        }
    }

    /// The gate's step that reached `time` gave `probability`.
    pub fn hear(&mut self, gate: &GateLayout, time: u64, probability: f32) {
        if probability >= gate.threshold {
            self.speech.push_back(time);
        }
    }

    /// The gated stage decided its step at `t`: the steps after it are at `t` or later.
    pub fn decided(&mut self, gate: &GateLayout, t: u64) {
        let oldest = t.saturating_sub(gate.hangover);
        while self.speech.front().is_some_and(|&s| s < oldest) {
            self.speech.pop_front();
        }
    }
}
