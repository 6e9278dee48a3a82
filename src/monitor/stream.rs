//! What a VAD stream model's answers add up to, per version: audio seen, speech found, and
//! the lengths of the speech segments (on fixed buckets, the same for every version, since a
//! segment's length is in seconds whatever the model). The share of speech moving, or
//! segments getting shorter or longer, is how a VAD drifts where its per-chunk outputs look
//! alike. Lock-free: stream sessions record from their own threads.

use std::sync::atomic::{AtomicU64, Ordering};

/// Upper edges of the segment-length buckets, in seconds.
pub const SEGMENT_BUCKETS: [f64; 9] = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

/// Totals kept in microseconds, so that atomics can add them.
#[derive(Debug, Default)]
pub struct StreamStats {
    audio_us: AtomicU64,
    speech_us: AtomicU64,
    /// Per bucket, `+Inf` last; not cumulative.
    segments: [AtomicU64; SEGMENT_BUCKETS.len() + 1],
}

impl StreamStats {
    /// `seconds` more audio went through the model.
    pub fn add_audio(&self, seconds: f64) {
        self.audio_us
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    /// A speech segment of `seconds` ended.
    pub fn add_segment(&self, seconds: f64) {
        self.speech_us
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        let bucket = SEGMENT_BUCKETS.partition_point(|&edge| edge < seconds);
        self.segments[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// Seconds of audio and of speech so far.
    pub fn seconds(&self) -> (f64, f64) {
        let s = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64 / 1e6;
        (s(&self.audio_us), s(&self.speech_us))
    }

    /// Segments per bucket (not cumulative), `+Inf` last.
    pub fn segment_counts(&self) -> Vec<u64> {
        self.segments
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_fall_in_le_buckets_and_add_up_to_speech() {
        let stats = StreamStats::default();
        stats.add_audio(10.0);
        stats.add_segment(0.5);
        stats.add_segment(3.0);
        stats.add_segment(100.0);
        assert_eq!(stats.seconds(), (10.0, 103.5));
        let counts = stats.segment_counts();
        assert_eq!((counts[1], counts[4], counts[9]), (1, 1, 1));
    }
}
