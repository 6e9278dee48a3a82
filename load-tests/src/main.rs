//! `loadgen`: closed-loop REST load against a streamserve on loopback (`loadgen rest`), and
//! the side-by-side REST micro-benchmark that writes a report (`loadgen bench`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use streamserve_load::{bench, rest};

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
    /// Closed-loop REST load on a running server: N connections, each sending its next
    /// inference request as soon as the previous answer is in.
    Rest(RestArgs),
    /// Start streamserve in-process (batching on, then off), load each at several
    /// concurrencies, compare with the in-process ONNX Runtime ceiling, write report.md.
    Bench(BenchArgs),
}

#[derive(Debug, clap::Args)]
struct RestArgs {
    /// Server base URL; loopback IP addresses only.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Model to load; it must have the mlp interface (FP32 features [rows, 256] -> [rows, 16]).
    #[arg(long, default_value = "mlp")]
    model: String,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=rest::MAX_CONCURRENCY as u64))]
    concurrency: u64,
    /// Measured seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    duration_secs: u64,
    /// Unmeasured warm-up seconds before the measured period.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=600))]
    warmup_secs: u64,
    /// Rows per request (input shape [rows, 256]); at most the model's max_batch_size.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=rest::MAX_ROWS as u64))]
    rows: u64,
    /// Send the input as binary tensor data (Inference-Header-Content-Length) and ask for
    /// binary outputs, instead of JSON arrays.
    #[arg(long)]
    binary: bool,
    /// Seconds to wait for one answer before counting it as a transport error.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=600))]
    timeout_secs: u64,
    /// Client runtime worker threads [default: number of CPUs].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=64))]
    client_threads: Option<u64>,
    /// No progress lines on stderr.
    #[arg(long)]
    quiet: bool,
}

#[derive(Debug, clap::Args)]
struct BenchArgs {
    /// Measured seconds per concurrency level and server (2 servers x 4 levels).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
    duration_secs: u64,
    /// Warm-up seconds before each measured period.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=60))]
    warmup_secs: u64,
    /// Measured seconds of each in-process ceiling measurement.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=60))]
    ceiling_secs: u64,
    /// Concurrency levels, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1u64, 8, 32, 128],
          value_parser = clap::value_parser!(u64).range(1..=rest::MAX_CONCURRENCY as u64))]
    concurrency: Vec<u64>,
    /// Use the binary tensor data extension instead of JSON data.
    #[arg(long)]
    binary: bool,
    /// Output directory [default: load-tests/results/<UTC date>-rest-mlp/].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Client runtime worker threads [default: number of CPUs].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=64))]
    client_threads: Option<u64>,
}

fn nproc() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// The command line as given, for the report; `cargo run` shows up as the built binary.
fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    format!(
        "cargo run --release -p streamserve-load -- {}",
        args.join(" ")
    )
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Rest(args) => run_rest(args),
        Command::Bench(args) => run_bench(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("loadgen: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run_rest(args: RestArgs) -> anyhow::Result<ExitCode> {
    let options = rest::RestOptions {
        url: args.url,
        model: args.model,
        concurrency: args.concurrency as usize,
        duration: Duration::from_secs(args.duration_secs),
        warmup: Duration::from_secs(args.warmup_secs),
        rows: args.rows as usize,
        binary: args.binary,
        progress: !args.quiet,
        request_timeout: Duration::from_secs(args.timeout_secs),
    };
    // Refuse a bad target before starting anything.
    options.endpoint()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.map_or_else(nproc, |n| n as usize))
        .thread_name("loadgen")
        .enable_all()
        .build()?;
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

fn run_bench(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let options = bench::BenchOptions {
        duration: Duration::from_secs(args.duration_secs),
        warmup: Duration::from_secs(args.warmup_secs),
        ceiling_duration: Duration::from_secs(args.ceiling_secs),
        concurrencies: args.concurrency.iter().map(|&c| c as usize).collect(),
        binary: args.binary,
        out: args.out,
        client_threads: args.client_threads.map_or_else(nproc, |n| n as usize),
        command: command_line(),
        ..bench::BenchOptions::default()
    };
    let outcome = bench::run(&options)?;
    println!("{}", outcome.report);
    eprintln!(
        "[bench] wrote {}/report.md and results.json",
        outcome.dir.display()
    );
    Ok(ExitCode::SUCCESS)
}
