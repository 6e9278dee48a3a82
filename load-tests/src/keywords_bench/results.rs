//! What `loadgen keywords-bench` measured, and its `results.json`: the steps of each
//! configuration, the headline (most streams, server CPU per stream-second, the compute limit
//! and their ratios) and batching on against off at the same number of streams.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use super::compute::{compute_limit, StageCost, STAGES};
use super::{KeywordsBenchOptions, Setup, GATED, MODEL, OFF, ON};
use crate::fleet::watch::CpuWindow;
use crate::stream_steps::{self, counter_delta, ratio, CONTENDED_CORES, QUIET_CORES};
use crate::streams::Audio;

/// What one step measured over its measured window, besides the streams' own report.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Window {
    #[serde(flatten)]
    pub cpu: CpuWindow,
    /// Server CPU ms per stream per second of audio.
    pub server_ms_per_stream_s: f64,
    /// From `/metrics`: (model, rows per second, rows per model call) of each stage.
    pub stages: Vec<(String, f64, f64)>,
    /// Embedding steps the gate skipped, of all embedding steps.
    pub embedding_skipped: f64,
}

impl Window {
    /// From the server's CPU over the window of `streams` streams, and its `/metrics` texts at
    /// the window's two ends.
    pub fn new(cpu: CpuWindow, streams: usize, texts: [&str; 2]) -> Window {
        let delta = |name, model, extra| counter_delta(texts, name, model, extra);
        let stages = STAGES
            .iter()
            .map(|s| {
                let rows = delta("streamserve_batch_size_sum", s.model, None);
                let calls = delta("streamserve_batch_size_count", s.model, None);
                let per_s = rows / cpu.seconds.max(1e-3);
                (
                    s.model.to_string(),
                    per_s,
                    ratio(rows, calls).unwrap_or(0.0),
                )
            })
            .collect();
        let embedding = Some("stage=\"ww_embedding\"");
        let skips = delta("streamserve_stream_stage_skips_total", MODEL, embedding);
        let runs = delta("streamserve_stream_stage_steps_total", MODEL, embedding);
        Window {
            server_ms_per_stream_s: cpu.server_cores * 1000.0 / streams as f64,
            cpu,
            stages,
            embedding_skipped: ratio(skips, skips + runs).unwrap_or(0.0),
        }
    }
}

pub type Step = stream_steps::Step<Option<Window>>;
pub type SetupResults = stream_steps::Stepped<Setup, Option<Window>>;

impl SetupResults {
    /// The step the headline reports: the best one, or for the gated configuration its one
    /// step (passed or not: its CPU is the figure wanted).
    pub fn headline_step(&self) -> Option<&Step> {
        match self.setup.gate {
            false => self.best(),
            true => self.steps.iter().rev().find(|s| !s.repeated),
        }
    }

    /// Server CPU ms per stream-second of the counted, passing step with `n` streams.
    fn cpu_at(&self, n: usize) -> Option<f64> {
        self.steps
            .iter()
            .filter(|st| !st.repeated && st.pass && st.report.streams == n)
            .find_map(|st| st.window.as_ref())
            .map(|w| w.server_ms_per_stream_s)
    }
}

/// The number of streams of the gated step: the most batching on carried, at most half its
/// capacity (the gate adds work: the step must not overload the server), else its first
/// passing step, else the first step.
pub fn gated_streams(on: &SetupResults, steps: &[usize]) -> usize {
    let passed = || {
        on.steps
            .iter()
            .filter(|s| !s.repeated && s.pass)
            .map(|s| s.report.streams)
    };
    let capacity = on.capacity().unwrap_or(0);
    passed()
        .filter(|&n| 2 * n <= capacity)
        .max()
        .or_else(|| passed().min())
        .unwrap_or(steps[0])
}

fn step_json(s: &Step) -> Value {
    let more =
        json!({ "pass": s.pass, "repeated_because_contended": s.repeated, "window": s.window });
    crate::report::context(&s.report.to_json(), &[more])
}

/// The headline row of one configuration: the most streams it carried (a gated step: the N
/// it ran at), its server CPU per stream-second there, and the compute limit beside it.
fn headline(s: &SetupResults, costs: &[StageCost], nproc: usize) -> Value {
    let best = s.headline_step();
    let limit = compute_limit(costs, s.setup.gate, s.setup.batching, nproc);
    let cpu = best
        .and_then(|b| b.window.as_ref())
        .map(|w| w.server_ms_per_stream_s);
    let limit_ms = limit["cpu_ms_per_stream_s"].as_f64().unwrap_or(0.0);
    let limit_streams = limit["streams_on_all_cores"].as_f64().unwrap_or(0.0);
    let streams = best.map(|b| b.report.streams);
    json!({
        "setup": s.setup, "streams": streams, "p99_ms": best.map(|b| b.report.latency_ms(0.99)),
        "every_step_passed": !s.steps.is_empty() && s.steps.iter().filter(|st| !st.repeated).all(|st| st.pass),
        "server_ms_per_stream_s": cpu, "limit": limit,
        "embedding_skipped": best.and_then(|b| b.window.as_ref()).map(|w| w.embedding_skipped),
        "cpu_over_limit": cpu.filter(|_| limit_ms > 0.0).map(|c| c / limit_ms),
        "streams_over_limit": streams.filter(|_| limit_streams > 0.0).map(|n| n as f64 / limit_streams),
    })
}

/// Server CPU per stream-second of batching on and off at the most streams both carried, and
/// of the gated step against batching on at its number of streams.
fn on_off(results: &[SetupResults]) -> Value {
    let of = |label: &str| results.iter().find(|s| s.setup.label == label);
    let (Some(on), Some(off)) = (of(ON.label), of(OFF.label)) else {
        return Value::Null;
    };
    let gated = of(GATED.label)
        .and_then(|g| g.headline_step())
        .and_then(|st| Some((st.report.streams, st.window.as_ref()?)))
        .map(|(n, w)| {
            let ungated = on.cpu_at(n);
            json!({ "n": n, "gated_ms": w.server_ms_per_stream_s, "ungated_ms": ungated,
                    "cpu_ratio": ungated.filter(|u| *u > 0.0).map(|u| w.server_ms_per_stream_s / u),
                    "embedding_skipped": w.embedding_skipped })
        });
    let (n_on, n_off) = (on.capacity(), off.capacity());
    let common = n_off.into_iter().chain(n_on).min();
    let cpu = common.and_then(|n| on.cpu_at(n).zip(off.cpu_at(n)).map(|(a, b)| (n, a, b)));
    json!({
        "streams_ratio": n_on.zip(n_off).filter(|(_, off)| *off > 0).map(|(on, off)| on as f64 / off as f64),
        "common_n": cpu.map(|c| c.0), "on_ms": cpu.map(|c| c.1), "off_ms": cpu.map(|c| c.2),
        "cpu_ratio": cpu.filter(|c| c.2 > 0.0).map(|c| c.1 / c.2), "gated": gated,
    })
}

pub(super) fn results_json(
    options: &KeywordsBenchOptions,
    start: &crate::report::Start,
    files: &[PathBuf],
    audio: &Audio,
    costs: &[StageCost],
    results: &[SetupResults],
) -> Value {
    let (nproc, stepping) = (start.machine.nproc, &options.stepping);
    let limits: Vec<Value> = [(false, false), (false, true), (true, false), (true, true)]
        .iter()
        .map(|&(g, b)| compute_limit(costs, g, b, nproc))
        .collect();
    let body = json!({
        "target_p99_ms": stepping.target.as_secs_f64() * 1000.0, "frame_ms": stepping.frame_ms,
        "ramp_s": stepping.ramp.as_secs_f64(), "duration_s": stepping.duration.as_secs_f64(),
        "ceiling_s": options.ceiling_duration.as_secs_f64(), "quiet_wait_s": options.common.quiet_wait.as_secs_f64(),
        "manifest": options.manifest.display().to_string(), "wav": options.wav.display().to_string(), "audio_s": audio.seconds(), "quiet_secs": super::QUIET_SECS,
        "stages": STAGES.iter().zip(files).map(|(s, f)| json!({ "model": s.model, "role": s.role, "input": s.input, "row": s.row, "output": s.output, "steps_per_stream_s": s.steps_per_stream_s, "file": f.display().to_string() })).collect::<Vec<_>>(),
        "ceilings": costs, "compute_limits": limits,
        "servers": results.iter().map(|s| json!({ "setup": s.setup, "stopped": s.stopped,
            "capacity_streams": s.capacity().filter(|_| !s.setup.gate),
            "steps": s.steps.iter().map(step_json).collect::<Vec<_>>() })).collect::<Vec<_>>(),
        "headline": results.iter().map(|s| headline(s, costs, nproc)).collect::<Vec<_>>(),
        "on_off": on_off(results),
    });
    start.results_json(Some("keywords_bench"), &options.common.command, body)
}

/// `report.md` from `templates/keywords_bench.md.j2`: the results JSON, the header (the server
/// binary `bin` beside the machine's `nproc` cores) and the settings the JSON leaves out.
pub(super) fn render(
    json: &Value,
    options: &KeywordsBenchOptions,
    elapsed: Duration,
    (bin, nproc): (&Path, usize),
    nofile: u64,
) -> anyhow::Result<String> {
    let header = crate::report::header(
        "streamserve keyword-spotting streams: `hey_marvin`, batching on vs off, against the pipeline's compute limit",
        elapsed,
        &[format!(
            "the server runs as its own process (`{}`); the load generator (this process) shares the machine's {nproc} cores with it",
            bin.display()
        )],
        true,
    );
    let extra = json!({ "quiet_cores": QUIET_CORES, "contended_cores": CONTENDED_CORES,
                        "client_threads": options.common.threads.get(), "open_files_limit": nofile });
    crate::report::render(
        "keywords_bench",
        &crate::report::context(json, &[header, extra]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::streams::{ResultsMode, StreamReport};

    fn step(n: usize, p99_ms: u64, server_ms: f64) -> Step {
        let mut latency = crate::hist::new(3);
        latency.record(p99_ms * 1000).unwrap();
        let report = StreamReport {
            url: "http://127.0.0.1:9".into(),
            model: super::super::MODEL.into(),
            streams: n,
            ramp: Duration::from_secs(2),
            measured: Duration::from_secs(10),
            speed: 1.0,
            frame_ms: 20,
            results: ResultsMode::All,
            chunk_samples: 1280,
            sample_rate: 16000,
            connected: n as u64,
            started: n as u64,
            summaries: n as u64,
            chunks_total: 125,
            chunks_measured: 100,
            events: 2,
            degraded: 0,
            audio_seconds: 12.0 * n as f64,
            errors: Default::default(),
            first_errors: Vec::new(),
            closes: Default::default(),
            late_streams: 0,
            late_threshold: Duration::from_millis(100),
            max_send_lag: Duration::ZERO,
            latency_us: latency.clone(),
            latency_sched_us: latency,
        };
        let stages = STAGES
            .iter()
            .map(|s| (s.model.to_string(), 12.5 * n as f64, 2.0))
            .collect();
        let cpu = CpuWindow {
            seconds: 10.0,
            server_cores: server_ms * n as f64 / 1000.0,
            loadgen_cores: 0.1,
            other_cores: 0.01,
        };
        let window = Window {
            cpu,
            server_ms_per_stream_s: server_ms,
            stages,
            embedding_skipped: 0.0,
        };
        Step {
            report,
            window: Some(window),
            pass: p99_ms < 100,
            repeated: false,
        }
    }

    #[test]
    fn a_window_is_the_server_cpu_and_the_metrics_deltas_of_each_stage() {
        // Each stage's rows in a quarter as many calls; the embedding stage skipped `skips` steps
        // and ran 100 + skips / 3.
        let text = |rows: u32, skips: u32| {
            let stage = |m: &str| {
                format!("streamserve_batch_size_sum{{model=\"{m}\"}} {rows}\nstreamserve_batch_size_count{{model=\"{m}\"}} {}\n", rows / 4)
            };
            let embedding = format!("{{model=\"{MODEL}\",stage=\"ww_embedding\"}}");
            STAGES.map(|s| stage(s.model)).concat() + &format!("streamserve_stream_stage_skips_total{embedding} {skips}\nstreamserve_stream_stage_steps_total{embedding} {}\n", 100 + skips / 3)
        };
        let cpu = CpuWindow {
            seconds: 10.0,
            server_cores: 0.5,
            ..Default::default()
        };
        // 0.5 cores for 20 streams: 25 CPU-ms per stream-second; 1000 rows in 10 s, in 250 calls.
        let w = Window::new(cpu.clone(), 20, [&text(100, 0), &text(1100, 300)]);
        let want = json!({ "seconds": 10.0, "server_cores": 0.5, "loadgen_cores": 0.0, "other_cores": 0.0, "server_ms_per_stream_s": 25.0,
                           "stages": STAGES.map(|s| json!([s.model, 100.0, 4.0])), "embedding_skipped": 0.75 });
        assert_eq!(json!(w), want);
        // A `/metrics` that could not be read counts as no work, not as negative work.
        let unread = Window::new(cpu, 20, [&text(100, 0), ""]);
        assert_eq!(unread.stages[0], ("ww_melspec".to_string(), 0.0, 0.0));
        assert_eq!(unread.embedding_skipped, 0.0);
    }

    #[test]
    fn the_report_puts_the_configurations_side_by_side() {
        let steps = [10, 25, 50];
        let on = SetupResults {
            setup: ON,
            steps: vec![step(10, 5, 24.0), step(25, 20, 22.0), step(50, 150, 21.0)],
            stopped: "N = 50 missed the target".into(),
        };
        assert_eq!(on.best().map(|s| s.report.streams), Some(25));
        assert_eq!(gated_streams(&on, &steps), 10);
        let off = SetupResults {
            setup: OFF,
            steps: vec![step(10, 5, 30.0), step(25, 130, 29.0)],
            stopped: "N = 25 missed the target".into(),
        };
        let gated = SetupResults {
            setup: GATED,
            steps: vec![step(10, 120, 30.0)],
            stopped: "every step passed".into(),
        };
        let costs: Vec<StageCost> = STAGES
            .iter()
            .flat_map(|s| {
                [1, 16].map(|batch| StageCost {
                    model: s.model,
                    role: s.role,
                    batch,
                    calls: 10,
                    mean_call_ms: 0.1 * batch as f64,
                    us_per_row: 100.0,
                    ms_per_stream_s: 100.0 * s.steps_per_stream_s / 1000.0,
                    cpu_cores: None,
                })
            })
            .collect();
        let options = crate::cli::defaults::<KeywordsBenchOptions>();
        let start = crate::report::Start::now(Some(Path::new("/nonexistent")), "test");
        let audio = Audio::from_samples(&[0; 16000], 16000).unwrap();
        let files: Vec<PathBuf> = STAGES.iter().map(|s| PathBuf::from(s.model)).collect();
        let json = results_json(&options, &start, &files, &audio, &costs, &[on, gated, off]);
        assert_eq!(json["headline"][0]["streams"], 25);
        assert_eq!(json["headline"][1]["streams"], 10);
        assert_eq!(json["headline"][2]["streams"], 10);
        assert_eq!(json["on_off"]["common_n"], 10);
        assert_eq!(json["on_off"]["cpu_ratio"], 0.8);
        assert_eq!(json["on_off"]["gated"]["ungated_ms"], 24.0);
        let md = render(
            &json,
            &options,
            Duration::from_secs(1),
            (Path::new("streamserve"), 2),
            1024,
        )
        .unwrap();
        for want in [
            "| batching on | **25** |",
            "| batching on, gate on ¹ | **10** |",
            "| batching off | **10** |",
            "2.50× the streams (25 vs 10)",
            "on ÷ off = 0.80",
            "(1.25×)",
            "N = 50 missed the target",
        ] {
            assert!(md.contains(want), "{want:?} is not in:\n{md}");
        }
    }
}
