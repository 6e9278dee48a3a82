//! The audit trail of refusals: one structured event (`streamserve::audit` target) per refused
//! request with the key's name (never the key), the model, the client address and the reason,
//! and a counter per key name and reason. The events are themselves rate-limited, so that an
//! attack cannot flood the logs; the next event says how many were left out.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::error::ServeError;

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

impl Audit {
    pub fn refused(&self, key: &str, model: &str, address: Option<IpAddr>, error: &ServeError) {
        metrics::counter!("streamserve_access_refused_total", "key" => key.to_string(), "reason" => error.kind())
            .increment(1);
        if self.events.check().is_err() {
            self.left_out.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let left_out = self.left_out.swap(0, Ordering::Relaxed);
        let address = address.map(|a| a.to_string()).unwrap_or_default();
        tracing::warn!(
            target: "streamserve::audit",
            key, model = %crate::untrusted::Untrusted(model), client = %address, reason = error.kind(),
            detail = %error, left_out, "request refused"
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
}
