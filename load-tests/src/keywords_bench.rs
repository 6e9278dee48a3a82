//! `loadgen keywords-bench`: how many real-time keyword-spotting streams (`hey_marvin`, a
//! pipeline of `ww_melspec` → `ww_embedding` → the head, gated by `silero_vad`; see
//! docs/streaming.md) one server carries, and what each costs, in one run:
//!
//! 1. the pipeline's compute limit in-process (no server): each model alone in a
//!    `ModelSession` (intra_threads 1) on random inputs at batch 1, 16 and 64, µs per row, and
//!    from them the CPU one real-time stream needs per second (12.5 steps of each stage, plus
//!    31.25 Silero steps when gated);
//! 2. `streamserve serve` as a child process (so that its CPU is counted apart from this load
//!    generator's) on a model directory of the four bundled entries, batching on (as bundled)
//!    then off (`max_batch_size = 1` on all four); against each, streams of
//!    `tests/audio/keyword_positive.wav` with `"gate": false` (every stage on all the audio),
//!    N stepped up until a step misses the p99 target ([`crate::streams`]); on the batching-on
//!    server, one more step with the gate on;
//! 3. per step, the server's CPU time (`/proc/<pid>/stat`) over the measured window: server
//!    CPU per stream-second; and its `/metrics`: rows per model call of each stage;
//! 4. `report.md` (`templates/keywords_bench.md.j2`) and `results.json`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;

use crate::bench::TempModelDir;
use crate::cli::{secs, BenchCommon, ServerBin};
use crate::fleet::procs::{Instance, InstanceSetup};
use crate::fleet::watch::{self, CpuWindow};
use crate::manifest::{self, EntryChange};
use crate::stream_steps::{self, Attempt, StepOptions, Stepping, QUIET_CORES};
use crate::streams::{self, Audio};
use crate::sysinfo::{raise_nofile_limit, wait_for_quiet};

mod compute;
mod results;

pub use compute::{compute_limit, measure_stage, Stage, StageCost, CEILING_BATCHES, STAGES};
use results::results_json;
pub use results::{SetupResults, Step, Window};

/// The keyword spotter (its head) and its gate.
pub const MODEL: &str = "hey_marvin";
pub const GATE: &str = "silero_vad";

/// `tests/audio/keyword_positive.wav`: 16 s of speech, the phrase twice.
pub fn default_wav() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/audio/keyword_positive.wav")
}

/// `loadgen keywords-bench`'s options.
#[derive(Clone, Debug, clap::Args)]
#[command(mut_arg("steps", |a| a.default_values(["10", "25", "50", "75", "100", "125", "150", "200", "250", "300"])))]
#[command(mut_arg("ramp", |a| a.default_value("2")), mut_arg("duration", |a| a.default_value("10")))]
pub struct KeywordsBenchOptions {
    #[command(flatten)]
    pub stepping: StepOptions,
    /// Measured seconds of each in-process measurement (4 models x 3 batch sizes).
    #[arg(long = "ceiling-secs", value_name = "CEILING_SECS", default_value = "2", value_parser = secs(1, 60))]
    pub ceiling_duration: Duration,
    /// Leave out the gated step (batching on, the gate on, at up to half the streams batching on
    /// carried).
    #[arg(long)]
    pub no_gated: bool,
    #[command(flatten)]
    pub server: ServerBin,
    #[command(flatten)]
    pub common: BenchCommon,
    /// The bundled manifest, whose four entries are copied.
    #[arg(skip = manifest::bundled())]
    pub manifest: PathBuf,
    #[arg(skip = default_wav())]
    pub wav: PathBuf,
}

/// One configuration: the server's batching, whether the streams keep the gate, and whether
/// their audio is mostly quiet (the file, then [`QUIET_SECS`] of background noise).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Setup {
    pub label: &'static str,
    pub batching: bool,
    pub gate: bool,
    pub quiet: bool,
}

pub const ON: Setup = Setup {
    label: "batching on",
    batching: true,
    gate: false,
    quiet: false,
};
pub const OFF: Setup = Setup {
    label: "batching off",
    batching: false,
    gate: false,
    quiet: false,
};
pub const GATED: Setup = Setup {
    label: "batching on, gate on",
    batching: true,
    gate: true,
    quiet: false,
};
/// What a wake-word listener mostly hears: a room with nobody speaking.
pub const GATED_QUIET: Setup = Setup {
    label: "batching on, gate on, 3/4 quiet audio",
    batching: true,
    gate: true,
    quiet: true,
};
/// Seconds of background noise after the file in the quiet configuration: three times the
/// file's 16 s.
pub const QUIET_SECS: usize = 48;

/// The file followed by [`QUIET_SECS`] of white noise at about -65 dBFS rms.
fn mostly_quiet(path: &Path) -> anyhow::Result<Audio> {
    let mut samples: Vec<i16> = hound::WavReader::open(path)?
        .samples::<i16>()
        .collect::<Result<_, _>>()?;
    let mut rng = crate::SplitMix64::new(0x5eed);
    samples.extend((0..QUIET_SECS * 16_000).map(|_| (rng.next_u64() % 65) as i16 - 32));
    Audio::from_samples(&samples, 16_000)
}

/// The `models.toml` of a directory serving the keyword pipeline: the bundled entries of the
/// four models (`file` made absolute), the gate's `fallback` and `slo_ms` removed (overload must
/// show as latency), and with batching off `max_batch_size = 1` on all four. Also returns the
/// model files, in the order of [`STAGES`].
pub fn pipeline_manifest(bundled: &Path, setup: &Setup) -> anyhow::Result<(String, Vec<PathBuf>)> {
    let models: Vec<(&str, EntryChange)> = STAGES
        .iter()
        .map(|s| {
            let mut change = EntryChange::default();
            if s.model == GATE {
                change.remove = vec!["fallback", "slo_ms"];
            }
            if !setup.batching {
                change.set.push(("max_batch_size", toml::Value::Integer(1)));
            }
            (s.model, change)
        })
        .collect();
    manifest::from_bundled(
        bundled,
        &format!("{MODEL} and its stages, {}", setup.label),
        &models,
    )
}

/// Steps `setup`'s streams up `steps` against `server` until one misses the target (a gated
/// step is judged on errors and late senders only: the gate holds steps back by design).
fn step_up(
    options: &KeywordsBenchOptions,
    setup: &Setup,
    steps: &[usize],
    server: &Instance,
    audio: &Arc<Audio>,
    nofile: u64,
) -> anyhow::Result<SetupResults> {
    let runtime = crate::sysinfo::client_runtime(options.common.threads.get())?;
    let client = crate::sysinfo::metrics_client()?;
    let base = format!("http://{}", server.addr);
    let attempt = |n| {
        let mut load = options.stepping.load(&base, audio, n, setup.label);
        load.model = MODEL.into();
        load.no_gate = !setup.gate;
        // The server's CPU and `/metrics` at the measured window's two ends, so that neither
        // the ramp nor the streams' ending counts.
        let at = (server.pid(), base.as_str());
        let run = watch::measured(streams::run(&load), (load.ramp, load.duration), at, &client);
        let (report, (m0, before, _), (m1, after, _)) = runtime.block_on(run)?;
        let texts = [&before, &after].map(|t| t.as_deref().unwrap_or(""));
        let window = CpuWindow::between(m0, m1).map(|cpu| Window::new(cpu, n, texts));
        let pass = match setup.gate {
            false => report.meets(options.stepping.target),
            true => {
                report.chunks_measured > 0 && report.error_count() == 0 && report.late_streams == 0
            }
        };
        let line = format!(
            "p50 {:.1} ms, p99 {:.1} ms, {} errors, {} late, server {:.1} CPU-ms per stream-s",
            report.latency_ms(0.5),
            report.latency_ms(0.99),
            report.error_count(),
            report.late_streams,
            window.as_ref().map_or(0.0, |w| w.server_ms_per_stream_s),
        );
        let others = window.as_ref().map_or(0.0, |w| w.cpu.other_cores);
        Ok(Attempt {
            report,
            window,
            pass,
            others,
            figures: line,
        })
    };
    let plan = Stepping {
        tag: "keywords-bench",
        label: setup.label,
        quiet_wait: options.common.quiet_wait,
        nofile,
        fds_per_stream: 1, // the server's sockets are another process's
    };
    stream_steps::step_up(setup.clone(), &plan, steps, attempt, || ())
}

/// `streamserve serve` on a fresh directory of the pipeline's entries, every model ready.
fn start_server(
    bin: &Path,
    options: &KeywordsBenchOptions,
    setup: &Setup,
) -> anyhow::Result<(Instance, TempModelDir)> {
    let (text, _) = pipeline_manifest(&options.manifest, setup)?;
    let models = TempModelDir::create(&setup.label.replace([' ', ','], "-"), &text)?;
    let instance_setup = InstanceSetup {
        bin,
        models: &models.path,
        follow: None,
        port: 0,
        extra: &[],
        cpu: None,
    };
    let instance = Instance::start(
        &instance_setup,
        "keywords-bench",
        models.path.join("server.log"),
    )?;
    let names = STAGES.map(|s| s.model);
    instance.wait_ready(&names, &crate::sysinfo::client_runtime(1)?)?;
    eprintln!(
        "[keywords-bench] streamserve ({}) on {}, pid {}",
        setup.label,
        instance.addr,
        instance.pid()
    );
    Ok((instance, models))
}

/// Runs the whole benchmark and writes its report.
pub fn run(options: &KeywordsBenchOptions) -> anyhow::Result<crate::report::Outcome> {
    let steps = &options.stepping.steps;
    if steps.is_empty() || steps.len() > 32 || steps.windows(2).any(|w| w[0] >= w[1]) {
        bail!("give 1 to 32 steps, ascending");
    }
    let bin = options.server.get()?;
    let start = crate::report::Start::now(options.common.out.as_deref(), "streams-keyword");
    let biggest = steps.iter().copied().max().unwrap_or(0) as u64;
    let nofile = raise_nofile_limit(biggest + 1024);
    let audio = Arc::new(Audio::load(&options.wav)?);
    let quiet = Arc::new(mostly_quiet(&options.wav)?);
    let (_, files) = pipeline_manifest(&options.manifest, &ON)?;

    let mut costs = Vec::new();
    for (stage, file) in STAGES.iter().zip(&files) {
        for batch in CEILING_BATCHES {
            wait_for_quiet(QUIET_CORES, options.common.quiet_wait);
            let c = measure_stage(stage, file, batch, options.ceiling_duration)?;
            eprintln!("[keywords-bench] in-process {} batch {batch}: {:.1} µs per row, {:.2} CPU-ms per stream-s", c.model, c.us_per_row, c.ms_per_stream_s);
            costs.push(c);
        }
    }

    let mut results = Vec::new();
    for setup in [ON, OFF] {
        let (server, models) = start_server(&bin, options, &setup)?;
        let stepped = step_up(options, &setup, steps, &server, &audio, nofile)?;
        let gated_n = results::gated_streams(&stepped, steps);
        results.push(stepped);
        if setup.batching && !options.no_gated {
            for (gated, audio) in [(&GATED, &audio), (&GATED_QUIET, &quiet)] {
                results.push(step_up(options, gated, &[gated_n], &server, audio, nofile)?);
            }
        }
        drop(server);
        drop(models);
    }

    let json = results_json(options, &start, &files, &audio, &costs, &results);
    let (elapsed, nproc) = (start.at.elapsed(), start.machine.nproc);
    let report = results::render(&json, options, elapsed, (&bin, nproc), nofile)?;
    crate::report::save_run(start.dir, "keywords-bench", report, &json, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manifest_holds_the_pipeline() {
        let options = crate::cli::defaults::<KeywordsBenchOptions>();
        let stepping = &options.stepping;
        let defaults = (stepping.steps[9], stepping.ramp, stepping.duration);
        assert_eq!(
            defaults,
            (300, Duration::from_secs(2), Duration::from_secs(10))
        );
        let (text, files) = pipeline_manifest(&options.manifest, &OFF).unwrap();
        assert_eq!(files.len(), 4);
        assert!(files.iter().all(|f| f.is_absolute() && f.is_file()));
        let parsed: toml::Table = toml::from_str(&text).unwrap();
        let models = parsed["models"].as_array().unwrap();
        let names: Vec<&str> = models.iter().filter_map(|m| m["name"].as_str()).collect();
        assert_eq!(
            names,
            ["ww_melspec", "ww_embedding", "hey_marvin", "silero_vad"]
        );
        assert!(models
            .iter()
            .all(|m| m["max_batch_size"].as_integer() == Some(1)));
        assert!(models[2]["stream"]["gate"].is_table());
        assert!(models[3].get("fallback").is_none() && models[3].get("slo_ms").is_none());
        let (on, _) = pipeline_manifest(&options.manifest, &ON).unwrap();
        let on: toml::Table = toml::from_str(&on).unwrap();
        assert!(on["models"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["max_batch_size"].as_integer() > Some(1)));
    }
}
