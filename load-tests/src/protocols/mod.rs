//! The protocols benchmark, in one run against one in-process streamserve (`mlp` only,
//! replicas 2, batching on as in `bench`): closed-loop load at each concurrency level from
//! four clients of the same `mlp` request, REST JSON, REST binary (both the REST load loop of
//! [`crate::rest`]), gRPC `ModelInfer` and gRPC `ModelStreamInfer` ([`grpc_client`]); per
//! level, every client runs once per round, the rounds alternating the order (A B C D, then
//! D C B A) so that a drift of the machine weighs on all alike; each slice warms up before it
//! measures. [`results`] turns the slices into `results.json`, the ratios to the baseline
//! (REST JSON) and `report.md`; [`options`] holds the options, [`tally`] the shared counting.

pub mod grpc_client;
pub mod options;
pub mod results;
pub mod tally;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context as _};

use crate::bench::{cpu_since, start_server_with, stop_server, ServerSetup, TempModelDir};
use crate::rest::{self, RestReport};
use crate::sysinfo::{wait_for_quiet, CpuSnapshot};
use grpc_client::GrpcLoad;
pub use options::{MlpClosedLoop, Protocol, ProtocolsOptions, RestSlice, CONTENDED_CORES};
use results::{Client, Level, Slice};

/// The plot written beside `report.md`.
pub const PLOT_FILE: &str = "protocols.svg";

/// Where the one server listens.
struct Target {
    http: SocketAddr,
    grpc: SocketAddr,
}

/// Runs the whole benchmark and writes its report. Takes about levels × rounds × clients ×
/// (warm-up + duration), plus a second per level for the quiet check and the start-up.
pub fn run(options: &ProtocolsOptions) -> anyhow::Result<crate::report::Outcome> {
    options.check()?;
    let start = crate::report::Start::now(options.mlp.common.out.as_deref(), "protocols-mlp");
    let (model_file, sha256) = crate::bench::model_file_and_sha256(&options.mlp.model_file)?;

    let setup = ServerSetup::batching_on();
    let models = TempModelDir::create("protocols", &setup.manifest(&model_file, &sha256))?;
    let config = streamserve::config::Config {
        models: models.path.clone(),
        // The load has ended when the server stops: nothing is left to drain.
        drain_secs: 2,
        admission: options.admission,
        ..Default::default()
    };
    let running = start_server_with(config, "mlp", setup.max_batch_size)?;
    let Some(grpc) = running.grpc_addr else {
        stop_server(&running);
        bail!("streamserve started without its gRPC listener");
    };
    let target = Target {
        http: running.addr,
        grpc,
    };
    eprintln!(
        "[protocols] streamserve ({}) on http://{} and grpc://{}; {} levels x {} rounds x {} clients, ~{:.0} s",
        setup.label,
        target.http,
        target.grpc,
        options.concurrencies.len(),
        options.rounds,
        options.protocols.len(),
        options.planned_secs().1,
    );
    let runtime = match crate::sysinfo::client_runtime(options.mlp.common.threads.get()) {
        Ok(runtime) => runtime,
        Err(e) => {
            stop_server(&running);
            return Err(e);
        }
    };
    let measured = measure_levels(&runtime, &target, options);
    // Both listeners (`stop_server` would leave gRPC's), boundedly.
    runtime.block_on(async {
        let stopped = tokio::time::timeout(Duration::from_secs(10), running.shutdown()).await;
        if stopped.is_err() {
            eprintln!("[protocols] the server took over 10 s to stop");
        }
    });
    drop(runtime);
    drop(models);
    let levels = measured?;

    let json = results::results_json(
        (&start.machine, &start.started_at),
        options,
        &setup,
        &target.grpc.to_string(),
        &levels,
    );
    let (elapsed, file) = (start.at.elapsed(), (model_file.as_path(), sha256.as_str()));
    let report = results::render_report(
        ("protocols", results::TITLE),
        &json,
        elapsed,
        file,
        PLOT_FILE,
    )?;
    let plot = Some((PLOT_FILE, crate::plots::protocols as _));
    crate::report::save_run(start.dir, "protocols", report, &json, plot)
}

/// Every level's rounds, each after waiting for a quiet machine; a round during which other
/// processes took more than [`CONTENDED_CORES`] in any slice runs once more (the contended
/// one is kept aside, in `results.json`, not counted).
fn measure_levels(
    runtime: &tokio::runtime::Runtime,
    target: &Target,
    options: &ProtocolsOptions,
) -> anyhow::Result<Vec<Level>> {
    let schedule = Schedule {
        tag: "protocols",
        concurrencies: &options.concurrencies,
        rounds: options.rounds,
        quiet_wait: options.mlp.common.quiet_wait,
    };
    schedule.measure(
        |round| options.order(round),
        |protocol, concurrency| runtime.block_on(slice(protocol, concurrency, target, options)),
    )
}

/// The clients of round `round` (from 0): as given in even rounds, reversed in odd ones
/// (A B C, C B A, ...), so that a linear drift over a level weighs on every client alike.
pub fn alternating<K: Clone>(clients: &[K], round: usize) -> Vec<K> {
    let mut order = clients.to_vec();
    if round % 2 == 1 {
        order.reverse();
    }
    order
}

/// When a side-by-side benchmark measures: at each level, `rounds` rounds of every client.
pub struct Schedule<'a> {
    /// The log lines' prefix (`[protocols]`).
    pub tag: &'a str,
    pub concurrencies: &'a [usize],
    pub rounds: usize,
    /// Longest wait for a quiet machine before each round (zero: none).
    pub quiet_wait: Duration,
}

impl Schedule<'_> {
    /// Every level's rounds, each round's clients in `order(round)`, each slice measured by
    /// `run(client, concurrency)` with the CPU used meanwhile; each round after waiting for a
    /// quiet machine, and a round during which other processes took more than
    /// [`CONTENDED_CORES`] in any slice once more (the contended one set aside).
    pub fn measure<K: Client>(
        &self,
        order: impl Fn(usize) -> Vec<K>,
        mut run: impl FnMut(K, usize) -> anyhow::Result<RestReport>,
    ) -> anyhow::Result<Vec<Level<K>>> {
        let mut levels = Vec::new();
        for &concurrency in self.concurrencies {
            let mut level = Level {
                concurrency,
                slices: Vec::new(),
                set_aside: Vec::new(),
                others_before: Vec::new(),
            };
            for round in 0..self.rounds {
                for attempt in 0..2 {
                    if !self.quiet_wait.is_zero() {
                        let others = wait_for_quiet(crate::sysinfo::QUIET_CORES, self.quiet_wait);
                        level.others_before.extend(others);
                    }
                    let mut slices = Vec::new();
                    for (position, protocol) in order(round).into_iter().enumerate() {
                        let before = CpuSnapshot::take();
                        let report = run(protocol, concurrency).with_context(|| {
                            format!("{} at concurrency {concurrency}", protocol.label())
                        })?;
                        let slice = Slice {
                            protocol,
                            round,
                            position,
                            report,
                            cpu: cpu_since(before),
                        };
                        self.log(&slice, concurrency);
                        slices.push(slice);
                    }
                    let worst = slices
                        .iter()
                        .filter_map(|s| s.cpu.map(|c| c.other_cores))
                        .fold(0.0, f64::max);
                    if attempt == 0 && worst > CONTENDED_CORES {
                        eprintln!(
                            "[{}]   other processes took {worst:.2} cores during round {}: running it again",
                            self.tag,
                            round + 1
                        );
                        level.set_aside.extend(slices);
                        continue;
                    }
                    level.slices.extend(slices);
                    break;
                }
            }
            levels.push(level);
        }
        Ok(levels)
    }

    fn log<K: Client>(&self, s: &Slice<K>, concurrency: usize) {
        let report = &s.report;
        eprintln!(
            "[{}]   c={concurrency} round {} {:<11}: {:>7.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} errors{}",
            self.tag,
            s.round + 1,
            s.protocol.label(),
            report.requests_per_sec(),
            report.latency_ms(0.5),
            report.latency_ms(0.99),
            report.error_count(),
            s.cpu.map_or(String::new(), |c| format!(
                ", cores server {:.2} client {:.2} others {:.2}",
                c.server_cores(),
                c.loadgen_cores,
                c.other_cores
            )),
        );
    }
}

/// One client at one level for one round: warm-up, then the measured period.
async fn slice(
    protocol: Protocol,
    concurrency: usize,
    target: &Target,
    options: &ProtocolsOptions,
) -> anyhow::Result<RestReport> {
    match protocol {
        Protocol::RestJson | Protocol::RestBinary => {
            let slice = RestSlice {
                concurrency,
                rows: options.rows,
                binary: protocol == Protocol::RestBinary,
                warmup: options.warmup,
                duration: options.duration,
            };
            rest::run(&options.mlp.rest_load(target.http, slice)).await
        }
        Protocol::GrpcUnary | Protocol::GrpcStream => {
            let load = GrpcLoad {
                addr: target.grpc,
                concurrency,
                rows: options.rows,
                warmup: options.warmup,
                duration: options.duration,
                connections: options.grpc_connections,
                stream_window: options.stream_window,
                request_timeout: options.mlp.request_timeout,
            };
            match protocol {
                Protocol::GrpcUnary => grpc_client::run_unary(&load).await,
                _ => grpc_client::run_stream(&load).await,
            }
        }
    }
}
