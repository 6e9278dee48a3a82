//! The overload benchmark, in one run: streamserve on `mlp` with the router's admission
//! control armed (`slo_ms = 50`, `fallback = "mlp_small"`, `max_queue = 256`), its capacity
//! measured in closed loop, then open-loop load at multiples of that capacity; all of it once
//! per door admission mode (`--admission static,adaptive`), on a server started afresh for
//! each, at the same offered rates (multiples of the first mode's capacity), so that one run
//! gives the before/after figures of the door's adaptive limit. What it shows: whether
//! goodput holds up past capacity, how long admitted requests take, how much load goes to the
//! fallback (degraded) or is refused (429/503), and that every request gets an answer.
//!
//! The server runs in this process, or (`--pin`, [`server`]) as a separate `streamserve`
//! process on one CPU with the load generator on another. [`results`] turns the measurements
//! into `results.json` and `report.md`.

pub mod results;
pub mod server;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use streamserve::config::Admission;

use crate::bench::{cpu_since, TempModelDir};
use crate::cli::{count, secs, BenchCommon};
use crate::manifest::{self, EntryChange};
use crate::open_loop::{self, OpenLoopOptions, OpenLoopReport};
use crate::pinning::Pinning;
use crate::prometheus;
use crate::rest::{self, RestOptions, RestReport};
use crate::sysinfo::{wait_for_quiet, CpuShare, CpuSnapshot};
use server::{PinnedCpu, PinnedSnapshot, Server};

pub const PRIMARY: &str = "mlp";
pub const FALLBACK: &str = "mlp_small";
pub const SLO_MS: i64 = 50;
pub const MAX_QUEUE: i64 = 256;

/// What `overload` and `timeline` share: the `mlp` server's capacity measurement and the
/// open-loop client.
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

impl MlpOpenLoop {
    /// The closed-loop capacity measurement of the server at `url` (its base URL), with
    /// progress lines; the open loop's requests are the same.
    pub fn capacity_load(&self, url: &str) -> RestOptions {
        RestOptions {
            url: url.to_string(),
            model: PRIMARY.into(),
            concurrency: self.capacity_concurrency,
            duration: self.capacity_duration,
            warmup: CAPACITY_WARMUP,
            rows: 1,
            binary: self.binary,
            quiet: false,
            request_timeout: Duration::from_secs(30),
        }
    }
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
    /// The server's door admission modes, comma-separated (`static`: no door limit, as before
    /// the adaptive limit; `adaptive`: the latency-driven limit): every level runs once per
    /// mode, each on a server started afresh with it; a mode may repeat (run-to-run spread).
    #[arg(long, value_name = "MODES", value_enum, value_delimiter = ',', default_values = ["static", "adaptive"])]
    pub admission: Vec<Admission>,
    /// Run the server as a separate `streamserve` process pinned to one CPU (one HTTP worker)
    /// and this load generator on another (client threads default to 1), so that the server's
    /// own CPU is the bottleneck; needs 2 CPUs.
    #[arg(long)]
    pub pin: bool,
    /// The `streamserve` binary that --pin starts [default: `streamserve` beside this loadgen].
    #[arg(long, requires = "pin")]
    pub server_bin: Option<PathBuf>,
    #[command(flatten)]
    pub mlp: MlpOpenLoop,
}

impl OverloadOptions {
    /// Client runtime threads: as given, else 1 when pinned (one CPU) and one per CPU otherwise.
    pub fn client_threads(&self) -> usize {
        match self.mlp.common.threads.client_threads {
            Some(n) => n as usize,
            None if self.pin => 1,
            None => self.mlp.common.threads.get(),
        }
    }

    fn check(&self) -> anyhow::Result<()> {
        let m = &self.multipliers;
        if m.is_empty()
            || m.len() > 16
            || m.iter().any(|m| !(m.is_finite() && *m > 0.0 && *m <= 20.0))
        {
            bail!("give 1 to 16 multipliers, each more than 0 and at most 20");
        }
        if self.admission.is_empty() || self.admission.len() > 6 {
            bail!("give 1 to 6 admission modes");
        }
        Ok(())
    }
}

/// Each mode's name, numbered from its second occurrence on (`static`, `adaptive`,
/// `static #2`), so that every variant has a label of its own.
pub fn variant_labels(modes: &[Admission]) -> Vec<String> {
    let mut labels = Vec::new();
    for (i, mode) in modes.iter().enumerate() {
        let name = server::mode_name(*mode);
        let n = modes[..i].iter().filter(|m| *m == mode).count();
        labels.push(match n {
            0 => name.to_string(),
            n => format!("{name} #{}", n + 1),
        });
    }
    labels
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

/// The server's own counters, from `/metrics`: over one level once subtracted.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct ServerCounters {
    /// `streamserve_shed_total` of `mlp` (queue full, or refused at the door).
    pub shed: f64,
    pub degraded: f64,
    /// `streamserve_admission_refused_total`: refused at the door.
    pub door_refused: f64,
    /// `streamserve_admission_wait_seconds` sum and count: time admitted requests spent inside
    /// the server besides their model's compute.
    pub door_wait_s: f64,
    pub door_answers: f64,
}

impl ServerCounters {
    fn minus(&self, earlier: &ServerCounters) -> ServerCounters {
        ServerCounters {
            shed: self.shed - earlier.shed,
            degraded: self.degraded - earlier.degraded,
            door_refused: self.door_refused - earlier.door_refused,
            door_wait_s: self.door_wait_s - earlier.door_wait_s,
            door_answers: self.door_answers - earlier.door_answers,
        }
    }

    /// Mean time admitted requests waited inside the server, ms (`None` without answers).
    pub fn door_wait_mean_ms(&self) -> Option<f64> {
        (self.door_answers > 0.0).then(|| 1000.0 * self.door_wait_s / self.door_answers)
    }
}

/// The counters and the door's admission limit now (0: none), from Prometheus text.
pub fn scrape(text: &str) -> (ServerCounters, f64) {
    let label = format!("model=\"{PRIMARY}\"");
    let plain = |name: &str| prometheus::sum(text, name, "", None);
    let counters = ServerCounters {
        shed: prometheus::sum(text, "streamserve_shed_total", &label, None),
        degraded: prometheus::sum(text, "streamserve_degraded_total", &label, None),
        door_refused: plain("streamserve_admission_refused_total"),
        door_wait_s: plain("streamserve_admission_wait_seconds_sum"),
        door_answers: plain("streamserve_admission_wait_seconds_count"),
    };
    (counters, plain("streamserve_admission_limit"))
}

#[derive(Clone, Debug)]
pub struct Level {
    pub multiplier: f64,
    pub report: OpenLoopReport,
    pub cpu: Option<CpuShare>,
    /// Both CPUs and the server process, when pinned.
    pub pinned_cpu: Option<PinnedCpu>,
    /// Server-side counter deltas over the level (warm-up and draining included).
    pub server: Option<ServerCounters>,
    /// The door's admission limit when the level had ended (0: none).
    pub admission_limit: Option<f64>,
}

/// One admission mode's run: its server's capacity and every level.
#[derive(Clone, Debug)]
pub struct Variant {
    pub admission: Admission,
    pub label: String,
    pub capacity: RestReport,
    pub capacity_cpu: Option<CpuShare>,
    pub capacity_pinned_cpu: Option<PinnedCpu>,
    pub levels: Vec<Level>,
    /// The pinned server's command line and output.
    pub server_command: Option<String>,
    pub server_log: Option<String>,
}

pub fn wait_ready(running: &streamserve::server::Running, model: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ready = running
            .catalog
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

/// What every variant's measurements use.
struct Context<'a> {
    options: &'a OverloadOptions,
    runtime: tokio::runtime::Runtime,
    client: reqwest::Client,
    pinning: Option<Pinning>,
}

impl Context<'_> {
    fn scrape(&self, base: &str) -> Option<(ServerCounters, f64)> {
        let text = self
            .runtime
            .block_on(prometheus::fetch(&self.client, base))?;
        Some(scrape(&text))
    }

    /// CPU counters for a measurement: the machine's, and both CPUs' when pinned.
    fn cpu_snapshot(&self, server: &Server) -> (Option<CpuSnapshot>, Option<PinnedSnapshot>) {
        let pinned = match (&self.pinning, server.pid()) {
            (Some(p), Some(pid)) => PinnedSnapshot::take(p, pid),
            _ => None,
        };
        (CpuSnapshot::take(), pinned)
    }

    fn cpu_since(
        &self,
        server: &Server,
        (machine, pinned): (Option<CpuSnapshot>, Option<PinnedSnapshot>),
    ) -> (Option<CpuShare>, Option<PinnedCpu>) {
        let now = self.cpu_snapshot(server);
        let pinned = match (now.1, pinned) {
            (Some(now), Some(then)) => Some(now.since(&then)),
            _ => None,
        };
        (cpu_since(machine), pinned)
    }
}

/// Runs the whole benchmark and writes its report.
pub fn run(options: &OverloadOptions) -> anyhow::Result<crate::report::Outcome> {
    options.check()?;
    let pinning = options.pin.then(Pinning::choose).transpose()?;
    let server_bin = match (&options.server_bin, options.pin) {
        (Some(bin), _) => Some(bin.clone()),
        (None, true) => Some(server::default_server_bin()?),
        (None, false) => None,
    };
    if let Some(bin) = server_bin.as_ref().filter(|b| !b.is_file()) {
        bail!(
            "--pin starts {}, which does not exist: build it (`cargo build --release --workspace`) \
             or name it with --server-bin",
            bin.display()
        );
    }
    let suffix = if options.pin {
        "overload-mlp-pinned"
    } else {
        "overload-mlp"
    };
    let start = crate::report::Start::now(options.mlp.common.out.as_deref(), suffix);
    crate::sysinfo::raise_nofile_limit(2 * options.mlp.max_in_flight as u64 + 1024);
    // Before the client runtime starts, so that its threads inherit the CPU; undone when
    // `_unpin` goes, at the end of the run.
    let _unpin = pinning
        .as_ref()
        .map(Pinning::pin_this_process)
        .transpose()?;
    if let Some(p) = &pinning {
        eprintln!(
            "[overload] pinned: server on CPU {}, load generator on CPU {}",
            p.server_cpu, p.loadgen_cpu
        );
    }
    let (manifest_text, _) = overload_manifest()?;
    let models = TempModelDir::create("overload", &manifest_text)?;
    let context = Context {
        options,
        runtime: crate::sysinfo::client_runtime(options.client_threads())?,
        client: crate::sysinfo::metrics_client()?,
        pinning,
    };
    let mut variants: Vec<Variant> = Vec::new();
    for (i, (mode, label)) in options
        .admission
        .iter()
        .zip(variant_labels(&options.admission))
        .enumerate()
    {
        let server = match (&pinning, &server_bin) {
            (Some(p), Some(bin)) => {
                let log = models.path.join(format!("server-{i}.log"));
                Server::child(bin, &models.path, (*mode, *p), log, &context.runtime)?
            }
            _ => Server::in_process(&models.path, *mode)?,
        };
        eprintln!(
            "[overload] admission {label}: streamserve on {}",
            server.base()
        );
        let rate = variants.first().map(|v| v.capacity.requests_per_sec());
        let result = run_variant(&context, &server, *mode, &label, rate);
        let (command, log) = server.command_and_log().unzip();
        server.stop();
        variants.push(Variant {
            server_command: command,
            server_log: log,
            ..result?
        });
    }
    drop(models);
    let threads = options.client_threads();
    drop(context);

    let json = results::results_json(options, &start, &manifest_text, pinning, threads, &variants);
    let report = results::render_report(&json, start.at.elapsed(), options)?;
    let plot = Some((PLOT_FILE, crate::plots::overload_levels as _));
    let outcome = crate::report::save_run(start.dir, "overload", report, &json, plot)?;
    for v in &variants {
        if let Some(log) = &v.server_log {
            let file = outcome.dir.join(results::server_log_file(&v.label));
            if let Err(e) = std::fs::write(&file, results::log_excerpt(log)) {
                eprintln!("[overload] cannot write {}: {e}", file.display());
            }
        }
    }
    Ok(outcome)
}

/// One admission mode on its server: the capacity in closed loop, then every level open
/// loop at `rate` (the first variant's capacity; this one's own when `None`) times its
/// multiplier.
fn run_variant(
    context: &Context,
    server: &Server,
    admission: Admission,
    label: &str,
    rate: Option<f64>,
) -> anyhow::Result<Variant> {
    let options = context.options;
    let base = server.base();
    wait_for_quiet(crate::sysinfo::QUIET_CORES, options.mlp.common.quiet_wait);
    eprintln!(
        "[overload] {label}: capacity, closed loop, concurrency {} ...",
        options.mlp.capacity_concurrency
    );
    let closed = options.mlp.capacity_load(&base);
    let before = context.cpu_snapshot(server);
    let capacity = context.runtime.block_on(rest::run(&closed))?;
    let (capacity_cpu, capacity_pinned_cpu) = context.cpu_since(server, before);
    eprint!("{}", capacity.summary());
    let rate = rate.unwrap_or_else(|| capacity.requests_per_sec());
    if rate <= 0.0 {
        bail!(
            "the capacity run had no successful request:\n{}",
            capacity.summary()
        );
    }
    let mut levels = Vec::new();
    for &m in &options.multipliers {
        std::thread::sleep(Duration::from_secs(1));
        wait_for_quiet(crate::sysinfo::QUIET_CORES, options.mlp.common.quiet_wait);
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
            label: format!("overload {label} {m}x"),
        };
        let scraped_before = context.scrape(&base);
        let before = context.cpu_snapshot(server);
        let report = context.runtime.block_on(open_loop::run(&open))?;
        let (cpu, pinned_cpu) = context.cpu_since(server, before);
        let scraped_after = context.scrape(&base);
        let server_counters = match (scraped_before, scraped_after) {
            (Some(a), Some(b)) => Some(b.0.minus(&a.0)),
            _ => None,
        };
        eprintln!(
            "[overload]   {label} {m}x = {:.0}/s: goodput {:.0}/s, primary p99 {:.1} ms, degraded {:.1}%, shed {:.1}%, unanswered {}, door limit {}",
            rate * m,
            report.goodput(),
            crate::hist::ms(&report.latency_primary_us, 0.99),
            100.0 * report.share_degraded(),
            100.0 * report.share_shed(),
            report.unanswered,
            scraped_after.map_or("n/a".into(), |s| format!("{:.0}", s.1)),
        );
        levels.push(Level {
            multiplier: m,
            report,
            cpu,
            pinned_cpu,
            server: server_counters,
            admission_limit: scraped_after.map(|s| s.1),
        });
    }
    Ok(Variant {
        admission,
        label: label.to_string(),
        capacity,
        capacity_cpu,
        capacity_pinned_cpu,
        levels,
        server_command: None,
        server_log: None,
    })
}

/// The goodput/latency plot written beside `report.md`.
pub const PLOT_FILE: &str = "overload.svg";

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

    fn parse(args: &[&str]) -> Result<OverloadOptions, clap::Error> {
        use clap::{Args as _, FromArgMatches as _};
        let command = OverloadOptions::augment_args(clap::Command::new("overload"));
        let matches = command
            .try_get_matches_from(std::iter::once("overload").chain(args.iter().copied()))?;
        OverloadOptions::from_arg_matches(&matches)
    }

    #[test]
    fn admission_modes_and_pinning_on_the_command_line() {
        let o = parse(&[]).unwrap();
        assert_eq!(o.admission, [Admission::Static, Admission::Adaptive]);
        assert!(!o.pin && o.server_bin.is_none());
        assert_eq!(o.client_threads(), o.mlp.common.threads.get());
        let o = parse(&["--admission", "adaptive"]).unwrap();
        assert_eq!(o.admission, [Admission::Adaptive]);
        let o = parse(&["--admission", "static,adaptive,static"]).unwrap();
        assert_eq!(
            variant_labels(&o.admission),
            ["static", "adaptive", "static #2"]
        );
        assert!(parse(&["--admission", "fixed"]).is_err());
        let o = parse(&["--pin", "--server-bin", "/x/streamserve"]).unwrap();
        assert!(o.pin);
        assert_eq!(
            o.server_bin.as_deref(),
            Some(std::path::Path::new("/x/streamserve"))
        );
        assert_eq!(
            o.client_threads(),
            1,
            "pinned, one client thread unless told"
        );
        let o = parse(&["--pin", "--client-threads", "2"]).unwrap();
        assert_eq!(o.client_threads(), 2);
        // --server-bin means nothing without --pin.
        assert!(parse(&["--server-bin", "/x/streamserve"]).is_err());
        let mut o = parse(&[]).unwrap();
        o.admission.clear();
        assert!(o.check().is_err());
        o = parse(&["--multipliers", "0"]).unwrap();
        assert!(o.check().is_err());
    }

    #[test]
    fn server_counters_and_the_door_limit_from_metrics() {
        let text = "# TYPE streamserve_shed_total counter\n\
            streamserve_shed_total{model=\"mlp\",version=\"1\"} 40\n\
            streamserve_shed_total{model=\"mlp_small\",version=\"1\"} 7\n\
            streamserve_degraded_total{model=\"mlp\",version=\"1\"} 5\n\
            streamserve_admission_refused_total 30\n\
            streamserve_admission_limit 52\n\
            streamserve_admission_wait_seconds_bucket{le=\"0.01\"} 3\n\
            streamserve_admission_wait_seconds_sum 0.5\n\
            streamserve_admission_wait_seconds_count 100\n";
        let (c, limit) = scrape(text);
        assert_eq!((c.shed, c.degraded, c.door_refused), (40.0, 5.0, 30.0));
        assert_eq!(limit, 52.0);
        assert_eq!(c.door_wait_mean_ms(), Some(5.0));
        let d = c.minus(&ServerCounters {
            shed: 10.0,
            door_answers: 100.0,
            ..Default::default()
        });
        assert_eq!(d.shed, 30.0);
        assert_eq!(d.door_wait_mean_ms(), None);
        assert_eq!(scrape("").1, 0.0);
    }
}
