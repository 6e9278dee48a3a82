//! `loadgen overload`'s `results.json` and `report.md` (`templates/overload.md.j2`): one set
//! of levels per admission variant, and each later variant against the first, level by level
//! (the before/after comparison).

use std::time::Duration;

use serde_json::{json, Value};

use super::{OverloadOptions, Variant, CAPACITY_WARMUP, MAX_QUEUE, PLOT_FILE, SLO_MS};
use crate::hist;
use crate::pinning::Pinning;
use crate::rest::RestReport;
use crate::sysinfo::CpuShare;

fn capacity_json(
    c: &RestReport,
    cpu: Option<CpuShare>,
    pinned: Option<super::server::PinnedCpu>,
) -> Value {
    json!({
        "concurrency": c.concurrency,
        "requests_per_s": c.requests_per_sec(),
        "ok": c.ok,
        "degraded": c.server_sums.degraded,
        "errors": c.errors,
        "latency_ms": { "p50": c.latency_ms(0.5), "p99": c.latency_ms(0.99) },
        "mean_batch_rows": c.mean_batch_rows(),
        "cpu_cores": cpu,
        "pinned_cpu": pinned,
    })
}

fn variant_json(v: &Variant) -> Value {
    let levels: Vec<Value> = v
        .levels
        .iter()
        .map(|l| {
            let r = &l.report;
            // Pinned, the server is another process: "others" would count it.
            let others = l.cpu.map(|c| {
                let server = l.pinned_cpu.map_or(0.0, |p| p.server_process_cores);
                (c.other_cores - server).max(0.0)
            });
            let more = json!({
                "multiplier": l.multiplier,
                "cpu_cores": l.cpu,
                "pinned_cpu": l.pinned_cpu,
                "other_processes_cores": others,
                "server_counters": l.server,
                "door_wait_mean_ms": l.server.and_then(|s| s.door_wait_mean_ms()),
                "admission_limit": l.admission_limit,
                "other_statuses": r.other_statuses(),
                "share_not_sent": r.share_not_sent(),
                "latency_primary_ms": {
                    "p50": hist::ms(&r.latency_primary_us, 0.5),
                    "p90": hist::ms(&r.latency_primary_us, 0.9),
                    "p99": hist::ms(&r.latency_primary_us, 0.99),
                },
            });
            crate::report::context(&r.to_json(), &[more])
        })
        .collect();
    let sum = |f: fn(&crate::open_loop::OpenLoopReport) -> u64| {
        v.levels.iter().map(|l| f(&l.report)).sum::<u64>()
    };
    json!({
        "admission": super::server::mode_name(v.admission),
        "label": v.label,
        "server_command": v.server_command,
        "capacity": capacity_json(&v.capacity, v.capacity_cpu, v.capacity_pinned_cpu),
        "levels": levels,
        "totals": {
            "sent": sum(|r| r.sent), "shed": sum(|r| r.shed()), "degraded": sum(|r| r.ok_degraded),
            "unanswered": sum(|r| r.unanswered),
        },
    })
}

/// `v ÷ base` where that means something (`None` when the base is 0 or either is missing).
fn ratio(v: &Value, base: &Value) -> Value {
    match (v.as_f64(), base.as_f64()) {
        (Some(v), Some(b)) if b > 0.0 && v.is_finite() => json!(v / b),
        _ => Value::Null,
    }
}

/// Each variant after the first against the first, level by level (levels are paired in
/// order: every variant runs the same multipliers): `[first, this, this ÷ first]` of
/// goodput and latencies, `[first, this]` of shares and counts.
pub fn comparison(variants: &[Value]) -> Vec<Value> {
    let Some((base, rest)) = variants.split_first() else {
        return Vec::new();
    };
    let empty = Vec::new();
    let levels = |v: &Value| v["levels"].as_array().unwrap_or(&empty).clone();
    rest.iter()
        .map(|v| {
            let pairs: Vec<Value> = levels(base)
                .iter()
                .zip(levels(v))
                .map(|(b, l)| {
                    let three = |get: &dyn Fn(&Value) -> Value| {
                        let (x, y) = (get(b), get(&l));
                        json!([x, y, ratio(&y, &x)])
                    };
                    let two = |key: &str| json!([b[key], l[key]]);
                    json!({
                        "multiplier": l["multiplier"],
                        "offered_per_s": l["offered_per_s"],
                        "goodput_per_s": three(&|x| x["goodput_per_s"].clone()),
                        "primary_p50_ms": three(&|x| x["latency_primary_ms"]["p50"].clone()),
                        "primary_p99_ms": three(&|x| x["latency_primary_ms"]["p99"].clone()),
                        "refusal_p99_ms": three(&|x| x["latency_refused_ms"]["p99"].clone()),
                        "share_degraded": two("share_degraded"),
                        "share_shed": two("share_shed"),
                        "unanswered": two("unanswered"),
                        "admission_limit": two("admission_limit"),
                    })
                })
                .collect();
            json!({ "label": v["label"], "baseline": base["label"], "levels": pairs })
        })
        .collect()
}

pub fn results_json(
    options: &OverloadOptions,
    start: &crate::report::Start,
    manifest: &str,
    pinning: Option<Pinning>,
    client_threads: usize,
    variants: &[Variant],
) -> Value {
    let variants_json: Vec<Value> = variants.iter().map(variant_json).collect();
    let first = variants_json.first();
    let body = json!({
        "manifest": manifest,
        "pinned": pinning,
        "client_threads": client_threads,
        "multipliers": options.multipliers,
        // The offered rates' basis: the first variant's capacity.
        "capacity": first.map(|v| v["capacity"].clone()),
        "capacity_from": first.map(|v| v["label"].clone()),
        "comparison": comparison(&variants_json),
        "variants": variants_json,
    });
    start.results_json(Some("overload"), &options.mlp.common.command, body)
}

/// The file a pinned variant's server output goes to, beside the report.
pub fn server_log_file(label: &str) -> String {
    let name: String = label
        .chars()
        .filter_map(|c| match c {
            'a'..='z' | '0'..='9' => Some(c),
            ' ' => Some('-'),
            _ => None,
        })
        .collect();
    format!("server-{name}.log")
}

/// A server's output, its first 100 and last 300 lines when longer than 400.
pub fn log_excerpt(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    if lines.len() <= 400 {
        return log.to_string();
    }
    format!(
        "{}\n[... {} lines left out ...]\n{}\n",
        lines[..100].join("\n"),
        lines.len() - 400,
        lines[lines.len() - 300..].join("\n")
    )
}

/// `report.md` from `templates/overload.md.j2`: the results JSON and the settings the
/// report states.
pub fn render_report(
    json: &Value,
    elapsed: Duration,
    options: &OverloadOptions,
) -> anyhow::Result<String> {
    let levels = || {
        json["variants"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|v| v["levels"].as_array().into_iter().flatten())
    };
    let others = levels()
        .filter_map(|l| l["other_processes_cores"].as_f64())
        .fold(0.0, f64::max);
    let busy = |key: &'static str| levels().filter_map(move |l| l["pinned_cpu"][key].as_f64());
    let server_busy = busy("server_cpu_busy").reduce(f64::min);
    let loadgen_busy = busy("loadgen_cpu_busy").reduce(f64::max);
    let extra = json!({
        "slo_ms": SLO_MS, "max_queue": MAX_QUEUE, "binary": options.mlp.binary,
        "capacity_warmup_s": CAPACITY_WARMUP.as_secs_f64(),
        "capacity_measured_s": options.mlp.capacity_duration.as_secs_f64(),
        "warmup_s": options.warmup.as_secs_f64(), "duration_s": options.duration.as_secs_f64(),
        "max_in_flight": options.mlp.max_in_flight,
        "plot": PLOT_FILE, "others": others,
        "server_busy": server_busy, "loadgen_busy": loadgen_busy,
        "log_files": json["variants"].as_array().into_iter().flatten()
            .filter(|v| !v["server_command"].is_null())
            .map(|v| server_log_file(v["label"].as_str().unwrap_or(""))).collect::<Vec<_>>(),
    });
    let title = if options.pin {
        "streamserve overload, pinned (server on one CPU, load generator on another): `mlp` past its capacity, door admission static vs adaptive"
    } else {
        "streamserve overload: `mlp` past its capacity, door admission static vs adaptive"
    };
    let header = crate::report::header(title, elapsed, &[], true);
    crate::report::render("overload", &crate::report::context(json, &[header, extra]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use streamserve::config::Admission;

    fn level(m: f64, goodput: f64, p99: f64, shed: f64) -> Value {
        json!({
            "multiplier": m, "offered_per_s": 1000.0 * m, "goodput_per_s": goodput,
            "latency_primary_ms": { "p50": p99 / 4.0, "p99": p99 },
            "latency_refused_ms": { "p99": 0.0 },
            "share_degraded": 0.0, "share_shed": shed, "unanswered": 0, "admission_limit": 0.0,
        })
    }

    #[test]
    fn later_variants_are_compared_with_the_first_level_by_level() {
        let variants = vec![
            json!({ "label": "static", "levels": [level(1.0, 1000.0, 20.0, 0.0), level(2.0, 900.0, 400.0, 0.1)] }),
            json!({ "label": "adaptive", "levels": [level(1.0, 1000.0, 10.0, 0.0), level(2.0, 1000.0, 40.0, 0.5)] }),
        ];
        let c = comparison(&variants);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0]["label"], "adaptive");
        assert_eq!(c[0]["baseline"], "static");
        let two = &c[0]["levels"][1];
        assert_eq!(two["multiplier"], 2.0);
        assert_eq!(two["goodput_per_s"], json!([900.0, 1000.0, 1000.0 / 900.0]));
        assert_eq!(two["primary_p99_ms"], json!([400.0, 40.0, 0.1]));
        assert_eq!(two["share_shed"], json!([0.1, 0.5]));
        // Nothing to divide by: no ratio.
        assert_eq!(two["refusal_p99_ms"][2], Value::Null);
        assert!(comparison(&variants[..1]).is_empty());
        assert!(comparison(&[]).is_empty());
    }

    fn open_loop(rate: f64, ok: u64, refused: u64) -> crate::open_loop::OpenLoopReport {
        let mut latency = hist::new(3);
        latency.record(2_000).unwrap();
        latency.record(40_000).unwrap();
        crate::open_loop::OpenLoopReport {
            url: "http://127.0.0.1:1".into(),
            model: "mlp".into(),
            rows: 1,
            binary: false,
            rate,
            measured: Duration::from_secs(2),
            max_in_flight: 2048,
            scheduled: ok + refused,
            sent: ok + refused,
            not_sent: 0,
            ok_primary: ok,
            ok_degraded: 0,
            statuses: [(429, refused)].into_iter().filter(|s| s.1 > 0).collect(),
            transport: 0,
            invalid: 0,
            unanswered: 0,
            first_error: None,
            latency_ok_us: latency.clone(),
            latency_primary_us: latency.clone(),
            latency_shed_us: latency,
            max_schedule_lag: Duration::from_millis(3),
            peak_in_flight: 100,
            started: std::time::Instant::now(),
            timeline: Vec::new(),
        }
    }

    fn variant(admission: Admission, pinned: bool) -> Variant {
        let label = super::super::server::mode_name(admission).to_string();
        let capacity = RestReport {
            url: "http://127.0.0.1:1".into(),
            model: "mlp".into(),
            concurrency: 128,
            rows: 1,
            binary: false,
            measured: Duration::from_secs(2),
            ok: 20_000,
            errors: Default::default(),
            warmup_requests: 0,
            warmup_errors: 0,
            first_error: None,
            latency_us: hist::new(3),
            server_sums: Default::default(),
        };
        let cpu = pinned.then_some(super::super::server::PinnedCpu {
            server_cpu_busy: 0.99,
            loadgen_cpu_busy: 0.7,
            server_process_cores: 0.98,
        });
        let levels = [1.0, 3.0]
            .into_iter()
            .map(|m| super::super::Level {
                multiplier: m,
                report: open_loop(10_000.0 * m, 18_000, if m > 1.0 { 30_000 } else { 0 }),
                cpu: None,
                pinned_cpu: cpu,
                server: Some(Default::default()),
                admission_limit: Some(if admission == Admission::Static {
                    0.0
                } else {
                    48.0
                }),
            })
            .collect();
        Variant {
            admission,
            label,
            capacity,
            capacity_cpu: None,
            capacity_pinned_cpu: cpu,
            levels,
            server_command: pinned.then(|| "taskset -c 0 streamserve serve".to_string()),
            server_log: None,
        }
    }

    #[test]
    fn the_report_has_a_table_per_variant_and_the_comparison() {
        for pin in [false, true] {
            let mut options = crate::cli::defaults::<OverloadOptions>();
            options.pin = pin;
            let start = crate::report::Start::now(Some(std::path::Path::new("/nonexistent")), "x");
            let variants = [
                variant(Admission::Static, pin),
                variant(Admission::Adaptive, pin),
            ];
            let pinning = pin.then_some(Pinning {
                server_cpu: 0,
                loadgen_cpu: 1,
            });
            let json = results_json(&options, &start, "[models]\n", pinning, 1, &variants);
            assert_eq!(json["capacity_from"], "static");
            assert_eq!(json["variants"].as_array().unwrap().len(), 2);
            let md = render_report(&json, Duration::from_secs(1), &options).unwrap();
            for text in [
                "### static",
                "### adaptive",
                "### adaptive against static",
                "| 3× | 30000 |",
                "none → 48",
            ] {
                assert!(md.contains(text), "{text} missing (pin {pin}):\n{md}");
            }
            assert_eq!(md.contains("**Pinned**"), pin, "{md}");
            assert_eq!(
                md.contains("the server's CPU was the bottleneck"),
                pin,
                "{md}"
            );
            assert!(md.contains("unanswered = 0 throughout"), "{md}");
        }
    }

    #[test]
    fn log_files_and_excerpts() {
        assert_eq!(server_log_file("static"), "server-static.log");
        assert_eq!(server_log_file("adaptive #2"), "server-adaptive-2.log");
        let short = "a\nb\n";
        assert_eq!(log_excerpt(short), short);
        let long: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        let excerpt = log_excerpt(&long);
        assert!(excerpt.starts_with("line 0\n"));
        assert!(excerpt.contains("[... 600 lines left out ...]"));
        assert!(excerpt.trim_end().ends_with("line 999"));
        assert!(!excerpt.contains("line 100\n"));
    }
}
