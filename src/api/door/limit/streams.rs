//! Whether the door lets a new stream in. A stream is long-lived work: while the server is
//! short of what it takes, a new one is better started elsewhere, and the open ones kept in
//! real time. Two signs say it is short: a request overflowed the admission limit within the
//! last second (the CPU around the models), or the open streams are behind real time
//! ([`StreamPace`]: the CPU as the streams themselves use it, which no request counts).
//! A stream resuming is not asked: it is already counted here.

use std::sync::Arc;

use super::{AdmissionLimit, REFUSING_FOR};
use crate::stream::pace::StreamPace;

/// Why a new stream was turned away: its transport closes it with 1013 (`try_again`) or
/// answers a retryable status, with this as the reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StreamRefused {
    #[error("the server is at its admission limit; retry in a second")]
    AtLimit,
    #[error("this server's open streams are behind real time; retry in a second")]
    StreamsBehind,
}

impl AdmissionLimit {
    /// Whether a request overflowed the limit (refused, or sent to its fallback) within the
    /// last second: the server is short of CPU, so new long-lived work (streams) had better
    /// go elsewhere.
    pub fn refusing(&self) -> bool {
        self.lock()
            .last_overflow
            .is_some_and(|at| at.elapsed() < REFUSING_FOR)
    }

    /// Whether a new stream may start; one turned away is counted by its reason.
    pub fn admit_stream(&self) -> Result<(), StreamRefused> {
        if self.refusing() {
            self.series.refused.increment(1);
            return Err(StreamRefused::AtLimit);
        }
        if self.streams.turning_away() {
            self.series.streams_behind.increment(1);
            return Err(StreamRefused::StreamsBehind);
        }
        Ok(())
    }

    /// What the streams report their pace to (they are started with it).
    pub fn stream_pace(&self) -> Arc<StreamPace> {
        self.streams.clone()
    }
}
