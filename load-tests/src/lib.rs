//! streamserve-load: load generators and benchmarks for streamserve.
//!
//! - [`rest`]: closed-loop load on the Open Inference Protocol REST endpoint, and
//!   [`open_loop`]: the same requests at a constant rate (open loop);
//! - [`bench`](mod@bench): the REST micro-benchmark, server with and without dynamic batching against
//!   the in-process ONNX Runtime ceiling;
//! - [`streams`]: WebSocket speech-stream load, and [`streams_bench`]: how many real-time
//!   `silero_vad` streams one server carries, batching across streams on and off;
//!   [`keywords_bench`]: the same for keyword-spotting streams (`hey_marvin`, a pipeline of
//!   three models and a gate), with server CPU per stream-second and the pipeline's compute
//!   limit;
//!   [`stream_steps`]: the options, step-up loop and `/metrics` deltas both benches share;
//! - [`overload`]: open-loop overload of `mlp` with its fallback, shedding and degraded mode,
//!   door admission static vs adaptive, in-process or pinned to its own CPU;
//!   [`timeline`]: the same server through an overload step and injected worker faults,
//!   over time;
//! - [`fleet`]: deployments across several `streamserve` processes that follow a model
//!   registry (moto's S3 server), behind haproxy, under load; [`streams_fleet`]: real-time
//!   speech streams that resume on any instance through a rolling restart of such a fleet;
//! - [`protocols`]: REST JSON, REST binary, gRPC unary and gRPC streaming clients of the same
//!   `mlp` request against one server, side by side, with their ratios; [`monitoring`]: the
//!   model monitor's cost, two servers with output monitoring off and on, side by side;
//!   [`jobs_bench`]: online load with and without a batch job running on one server, and the
//!   job's rows/s against its idle ceiling;
//! - [`efficiency`]: server CPU per REST request and per stream chunk, the server in its own
//!   process, beside the model's own cost per row at the batch sizes the run produced;
//! - [`peer`]: the FastAPI + uvicorn + onnxruntime peer `bench` compares with; [`pinning`]:
//!   a server child on one CPU and this load generator on another;
//! - [`plots`]: SVG plots of every benchmark's results; [`scenario`]: runs described in
//!   TOML files; [`capacity`]: instances needed for a target from the measured curves;
//!   [`prometheus`]: the server's own figures from `/metrics`.
//!
//! Everything here talks to loopback addresses only ([`rest::check_loopback`]) and is bounded
//! in time: every run has a fixed duration, every request a timeout.

pub mod bench;
pub mod capacity;
pub mod efficiency;
pub mod fleet;
pub mod jobs_bench;
pub mod keywords_bench;
pub mod manifest;
pub mod monitoring;
pub mod open_loop;
pub mod overload;
pub mod peer;
pub mod pinning;
pub mod plots;
pub mod prometheus;
pub mod protocols;
pub mod report;
pub mod rest;
pub mod scenario;
pub mod stream_steps;
pub mod streams;
pub mod streams_bench;
pub mod streams_fleet;
pub mod sysinfo;
pub mod timeline;

/// The `mlp` model's interface: FP32 `features [batch, 256]` in, `[batch, 16]` out.
pub mod mlp {
    pub const INPUT: &str = "features";
    pub const FEATURES: usize = 256;
    pub const OUTPUT_WIDTH: usize = 16;
}

/// The one latency histogram of every load loop: microseconds, from 1 µs to 10 minutes.
pub mod hist {
    use std::time::Duration;

    pub type Histogram = hdrhistogram::Histogram<u64>;
    pub const MAX_US: u64 = 600_000_000;

    /// 3 significant digits for run totals; 2 for the thousands of bins of a timeline (a plot
    /// needs no more).
    pub fn new(digits: u8) -> Histogram {
        Histogram::new_with_bounds(1, MAX_US, digits).expect("histogram bounds are valid")
    }

    /// A duration as a histogram value, clamped to the bounds.
    pub fn micros(d: Duration) -> u64 {
        d.as_micros().clamp(1, MAX_US as u128) as u64
    }

    /// The value at quantile `q` (0..=1) in milliseconds; 0 without data.
    pub fn ms(h: &Histogram, q: f64) -> f64 {
        if h.is_empty() {
            return 0.0;
        }
        h.value_at_quantile(q) as f64 / 1000.0
    }
}

/// The command-line options the benchmarks share; each benchmark's options are its
/// subcommand's arguments (`loadgen` flattens them), so that flags, scenario files and the
/// library take the same values.
pub mod cli {
    use clap::builder::TypedValueParser as _;
    use std::path::PathBuf;
    use std::time::Duration;

    /// Whole seconds from `lo` to `hi` on the command line, as a duration.
    pub fn secs(lo: u64, hi: u64) -> impl clap::builder::TypedValueParser<Value = Duration> {
        clap::value_parser!(u64)
            .range(lo..=hi)
            .map(Duration::from_secs)
    }

    /// A count from `lo` to `hi` on the command line.
    pub fn count(lo: u64, hi: usize) -> impl clap::builder::TypedValueParser<Value = usize> {
        clap::value_parser!(u64)
            .range(lo..=hi as u64)
            .map(|n| n as usize)
    }

    /// The client runtime's size, for every subcommand that sends load.
    #[derive(Clone, Debug, clap::Args)]
    pub struct Threads {
        /// Client runtime worker threads [default: number of CPUs].
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=64))]
        pub client_threads: Option<u64>,
    }

    impl Threads {
        pub fn get(&self) -> usize {
            let cpus = || std::thread::available_parallelism().map_or(2, |n| n.get());
            self.client_threads.map_or_else(cpus, |n| n as usize)
        }
    }

    /// What every benchmark that starts its own server takes: where its files go, how long it
    /// waits for a quiet machine, the client runtime; and the command line for its report.
    #[derive(Clone, Debug, clap::Args)]
    pub struct BenchCommon {
        /// Output directory [default: load-tests/results/<UTC date>-<scenario>/, the scenario
        /// being rest-mlp, streams-vad, streams-keyword, overload-mlp, timeline-mlp, fleet-mlp, streams-fleet or
        /// protocols-mlp].
        #[arg(long)]
        pub out: Option<PathBuf>,
        /// Longest wait, before each measurement, for other processes to leave the CPU alone.
        #[arg(long = "quiet-wait-secs", value_name = "QUIET_WAIT_SECS", default_value = "180", value_parser = secs(0, 3600))]
        pub quiet_wait: Duration,
        #[command(flatten)]
        pub threads: Threads,
        /// The command line, as it goes in the report.
        #[arg(skip = command_line())]
        pub command: String,
    }

    /// The `streamserve` binary of a benchmark that starts `streamserve serve` itself.
    #[derive(Clone, Debug, clap::Args)]
    pub struct ServerBin {
        /// The `streamserve` binary [default: the one beside loadgen, target/release/streamserve].
        #[arg(long)]
        pub server_bin: Option<PathBuf>,
    }

    impl ServerBin {
        /// The binary given, or the one beside this executable; an error where it does not
        /// exist.
        pub fn get(&self) -> anyhow::Result<PathBuf> {
            crate::overload::server::server_bin(self.server_bin.as_deref())
        }
    }

    /// The command line as given, for the report; `cargo run` shows up as the built binary.
    pub fn command_line() -> String {
        let args: Vec<String> = std::env::args().skip(1).collect();
        format!(
            "cargo run --release -p streamserve-load -- {}",
            args.join(" ")
        )
    }

    /// A subcommand's options with every default, as an empty command line gives them.
    pub fn defaults<T: clap::Args + clap::FromArgMatches>() -> T {
        let command = T::augment_args(clap::Command::new("defaults"));
        T::from_arg_matches(&command.get_matches_from(["defaults"])).expect("defaults parse")
    }
}

/// Deterministic pseudo-random numbers (SplitMix64), so that every run sends the same data.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A float uniformly drawn from [-1, 1), with 24 bits of randomness.
    pub fn next_f32(&mut self) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        unit * 2.0 - 1.0
    }

    pub fn f32_vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next_f32()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_is_deterministic_and_in_range() {
        let a = SplitMix64::new(7).f32_vec(1000);
        let b = SplitMix64::new(7).f32_vec(1000);
        assert_eq!(a, b);
        assert!(a.iter().all(|v| (-1.0..1.0).contains(v)));
        assert_ne!(a, SplitMix64::new(8).f32_vec(1000));
    }
}
