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

    /// Feeds the probability of the chunk that ends at sample `chunk_end`, all of it audio
    /// received.
    pub fn push(&mut self, chunk_end: u64, probability: f32, events: &mut Vec<VadEvent>) {
        self.push_heard(chunk_end, chunk_end, probability, events);
    }

    /// Feeds the probability of the chunk that ends at sample `chunk_end`, of which the audio
    /// received reaches `heard`: `chunk_end` itself, but for the stream's last chunk, which
    /// the stream completed with silence. Padding is not audio: a segment never ends after
    /// `heard`, and speech is confirmed (its start sent) only once the audio received holds
    /// `min_speech_ms` of it.
    pub fn push_heard(
        &mut self,
        chunk_end: u64,
        heard: u64,
        probability: f32,
        events: &mut Vec<VadEvent>,
    ) {
        let heard = heard.min(chunk_end);
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
            && heard.saturating_sub(self.start) >= self.min_speech
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
                    .min(heard)
                    .max(self.start);
                self.close(end, events);
            }
        }
    }

    /// The stream ended at `total` samples: close an open segment there or, when its silence
    /// had begun (shorter than `min_silence_ms`), where the mid-stream rule would have ended
    /// it: the silent chunk's start plus the pad, within the audio.
    pub fn finish(&mut self, total: u64, events: &mut Vec<VadEvent>) {
        if self.triggered {
            let end = self
                .temp_end
                .map_or(total, |t| {
                    (t + self.pad).saturating_sub(self.window).min(total)
                })
                .max(self.start);
            self.close(end, events);
        }
    }

    /// Ends the open segment at `end`. One whose start was sent always gets its end (and its
    /// place in the summary), even when the padding rule makes it end under `min_speech_ms`
    /// (a pad shorter than a chunk ends it before the chunk that confirmed it): a client
    /// told that speech started must be told that it ended.
    fn close(&mut self, end: u64, events: &mut Vec<VadEvent>) {
        if self.confirmed || end - self.start >= self.min_speech {
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
    fn a_silence_cut_short_by_the_end_ends_where_a_longer_one_would() {
        // Speech, then silence: once long enough (min_silence_ms), and once cut short by the
        // stream's end. Both segments end at the first silent chunk's start plus the pad.
        let options = VadOptions::default();
        let pad = 480; // 30 ms at 16 kHz
        let mut p = vec![0.0f32; 2];
        p.extend([0.9; 10]);
        let speech_end = p.len() as u64 * 512;
        let mut long = VadTracker::new(&options, 16000, 512);
        let mut cut = VadTracker::new(&options, 16000, 512);
        let mut events = Vec::new();
        for (i, &p) in p.iter().chain(&[0.0; 2]).enumerate() {
            cut.push((i as u64 + 1) * 512, p, &mut events);
        }
        cut.finish((p.len() as u64 + 2) * 512, &mut events);
        for (i, &p) in p.iter().chain(&[0.0; 12]).enumerate() {
            long.push((i as u64 + 1) * 512, p, &mut events);
        }
        assert_eq!(long.segments.len(), 1);
        assert_eq!(cut.segments, long.segments);
        assert_eq!(cut.segments[0].end, speech_end + pad);
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
    fn the_last_chunks_padding_is_not_audio() {
        // Speech, then silence that closes the segment in the stream's last chunk, of which
        // the client sent only 100 samples: with a long pad the end stops at the audio.
        let options = VadOptions {
            speech_pad_ms: 2000,
            ..VadOptions::default()
        };
        let mut tracker = VadTracker::new(&options, 16000, 512);
        let mut events = Vec::new();
        let mut p = vec![0.9f32; 20];
        p.extend([0.0; 4]);
        for (i, &p) in p.iter().enumerate() {
            tracker.push((i as u64 + 1) * 512, p, &mut events);
        }
        let heard = 24 * 512 + 100;
        tracker.push_heard(25 * 512, heard, 0.0, &mut events);
        tracker.finish(heard, &mut events);
        assert_eq!(tracker.segments.len(), 1, "{events:?}");
        assert_eq!(tracker.segments[0].end, heard, "{events:?}");
        assert!(matches!(events.last(), Some(VadEvent::SpeechEnd { sample }) if *sample == heard));

        // Speech that began 3,950 samples before the audio ended: the padded last chunk
        // reaches past min_speech_ms (4,000 samples), the audio does not. It is not speech:
        // no start is sent (one was, with no end and no segment in the summary).
        let mut tracker = VadTracker::new(&VadOptions::default(), 16000, 512);
        let mut events = Vec::new();
        for i in 0..10u64 {
            tracker.push((i + 1) * 512, 0.0, &mut events);
        }
        let start = 10 * 512 - 480; // the first speech chunk's start, less the 30 ms pad
        let heard = start + 3950;
        let mut chunk_end = 11 * 512;
        while chunk_end < heard {
            tracker.push(chunk_end, 0.9, &mut events);
            chunk_end += 512;
        }
        tracker.push_heard(chunk_end, heard, 0.9, &mut events);
        tracker.finish(heard, &mut events);
        assert!(events.is_empty(), "{events:?}");
        assert!(tracker.segments.is_empty());
    }

    #[test]
    fn a_start_sent_always_gets_its_end() {
        // min_speech_ms 254 (4,064 samples) is reached by the chunk that confirms the speech,
        // whose own probability is already silence; the 30 ms pad ends the segment 32
        // samples before that chunk's end, under min_speech_ms. The start was sent: so is
        // the end, and the segment is in the summary.
        let options = VadOptions {
            min_speech_ms: 254,
            ..VadOptions::default()
        };
        let mut tracker = VadTracker::new(&options, 16000, 512);
        let mut events = Vec::new();
        let mut p = vec![0.0f32; 4];
        p.extend([0.9; 6]);
        p.extend([0.0; 10]);
        for (i, &p) in p.iter().enumerate() {
            tracker.push((i as u64 + 1) * 512, p, &mut events);
        }
        tracker.finish(p.len() as u64 * 512, &mut events);
        let starts = events
            .iter()
            .filter(|e| matches!(e, VadEvent::SpeechStart { .. }))
            .count();
        let ends = events
            .iter()
            .filter(|e| matches!(e, VadEvent::SpeechEnd { .. }))
            .count();
        assert_eq!((starts, ends), (1, 1), "{events:?}");
        assert_eq!(tracker.segments.len(), 1);
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
