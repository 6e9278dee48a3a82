//! What one closed-loop run measured, and the figures drawn from it: rates, latency
//! quantiles, the server's own reported means, the run as JSON and its printed summary.

use std::collections::BTreeMap;
use std::time::Duration;

use super::ServerSide;
use crate::hist::{self, Histogram};

/// The result of one closed-loop run (the measured period only, except `warmup_*`).
#[derive(Clone, Debug)]
pub struct RestReport {
    pub url: String,
    pub model: String,
    pub concurrency: usize,
    pub rows: usize,
    pub binary: bool,
    /// Length of the measured period.
    pub measured: Duration,
    /// Answers that were 200 and passed [`check_mlp_response`](super::check_mlp_response).
    pub ok: u64,
    /// Failures by kind: `"http 503"`, `"transport"`, `"invalid response"`.
    pub errors: BTreeMap<String, u64>,
    /// Requests that completed (any outcome) during warm-up, and how many of those failed.
    pub warmup_requests: u64,
    pub warmup_errors: u64,
    /// The first failure seen, for diagnosis.
    pub first_error: Option<String>,
    /// Latency of successful requests, in microseconds.
    pub latency_us: Histogram,
    /// Sums over successful requests of what the server reported ([`ServerSide`]).
    pub server_sums: ServerSide,
}

impl RestReport {
    /// An empty tally of a closed-loop run against `url`.
    pub fn empty(url: &str, model: &str, concurrency: usize, rows: usize, binary: bool) -> Self {
        RestReport {
            url: url.to_string(),
            model: model.to_string(),
            concurrency,
            rows,
            binary,
            measured: Duration::ZERO,
            ok: 0,
            errors: BTreeMap::new(),
            warmup_requests: 0,
            warmup_errors: 0,
            first_error: None,
            latency_us: hist::new(3),
            server_sums: ServerSide::default(),
        }
    }

    /// Adds `other`'s counts, errors, latencies and server sums (not its measured time: tasks
    /// run side by side, slices one after the other; the caller knows which).
    pub fn absorb(&mut self, other: RestReport) {
        self.ok += other.ok;
        for (kind, n) in other.errors {
            *self.errors.entry(kind).or_default() += n;
        }
        self.warmup_requests += other.warmup_requests;
        self.warmup_errors += other.warmup_errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.latency_us
            .add(&other.latency_us)
            .expect("every load loop's histogram has the same bounds");
        self.server_sums.add(&other.server_sums);
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    pub fn requests_per_sec(&self) -> f64 {
        self.ok as f64 / self.measured.as_secs_f64()
    }

    pub fn rows_per_sec(&self) -> f64 {
        self.requests_per_sec() * self.rows as f64
    }

    /// Latency at quantile `q` (0..=1) in milliseconds; 0 without data.
    pub fn latency_ms(&self, q: f64) -> f64 {
        hist::ms(&self.latency_us, q)
    }

    pub fn max_ms(&self) -> f64 {
        self.latency_us.max() as f64 / 1000.0
    }

    pub fn mean_ms(&self) -> f64 {
        self.latency_us.mean() / 1000.0
    }

    fn mean_of(&self, sum: u64) -> f64 {
        if self.ok == 0 {
            0.0
        } else {
            sum as f64 / self.ok as f64
        }
    }

    /// Mean rows of the model call that served a request, as the server reported it.
    pub fn mean_batch_rows(&self) -> f64 {
        self.mean_of(self.server_sums.batch_size)
    }

    /// Mean server-reported queue time (arrival to batch start), milliseconds.
    pub fn mean_queue_ms(&self) -> f64 {
        self.mean_of(self.server_sums.queue_us) / 1000.0
    }

    /// Mean server-reported model-call time, milliseconds.
    pub fn mean_compute_ms(&self) -> f64 {
        self.mean_of(self.server_sums.compute_us) / 1000.0
    }

    /// The run as JSON: what `results.json` files hold of it and the summary prints.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "concurrency": self.concurrency,
            "rows_per_request": self.rows,
            "measured_s": self.measured.as_secs_f64(),
            "ok": self.ok,
            "errors": self.errors,
            "warmup_requests": self.warmup_requests,
            "warmup_errors": self.warmup_errors,
            "first_error": self.first_error,
            "requests_per_s": self.requests_per_sec(),
            "rows_per_s": self.rows_per_sec(),
            "latency_ms": {
                "p50": self.latency_ms(0.5), "p90": self.latency_ms(0.9), "p99": self.latency_ms(0.99),
                "p99.9": self.latency_ms(0.999), "max": self.max_ms(), "mean": self.mean_ms(),
            },
            "server_reported": {
                "mean_batch_rows": self.mean_batch_rows(),
                "mean_queue_ms": self.mean_queue_ms(),
                "mean_model_call_ms": self.mean_compute_ms(),
            },
        })
    }

    /// A human-readable summary, several lines (`templates/summary.txt.j2`).
    pub fn summary(&self) -> String {
        let extra = serde_json::json!({
            "kind": "rest", "url": self.url, "model": self.model, "binary": self.binary,
            "degraded": self.server_sums.degraded,
        });
        crate::report::summary(&self.to_json(), extra)
    }
}
