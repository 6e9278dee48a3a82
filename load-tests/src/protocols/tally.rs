//! What every client of `loadgen protocols` counts, in one shape: the REST load loop's
//! [`RestReport`] (successes, errors by kind, warm-up counts, the latency histogram and the
//! server-reported batch, queue and model-call sums), so that the gRPC loops' results read,
//! print and serialise exactly as REST's. Here: one answer's accounting for the REST and gRPC
//! loops ([`record`]), and merging the tallies of slices (those of tasks:
//! [`RestReport::absorb`]).

use std::time::{Duration, Instant};

use crate::hist;
use crate::rest::{RestReport, ServerSide};

/// A failed request: its kind (the error table's key, e.g. `"grpc Unavailable"`) and what
/// exactly happened (the first one of a run goes in the report).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failed {
    pub kind: String,
    pub detail: String,
}

impl Failed {
    pub fn new(kind: impl Into<String>, detail: impl Into<String>) -> Failed {
        Failed {
            kind: kind.into(),
            detail: detail.into(),
        }
    }

    /// An answer that came back but is not what `mlp` answers.
    pub fn invalid(detail: impl Into<String>) -> Failed {
        Failed::new("invalid response", detail)
    }
}

impl Counted for Failed {
    fn key(self) -> String {
        self.kind
    }

    fn text(&self) -> String {
        format!("{}: {}", self.kind, self.detail)
    }
}

/// A failed request as [`record`] counts it: under its kind, the error table's key (`key`),
/// and, the first one of a run, with what exactly happened (`text`); each made only when
/// needed.
pub trait Counted {
    fn key(self) -> String;
    fn text(&self) -> String;
}

/// The slices of one client at one level, run one after the other, as one run: counts and
/// latencies together, the measured time their sum (so requests/s is the slices' mean
/// weighted by their length). `None` without slices.
pub fn combine_slices(slices: Vec<RestReport>) -> Option<RestReport> {
    let mut slices = slices.into_iter();
    let mut all = slices.next()?;
    for slice in slices {
        all.measured += slice.measured;
        all.absorb(slice);
    }
    Some(all)
}

/// The measured period of a slice: answers that come in before `start` are warm-up, after
/// `end` are not counted at all.
#[derive(Clone, Copy, Debug)]
pub struct Period {
    pub start: Instant,
    pub end: Instant,
}

impl Period {
    /// `warmup` from now, then `duration`.
    pub fn after(warmup: Duration, duration: Duration) -> Period {
        let start = Instant::now() + warmup;
        Period {
            start,
            end: start + duration,
        }
    }
}

/// Counts one answer, sent at `sent` and in at `done`, in `stats`: a success with its latency
/// and what the server said, or a failure by kind; in the measured period, the warm-up, or
/// (done after the end) not at all. The first failure is kept whenever it happened.
pub fn record(
    stats: &mut RestReport,
    period: Period,
    (sent, done): (Instant, Instant),
    outcome: Result<ServerSide, impl Counted>,
) {
    let measured = done >= period.start && done <= period.end;
    let warmup = done < period.start;
    match outcome {
        Ok(server) if measured => {
            stats.ok += 1;
            stats.server_sums.add(&server);
            stats
                .latency_us
                .saturating_record(hist::micros(done.duration_since(sent)));
        }
        Ok(_) => stats.warmup_requests += u64::from(warmup),
        Err(failed) => {
            if stats.first_error.is_none() {
                stats.first_error = Some(failed.text());
            }
            if measured {
                *stats.errors.entry(failed.key()).or_default() += 1;
            } else if warmup {
                stats.warmup_requests += 1;
                stats.warmup_errors += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(ok: u64, latency_us: u64, secs: u64) -> RestReport {
        let mut r = RestReport::empty("grpc://127.0.0.1:1", "mlp", 8, 1, true);
        r.measured = Duration::from_secs(secs);
        r.ok = ok;
        for _ in 0..ok {
            r.latency_us.record(latency_us).unwrap();
        }
        r.server_sums.batch_size = ok * 2;
        r
    }

    #[test]
    fn slices_combine_into_one_run() {
        let mut a = slice(100, 1000, 1);
        a.errors.insert("grpc Unavailable".into(), 1);
        let mut b = slice(300, 3000, 1);
        b.errors.insert("grpc Unavailable".into(), 2);
        b.errors.insert("transport".into(), 1);
        b.first_error = Some("second".into());
        b.warmup_requests = 7;
        let all = combine_slices(vec![a, b]).unwrap();
        assert_eq!(all.measured, Duration::from_secs(2));
        assert_eq!(all.requests_per_sec(), 200.0);
        assert_eq!(all.latency_us.len(), 400);
        assert_eq!(all.error_count(), 4);
        assert_eq!(all.errors["grpc Unavailable"], 3);
        assert_eq!(all.first_error.as_deref(), Some("second"));
        assert_eq!(all.warmup_requests, 7);
        assert_eq!(all.mean_batch_rows(), 2.0);
        assert!(all.latency_ms(0.5) > 0.9 && all.latency_ms(0.5) < 3.1);
        assert!(combine_slices(Vec::new()).is_none());
    }

    #[test]
    fn answers_count_in_the_period_they_complete_in() {
        let now = Instant::now();
        let period = Period {
            start: now + Duration::from_secs(1),
            end: now + Duration::from_secs(2),
        };
        let at = |ms: u64| now + Duration::from_millis(ms);
        let mut stats = RestReport::empty("x", "mlp", 1, 1, false);
        let ok = || Ok::<_, Failed>(ServerSide::default());
        record(&mut stats, period, (at(0), at(500)), ok());
        record(&mut stats, period, (at(900), at(1100)), ok());
        record(&mut stats, period, (at(1900), at(2100)), ok());
        record(
            &mut stats,
            period,
            (at(600), at(700)),
            Err(Failed::new("transport", "reset")),
        );
        record(
            &mut stats,
            period,
            (at(1200), at(1300)),
            Err(Failed::invalid("shape")),
        );
        assert_eq!(
            (stats.ok, stats.warmup_requests, stats.warmup_errors),
            (1, 2, 1)
        );
        assert_eq!(stats.errors.get("invalid response"), Some(&1));
        assert_eq!(stats.errors.get("transport"), None);
        assert_eq!(stats.first_error.as_deref(), Some("transport: reset"));
        assert_eq!(stats.latency_us.len(), 1);
        assert!((stats.latency_ms(0.5) - 200.0).abs() < 1.0);
    }
}
