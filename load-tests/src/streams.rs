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

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use clap::builder::TypedValueParser as _;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio_tungstenite::tungstenite::Message;

use crate::cli::{count, secs};
use crate::hist::{self, Histogram};
use crate::rest::{check_loopback, check_model_name};

/// Upper bounds that keep any run finite and modest.
pub const MAX_STREAMS: usize = 8192;
pub const MAX_DURATION: Duration = Duration::from_secs(3600);
/// Histograms are shared by this many streams each (one lock per result, rarely contended).
const SHARDS: usize = 32;

/// Which results a stream asks for (`results` in the start message).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ResultsMode {
    /// A `vad` message per chunk (timed) plus events.
    All,
    /// Speech events and the summary only: nothing per chunk to time.
    Events,
}

impl ResultsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ResultsMode::All => "all",
            ResultsMode::Events => "events",
        }
    }
}

impl std::str::FromStr for ResultsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(ResultsMode::All),
            "events" => Ok(ResultsMode::Events),
            other => Err(format!("results must be 'all' or 'events', not '{other}'")),
        }
    }
}

/// Mono PCM16 audio, kept twice in a row so that any window of up to its length is one
/// contiguous, zero-copy slice even where the loop wraps around.
#[derive(Clone, Debug, Default)]
pub struct Audio {
    pub sample_rate: u32,
    /// Samples in one pass of the file.
    pub samples: usize,
    doubled: Bytes,
}

impl Audio {
    /// Reads a mono 16-bit WAV at 16 or 8 kHz.
    pub fn load(path: &Path) -> anyhow::Result<Audio> {
        let mut reader = hound::WavReader::open(path)
            .with_context(|| format!("cannot read WAV file {}", path.display()))?;
        let spec = reader.spec();
        if spec.channels != 1
            || spec.bits_per_sample != 16
            || spec.sample_format != hound::SampleFormat::Int
        {
            bail!(
                "{}: need mono 16-bit PCM, got {} channel(s), {} bits {:?}",
                path.display(),
                spec.channels,
                spec.bits_per_sample,
                spec.sample_format
            );
        }
        if spec.sample_rate != 16000 && spec.sample_rate != 8000 {
            bail!(
                "{}: sample rate must be 16000 or 8000, got {}",
                path.display(),
                spec.sample_rate
            );
        }
        let samples = reader
            .samples::<i16>()
            .collect::<Result<Vec<i16>, _>>()
            .with_context(|| format!("cannot decode {}", path.display()))?;
        Audio::from_samples(&samples, spec.sample_rate)
    }

    pub fn from_samples(samples: &[i16], sample_rate: u32) -> anyhow::Result<Audio> {
        if samples.is_empty() {
            bail!("the audio has no samples");
        }
        let mut pcm = Vec::with_capacity(samples.len() * 4);
        for _ in 0..2 {
            for s in samples {
                pcm.extend_from_slice(&s.to_le_bytes());
            }
        }
        Ok(Audio {
            sample_rate,
            samples: samples.len(),
            doubled: pcm.into(),
        })
    }

    /// `n` samples (at most one pass) starting at sample `offset` of the loop, as PCM16 LE.
    pub fn frame(&self, offset: usize, n: usize) -> Bytes {
        let start = offset % self.samples;
        let n = n.min(self.samples);
        self.doubled.slice(start * 2..(start + n) * 2)
    }

    pub fn seconds(&self) -> f64 {
        self.samples as f64 / self.sample_rate as f64
    }
}

/// `tests/audio/two_phrases_16k.wav` of the checkout this crate was built from.
pub fn default_wav() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("tests")
        .join("audio")
        .join("two_phrases_16k.wav")
}

/// `loadgen streams`' options (the audio aside: `--wav` is read into `audio`).
#[derive(Clone, Debug, clap::Args)]
pub struct StreamOptions {
    /// Server base URL; loopback IP addresses only.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Model to stream to; it must declare a `stream` in the manifest (VAD or keyword).
    #[arg(long, default_value = "silero_vad")]
    pub model: String,
    /// Concurrent streams.
    #[arg(long, default_value_t = 100, value_parser = count(1, MAX_STREAMS))]
    pub streams: usize,
    /// Measured seconds (after the ramp).
    #[arg(long = "duration-secs", value_name = "DURATION_SECS", default_value = "10", value_parser = secs(1, 3600))]
    pub duration: Duration,
    /// Seconds over which the streams open, evenly spread; not measured.
    #[arg(long = "ramp-secs", value_name = "RAMP_SECS", default_value = "2", value_parser = secs(0, 600))]
    pub ramp: Duration,
    /// Audio seconds sent per wall-clock second (1.0 = real time).
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// Milliseconds of audio per binary frame.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub frame_ms: u32,
    /// `all`: a vad result per chunk (timed); `events`: speech events only (nothing to time).
    #[arg(long, default_value = "all")]
    pub results: ResultsMode,
    /// Keyword streams: leave out the model's gate (`"gate": false` in `start`), so that every
    /// stage runs on all the audio.
    #[arg(long)]
    pub no_gate: bool,
    #[arg(skip)]
    pub audio: Arc<Audio>,
    /// A sender further behind its real-time schedule than this makes its stream late.
    #[arg(long = "late-ms", value_name = "LATE_MS", default_value = "100",
          value_parser = clap::value_parser!(u64).range(1..=60000).map(Duration::from_millis))]
    pub late_threshold: Duration,
    /// After `end`, how long a stream waits for its summary and close.
    #[arg(skip = Duration::from_secs(15))]
    pub end_timeout: Duration,
    /// No progress lines on stderr.
    #[arg(long)]
    pub quiet: bool,
    /// Prefix of the progress lines.
    #[arg(skip = "streams".to_string())]
    pub label: String,
}

impl StreamOptions {
    /// The command line's defaults for a server at `url`, with the given audio, quiet.
    pub fn new(url: impl Into<String>, audio: Arc<Audio>) -> StreamOptions {
        StreamOptions {
            url: url.into(),
            audio,
            quiet: true,
            ..crate::cli::defaults()
        }
    }

    /// The stream endpoint (`ws://…/v1/streams/{model}`), after checking every bound and that
    /// the URL is loopback.
    pub fn endpoint(&self) -> anyhow::Result<String> {
        if self.streams == 0 || self.streams > MAX_STREAMS {
            bail!("streams must be 1..={MAX_STREAMS}, got {}", self.streams);
        }
        if self.duration.is_zero() || self.duration > MAX_DURATION {
            bail!(
                "duration must be more than 0 and at most {}s",
                MAX_DURATION.as_secs()
            );
        }
        if self.ramp > MAX_DURATION {
            bail!("ramp must be at most {}s", MAX_DURATION.as_secs());
        }
        if !(self.speed.is_finite() && (0.1..=100.0).contains(&self.speed)) {
            bail!("speed must be 0.1..=100, got {}", self.speed);
        }
        if self.frame_ms == 0 || self.frame_ms > 1000 {
            bail!("frame_ms must be 1..=1000, got {}", self.frame_ms);
        }
        if self.end_timeout.is_zero() || self.end_timeout > Duration::from_secs(600) {
            bail!("end timeout must be more than 0 and at most 600s");
        }
        check_model_name(&self.model)?;
        let base = check_loopback(&self.url)?;
        let url = base
            .join(&format!("v1/streams/{}", self.model))
            .with_context(|| format!("cannot build the stream URL from {base}"))?;
        Ok(url.as_str().replacen("http://", "ws://", 1))
    }

    fn frame_samples(&self) -> usize {
        (self.audio.sample_rate as usize * self.frame_ms as usize / 1000).max(1)
    }

    /// Wall-clock time between frames.
    fn frame_period(&self) -> Duration {
        Duration::from_secs_f64(self.frame_ms as f64 / 1000.0 / self.speed)
    }
}

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

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

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

async fn one_stream(
    i: usize,
    url: &str,
    options: &StreamOptions,
    shared: &Shared,
) -> StreamOutcome {
    let mut outcome = StreamOutcome::default();
    let send_end = shared.measure_end;
    let read_deadline = send_end + options.end_timeout;

    let connected = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async_with_config(url, None, true),
    )
    .await;
    let ws: Socket = match connected {
        Ok(Ok((ws, _))) => ws,
        Ok(Err(e)) => {
            outcome.error(shared, "connect", e.to_string());
            return outcome;
        }
        Err(_) => {
            outcome.error(shared, "connect", "no WebSocket upgrade within 10 s");
            return outcome;
        }
    };
    outcome.connected = true;
    shared.open.fetch_add(1, Ordering::Relaxed);
    stream_body(i, ws, options, shared, read_deadline, &mut outcome).await;
    shared.open.fetch_sub(1, Ordering::Relaxed);
    outcome
}

async fn stream_body(
    i: usize,
    mut ws: Socket,
    options: &StreamOptions,
    shared: &Shared,
    read_deadline: Instant,
    outcome: &mut StreamOutcome,
) {
    let mut start = serde_json::json!({
        "type": "start",
        "sample_rate": options.audio.sample_rate,
        "format": "pcm16",
        "results": options.results.as_str(),
    });
    if options.no_gate {
        start["gate"] = false.into();
    }
    if let Err(e) = ws.send(Message::text(start.to_string())).await {
        outcome.error(shared, "transport", format!("sending start: {e}"));
        return;
    }
    let started = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
    let chunk = match started {
        Ok(Some(Ok(Message::Text(text)))) => match serde_json::from_str::<ServerMessage>(&text) {
            Ok(m) if m.kind == "started" => {
                if m.sample_rate != Some(options.audio.sample_rate) {
                    outcome.error(shared, "start", format!("unexpected started: {text}"));
                    return;
                }
                m.chunk_samples.unwrap_or(0)
            }
            _ => {
                outcome.error(shared, "start", format!("expected started, got {text}"));
                return;
            }
        },
        Ok(Some(Ok(Message::Close(frame)))) => {
            outcome.close = Some(frame.as_ref().map_or(1005, |f| u16::from(f.code)));
            outcome.error(shared, "start", format!("closed before started: {frame:?}"));
            return;
        }
        Ok(other) => {
            outcome.error(shared, "start", format!("expected started, got {other:?}"));
            return;
        }
        Err(_) => {
            outcome.error(shared, "start", "no started message within 10 s");
            return;
        }
    };
    if chunk == 0 {
        outcome.error(shared, "start", "started without chunk_samples");
        return;
    }
    outcome.started = true;
    outcome.chunk_samples = chunk;

    // Stagger where in the file each stream starts, so that speech comes at different times.
    let offset = (i * 48_017) % options.audio.samples;
    let times: ChunkTimes = Arc::new(Mutex::new(VecDeque::new()));
    let (mut sink, mut stream) = ws.split();
    let writer = {
        let times = times.clone();
        async move {
            send_audio(
                &mut sink,
                options,
                offset,
                chunk,
                shared.measure_end,
                read_deadline,
                &times,
                &shared.max_lag_us,
            )
            .await
        }
    };
    let reader = read_results(
        &mut stream,
        options,
        chunk,
        shared,
        read_deadline,
        &times,
        outcome,
    );
    let ((sent, max_lag, write_error), ()) = tokio::join!(writer, reader);
    outcome.samples_sent = sent;
    outcome.max_lag = max_lag;
    if let Some(e) = write_error {
        // Sending fails when the server closed first; the close code already says why, so
        // only count it when the stream otherwise looked fine.
        if outcome.errors.is_empty() {
            outcome.error(shared, "transport", e);
        }
    }
    let expected_chunks = sent.div_ceil(chunk) - outcome.first_scored.unwrap_or(0);
    // A gated keyword stream has no score for the steps its gate skipped (none at all while
    // it hears no speech).
    let gated = outcome.keyword_stream && !options.no_gate;
    let missing = outcome.chunks_total > expected_chunks
        || (!gated && outcome.chunks_total != expected_chunks);
    if outcome.summary {
        if options.results == ResultsMode::All && missing {
            outcome.error(
                shared,
                "missing results",
                format!(
                    "{} results for {expected_chunks} chunks sent (after the first scored)",
                    outcome.chunks_total
                ),
            );
        }
    } else if outcome.errors.is_empty() {
        outcome.error(shared, "no summary", format!("close {:?}", outcome.close));
    }
}

/// Sends audio frames on the real-time schedule until `send_end`, then `end`. Returns the
/// samples sent, the furthest it fell behind schedule, and a send error if one ended it.
#[allow(clippy::too_many_arguments)]
async fn send_audio<S>(
    sink: &mut S,
    options: &StreamOptions,
    offset: usize,
    chunk: u64,
    send_end: Instant,
    hard_deadline: Instant,
    times: &ChunkTimes,
    max_lag_us: &AtomicU64,
) -> (u64, Duration, Option<String>)
where
    S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    let frame_samples = options.frame_samples();
    let period = options.frame_period();
    let first = Instant::now();
    let mut sent: u64 = 0;
    let mut max_lag = Duration::ZERO;
    let mut frame: u64 = 0;
    loop {
        let scheduled = first + period.mul_f64(frame as f64);
        if scheduled >= send_end {
            break;
        }
        tokio::time::sleep_until(scheduled.into()).await;
        let now = Instant::now();
        let lag = now.saturating_duration_since(scheduled);
        if lag > max_lag {
            max_lag = lag;
            max_lag_us.fetch_max(hist::micros(lag), Ordering::Relaxed);
        }
        let after = sent + frame_samples as u64;
        {
            let mut times = times.lock().expect("no panics while holding it");
            for k in sent / chunk..after / chunk {
                times.push_back((k, now, scheduled));
            }
        }
        let data = options.audio.frame(
            offset + sent as usize % options.audio.samples,
            frame_samples,
        );
        match tokio::time::timeout_at(hard_deadline.into(), sink.send(Message::binary(data))).await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return (sent, max_lag, Some(format!("sending audio: {e}"))),
            Err(_) => {
                return (
                    sent,
                    max_lag,
                    Some("sending audio blocked until the deadline".into()),
                )
            }
        }
        sent = after;
        frame += 1;
    }
    let now = Instant::now();
    if !sent.is_multiple_of(chunk) {
        // `end` completes the last, partial chunk (the server pads it with silence).
        times
            .lock()
            .expect("no panics while holding it")
            .push_back((sent / chunk, now, now));
    }
    let end = Message::text(r#"{"type":"end"}"#);
    match tokio::time::timeout_at(hard_deadline.into(), sink.send(end)).await {
        Ok(Ok(())) => (sent, max_lag, None),
        Ok(Err(e)) => (sent, max_lag, Some(format!("sending end: {e}"))),
        Err(_) => (
            sent,
            max_lag,
            Some("sending end blocked until the deadline".into()),
        ),
    }
}

/// Reads every server message until the close, checking and timing them.
async fn read_results<S>(
    stream: &mut S,
    options: &StreamOptions,
    chunk: u64,
    shared: &Shared,
    deadline: Instant,
    times: &ChunkTimes,
    outcome: &mut StreamOutcome,
) where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let rate = options.audio.sample_rate as f64;
    let target_us = hist::micros(options.late_threshold);
    let mut next_seq: u64 = 0;
    let mut vad_index: u64 = 0;
    loop {
        let next = match tokio::time::timeout_at(deadline.into(), stream.next()).await {
            Err(_) => {
                outcome.error(shared, "timeout", "no close within the end timeout");
                return;
            }
            Ok(next) => next,
        };
        let text = match next {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => {
                let code = frame.as_ref().map_or(1005, |f| u16::from(f.code));
                outcome.close = Some(code);
                if code != 1000 {
                    let reason = frame.map(|f| f.reason.to_string()).unwrap_or_default();
                    outcome.error(shared, format!("close {code}"), reason);
                } else if !outcome.summary {
                    outcome.error(shared, "no summary", "closed 1000 without a summary");
                }
                return;
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                outcome.error(shared, "transport", e.to_string());
                return;
            }
            None => {
                outcome.error(
                    shared,
                    "transport",
                    "connection ended without a close frame",
                );
                return;
            }
        };
        let received = Instant::now();
        let message: ServerMessage = match serde_json::from_str(&text) {
            Ok(m) => m,
            Err(e) => {
                outcome.error(shared, "invalid message", format!("{e}: {text}"));
                continue;
            }
        };
        if message.kind == "error" {
            outcome.error(
                shared,
                format!("error {}", message.code.as_deref().unwrap_or("?")),
                message.message.unwrap_or_default(),
            );
            continue;
        }
        match message.seq {
            Some(seq) if seq == next_seq => next_seq += 1,
            Some(seq) => {
                outcome.error(
                    shared,
                    "seq gap",
                    format!("expected seq {next_seq}, got {seq}: {text}"),
                );
                next_seq = seq + 1;
            }
            None => {
                outcome.error(shared, "invalid message", format!("no seq: {text}"));
                continue;
            }
        }
        match message.kind.as_str() {
            kind @ ("vad" | "score") => {
                // A `vad` result is for the next chunk (`t` its start); a keyword stream's
                // `score` for the chunk its `t` ends (none come for the first chunks, while the
                // spotter fills its window).
                let k = if kind == "vad" {
                    let k = vad_index;
                    vad_index += 1;
                    let t_expected = (k * chunk) as f64 / rate;
                    if message.t.is_none_or(|t| (t - t_expected).abs() > 1e-6) {
                        outcome.error(
                            shared,
                            "vad t mismatch",
                            format!("vad #{k} should have t = {t_expected}: {text}"),
                        );
                    }
                    k
                } else {
                    let end = (message.t.unwrap_or(0.0) * rate / chunk as f64).round() as u64;
                    let k = end.saturating_sub(1);
                    outcome.first_scored.get_or_insert(k);
                    k
                };
                outcome.chunks_total += 1;
                shared.chunks.fetch_add(1, Ordering::Relaxed);
                if message.degraded == Some(true) {
                    outcome.degraded += 1;
                }
                let found = {
                    let mut times = times.lock().expect("no panics while holding it");
                    while times.front().is_some_and(|&(c, _, _)| c < k) {
                        times.pop_front();
                    }
                    match times.front() {
                        Some(&(c, sent, scheduled)) if c == k => {
                            times.pop_front();
                            Some((sent, scheduled))
                        }
                        _ => None,
                    }
                };
                let Some((sent, scheduled)) = found else {
                    outcome.error(
                        shared,
                        "unmatched vad",
                        format!("a result for chunk {k}, whose audio was not sent yet"),
                    );
                    continue;
                };
                if sent >= shared.measure_start && sent < shared.measure_end {
                    let us = hist::micros(received.saturating_duration_since(sent));
                    let sched_us = hist::micros(received.saturating_duration_since(scheduled));
                    {
                        let mut shard = shared.shards[k as usize % SHARDS]
                            .lock()
                            .expect("no panics while holding a shard");
                        shard.latency_us.saturating_record(us);
                        shard.latency_sched_us.saturating_record(sched_us);
                    }
                    outcome.chunks_measured += 1;
                    shared.max_latency_us.fetch_max(us, Ordering::Relaxed);
                    if us > target_us {
                        shared.over_target.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            "speech_start" | "speech_end" | "keyword" => outcome.events += 1,
            "summary" => {
                outcome.summary = true;
                let vad_stream = message.keywords.is_none();
                outcome.keyword_stream = !vad_stream;
                if vad_stream
                    && options.results == ResultsMode::All
                    && message.chunks != Some(vad_index)
                {
                    outcome.error(
                        shared,
                        "summary chunks",
                        format!(
                            "summary says {:?} chunks, {vad_index} vad results came",
                            message.chunks
                        ),
                    );
                }
            }
            other => {
                outcome.error(
                    shared,
                    "invalid message",
                    format!("unexpected type {other}: {text}"),
                );
            }
        }
    }
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

/// The audio file, loaded once per path.
pub fn load_audio(path: Option<&Path>) -> anyhow::Result<Arc<Audio>> {
    let path = path.map_or_else(default_wav, Path::to_path_buf);
    Ok(Arc::new(Audio::load(&path)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn audio() -> Arc<Audio> {
        let samples: Vec<i16> = (0..1000).map(|i| i as i16).collect();
        Arc::new(Audio::from_samples(&samples, 16000).unwrap())
    }

    #[test]
    fn frames_wrap_around_the_loop() {
        let a = audio();
        let f = a.frame(990, 20);
        let values: Vec<i16> = f
            .chunks(2)
            .map(|b| i16::from_le_bytes([b[0], b[1]]))
            .collect();
        assert_eq!(values.len(), 20);
        assert_eq!(values[0], 990);
        assert_eq!(values[9], 999);
        assert_eq!(values[10], 0);
        assert_eq!(a.frame(1000, 1), a.frame(0, 1));
    }

    #[test]
    fn the_fixture_loads() {
        let a = Audio::load(&default_wav()).unwrap();
        assert_eq!(a.sample_rate, 16000);
        assert!(a.seconds() > 9.0 && a.seconds() < 10.0, "{}", a.seconds());
    }

    #[test]
    fn bounds_and_loopback() {
        let base = StreamOptions::new("http://127.0.0.1:9", audio());
        assert_eq!(
            base.endpoint().unwrap(),
            "ws://127.0.0.1:9/v1/streams/silero_vad"
        );
        assert_eq!(base.frame_samples(), 320);
        let bad: [fn(&mut StreamOptions); 8] = [
            |o| o.streams = 0,
            |o| o.streams = MAX_STREAMS + 1,
            |o| o.duration = Duration::ZERO,
            |o| o.speed = 0.0,
            |o| o.frame_ms = 0,
            |o| o.url = "http://localhost:9".into(),
            |o| o.url = "http://192.0.2.1:9".into(),
            |o| o.model = "../x".into(),
        ];
        for change in bad {
            let mut o = base.clone();
            change(&mut o);
            assert!(o.endpoint().is_err(), "{o:?} was accepted");
        }
        assert_eq!("events".parse(), Ok(ResultsMode::Events));
        assert!("some".parse::<ResultsMode>().is_err());
    }
}
