//! The audit trail of refusals: one structured event (`streamserve::audit` target) per refused
//! request with the key's name (never the key), the model, the client address and the reason
//! (client text in them escaped, so that a `%0A` in a model name cannot forge a line), and a
//! counter per key name and reason, at 0 from the first scrape for every configured key. The events are themselves rate-limited, so that an
//! attack cannot flood the logs; the next event says how many were left out.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::error::ServeError;
use crate::untrusted::Untrusted;

/// Events per second, and the burst above it.
const EVENTS_PER_SEC: u32 = 20;
const EVENTS_BURST: u32 = 100;

pub struct Audit {
    events: DefaultDirectRateLimiter,
    left_out: AtomicU64,
}

impl Default for Audit {
    fn default() -> Self {
        let rate = NonZeroU32::new(EVENTS_PER_SEC).expect("not 0");
        let burst = NonZeroU32::new(EVENTS_BURST).expect("not 0");
        Audit {
            events: RateLimiter::direct(Quota::per_second(rate).allow_burst(burst)),
            left_out: AtomicU64::new(0),
        }
    }
}

/// The reasons (`ServeError::kind`) of the refusals made here: a caller without a valid key
/// is only ever unauthenticated (or, by address, rate-limited); a key's may be any.
pub const UNAUTHENTICATED: &str = "unauthenticated";
pub const RATE_LIMITED: &str = "rate_limited";
pub const KEY_REASONS: [&str; 3] = [UNAUTHENTICATED, "forbidden", RATE_LIMITED];

/// Creates `streamserve_access_refused_total` of `key` and each of `reasons` at 0 (the names
/// are the keys file's, a bounded set).
pub fn register_series(key: &str, reasons: &[&'static str]) {
    for &reason in reasons {
        metrics::counter!(REFUSED, "key" => key.to_string(), "reason" => reason).increment(0);
    }
}

const REFUSED: &str = "streamserve_access_refused_total";

impl Audit {
    pub fn refused(&self, key: &str, model: &str, address: Option<IpAddr>, error: &ServeError) {
        self.refused_as(key, model, address, error.kind(), error);
    }

    /// A refusal counted under `reason` rather than the error's own kind: a request more than
    /// a key's rate ever lets through is answered 400 (no wait would let it pass) but is a
    /// refusal for the key's limit, `rate_limited`, as the others of that limit.
    pub fn refused_as(
        &self,
        key: &str,
        model: &str,
        address: Option<IpAddr>,
        reason: &'static str,
        error: &ServeError,
    ) {
        metrics::counter!(REFUSED, "key" => key.to_string(), "reason" => reason).increment(1);
        if self.events.check().is_err() {
            self.left_out.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let left_out = self.left_out.swap(0, Ordering::Relaxed);
        let address = address.map(|a| a.to_string()).unwrap_or_default();
        tracing::warn!(
            target: "streamserve::audit",
            key, model = %Untrusted(model), client = %address, reason,
            detail = %Untrusted(&error.to_string()), left_out, "request refused"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_refusals_logs_a_burst_then_counts_what_it_left_out() {
        let audit = Audit::default();
        let error = ServeError::Unauthenticated("the API key is not valid".into());
        for _ in 0..(EVENTS_BURST + 50) {
            audit.refused("-", "m", None, &error);
        }
        let left_out = audit.left_out.load(Ordering::Relaxed);
        // 50 beyond the burst, less the few the bucket refills while the loop runs.
        assert!((25..=50).contains(&left_out), "{left_out}");
    }

    #[test]
    fn the_series_made_at_0_are_of_the_reasons_refusals_have() {
        let retry_after = std::time::Duration::from_secs(1);
        let kinds = [
            ServeError::Unauthenticated(String::new()).kind(),
            ServeError::Forbidden(String::new()).kind(),
            ServeError::RateLimited {
                what: String::new(),
                retry_after,
            }
            .kind(),
        ];
        assert_eq!(kinds, KEY_REASONS);
        assert_eq!((kinds[0], kinds[2]), (UNAUTHENTICATED, RATE_LIMITED));
    }
}
