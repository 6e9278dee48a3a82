//! Voice activity: the tracker that turns a VAD model's per-chunk
//! speech probabilities into speech start/end events with the semantics users of Silero VAD
//! expect (`VADIterator` / `get_speech_timestamps`): start at `threshold`, release below
//! `threshold - 0.15` after `min_silence_ms`, `speech_pad_ms` of padding, and segments shorter
//! than `min_speech_ms` dropped. A start event is sent once the speech has lasted
//! `min_speech_ms`, stamped with the time the speech began.

use serde::{Deserialize, Serialize};

/// Thresholds and durations a client may set in its `start` message.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VadOptions {
    #[serde(default = "default_threshold")]
    pub threshold: f32,
    /// Release threshold; `threshold - 0.15` when absent.
    #[serde(default)]
    pub neg_threshold: Option<f32>,
    #[serde(default = "default_min_speech")]
    pub min_speech_ms: u32,
    #[serde(default = "default_min_silence")]
    pub min_silence_ms: u32,
    #[serde(default = "default_pad")]
    pub speech_pad_ms: u32,
}

fn default_threshold() -> f32 {
    0.5
}
fn default_min_speech() -> u32 {
    250
}
fn default_min_silence() -> u32 {
    100
}
fn default_pad() -> u32 {
    30
}

impl Default for VadOptions {
    fn default() -> Self {
        VadOptions {
            threshold: default_threshold(),
            neg_threshold: None,
            min_speech_ms: default_min_speech(),
            min_silence_ms: default_min_silence(),
            speech_pad_ms: default_pad(),
        }
    }
}

impl VadOptions {
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.threshold) || self.threshold == 0.0 {
            return Err(format!(
                "threshold must be in (0, 1], got {}",
                self.threshold
            ));
        }
        if let Some(neg) = self.neg_threshold {
            if !(0.0..=self.threshold).contains(&neg) {
                return Err(format!(
                    "neg_threshold must be in [0, threshold], got {neg}"
                ));
            }
        }
        for (name, ms) in [
            ("min_speech_ms", self.min_speech_ms),
            ("min_silence_ms", self.min_silence_ms),
            ("speech_pad_ms", self.speech_pad_ms),
        ] {
            if ms > 60_000 {
                return Err(format!("{name} must be at most 60000, got {ms}"));
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VadEvent {
    SpeechStart { sample: u64 },
    SpeechEnd { sample: u64 },
}

/// A [`VadTracker`]'s progress (see [`VadTracker::snapshot`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackerState {
    pub triggered: bool,
    pub confirmed: bool,
    pub start: u64,
    pub temp_end: Option<u64>,
    pub segments: Vec<Segment>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub start: u64,
    pub end: u64,
}

pub struct VadTracker {
    threshold: f32,
    neg_threshold: f32,
    min_speech: u64,
    min_silence: u64,
    pad: u64,
    window: u64,
    triggered: bool,
    confirmed: bool,
    start: u64,
    temp_end: Option<u64>,
    pub segments: Vec<Segment>,
}

impl VadTracker {
    pub fn new(options: &VadOptions, sample_rate: u32, window: usize) -> VadTracker {
        let samples = |ms: u32| ms as u64 * sample_rate as u64 / 1000;
        VadTracker {
            threshold: options.threshold,
            neg_threshold: options
                .neg_threshold
                .unwrap_or((options.threshold - 0.15).max(0.01)),
            min_speech: samples(options.min_speech_ms),
            min_silence: samples(options.min_silence_ms),
            pad: samples(options.speech_pad_ms),
            window: window as u64,
            triggered: false,
            confirmed: false,
            start: 0,
            temp_end: None,
            segments: Vec::new(),
        }
    }

    /// What the tracker has seen so far, for a stream's checkpoint (its options come from the
    /// stream's `start`, which the checkpoint keeps beside it).
    pub fn snapshot(&self) -> TrackerState {
        TrackerState {
            triggered: self.triggered,
            confirmed: self.confirmed,
            start: self.start,
            temp_end: self.temp_end,
            segments: self.segments.clone(),
        }
    }

    /// Takes up where a checkpoint left off.
    pub fn restore(&mut self, state: TrackerState) {
        self.triggered = state.triggered;
        self.confirmed = state.confirmed;
        self.start = state.start;
        self.temp_end = state.temp_end;
        self.segments = state.segments;
    }

    /// Feeds the probability of the chunk that ends at sample `chunk_end`.
    pub fn push(&mut self, chunk_end: u64, probability: f32, events: &mut Vec<VadEvent>) {
        if probability >= self.threshold {
            self.temp_end = None;
            if !self.triggered {
                self.triggered = true;
                self.confirmed = false;
                // Padding reaches back no further than the previous segment's end: with a pad
                // longer than half of min_silence, segments would otherwise overlap.
                let previous_end = self.segments.last().map_or(0, |s| s.end);
                self.start = chunk_end
                    .saturating_sub(self.pad + self.window)
                    .max(previous_end);
            }
        }
        if self.triggered
            && !self.confirmed
            && self.temp_end.is_none()
            && chunk_end - self.start >= self.min_speech
        {
            self.confirmed = true;
            events.push(VadEvent::SpeechStart { sample: self.start });
        }
        if self.triggered && probability < self.neg_threshold {
            let temp_end = *self.temp_end.get_or_insert(chunk_end);
            if chunk_end - temp_end >= self.min_silence {
                // ...and forward no further than the audio heard so far.
                let end = (temp_end + self.pad)
                    .saturating_sub(self.window)
                    .min(chunk_end)
                    .max(self.start);
                self.close(end, events);
            }
        }
    }

    /// The stream ended at `total` samples: close an open segment there.
    pub fn finish(&mut self, total: u64, events: &mut Vec<VadEvent>) {
        if self.triggered {
            let end = self
                .temp_end
                .map_or(total, |t| (t + self.pad).min(total))
                .max(self.start);
            self.close(end, events);
        }
    }

    fn close(&mut self, end: u64, events: &mut Vec<VadEvent>) {
        if end - self.start >= self.min_speech {
            if !self.confirmed {
                events.push(VadEvent::SpeechStart { sample: self.start });
            }
            events.push(VadEvent::SpeechEnd { sample: end });
            self.segments.push(Segment {
                start: self.start,
                end,
            });
        }
        self.triggered = false;
        self.confirmed = false;
        self.temp_end = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds one probability per 512-sample chunk at 16 kHz and returns events in seconds.
    fn run(probabilities: &[f32]) -> Vec<(bool, f64)> {
        let mut tracker = VadTracker::new(&VadOptions::default(), 16000, 512);
        let mut events = Vec::new();
        for (i, &p) in probabilities.iter().enumerate() {
            tracker.push((i as u64 + 1) * 512, p, &mut events);
        }
        tracker.finish(probabilities.len() as u64 * 512, &mut events);
        events
            .into_iter()
            .map(|e| match e {
                VadEvent::SpeechStart { sample } => (true, sample as f64 / 16000.0),
                VadEvent::SpeechEnd { sample } => (false, sample as f64 / 16000.0),
            })
            .collect()
    }

    #[test]
    fn speech_between_silences_gives_one_segment() {
        // 1 s silence (31 chunks), 1 s speech, 1 s silence.
        let mut p = vec![0.02; 31];
        p.extend(vec![0.95; 31]);
        p.extend(vec![0.02; 31]);
        let events = run(&p);
        assert_eq!(events.len(), 2, "{events:?}");
        assert!(
            events[0].0 && (events[0].1 - 0.962).abs() < 0.05,
            "{events:?}"
        );
        assert!(
            !events[1].0 && (events[1].1 - 1.984).abs() < 0.06,
            "{events:?}"
        );
    }

    #[test]
    fn short_blips_and_short_gaps() {
        // A 2-chunk blip (64 ms < 250 ms) is not speech.
        let mut p = vec![0.0; 10];
        p.extend([0.9, 0.9]);
        p.extend(vec![0.0; 20]);
        assert!(run(&p).is_empty());
        // A 2-chunk gap (64 ms < 100 ms min silence) does not split a segment.
        let mut p = vec![0.9; 20];
        p.extend([0.1, 0.1]);
        p.extend(vec![0.9; 20]);
        p.extend(vec![0.0; 20]);
        assert_eq!(run(&p).len(), 2);
        // Hysteresis: 0.4 (between 0.35 and 0.5) neither starts nor ends speech.
        let mut p = vec![0.9; 20];
        p.extend(vec![0.4; 20]);
        p.extend(vec![0.0; 20]);
        let events = run(&p);
        assert_eq!(events.len(), 2);
        assert!(events[1].1 > 40.0 * 512.0 / 16000.0 - 0.1);
    }

    #[test]
    fn speech_to_the_end_is_closed_by_finish() {
        let events = run(&[0.0, 0.0, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]);
        assert_eq!(events.len(), 2);
        assert_eq!(events[1], (false, 11.0 * 512.0 / 16000.0));
    }

    #[test]
    fn long_padding_never_overlaps_segments_or_passes_the_audio() {
        // 2 s of padding around speech bursts 0.5 s apart (the fuzzer's find).
        let options = VadOptions {
            speech_pad_ms: 2000,
            min_silence_ms: 100,
            ..VadOptions::default()
        };
        let mut tracker = VadTracker::new(&options, 16000, 512);
        let mut events = Vec::new();
        let burst = [[0.9f32; 16], [0.0; 16]].concat();
        let mut heard = 0;
        for (i, &p) in burst.iter().cycle().take(burst.len() * 4).enumerate() {
            heard = (i as u64 + 1) * 512;
            tracker.push(heard, p, &mut events);
            assert!(tracker.segments.iter().all(|s| s.end <= heard));
        }
        tracker.finish(heard, &mut events);
        assert_eq!(tracker.segments.len(), 4, "{:?}", tracker.segments);
        for pair in tracker.segments.windows(2) {
            assert!(pair[0].end <= pair[1].start, "{:?}", tracker.segments);
        }
    }

    #[test]
    fn options_are_checked() {
        assert!(VadOptions {
            threshold: 1.5,
            ..VadOptions::default()
        }
        .validate()
        .is_err());
        assert!(VadOptions {
            neg_threshold: Some(0.9),
            ..VadOptions::default()
        }
        .validate()
        .is_err());
        assert!(VadOptions::default().validate().is_ok());
    }
}
