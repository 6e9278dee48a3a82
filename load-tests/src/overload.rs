//! The overload benchmark, in one run: streamserve in-process on `mlp` with its admission
//! control armed (`slo_ms = 50`, `fallback = "mlp_small"`, `max_queue = 256`), its capacity
//! measured in closed loop, then open-loop load at multiples of that capacity. What it shows:
//! whether goodput holds up past capacity, how long admitted requests take, how much load goes
//! to the fallback (degraded) or is refused (429/503), and that every request gets an answer.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::bench::{cpu_since, results_dir, start_server_for, stop_server, TempModelDir};
use crate::manifest::{self, EntryChange};
use crate::open_loop::{self, OpenLoopOptions, OpenLoopReport};
use crate::prometheus;
use crate::rest::{self, RestOptions, RestReport};
use crate::sysinfo::{
    utc_now, wait_for_quiet, CpuShare, CpuSnapshot, MachineInfo, LOADGEN_THREAD_PREFIX,
};

pub const PRIMARY: &str = "mlp";
pub const FALLBACK: &str = "mlp_small";
pub const SLO_MS: i64 = 50;
pub const MAX_QUEUE: i64 = 256;

#[derive(Clone, Debug)]
pub struct OverloadOptions {
    /// Closed-loop concurrency of the capacity measurement.
    pub capacity_concurrency: usize,
    pub capacity_warmup: Duration,
    pub capacity_duration: Duration,
    /// Offered loads, as multiples of the measured capacity.
    pub multipliers: Vec<f64>,
    /// Unmeasured open-loop seconds before each level's measured period.
    pub warmup: Duration,
    pub duration: Duration,
    pub max_in_flight: usize,
    pub binary: bool,
    pub out: Option<PathBuf>,
    pub client_threads: usize,
    pub command: String,
    /// Longest wait for a quiet machine before each measurement.
    pub quiet_wait: Duration,
}

impl Default for OverloadOptions {
    fn default() -> Self {
        OverloadOptions {
            capacity_concurrency: 128,
            capacity_warmup: Duration::from_secs(2),
            capacity_duration: Duration::from_secs(5),
            multipliers: vec![1.0, 2.0, 3.0, 5.0],
            warmup: Duration::from_secs(1),
            duration: Duration::from_secs(8),
            max_in_flight: 2048,
            binary: false,
            out: None,
            client_threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            command: String::new(),
            quiet_wait: Duration::from_secs(180),
        }
    }
}

/// The `models.toml` of the overload server: `mlp` with admission control and its fallback,
/// both from the bundled manifest.
pub fn overload_manifest() -> anyhow::Result<(String, Vec<PathBuf>)> {
    overload_manifest_with(
        Vec::new(),
        "mlp with slo_ms, fallback and a short queue; its fallback mlp_small",
    )
}

/// [`overload_manifest`] with more settings on `mlp`.
pub fn overload_manifest_with(
    extra: Vec<(&'static str, toml::Value)>,
    note: &str,
) -> anyhow::Result<(String, Vec<PathBuf>)> {
    let primary = EntryChange {
        set: vec![
            ("replicas", toml::Value::Integer(2)),
            ("max_batch_size", toml::Value::Integer(64)),
            ("max_queue_delay_ms", toml::Value::Float(0.0)),
            ("slo_ms", toml::Value::Integer(SLO_MS)),
            ("fallback", toml::Value::String(FALLBACK.into())),
            ("max_queue", toml::Value::Integer(MAX_QUEUE)),
        ]
        .into_iter()
        .chain(extra)
        .collect(),
        remove: vec![],
    };
    manifest::from_bundled(
        &manifest::bundled(),
        note,
        &[(PRIMARY, primary), (FALLBACK, EntryChange::default())],
    )
}

/// Server-side counters over one level, from `/metrics`.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct ServerCounters {
    pub shed: f64,
    pub degraded: f64,
}

async fn counters(client: &reqwest::Client, base: &str) -> Option<ServerCounters> {
    let text = prometheus::fetch(client, base).await?;
    let label = format!("model=\"{PRIMARY}\"");
    Some(ServerCounters {
        shed: prometheus::sum(&text, "streamserve_shed_total", &label, None),
        degraded: prometheus::sum(&text, "streamserve_degraded_total", &label, None),
    })
}

#[derive(Clone, Debug)]
pub struct Level {
    pub multiplier: f64,
    pub report: OpenLoopReport,
    pub cpu: Option<CpuShare>,
    /// Server-side counter deltas over the level (warm-up and draining included).
    pub server: Option<ServerCounters>,
}

pub struct OverloadOutcome {
    pub dir: PathBuf,
    pub report: String,
}

pub fn wait_ready(running: &streamserve::server::Running, model: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ready = running
            .registry
            .snapshot()
            .resolve(model, None)
            .is_ok_and(|served| served.health.ready());
        if ready {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{model} is not ready 10 s after the server started");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs the whole benchmark and writes its report.
pub fn run(options: &OverloadOptions) -> anyhow::Result<OverloadOutcome> {
    if options.multipliers.is_empty()
        || options.multipliers.len() > 16
        || options
            .multipliers
            .iter()
            .any(|m| !(m.is_finite() && *m > 0.0 && *m <= 20.0))
    {
        bail!("give 1 to 16 multipliers, each more than 0 and at most 20");
    }
    let started = Instant::now();
    let machine = MachineInfo::collect();
    let (date, started_at) = utc_now();
    let dir = options
        .out
        .clone()
        .unwrap_or_else(|| results_dir().join(format!("{date}-overload-mlp")));
    crate::sysinfo::raise_nofile_limit(2 * options.max_in_flight as u64 + 1024);
    let (manifest_text, _) = overload_manifest()?;
    let models = TempModelDir::create("overload", &manifest_text)?;
    let running = start_server_for(&models.path, PRIMARY, 64)?;
    if let Err(e) = wait_ready(&running, FALLBACK) {
        stop_server(&running);
        return Err(e);
    }
    let base = format!("http://{}", running.addr);
    eprintln!("[overload] streamserve on {base}");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(options.client_threads.max(1))
        .thread_name(LOADGEN_THREAD_PREFIX)
        .enable_all()
        .build()
        .context("cannot start the client runtime")?;
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()?;

    let result = (|| -> anyhow::Result<(RestReport, Option<CpuShare>, Vec<Level>)> {
        wait_for_quiet(0.15, options.quiet_wait);
        eprintln!(
            "[overload] capacity: closed loop, concurrency {} ...",
            options.capacity_concurrency
        );
        let closed = RestOptions {
            url: base.clone(),
            model: PRIMARY.into(),
            concurrency: options.capacity_concurrency,
            duration: options.capacity_duration,
            warmup: options.capacity_warmup,
            rows: 1,
            binary: options.binary,
            progress: true,
            request_timeout: Duration::from_secs(30),
        };
        let before = CpuSnapshot::take();
        let capacity = runtime.block_on(rest::run(&closed))?;
        let capacity_cpu = cpu_since(before);
        eprint!("{}", capacity.summary());
        let rate = capacity.requests_per_sec();
        if rate <= 0.0 {
            bail!(
                "the capacity run had no successful request:\n{}",
                capacity.summary()
            );
        }
        let mut levels = Vec::new();
        for &m in &options.multipliers {
            std::thread::sleep(Duration::from_secs(1));
            wait_for_quiet(0.15, options.quiet_wait);
            let open = OpenLoopOptions {
                rest: RestOptions {
                    duration: options.duration,
                    warmup: options.warmup,
                    request_timeout: Duration::from_secs(30),
                    ..closed.clone()
                },
                rate: rate * m,
                steps: Vec::new(),
                timeline_bin: None,
                max_in_flight: options.max_in_flight,
                label: format!("overload {m}x"),
            };
            let counters_before = runtime.block_on(counters(&client, &base));
            let before = CpuSnapshot::take();
            let report = runtime.block_on(open_loop::run(&open))?;
            let cpu = cpu_since(before);
            let counters_after = runtime.block_on(counters(&client, &base));
            let server = match (counters_before, counters_after) {
                (Some(a), Some(b)) => Some(ServerCounters {
                    shed: b.shed - a.shed,
                    degraded: b.degraded - a.degraded,
                }),
                _ => None,
            };
            eprintln!(
                "[overload]   {m}x = {:.0}/s: goodput {:.0}/s, p99 {:.1} ms, degraded {:.1}%, shed {:.1}%, unanswered {}",
                rate * m,
                report.goodput(),
                report.latency_ms(0.99),
                100.0 * report.share_degraded(),
                100.0 * report.share_shed(),
                report.unanswered
            );
            levels.push(Level {
                multiplier: m,
                report,
                cpu,
                server,
            });
        }
        Ok((capacity, capacity_cpu, levels))
    })();
    stop_server(&running);
    drop(models);
    drop(runtime);
    let (capacity, capacity_cpu, levels) = result?;

    let input = ReportInput {
        machine: &machine,
        started_at: &started_at,
        elapsed: started.elapsed(),
        options,
        manifest: &manifest_text,
        capacity: &capacity,
        capacity_cpu,
        levels: &levels,
    };
    let report = render_report(&input);
    let json = results_json(&input);
    crate::sysinfo::save_run(
        &dir,
        "overload",
        &report,
        &json,
        PLOT_FILE,
        crate::plots::overload_levels,
    )?;
    Ok(OverloadOutcome { dir, report })
}

/// The goodput/latency plot written beside `report.md`.
pub const PLOT_FILE: &str = "overload.svg";

struct ReportInput<'a> {
    machine: &'a MachineInfo,
    started_at: &'a str,
    elapsed: Duration,
    options: &'a OverloadOptions,
    manifest: &'a str,
    capacity: &'a RestReport,
    capacity_cpu: Option<CpuShare>,
    levels: &'a [Level],
}

fn ms(h: &hdrhistogram::Histogram<u64>, q: f64) -> f64 {
    OpenLoopReport::quantile_ms(h, q)
}

fn results_json(input: &ReportInput<'_>) -> serde_json::Value {
    let c = input.capacity;
    serde_json::json!({
        "started_at": input.started_at,
        "command": input.options.command,
        "machine": input.machine,
        "manifest": input.manifest,
        "capacity": {
            "concurrency": c.concurrency,
            "requests_per_s": c.requests_per_sec(),
            "ok": c.ok,
            "degraded": c.server_sums.degraded,
            "errors": c.errors,
            "latency_ms": { "p50": c.latency_ms(0.5), "p99": c.latency_ms(0.99) },
            "mean_batch_rows": c.mean_batch_rows(),
            "cpu_cores": input.capacity_cpu,
        },
        "levels": input.levels.iter().map(|l| {
            let r = &l.report;
            serde_json::json!({
                "multiplier": l.multiplier,
                "offered_per_s": r.rate,
                "measured_s": r.measured.as_secs_f64(),
                "scheduled": r.scheduled, "sent": r.sent, "not_sent": r.not_sent,
                "sent_per_s": r.sent_rate(),
                "ok_primary": r.ok_primary, "ok_degraded": r.ok_degraded,
                "statuses": r.statuses, "transport": r.transport, "invalid": r.invalid,
                "unanswered": r.unanswered,
                "goodput_per_s": r.goodput(),
                "share_degraded": r.share_degraded(), "share_shed": r.share_shed(),
                "latency_ok_ms": {
                    "p50": r.latency_ms(0.5), "p90": r.latency_ms(0.9), "p99": r.latency_ms(0.99),
                    "p99.9": r.latency_ms(0.999), "max": r.latency_ok_us.max() as f64 / 1000.0,
                },
                "latency_primary_ms": { "p50": ms(&r.latency_primary_us, 0.5), "p99": ms(&r.latency_primary_us, 0.99) },
                "latency_refused_ms": { "p50": ms(&r.latency_shed_us, 0.5), "p99": ms(&r.latency_shed_us, 0.99) },
                "max_schedule_lag_ms": r.max_schedule_lag.as_secs_f64() * 1000.0,
                "peak_in_flight": r.peak_in_flight,
                "first_error": r.first_error,
                "cpu_cores": l.cpu,
                "server_counters": l.server,
            })
        }).collect::<Vec<_>>(),
    })
}

fn cpu_cell(cpu: Option<CpuShare>) -> String {
    cpu.map_or("n/a".into(), |c| {
        format!(
            "{:.2} / {:.2} / {:.2} / {:.2}",
            c.own_cores,
            c.loadgen_cores,
            c.server_cores(),
            c.other_cores
        )
    })
}

fn render_report(input: &ReportInput<'_>) -> String {
    let ReportInput {
        machine,
        options,
        capacity,
        levels,
        ..
    } = input;
    let mut md = String::new();
    let w = &mut md;
    crate::sysinfo::write_report_header(
        w,
        "streamserve overload: `mlp` past its capacity, with its fallback and load shedding",
        input.started_at,
        input.elapsed,
        &options.command,
        machine,
    );
    crate::sysinfo::write_software_lines(w);

    let _ = writeln!(w, "## Setup\n");
    let _ = writeln!(
        w,
        "- streamserve in this process on 127.0.0.1, a model directory with `mlp` (replicas 2, max_batch_size 64, \
         max_queue_delay_ms 0, **slo_ms {SLO_MS}**, **fallback mlp_small**, **max_queue {MAX_QUEUE}**) and `mlp_small` \
         (its bundled entry). The router sends a request to `mlp_small` when `mlp`'s predicted queue wait exceeds \
         slo_ms (back below half of it to return), and refuses it with 429 when the queue is full and no fallback \
         can take it. The manifest, as written:\n\n```toml\n{}```\n",
        input.manifest
    );
    let _ = writeln!(
        w,
        "- **Capacity**: closed loop at concurrency {}, 1 row per request, {} tensor data, {:.0} s warm-up then \
         {:.0} s measured: **{:.0} requests/s** (p50 {:.2} ms, p99 {:.2} ms; mean batch {:.1} rows; {} of {} answers \
         degraded; errors {:?}; CPU cores process / loadgen / server / others: {}).",
        capacity.concurrency,
        if options.binary { "binary" } else { "JSON" },
        options.capacity_warmup.as_secs_f64(),
        capacity.measured.as_secs_f64(),
        capacity.requests_per_sec(),
        capacity.latency_ms(0.5),
        capacity.latency_ms(0.99),
        capacity.mean_batch_rows(),
        capacity.server_sums.degraded,
        capacity.ok,
        capacity.errors,
        cpu_cell(input.capacity_cpu)
    );
    let _ = writeln!(
        w,
        "- **Open loop**: requests scheduled at a constant rate (a multiple of the capacity) whatever the answers, \
         {:.0} s warm-up then {:.0} s measured per level, at most {} in flight (a request due beyond that is not \
         sent and is counted). Latency runs from each request's *scheduled* send time (no coordinated omission). \
         Every request scheduled in the measured period is accounted for: an answer by status, a transport error, \
         or not sent; **unanswered** counts the rest and must be 0.",
        options.warmup.as_secs_f64(),
        options.duration.as_secs_f64(),
        options.max_in_flight
    );
    let _ = writeln!(
        w,
        "- The load generator (tokio runtime of {} `loadgen` threads, reqwest) runs **in the same process, on the \
         same {} cores** as the server.\n",
        options.client_threads, machine.nproc
    );

    let _ = writeln!(w, "## Results\n");
    let _ = writeln!(
        w,
        "| offered | offered req/s | sent req/s | goodput (200/s) | goodput ÷ capacity | 200: p50 ms | 200: p99 ms \
         | primary p99 ms | degraded | shed (429/503) | other statuses | transport errors | not sent | unanswered \
         | scheduler max lag ms | CPU cores: process / loadgen / server / others |"
    );
    let _ = writeln!(w, "|---:|{}", "---:|".repeat(14) + "---|");
    let cap = capacity.requests_per_sec();
    for l in levels.iter() {
        let r = &l.report;
        let _ = writeln!(
            w,
            "| {}× | {:.0} | {:.0} | {:.0} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1}% | {:.1}% | {} | {} | {} ({:.0}%) | **{}** | {:.1} | {} |",
            l.multiplier,
            r.rate,
            r.sent_rate(),
            r.goodput(),
            r.goodput() / cap,
            r.latency_ms(0.5),
            r.latency_ms(0.99),
            ms(&r.latency_primary_us, 0.99),
            100.0 * r.share_degraded(),
            100.0 * r.share_shed(),
            r.other_statuses(),
            r.transport,
            r.not_sent,
            100.0 * r.share_not_sent(),
            r.unanswered,
            r.max_schedule_lag.as_secs_f64() * 1000.0,
            cpu_cell(l.cpu)
        );
    }
    let _ = writeln!(
        w,
        "\n- **goodput**: 200 answers per second of the measured period, whether `mlp` or its fallback served \
         them; **degraded**: share of the sent requests answered 200 by `mlp_small` (`parameters.degraded`); \
         **shed**: share of the sent requests refused with 429 or 503; **not sent**: requests due while the \
         in-flight bound was reached (share of the scheduled ones).\n\
         - **200: p50/p99**: latency of admitted requests (every 200), from the scheduled send; **primary p99**: \
         of those served by `mlp` itself.\n\
         - **scheduler max lag**: how far the load generator's own schedule fell behind (it shares the CPU with \
         the server): when this is large, the offered rate was not really offered, and **sent req/s** says what was.\n"
    );
    let details: Vec<String> = levels
        .iter()
        .map(|l| {
            let r = &l.report;
            let statuses: Vec<String> = r
                .statuses
                .iter()
                .map(|(c, n)| format!("{c}: {n}"))
                .collect();
            format!(
                "- {}×: {} scheduled, {} sent, {} primary 200, {} degraded 200, statuses {{{}}}, transport {}, \
                 invalid {}; refusals answered in p50 {:.2} ms / p99 {:.2} ms; peak in flight {}; server counters \
                 (whole level): {}{}",
                l.multiplier,
                r.scheduled,
                r.sent,
                r.ok_primary,
                r.ok_degraded,
                statuses.join(", "),
                r.transport,
                r.invalid,
                ms(&r.latency_shed_us, 0.5),
                ms(&r.latency_shed_us, 0.99),
                r.peak_in_flight,
                l.server.map_or("n/a".to_string(), |s| format!(
                    "shed {:.0}, degraded {:.0}",
                    s.shed, s.degraded
                )),
                r.first_error
                    .as_ref()
                    .map_or(String::new(), |e| format!("; first non-refusal error: {e}"))
            )
        })
        .collect();
    let _ = writeln!(
        w,
        "![goodput and latency per offered load]({PLOT_FILE})\n\n[`{PLOT_FILE}`]({PLOT_FILE}): left, sent \
         requests/s and goodput against the offered rate, the closed-loop capacity as a horizontal line; right, \
         p50 and p99 latency of 200 answers (log scale).\n"
    );
    let _ = writeln!(w, "### Details\n\n{}\n", details.join("\n"));

    let _ = writeln!(w, "### Observations (computed from the table)\n");
    let all_answered = levels.iter().all(|l| l.report.unanswered == 0);
    let _ = writeln!(
        w,
        "- Every sent request got an answer or a counted transport error at every level: **{}**.",
        if all_answered {
            "yes (unanswered = 0 throughout)"
        } else {
            "NO — see the unanswered column"
        }
    );
    if let Some(last) = levels.last() {
        let r = &last.report;
        let _ = writeln!(
            w,
            "- At {}× the capacity, goodput was {:.0}/s = {:.2}× the capacity ({:.1}% of sent requests degraded, \
             {:.1}% shed); admitted requests p99 {:.1} ms.",
            last.multiplier,
            r.goodput(),
            r.goodput() / cap,
            100.0 * r.share_degraded(),
            100.0 * r.share_shed(),
            r.latency_ms(0.99)
        );
    }
    let lagging: Vec<String> = levels
        .iter()
        .filter(|l| l.report.max_schedule_lag > Duration::from_millis(100))
        .map(|l| {
            format!(
                "{}× (up to {:.0} ms behind)",
                l.multiplier,
                l.report.max_schedule_lag.as_secs_f64() * 1000.0
            )
        })
        .collect();
    if !lagging.is_empty() {
        let _ = writeln!(
            w,
            "- **The load generator fell behind its own schedule** at {}: it shares the {} cores with the server; \
             latency is measured from the schedule, so this lag is in the figures.",
            lagging.join(", "),
            machine.nproc
        );
    }
    let bounded: Vec<String> = levels
        .iter()
        .filter(|l| l.report.not_sent > 0)
        .map(|l| {
            format!(
                "{}× ({:.0}% of scheduled requests not sent; {} in flight ÷ {:.0} answers/s = {:.0} ms, against a \
                 measured p50 of {:.0} ms)",
                l.multiplier,
                100.0 * l.report.share_not_sent(),
                l.report.peak_in_flight,
                l.report.goodput(),
                1000.0 * l.report.peak_in_flight as f64 / l.report.goodput().max(1.0),
                l.report.latency_ms(0.5)
            )
        })
        .collect();
    if !bounded.is_empty() {
        let _ = writeln!(
            w,
            "- The in-flight bound ({}) was reached at {}: that many requests were waiting for answers at once, so \
             the rest of the offered load was not sent. The server held them rather than refusing them, so the \
             latency of admitted requests is set by that bound (Little's law: requests in flight ÷ answers per \
             second); more clients would have waited longer.",
            options.max_in_flight,
            bounded.join(", ")
        );
    }
    if let (Some(cap_cpu), Some(last)) = (input.capacity_cpu, levels.last()) {
        if let Some(cpu) = last.cpu {
            let _ = writeln!(
                w,
                "- CPU: in the capacity run the server took {:.2} cores and the load generator {:.2} ({:.0} answers/s \
                 per server core); at {}× the server took {:.2} and the open-loop load generator {:.2} ({:.0} answers/s \
                 per server core). Goodput below the capacity reflects the open-loop generator's own cost on the \
                 shared cores as well as the server.",
                cap_cpu.server_cores(),
                cap_cpu.loadgen_cores,
                capacity.requests_per_sec() / cap_cpu.server_cores().max(0.01),
                last.multiplier,
                cpu.server_cores(),
                cpu.loadgen_cores,
                last.report.goodput() / cpu.server_cores().max(0.01)
            );
        }
    }
    let shed_total: u64 = levels.iter().map(|l| l.report.shed()).sum();
    let degraded_total: u64 = levels.iter().map(|l| l.report.ok_degraded).sum();
    let sent_total: u64 = levels.iter().map(|l| l.report.sent).sum();
    if sent_total > 0 && (shed_total + degraded_total) as f64 / (sent_total as f64) < 0.05 {
        let _ = writeln!(
            w,
            "- Admission control barely acted: over all levels {:.1}% of sent requests were degraded and {:.1}% shed, \
             while admitted requests' p99 rose above the {SLO_MS} ms SLO. The server's CPU went to HTTP and JSON \
             (server cores above), so requests waited *before* the model's queue (sockets, HTTP workers, request \
             decoding), where `slo_ms` and `max_queue` do not see them; the model queue itself stayed short.",
            100.0 * degraded_total as f64 / sent_total as f64,
            100.0 * shed_total as f64 / sent_total as f64
        );
    }
    let others = levels
        .iter()
        .filter_map(|l| l.cpu.map(|c| c.other_cores))
        .fold(0.0, f64::max);
    let _ = writeln!(
        w,
        "- Other processes used at most {others:.2} CPU cores during a level{}.",
        if others > 0.2 {
            ": **a contended machine**, figures are lower and noisier than the software allows"
        } else {
            ": a quiet machine"
        }
    );
    let _ = writeln!(w, "\nRaw numbers: `results.json` beside this file.");
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_overload_manifest_arms_admission_control() {
        let (text, files) = overload_manifest().unwrap();
        assert_eq!(files.len(), 2);
        let parsed: toml::Table = toml::from_str(&text).unwrap();
        let models = parsed["models"].as_array().unwrap();
        let mlp = models[0].as_table().unwrap();
        assert_eq!(mlp["name"].as_str(), Some(PRIMARY));
        assert_eq!(mlp["slo_ms"].as_integer(), Some(SLO_MS));
        assert_eq!(mlp["fallback"].as_str(), Some(FALLBACK));
        assert_eq!(mlp["max_queue"].as_integer(), Some(MAX_QUEUE));
        assert_eq!(mlp["max_queue_delay_ms"].as_float(), Some(0.0));
        assert_eq!(models[1]["name"].as_str(), Some(FALLBACK));
    }
}
