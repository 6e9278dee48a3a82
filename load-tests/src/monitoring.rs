//! The model monitor's cost, `loadgen monitoring`: two in-process streamservers on `mlp`
//! (replicas 2, batching on, as `protocols`), one with `monitor_outputs = true` (the default)
//! and one with `false`, and closed-loop REST JSON load on each in turn at every concurrency,
//! the order alternating by round (off on, then on off). The measuring, the JSON of the
//! levels and the plot are `protocols`' ([`Schedule`], [`levels_json`], [`crate::plots::protocols`]),
//! the two servers standing for its clients; the report is `templates/monitoring.md.j2`.

use std::time::Duration;

use serde_json::{json, Value};
use streamserve::config::{Config, GrpcPort};

use crate::bench::{start_server_with, stop_server, ServerSetup, TempModelDir};
use crate::cli::{count, secs};
use crate::protocols::results::{levels_json, render_report, Client, Level};
use crate::protocols::{MlpClosedLoop, RestSlice, Schedule, CONTENDED_CORES};
use crate::rest;

/// The plot written beside `report.md` (`protocols`' plot of this run's results).
pub const PLOT_FILE: &str = "monitoring.svg";
/// The report's title.
pub const TITLE: &str =
    "streamserve model monitor: `mlp` throughput and latency with output monitoring off vs on";

/// The two servers compared; the first is the baseline of the ratios.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Monitor {
    Off,
    On,
}

pub const VARIANTS: [Monitor; 2] = [Monitor::Off, Monitor::On];

impl Client for Monitor {
    fn key(self) -> &'static str {
        ["off", "on"][self as usize]
    }
    fn label(self) -> &'static str {
        ["monitor off", "monitor on"][self as usize]
    }
}

/// `loadgen monitoring`'s options.
#[derive(Clone, Debug, clap::Args)]
pub struct MonitoringOptions {
    /// Concurrency levels (requests in flight, closed loop), comma-separated.
    #[arg(long = "concurrency", value_name = "CONCURRENCY", value_delimiter = ',', default_values_t = [1usize, 8, 32, 64],
          value_parser = count(1, crate::rest::MAX_CONCURRENCY))]
    pub concurrencies: Vec<usize>,
    /// Measured seconds of each slice (one server, one level, one round).
    #[arg(long = "duration-secs", value_name = "DURATION_SECS", default_value = "3", value_parser = secs(1, 120))]
    pub duration: Duration,
    /// Unmeasured warm-up seconds before each slice's measured period.
    #[arg(long = "warmup-secs", value_name = "WARMUP_SECS", default_value = "1", value_parser = secs(0, 60))]
    pub warmup: Duration,
    /// Rounds per level, the servers' order reversed every other round (off on, on off, ...).
    #[arg(long, default_value_t = 4, value_parser = count(1, 8))]
    pub rounds: usize,
    /// Rows per request (input [rows, 256]); at most the server's max_batch_size (64).
    #[arg(long, default_value_t = 1, value_parser = count(1, 64))]
    pub rows: usize,
    #[command(flatten)]
    pub mlp: MlpClosedLoop,
}

impl MonitoringOptions {
    /// The servers in round `round` (from 0): off on, then on off, ...
    pub fn order(&self, round: usize) -> Vec<Monitor> {
        crate::protocols::alternating(&VARIANTS, round)
    }
}

/// Runs the whole benchmark and writes its report: about levels × rounds × 2 × (warm-up +
/// duration), plus the quiet checks.
pub fn run(options: &MonitoringOptions) -> anyhow::Result<crate::report::Outcome> {
    anyhow::ensure!(
        !options.concurrencies.is_empty() && options.concurrencies.len() <= 16,
        "give 1 to 16 concurrency levels"
    );
    let start = crate::report::Start::now(options.mlp.common.out.as_deref(), "monitoring-mlp");
    let (model_file, sha256) = crate::bench::model_file_and_sha256(&options.mlp.model_file)?;
    let setup = ServerSetup::batching_on();
    let models = TempModelDir::create("monitoring", &setup.manifest(&model_file, &sha256))?;
    let mut servers = Vec::new();
    for variant in VARIANTS {
        let config = Config {
            models: models.path.clone(),
            drain_secs: 2,
            grpc_port: Some(GrpcPort::Off),
            monitor_outputs: variant == Monitor::On,
            ..Default::default()
        };
        match start_server_with(config, "mlp", setup.max_batch_size) {
            Ok(running) => servers.push(running),
            Err(e) => {
                servers.iter().for_each(stop_server);
                return Err(e);
            }
        }
    }
    eprintln!(
        "[monitoring] streamserve monitor off on http://{}, on on http://{}; {} levels x {} rounds x 2",
        servers[0].addr,
        servers[1].addr,
        options.concurrencies.len(),
        options.rounds
    );
    let schedule = Schedule {
        tag: "monitoring",
        concurrencies: &options.concurrencies,
        rounds: options.rounds,
        quiet_wait: options.mlp.common.quiet_wait,
    };
    let measured =
        crate::sysinfo::client_runtime(options.mlp.common.threads.get()).and_then(|rt| {
            schedule.measure(
                |round| options.order(round),
                |variant, concurrency| {
                    let slice = RestSlice {
                        concurrency,
                        rows: options.rows,
                        binary: false,
                        warmup: options.warmup,
                        duration: options.duration,
                    };
                    let load = options.mlp.rest_load(servers[variant as usize].addr, slice);
                    rt.block_on(rest::run(&load))
                },
            )
        });
    // What each server's monitor recorded: the proof that one watched and the other did not.
    let watched: Vec<Value> = servers
        .iter()
        .map(|s| {
            let watches = s.catalog.snapshot().watches();
            json!(watches.iter().map(|w| w.summary()).collect::<Vec<_>>())
        })
        .collect();
    servers.iter().for_each(stop_server);
    drop(models);
    let levels = measured?;

    let json = results_json((&start, options, &setup), watched, &levels);
    let elapsed = start.at.elapsed();
    let file = (model_file.as_path(), sha256.as_str());
    let report = render_report(("monitoring", TITLE), &json, elapsed, file, PLOT_FILE)?;
    let plot = Some((PLOT_FILE, crate::plots::protocols as _));
    crate::report::save_run(start.dir, "monitoring", report, &json, plot)
}

/// `results.json`: the run's settings, what each server's monitor recorded (`watched`, off
/// then on), and per level both servers' combined runs with on's ratios to off.
pub fn results_json(
    (start, options, setup): (&crate::report::Start, &MonitoringOptions, &ServerSetup),
    watched: Vec<Value>,
    levels: &[Level<Monitor>],
) -> Value {
    let order = |round| options.order(round);
    let body = json!({
        "loadavg_at_end": crate::sysinfo::MachineInfo::collect().loadavg_at_start,
        "setup": setup,
        "plot_title": format!("mlp, {} row/request: model monitor off vs on, two servers (closed loop)", options.rows),
        "protocols": VARIANTS.map(|v| json!({"key": v.key(), "label": v.label()})),
        "baseline": Monitor::Off.key(),
        "baseline_label": Monitor::Off.label(),
        "rows_per_request": options.rows,
        "rounds": options.rounds,
        "warmup_s": options.warmup.as_secs_f64(),
        "slice_s": options.duration.as_secs_f64(),
        "client_threads": options.mlp.common.threads.get(),
        "contended_cores": CONTENDED_CORES,
        "monitor": {"off": watched.first(), "on": watched.get(1)},
        "levels": levels_json(levels, &VARIANTS, order, options.rounds),
    });
    start.results_json(Some("monitoring"), &options.mlp.common.command, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocols::results::Slice;
    use crate::sysinfo::CpuShare;

    #[test]
    fn the_scenario_file_gives_these_options() {
        let o: MonitoringOptions =
            crate::scenario::bundled_options("monitoring-mlp.toml", "monitoring");
        assert_eq!(o.concurrencies, [1, 8, 32, 64]);
        assert_eq!(o.order(0), [Monitor::Off, Monitor::On]);
        assert_eq!(o.order(1), [Monitor::On, Monitor::Off]);
        // Within the ~3 minutes asked, quiet waits aside.
        let slices = (o.concurrencies.len() * o.rounds * 2) as f64;
        assert!(slices * (o.duration + o.warmup).as_secs_f64() <= 150.0);
    }

    #[test]
    fn results_and_report_from_slices() {
        let options: MonitoringOptions = crate::cli::defaults();
        let slice = |protocol, round, ok: u64| {
            let mut report = crate::rest::RestReport::empty("x", "mlp", 8, 1, false);
            report.measured = Duration::from_secs(2);
            report.ok = ok;
            for _ in 0..ok {
                report.latency_us.record(800).unwrap();
            }
            let cpu = CpuShare {
                own_cores: 1.5,
                other_cores: 0.01,
                loadgen_cores: 0.5,
            };
            Slice {
                protocol,
                round,
                position: 0,
                report,
                cpu: Some(cpu),
            }
        };
        let level = Level {
            concurrency: 8,
            slices: vec![slice(Monitor::Off, 0, 2000), slice(Monitor::On, 0, 1900)],
            set_aside: Vec::new(),
            others_before: vec![0.02],
        };
        let start = crate::report::Start::now(None, "monitoring-mlp");
        let setup = ServerSetup::batching_on();
        let watched = vec![
            json!([{"reference": "off", "rows": 0}]),
            json!([{"reference": "first_answers", "rows": 5000}]),
        ];
        let json = results_json((&start, &options, &setup), watched, &[level]);
        let runs = &json["levels"][0]["runs"];
        assert_eq!(runs[1]["protocol"], "on");
        assert_eq!(runs[1]["ratios"]["throughput"], 0.95);
        let report = render_report(
            ("monitoring", TITLE),
            &json,
            Duration::from_secs(3),
            ("m.onnx".as_ref(), "abc"),
            PLOT_FILE,
        )
        .unwrap();
        assert!(report.contains("**0.950×**"), "{report}");
        assert!(report.contains("5.0 % fewer"), "{report}");
        assert!(report.contains("first_answers"), "{report}");
    }
}
