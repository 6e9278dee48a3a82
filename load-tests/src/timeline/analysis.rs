//! What the time bins say: spans of bins added up, the share of requests disturbed, the
//! phases between events, and how long after each event the server takes to settle back
//! onto its base-rate baseline.

use std::time::Duration;

use serde_json::{json, Value};

use super::EventRecord;
use crate::open_loop::TimelineBin;

/// Totals over a span of bins: its length in seconds, and its bins added up as one.
pub(super) fn span<'a>(
    bins: impl IntoIterator<Item = &'a TimelineBin>,
    width: Duration,
) -> (f64, TimelineBin) {
    let mut total = TimelineBin::new(Duration::ZERO);
    let mut seconds = 0.0;
    for b in bins {
        seconds += width.as_secs_f64();
        total.add(b);
    }
    (seconds, total)
}

/// Share of a bin's scheduled requests that did not get a 200 from `mlp` itself.
fn disturbed_share(b: &TimelineBin) -> f64 {
    if b.scheduled == 0 {
        0.0
    } else {
        (b.ok_degraded + b.shed + b.failed + b.not_sent) as f64 / b.scheduled as f64
    }
}

/// The phases between events: (label, start, end).
pub(super) fn phases(events: &[EventRecord], duration: f64) -> Vec<(String, f64, f64)> {
    let mut out = Vec::new();
    let mut start = 0.0;
    let mut label = "base rate".to_string();
    for e in events {
        out.push((label, start, e.planned_s));
        start = e.planned_s;
        label = format!("after: {}", e.label);
    }
    out.push((label, start, duration));
    out
}

/// How long after each event the bins stay off the baseline (latency or service): the time
/// from the event to the first bin from which 1 s of bins (or all bins until the next event)
/// stay on it. The baseline is the base-rate phase after its first second.
pub(super) fn settle_times(
    bins: &[TimelineBin],
    width: Duration,
    events: &[EventRecord],
    duration: f64,
) -> (Option<(f64, f64)>, Vec<Value>) {
    let w = width.as_secs_f64();
    let first_event = events.first().map_or(duration, |e| e.planned_s);
    let (_, baseline) = span(
        bins.iter().filter(|b| {
            let t = b.start.as_secs_f64();
            t >= 1.0 && t + w <= first_event
        }),
        width,
    );
    let Some(base_p99) = baseline.latency_ms(0.99) else {
        return (None, Vec::new());
    };
    let base_share = disturbed_share(&baseline);
    let latency_limit = (3.0 * base_p99).max(base_p99 + 10.0);
    let share_limit = base_share + 0.02;
    let bad = |b: &TimelineBin| {
        b.scheduled > 0
            && (b.latency_ms(0.99).is_some_and(|p| p > latency_limit)
                || disturbed_share(b) > share_limit)
    };
    let need = ((1.0 / w).ceil() as usize).max(1);
    let settles = events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            // From the bin the event fell in (its requests may be the ones it delayed) to the
            // last bin that ends before the next event took effect.
            let until = events.get(i + 1).map_or(duration, |n| n.at_s);
            let window: Vec<&TimelineBin> = bins
                .iter()
                .filter(|b| {
                    let end = b.start.as_secs_f64() + w;
                    end > e.at_s && end <= until + 1e-9
                })
                .collect();
            // Settled from the first bin that starts a run of good bins lasting `need` (1 s),
            // or lasting until the next event when that comes sooner.
            let (mut streak, mut streak_start) = (0usize, None);
            for b in &window {
                if bad(b) {
                    (streak, streak_start) = (0, None);
                } else {
                    streak += 1;
                    streak_start.get_or_insert(b.start.as_secs_f64());
                    if streak >= need {
                        break;
                    }
                }
            }
            let settled_at = streak_start.filter(|_| streak > 0);
            let worst = |q: f64| {
                window
                    .iter()
                    .filter_map(|b| b.latency_ms(q))
                    .fold(0.0, f64::max)
            };
            json!({
                "event": e.label,
                "at_s": e.at_s,
                "off_baseline_s": settled_at.map(|t| (t - e.at_s).max(0.0)),
                "settled_before_next": settled_at.is_some(),
                "worst_bin_p99_ms": worst(0.99),
                "slowest_ms": worst(1.0),
            })
        })
        .collect();
    (Some((latency_limit, share_limit)), settles)
}
