//! `ModelHealth`: a model version's health and traffic counters. Its router writes the replica
//! count, the API records each answer, and the health API and the supervisor (idle unload,
//! canary judgement) read it without locks.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Health and traffic of a model version, written by its router and the API, read lock-free
/// by the health API and the supervisor (idle unload, canary judgement).
#[derive(Debug, Default)]
pub struct ModelHealth {
    pub healthy_replicas: AtomicUsize,
    pub replicas: usize,
    /// Milliseconds since the process started, at the last request.
    pub last_used_ms: AtomicU64,
    pub requests: AtomicU64,
    /// Answers with a 5xx status.
    pub errors: AtomicU64,
    pub latency_us: AtomicU64,
}

impl ModelHealth {
    pub fn new(healthy: usize, replicas: usize) -> ModelHealth {
        let health = ModelHealth {
            healthy_replicas: AtomicUsize::new(healthy),
            replicas,
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
    }

    pub fn ready(&self) -> bool {
        self.healthy_replicas.load(Ordering::Relaxed) > 0
    }
}
