//! What the stream-capacity benches ([`crate::streams_bench`], [`crate::keywords_bench`]) share:
//! their stepping options, the step-up loop (N real-time streams stepped up until a step misses
//! the target, a failure on a contended machine repeated once) and its results; with
//! [`crate::efficiency`] also the quiet and contended thresholds, `/metrics` counter deltas and
//! ratios.

use std::sync::Arc;
use std::time::Duration;

use clap::builder::TypedValueParser as _;

use crate::cli::{count, secs};
use crate::prometheus;
use crate::streams::{self, Audio, ResultsMode, StreamOptions, StreamReport};
use crate::sysinfo::wait_for_quiet;
pub use crate::sysinfo::QUIET_CORES;

/// Before each measurement, wait until other processes use less than [`QUIET_CORES`] cores,
/// and count a measurement during which they used more than this many as contended (the
/// benches repeat such a step once if it failed; `efficiency` flags it).
pub const CONTENDED_CORES: f64 = 0.25;

/// The stepping options of both benches. The defaults are `streams-bench`'s; `keywords-bench`
/// sets its own with `mut_arg`.
#[derive(Clone, Debug, clap::Args)]
pub struct StepOptions {
    /// Numbers of concurrent streams to try, ascending, comma-separated; stepping stops at the
    /// first step that misses the target.
    #[arg(long, value_delimiter = ',',
          default_values_t = [50usize, 100, 150, 200, 250, 300, 400, 500, 750, 1000, 1250, 1500, 2000, 2500, 3000, 4000],
          value_parser = count(1, streams::MAX_STREAMS))]
    pub steps: Vec<usize>,
    /// Seconds over which each step's streams open.
    #[arg(long = "ramp-secs", value_name = "RAMP_SECS", default_value = "3", value_parser = secs(0, 60))]
    pub ramp: Duration,
    /// Measured seconds per step.
    #[arg(long = "duration-secs", value_name = "DURATION_SECS", default_value = "12", value_parser = secs(1, 300))]
    pub duration: Duration,
    /// The p99 chunk latency a step must stay under, ms.
    #[arg(long = "target-ms", value_name = "TARGET_MS", default_value = "100",
          value_parser = clap::value_parser!(u64).range(1..=10000).map(Duration::from_millis))]
    pub target: Duration,
    /// Milliseconds of audio per binary frame.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub frame_ms: u32,
}

impl StepOptions {
    /// The streams run of step `n` of the configuration `label`: every result timed, a sender
    /// late past the target, progress lines on.
    pub fn load(&self, base: &str, audio: &Arc<Audio>, n: usize, label: &str) -> StreamOptions {
        let mut load = StreamOptions::new(base, audio.clone());
        load.streams = n;
        load.ramp = self.ramp;
        load.duration = self.duration;
        load.frame_ms = self.frame_ms;
        load.results = ResultsMode::All;
        load.late_threshold = self.target;
        load.quiet = false;
        load.label = format!("{label} N={n}");
        load
    }
}

/// One step: N streams against one server, and what the bench measured besides over its
/// window (`M`: the measured window, or the whole step).
#[derive(Clone, Debug)]
pub struct Step<M> {
    pub report: StreamReport,
    pub window: M,
    pub pass: bool,
    /// This step failed while other processes took CPU, and was run again (the next step in
    /// the list is its repeat, which counts instead).
    pub repeated: bool,
}

/// The steps against one server configuration (`setup`), and why the stepping stopped.
#[derive(Clone, Debug)]
pub struct Stepped<C, M> {
    pub setup: C,
    pub steps: Vec<Step<M>>,
    pub stopped: String,
}

impl<C, M> Stepped<C, M> {
    /// The step with the most streams that passed before the first failing one.
    pub fn best(&self) -> Option<&Step<M>> {
        self.steps
            .iter()
            .filter(|s| !s.repeated)
            .take_while(|s| s.pass)
            .last()
    }

    /// The streams of [`Stepped::best`].
    pub fn capacity(&self) -> Option<usize> {
        self.best().map(|s| s.report.streams)
    }
}

/// One attempt at a step.
pub struct Attempt<M> {
    pub report: StreamReport,
    /// What the bench measured besides.
    pub window: M,
    pub pass: bool,
    /// The cores other processes took meanwhile.
    pub others: f64,
    /// The figures of its progress line.
    pub figures: String,
}

/// How a bench steps: its names in the progress lines (`[tag]   label N=…`), how long to wait
/// for a quiet machine, and the open files it may use.
pub struct Stepping<'a> {
    pub tag: &'a str,
    pub label: &'a str,
    pub quiet_wait: Duration,
    /// The process's open-file limit...
    pub nofile: u64,
    /// ...and the descriptors each stream takes of it.
    pub fds_per_stream: usize,
}

/// Steps `steps` up against `setup` until one misses the target, or needs more open files
/// than the limit allows. Each attempt waits for a quiet machine, then runs `attempt(n)`;
/// `settle` lets the server let go of the streams before each next attempt or step.
pub fn step_up<C, M>(
    setup: C,
    stepping: &Stepping,
    steps: &[usize],
    mut attempt: impl FnMut(usize) -> anyhow::Result<Attempt<M>>,
    mut settle: impl FnMut(),
) -> anyhow::Result<Stepped<C, M>> {
    let Stepping {
        tag,
        label,
        quiet_wait,
        nofile,
        fds_per_stream,
    } = *stepping;
    let mut stepped = Stepped {
        setup,
        steps: Vec::new(),
        stopped: "every step passed".into(),
    };
    for &n in steps {
        let files = fds_per_stream * n + 256;
        if files as u64 > nofile {
            stepped.stopped = format!(
                "{n} streams need about {files} open files; the limit is {nofile} (raise `ulimit -n`)"
            );
            break;
        }
        for tries in 1.. {
            wait_for_quiet(QUIET_CORES, quiet_wait);
            let Attempt {
                report,
                window,
                pass,
                others,
                figures,
            } = attempt(n)?;
            let repeated = !pass && others > CONTENDED_CORES && tries == 1;
            let verdict = match (pass, repeated) {
                (true, _) => "pass",
                (false, true) => "FAIL on a contended machine: repeating",
                (false, false) => "FAIL",
            };
            eprintln!("[{tag}]   {label} N={n}: {figures}, others {others:.2} cores -> {verdict}");
            if report.error_count() > 0 {
                eprint!("{}", report.summary());
            }
            stepped.steps.push(Step {
                report,
                window,
                pass,
                repeated,
            });
            if !repeated {
                break;
            }
            settle();
        }
        if !stepped.steps.last().is_some_and(|s| s.pass) {
            stepped.stopped = format!("N = {n} missed the target");
            break;
        }
        settle();
    }
    Ok(stepped)
}

/// How much the `/metrics` counter `name` of `model` (and `extra`, e.g. a `le` bucket) grew
/// between the two texts; a counter missing from the later text counts as no growth, not as a
/// fall.
pub fn counter_delta(texts: [&str; 2], name: &str, model: &str, extra: Option<&str>) -> f64 {
    let label = format!("model=\"{model}\"");
    let [before, after] = texts.map(|t| prometheus::sum(t, name, &label, extra));
    (after - before).max(0.0)
}

/// `a ÷ b`, where both are figures (finite, `b` above 0); `None` otherwise (nothing measured
/// to divide by).
pub fn ratio(a: f64, b: f64) -> Option<f64> {
    (a.is_finite() && b.is_finite() && b > 0.0).then(|| a / b)
}
