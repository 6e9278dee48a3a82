//! What a run measured over all its streams, and how it is judged and written out (JSON and
//! the human-readable summary).

use std::collections::BTreeMap;
use std::time::Duration;

use super::ResultsMode;
use crate::hist::{self, Histogram};

/// What one run measured, over all its streams.
#[derive(Clone, Debug)]
pub struct StreamReport {
    pub url: String,
    pub model: String,
    pub streams: usize,
    pub ramp: Duration,
    pub measured: Duration,
    pub speed: f64,
    pub frame_ms: u32,
    pub results: ResultsMode,
    /// Chunk length in samples and sample rate, as the server announced them.
    pub chunk_samples: u64,
    pub sample_rate: u32,
    /// Streams that completed the WebSocket upgrade / got `started` / got a `summary`.
    pub connected: u64,
    pub started: u64,
    pub summaries: u64,
    /// `vad` results received in all and within the measured period (those are timed).
    pub chunks_total: u64,
    pub chunks_measured: u64,
    /// `speech_start` + `speech_end` messages.
    pub events: u64,
    /// `vad` results flagged `degraded` (computed by a fallback model).
    pub degraded: u64,
    /// Audio seconds sent, all streams together.
    pub audio_seconds: f64,
    /// Failures by kind (`connect`, `close 1008`, `seq gap`, `no summary`, ...).
    pub errors: BTreeMap<String, u64>,
    /// A few failures in full, for diagnosis.
    pub first_errors: Vec<String>,
    /// How the server closed the streams: close code (`"1000"`, ...) or `"none"`.
    pub closes: BTreeMap<String, u64>,
    /// Streams whose sender fell behind its real-time schedule by more than the threshold.
    pub late_streams: u64,
    pub late_threshold: Duration,
    /// The furthest any sender fell behind its schedule.
    pub max_send_lag: Duration,
    /// Chunk latency from the completing frame's actual send, µs (measured period only).
    pub latency_us: Histogram,
    /// Chunk latency from the completing frame's scheduled send, µs.
    pub latency_sched_us: Histogram,
}

impl StreamReport {
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Timed chunks per second of the measured period.
    pub fn chunks_per_sec(&self) -> f64 {
        self.chunks_measured as f64 / self.measured.as_secs_f64()
    }

    /// Chunks per second that N real-time streams should produce.
    pub fn expected_chunks_per_sec(&self) -> f64 {
        if self.chunk_samples == 0 {
            return 0.0;
        }
        self.streams as f64 * self.speed * self.sample_rate as f64 / self.chunk_samples as f64
    }

    /// Latency from the actual send at quantile `q`, ms; 0 without data.
    pub fn latency_ms(&self, q: f64) -> f64 {
        hist::ms(&self.latency_us, q)
    }

    /// Latency from the scheduled send at quantile `q`, ms.
    pub fn sched_latency_ms(&self, q: f64) -> f64 {
        hist::ms(&self.latency_sched_us, q)
    }

    pub fn max_ms(&self) -> f64 {
        self.latency_us.max() as f64 / 1000.0
    }

    pub fn mean_ms(&self) -> f64 {
        self.latency_us.mean() / 1000.0
    }

    /// Whether the run met a p99 target: timed chunks, p99 under it, no errors, nobody late.
    pub fn meets(&self, p99_target: Duration) -> bool {
        self.chunks_measured > 0
            && self.latency_ms(0.99) < p99_target.as_secs_f64() * 1000.0
            && self.error_count() == 0
            && self.late_streams == 0
    }

    /// The run as JSON: what `results.json` files hold of it and the summary prints.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "streams": self.streams,
            "ramp_s": self.ramp.as_secs_f64(),
            "measured_s": self.measured.as_secs_f64(),
            "connected": self.connected, "started": self.started, "summaries": self.summaries,
            "chunks_measured": self.chunks_measured, "chunks_total": self.chunks_total,
            "chunks_per_s": self.chunks_per_sec(), "expected_chunks_per_s": self.expected_chunks_per_sec(),
            "events": self.events, "degraded": self.degraded,
            "errors": self.errors, "first_errors": self.first_errors, "closes": self.closes,
            "late_streams": self.late_streams, "max_send_lag_ms": self.max_send_lag.as_secs_f64() * 1000.0,
            "latency_ms": {
                "p50": self.latency_ms(0.5), "p90": self.latency_ms(0.9), "p99": self.latency_ms(0.99),
                "p99.9": self.latency_ms(0.999), "max": self.max_ms(), "mean": self.mean_ms(),
            },
            "latency_from_schedule_ms": {
                "p50": self.sched_latency_ms(0.5), "p99": self.sched_latency_ms(0.99),
                "max": self.latency_sched_us.max() as f64 / 1000.0,
            },
        })
    }

    /// A human-readable summary, several lines (`templates/summary.txt.j2`).
    pub fn summary(&self) -> String {
        let extra = serde_json::json!({
            "kind": "streams", "url": self.url, "model": self.model,
            "results": self.results.as_str(), "frame_ms": self.frame_ms, "speed": self.speed,
            "audio_seconds": self.audio_seconds, "late_ms": self.late_threshold.as_millis() as u64,
        });
        crate::report::summary(&self.to_json(), extra)
    }
}
