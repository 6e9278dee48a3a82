//! The timeline benchmark (`loadgen timeline`): one open-loop run against `mlp`, with its
//! admission control armed as in [`crate::overload`] and hang detection on, through a
//! sequence of events: an overload step (the offered rate jumps past the capacity, then
//! drops back), every replica panicking at once, and one replica hanging. Outcomes are
//! recorded in time bins by *scheduled* send time, and the server's own view (healthy
//! replicas, queue depth, restarts) is scraped from `/metrics` alongside, so the report shows
//! latency, degraded answers and refusals moving across each event and how long the server
//! takes to settle back.
//!
//! This file holds the options, the plan of events and the entry point; `measure` runs the
//! load, `analysis` reads the time bins and `report` writes the results and the report.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::builder::TypedValueParser as _;
use serde_json::Value;

use crate::bench::{start_server_with, stop_server, TempModelDir};
use crate::open_loop::{self, OpenLoopReport};
use crate::overload::{self, FALLBACK, PRIMARY};

mod analysis;
mod measure;
mod report;
#[cfg(test)]
mod tests;

use measure::run_on;
use report::{render_report, results_json, ReportInput};

/// The token of the admin API of the in-process server (loopback only, this run only).
const ADMIN_TOKEN: &str = "loadgen-timeline";
/// The plot written beside `report.md`.
pub const PLOT_FILE: &str = "timeline.svg";
/// How often the server's `/metrics` are scraped.
const SCRAPE_EVERY: Duration = Duration::from_millis(200);

/// Seconds on the command line, as a duration: `Some`, or `None` for a negative number
/// ("never").
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct At(pub Option<Duration>);

fn at(s: &str) -> Result<At, String> {
    let v: f64 = s.parse().map_err(|e| format!("{s}: {e}"))?;
    if v < 0.0 {
        return Ok(At(None));
    }
    Duration::try_from_secs_f64(v)
        .map(|d| At(Some(d)))
        .map_err(|_| format!("{s} is not a valid number of seconds"))
}

fn seconds(s: &str) -> Result<Duration, String> {
    at(s)?
        .0
        .ok_or_else(|| format!("{s} s: must not be negative"))
}

/// `loadgen timeline`'s options.
#[derive(Clone, Debug, clap::Args)]
pub struct TimelineOptions {
    /// Length of the open-loop run, s; every event must fall within it.
    #[arg(long = "duration-secs", value_name = "DURATION_SECS", default_value = "33", value_parser = seconds)]
    pub duration: Duration,
    /// Base rate in requests/s [default: --base-share x the measured capacity].
    #[arg(long)]
    pub rate: Option<f64>,
    /// Base rate as a share of the measured capacity.
    #[arg(long, default_value_t = 0.5)]
    pub base_share: f64,
    /// When the overload step starts, s (negative: no step).
    #[arg(long, default_value = "8", allow_negative_numbers = true, value_parser = at)]
    pub step_at: At,
    /// How long the overload step lasts, s.
    #[arg(long = "step-secs", value_name = "STEP_SECS", default_value = "6", value_parser = seconds)]
    pub step_for: Duration,
    /// The rate during the step, as a share of the capacity (or of --rate).
    #[arg(long, default_value_t = 2.0)]
    pub step_share: f64,
    /// When every replica of mlp panics in its next batch, s (negative: never).
    #[arg(long, default_value = "22", allow_negative_numbers = true, value_parser = at)]
    pub panic_at: At,
    /// When replica 0 of mlp hangs in its next batch, s (negative: never).
    #[arg(long, default_value = "27", allow_negative_numbers = true, value_parser = at)]
    pub hang_at: At,
    /// How long the hang lasts, ms.
    #[arg(long, default_value_t = 3000)]
    pub hang_ms: u64,
    /// The manifest's hang_timeout_ms for mlp: when the router gives up on a hung worker.
    #[arg(long, default_value_t = 500)]
    pub hang_timeout_ms: u64,
    /// Width of the time bins, ms.
    #[arg(long = "bin-ms", value_name = "BIN_MS", default_value = "100",
          value_parser = clap::value_parser!(u64).range(10..=10_000).map(Duration::from_millis))]
    pub bin: Duration,
    #[command(flatten)]
    pub mlp: overload::MlpOpenLoop,
}

impl Default for TimelineOptions {
    fn default() -> Self {
        crate::cli::defaults()
    }
}

/// One planned event of the run.
#[derive(Clone, Debug, PartialEq)]
enum Plan {
    Rate { share: f64 },
    PanicAll,
    Hang { replica: usize, ms: u64 },
}

impl TimelineOptions {
    /// The events in time order, checked against the run's length and each other.
    fn plan(&self) -> anyhow::Result<Vec<(Duration, Plan)>> {
        let share_ok = |s: f64| s.is_finite() && s > 0.0 && s <= 20.0;
        if !share_ok(self.base_share) || !share_ok(self.step_share) {
            bail!("base and step shares must be more than 0 and at most 20");
        }
        if self.duration > Duration::from_secs(600) || self.duration < Duration::from_secs(1) {
            bail!("the run must last 1 to 600 s");
        }
        if self.hang_timeout_ms == 0 || self.hang_ms <= self.hang_timeout_ms {
            bail!("the hang must last longer than hang_timeout_ms (> 0) for the router to see it");
        }
        let mut plan = Vec::new();
        if let Some(at) = self.step_at.0 {
            plan.push((
                at,
                Plan::Rate {
                    share: self.step_share,
                },
            ));
            // Back to the base rate: with a given rate, that rate itself (shares are of it).
            let base = if self.rate.is_some() {
                1.0
            } else {
                self.base_share
            };
            plan.push((at + self.step_for, Plan::Rate { share: base }));
        }
        if let Some(at) = self.panic_at.0 {
            plan.push((at, Plan::PanicAll));
        }
        if let Some(at) = self.hang_at.0 {
            plan.push((
                at,
                Plan::Hang {
                    replica: 0,
                    ms: self.hang_ms,
                },
            ));
        }
        plan.sort_by_key(|(at, _)| *at);
        if plan.iter().any(|(at, _)| *at >= self.duration) {
            bail!("every event must fall within the run's {:?}", self.duration);
        }
        if plan.windows(2).any(|w| w[0].0 == w[1].0) {
            bail!("two events at the same time; space them out");
        }
        Ok(plan)
    }
}

/// What happened at one event, as seen from the load generator.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EventRecord {
    pub label: String,
    pub planned_s: f64,
    /// When it took effect: the rate change in the schedule, or the admin request's send.
    pub at_s: f64,
    /// For faults: the admin API's status and body.
    pub answer: Option<String>,
}

/// The server's own view at one scrape of `/metrics`.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct ServerSample {
    pub t_s: f64,
    pub healthy_replicas: f64,
    pub queue_depth: f64,
    pub restarts: f64,
    pub overloaded: f64,
}

pub struct TimelineOutcome {
    pub dir: PathBuf,
    pub report: String,
    pub results: Value,
    pub open_loop: OpenLoopReport,
}

/// Runs the capacity measurement (unless a rate is given) and the timeline, writes the report.
pub fn run(options: &TimelineOptions) -> anyhow::Result<TimelineOutcome> {
    let plan = options.plan()?;
    if let Some(rate) = options.rate {
        if !(rate.is_finite() && rate > 0.0 && rate <= open_loop::MAX_RATE) {
            bail!(
                "rate must be more than 0 and at most {}",
                open_loop::MAX_RATE
            );
        }
    }
    let start = crate::report::Start::now(options.mlp.common.out.as_deref(), "timeline-mlp");
    crate::sysinfo::raise_nofile_limit(2 * options.mlp.max_in_flight as u64 + 1024);
    let (manifest_text, _) = overload::overload_manifest_with(
        vec![(
            "hang_timeout_ms",
            toml::Value::Integer(options.hang_timeout_ms as i64),
        )],
        "mlp with slo_ms, fallback, a short queue and hang detection; its fallback mlp_small",
    )?;
    let models = TempModelDir::create("timeline", &manifest_text)?;
    let config = streamserve::config::Config {
        models: models.path.clone(),
        admin_token: Some(ADMIN_TOKEN.into()),
        ..Default::default()
    };
    let running = start_server_with(config, PRIMARY, 64)?;
    if let Err(e) = overload::wait_ready(&running, FALLBACK) {
        stop_server(&running);
        return Err(e);
    }
    let base = format!("http://{}", running.addr);
    eprintln!("[timeline] streamserve on {base}");
    let runtime = crate::sysinfo::client_runtime(options.mlp.common.threads.get())?;
    let result = run_on(options, &plan, &base, &runtime);
    stop_server(&running);
    drop(models);
    drop(runtime);
    let measured = result?;

    let input = ReportInput {
        start: &start,
        elapsed: start.at.elapsed(),
        options,
        manifest: &manifest_text,
        measured: &measured,
    };
    let results = results_json(&input);
    let report = render_report(&input, &results)?;
    let plot = Some((PLOT_FILE, crate::plots::timeline as _));
    let saved = crate::report::save_run(start.dir, "timeline", report, &results, plot)?;
    Ok(TimelineOutcome {
        dir: saved.dir,
        report: saved.report,
        results,
        open_loop: measured.report,
    })
}
