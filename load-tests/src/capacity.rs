//! Capacity planning from measured curves (`loadgen capacity`, and the section of the bench
//! report): the highest throughput one instance reached with p99 within an SLO, and how
//! many instances of that size a target needs with 30 % headroom; the same for concurrent
//! real-time streams from a `streams-bench` run.
//!
//! The figures come from whatever machine ran the benchmark (the committed ones: 2 cores,
//! the load generator sharing them with the server), so they are per-instance lower bounds
//! for an instance of that size, not a substitute for measuring the target deployment.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// Headroom kept on every instance: plan each to run at most at 70 % of what it sustained.
pub const HEADROOM: f64 = 0.30;

/// The best closed-loop level of one server that kept p99 within the SLO.
#[derive(Clone, Debug, PartialEq)]
pub struct RestPoint {
    pub label: String,
    /// `None` when no level met the SLO.
    pub best: Option<(f64, u64, f64)>, // (requests/s, concurrency, p99 ms)
}

/// Per server in a `bench` results.json: the highest requests/s among levels with p99 ≤ `slo_ms`
/// and no errors.
pub fn rest_points(bench: &Value, slo_ms: f64) -> Vec<RestPoint> {
    let Some(servers) = bench["servers"].as_array() else {
        return Vec::new();
    };
    servers
        .iter()
        .map(|s| {
            let best = s["runs"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|r| {
                    r["latency_ms"]["p99"].as_f64().is_some_and(|p| p <= slo_ms)
                        && r["errors"].as_object().is_none_or(|e| e.is_empty())
                })
                .map(|r| {
                    (
                        r["requests_per_s"].as_f64().unwrap_or(0.0),
                        r["concurrency"].as_u64().unwrap_or(0),
                        r["latency_ms"]["p99"].as_f64().unwrap_or(0.0),
                    )
                })
                .max_by(|a, b| a.0.total_cmp(&b.0));
            RestPoint {
                label: s["setup"]["label"].as_str().unwrap_or("?").to_string(),
                best,
            }
        })
        .collect()
}

/// Per setup in a `streams-bench` results.json: the largest number of streams that passed.
pub fn stream_points(streams: &Value) -> Vec<(String, Option<u64>)> {
    streams["servers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            (
                s["setup"]["label"].as_str().unwrap_or("?").to_string(),
                s["capacity_streams"].as_u64(),
            )
        })
        .collect()
}

/// Instances needed to carry `target` when each may run at (1 - headroom) of `per_instance`.
pub fn instances(target: f64, per_instance: f64) -> Option<u64> {
    let usable = per_instance * (1.0 - HEADROOM);
    (usable > 0.0).then(|| (target / usable).ceil().max(1.0) as u64)
}

/// The newest `results/<date>-<suffix>/results.json` (by directory name; `tmp-*` ignored).
pub fn latest(results_dir: &Path, suffix: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(results_dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(suffix) && !n.starts_with("tmp-"))
                && p.join("results.json").is_file()
        })
        .collect();
    dirs.sort();
    dirs.pop()
}

fn machine_line(results: &Value) -> String {
    let m = &results["machine"];
    format!(
        "{} logical CPUs ({}), load average at start {}",
        m["nproc"].as_u64().unwrap_or(0),
        m["cpu_model"].as_str().unwrap_or("unknown"),
        m["loadavg_at_start"].as_str().unwrap_or("unknown")
    )
}

/// The capacity plan in Markdown (`templates/capacity.md.j2`): REST at `slo_ms` (and the
/// target, if any) from `bench`, streams (and the target, if any) from `streams`.
pub fn plan(
    bench: Option<(&Value, &str)>,
    streams: Option<(&Value, &str)>,
    target_rps: Option<f64>,
    slo_ms: f64,
    target_streams: Option<u64>,
) -> String {
    let dash = |n: Option<u64>| n.map_or("—".to_string(), |n| n.to_string());
    let rest = bench.map(|(bench, source)| {
        let points: Vec<Value> = rest_points(bench, slo_ms)
            .into_iter()
            .map(|p| {
                let n = p
                    .best
                    .and_then(|b| target_rps.and_then(|t| instances(t, b.0)));
                serde_json::json!({ "label": p.label, "best": p.best, "instances": dash(n) })
            })
            .collect();
        serde_json::json!({
            "source": source, "machine": machine_line(bench), "points": points,
            "target": target_rps.map_or("—".to_string(), |t| format!("{t:.0} req/s")),
        })
    });
    let streams = streams.map(|(streams, source)| {
        let points: Vec<Value> = stream_points(streams)
            .into_iter()
            .map(|(label, cap)| {
                let n =
                    cap.and_then(|c| target_streams.and_then(|t| instances(t as f64, c as f64)));
                serde_json::json!({ "label": label, "cap": cap, "instances": dash(n) })
            })
            .collect();
        serde_json::json!({
            "source": source, "machine": machine_line(streams), "points": points,
            "target_ms": streams["target_p99_ms"].as_f64().unwrap_or(100.0),
            "target": target_streams.map_or("—".to_string(), |t| format!("{t} streams")),
        })
    });
    let context = serde_json::json!({
        "headroom": HEADROOM, "slo_ms": slo_ms, "rest": rest, "streams": streams,
    });
    crate::report::render("capacity", &context).expect("the capacity plan renders")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_point_respects_the_slo_and_errors() {
        let bench = serde_json::json!({ "servers": [
            { "setup": { "label": "on" }, "runs": [
                { "concurrency": 1, "requests_per_s": 3000.0, "errors": {}, "latency_ms": { "p99": 0.5 } },
                { "concurrency": 32, "requests_per_s": 9000.0, "errors": {}, "latency_ms": { "p99": 8.0 } },
                { "concurrency": 128, "requests_per_s": 9500.0, "errors": {}, "latency_ms": { "p99": 40.0 } },
                { "concurrency": 256, "requests_per_s": 9900.0, "errors": { "timeout": 1 }, "latency_ms": { "p99": 5.0 } } ] },
            { "setup": { "label": "peer" }, "runs": [
                { "concurrency": 1, "requests_per_s": 1000.0, "errors": {}, "latency_ms": { "p99": 20.0 } } ] } ] });
        let points = rest_points(&bench, 10.0);
        assert_eq!(points[0].best, Some((9000.0, 32, 8.0)));
        assert_eq!(points[1].best, None);
        assert_eq!(rest_points(&bench, 50.0)[0].best.unwrap().0, 9500.0);
    }

    #[test]
    fn instances_keep_thirty_percent_headroom() {
        assert_eq!(instances(10_000.0, 7_000.0), Some(3)); // 4 900 usable each
        assert_eq!(instances(4_900.0, 7_000.0), Some(1));
        assert_eq!(instances(1.0, 0.0), None);
        assert_eq!(instances(1000.0, 400.0), Some(4)); // 280 usable each
    }

    #[test]
    fn plan_mentions_the_machine_caveat() {
        let streams = serde_json::json!({ "target_p99_ms": 100.0, "machine": { "nproc": 2 },
            "servers": [ { "setup": { "label": "batching on" }, "capacity_streams": 400 } ] });
        let md = plan(None, Some((&streams, "x")), None, 50.0, Some(1000));
        assert!(md.contains("2-core machine"));
        assert!(md.contains("| batching on | 400 | 280 | 4 |"), "{md}");
    }
}
