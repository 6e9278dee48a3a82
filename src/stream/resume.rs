//! Why a resume was refused, from a bounded set of reasons: each refusal is counted
//! (`streamserve_stream_resume_refused_total{reason}`) and logged at warn with its reason and
//! model, so that an operator sees a key rotation gone wrong or a client replaying tokens. The
//! token itself is never logged: it is the stream's state and capability. The log lines are
//! rate-limited as the access audit's are (an attacker's flood of forged tokens must not flood
//! the log); the counter counts every one.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use super::checkpoint::TokenError;
use crate::untrusted::Untrusted;

/// Why a resume (by token or by `stream_id`) was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResumeRefusal {
    /// Not a token: bad base64, another format, a payload that does not decode.
    Malformed,
    TooLong,
    /// Signed with a key this instance does not accept (another fleet's, or rotated out).
    UnknownKey,
    /// The signature does not match: altered, or forged.
    Tampered,
    Expired,
    /// The token is of another stream than the `stream_id` beside it.
    OtherStream,
    /// The token is of a stream on another model than the URL's (or the sequence's).
    WrongModel,
    /// `last_seq` missing or before the checkpoint, beyond the last result, or asking for
    /// results no longer kept.
    LastSeq,
    /// Older than a token the stream was already resumed with.
    Superseded,
    /// The stream ended here.
    Ended,
    /// A `stream_id` this instance does not hold (never did, or its window passed).
    UnknownStream,
}

/// Every reason's label, for the counter's zero series.
pub const RESUME_REFUSAL_REASONS: &[&str] = &[
    "malformed",
    "too_long",
    "unknown_key",
    "tampered",
    "expired",
    "other_stream",
    "wrong_model",
    "last_seq",
    "superseded",
    "ended",
    "unknown_stream",
];

impl ResumeRefusal {
    pub fn label(self) -> &'static str {
        match self {
            ResumeRefusal::Malformed => "malformed",
            ResumeRefusal::TooLong => "too_long",
            ResumeRefusal::UnknownKey => "unknown_key",
            ResumeRefusal::Tampered => "tampered",
            ResumeRefusal::Expired => "expired",
            ResumeRefusal::OtherStream => "other_stream",
            ResumeRefusal::WrongModel => "wrong_model",
            ResumeRefusal::LastSeq => "last_seq",
            ResumeRefusal::Superseded => "superseded",
            ResumeRefusal::Ended => "ended",
            ResumeRefusal::UnknownStream => "unknown_stream",
        }
    }

    /// Counts the refusal and logs it (`model`: the URL's or sequence's; `stream`: the stream
    /// id, once a token was read or one was named).
    pub fn record(self, model: &str, stream: Option<&str>) {
        let reason = self.label();
        metrics::counter!("streamserve_stream_resume_refused_total", "reason" => reason)
            .increment(1);
        let Some(left_out) = log_budget() else { return };
        let stream = stream.map(|s| Untrusted(s).to_string()).unwrap_or_default();
        tracing::warn!(reason, model = %Untrusted(model), %stream, left_out, "stream resume refused");
    }
}

impl From<&TokenError> for ResumeRefusal {
    fn from(error: &TokenError) -> ResumeRefusal {
        match error {
            TokenError::Malformed => ResumeRefusal::Malformed,
            TokenError::TooLong => ResumeRefusal::TooLong,
            TokenError::UnknownKey => ResumeRefusal::UnknownKey,
            TokenError::Tampered => ResumeRefusal::Tampered,
            TokenError::Expired(_) => ResumeRefusal::Expired,
        }
    }
}

/// Log lines per second, and the burst above it (the access audit's).
const LOGS_PER_SEC: u32 = 20;
const LOGS_BURST: u32 = 100;

/// Whether this refusal may be logged; if so, how many were left out since the last one.
fn log_budget() -> Option<u64> {
    static BUDGET: OnceLock<(DefaultDirectRateLimiter, AtomicU64)> = OnceLock::new();
    let (limiter, left_out) = BUDGET.get_or_init(|| {
        let rate = NonZeroU32::new(LOGS_PER_SEC).expect("not 0");
        let burst = NonZeroU32::new(LOGS_BURST).expect("not 0");
        let limiter = RateLimiter::direct(Quota::per_second(rate).allow_burst(burst));
        (limiter, AtomicU64::new(0))
    });
    if limiter.check().is_err() {
        left_out.fetch_add(1, Ordering::Relaxed);
        return None;
    }
    Some(left_out.swap(0, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_label_listed() {
        let all = [
            ResumeRefusal::Malformed,
            ResumeRefusal::TooLong,
            ResumeRefusal::UnknownKey,
            ResumeRefusal::Tampered,
            ResumeRefusal::Expired,
            ResumeRefusal::OtherStream,
            ResumeRefusal::WrongModel,
            ResumeRefusal::LastSeq,
            ResumeRefusal::Superseded,
            ResumeRefusal::Ended,
            ResumeRefusal::UnknownStream,
        ];
        let labels: Vec<&str> = all.iter().map(|r| r.label()).collect();
        assert_eq!(labels, RESUME_REFUSAL_REASONS);
    }
}
