//! `loadgen efficiency`: what the server spends per unit of work, with the server in a process
//! of its own so that its CPU is told apart from the load generator's.
//!
//! 1. `streamserve serve` as a child process (the bundled `mlp`, `silero_vad` and `vad_energy` entries,
//!    batching as bundled, `fallback` and `slo_ms` removed), optionally (`--pin`) on one CPU
//!    with this process on another;
//! 2. against it, one case after the other: closed-loop REST load of 1-row `mlp` requests, JSON
//!    and binary, at each concurrency ([`crate::rest`]), then real-time `silero_vad` streams
//!    with `results: "all"` at each number of streams ([`crate::streams`]), then the same
//!    streams on `vad_energy` (Silero's interface at next to no cost: what the server spends
//!    on a chunk besides its model, measured directly rather than as a difference);
//! 3. at the two ends of each case's measured window (after the warm-up or the ramp): the CPU
//!    time of the server's pid, of this process and of the machine
//!    ([`cpu_mark`](crate::fleet::watch::cpu_mark)), the server's `/metrics` (requests or
//!    stream chunks it counted, rows per model call), and each server thread's CPU time:
//!    **server CPU µs per request / per chunk**, streams per server core, and the model's
//!    worker threads' CPU per row;
//! 4. with the server stopped, each model in-process on one thread at the mean batch size its
//!    server calls had: the model's own µs per row, hence server ÷ model and the plumbing;
//! 5. `report.md` (`templates/efficiency.md.j2`) and `results.json`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use serde_json::{json, Value};

use crate::bench::TempModelDir;
use crate::cli::{count, secs, BenchCommon, ServerBin};
use crate::fleet::procs::{Instance, InstanceSetup};
use crate::fleet::watch::{cpu_share, measured, CpuWindow};
use crate::manifest::{self, EntryChange};
use crate::pinning::{Pinning, Unpin as Unpinned};
use crate::rest::{self, RestOptions};
use crate::stream_steps::{counter_delta, ratio, CONTENDED_CORES, QUIET_CORES};
use crate::streams::{self, Audio, ResultsMode, StreamOptions};
use crate::sysinfo::{raise_nofile_limit, threads_cpu_seconds, wait_for_quiet, ThreadCpu};

/// The REST model, the stream model, and the stream model that costs next to nothing.
pub const MLP: &str = "mlp";
pub const VAD: &str = "silero_vad";
pub const ENERGY: &str = "vad_energy";
/// The server's models, in the order of their files in its manifest.
const MODELS: [&str; 3] = [MLP, VAD, ENERGY];

/// `loadgen efficiency`'s options.
#[derive(Clone, Debug, clap::Args)]
#[command(mut_arg("client_threads", |a| a.help("Client runtime worker threads [default: 1, so that the load generator takes one core at most]")))]
pub struct EfficiencyOptions {
    /// REST concurrencies (closed loop, 1-row requests), each run as JSON and as binary.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 32], value_parser = count(1, rest::MAX_CONCURRENCY))]
    pub concurrency: Vec<usize>,
    /// Numbers of concurrent real-time silero_vad streams.
    #[arg(long, value_delimiter = ',', default_values_t = [100usize, 200], value_parser = count(1, streams::MAX_STREAMS))]
    pub streams: Vec<usize>,
    /// Real-time streams on vad_energy, whose model call costs next to nothing, so that the
    /// server's CPU per chunk is its plumbing alone (0: no such case).
    #[arg(long, default_value_t = 200, value_parser = count(0, streams::MAX_STREAMS))]
    pub plumbing_streams: usize,
    /// Measured seconds of each case.
    #[arg(long = "duration-secs", value_name = "DURATION_SECS", default_value = "8", value_parser = secs(1, 300))]
    pub duration: Duration,
    /// Unmeasured REST warm-up seconds before each measured window.
    #[arg(long = "warmup-secs", value_name = "WARMUP_SECS", default_value = "1", value_parser = secs(0, 60))]
    pub warmup: Duration,
    /// Seconds over which a streams case opens its streams, before its measured window.
    #[arg(long = "ramp-secs", value_name = "RAMP_SECS", default_value = "2", value_parser = secs(0, 60))]
    pub ramp: Duration,
    /// Measured seconds of each in-process model measurement.
    #[arg(long = "ceiling-secs", value_name = "CEILING_SECS", default_value = "2", value_parser = secs(1, 60))]
    pub ceiling_duration: Duration,
    #[command(flatten)]
    pub server: ServerBin,
    /// Start the server on the first CPU this process may use and pin this process to the second.
    #[arg(long)]
    pub pin: bool,
    #[command(flatten)]
    pub common: BenchCommon,
    #[arg(skip = manifest::bundled())]
    pub manifest: PathBuf,
    #[arg(skip = streams::default_wav())]
    pub wav: PathBuf,
}

impl EfficiencyOptions {
    pub fn client_threads(&self) -> usize {
        self.common.threads.client_threads.map_or(1, |n| n as usize)
    }
}

/// One load case: REST (JSON or binary) at a concurrency, or N streams on one model.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Case {
    pub label: String,
    pub model: &'static str,
    pub streams: bool,
    pub binary: bool,
    /// Concurrency, or streams.
    pub n: usize,
    /// What the server counts: "request" or "chunk".
    pub unit: &'static str,
}

impl Case {
    pub fn new(streams: bool, binary: bool, n: usize) -> Case {
        let (model, unit, label) = match (streams, binary) {
            (true, _) => (VAD, "chunk", format!("{n} streams")),
            (false, false) => (MLP, "request", format!("REST JSON, c={n}")),
            (false, true) => (MLP, "request", format!("REST binary, c={n}")),
        };
        Case {
            label,
            model,
            streams,
            binary,
            n,
            unit,
        }
    }

    /// N real-time streams on vad_energy: the plumbing of a chunk, with no model to speak of.
    pub fn plumbing(n: usize) -> Case {
        Case {
            label: format!("{n} streams, {ENERGY}"),
            model: ENERGY,
            ..Case::new(true, false, n)
        }
    }

    /// The server's counter of this case's units.
    fn counter(&self) -> &'static str {
        match self.streams {
            true => "streamserve_stream_chunks_total",
            false => "streamserve_requests_total",
        }
    }
}

/// What the server did over one measured window.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Window {
    #[serde(flatten)]
    pub cpu: CpuWindow,
    /// Counter deltas from `/metrics`: units (requests or chunks), rows and calls of the model.
    pub units: f64,
    pub rows: f64,
    pub calls: f64,
    /// CPU seconds of the model's worker threads (its calls, packing batches, answering).
    pub worker_seconds: f64,
}

/// The headline figures of one case.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Figures {
    pub server_us_per_unit: f64,
    pub rows_per_call: f64,
    pub rows_per_unit: f64,
    pub model_us_per_unit: Option<f64>,
    pub server_over_model: Option<f64>,
    pub plumbing_us: Option<f64>,
    pub streams_per_core: Option<f64>,
    /// The model as it ran in the server: its worker threads' CPU per row, that ÷ the model's
    /// own µs per row, and the server's CPU per unit besides theirs (HTTP or WebSocket, the
    /// sessions, the router, metrics).
    pub worker_us_per_row: Option<f64>,
    pub worker_over_model: Option<f64>,
    pub beside_workers_us: Option<f64>,
}

impl Window {
    /// From `cpu_share`'s cores (this process first, others last) over `seconds`, and the
    /// `/metrics` texts and the server's thread readings at the window's two ends.
    pub fn new(
        case: &Case,
        seconds: f64,
        cores: &[(String, f64)],
        (texts, threads): ([&str; 2], [&[ThreadCpu]; 2]),
    ) -> Window {
        let delta = |name| counter_delta(texts, name, case.model, None);
        let [before, after] = threads;
        let cpu = CpuWindow::from_cores(seconds, cores);
        Window {
            cpu: cpu.unwrap_or(CpuWindow {
                seconds,
                ..Default::default()
            }),
            units: delta(case.counter()),
            rows: delta("streamserve_batch_size_sum"),
            calls: delta("streamserve_batch_size_count"),
            worker_seconds: threads_cpu_seconds(before, after, &worker_threads(case.model)),
        }
    }

    pub fn rows_per_call(&self) -> f64 {
        ratio(self.rows, self.calls).unwrap_or(0.0)
    }

    /// The batch size the model is measured at in-process: the mean rows per call, rounded.
    pub fn batch(&self) -> Option<usize> {
        (self.calls > 0.0).then(|| self.rows_per_call().round().max(1.0) as usize)
    }

    /// Per-unit figures, given the model's own µs per row at [`Window::batch`].
    pub fn figures(&self, case: &Case, model_us_per_row: Option<f64>) -> Figures {
        let (seconds, server_cores) = (self.cpu.seconds, self.cpu.server_cores);
        let server_us = ratio(server_cores * seconds * 1e6, self.units).unwrap_or(0.0);
        let rows_per_unit = ratio(self.rows, self.units).unwrap_or(0.0);
        let model_us = model_us_per_row.map(|m| m * rows_per_unit);
        // The streams that kept real time, from the chunks the server stepped, not the streams
        // asked for: a stream that fell behind or failed counts for the share it got.
        let real_time_streams = ratio(self.units, seconds).map(|c| c / CHUNKS_PER_STREAM_SECOND);
        let per_core = real_time_streams.and_then(|n| ratio(n, server_cores));
        // None where the server's threads could not be read.
        let worker_us_per_row =
            ratio(self.worker_seconds * 1e6, self.rows).filter(|_| self.worker_seconds > 0.0);
        Figures {
            server_us_per_unit: server_us,
            rows_per_call: self.rows_per_call(),
            rows_per_unit,
            model_us_per_unit: model_us,
            server_over_model: model_us.and_then(|m| ratio(server_us, m)),
            plumbing_us: model_us.map(|m| server_us - m),
            streams_per_core: per_core.filter(|_| case.streams),
            worker_us_per_row,
            worker_over_model: worker_us_per_row
                .zip(model_us_per_row)
                .and_then(|(w, m)| ratio(w, m)),
            beside_workers_us: worker_us_per_row.map(|w| server_us - w * rows_per_unit),
        }
    }
}

/// The name its worker threads start with: `worker-<model>-<version>-<replica>`, as far as
/// Linux keeps a thread's name (15 bytes).
fn worker_threads(model: &str) -> String {
    let mut name = format!("worker-{model}-");
    name.truncate(15);
    name
}

/// One real-time `silero_vad` stream's chunks per second: 512-sample chunks of 16 kHz audio.
const CHUNKS_PER_STREAM_SECOND: f64 = 16_000.0 / 512.0;

/// The model's own cost in-process, one thread, at one batch size.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ModelCost {
    pub model: &'static str,
    pub batch: usize,
    pub calls: u64,
    pub us_per_call: f64,
    pub us_per_row: f64,
}

/// `model`'s cost at `batch` from `costs`, measured (and added) when not there yet.
fn model_cost(
    costs: &mut Vec<ModelCost>,
    (model, file, batch): (&'static str, &Path, usize),
    options: &EfficiencyOptions,
) -> anyhow::Result<ModelCost> {
    if let Some(c) = costs.iter().find(|c| (c.model, c.batch) == (model, batch)) {
        return Ok(c.clone());
    }
    wait_for_quiet(QUIET_CORES, options.common.quiet_wait);
    let (warm, d) = (Duration::from_millis(500), options.ceiling_duration);
    let (calls, ms) = match model {
        MLP => crate::bench::measure_in_process(file, 1, batch, warm, d)
            .map(|c| (c.calls, c.mean_call_ms)),
        _ => crate::streams_bench::measure_vad(file, 1, batch, warm, d)
            .map(|c| (c.calls, c.mean_call_ms)),
    }?;
    let (us_per_call, us_per_row) = (ms * 1000.0, ms * 1000.0 / batch as f64);
    eprintln!("[efficiency] in-process {model} batch {batch}: {us_per_row:.1} µs per row");
    costs.push(ModelCost {
        model,
        batch,
        calls,
        us_per_call,
        us_per_row,
    });
    Ok(costs[costs.len() - 1].clone())
}

/// What the load generator saw over a measured window: units per second (requests or chunks
/// answered), latency, errors, units it counted, and its whole report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Seen {
    pub per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
    pub client_units: u64,
    pub load: Value,
}

/// One case's outcome: what the load generator saw, the server's window, the model's cost.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CaseResult {
    pub case: Case,
    #[serde(flatten)]
    pub seen: Seen,
    pub window: Option<Window>,
    pub model_cost: Option<ModelCost>,
    pub figures: Option<Figures>,
}

fn run_case(
    case: &Case,
    options: &EfficiencyOptions,
    (server, runtime): (&Instance, &tokio::runtime::Runtime),
    audio: &Arc<Audio>,
) -> anyhow::Result<CaseResult> {
    let client = crate::sysinfo::metrics_client()?;
    let base = format!("http://{}", server.addr);
    let at = (server.pid(), base.as_str());
    let seen = |per_s, p50_ms, p99_ms, errors, client_units, load| Seen {
        per_s,
        p50_ms,
        p99_ms,
        errors,
        client_units,
        load,
    };
    wait_for_quiet(QUIET_CORES, options.common.quiet_wait);
    let (seen, first, last) = if case.streams {
        let mut load = StreamOptions::new(base.clone(), audio.clone());
        (load.model, load.streams, load.results) = (case.model.into(), case.n, ResultsMode::All);
        (load.ramp, load.duration) = (options.ramp, options.duration);
        let times = (options.ramp, options.duration);
        let (r, first, last) =
            runtime.block_on(measured(streams::run(&load), times, at, &client))?;
        let (per_s, p50_ms, p99_ms) = (r.chunks_per_sec(), r.latency_ms(0.5), r.latency_ms(0.99));
        let (errors, client_units, load) = (r.error_count(), r.chunks_measured, r.to_json());
        (
            seen(per_s, p50_ms, p99_ms, errors, client_units, load),
            first,
            last,
        )
    } else {
        let (url, model, concurrency, binary) = (base.clone(), MLP.into(), case.n, case.binary);
        let (duration, warmup) = (options.duration, options.warmup);
        let load = RestOptions {
            url,
            model,
            concurrency,
            binary,
            duration,
            warmup,
            ..Default::default()
        };
        let (r, first, last) =
            runtime.block_on(measured(rest::run(&load), (warmup, duration), at, &client))?;
        let (per_s, p50_ms, p99_ms) = (r.requests_per_sec(), r.latency_ms(0.5), r.latency_ms(0.99));
        let (errors, client_units) = (r.error_count() + r.warmup_errors, r.ok + r.error_count());
        (
            seen(per_s, p50_ms, p99_ms, errors, client_units, r.to_json()),
            first,
            last,
        )
    };
    let seconds = last.0 .0.duration_since(first.0 .0).as_secs_f64();
    let cores = cpu_share(first.0, last.0);
    let window = match (&first.1, &last.1, cores.is_empty()) {
        (Some(before), Some(after), false) => {
            let ends = ([&before[..], after], [&first.2[..], &last.2]);
            Some(Window::new(case, seconds, &cores, ends))
        }
        _ => None,
    };
    let w = window.clone().unwrap_or_default();
    eprintln!(
        "[efficiency]   {}: {:.0} {}s/s, p99 {:.2} ms, {} errors; server {:.2} cores, {:.0} µs per {}, {:.1} rows per call; loadgen {:.2}, others {:.2} cores",
        case.label, seen.per_s, case.unit, seen.p99_ms, seen.errors, w.cpu.server_cores,
        w.figures(case, None).server_us_per_unit, case.unit, w.rows_per_call(), w.cpu.loadgen_cores, w.cpu.other_cores
    );
    let (model_cost, figures) = (None, None);
    Ok(CaseResult {
        case: case.clone(),
        seen,
        window,
        model_cost,
        figures,
    })
}

/// `streamserve serve` on `models`, both models ready, and its command line. With `pinning`,
/// the server runs on the server CPU, and this process moves to the load generator's CPU
/// until the returned guard drops.
fn start_server(
    bin: &Path,
    models: &TempModelDir,
    pinning: Option<Pinning>,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<(Instance, String, Option<Unpinned>)> {
    // As a user runs it: the access log on, an HTTP worker per CPU it may use.
    let cpus = match pinning {
        Some(_) => 1,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let extra = ["--log", "info", "--http-workers", &cpus.to_string()].map(String::from);
    let setup = InstanceSetup {
        bin,
        models: &models.path,
        follow: None,
        port: 0,
        extra: &extra,
        cpu: pinning.map(|p| p.server_cpu),
    };
    let server = Instance::start(&setup, "efficiency", models.path.join("server.log"))?;
    let unpin = pinning
        .as_ref()
        .map(Pinning::pin_this_process)
        .transpose()?;
    server.wait_ready(&MODELS, runtime)?;
    Ok((server, Instance::command_line(&setup, "efficiency"), unpin))
}

/// Runs the whole benchmark and writes its report.
pub fn run(options: &EfficiencyOptions) -> anyhow::Result<crate::report::Outcome> {
    let plumbing = (options.plumbing_streams > 0).then_some(options.plumbing_streams);
    let n_cases = options.concurrency.len() + options.streams.len() + plumbing.iter().count();
    if !(1..=16).contains(&n_cases) {
        bail!("give 1 to 16 concurrencies and numbers of streams in all");
    }
    let bin = options.server.get()?;
    let pinning = options.pin.then(Pinning::choose).transpose()?;
    let start = crate::report::Start::now(options.common.out.as_deref(), "efficiency");
    let most_streams = options
        .streams
        .iter()
        .chain(&plumbing)
        .max()
        .copied()
        .unwrap_or(0) as u64;
    let nofile = raise_nofile_limit(most_streams + 1024);
    let audio = Arc::new(Audio::load(&options.wav)?);
    let change = || EntryChange {
        remove: vec!["fallback", "slo_ms"],
        ..Default::default()
    };
    let note = "mlp, silero_vad and vad_energy as bundled, without fallback and slo_ms";
    let entries = MODELS.map(|m| (m, change()));
    let (text, files) = manifest::from_bundled(&options.manifest, note, &entries)?;
    let models = TempModelDir::create("efficiency", &text)?;
    let runtime = crate::sysinfo::client_runtime(options.client_threads())?;
    let (server, command, unpin) = start_server(&bin, &models, pinning, &runtime)?;
    eprintln!(
        "[efficiency] {command}: on {}, pid {}",
        server.addr,
        server.pid()
    );

    let rest = [false, true].map(|binary| {
        options
            .concurrency
            .iter()
            .map(move |&n| Case::new(false, binary, n))
    });
    let streams = (options.streams.iter().map(|&n| Case::new(true, false, n)))
        .chain(plumbing.map(Case::plumbing));
    let mut results = Vec::new();
    for case in rest.into_iter().flatten().chain(streams) {
        results.push(run_case(&case, options, (&server, &runtime), &audio)?);
    }
    drop(server);

    let mut costs = Vec::new();
    for r in &mut results {
        let Some((w, batch)) = r.window.as_ref().and_then(|w| Some((w, w.batch()?))) else {
            continue;
        };
        let Some(file) = MODELS
            .iter()
            .position(|&m| m == r.case.model)
            .map(|i| &files[i])
        else {
            continue;
        };
        let cost = model_cost(&mut costs, (r.case.model, file, batch), options)?;
        r.figures = Some(w.figures(&r.case, Some(cost.us_per_row)));
        r.model_cost = Some(cost);
    }
    drop(unpin);

    let contended = results
        .iter()
        .filter_map(|r| r.window.as_ref())
        .any(|w| w.cpu.other_cores > CONTENDED_CORES);
    let body = json!({
        "server_bin": bin.display().to_string(), "server_command": command, "pinned": pinning,
        "client_threads": options.client_threads(), "open_files_limit": nofile,
        "duration_s": options.duration.as_secs_f64(), "warmup_s": options.warmup.as_secs_f64(), "ramp_s": options.ramp.as_secs_f64(),
        "ceiling_s": options.ceiling_duration.as_secs_f64(), "quiet_wait_s": options.common.quiet_wait.as_secs_f64(),
        "manifest": options.manifest.display().to_string(), "wav": options.wav.display().to_string(), "audio_s": audio.seconds(),
        "cases": results, "model_costs": costs, "contended": contended,
    });
    let json = start.results_json(Some("efficiency"), &options.common.command, body);
    let header = crate::report::header("", start.at.elapsed(), &[], true);
    let extra = json!({ "quiet_cores": QUIET_CORES, "contended_cores": CONTENDED_CORES });
    let report = crate::report::render(
        "efficiency",
        &crate::report::context(&json, &[header, extra]),
    )?;
    crate::report::save_run(start.dir, "efficiency", report, &json, None)
}

#[cfg(test)]
mod tests;
