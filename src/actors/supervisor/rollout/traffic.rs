//! The evidence a stepped rollout is judged on: [`Traffic`], a version's request, error and
//! latency counters at some moment (their deltas over a step are what counts), and [`judge`],
//! the pure rule that compares a canary's step with its stable version's over the same time.
//!
//! Kept apart from the actor so the thresholds can be read in one place and tested without
//! timers, models or traffic.

use std::sync::atomic::Ordering;

use crate::actors::health::ModelHealth;

/// A canary's error rate may exceed its stable version's by this much (5 points).
const ERROR_MARGIN: f64 = 0.05;
/// A canary's mean latency may reach this many times its stable version's...
const LATENCY_FACTOR: f64 = 2.0;
/// ...plus this many microseconds (5 ms), so that fast models are not judged on noise.
const LATENCY_SLACK_US: f64 = 5000.0;
/// Fewer canary requests than this in a step are no evidence: the step passes.
const MIN_REQUESTS: u64 = 5;

/// Traffic counters of a version at some moment, to judge a canary step by its deltas.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub requests: u64,
    pub errors: u64,
    pub latency_us: u64,
}

impl Traffic {
    pub fn of(health: &ModelHealth) -> Traffic {
        Traffic {
            requests: health.requests.load(Ordering::Relaxed),
            errors: health.errors.load(Ordering::Relaxed),
            latency_us: health.latency_us.load(Ordering::Relaxed),
        }
    }

    /// What happened between `base` and `self` (nothing, if the counters went back: the
    /// version was loaded again since `base`).
    pub fn since(self, base: Traffic) -> Traffic {
        if self.requests < base.requests {
            return Traffic::default();
        }
        Traffic {
            requests: self.requests - base.requests,
            errors: self.errors.saturating_sub(base.errors),
            latency_us: self.latency_us.saturating_sub(base.latency_us),
        }
    }

    pub fn error_rate(self) -> f64 {
        self.errors as f64 / self.requests.max(1) as f64
    }

    pub fn mean_latency_us(self) -> f64 {
        self.latency_us as f64 / self.requests.max(1) as f64
    }
}

/// The outcome of one canary step.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Not worse than stable (or too few requests to tell): the rollout goes on.
    Pass,
    /// Worse than stable: roll back, for this reason.
    Worse(String),
}

/// Judges a canary's step against its stable version's over the same time: worse when, with
/// at least [`MIN_REQUESTS`] canary requests, its error rate is more than 5 points above
/// stable's, or (when `judge_latency`, and stable had requests) its mean latency is above twice
/// stable's plus 5 ms.
pub fn judge(canary: Traffic, stable: Traffic, judge_latency: bool) -> Verdict {
    let (c, s) = (canary, stable);
    let worse_errors = c.error_rate() > s.error_rate() + ERROR_MARGIN;
    let worse_latency = judge_latency
        && s.requests > 0
        && c.mean_latency_us() > LATENCY_FACTOR * s.mean_latency_us() + LATENCY_SLACK_US;
    if c.requests >= MIN_REQUESTS && (worse_errors || worse_latency) {
        Verdict::Worse(format!(
            "canary worse than stable: errors {:.1}% vs {:.1}%, mean latency {:.1} ms vs {:.1} ms",
            100.0 * c.error_rate(),
            100.0 * s.error_rate(),
            c.mean_latency_us() / 1000.0,
            s.mean_latency_us() / 1000.0
        ))
    } else {
        Verdict::Pass
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn traffic(requests: u64, errors: u64, mean_latency_ms: f64) -> Traffic {
        Traffic {
            requests,
            errors,
            latency_us: (requests as f64 * mean_latency_ms * 1000.0) as u64,
        }
    }

    fn worse(verdict: &Verdict) -> bool {
        matches!(verdict, Verdict::Worse(_))
    }

    #[test]
    fn counters_are_judged_by_their_deltas() {
        let base = traffic(10, 1, 2.0);
        let now = Traffic {
            requests: 30,
            errors: 4,
            latency_us: base.latency_us + 20 * 3000,
        };
        let step = now.since(base);
        assert_eq!(step.requests, 20);
        assert_eq!(step.errors, 3);
        assert!((step.error_rate() - 0.15).abs() < 1e-9);
        assert!((step.mean_latency_us() - 3000.0).abs() < 1e-9);
        // No requests: rates are 0, not NaN.
        assert_eq!(Traffic::default().error_rate(), 0.0);
        assert_eq!(Traffic::default().mean_latency_us(), 0.0);
    }

    #[test]
    fn errors_more_than_five_points_above_stable_are_worse() {
        let stable = traffic(100, 10, 1.0); // 10%
        assert_eq!(judge(traffic(100, 15, 1.0), stable, true), Verdict::Pass); // 15%: at the margin
        assert!(worse(&judge(traffic(100, 16, 1.0), stable, true))); // 16%
        assert!(worse(&judge(traffic(100, 16, 1.0), stable, false))); // rolling judges errors too
                                                                      // A stable version without traffic counts as error-free.
        assert!(worse(&judge(traffic(10, 1, 1.0), Traffic::default(), true)));
        assert_eq!(
            judge(traffic(100, 5, 1.0), Traffic::default(), true),
            Verdict::Pass
        );
    }

    #[test]
    fn latency_above_twice_stable_plus_5_ms_is_worse_for_canaries_only() {
        let stable = traffic(100, 0, 10.0);
        assert_eq!(judge(traffic(100, 0, 25.0), stable, true), Verdict::Pass); // exactly 2x + 5 ms
        assert!(worse(&judge(traffic(100, 0, 25.1), stable, true)));
        // Rolling updates are judged on errors only.
        assert_eq!(judge(traffic(100, 0, 100.0), stable, false), Verdict::Pass);
        // No stable traffic to compare latency with: not judged on it.
        assert_eq!(
            judge(traffic(100, 0, 100.0), Traffic::default(), true),
            Verdict::Pass
        );
        // The 5 ms slack: a fast model is not judged on noise.
        assert_eq!(
            judge(traffic(100, 0, 5.3), traffic(100, 0, 0.2), true),
            Verdict::Pass
        );
        assert!(worse(&judge(
            traffic(100, 0, 5.5),
            traffic(100, 0, 0.2),
            true
        )));
    }

    #[test]
    fn fewer_than_five_canary_requests_are_no_evidence() {
        let stable = traffic(100, 0, 1.0);
        assert_eq!(judge(traffic(4, 4, 100.0), stable, true), Verdict::Pass);
        assert!(worse(&judge(traffic(5, 5, 100.0), stable, true)));
        assert_eq!(judge(Traffic::default(), stable, true), Verdict::Pass);
    }

    #[test]
    fn the_reason_gives_both_versions_numbers() {
        let Verdict::Worse(reason) = judge(traffic(10, 5, 30.0), traffic(10, 0, 2.0), true) else {
            panic!("expected a worse verdict");
        };
        assert_eq!(
            reason,
            "canary worse than stable: errors 50.0% vs 0.0%, mean latency 30.0 ms vs 2.0 ms"
        );
    }
}
