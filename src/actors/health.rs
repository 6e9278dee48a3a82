//! `ModelHealth`: a model version's health and traffic counters. Its router writes the replica
//! counts (as autoscaling changes them), the API records each answer, and the health API, the supervisor (idle unload,
//! canary judgement) and the status page read it without locks.
//!
//! Besides the totals since load, [`RecentWindow`] keeps the last seconds of traffic (answers,
//! errors, degraded answers and a latency histogram of fixed log-spaced buckets) in two
//! rotating windows of [`WINDOW_MS`], all atomics, so that the status page can show p50/p99 and
//! a rate over the recent past without a lock on the request path.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use serde::Serialize;

/// Health and traffic of a model version, written by its router and the API, read lock-free
/// by the health API, the supervisor (idle unload, canary judgement) and the status page.
#[derive(Debug, Default)]
pub struct ModelHealth {
    pub healthy_replicas: AtomicUsize,
    /// Replicas the router runs now: the manifest's `replicas` at load, then as autoscaling
    /// adds and removes them (between `min_replicas` and `max_replicas`).
    pub replicas: AtomicUsize,
    /// Milliseconds since the process started, at the last request.
    pub last_used_ms: AtomicU64,
    pub requests: AtomicU64,
    /// Answers with a 5xx status.
    pub errors: AtomicU64,
    pub latency_us: AtomicU64,
    /// Answers computed by the fallback model instead (degraded mode).
    pub degraded: AtomicU64,
    /// The last [`WINDOW_MS`] to 2 × [`WINDOW_MS`] of answers, with their latencies.
    pub recent: RecentWindow,
}

impl ModelHealth {
    pub fn new(healthy: usize, replicas: usize) -> ModelHealth {
        let health = ModelHealth {
            healthy_replicas: AtomicUsize::new(healthy),
            replicas: AtomicUsize::new(replicas),
            ..ModelHealth::default()
        };
        health.touch();
        health
    }

    pub fn touch(&self) {
        self.last_used_ms
            .store(crate::telemetry::uptime_ms(), Ordering::Relaxed);
    }

    /// Records one answered request.
    pub fn record(&self, server_error: bool, latency: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.latency_us
            .fetch_add(latency.as_micros() as u64, Ordering::Relaxed);
        if server_error {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.recent
            .record(crate::telemetry::uptime_ms(), latency, server_error);
    }

    /// Records that an answer [`record`](Self::record)ed was computed by the fallback model.
    pub fn record_degraded(&self) {
        self.degraded.fetch_add(1, Ordering::Relaxed);
        self.recent.record_degraded(crate::telemetry::uptime_ms());
    }

    pub fn ready(&self) -> bool {
        self.healthy_replicas.load(Ordering::Relaxed) > 0
    }
}

/// Length of one window of [`RecentWindow`], in milliseconds: the figures read cover the
/// window in progress and the one before it, 10 to 20 seconds.
pub const WINDOW_MS: u64 = 10_000;
/// Latency buckets: log-spaced upper bounds from [`FIRST_BOUND_US`] to [`LAST_BOUND_US`].
pub const BUCKETS: usize = 40;
/// Upper bound of the first bucket: 50 µs.
pub const FIRST_BOUND_US: f64 = 50.0;
/// Upper bound of the last bucket: 60 s (slower answers are counted in it too).
pub const LAST_BOUND_US: f64 = 60_000_000.0;

/// The upper bound of bucket `i`, in microseconds.
pub fn bucket_bound_us(i: usize) -> f64 {
    let ratio = (LAST_BOUND_US / FIRST_BOUND_US).powf(1.0 / (BUCKETS - 1) as f64);
    FIRST_BOUND_US * ratio.powi(i as i32)
}

/// The bucket a latency of `us` microseconds is counted in.
pub fn bucket_of(us: f64) -> usize {
    if us.is_nan() || us <= FIRST_BOUND_US {
        return 0;
    }
    let steps =
        (BUCKETS - 1) as f64 * (us / FIRST_BOUND_US).ln() / (LAST_BOUND_US / FIRST_BOUND_US).ln();
    // A hair below an integer is float noise on an exact bound, which belongs to that bucket.
    ((steps - 1e-9).ceil().max(0.0) as usize).min(BUCKETS - 1)
}

/// One window's counts; `epoch` says which window (uptime / [`WINDOW_MS`]) they belong to.
#[derive(Debug)]
struct Slot {
    epoch: AtomicU64,
    counts: [AtomicU64; BUCKETS],
    errors: AtomicU64,
    degraded: AtomicU64,
}

impl Default for Slot {
    fn default() -> Self {
        Slot {
            epoch: AtomicU64::new(0),
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            errors: AtomicU64::new(0),
            degraded: AtomicU64::new(0),
        }
    }
}

impl Slot {
    /// This slot, made the home of window `epoch` (cleared if it held an older one). The
    /// thread that moves the epoch on clears the counts; an answer recorded by another thread
    /// in that instant may be lost or land in the new window: a few answers at a window's edge,
    /// for figures that are approximate anyway.
    fn at(&self, epoch: u64) -> &Slot {
        let held = self.epoch.load(Ordering::Acquire);
        if held < epoch
            && self
                .epoch
                .compare_exchange(held, epoch, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            for count in &self.counts {
                count.store(0, Ordering::Relaxed);
            }
            self.errors.store(0, Ordering::Relaxed);
            self.degraded.store(0, Ordering::Relaxed);
        }
        self
    }
}

/// Two rotating windows of answers, errors, degraded answers and latencies (see the module).
#[derive(Debug, Default)]
pub struct RecentWindow {
    slots: [Slot; 2],
}

/// What [`RecentWindow::read`] saw.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Recent {
    /// Seconds of traffic the figures cover (the window in progress and the previous one).
    pub seconds: f64,
    pub requests: u64,
    pub errors: u64,
    pub degraded: u64,
    /// `requests / seconds`.
    pub requests_per_sec: f64,
    /// `degraded / requests`, `None` without requests.
    pub degraded_share: Option<f64>,
    /// Latency percentiles in milliseconds, `None` without requests.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl RecentWindow {
    fn slot(&self, now_ms: u64) -> &Slot {
        let epoch = now_ms / WINDOW_MS;
        self.slots[(epoch % 2) as usize].at(epoch)
    }

    /// Records one answer at `now_ms` (milliseconds of uptime).
    pub fn record(&self, now_ms: u64, latency: Duration, server_error: bool) {
        let slot = self.slot(now_ms);
        slot.counts[bucket_of(latency.as_micros() as f64)].fetch_add(1, Ordering::Relaxed);
        if server_error {
            slot.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records that one answer at `now_ms` came from the fallback.
    pub fn record_degraded(&self, now_ms: u64) {
        self.slot(now_ms).degraded.fetch_add(1, Ordering::Relaxed);
    }

    /// The figures of the window in progress at `now_ms` and the one before it.
    pub fn read(&self, now_ms: u64) -> Recent {
        let epoch = now_ms / WINDOW_MS;
        let mut counts = [0u64; BUCKETS];
        let (mut errors, mut degraded, mut oldest) = (0, 0, epoch);
        for slot in &self.slots {
            let held = slot.epoch.load(Ordering::Acquire);
            if held != epoch && held + 1 != epoch {
                continue;
            }
            oldest = oldest.min(held);
            for (sum, count) in counts.iter_mut().zip(&slot.counts) {
                *sum += count.load(Ordering::Relaxed);
            }
            errors += slot.errors.load(Ordering::Relaxed);
            degraded += slot.degraded.load(Ordering::Relaxed);
        }
        let requests: u64 = counts.iter().sum();
        // At least one second, so that a window just begun does not show a huge rate.
        let seconds = ((now_ms - oldest * WINDOW_MS) as f64 / 1000.0).max(1.0);
        let share = |n: u64| (requests > 0).then(|| n as f64 / requests as f64);
        Recent {
            seconds,
            requests,
            errors,
            degraded,
            requests_per_sec: requests as f64 / seconds,
            degraded_share: share(degraded),
            p50_ms: percentile_us(&counts, 0.50).map(|us| us / 1000.0),
            p99_ms: percentile_us(&counts, 0.99).map(|us| us / 1000.0),
        }
    }
}

/// The `q` quantile (0..=1) of the latencies counted in `counts`, in microseconds: found in its
/// bucket by rank, then placed inside the bucket by interpolating on the log scale the buckets
/// are spaced on (so within one bucket's width, a factor of about 1.43, of the true value).
pub fn percentile_us(counts: &[u64; BUCKETS], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * total as f64).ceil().max(1.0);
    let mut below = 0u64;
    for (i, &n) in counts.iter().enumerate() {
        if n > 0 && (below + n) as f64 >= rank {
            let upper = bucket_bound_us(i);
            let lower = if i == 0 {
                // The first bucket holds everything down to 0; place it on a bucket's width.
                upper / (bucket_bound_us(1) / upper)
            } else {
                bucket_bound_us(i - 1)
            };
            let within = (rank - below as f64) / n as f64;
            return Some(lower * (upper / lower).powf(within));
        }
        below += n;
    }
    Some(bucket_bound_us(BUCKETS - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_span_50_us_to_60_s_on_a_log_scale() {
        assert!((bucket_bound_us(0) - 50.0).abs() < 1e-6);
        assert!((bucket_bound_us(BUCKETS - 1) - 60e6).abs() < 1.0);
        let ratio = bucket_bound_us(1) / bucket_bound_us(0);
        assert!((1.4..1.5).contains(&ratio), "{ratio}");
        assert_eq!(bucket_of(0.0), 0);
        assert_eq!(bucket_of(50.0), 0);
        assert_eq!(bucket_of(51.0), 1);
        assert_eq!(bucket_of(f64::NAN), 0);
        assert_eq!(bucket_of(3600e6), BUCKETS - 1);
        for i in 0..BUCKETS {
            // Each bound is counted in its own bucket, a bit more in the next.
            assert_eq!(bucket_of(bucket_bound_us(i)), i, "bound {i}");
            if i + 1 < BUCKETS {
                assert_eq!(
                    bucket_of(bucket_bound_us(i) * 1.01),
                    i + 1,
                    "past bound {i}"
                );
            }
        }
    }

    #[test]
    fn percentiles_are_within_a_bucket_of_the_true_value() {
        let window = RecentWindow::default();
        // 1..=1000 ms, one answer each: p50 is 500 ms, p99 990 ms.
        for ms in 1..=1000u64 {
            window.record(5_000, Duration::from_millis(ms), ms % 100 == 0);
        }
        let recent = window.read(5_000);
        assert_eq!(recent.requests, 1000);
        assert_eq!(recent.errors, 10);
        let ratio = bucket_bound_us(1) / bucket_bound_us(0);
        let (p50, p99) = (recent.p50_ms.unwrap(), recent.p99_ms.unwrap());
        assert!(p50 > 500.0 / ratio && p50 < 500.0 * ratio, "p50 {p50}");
        assert!(p99 > 990.0 / ratio && p99 < 990.0 * ratio, "p99 {p99}");
        assert!(p50 < p99);
    }

    #[test]
    fn one_latency_gives_it_back_for_every_percentile() {
        let mut counts = [0u64; BUCKETS];
        counts[bucket_of(2_000.0)] = 7;
        for q in [0.0, 0.5, 0.99, 1.0] {
            let us = percentile_us(&counts, q).unwrap();
            assert!((1_300.0..=2_900.0).contains(&us), "q {q}: {us}");
        }
        assert_eq!(percentile_us(&[0; BUCKETS], 0.5), None);
    }

    #[test]
    fn the_windows_rotate_and_forget_old_traffic() {
        let window = RecentWindow::default();
        let ms = Duration::from_millis(3);
        window.record(1_000, ms, false);
        window.record_degraded(1_000);
        // Window 0 in progress: 1 answer over the 1.5 s since it began.
        let now = window.read(1_500);
        assert_eq!((now.requests, now.degraded), (1, 1));
        assert!((now.seconds - 1.5).abs() < 1e-9);
        assert_eq!(now.degraded_share, Some(1.0));
        // Window 1: window 0 still counts, over 12 s.
        window.record(12_000, ms, false);
        window.record(12_000, ms, false);
        let later = window.read(12_000);
        assert_eq!((later.requests, later.degraded), (3, 1));
        assert!((later.requests_per_sec - 3.0 / 12.0).abs() < 1e-9);
        // Window 2 reuses window 0's slot: its traffic is gone, window 1's stays.
        window.record(21_000, ms, true);
        let after = window.read(21_000);
        assert_eq!((after.requests, after.degraded, after.errors), (3, 0, 1));
        // Long idle: nothing recent at all.
        let idle = window.read(100_000);
        assert_eq!(idle.requests, 0);
        assert_eq!((idle.p50_ms, idle.degraded_share), (None, None));
        assert_eq!(idle.requests_per_sec, 0.0);
    }

    #[test]
    fn health_records_totals_and_the_recent_window_together() {
        let health = ModelHealth::new(2, 2);
        health.record(false, Duration::from_millis(4));
        health.record(true, Duration::from_millis(8));
        health.record_degraded();
        assert_eq!(health.requests.load(Ordering::Relaxed), 2);
        assert_eq!(health.errors.load(Ordering::Relaxed), 1);
        assert_eq!(health.degraded.load(Ordering::Relaxed), 1);
        assert_eq!(health.latency_us.load(Ordering::Relaxed), 12_000);
        let recent = health.recent.read(crate::telemetry::uptime_ms());
        assert_eq!((recent.requests, recent.errors, recent.degraded), (2, 1, 1));
    }
}
