//! The overload benchmark, in one run: streamserve in-process on `mlp` with its admission
//! control armed (`slo_ms = 50`, `fallback = "mlp_small"`, `max_queue = 256`), its capacity
//! measured in closed loop, then open-loop load at multiples of that capacity. What it shows:
//! whether goodput holds up past capacity, how long admitted requests take, how much load goes
//! to the fallback (degraded) or is refused (429/503), and that every request gets an answer.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::bench::{cpu_since, start_server_for, stop_server, TempModelDir};
use crate::cli::{count, secs, BenchCommon};
use crate::manifest::{self, EntryChange};
use crate::open_loop::{self, OpenLoopOptions, OpenLoopReport};
use crate::prometheus;
use crate::rest::{self, RestOptions, RestReport};
use crate::sysinfo::{wait_for_quiet, CpuShare, CpuSnapshot, MachineInfo};

pub const PRIMARY: &str = "mlp";
pub const FALLBACK: &str = "mlp_small";
pub const SLO_MS: i64 = 50;
pub const MAX_QUEUE: i64 = 256;

/// What `overload` and `timeline` share: the in-process `mlp` server's capacity measurement
/// and the open-loop client.
#[derive(Clone, Debug, clap::Args)]
pub struct MlpOpenLoop {
    /// Measured seconds of the closed-loop capacity measurement.
    #[arg(long = "capacity-secs", value_name = "CAPACITY_SECS", default_value = "5", value_parser = secs(1, 300))]
    pub capacity_duration: Duration,
    /// Closed-loop concurrency of the capacity measurement.
    #[arg(long, default_value_t = 128, value_parser = count(1, rest::MAX_CONCURRENCY))]
    pub capacity_concurrency: usize,
    /// Requests in flight at most during open-loop load.
    #[arg(long, default_value_t = 2048, value_parser = count(1, open_loop::MAX_IN_FLIGHT))]
    pub max_in_flight: usize,
    /// Use the binary tensor data extension instead of JSON data.
    #[arg(long)]
    pub binary: bool,
    #[command(flatten)]
    pub common: BenchCommon,
}

/// Unmeasured seconds of closed-loop load before the capacity measurement.
pub const CAPACITY_WARMUP: Duration = Duration::from_secs(2);

/// `loadgen overload`'s options.
#[derive(Clone, Debug, clap::Args)]
pub struct OverloadOptions {
    /// Offered loads as multiples of the measured capacity, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1.0f64, 2.0, 3.0, 5.0])]
    pub multipliers: Vec<f64>,
    /// Measured seconds per offered load.
    #[arg(long = "duration-secs", value_name = "DURATION_SECS", default_value = "8", value_parser = secs(1, 300))]
    pub duration: Duration,
    /// Unmeasured seconds of open-loop load before each measured period.
    #[arg(long = "warmup-secs", value_name = "WARMUP_SECS", default_value = "1", value_parser = secs(0, 60))]
    pub warmup: Duration,
    #[command(flatten)]
    pub mlp: MlpOpenLoop,
    /// The command line, as it goes in the report.
    #[arg(skip = crate::cli::command_line())]
    pub command: String,
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
pub fn run(options: &OverloadOptions) -> anyhow::Result<crate::report::Outcome> {
    if options.multipliers.is_empty()
        || options.multipliers.len() > 16
        || options
            .multipliers
            .iter()
            .any(|m| !(m.is_finite() && *m > 0.0 && *m <= 20.0))
    {
        bail!("give 1 to 16 multipliers, each more than 0 and at most 20");
    }
    let start = crate::report::Start::now(options.mlp.common.out.as_deref(), "overload-mlp");
    crate::sysinfo::raise_nofile_limit(2 * options.mlp.max_in_flight as u64 + 1024);
    let (manifest_text, _) = overload_manifest()?;
    let models = TempModelDir::create("overload", &manifest_text)?;
    let running = start_server_for(&models.path, PRIMARY, 64)?;
    if let Err(e) = wait_ready(&running, FALLBACK) {
        stop_server(&running);
        return Err(e);
    }
    let base = format!("http://{}", running.addr);
    eprintln!("[overload] streamserve on {base}");
    let runtime = crate::sysinfo::client_runtime(options.mlp.common.threads.get())?;
    let client = crate::sysinfo::metrics_client()?;

    let result = (|| -> anyhow::Result<(RestReport, Option<CpuShare>, Vec<Level>)> {
        wait_for_quiet(0.15, options.mlp.common.quiet_wait);
        eprintln!(
            "[overload] capacity: closed loop, concurrency {} ...",
            options.mlp.capacity_concurrency
        );
        let closed = RestOptions {
            url: base.clone(),
            model: PRIMARY.into(),
            concurrency: options.mlp.capacity_concurrency,
            duration: options.mlp.capacity_duration,
            warmup: CAPACITY_WARMUP,
            rows: 1,
            binary: options.mlp.binary,
            quiet: false,
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
            wait_for_quiet(0.15, options.mlp.common.quiet_wait);
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
                max_in_flight: options.mlp.max_in_flight,
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

    let json = results_json(
        options,
        &start.machine,
        &start.started_at,
        &manifest_text,
        &capacity,
        capacity_cpu,
        &levels,
    );
    let report = render_report(&json, start.at.elapsed(), options, &levels)?;
    let plot = (PLOT_FILE, crate::plots::overload_levels as _);
    crate::report::save_run(start.dir, "overload", report, &json, plot)
}

/// The goodput/latency plot written beside `report.md`.
pub const PLOT_FILE: &str = "overload.svg";

fn results_json(
    options: &OverloadOptions,
    machine: &MachineInfo,
    started_at: &str,
    manifest: &str,
    c: &RestReport,
    capacity_cpu: Option<CpuShare>,
    levels: &[Level],
) -> serde_json::Value {
    serde_json::json!({
        "started_at": started_at,
        "command": options.command,
        "machine": machine,
        "manifest": manifest,
        "capacity": {
            "concurrency": c.concurrency,
            "requests_per_s": c.requests_per_sec(),
            "ok": c.ok,
            "degraded": c.server_sums.degraded,
            "errors": c.errors,
            "latency_ms": { "p50": c.latency_ms(0.5), "p99": c.latency_ms(0.99) },
            "mean_batch_rows": c.mean_batch_rows(),
            "cpu_cores": capacity_cpu,
        },
        "levels": levels.iter().map(|l| crate::report::context(&l.report.to_json(), &[serde_json::json!({
            "multiplier": l.multiplier, "cpu_cores": l.cpu, "server_counters": l.server,
        })])).collect::<Vec<_>>(),
    })
}

/// `report.md` from `templates/overload.md.j2`: the results JSON, each level with the figures
/// the JSON leaves out, and the totals the observations need.
fn render_report(
    json: &serde_json::Value,
    elapsed: Duration,
    options: &OverloadOptions,
    levels: &[Level],
) -> anyhow::Result<String> {
    let rows: Vec<serde_json::Value> = json["levels"]
        .as_array()
        .into_iter()
        .flatten()
        .zip(levels)
        .map(|(j, l)| {
            let more = serde_json::json!({
                "other_statuses": l.report.other_statuses(),
                "share_not_sent": l.report.share_not_sent(),
            });
            crate::report::context(j, &[more])
        })
        .collect();
    let sum = |f: fn(&OpenLoopReport) -> u64| levels.iter().map(|l| f(&l.report)).sum::<u64>();
    let extra = serde_json::json!({
        "rows": rows, "slo_ms": SLO_MS, "max_queue": MAX_QUEUE, "binary": options.mlp.binary,
        "capacity_warmup_s": CAPACITY_WARMUP.as_secs_f64(),
        "capacity_measured_s": options.mlp.capacity_duration.as_secs_f64(),
        "warmup_s": options.warmup.as_secs_f64(), "duration_s": options.duration.as_secs_f64(),
        "max_in_flight": options.mlp.max_in_flight, "client_threads": options.mlp.common.threads.get(),
        "plot": PLOT_FILE,
        "shed_total": sum(OpenLoopReport::shed), "degraded_total": sum(|r| r.ok_degraded),
        "sent_total": sum(|r| r.sent),
        "others": levels.iter().filter_map(|l| l.cpu.map(|c| c.other_cores)).fold(0.0, f64::max),
    });
    let header = crate::report::header(
        "streamserve overload: `mlp` past its capacity, with its fallback and load shedding",
        elapsed,
        &[],
        true,
    );
    crate::report::render("overload", &crate::report::context(json, &[header, extra]))
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
