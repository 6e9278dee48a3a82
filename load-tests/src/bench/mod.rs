//! The side-by-side REST micro-benchmark, in one run:
//!
//! 1. the ceiling: raw in-process ONNX Runtime throughput of the `mlp` model, batch 64, one
//!    session per thread (no HTTP, no JSON, no queueing), plus batch 1 for reference;
//! 2. streamserve started in-process twice on a model directory holding only `mlp` with
//!    2 replicas: batching on (`max_batch_size = 64`, no queue delay, as shipped), the same with a
//!    2 ms queue delay (Triton style), and batching off
//!    (`max_batch_size = 1`);
//!    and (unless turned off) the FastAPI + uvicorn + onnxruntime peer (`crate::peer`);
//! 3. closed-loop REST load against each at several concurrencies;
//! 4. `report.md` (and `results.json`, `latency-throughput.svg`) with the figures, their
//!    ratios and a capacity plan.

use std::path::{Path, PathBuf};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use streamserve::manifest::Device;
use streamserve::runtime::ModelSession;
use streamserve::tensor::TensorData;

use crate::cli::{count, secs, BenchCommon};
use crate::rest::{self, RestOptions, RestReport};
use crate::sysinfo::{CpuShare, CpuSnapshot};
use crate::{mlp, SplitMix64};

mod results;

use results::{capacity_section, render_report, results_json};
pub use results::{PLAN_SLO_MS, PLAN_TARGET_RPS, PLAN_TARGET_STREAMS};

/// `loadgen bench`'s options.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchOptions {
    /// Measured seconds per concurrency level and server (2 servers x 4 levels).
    #[arg(long = "duration-secs", value_name = "DURATION_SECS", default_value = "10", value_parser = secs(1, 300))]
    pub duration: Duration,
    /// Warm-up seconds before each measured period.
    #[arg(long = "warmup-secs", value_name = "WARMUP_SECS", default_value = "2", value_parser = secs(0, 60))]
    pub warmup: Duration,
    /// Measured seconds of each in-process ceiling measurement.
    #[arg(long = "ceiling-secs", value_name = "CEILING_SECS", default_value = "4", value_parser = secs(1, 60))]
    pub ceiling_duration: Duration,
    /// Concurrency levels, comma-separated.
    #[arg(long = "concurrency", value_name = "CONCURRENCY", value_delimiter = ',', default_values_t = [1usize, 8, 32, 128],
          value_parser = count(1, crate::rest::MAX_CONCURRENCY))]
    pub concurrencies: Vec<usize>,
    /// Use the binary tensor data extension instead of JSON data.
    #[arg(long)]
    pub binary: bool,
    #[command(flatten)]
    pub common: BenchCommon,
    /// Leave out the FastAPI + uvicorn + onnxruntime peer (which needs python3 and, the first
    /// time, the package index to create load-tests/.venv-peer/).
    #[arg(long)]
    pub no_peer: bool,
    /// The model file: `models/mlp/1/model.onnx` of this checkout.
    #[arg(skip = default_model_file())]
    pub model_file: PathBuf,
}

/// `models/mlp/1/model.onnx` of the checkout this crate was built from.
pub fn default_model_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("models")
        .join("mlp")
        .join("1")
        .join("model.onnx")
}

/// The latency-vs-throughput plot written beside `report.md`.
pub const PLOT_FILE: &str = "latency-throughput.svg";

/// In-process ONNX Runtime throughput: `threads` threads, each with its own session
/// (`intra_threads = 1`), each running batches of `batch` rows back to back.
#[derive(Clone, Debug, serde::Serialize)]
pub struct InProcess {
    pub threads: usize,
    pub batch: usize,
    pub calls: u64,
    pub seconds: f64,
    pub rows_per_sec: f64,
    /// Mean time of one model call on one thread.
    pub mean_call_ms: f64,
    /// CPU used meanwhile (session loading and warm-up included).
    pub cpu_cores: Option<CpuShare>,
}

/// The inputs of one model call: (shape, data) per model input.
pub type Inputs = Vec<(Vec<i64>, TensorData)>;

/// Runs `model` in-process on `threads` threads, each owning one session (`intra_threads = 1`)
/// and calling it back to back on the inputs `inputs` makes for (its session, its thread
/// number), after `check` accepted the first call's outputs: for `warmup`, then for `duration`
/// counting calls. Loads ONNX Runtime first (`streamserve::runtime::init`) if nothing has yet.
pub fn in_process(
    model: &Path,
    (threads, batch): (usize, usize),
    (warmup, duration): (Duration, Duration),
    inputs: impl Fn(&ModelSession, usize) -> Result<Inputs, String> + Sync,
    check: impl Fn(&[streamserve::tensor::NamedTensor]) -> Result<(), String> + Sync,
) -> anyhow::Result<InProcess> {
    let env = streamserve::runtime::init(None).map_err(anyhow::Error::msg)?;
    let barrier = Barrier::new(threads);
    let before = CpuSnapshot::take();
    let per_thread = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (barrier, inputs, check) = (&barrier, &inputs, &check);
                scope.spawn(move || -> Result<(u64, Duration), String> {
                    let loaded = ModelSession::load(env, model, Device::Cpu, false, 1);
                    // Meet the others even when loading failed, so that nobody waits forever.
                    barrier.wait();
                    let mut session = loaded?;
                    let tensors = inputs(&session, t)?;
                    let tensors: Vec<(&[i64], &TensorData)> =
                        tensors.iter().map(|(s, d)| (s.as_slice(), d)).collect();
                    check(&session.run(&tensors)?)?;
                    let start = Instant::now();
                    while start.elapsed() < warmup {
                        session.run(&tensors)?;
                    }
                    let (measuring, mut calls) = (Instant::now(), 0u64);
                    while measuring.elapsed() < duration {
                        session.run(&tensors)?;
                        calls += 1;
                    }
                    Ok((calls, measuring.elapsed()))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| "an in-process benchmark thread panicked".to_string())?
            })
            .collect::<Result<Vec<_>, String>>()
    })
    .map_err(anyhow::Error::msg)?;
    let calls: u64 = per_thread.iter().map(|(c, _)| c).sum();
    let busy: f64 = per_thread.iter().map(|(_, d)| d.as_secs_f64()).sum();
    Ok(InProcess {
        threads,
        batch,
        calls,
        seconds: per_thread
            .iter()
            .map(|(_, d)| d.as_secs_f64())
            .fold(0.0, f64::max),
        rows_per_sec: per_thread
            .iter()
            .map(|(c, d)| (*c * batch as u64) as f64 / d.as_secs_f64())
            .sum(),
        mean_call_ms: if calls == 0 {
            0.0
        } else {
            busy * 1000.0 / calls as f64
        },
        cpu_cores: cpu_since(before),
    })
}

/// The `mlp` ceiling: batches of `batch` rows of deterministic data.
pub fn measure_in_process(
    model: &Path,
    threads: usize,
    batch: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<InProcess> {
    let data = |t: usize| SplitMix64::new(0xCE11 + t as u64).f32_vec(batch * mlp::FEATURES);
    let shape = vec![batch as i64, mlp::FEATURES as i64];
    let want = [batch as i64, mlp::OUTPUT_WIDTH as i64];
    in_process(
        model,
        (threads, batch),
        (warmup, duration),
        |_, t| Ok(vec![(shape.clone(), TensorData::Fp32(data(t)))]),
        |outputs| match outputs.iter().all(|o| o.shape == want) {
            true => Ok(()),
            false => Err(format!("unexpected output shapes from {}", model.display())),
        },
    )
}

/// How one in-process server serves `mlp`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ServerSetup {
    pub label: String,
    pub replicas: usize,
    pub max_batch_size: usize,
    pub max_queue_delay_ms: f64,
}

impl ServerSetup {
    /// The shipped configuration: batch whatever queued while the workers were busy.
    pub fn batching_on() -> ServerSetup {
        ServerSetup {
            label: "batching on".into(),
            replicas: 2,
            max_batch_size: 64,
            max_queue_delay_ms: 0.0,
        }
    }

    /// Triton-style: also wait up to 2 ms for a batch to fill.
    pub fn batching_on_with_delay() -> ServerSetup {
        ServerSetup {
            label: "batching on, 2 ms delay".into(),
            replicas: 2,
            max_batch_size: 64,
            max_queue_delay_ms: 2.0,
        }
    }

    /// The FastAPI + uvicorn + onnxruntime peer: 2 worker processes, one session each
    /// (intra_op_num_threads = 1), no batching across requests.
    pub fn peer() -> ServerSetup {
        ServerSetup {
            label: "fastapi peer".into(),
            replicas: 2,
            max_batch_size: 1,
            max_queue_delay_ms: 0.0,
        }
    }

    pub fn batching_off() -> ServerSetup {
        ServerSetup {
            label: "batching off".into(),
            replicas: 2,
            max_batch_size: 1,
            max_queue_delay_ms: 0.0,
        }
    }

    /// The `models.toml` of a model directory that holds only `mlp`, its file given by
    /// absolute path (the manifest joins `file` to the directory, which keeps an absolute one).
    pub fn manifest(&self, model_file: &Path, sha256: &str) -> String {
        let file =
            serde_json::to_string(&model_file.display().to_string()).expect("a string serialises");
        format!(
            "# Written by streamserve-load for one benchmark run.\n\
             [[models]]\n\
             name = \"mlp\"\n\
             version = \"1\"\n\
             file = {file}\n\
             sha256 = \"{sha256}\"\n\
             device = \"cpu\"\n\
             replicas = {}\n\
             intra_threads = 1\n\
             max_batch_size = {}\n\
             max_queue_delay_ms = {:.3}\n\
             max_queue = 1024\n",
            self.replicas, self.max_batch_size, self.max_queue_delay_ms
        )
    }
}

/// A model directory under the system temp dir, removed when dropped.
pub struct TempModelDir {
    pub path: PathBuf,
}

impl TempModelDir {
    /// Writes `manifest` as `models.toml` in a fresh directory.
    pub fn create(tag: &str, manifest: &str) -> anyhow::Result<TempModelDir> {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("streamserve-load-{}-{n}-{tag}", std::process::id()));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let dir = TempModelDir { path };
        std::fs::write(dir.path.join("models.toml"), manifest)
            .with_context(|| format!("cannot write {}/models.toml", dir.path.display()))?;
        Ok(dir)
    }
}

impl Drop for TempModelDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Starts streamserve in this process on 127.0.0.1 (a free port) on `models`, and checks that
/// `mlp` is serving; the caller stops it with [`stop_server`].
pub fn start_server(
    models: &Path,
    max_batch_size: usize,
) -> anyhow::Result<streamserve::server::Running> {
    start_server_for(models, "mlp", max_batch_size)
}

/// Starts streamserve in this process on 127.0.0.1 (a free port) on `models`, and checks that
/// `model` is serving with `max_batch_size`; the caller stops it with [`stop_server`].
pub fn start_server_for(
    models: &Path,
    model: &str,
    max_batch_size: usize,
) -> anyhow::Result<streamserve::server::Running> {
    let config = streamserve::config::Config {
        models: models.to_path_buf(),
        ..Default::default()
    };
    start_server_with(config, model, max_batch_size)
}

/// [`start_server_for`] with more of the configuration given (host and port are always
/// 127.0.0.1 and a free port).
pub fn start_server_with(
    config: streamserve::config::Config,
    model: &str,
    max_batch_size: usize,
) -> anyhow::Result<streamserve::server::Running> {
    let config = streamserve::config::Config {
        host: "127.0.0.1".into(),
        port: 0,
        ..config
    };
    let running =
        streamserve::server::spawn(config).context("cannot start streamserve in-process")?;
    // The router publishes its replicas' health from its own thread once it has started,
    // which can be just after `spawn` returns: wait for it, boundedly.
    let deadline = Instant::now() + Duration::from_secs(10);
    let problem = loop {
        let problem = match running.catalog.snapshot().resolve(model, None) {
            Err(e) => Some(format!(
                "streamserve started but does not serve {model}: {e}"
            )),
            Ok(served) if !served.health.ready() => {
                Some(format!("{model} has no healthy replica after 10 s"))
            }
            Ok(served) if served.info.batching.max_batch_size != max_batch_size => Some(format!(
                "{model} serves with max_batch_size {}, the manifest says {max_batch_size}",
                served.info.batching.max_batch_size
            )),
            Ok(_) => None,
        };
        if problem.is_none() || Instant::now() >= deadline {
            break problem;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    if let Some(problem) = problem {
        stop_server(&running);
        bail!(problem);
    }
    Ok(running)
}

/// Stops an in-process server without waiting for connections to drain (there are none
/// left: the load has ended), bounded to five seconds.
pub fn stop_server(running: &streamserve::server::Running) {
    let handle = running.handle.clone();
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build();
        if let Ok(rt) = rt {
            rt.block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(5), handle.stop(false)).await;
            });
        }
    })
    .join();
}

/// Results of one server setup at each concurrency.
#[derive(Clone, Debug)]
pub struct ServerResults {
    pub setup: ServerSetup,
    pub runs: Vec<RestReport>,
    /// CPU used during each run (warm-up included), same order as `runs`.
    pub cpu: Vec<Option<CpuShare>>,
}

/// The model file a benchmark loads, as an absolute path, and its sha256 (for the manifest
/// and the report).
pub fn model_file_and_sha256(file: &Path) -> anyhow::Result<(PathBuf, String)> {
    let model_file = file
        .canonicalize()
        .with_context(|| format!("model file {} not found", file.display()))?;
    let sha256 = streamserve::manifest::sha256_file(&model_file)
        .with_context(|| format!("cannot read {}", model_file.display()))?;
    Ok((model_file, sha256))
}

/// Runs the whole benchmark and writes its report. Takes about
/// 2 × (warm-up + duration) × levels + 2 × ceiling time, plus start-up.
pub fn run(options: &BenchOptions) -> anyhow::Result<crate::report::Outcome> {
    if options.concurrencies.is_empty() || options.concurrencies.len() > 16 {
        bail!("give 1 to 16 concurrency levels");
    }
    let start = crate::report::Start::now(options.common.out.as_deref(), "rest-mlp");
    let (model_file, sha256) = crate::bench::model_file_and_sha256(&options.model_file)?;

    streamserve::runtime::init(None).map_err(anyhow::Error::msg)?;
    eprintln!("[bench] in-process ceiling: 2 threads x 1 session (intra_threads=1), batch 64 ...");
    let warm = Duration::from_millis(500);
    let ceiling = measure_in_process(&model_file, 2, 64, warm, options.ceiling_duration)?;
    eprintln!("[bench]   {:.0} rows/s", ceiling.rows_per_sec);
    eprintln!("[bench] in-process reference: 2 threads, batch 1 ...");
    let batch1 = measure_in_process(&model_file, 2, 1, warm, options.ceiling_duration)?;
    eprintln!("[bench]   {:.0} rows/s", batch1.rows_per_sec);

    let runtime = crate::sysinfo::client_runtime(options.common.threads.get())?;
    let mut servers = Vec::new();
    for setup in [
        ServerSetup::batching_on(),
        ServerSetup::batching_on_with_delay(),
        ServerSetup::batching_off(),
    ] {
        let models = TempModelDir::create(
            &setup.label.replace(' ', "-"),
            &setup.manifest(&model_file, &sha256),
        )?;
        let running = start_server(&models.path, setup.max_batch_size)?;
        eprintln!("[bench] streamserve ({}) on {}", setup.label, running.addr);
        let result = load_levels(
            &runtime,
            &format!("http://{}", running.addr),
            &setup.label,
            options,
        );
        stop_server(&running);
        drop(models);
        let (runs, cpu) = result
            .map_err(|e| e.context(format!("load against the {} server failed", setup.label)))?;
        servers.push(ServerResults { setup, runs, cpu });
    }
    if !options.no_peer {
        let setup = ServerSetup::peer();
        eprintln!(
            "[bench] starting the FastAPI peer (uvicorn, {} workers) ...",
            setup.replicas
        );
        let peer = crate::peer::Peer::start(&model_file, setup.replicas)?;
        eprintln!("[bench] {} on {}", setup.label, peer.addr);
        let result = load_levels(&runtime, &peer.url(), &setup.label, options);
        drop(peer);
        let (runs, cpu) =
            result.map_err(|e| e.context(format!("load against the {} failed", setup.label)))?;
        servers.push(ServerResults { setup, runs, cpu });
    }
    drop(runtime);

    let json = results_json(&start, options, &ceiling, &batch1, &servers);
    let mut report = render_report(
        &json,
        start.at.elapsed(),
        options,
        &model_file,
        &sha256,
        &servers,
    )?;
    report.push_str(&capacity_section(&json));
    let plot = Some((PLOT_FILE, crate::plots::bench_latency_throughput as _));
    crate::report::save_run(start.dir, "bench", report, &json, plot)
}

/// Closed-loop load at each of `options.concurrencies` against the `mlp` REST endpoint at
/// `url`, each level after waiting for a quiet machine.
fn load_levels(
    runtime: &tokio::runtime::Runtime,
    url: &str,
    label: &str,
    options: &BenchOptions,
) -> anyhow::Result<(Vec<RestReport>, Vec<Option<CpuShare>>)> {
    let mut runs = Vec::new();
    let mut cpu = Vec::new();
    for &concurrency in &options.concurrencies {
        let load = RestOptions {
            url: url.to_string(),
            model: "mlp".into(),
            concurrency,
            duration: options.duration,
            warmup: options.warmup,
            rows: 1,
            binary: options.binary,
            quiet: false,
            request_timeout: Duration::from_secs(30),
        };
        if !options.common.quiet_wait.is_zero() {
            crate::sysinfo::wait_for_quiet(crate::sysinfo::QUIET_CORES, options.common.quiet_wait);
        }
        let before = CpuSnapshot::take();
        let report = runtime.block_on(rest::run(&load))?;
        cpu.push(cpu_since(before));
        eprintln!(
            "[bench]   {label} c={concurrency}: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} errors",
            report.requests_per_sec(),
            report.latency_ms(0.5),
            report.latency_ms(0.99),
            report.error_count()
        );
        runs.push(report);
    }
    Ok((runs, cpu))
}

pub fn cpu_since(before: Option<CpuSnapshot>) -> Option<CpuShare> {
    Some(CpuSnapshot::take()?.since(&before?))
}
