//! `loadgen protocols`'s measurements as `results.json` and `report.md`
//! (`templates/protocols.md.j2`): each client's slices at a level combined into one run, its
//! CPU (server, client, others) and CPU per request, and its ratios to the baseline client
//! measured at the same level in the same run. The slices, levels and their JSON are generic
//! over the [`Client`] compared, so that `loadgen monitoring` (server variants) and `loadgen
//! jobs` (loads with and without a job) share them, and the report's rendering
//! ([`render_report`]).

use std::time::Duration;

use serde_json::{json, Value};

use super::options::{Protocol, ProtocolsOptions, CONTENDED_CORES};
use super::tally;
use crate::bench::ServerSetup;
use crate::rest::RestReport;
use crate::stream_steps::ratio;
use crate::sysinfo::{CpuShare, MachineInfo};

/// What a benchmark compares side by side at each level: a protocol here, a server variant in
/// `loadgen monitoring`.
pub trait Client: Copy + PartialEq {
    /// The name in `results.json`.
    fn key(self) -> &'static str;
    /// The name in the report.
    fn label(self) -> &'static str;
}

impl Client for Protocol {
    fn key(self) -> &'static str {
        Protocol::key(self)
    }
    fn label(self) -> &'static str {
        Protocol::label(self)
    }
}

/// One client's run at one level, in one round.
#[derive(Clone, Debug)]
pub struct Slice<K = Protocol> {
    pub protocol: K,
    pub round: usize,
    /// Its place in the round's order, from 0.
    pub position: usize,
    pub report: RestReport,
    /// CPU used during the slice (its warm-up included).
    pub cpu: Option<CpuShare>,
}

/// Every slice of one concurrency level, in the order they ran.
#[derive(Clone, Debug)]
pub struct Level<K = Protocol> {
    pub concurrency: usize,
    pub slices: Vec<Slice<K>>,
    /// Slices of rounds run again because other processes took the CPU meanwhile: kept in
    /// `results.json`, not counted.
    pub set_aside: Vec<Slice<K>>,
    /// Cores other processes used in the last second before each round (the quiet check).
    pub others_before: Vec<f64>,
}

/// A run against the baseline's at the same level: throughput (req/s) and p50 / p99 latency
/// ratios; latency ones only where both had successes.
pub fn ratios(run: &RestReport, base: &RestReport) -> Value {
    let latency = |q: f64| {
        (run.ok > 0 && base.ok > 0)
            .then(|| ratio(run.latency_ms(q), base.latency_ms(q)))
            .flatten()
    };
    json!({
        "throughput": ratio(run.requests_per_sec(), base.requests_per_sec()),
        "p50": latency(0.5),
        "p99": latency(0.99),
    })
}

/// The mean of the slices' CPU shares (the slices are of equal length); `None` if any is
/// unknown.
pub fn mean_cpu(shares: &[Option<CpuShare>]) -> Option<CpuShare> {
    let known: Vec<CpuShare> = shares.iter().copied().collect::<Option<_>>()?;
    let n = known.len() as f64;
    (n > 0.0).then(|| CpuShare {
        own_cores: known.iter().map(|c| c.own_cores).sum::<f64>() / n,
        other_cores: known.iter().map(|c| c.other_cores).sum::<f64>() / n,
        loadgen_cores: known.iter().map(|c| c.loadgen_cores).sum::<f64>() / n,
    })
}

/// CPU time per successful request in microseconds: `cores` busy while `per_s` requests a
/// second were answered. The CPU covers the warm-up too, at about the same rate.
pub fn us_per_request(cores: f64, per_s: f64) -> Option<f64> {
    ratio(cores * 1e6, per_s)
}

/// The CPU of a run: the in-process server's threads, the load generator's (`loadgen*`), and
/// every other process, in cores, and the first two per request.
fn cpu_json(cpu: Option<CpuShare>, per_s: f64) -> Value {
    let Some(c) = cpu else {
        return Value::Null;
    };
    json!({
        "server_cores": c.server_cores(), "client_cores": c.loadgen_cores,
        "process_cores": c.own_cores, "other_cores": c.other_cores,
        "server_us_per_request": us_per_request(c.server_cores(), per_s),
        "client_us_per_request": us_per_request(c.loadgen_cores, per_s),
    })
}

/// One client at one level: its slices combined ([`tally::combine_slices`]), each slice's own
/// figures, the CPU, and the ratios to `base` (the baseline's combined run, if measured).
fn run_json<K: Client>(
    protocol: K,
    slices: &[&Slice<K>],
    base: Option<&RestReport>,
) -> Option<Value> {
    let all = tally::combine_slices(slices.iter().map(|s| s.report.clone()).collect())?;
    let cpu = mean_cpu(&slices.iter().map(|s| s.cpu).collect::<Vec<_>>());
    let each: Vec<Value> = slices
        .iter()
        .map(|s| {
            json!({
                "round": s.round, "position": s.position,
                "requests_per_s": s.report.requests_per_sec(),
                "p50": s.report.latency_ms(0.5), "p99": s.report.latency_ms(0.99),
                "errors": s.report.error_count(), "cpu_cores": s.cpu,
            })
        })
        .collect();
    let extra = json!({
        "protocol": protocol.key(), "label": protocol.label(),
        "cpu": cpu_json(cpu, all.requests_per_sec()),
        "slices": each,
        "ratios": base.map(|b| ratios(&all, b)),
    });
    Some(crate::report::context(&all.to_json(), &[extra]))
}

/// Per level, each of `clients` (the first is the baseline) combined over its slices, with
/// its ratios to the baseline; the order of each of the `rounds`, and what was set aside.
pub fn levels_json<K: Client>(
    levels: &[Level<K>],
    clients: &[K],
    order: impl Fn(usize) -> Vec<K>,
    rounds: usize,
) -> Vec<Value> {
    levels
        .iter()
        .map(|level| {
            let of = |p: K| -> Vec<&Slice<K>> {
                level.slices.iter().filter(|s| s.protocol == p).collect()
            };
            let base_run =
                tally::combine_slices(of(clients[0]).iter().map(|s| s.report.clone()).collect());
            let runs: Vec<Value> = clients
                .iter()
                .filter_map(|&p| run_json(p, &of(p), base_run.as_ref()))
                .collect();
            let order: Vec<Vec<&str>> = (0..rounds)
                .map(|r| order(r).iter().map(|p| p.key()).collect())
                .collect();
            let set_aside: Vec<Value> = level
                .set_aside
                .iter()
                .map(|s| {
                    json!({
                        "protocol": s.protocol.key(), "round": s.round,
                        "requests_per_s": s.report.requests_per_sec(),
                        "p50": s.report.latency_ms(0.5), "p99": s.report.latency_ms(0.99),
                        "errors": s.report.error_count(), "cpu_cores": s.cpu,
                    })
                })
                .collect();
            json!({
                "concurrency": level.concurrency, "order": order,
                "others_before_cores": level.others_before, "runs": runs,
                "set_aside": set_aside,
            })
        })
        .collect()
}

/// `results.json`: the run's settings, and per level each client's combined run.
pub fn results_json(
    (machine, started_at): (&MachineInfo, &str),
    options: &ProtocolsOptions,
    setup: &ServerSetup,
    grpc_addr: &str,
    levels: &[Level],
) -> Value {
    let base = options.baseline();
    let order = |round| options.order(round);
    let levels = levels_json(levels, &options.protocols, order, options.rounds);
    let body = json!({
        "setup": setup,
        "grpc_addr": grpc_addr,
        "protocols": options.protocols.iter().map(|p| json!({"key": p.key(), "label": p.label()})).collect::<Vec<_>>(),
        "baseline": base.key(),
        "baseline_label": base.label(),
        "rows_per_request": options.rows,
        "rounds": options.rounds,
        "warmup_s": options.warmup.as_secs_f64(),
        "slice_s": options.duration.as_secs_f64(),
        "grpc_connections": options.grpc_connections,
        "stream_window": options.stream_window,
        "client_threads": options.mlp.common.threads.get(),
        "admission": options.admission,
        "contended_cores": CONTENDED_CORES,
        "levels": levels,
    });
    let head = (machine, started_at);
    crate::report::results_json(Some("protocols"), head, &options.mlp.common.command, body)
}

/// The report's list of errors: one line per run that had any, with its first error.
pub fn error_lines(results: &Value) -> Vec<String> {
    let mut lines = Vec::new();
    for level in results["levels"].as_array().into_iter().flatten() {
        for run in level["runs"].as_array().into_iter().flatten() {
            if let Some(first) = run["first_error"].as_str() {
                lines.push(format!(
                    "- {} c={}: {} — first: {first}",
                    run["label"].as_str().unwrap_or("?"),
                    level["concurrency"],
                    run["errors"]
                ));
            }
        }
    }
    lines
}

/// The title of `protocols`' report.
pub const TITLE: &str = "streamserve protocols: REST JSON, REST binary, gRPC unary and gRPC streaming on `mlp`, side by side";

/// `report.md` from `templates/<template>.md.j2` over `results` (`protocols`', and those of
/// `monitoring` and `jobs`, which measure as it does), with the header titled `title` and the
/// errors listed.
pub fn render_report(
    (template, title): (&str, &str),
    results: &Value,
    elapsed: Duration,
    (model_file, sha256): (&std::path::Path, &str),
    plot: &str,
) -> anyhow::Result<String> {
    let header = crate::report::header(title, elapsed, &[], true);
    let extra = json!({
        "model_file": model_file.display().to_string(), "sha256": sha256,
        "error_lines": error_lines(results), "plot": plot,
    });
    crate::report::render(template, &crate::report::context(results, &[header, extra]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(ok: u64, latency_us: u64) -> RestReport {
        let mut r = RestReport::empty("x", "mlp", 8, 1, false);
        r.measured = Duration::from_secs(2);
        r.ok = ok;
        for _ in 0..ok {
            r.latency_us.record(latency_us).unwrap();
        }
        r
    }

    #[test]
    fn ratios_to_the_baseline() {
        assert_eq!(ratio(3.0, 2.0), Some(1.5));
        assert_eq!(ratio(1.0, 0.0), None);
        assert_eq!(ratio(f64::NAN, 1.0), None);
        let r = ratios(&run(3000, 500), &run(2000, 1000));
        assert_eq!(r["throughput"], 1.5);
        assert!((r["p50"].as_f64().unwrap() - 0.5).abs() < 0.01, "{r}");
        assert!((r["p99"].as_f64().unwrap() - 0.5).abs() < 0.01, "{r}");
        // A client with no success: throughput 0 ×, no latency ratio.
        let none = ratios(&run(0, 0), &run(2000, 1000));
        assert_eq!(none["throughput"], 0.0);
        assert!(none["p50"].is_null());
        assert!(ratios(&run(10, 100), &run(0, 0))["throughput"].is_null());
    }

    #[test]
    fn cpu_means_and_per_request() {
        let a = CpuShare {
            own_cores: 2.0,
            other_cores: 0.0,
            loadgen_cores: 0.5,
        };
        let b = CpuShare {
            own_cores: 1.0,
            other_cores: 0.2,
            loadgen_cores: 0.5,
        };
        let m = mean_cpu(&[Some(a), Some(b)]).unwrap();
        assert_eq!(
            (m.own_cores, m.other_cores, m.loadgen_cores),
            (1.5, 0.1, 0.5)
        );
        assert_eq!(m.server_cores(), 1.0);
        assert!(mean_cpu(&[Some(a), None]).is_none());
        assert!(mean_cpu(&[]).is_none());
        assert_eq!(us_per_request(1.0, 10_000.0), Some(100.0));
        assert_eq!(us_per_request(1.0, 0.0), None);
        let cpu = cpu_json(Some(a), 5000.0);
        assert_eq!(cpu["server_us_per_request"], 300.0);
        assert_eq!(cpu["client_us_per_request"], 100.0);
    }

    #[test]
    fn results_and_report_from_slices() {
        let options = ProtocolsOptions {
            protocols: vec![Protocol::RestJson, Protocol::GrpcUnary],
            concurrencies: vec![8],
            ..ProtocolsOptions::default()
        };
        let slice = |protocol, round, ok| Slice {
            protocol,
            round,
            position: 0,
            report: run(ok, 700),
            cpu: Some(CpuShare {
                own_cores: 1.8,
                other_cores: 0.01,
                loadgen_cores: 0.6,
            }),
        };
        let mut failed = run(4000, 400);
        failed.errors.insert("grpc Unavailable".into(), 2);
        failed.first_error = Some("grpc Unavailable: shutting down".into());
        let mut last = slice(Protocol::GrpcUnary, 1, 0);
        last.report = failed;
        let level = Level {
            concurrency: 8,
            slices: vec![
                slice(Protocol::RestJson, 0, 2000),
                slice(Protocol::GrpcUnary, 0, 4000),
                last,
                slice(Protocol::RestJson, 1, 2000),
            ],
            set_aside: vec![slice(Protocol::RestJson, 0, 10)],
            others_before: vec![0.02],
        };
        let machine = MachineInfo::collect();
        let setup = ServerSetup::batching_on();
        let json = results_json((&machine, "now"), &options, &setup, "127.0.0.1:1", &[level]);
        let runs = &json["levels"][0]["runs"];
        assert_eq!(runs[0]["protocol"], "rest-json");
        assert_eq!(runs[0]["ratios"]["throughput"], 1.0);
        assert_eq!(runs[1]["requests_per_s"], 2000.0);
        assert_eq!(runs[1]["ratios"]["throughput"], 2.0);
        assert_eq!(runs[1]["slices"].as_array().unwrap().len(), 2);
        assert_eq!(json["levels"][0]["order"][1][0], "grpc-unary");
        assert_eq!(json["levels"][0]["set_aside"][0]["requests_per_s"], 5.0);
        let file = ("m.onnx".as_ref(), "abc");
        let report = render_report(
            ("protocols", TITLE),
            &json,
            Duration::from_secs(3),
            file,
            "p.svg",
        )
        .unwrap();
        assert!(report.contains("gRPC unary"), "{report}");
        assert!(report.contains("2.00×"), "{report}");
        assert!(
            report.contains("grpc Unavailable: shutting down"),
            "{report}"
        );
    }
}
