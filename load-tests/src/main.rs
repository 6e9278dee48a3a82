//! `loadgen`: REST load against a streamserve on loopback (`loadgen rest`), the side-by-side
//! REST micro-benchmark (`loadgen bench`), REST against gRPC on one server (`loadgen
//! protocols`), WebSocket speech-stream load (`loadgen streams`),
//! the stream capacity benchmarks (`loadgen streams-bench`, `loadgen keywords-bench`), the
//! overload and timeline benchmarks, the fleet drill (`loadgen fleet`) and the streams fleet drill (`loadgen
//! streams-fleet`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use streamserve_load::{
    bench, capacity, efficiency, fleet, jobs_bench, keywords_bench, monitoring, open_loop,
    overload, plots, protocols, report, rest, scenario, streams, streams_bench, streams_fleet,
    sysinfo, timeline,
};

#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    version,
    about = "Load generator and REST benchmark for streamserve (loopback only)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// REST load on a running server. Closed loop by default: N connections, each sending its
    /// next inference request as soon as the previous answer is in. With --rate: open loop,
    /// R requests/s on a fixed schedule whatever the answers.
    Rest(RestArgs),
    /// Start streamserve in-process (batching on, then off) and the FastAPI peer, load each at
    /// several concurrencies, compare with the in-process ONNX Runtime ceiling, write report.md.
    Bench(bench::BenchOptions),
    /// Start streamserve in-process on mlp (replicas 2, batching on) and load it from four
    /// clients of the same request in turn at each concurrency: REST JSON, REST binary, gRPC
    /// ModelInfer and gRPC ModelStreamInfer; write report.md with their throughput, latency,
    /// CPU and ratios to REST JSON. About 2 minutes.
    Protocols(protocols::ProtocolsOptions),
    /// Start two in-process streamservers on mlp (replicas 2, batching on), one with output
    /// monitoring off and one on, and load each in turn with REST JSON at each concurrency;
    /// write report.md with their throughput, latency, CPU and the on/off ratios. About 2.5 min.
    Monitoring(monitoring::MonitoringOptions),
    /// Start streamserve in-process on mlp (replicas 2, batching on, jobs API on), load it with
    /// REST JSON at each concurrency alone and with a batch job running, and run the job alone;
    /// write report.md with online req/s and p99 with a job ÷ alone and the job's rows/s ÷ its
    /// idle ceiling. About 2 min.
    Jobs(jobs_bench::JobsOptions),
    /// WebSocket speech streams on a running server: N concurrent streams, each sending a WAV
    /// (looped) at real-time pace and timing every chunk's result.
    Streams(StreamsArgs),
    /// Start streamserve in-process on silero_vad (cross-stream batching on, then off), step
    /// the number of real-time streams until p99 chunk latency misses the target, compare
    /// with the in-process compute ceiling, write report.md.
    StreamsBench(streams_bench::StreamsBenchOptions),
    /// Measure the keyword pipeline's models in-process (µs per row at batch 1/16/64, CPU per
    /// stream-second), then start `streamserve serve` on hey_marvin and its stages (batching
    /// on, then off) and step real-time keyword streams ("gate": false) until p99 chunk
    /// latency misses the target, plus one gated step; write report.md with streams, server
    /// CPU per stream-second and the compute limit side by side. Needs the release streamserve
    /// binary. About 4-5 minutes on 2 cores.
    KeywordsBench(keywords_bench::KeywordsBenchOptions),
    /// Start `streamserve serve` as a child process on mlp and silero_vad; load it with REST
    /// JSON and binary (1-row requests) at each concurrency, then real-time streams; write
    /// report.md with server CPU µs per request / per chunk from its pid's CPU time, beside the
    /// model's own µs per row in-process at the batch size the run produced, and streams per
    /// server core. One client thread unless told. Needs the release streamserve binary.
    Efficiency(efficiency::EfficiencyOptions),
    /// Start streamserve on mlp with slo_ms, a fallback and a short queue, once per door
    /// admission mode (static, then adaptive); measure its capacity, offer 1x, 2x, 3x, 5x of it
    /// open loop, write report.md with the modes side by side. In-process, or with --pin the
    /// streamserve binary on one CPU and the load generator on another.
    Overload(overload::OverloadOptions),
    /// Start streamserve in-process on mlp (slo_ms, fallback, hang detection, admin API),
    /// measure its capacity, then one open-loop run through an overload step, every replica
    /// panicking and one replica hanging; write report.md with latency over time.
    Timeline(timeline::TimelineOptions),
    /// Start moto's S3 server with a model registry in it, 3 `streamserve serve --registry`
    /// instances and haproxy in front of them; under REST load through haproxy, deploy `mlp`
    /// blue/green, as a canary, rolling, and as a slow canary that must be rolled back; write
    /// report.md with the time to converge, failed requests and traffic share per version.
    /// Needs `bash scripts/setup.sh --fleet` (haproxy, moto) and the release streamserve binary.
    Fleet(fleet::FleetOptions),
    /// Start N `streamserve serve` instances sharing stream token keys behind haproxy, run M
    /// real-time speech streams through it that resume on any instance, and restart every
    /// instance in turn (SIGTERM, handover, start again) meanwhile; compare every stream's
    /// results with a solo run; write report.md with resumes, audio sent again, the latency
    /// at the switch, checkpoint bytes and CPU. Needs haproxy and the release streamserve
    /// binary. About 75 s.
    StreamsFleet(streams_fleet::StreamsFleetOptions),
    /// The whole suite in one command: the bench, protocols, monitoring, jobs, streams-bench, keywords-bench, efficiency, overload (unpinned
    /// and pinned), timeline, fleet and streams-fleet scenarios (load-tests/scenarios/), one
    /// after the other, then the capacity plan from their results. About 29 minutes on 2 cores.
    Suite {
        /// Leave out the FastAPI peer in the bench.
        #[arg(long)]
        no_peer: bool,
    },
    /// Run a scenario file (load-tests/scenarios/*.toml): the subcommand it names with the
    /// options it gives.
    Run {
        /// The scenario file.
        scenario: PathBuf,
        /// Output directory, replacing the scenario's own (if any).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Only check the scenario and print the command it stands for.
        #[arg(long)]
        dry_run: bool,
    },
    /// Capacity plan from the newest bench (rest-mlp) and streams-bench (streams-vad) results:
    /// the best throughput per instance within the p99 SLO, instances needed with 30% headroom.
    Capacity {
        /// Requests/s to carry.
        #[arg(long)]
        target_rps: Option<f64>,
        /// p99 latency every level counted must stay within, ms.
        #[arg(long, default_value_t = 50.0)]
        slo_ms: f64,
        /// Concurrent real-time streams to carry.
        #[arg(long)]
        streams: Option<u64>,
        /// Results directory to search [default: load-tests/results/].
        #[arg(long)]
        results: Option<PathBuf>,
    },
    /// Redraw the SVG plot of a saved `bench`, `protocols`, `monitoring`, `jobs`,
    /// `streams-bench`, `overload`, `timeline`, `fleet` or `streams-fleet` run from its
    /// results.json.
    Plot {
        /// A results directory (holding results.json).
        dir: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct StreamsArgs {
    #[command(flatten)]
    options: streams::StreamOptions,
    /// Mono 16-bit WAV at 16 or 8 kHz [default: tests/audio/two_phrases_16k.wav].
    #[arg(long)]
    wav: Option<PathBuf>,
    #[command(flatten)]
    threads: streamserve_load::cli::Threads,
}

#[derive(Debug, clap::Args)]
struct RestArgs {
    #[command(flatten)]
    options: rest::RestOptions,
    /// Open loop: send this many requests per second on a fixed schedule, whatever the
    /// answers; latency runs from each request's scheduled send time.
    #[arg(long)]
    rate: Option<f64>,
    /// Open loop: requests in flight at most; one due beyond that is not sent (and counted).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=open_loop::MAX_IN_FLIGHT as u64))]
    max_in_flight: u64,
    #[command(flatten)]
    threads: streamserve_load::cli::Threads,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = dispatch(cli.command);
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("loadgen: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// The command a scenario file stands for (with `--no-peer` added to a bench when asked), and
/// its arguments for the log line.
fn scenario_command(
    path: &std::path::Path,
    out: Option<&std::path::Path>,
    no_peer: bool,
) -> anyhow::Result<(Vec<String>, Command)> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let mut args = scenario::to_args(&text, out)
        .map_err(|e| e.context(format!("scenario {}", path.display())))?;
    if no_peer && args[0] == "bench" {
        args.push("--no-peer".into());
    }
    let cli = Cli::try_parse_from(std::iter::once("loadgen".to_string()).chain(args.clone()))
        .map_err(|e| anyhow::anyhow!("scenario {}: {e}", path.display()))?;
    Ok((args, cli.command))
}

fn run_scenario(
    path: &std::path::Path,
    out: Option<&std::path::Path>,
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    let (args, command) = scenario_command(path, out, false)?;
    eprintln!("[run] {}: loadgen {}", path.display(), args.join(" "));
    if dry_run {
        return Ok(ExitCode::SUCCESS);
    }
    dispatch(command)
}

fn run_suite(no_peer: bool) -> anyhow::Result<ExitCode> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut failed = Vec::new();
    for name in scenario::SUITE {
        let (args, command) = scenario_command(&dir.join(name), None, no_peer)?;
        eprintln!("[suite] {name}: loadgen {}", args.join(" "));
        match dispatch(command) {
            Ok(code) if code == ExitCode::SUCCESS => {}
            Ok(_) => failed.push(format!("{name}: finished with failures")),
            Err(e) => {
                eprintln!("[suite] {name} failed: {e:#}");
                failed.push(format!("{name}: {e:#}"));
            }
        }
    }
    run_capacity(None, 50.0, None, None)?;
    if failed.is_empty() {
        eprintln!("[suite] done: every report is under load-tests/results/");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("[suite] done, with failures:\n  {}", failed.join("\n  "));
        Ok(ExitCode::from(1))
    }
}

fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Rest(args) => run_rest(args),
        Command::Bench(o) => finished("bench", &bench::run(&o)?),
        Command::Protocols(o) => finished("protocols", &protocols::run(&o)?),
        Command::Monitoring(o) => finished("monitoring", &monitoring::run(&o)?),
        Command::Jobs(o) => finished("jobs", &jobs_bench::run(&o)?),
        Command::Streams(args) => run_streams(args),
        Command::StreamsBench(o) => finished("streams-bench", &streams_bench::run(&o)?),
        Command::KeywordsBench(o) => finished("keywords-bench", &keywords_bench::run(&o)?),
        Command::Efficiency(o) => finished("efficiency", &efficiency::run(&o)?),
        Command::Overload(o) => finished("overload", &overload::run(&o)?),
        Command::Timeline(args) => run_timeline(args),
        Command::Fleet(o) => run_fleet(&o),
        Command::StreamsFleet(o) => run_streams_fleet(&o),
        Command::Plot { dir } => run_plot(&dir),
        Command::Capacity {
            target_rps,
            slo_ms,
            streams,
            results,
        } => run_capacity(target_rps, slo_ms, streams, results),
        Command::Run {
            scenario,
            out,
            dry_run,
        } => run_scenario(&scenario, out.as_deref(), dry_run),
        Command::Suite { no_peer } => run_suite(no_peer),
    }
}

fn run_rest(args: RestArgs) -> anyhow::Result<ExitCode> {
    let options = args.options;
    // Refuse a bad target before starting anything.
    options.endpoint()?;
    let runtime = sysinfo::client_runtime(args.threads.get())?;
    if let Some(rate) = args.rate {
        let open = open_loop::OpenLoopOptions {
            rest: options,
            rate,
            steps: Vec::new(),
            timeline_bin: None,
            max_in_flight: args.max_in_flight as usize,
            label: format!("loadgen rate={rate}"),
        };
        open.check()?;
        sysinfo::raise_nofile_limit(args.max_in_flight + 256);
        let report = runtime.block_on(open_loop::run(&open))?;
        print!("{}", report.summary());
        // Refusals (429/503) are the server's answer to overload, not failures of the run;
        // anything unanswered, any transport error or invalid answer is.
        let failed =
            report.unanswered > 0 || report.transport > 0 || report.invalid > 0 || report.ok() == 0;
        return Ok(if failed {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        });
    }
    let report = runtime.block_on(rest::run(&options))?;
    print!("{}", report.summary());
    // Non-zero when anything failed, so that scripts can use it as a check.
    Ok(
        if report.ok > 0 && report.error_count() == 0 && report.warmup_errors == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        },
    )
}

/// Prints a benchmark's report, and where it went.
fn finished(tag: &str, outcome: &streamserve_load::report::Outcome) -> anyhow::Result<ExitCode> {
    println!("{}", outcome.report);
    eprintln!(
        "[{tag}] wrote {}/report.md and results.json",
        outcome.dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn run_streams(args: StreamsArgs) -> anyhow::Result<ExitCode> {
    let mut options = args.options;
    options.audio = streams::load_audio(args.wav.as_deref())?;
    options.label = format!("streams N={}", options.streams);
    let n = options.streams as u64;
    // Refuse a bad target before starting anything.
    options.endpoint()?;
    let limit = sysinfo::raise_nofile_limit(n + 256);
    if limit < n + 64 {
        anyhow::bail!(
            "{n} streams need about {} open files, the limit is {limit}: raise it with `ulimit -n`",
            n + 64
        );
    }
    let runtime = sysinfo::client_runtime(args.threads.get())?;
    let report = runtime.block_on(streams::run(&options))?;
    print!("{}", report.summary());
    Ok(if report.started > 0 && report.error_count() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn run_timeline(options: timeline::TimelineOptions) -> anyhow::Result<ExitCode> {
    let outcome = timeline::run(&options)?;
    println!("{}", outcome.report);
    eprintln!(
        "[timeline] wrote {}/report.md, results.json and {}",
        outcome.dir.display(),
        timeline::PLOT_FILE
    );
    Ok(if outcome.open_loop.unanswered == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn run_fleet(options: &fleet::FleetOptions) -> anyhow::Result<ExitCode> {
    let outcome = fleet::run(options)?;
    println!("{}", outcome.report);
    eprintln!(
        "[fleet] wrote {}/report.md, results.json and {}",
        outcome.dir.display(),
        fleet::PLOT_FILE
    );
    if !outcome.passed {
        eprintln!("[fleet] a request failed, or a drill did not end as it should: see the report");
    }
    Ok(if outcome.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn run_streams_fleet(options: &streams_fleet::StreamsFleetOptions) -> anyhow::Result<ExitCode> {
    let (outcome, passed) = streams_fleet::run(options)?;
    println!("{}", outcome.report);
    eprintln!(
        "[streams-fleet] wrote {}/report.md, results.json and {}",
        outcome.dir.display(),
        streams_fleet::PLOT_FILE
    );
    if !passed {
        eprintln!("[streams-fleet] a stream did not finish, or its results differ from the solo run: see the report");
    }
    Ok(if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn run_plot(dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    let json = plots::read_results(dir)?;
    let kind = json.get("kind").and_then(|k| k.as_str());
    let out = if matches!(kind, Some("protocols" | "monitoring" | "jobs")) {
        let file = match kind {
            Some("monitoring") => monitoring::PLOT_FILE,
            Some("jobs") => jobs_bench::PLOT_FILE,
            _ => protocols::PLOT_FILE,
        };
        let out = dir.join(file);
        plots::protocols(&json, &out)?;
        out
    } else if let Some(k @ ("keywords_bench" | "efficiency")) = kind {
        anyhow::bail!("a {k} run has no plot: its report.md holds the tables");
    } else if kind == Some("streams_fleet") {
        let out = dir.join(streams_fleet::PLOT_FILE);
        plots::streams_fleet(&json, &out)?;
        out
    } else if kind == Some("fleet") {
        let out = dir.join(fleet::PLOT_FILE);
        plots::fleet(&json, &out)?;
        out
    } else if kind == Some("timeline") {
        let out = dir.join(timeline::PLOT_FILE);
        plots::timeline(&json, &out)?;
        out
    } else if json.get("target_p99_ms").is_some() {
        let out = dir.join(streams_bench::PLOT_FILE);
        plots::streams_latency(&json, &out)?;
        out
    } else if json.get("servers").is_some() {
        let out = dir.join(bench::PLOT_FILE);
        plots::bench_latency_throughput(&json, &out)?;
        out
    } else if json.get("variants").is_some() || json.get("levels").is_some() {
        let out = dir.join(overload::PLOT_FILE);
        plots::overload_levels(&json, &out)?;
        out
    } else {
        anyhow::bail!(
            "{}/results.json is not from a bench, protocols, monitoring, jobs, streams-bench, overload, timeline, fleet or streams-fleet run",
            dir.display()
        );
    };
    eprintln!("[plot] wrote {}", out.display());
    Ok(ExitCode::SUCCESS)
}

fn run_capacity(
    target_rps: Option<f64>,
    slo_ms: f64,
    streams: Option<u64>,
    results: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let dir = results.unwrap_or_else(report::results_dir);
    let load = |suffix: &str| -> anyhow::Result<Option<(serde_json::Value, String)>> {
        match capacity::latest(&dir, suffix) {
            Some(d) => Ok(Some((
                plots::read_results(&d)?,
                d.join("results.json").display().to_string(),
            ))),
            None => Ok(None),
        }
    };
    let bench_results = load("-rest-mlp")?;
    let stream_results = load("-streams-vad")?;
    if bench_results.is_none() && stream_results.is_none() {
        anyhow::bail!(
            "no *-rest-mlp or *-streams-vad results under {}",
            dir.display()
        );
    }
    print!(
        "{}",
        capacity::plan(
            bench_results.as_ref().map(|(v, s)| (v, s.as_str())),
            stream_results.as_ref().map(|(v, s)| (v, s.as_str())),
            target_rps,
            slo_ms,
            streams,
        )
    );
    Ok(ExitCode::SUCCESS)
}
