//! The timeline benchmark (`loadgen timeline`): one open-loop run against `mlp`, with its
//! admission control armed as in [`crate::overload`] and hang detection on, through a
//! sequence of events: an overload step (the offered rate jumps past the capacity, then
//! drops back), every replica panicking at once, and one replica hanging. Outcomes are
//! recorded in time bins by *scheduled* send time, and the server's own view (healthy
//! replicas, queue depth, restarts) is scraped from `/metrics` alongside, so the report shows
//! latency, degraded answers and refusals moving across each event and how long the server
//! takes to settle back.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::builder::TypedValueParser as _;
use serde_json::{json, Value};

use crate::bench::{cpu_since, start_server_with, stop_server, TempModelDir};
use crate::open_loop::{self, OpenLoopOptions, OpenLoopReport, TimelineBin};
use crate::overload::{self, FALLBACK, MAX_QUEUE, PRIMARY, SLO_MS};
use crate::prometheus;
use crate::rest::{self, RestOptions};
use crate::sysinfo::{wait_for_quiet, CpuShare, CpuSnapshot, MachineInfo};

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
    /// The command line, as it goes in the report.
    #[arg(skip = crate::cli::command_line())]
    pub command: String,
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

fn plan_label(plan: &Plan, reference_rate: f64) -> String {
    match plan {
        Plan::Rate { share } => format!("rate {:.0}/s ({share}×)", reference_rate * share),
        Plan::PanicAll => "every replica panics".into(),
        Plan::Hang { replica, ms } => format!("replica {replica} hangs {ms} ms"),
    }
}

async fn scrape(client: &reqwest::Client, base: &str, t0: Instant) -> Option<ServerSample> {
    let text = prometheus::fetch(client, base).await?;
    let label = format!("model=\"{PRIMARY}\"");
    let m = |name: &str| prometheus::sum(&text, name, &label, None);
    Some(ServerSample {
        t_s: t0.elapsed().as_secs_f64(),
        healthy_replicas: m("streamserve_workers"),
        queue_depth: m("streamserve_queue_depth"),
        restarts: m("streamserve_worker_restarts_total"),
        overloaded: m("streamserve_overloaded"),
    })
}

async fn inject(client: &reqwest::Client, base: &str, plan: &Plan) -> String {
    let body = match plan {
        Plan::PanicAll => json!({ "fault": { "kind": "panic" } }),
        Plan::Hang { replica, ms } => {
            json!({ "fault": { "kind": "hang", "ms": ms }, "replica": replica })
        }
        Plan::Rate { .. } => return String::new(),
    };
    match client
        .post(format!("{base}/admin/models/{PRIMARY}/faults"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&body)
        .send()
        .await
    {
        Ok(r) => {
            let status = r.status().as_u16();
            format!("{status} {}", r.text().await.unwrap_or_default().trim())
        }
        Err(e) => format!("admin request failed: {e}"),
    }
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
        machine: &start.machine,
        started_at: &start.started_at,
        elapsed: start.at.elapsed(),
        options,
        manifest: &manifest_text,
        measured: &measured,
    };
    let results = results_json(&input);
    let report = render_report(&input, &results)?;
    let plot = (PLOT_FILE, crate::plots::timeline as _);
    let saved = crate::report::save_run(start.dir, "timeline", report, &results, plot)?;
    Ok(TimelineOutcome {
        dir: saved.dir,
        report: saved.report,
        results,
        open_loop: measured.report,
    })
}

/// Everything measured in one run.
struct Measured {
    /// The closed-loop capacity run (req/s, p99 ms), when the rate was not given.
    capacity: Option<(f64, f64)>,
    /// What the shares are multiples of: the capacity, or the given rate.
    reference_rate: f64,
    base_rate: f64,
    events: Vec<EventRecord>,
    server: Vec<ServerSample>,
    report: OpenLoopReport,
    cpu: Option<CpuShare>,
}

fn run_on(
    options: &TimelineOptions,
    plan: &[(Duration, Plan)],
    base: &str,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<Measured> {
    let closed = RestOptions {
        url: base.to_string(),
        model: PRIMARY.into(),
        concurrency: options.mlp.capacity_concurrency,
        duration: options.mlp.capacity_duration,
        warmup: overload::CAPACITY_WARMUP,
        rows: 1,
        binary: options.mlp.binary,
        quiet: false,
        request_timeout: Duration::from_secs(30),
    };
    let (capacity, reference_rate, base_rate) = match options.rate {
        Some(rate) => (None, rate, rate),
        None => {
            wait_for_quiet(0.15, options.mlp.common.quiet_wait);
            eprintln!(
                "[timeline] capacity: closed loop, concurrency {} ...",
                options.mlp.capacity_concurrency
            );
            let report = runtime.block_on(rest::run(&closed))?;
            eprint!("{}", report.summary());
            let rps = report.requests_per_sec();
            if rps <= 0.0 {
                bail!(
                    "the capacity run had no successful request:\n{}",
                    report.summary()
                );
            }
            (
                Some((rps, report.latency_ms(0.99))),
                rps,
                rps * options.base_share,
            )
        }
    };
    std::thread::sleep(Duration::from_secs(1));
    wait_for_quiet(0.15, options.mlp.common.quiet_wait);

    let steps: Vec<(Duration, f64)> = plan
        .iter()
        .filter_map(|(at, p)| match p {
            Plan::Rate { share } => Some((*at, reference_rate * share)),
            _ => None,
        })
        .collect();
    let open = OpenLoopOptions {
        rest: RestOptions {
            duration: options.duration,
            warmup: Duration::ZERO,
            ..closed
        },
        rate: base_rate,
        steps,
        timeline_bin: Some(options.bin),
        max_in_flight: options.mlp.max_in_flight,
        label: "timeline".into(),
    };
    open.check()?;
    let client = crate::sysinfo::metrics_client()?;

    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let scraper = {
        let (client, base, stop) = (client.clone(), base.to_string(), stop.clone());
        let bound = options.duration + Duration::from_secs(60);
        runtime.spawn(async move {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(SCRAPE_EVERY);
            while !stop.load(Ordering::Relaxed) && t0.elapsed() < bound {
                tick.tick().await;
                samples.extend(scrape(&client, &base, t0).await);
            }
            samples
        })
    };
    let faults: Vec<_> = plan
        .iter()
        .filter(|(_, p)| !matches!(p, Plan::Rate { .. }))
        .map(|(at, p)| {
            let (client, base, p, at) = (client.clone(), base.to_string(), p.clone(), *at);
            runtime.spawn(async move {
                tokio::time::sleep_until((t0 + at).into()).await;
                let sent = Instant::now();
                let answer = inject(&client, &base, &p).await;
                (at, p, sent, answer)
            })
        })
        .collect();
    eprintln!(
        "[timeline] open loop at {base_rate:.0}/s for {:.0} s, events: {}",
        options.duration.as_secs_f64(),
        plan.iter()
            .map(|(at, p)| format!(
                "{:.1} s {}",
                at.as_secs_f64(),
                plan_label(p, reference_rate)
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let before = CpuSnapshot::take();
    let report = runtime.block_on(open_loop::run(&open));
    let cpu = cpu_since(before);
    stop.store(true, Ordering::Relaxed);
    let report = report?;
    let mut server = runtime.block_on(scraper).unwrap_or_default();
    // One more look once everything is answered: the state the run left the server in.
    server.extend(runtime.block_on(scrape(&client, base, t0)));
    let offset = report.started.saturating_duration_since(t0).as_secs_f64();
    for s in &mut server {
        s.t_s -= offset;
    }
    let mut events: Vec<EventRecord> = plan
        .iter()
        .filter(|(_, p)| matches!(p, Plan::Rate { .. }))
        .map(|(at, p)| EventRecord {
            label: plan_label(p, reference_rate),
            planned_s: at.as_secs_f64(),
            at_s: at.as_secs_f64(),
            answer: None,
        })
        .collect();
    for task in faults {
        let (at, p, sent, answer) = runtime
            .block_on(task)
            .context("a fault injection task failed")?;
        events.push(EventRecord {
            label: plan_label(&p, reference_rate),
            planned_s: at.as_secs_f64(),
            at_s: sent.saturating_duration_since(report.started).as_secs_f64(),
            answer: Some(answer),
        });
    }
    events.sort_by(|a, b| a.planned_s.total_cmp(&b.planned_s));
    Ok(Measured {
        capacity,
        reference_rate,
        base_rate,
        events,
        server,
        report,
        cpu,
    })
}

struct ReportInput<'a> {
    machine: &'a MachineInfo,
    started_at: &'a str,
    elapsed: Duration,
    options: &'a TimelineOptions,
    manifest: &'a str,
    measured: &'a Measured,
}

/// Totals over a span of bins: its length in seconds, and its bins added up as one.
fn span<'a>(
    bins: impl IntoIterator<Item = &'a TimelineBin>,
    width: Duration,
) -> (f64, TimelineBin) {
    let mut total = TimelineBin::new(Duration::ZERO);
    let mut seconds = 0.0;
    for b in bins {
        seconds += width.as_secs_f64();
        total.add(b);
    }
    (seconds, total)
}

/// Share of a bin's scheduled requests that did not get a 200 from `mlp` itself.
fn disturbed_share(b: &TimelineBin) -> f64 {
    if b.scheduled == 0 {
        0.0
    } else {
        (b.ok_degraded + b.shed + b.failed + b.not_sent) as f64 / b.scheduled as f64
    }
}

/// A bin's (or a span's) counts and latency in results.json.
fn bin_json(b: &TimelineBin) -> Value {
    json!({
        "scheduled": b.scheduled, "sent": b.sent, "not_sent": b.not_sent,
        "ok_primary": b.ok_primary, "ok_degraded": b.ok_degraded,
        "shed": b.shed, "failed": b.failed,
        "p50_ms": opt(b.latency_ms(0.5)), "p99_ms": opt(b.latency_ms(0.99)),
        "max_ms": opt(b.latency_ms(1.0)),
    })
}

fn opt(v: Option<f64>) -> Value {
    v.map_or(Value::Null, |v| json!(v))
}

/// The phases between events: (label, start, end).
fn phases(events: &[EventRecord], duration: f64) -> Vec<(String, f64, f64)> {
    let mut out = Vec::new();
    let mut start = 0.0;
    let mut label = "base rate".to_string();
    for e in events {
        out.push((label, start, e.planned_s));
        start = e.planned_s;
        label = format!("after: {}", e.label);
    }
    out.push((label, start, duration));
    out
}

/// How long after each event the bins stay off the baseline (latency or service): the time
/// from the event to the first bin from which 1 s of bins (or all bins until the next event)
/// stay on it. The baseline is the base-rate phase after its first second.
fn settle_times(
    bins: &[TimelineBin],
    width: Duration,
    events: &[EventRecord],
    duration: f64,
) -> (Option<(f64, f64)>, Vec<Value>) {
    let w = width.as_secs_f64();
    let first_event = events.first().map_or(duration, |e| e.planned_s);
    let (_, baseline) = span(
        bins.iter().filter(|b| {
            let t = b.start.as_secs_f64();
            t >= 1.0 && t + w <= first_event
        }),
        width,
    );
    let Some(base_p99) = baseline.latency_ms(0.99) else {
        return (None, Vec::new());
    };
    let base_share = disturbed_share(&baseline);
    let latency_limit = (3.0 * base_p99).max(base_p99 + 10.0);
    let share_limit = base_share + 0.02;
    let bad = |b: &TimelineBin| {
        b.scheduled > 0
            && (b.latency_ms(0.99).is_some_and(|p| p > latency_limit)
                || disturbed_share(b) > share_limit)
    };
    let need = ((1.0 / w).ceil() as usize).max(1);
    let settles = events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            // From the bin the event fell in (its requests may be the ones it delayed) to the
            // last bin that ends before the next event took effect.
            let until = events.get(i + 1).map_or(duration, |n| n.at_s);
            let window: Vec<&TimelineBin> = bins
                .iter()
                .filter(|b| {
                    let end = b.start.as_secs_f64() + w;
                    end > e.at_s && end <= until + 1e-9
                })
                .collect();
            // Settled from the first bin that starts a run of good bins lasting `need` (1 s),
            // or lasting until the next event when that comes sooner.
            let (mut streak, mut streak_start) = (0usize, None);
            for b in &window {
                if bad(b) {
                    (streak, streak_start) = (0, None);
                } else {
                    streak += 1;
                    streak_start.get_or_insert(b.start.as_secs_f64());
                    if streak >= need {
                        break;
                    }
                }
            }
            let settled_at = streak_start.filter(|_| streak > 0);
            let worst = |q: f64| {
                window
                    .iter()
                    .filter_map(|b| b.latency_ms(q))
                    .fold(0.0, f64::max)
            };
            json!({
                "event": e.label,
                "at_s": e.at_s,
                "off_baseline_s": settled_at.map(|t| (t - e.at_s).max(0.0)),
                "settled_before_next": settled_at.is_some(),
                "worst_bin_p99_ms": worst(0.99),
                "slowest_ms": worst(1.0),
            })
        })
        .collect();
    (Some((latency_limit, share_limit)), settles)
}

fn results_json(input: &ReportInput<'_>) -> Value {
    let m = input.measured;
    let r = &m.report;
    let width = input.options.bin;
    let duration = input.options.duration.as_secs_f64();
    let bins: Vec<Value> = r
        .timeline
        .iter()
        .map(|b| crate::report::context(&bin_json(b), &[json!({ "t_s": b.start.as_secs_f64() })]))
        .collect();
    let phases: Vec<Value> = phases(&m.events, duration)
        .into_iter()
        .map(|(label, start, end)| {
            let inside = r.timeline.iter().filter(|b| {
                let t = b.start.as_secs_f64();
                t >= start - 1e-9 && t < end - 1e-9
            });
            let (seconds, s) = span(inside, width);
            let more = json!({
                "label": label, "start_s": start, "end_s": end,
                "offered_per_s": s.scheduled as f64 / seconds.max(1e-9),
                "goodput_per_s": (s.ok_primary + s.ok_degraded) as f64 / seconds.max(1e-9),
            });
            crate::report::context(&bin_json(&s), &[more])
        })
        .collect();
    let (limits, settles) = settle_times(&r.timeline, width, &m.events, duration);
    json!({
        "kind": "timeline",
        "started_at": input.started_at,
        "command": input.options.command,
        "machine": input.machine,
        "manifest": input.manifest,
        "capacity": m.capacity.map(|(rps, p99)| json!({
            "concurrency": input.options.mlp.capacity_concurrency,
            "requests_per_s": rps, "p99_ms": p99,
        })),
        "reference_rate_per_s": m.reference_rate,
        "base_rate_per_s": m.base_rate,
        "bin_s": width.as_secs_f64(),
        "duration_s": duration,
        "hang_timeout_ms": input.options.hang_timeout_ms,
        "rust_backtrace": std::env::var("RUST_BACKTRACE").ok(),
        "events": m.events,
        "totals": {
            "scheduled": r.scheduled, "sent": r.sent, "not_sent": r.not_sent,
            "ok_primary": r.ok_primary, "ok_degraded": r.ok_degraded,
            "statuses": r.statuses, "transport": r.transport, "invalid": r.invalid,
            "unanswered": r.unanswered, "first_error": r.first_error,
            "max_schedule_lag_ms": r.max_schedule_lag.as_secs_f64() * 1000.0,
            "peak_in_flight": r.peak_in_flight,
        },
        "cpu_cores": m.cpu,
        "baseline_limits": limits.map(|(lat, share)| json!({ "bin_p99_ms": lat, "disturbed_share": share })),
        "settle": settles,
        "phases": phases,
        "bins": bins,
        "server": m.server,
    })
}

/// `report.md` from `templates/timeline.md.j2`: the results JSON and the run's settings.
fn render_report(input: &ReportInput<'_>, results: &Value) -> anyhow::Result<String> {
    let (options, m) = (input.options, input.measured);
    let backtrace = match std::env::var("RUST_BACKTRACE") {
        Ok(v) if v != "0" => format!(
            "`{v}`: each worker panic's backtrace is captured and resolved on a low-priority thread (at most \
             one per minute); resolving it can still slow serving for a few hundred ms (README, Resilience)"
        ),
        Ok(v) => format!("`{v}` (worker panics are logged without a backtrace)"),
        Err(_) => "unset (worker panics are logged without a backtrace)".into(),
    };
    let extra = json!({
        "slo_ms": SLO_MS, "fallback": FALLBACK, "max_queue": MAX_QUEUE, "backtrace": backtrace,
        "capacity_s": options.mlp.capacity_duration.as_secs_f64(), "base_share": options.base_share,
        "binary": options.mlp.binary, "max_in_flight": options.mlp.max_in_flight,
        "scrape_ms": SCRAPE_EVERY.as_secs_f64() * 1000.0, "step": options.step_at.0.is_some(),
        "pool_idle_s": crate::rest::POOL_IDLE_TIMEOUT.as_secs(), "plot": PLOT_FILE,
        "restarts": m.server.last().map_or(0.0, |s| s.restarts),
    });
    let header = crate::report::header(
        "streamserve timeline: `mlp` through an overload step and worker faults",
        input.elapsed,
        &[],
        true,
    );
    crate::report::render(
        "timeline",
        &crate::report::context(results, &[header, extra]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_plan_is_in_time_order() {
        let plan = TimelineOptions::default().plan().unwrap();
        let kinds: Vec<&Plan> = plan.iter().map(|(_, p)| p).collect();
        assert_eq!(
            kinds,
            vec![
                &Plan::Rate { share: 2.0 },
                &Plan::Rate { share: 0.5 },
                &Plan::PanicAll,
                &Plan::Hang {
                    replica: 0,
                    ms: 3000
                }
            ]
        );
        assert!(plan.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[test]
    fn with_a_given_rate_the_step_returns_to_it() {
        let options = TimelineOptions {
            rate: Some(300.0),
            ..TimelineOptions::default()
        };
        let plan = options.plan().unwrap();
        assert_eq!(plan[0].1, Plan::Rate { share: 2.0 });
        assert_eq!(plan[1].1, Plan::Rate { share: 1.0 });
    }

    #[test]
    fn bad_plans_are_refused() {
        let bad: [fn(&mut TimelineOptions); 4] = [
            |o| o.hang_at = At(Some(Duration::from_secs(40))),
            |o| o.panic_at = At(Some(Duration::from_secs(8))),
            |o| o.hang_ms = 100,
            |o| o.step_share = 0.0,
        ];
        for change in bad {
            let mut o = TimelineOptions::default();
            change(&mut o);
            assert!(o.plan().is_err(), "{o:?} was accepted");
        }
    }

    fn bin(t_ms: u64, scheduled: u64, ok: u64, degraded: u64, p99_us: u64) -> TimelineBin {
        let mut h = crate::hist::new(2);
        for _ in 0..ok + degraded {
            h.record(p99_us).unwrap();
        }
        TimelineBin {
            start: Duration::from_millis(t_ms),
            scheduled,
            sent: scheduled,
            not_sent: 0,
            ok_primary: ok,
            ok_degraded: degraded,
            shed: 0,
            failed: 0,
            latency_ok_us: Some(h),
        }
    }

    #[test]
    fn settling_is_the_first_lasting_return_to_baseline() {
        // 0–2 s calm (5 ms); an event at 2.0 s; bins 2.0–2.3 slow, 2.3–2.4 degraded; calm after.
        let mut bins = Vec::new();
        for i in 0..40u64 {
            let t = i * 100;
            bins.push(match t {
                2000..=2200 => bin(t, 10, 10, 0, 200_000),
                2300 => bin(t, 10, 5, 5, 5_000),
                _ => bin(t, 10, 10, 0, 5_000),
            });
        }
        let events = vec![EventRecord {
            label: "x".into(),
            planned_s: 2.0,
            at_s: 2.0,
            answer: None,
        }];
        let (limits, settles) = settle_times(&bins, Duration::from_millis(100), &events, 4.0);
        let (latency, _) = limits.unwrap();
        assert!((latency - 15.0).abs() < 0.5, "{latency}");
        assert_eq!(settles.len(), 1);
        let off = settles[0]["off_baseline_s"].as_f64().unwrap();
        assert!((off - 0.4).abs() < 1e-6, "{off}");
        assert_eq!(settles[0]["settled_before_next"], json!(true));

        // A lone slow bin after a full second on baseline does not move the settling point.
        bins[36] = bin(3600, 10, 10, 0, 200_000);
        let (_, again) = settle_times(&bins, Duration::from_millis(100), &events, 4.0);
        assert_eq!(again[0]["off_baseline_s"], settles[0]["off_baseline_s"]);

        // Off baseline until the end: not settled.
        for b in bins.iter_mut().skip(24) {
            *b = bin(b.start.as_millis() as u64, 10, 0, 10, 5_000);
        }
        let (_, never) = settle_times(&bins, Duration::from_millis(100), &events, 4.0);
        assert_eq!(never[0]["settled_before_next"], json!(false));
        assert_eq!(never[0]["off_baseline_s"], json!(null));
    }
}
