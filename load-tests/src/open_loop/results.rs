//! What an open-loop run measured ([`OpenLoopReport`], with its [`TimelineBin`]s) and the
//! figures, JSON and summary derived from it; kept apart from the scheduler that fills it in.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::hist::{self, Histogram};

/// How the requests scheduled in the measured period ended.
#[derive(Clone, Debug)]
pub struct OpenLoopReport {
    pub url: String,
    pub model: String,
    pub rows: usize,
    pub binary: bool,
    pub rate: f64,
    pub measured: Duration,
    pub max_in_flight: usize,
    /// Requests scheduled in the measured period.
    pub scheduled: u64,
    /// Of those, sent (the rest hit the in-flight bound).
    pub sent: u64,
    pub not_sent: u64,
    /// 200 answers that passed the response check, served by the model itself...
    pub ok_primary: u64,
    /// ...and by its fallback (`parameters.degraded: true`).
    pub ok_degraded: u64,
    /// Non-200 answers by status code.
    pub statuses: BTreeMap<u16, u64>,
    /// Connection failures and timeouts.
    pub transport: u64,
    /// 200 answers whose body failed the check.
    pub invalid: u64,
    /// Sent requests without any outcome when the run ended (must be 0).
    pub unanswered: u64,
    pub first_error: Option<String>,
    /// Latency of every 200 answer, from its scheduled send time, µs.
    pub latency_ok_us: Histogram,
    /// The same for 200 answers served by the model itself.
    pub latency_primary_us: Histogram,
    /// Latency of refusals (429/503), from the scheduled send time, µs.
    pub latency_shed_us: Histogram,
    /// The furthest the scheduler fell behind its own schedule (the load generator short of CPU).
    pub max_schedule_lag: Duration,
    /// Most requests in flight at once.
    pub peak_in_flight: u64,
    /// When the first request was scheduled (the start of the warm-up).
    pub started: Instant,
    /// The whole run (warm-up included) in time bins by *scheduled* send time, when asked for.
    pub timeline: Vec<TimelineBin>,
}

/// What happened to the requests scheduled within one time bin.
#[derive(Clone, Debug)]
pub struct TimelineBin {
    /// Offset of the bin's start from [`OpenLoopReport::started`].
    pub start: Duration,
    pub scheduled: u64,
    pub sent: u64,
    pub not_sent: u64,
    pub ok_primary: u64,
    pub ok_degraded: u64,
    /// Refused with 429 or 503.
    pub shed: u64,
    /// Other statuses, transport errors and invalid answers.
    pub failed: u64,
    /// Latency of the 200 answers, µs, from the scheduled send (`None` when there were none).
    pub latency_ok_us: Option<Histogram>,
}

impl TimelineBin {
    pub fn new(start: Duration) -> TimelineBin {
        TimelineBin {
            start,
            scheduled: 0,
            sent: 0,
            not_sent: 0,
            ok_primary: 0,
            ok_degraded: 0,
            shed: 0,
            failed: 0,
            latency_ok_us: None,
        }
    }

    /// Adds `other`'s counts and latencies to this bin's (a span of bins as one).
    pub fn add(&mut self, other: &TimelineBin) {
        let o = other;
        for (n, m) in [
            (&mut self.scheduled, o.scheduled),
            (&mut self.sent, o.sent),
            (&mut self.not_sent, o.not_sent),
            (&mut self.ok_primary, o.ok_primary),
            (&mut self.ok_degraded, o.ok_degraded),
            (&mut self.shed, o.shed),
            (&mut self.failed, o.failed),
        ] {
            *n += m;
        }
        if let Some(h) = &o.latency_ok_us {
            let mine = self.latency_ok_us.get_or_insert_with(|| hist::new(2));
            mine.add(h).expect("same bounds");
        }
    }

    /// Latency of this bin's 200 answers at quantile `q`, ms (`None` without any).
    pub fn latency_ms(&self, q: f64) -> Option<f64> {
        self.latency_ok_us
            .as_ref()
            .filter(|h| !h.is_empty())
            .map(|h| h.value_at_quantile(q) as f64 / 1000.0)
    }
}

impl OpenLoopReport {
    pub fn ok(&self) -> u64 {
        self.ok_primary + self.ok_degraded
    }

    /// Requests that were refused for load: 429 and 503.
    pub fn shed(&self) -> u64 {
        self.statuses.get(&429).copied().unwrap_or(0)
            + self.statuses.get(&503).copied().unwrap_or(0)
    }

    pub fn other_statuses(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(code, _)| **code != 429 && **code != 503)
            .map(|(_, n)| n)
            .sum()
    }

    /// Successful answers (200, primary or degraded) per second.
    pub fn goodput(&self) -> f64 {
        self.ok() as f64 / self.measured.as_secs_f64()
    }

    /// Requests actually sent per second.
    pub fn sent_rate(&self) -> f64 {
        self.sent as f64 / self.measured.as_secs_f64()
    }

    /// `n` as a share of the requests sent in the measured period (those that reached, or
    /// tried to reach, the server).
    fn share(&self, n: u64) -> f64 {
        if self.sent == 0 {
            0.0
        } else {
            n as f64 / self.sent as f64
        }
    }

    /// Shares of the sent requests answered 200 by the fallback, and refused (429/503).
    pub fn share_degraded(&self) -> f64 {
        self.share(self.ok_degraded)
    }
    pub fn share_shed(&self) -> f64 {
        self.share(self.shed())
    }

    /// Share of the scheduled requests not sent because the in-flight bound was reached.
    pub fn share_not_sent(&self) -> f64 {
        if self.scheduled == 0 {
            0.0
        } else {
            self.not_sent as f64 / self.scheduled as f64
        }
    }

    /// Latency of 200 answers at quantile `q`, ms.
    pub fn latency_ms(&self, q: f64) -> f64 {
        hist::ms(&self.latency_ok_us, q)
    }

    /// The run as JSON: what `results.json` files hold of it and the summary prints.
    pub fn to_json(&self) -> serde_json::Value {
        let ms = |h: &Histogram, q: f64| hist::ms(h, q);
        serde_json::json!({
            "offered_per_s": self.rate,
            "measured_s": self.measured.as_secs_f64(),
            "scheduled": self.scheduled, "sent": self.sent, "not_sent": self.not_sent,
            "sent_per_s": self.sent_rate(),
            "ok_primary": self.ok_primary, "ok_degraded": self.ok_degraded,
            "statuses": self.statuses, "transport": self.transport, "invalid": self.invalid,
            "unanswered": self.unanswered,
            "goodput_per_s": self.goodput(),
            "share_degraded": self.share_degraded(), "share_shed": self.share_shed(),
            "latency_ok_ms": {
                "p50": self.latency_ms(0.5), "p90": self.latency_ms(0.9), "p99": self.latency_ms(0.99),
                "p99.9": self.latency_ms(0.999), "max": self.latency_ok_us.max() as f64 / 1000.0,
            },
            "latency_primary_ms": { "p50": ms(&self.latency_primary_us, 0.5), "p99": ms(&self.latency_primary_us, 0.99) },
            "latency_refused_ms": { "p50": ms(&self.latency_shed_us, 0.5), "p99": ms(&self.latency_shed_us, 0.99) },
            "max_schedule_lag_ms": self.max_schedule_lag.as_secs_f64() * 1000.0,
            "peak_in_flight": self.peak_in_flight,
            "first_error": self.first_error,
        })
    }

    /// A human-readable summary, several lines (`templates/summary.txt.j2`).
    pub fn summary(&self) -> String {
        let extra = serde_json::json!({
            "kind": "open_loop", "url": self.url, "model": self.model, "rows": self.rows,
            "binary": self.binary, "max_in_flight": self.max_in_flight,
            "share_not_sent": self.share_not_sent(), "shed": self.shed(),
        });
        crate::report::summary(&self.to_json(), extra)
    }
}
