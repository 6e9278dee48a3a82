//! `results.json` and `report.md` of a timeline run: the totals, the bins and the phases
//! between events with their counts and latency, the settle times, and the report rendered
//! from its template.

use std::time::Duration;

use serde_json::{json, Value};

use super::analysis::{phases, settle_times, span};
use super::measure::Measured;
use super::{TimelineOptions, PLOT_FILE, SCRAPE_EVERY};
use crate::open_loop::TimelineBin;
use crate::overload::{FALLBACK, MAX_QUEUE, SLO_MS};

pub(super) struct ReportInput<'a> {
    pub(super) start: &'a crate::report::Start,
    pub(super) elapsed: Duration,
    pub(super) options: &'a TimelineOptions,
    pub(super) manifest: &'a str,
    pub(super) measured: &'a Measured,
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

pub(super) fn results_json(input: &ReportInput<'_>) -> Value {
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
    let body = json!({
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
    });
    let command = &input.options.mlp.common.command;
    input.start.results_json(Some("timeline"), command, body)
}

/// `report.md` from `templates/timeline.md.j2`: the results JSON and the run's settings.
pub(super) fn render_report(input: &ReportInput<'_>, results: &Value) -> anyhow::Result<String> {
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
