//! The WebSocket stream capacity benchmark for `silero_vad`, in one run:
//!
//! 1. the compute ceiling: Silero VAD steps/s in-process (`ModelSession`, no server), at
//!    batch 1 and batch 256, two threads each owning a session like the two replicas;
//! 2. streamserve started in-process twice on a model directory holding only `silero_vad`
//!    (the bundled manifest entry, 2 replicas): cross-stream batching on
//!    (`max_batch_size = 256`, `max_queue_delay_ms = 0`) and off (`max_batch_size = 1`);
//! 3. against each, steps of N concurrent real-time streams ([`crate::streams`]) until a step
//!    misses the target (p99 chunk latency, errors, or late senders);
//! 4. `report.md` and `results.json`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use streamserve::runtime::ModelSession;
use streamserve::tensor::TensorData;

use crate::bench::{cpu_since, start_server_for, stop_server, TempModelDir};
use crate::cli::{secs, BenchCommon};
use crate::manifest::{self, EntryChange};
use crate::prometheus;
use crate::stream_steps::{
    self, counter_delta, ratio, Attempt, StepOptions, Stepping, CONTENDED_CORES, QUIET_CORES,
};
use crate::streams::{self, Audio};
use crate::sysinfo::{raise_nofile_limit, wait_for_quiet, CpuShare, CpuSnapshot};
use crate::SplitMix64;

pub const MODEL: &str = "silero_vad";
/// Silero VAD at 16 kHz: 512 new samples + 64 of context per step, state [2, B, 128].
pub const WINDOW: usize = 576;
pub const STATE: usize = 128;
/// Batch sizes of the in-process ceiling measurement.
pub const CEILING_BATCHES: [usize; 5] = [1, 16, 64, 128, 256];
/// Steps per second that one real-time 16 kHz stream needs (16000 / 512).
pub const STEPS_PER_STREAM_SEC: f64 = 31.25;

/// `loadgen streams-bench`'s options.
#[derive(Clone, Debug, clap::Args)]
pub struct StreamsBenchOptions {
    #[command(flatten)]
    pub stepping: StepOptions,
    /// Measured seconds of each in-process ceiling measurement.
    #[arg(long = "ceiling-secs", value_name = "CEILING_SECS", default_value = "3", value_parser = secs(1, 60))]
    pub ceiling_duration: Duration,
    #[command(flatten)]
    pub common: BenchCommon,
    /// The bundled manifest, whose `silero_vad` entry is copied.
    #[arg(skip = manifest::bundled())]
    pub manifest: PathBuf,
    #[arg(skip = streams::default_wav())]
    pub wav: PathBuf,
}

/// One server configuration.
#[derive(Clone, Debug, serde::Serialize)]
pub struct VadSetup {
    pub label: String,
    pub max_batch_size: usize,
    pub max_queue_delay_ms: f64,
}

impl VadSetup {
    pub fn batching_on() -> VadSetup {
        VadSetup {
            label: "batching on".into(),
            max_batch_size: 256,
            max_queue_delay_ms: 0.0,
        }
    }

    pub fn batching_off() -> VadSetup {
        VadSetup {
            label: "batching off".into(),
            max_batch_size: 1,
            max_queue_delay_ms: 0.0,
        }
    }
}

/// The bundled manifest's `silero_vad` entry (and its `[defaults]`), with `file` made absolute,
/// the batching settings of `setup`, and without its `fallback` and `slo_ms`: the
/// `models.toml` of a directory serving only it.
/// Returns the manifest text and the model file.
pub fn vad_manifest(bundled: &Path, setup: &VadSetup) -> anyhow::Result<(String, PathBuf)> {
    let change = EntryChange {
        set: vec![
            (
                "max_batch_size",
                toml::Value::Integer(setup.max_batch_size as i64),
            ),
            (
                "max_queue_delay_ms",
                toml::Value::Float(setup.max_queue_delay_ms),
            ),
        ],
        // Only this model is served: no fallback (and no SLO that would hand chunks to one),
        // so that overload shows as latency, not as chunks quietly served by a cheaper model.
        // Past about 100 ms behind, new streams are refused (1013): the step fails as it would
        // on its latency.
        remove: vec!["fallback", "slo_ms"],
    };
    let (text, mut files) = manifest::from_bundled(
        bundled,
        &format!("{MODEL}, {}", setup.label),
        &[(MODEL, change)],
    )?;
    Ok((text, files.remove(0)))
}

/// In-process Silero VAD throughput: `threads` threads, each owning a session
/// (`intra_threads = 1`), running batches of `batch` steps back to back.
#[derive(Clone, Debug, serde::Serialize)]
pub struct VadCeiling {
    pub threads: usize,
    pub batch: usize,
    pub calls: u64,
    pub seconds: f64,
    pub steps_per_sec: f64,
    pub mean_call_ms: f64,
    pub cpu_cores: Option<CpuShare>,
}

impl VadCeiling {
    /// Real-time 16 kHz streams this many steps per second could carry.
    pub fn streams(&self) -> f64 {
        self.steps_per_sec / STEPS_PER_STREAM_SEC
    }
}

/// Measures [`VadCeiling`]: [`crate::bench::in_process`] on Silero VAD inputs.
pub fn measure_vad(
    model: &Path,
    threads: usize,
    batch: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<VadCeiling> {
    let inputs = |session: &ModelSession, t: usize| {
        let audio: Vec<f32> = SplitMix64::new(0xA0D1 + t as u64)
            .f32_vec(batch * WINDOW)
            .into_iter()
            .map(|v| v * 0.3)
            .collect();
        session
            .inputs
            .iter()
            .map(|spec| match spec.name.as_str() {
                "input" => Ok((
                    vec![batch as i64, WINDOW as i64],
                    TensorData::Fp32(audio.clone()),
                )),
                "state" => Ok((
                    vec![2, batch as i64, STATE as i64],
                    TensorData::Fp32(vec![0.0; 2 * batch * STATE]),
                )),
                "sr" => Ok((vec![], TensorData::Int64(vec![16000]))),
                other => Err(format!("unexpected Silero VAD input '{other}'")),
            })
            .collect()
    };
    let check = |outputs: &[streamserve::tensor::NamedTensor]| {
        let out = outputs
            .iter()
            .find(|o| o.name == "output")
            .ok_or("no output 'output'")?;
        match out.shape == [batch as i64, 1] {
            true => Ok(()),
            false => Err(format!("output shape {:?}", out.shape)),
        }
    };
    let c = crate::bench::in_process(model, (threads, batch), (warmup, duration), inputs, check)?;
    Ok(VadCeiling {
        threads,
        batch,
        calls: c.calls,
        seconds: c.seconds,
        steps_per_sec: c.rows_per_sec,
        mean_call_ms: c.mean_call_ms,
        cpu_cores: c.cpu_cores,
    })
}

/// Server-side figures of one step, from `/metrics` deltas (the whole step: ramp and ending
/// included).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct ServerFigures {
    pub seconds: f64,
    pub model_calls: f64,
    pub rows: f64,
    pub inference_seconds: f64,
    pub chunks: f64,
    pub chunk_latency_seconds: f64,
    /// Chunks whose server-side latency was at most 100 ms (histogram bucket `le="0.1"`).
    pub chunks_within_100ms: f64,
}

impl ServerFigures {
    pub fn mean_rows_per_call(&self) -> f64 {
        ratio(self.rows, self.model_calls).unwrap_or(0.0)
    }
    pub fn calls_per_sec(&self) -> f64 {
        ratio(self.model_calls, self.seconds).unwrap_or(0.0)
    }
    pub fn mean_call_ms(&self) -> f64 {
        ratio(self.inference_seconds, self.model_calls).unwrap_or(0.0) * 1000.0
    }
    /// Replicas' worth of time spent in model calls.
    pub fn busy_replicas(&self) -> f64 {
        ratio(self.inference_seconds, self.seconds).unwrap_or(0.0)
    }
    pub fn mean_chunk_ms(&self) -> f64 {
        ratio(self.chunk_latency_seconds, self.chunks).unwrap_or(0.0) * 1000.0
    }
    pub fn share_within_100ms(&self) -> f64 {
        ratio(self.chunks_within_100ms, self.chunks).unwrap_or(0.0)
    }
}

/// The server's `/metrics` and when it answered; `None` when it did not.
type Scrape = Option<(Instant, String)>;

async fn scrape(client: &reqwest::Client, base: &str) -> Scrape {
    let text = prometheus::fetch(client, base).await?;
    Some((Instant::now(), text))
}

fn figures(before: &Scrape, after: &Scrape) -> Option<ServerFigures> {
    let ((t0, before), (t1, after)) = (before.as_ref()?, after.as_ref()?);
    let d = |name: &str, extra| counter_delta([before, after], name, MODEL, extra);
    Some(ServerFigures {
        seconds: t1.duration_since(*t0).as_secs_f64(),
        model_calls: d("streamserve_batch_size_count", None),
        rows: d("streamserve_batch_size_sum", None),
        inference_seconds: d("streamserve_inference_duration_seconds_sum", None),
        chunks: d("streamserve_stream_chunk_latency_seconds_count", None),
        chunk_latency_seconds: d("streamserve_stream_chunk_latency_seconds_sum", None),
        chunks_within_100ms: d(
            "streamserve_stream_chunk_latency_seconds_bucket",
            Some("le=\"0.1\""),
        ),
    })
}

async fn streams_open(client: &reqwest::Client, base: &str) -> Option<f64> {
    let text = prometheus::fetch(client, base).await?;
    text.lines()
        .find_map(|l| l.strip_prefix("streamserve_streams_open "))
        .and_then(|v| v.trim().parse().ok())
}

/// Lets the server let go of the finished streams before the next step (bounded).
fn settle(runtime: &tokio::runtime::Runtime, client: &reqwest::Client, base: &str) {
    runtime.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if streams_open(client, base).await.unwrap_or(0.0) <= 0.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    });
}

/// What a step measured besides the streams' report, over the whole step (ramp and ending
/// included): the machine's CPU, and the server's figures.
#[derive(Clone, Copy, Debug)]
pub struct StepFigures {
    pub cpu: Option<CpuShare>,
    pub server: Option<ServerFigures>,
}

pub type Step = stream_steps::Step<StepFigures>;
pub type SetupResults = stream_steps::Stepped<VadSetup, StepFigures>;

/// Runs the whole benchmark and writes its report.
pub fn run(options: &StreamsBenchOptions) -> anyhow::Result<crate::report::Outcome> {
    let stepping = &options.stepping;
    if stepping.steps.is_empty() || stepping.steps.len() > 32 {
        bail!("give 1 to 32 steps");
    }
    if stepping.steps.windows(2).any(|w| w[0] >= w[1]) {
        bail!("steps must be ascending");
    }
    if let Some(&big) = stepping.steps.iter().find(|&&n| n > streams::MAX_STREAMS) {
        bail!("{big} streams is more than {}", streams::MAX_STREAMS);
    }
    let start = crate::report::Start::now(options.common.out.as_deref(), "streams-vad");
    let biggest = stepping.steps.iter().copied().max().unwrap_or(0) as u64;
    // Two descriptors per stream (server and client sockets in this process), plus slack.
    let nofile = raise_nofile_limit(2 * biggest + 1024);
    let audio = Arc::new(Audio::load(&options.wav)?);
    let (_, model_file) = vad_manifest(&options.manifest, &VadSetup::batching_on())?;
    let sha256 = streamserve::manifest::sha256_file(&model_file)?;

    streamserve::runtime::init(None).map_err(anyhow::Error::msg)?;
    let warm = Duration::from_millis(500);
    let mut ceilings = Vec::new();
    for batch in CEILING_BATCHES {
        wait_for_quiet(QUIET_CORES, options.common.quiet_wait);
        eprintln!("[streams-bench] in-process ceiling: 2 threads x 1 session, batch {batch} ...");
        let c = measure_vad(&model_file, 2, batch, warm, options.ceiling_duration)?;
        eprintln!(
            "[streams-bench]   {:.0} steps/s = {:.0} real-time streams ({:.3} ms per call)",
            c.steps_per_sec,
            c.streams(),
            c.mean_call_ms
        );
        ceilings.push(c);
    }

    let runtime = crate::sysinfo::client_runtime(options.common.threads.get())?;
    let client = crate::sysinfo::metrics_client()?;
    let mut results = Vec::new();
    for setup in [VadSetup::batching_on(), VadSetup::batching_off()] {
        let (manifest, _) = vad_manifest(&options.manifest, &setup)?;
        let models = TempModelDir::create(&setup.label.replace(' ', "-"), &manifest)?;
        let running = start_server_for(&models.path, MODEL, setup.max_batch_size)?;
        let base = format!("http://{}", running.addr);
        eprintln!("[streams-bench] streamserve ({}) on {base}", setup.label);
        let label = setup.label.clone();
        let attempt = |n| {
            let load = stepping.load(&base, &audio, n, &label);
            let before_metrics = runtime.block_on(scrape(&client, &base));
            let before = CpuSnapshot::take();
            let report = runtime.block_on(streams::run(&load))?;
            let cpu = cpu_since(before);
            let after_metrics = runtime.block_on(scrape(&client, &base));
            let server = figures(&before_metrics, &after_metrics);
            let pass = report.meets(stepping.target);
            let line = format!(
                "{:.0} chunks/s, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, {} errors, {} late",
                report.chunks_per_sec(),
                report.latency_ms(0.5),
                report.latency_ms(0.99),
                report.max_ms(),
                report.error_count(),
                report.late_streams,
            );
            let others = cpu.map_or(0.0, |c| c.other_cores);
            Ok(Attempt {
                report,
                window: StepFigures { cpu, server },
                pass,
                others,
                figures: line,
            })
        };
        let plan = Stepping {
            tag: "streams-bench",
            label: &label,
            quiet_wait: options.common.quiet_wait,
            nofile,
            fds_per_stream: 2, // two descriptors per stream, as above
        };
        let stepped = stream_steps::step_up(setup, &plan, &stepping.steps, attempt, || {
            settle(&runtime, &client, &base)
        })?;
        stop_server(&running);
        drop(models);
        results.push(stepped);
    }
    drop(runtime);

    let input = ReportInput {
        start: &start,
        elapsed: start.at.elapsed(),
        options,
        model_file: &model_file,
        sha256: &sha256,
        audio: &audio,
        nofile,
        ceilings: &ceilings,
        results: &results,
    };
    let json = results_json(&input);
    let report = render_report(&input, &json)?;
    let plot = Some((PLOT_FILE, crate::plots::streams_latency as _));
    crate::report::save_run(start.dir, "streams-bench", report, &json, plot)
}

/// The latency-vs-streams plot written beside `report.md`.
pub const PLOT_FILE: &str = "streams-latency.svg";

struct ReportInput<'a> {
    start: &'a crate::report::Start,
    elapsed: Duration,
    options: &'a StreamsBenchOptions,
    model_file: &'a Path,
    sha256: &'a str,
    audio: &'a Audio,
    nofile: u64,
    ceilings: &'a [VadCeiling],
    results: &'a [SetupResults],
}

fn step_json(s: &Step) -> serde_json::Value {
    let more = serde_json::json!({
        "pass": s.pass,
        "repeated_because_contended": s.repeated,
        "cpu_cores": s.window.cpu,
        "server_metrics": s.window.server.map(|f| serde_json::json!({
            "raw": f,
            "mean_rows_per_call": f.mean_rows_per_call(),
            "calls_per_s": f.calls_per_sec(),
            "mean_call_ms": f.mean_call_ms(),
            "busy_replicas": f.busy_replicas(),
            "mean_chunk_latency_ms": f.mean_chunk_ms(),
            "share_chunks_within_100ms": f.share_within_100ms(),
        })),
    });
    crate::report::context(&s.report.to_json(), &[more])
}

fn results_json(input: &ReportInput<'_>) -> serde_json::Value {
    let body = serde_json::json!({
        "model_file": input.model_file.display().to_string(),
        "sha256": input.sha256,
        "target_p99_ms": input.options.stepping.target.as_secs_f64() * 1000.0,
        "frame_ms": input.options.stepping.frame_ms,
        "open_files_limit": input.nofile,
        "ceilings": input.ceilings.iter().map(|c| serde_json::json!({
            "data": c, "real_time_streams": c.streams(),
        })).collect::<Vec<_>>(),
        "servers": input.results.iter().map(|s| serde_json::json!({
            "setup": s.setup,
            "capacity_streams": s.capacity(),
            "stopped": s.stopped,
            "steps": s.steps.iter().map(step_json).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    input
        .start
        .results_json(None, &input.options.common.command, body)
}

/// `report.md` from `templates/streams_bench.md.j2`: the results JSON, the run's settings and
/// the observations.
fn render_report(input: &ReportInput<'_>, json: &serde_json::Value) -> anyhow::Result<String> {
    let options = input.options;
    let others = input
        .results
        .iter()
        .flat_map(|s| s.steps.iter())
        .filter(|st| !st.repeated)
        .filter_map(|st| st.window.cpu.map(|c| (st.report.streams, c.other_cores)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(n, cores)| serde_json::json!({ "n": n, "cores": cores }));
    let extra = serde_json::json!({
        "target_streams": 1000, "manifest": options.manifest.display().to_string(),
        "wav": options.wav.display().to_string(), "audio_s": input.audio.seconds(),
        "sample_rate": input.audio.sample_rate,
        "frame_samples": input.audio.sample_rate as usize * options.stepping.frame_ms as usize / 1000,
        "ramp_s": options.stepping.ramp.as_secs_f64(), "duration_s": options.stepping.duration.as_secs_f64(),
        "ceiling_s": options.ceiling_duration.as_secs_f64(), "client_threads": options.common.threads.get(),
        "quiet_wait_s": options.common.quiet_wait.as_secs_f64(), "quiet_cores": QUIET_CORES,
        "contended_cores": CONTENDED_CORES, "others": others, "plot": PLOT_FILE,
        "steps_per_stream_s": STEPS_PER_STREAM_SEC,
    });
    let header = crate::report::header(
        "streamserve WebSocket streams: how many real-time `silero_vad` streams",
        input.elapsed,
        &[format!(
            "open-file limit (soft, after raising): {}",
            input.nofile
        )],
        true,
    );
    crate::report::render(
        "streams_bench",
        &crate::report::context(json, &[header, extra]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manifest_keeps_the_bundled_entry() {
        let options = crate::cli::defaults::<StreamsBenchOptions>();
        let (text, file) = vad_manifest(&options.manifest, &VadSetup::batching_off()).unwrap();
        assert!(file.is_absolute() && file.ends_with("silero_vad/1/model.onnx"));
        let parsed: toml::Table = toml::from_str(&text).unwrap();
        let models = parsed["models"].as_array().unwrap();
        assert_eq!(models.len(), 1);
        let m = models[0].as_table().unwrap();
        assert_eq!(m["name"].as_str(), Some("silero_vad"));
        assert_eq!(m["stream"].as_str(), Some("vad"));
        assert_eq!(m["max_batch_size"].as_integer(), Some(1));
        assert_eq!(m["replicas"].as_integer(), Some(2));
        assert!(m["batch_axes"].as_table().is_some());
        assert!(m.get("fallback").is_none() && m.get("slo_ms").is_none());
        assert_eq!(
            m["file"].as_str(),
            Some(file.display().to_string().as_str())
        );
    }

    #[test]
    fn server_figures_are_the_metrics_deltas_of_the_model() {
        // The 0.25 s bucket and the other model's calls must not count.
        let text = |[calls, rows, busy_s, chunks, latency_s, within]: [f64; 6]| {
            let m = "{model=\"silero_vad\",version=\"1\"";
            format!(
                "streamserve_batch_size_count{m}}} {calls}\nstreamserve_batch_size_sum{m}}} {rows}\n\
                 streamserve_inference_duration_seconds_sum{m}}} {busy_s}\n\
                 streamserve_stream_chunk_latency_seconds_count{m}}} {chunks}\n\
                 streamserve_stream_chunk_latency_seconds_sum{m}}} {latency_s}\n\
                 streamserve_stream_chunk_latency_seconds_bucket{m},le=\"0.1\"}} {within}\n\
                 streamserve_stream_chunk_latency_seconds_bucket{m},le=\"0.25\"}} 1e6\n\
                 streamserve_batch_size_count{{model=\"mlp\"}} 1e6\n"
            )
        };
        let t0 = Instant::now();
        let t4 = t0 + Duration::from_secs(4);
        let before = Some((t0, text([100.0, 800.0, 0.5, 800.0, 1.0, 700.0])));
        let after = Some((t4, text([612.0, 4896.0, 2.5, 4896.0, 9.0, 4284.0])));
        let f = figures(&before, &after).unwrap();
        let raw = serde_json::json!({ "seconds": 4.0, "model_calls": 512.0, "rows": 4096.0,
            "inference_seconds": 2.0, "chunks": 4096.0, "chunk_latency_seconds": 8.0, "chunks_within_100ms": 3584.0 });
        assert_eq!(serde_json::to_value(f).unwrap(), raw);
        assert_eq!(
            (f.mean_rows_per_call(), f.calls_per_sec(), f.mean_call_ms()),
            (8.0, 128.0, 3.90625)
        );
        assert_eq!(
            (f.busy_replicas(), f.mean_chunk_ms(), f.share_within_100ms()),
            (0.5, 1.953125, 0.875)
        );
        assert!(figures(&None, &after).is_none());
        assert_eq!(ServerFigures::default().mean_call_ms(), 0.0);
    }
}
