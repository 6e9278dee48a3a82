//! WebSocket speech-stream load (`docs/streaming.md`): N concurrent streams, each sending a
//! WAV file (looped) as PCM16 at real-time pace, reading every result, and timing each chunk.
//!
//! Per-chunk latency is the time from sending the audio frame that completed a chunk (the
//! model's window: 512 samples at 16 kHz) to receiving that chunk's `vad` message. The k-th
//! `vad` message of a stream belongs to samples `[512k, 512k + 512)`, which its `t` must say.
//! Every stream also checks its `seq` numbers (consecutive from 0), ends with `end`, and must
//! receive a `summary` whose chunk count matches the audio it sent, then a close with 1000.
//!
//! The latency is measured from the frame's actual send and, separately, from the time the
//! frame was scheduled to be sent: when the sender falls behind its real-time schedule (the
//! server pushing back, or the load generator short of CPU), only the second shows it. A
//! stream whose sender ever fell more than `late_threshold` behind counts as *late*.

mod audio;
mod client;
mod options;
mod report;
mod results;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

pub use audio::{default_wav, load_audio, Audio};
pub use options::{ResultsMode, StreamOptions};
pub use report::StreamReport;

use crate::hist::{self, Histogram};
use client::one_stream;

/// The code of a server's close frame: 1005 (no status received, RFC 6455) when it has none.
pub fn close_code(frame: Option<&CloseFrame>) -> u16 {
    frame.map_or(1005, |f| u16::from(f.code))
}

/// Upper bounds that keep any run finite and modest.
pub const MAX_STREAMS: usize = 8192;
pub const MAX_DURATION: Duration = Duration::from_secs(3600);
/// Histograms are shared by this many streams each (one lock per result, rarely contended).
const SHARDS: usize = 32;

struct Shard {
    latency_us: Histogram,
    latency_sched_us: Histogram,
}

/// State shared by every stream of a run.
struct Shared {
    shards: Vec<Mutex<Shard>>,
    measure_start: Instant,
    measure_end: Instant,
    // Live counters for the progress line.
    open: AtomicU64,
    chunks: AtomicU64,
    errors: AtomicU64,
    over_target: AtomicU64,
    max_latency_us: AtomicU64,
    max_lag_us: AtomicU64,
}

/// One stream's tallies, merged at the end.
#[derive(Default)]
struct StreamOutcome {
    connected: bool,
    started: bool,
    summary: bool,
    close: Option<u16>,
    chunks_total: u64,
    chunks_measured: u64,
    events: u64,
    degraded: u64,
    samples_sent: u64,
    max_lag: Duration,
    errors: Vec<(String, String)>,
    chunk_samples: u64,
    /// A keyword stream's first scored chunk: the chunks before it fill the spotter's window.
    first_scored: Option<u64>,
    /// The summary said it is a keyword stream (it counts `keywords`).
    keyword_stream: bool,
}

impl StreamOutcome {
    fn error(&mut self, shared: &Shared, kind: impl Into<String>, detail: impl Into<String>) {
        shared.errors.fetch_add(1, Ordering::Relaxed);
        self.errors.push((kind.into(), detail.into()));
    }
}

/// A server message; unknown fields are ignored.
#[derive(Deserialize)]
struct ServerMessage {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    t: Option<f64>,
    #[serde(default)]
    degraded: Option<bool>,
    #[serde(default)]
    chunks: Option<u64>,
    /// A keyword stream's summary: its keyword events.
    #[serde(default)]
    keywords: Option<u64>,
    #[serde(default)]
    chunk_samples: Option<u64>,
    #[serde(default)]
    sample_rate: Option<u32>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// When each chunk's audio was complete on the client side: (chunk index, sent, scheduled).
type ChunkTimes = Arc<Mutex<VecDeque<(u64, Instant, Instant)>>>;

/// Runs the streams as `options` say and returns what they measured. Must run inside a
/// multi-threaded tokio runtime. Ends within ramp + duration + end timeout + 10 s.
pub async fn run(options: &StreamOptions) -> anyhow::Result<StreamReport> {
    let url = options.endpoint()?;
    let start = Instant::now();
    let measure_start = start + options.ramp;
    let measure_end = measure_start + options.duration;
    let shared = Arc::new(Shared {
        shards: (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    latency_us: hist::new(3),
                    latency_sched_us: hist::new(3),
                })
            })
            .collect(),
        measure_start,
        measure_end,
        open: AtomicU64::new(0),
        chunks: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        over_target: AtomicU64::new(0),
        max_latency_us: AtomicU64::new(0),
        max_lag_us: AtomicU64::new(0),
    });
    let options = Arc::new(options.clone());
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..options.streams {
        let at = start + options.ramp.mul_f64(i as f64 / options.streams as f64);
        let (options, shared, url) = (options.clone(), shared.clone(), url.clone());
        tasks.spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            one_stream(i, &url, &options, &shared).await
        });
    }
    let progress = (!options.quiet).then(|| {
        tokio::spawn(progress_lines(
            options.label.clone(),
            shared.clone(),
            start,
            options.streams,
        ))
    });

    let mut outcomes = Vec::with_capacity(options.streams);
    let deadline = measure_end + options.end_timeout + Duration::from_secs(10);
    let all_done = tokio::time::timeout_at(deadline.into(), async {
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(outcome) => outcomes.push(outcome),
                Err(e) => {
                    let mut outcome = StreamOutcome::default();
                    outcome.error(&shared, "task panicked", e.to_string());
                    outcomes.push(outcome);
                }
            }
        }
    })
    .await;
    let unfinished = if all_done.is_err() {
        let n = tasks.len() as u64;
        tasks.abort_all();
        n
    } else {
        0
    };
    if let Some(p) = progress {
        p.abort();
    }

    let mut report = StreamReport {
        url: options.url.clone(),
        model: options.model.clone(),
        streams: options.streams,
        ramp: options.ramp,
        measured: options.duration,
        speed: options.speed,
        frame_ms: options.frame_ms,
        results: options.results,
        chunk_samples: 0,
        sample_rate: options.audio.sample_rate,
        connected: 0,
        started: 0,
        summaries: 0,
        chunks_total: 0,
        chunks_measured: 0,
        events: 0,
        degraded: 0,
        audio_seconds: 0.0,
        errors: BTreeMap::new(),
        first_errors: Vec::new(),
        closes: BTreeMap::new(),
        late_streams: 0,
        late_threshold: options.late_threshold,
        max_send_lag: Duration::ZERO,
        latency_us: hist::new(3),
        latency_sched_us: hist::new(3),
    };
    if unfinished > 0 {
        report
            .errors
            .insert("unfinished at the deadline".into(), unfinished);
    }
    for o in outcomes {
        report.connected += u64::from(o.connected);
        report.started += u64::from(o.started);
        report.summaries += u64::from(o.summary);
        report.chunks_total += o.chunks_total;
        report.chunks_measured += o.chunks_measured;
        report.events += o.events;
        report.degraded += o.degraded;
        report.audio_seconds += o.samples_sent as f64 / options.audio.sample_rate as f64;
        if o.chunk_samples > 0 {
            report.chunk_samples = o.chunk_samples;
        }
        if o.connected {
            let code = o.close.map_or("none".to_string(), |c| c.to_string());
            *report.closes.entry(code).or_default() += 1;
        }
        if o.max_lag > options.late_threshold {
            report.late_streams += 1;
        }
        report.max_send_lag = report.max_send_lag.max(o.max_lag);
        for (kind, detail) in o.errors {
            *report.errors.entry(kind.clone()).or_default() += 1;
            if report.first_errors.len() < 5 {
                report.first_errors.push(format!("{kind}: {detail}"));
            }
        }
    }
    for shard in &shared.shards {
        let shard = shard.lock().expect("no panics while holding a shard");
        report
            .latency_us
            .add(&shard.latency_us)
            .expect("same histogram bounds");
        report
            .latency_sched_us
            .add(&shard.latency_sched_us)
            .expect("same histogram bounds");
    }
    Ok(report)
}

async fn progress_lines(label: String, shared: Arc<Shared>, start: Instant, streams: usize) {
    let mut tick = tokio::time::interval_at(
        (start + Duration::from_secs(1)).into(),
        Duration::from_secs(1),
    );
    let mut last_chunks = 0u64;
    loop {
        let now: Instant = tick.tick().await.into();
        let middle = now - Duration::from_millis(500);
        let phase = if middle < shared.measure_start {
            "ramp"
        } else if middle <= shared.measure_end {
            "measure"
        } else {
            "ending"
        };
        let chunks = shared.chunks.load(Ordering::Relaxed);
        eprintln!(
            "[{label}] {:>4.0}s {phase:<7} open {}/{streams}  {:>7.0} chunks/s  max {:>7.1} ms  >target {}  max lag {:.1} ms  errors {}",
            now.duration_since(start).as_secs_f64(),
            shared.open.load(Ordering::Relaxed),
            chunks - last_chunks,
            shared.max_latency_us.swap(0, Ordering::Relaxed) as f64 / 1000.0,
            shared.over_target.load(Ordering::Relaxed),
            shared.max_lag_us.swap(0, Ordering::Relaxed) as f64 / 1000.0,
            shared.errors.load(Ordering::Relaxed),
        );
        last_chunks = chunks;
    }
}
