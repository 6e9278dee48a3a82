//! `loadgen bench`'s measurements as `results.json` and `report.md` (`templates/bench.md.j2`),
//! with the report's capacity plan; kept apart from the code that starts the servers and
//! measures them.

use std::path::Path;
use std::time::Duration;

use super::{BenchOptions, InProcess, ServerResults, ServerSetup, PLOT_FILE};
use crate::report::results_dir;
use crate::rest::RestReport;
use crate::sysinfo::CpuShare;

/// Example targets of the report's capacity plan (`loadgen capacity` computes any other).
pub const PLAN_SLO_MS: f64 = 50.0;
pub const PLAN_TARGET_RPS: f64 = 10_000.0;
pub const PLAN_TARGET_STREAMS: u64 = 1_000;

/// The report's capacity plan: this run's curves, and the newest streams-bench results.
pub(super) fn capacity_section(json: &serde_json::Value) -> String {
    let streams_dir = crate::capacity::latest(&results_dir(), "-streams-vad");
    let streams = streams_dir
        .as_ref()
        .and_then(|d| crate::plots::read_results(d).ok().map(|v| (d, v)));
    let streams_name = streams.as_ref().map(|(d, _)| {
        format!(
            "results/{}/results.json",
            d.file_name().unwrap_or_default().to_string_lossy()
        )
    });
    let mut md = format!(
        "\n## Capacity plan\n\nExample: {PLAN_TARGET_RPS:.0} req/s of `mlp` at p99 ≤ {PLAN_SLO_MS} ms (the \
         manifest's `slo_ms` for `mlp`), and {PLAN_TARGET_STREAMS} concurrent real-time VAD streams. Any other \
         target: `cargo run --release -p streamserve-load -- capacity --target-rps N --slo-ms M [--streams S]`.\n\n"
    );
    md.push_str(&crate::capacity::plan(
        Some((json, "this run")),
        streams
            .as_ref()
            .zip(streams_name.as_deref())
            .map(|((_, v), name)| (v, name)),
        Some(PLAN_TARGET_RPS),
        PLAN_SLO_MS,
        Some(PLAN_TARGET_STREAMS),
    ));
    md
}

fn run_json(r: &RestReport, cpu: Option<CpuShare>) -> serde_json::Value {
    crate::report::context(&r.to_json(), &[serde_json::json!({ "cpu_cores": cpu })])
}

pub(super) fn results_json(
    start: &crate::report::Start,
    options: &BenchOptions,
    ceiling: &InProcess,
    batch1: &InProcess,
    servers: &[ServerResults],
) -> serde_json::Value {
    let body = serde_json::json!({
        "binary_tensor_data": options.binary,
        "in_process_ceiling": ceiling,
        "in_process_batch1": batch1,
        "servers": servers.iter().map(|s| serde_json::json!({
            "setup": s.setup,
            "runs": s.runs.iter().zip(&s.cpu).map(|(r, c)| run_json(r, *c)).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    start.results_json(None, &options.common.command, body)
}

/// `report.md` from `templates/bench.md.j2`: the results JSON, the rows of the results table
/// (each concurrency's run of batching on, off and the peer), the errors; the observations are the template's.
pub(super) fn render_report(
    json: &serde_json::Value,
    elapsed: Duration,
    options: &BenchOptions,
    model_file: &Path,
    sha256: &str,
    servers: &[ServerResults],
) -> anyhow::Result<String> {
    let peer_label = ServerSetup::peer().label;
    let run_of = |label: &str, c: usize| {
        let s = json["servers"]
            .as_array()?
            .iter()
            .find(|s| s["setup"]["label"] == label)?;
        s["runs"]
            .as_array()?
            .iter()
            .find(|r| r["concurrency"] == c)
            .cloned()
    };
    let levels: Vec<serde_json::Value> = options
        .concurrencies
        .iter()
        .map(|&c| {
            serde_json::json!({
                "c": c, "on": run_of(&ServerSetup::batching_on().label, c),
                "off": run_of(&ServerSetup::batching_off().label, c), "peer": run_of(&peer_label, c),
            })
        })
        .collect();
    let error_lines: Vec<String> = servers
        .iter()
        .flat_map(|s| s.runs.iter().map(move |r| (s, r)))
        .filter_map(|(s, r)| {
            let e = r.first_error.as_ref()?;
            Some(format!(
                "- {} c={}: {:?} — first: {e}",
                s.setup.label, r.concurrency, r.errors
            ))
        })
        .collect();
    let header = crate::report::header(
        "streamserve REST micro-benchmark: `mlp`, batching on vs off",
        elapsed,
        &[],
        false,
    );
    let extra = serde_json::json!({
        "model_file": model_file.display().to_string(), "sha256": sha256,
        "warmup_s": options.warmup.as_secs_f64(), "duration_s": options.duration.as_secs_f64(),
        "client_threads": options.common.threads.get(), "peer_label": peer_label,
        "has_peer": servers.iter().any(|s| s.setup.label == peer_label),
        "levels": levels, "error_lines": error_lines, "plot": PLOT_FILE,
        "on_label": ServerSetup::batching_on().label, "off_label": ServerSetup::batching_off().label,
        "delay_ms": ServerSetup::batching_on().max_queue_delay_ms,
    });
    crate::report::render("bench", &crate::report::context(json, &[header, extra]))
}
