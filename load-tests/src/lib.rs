//! streamserve-load: load generators and benchmarks for streamserve.
//!
//! - [`rest`]: closed-loop load on the Open Inference Protocol REST endpoint, and
//!   [`open_loop`]: the same requests at a constant rate (open loop);
//! - [`bench`]: the REST micro-benchmark, server with and without dynamic batching against
//!   the in-process ONNX Runtime ceiling;
//! - [`streams`]: WebSocket speech-stream load, and [`streams_bench`]: how many real-time
//!   `silero_vad` streams one server carries, batching across streams on and off;
//! - [`overload`]: open-loop overload of `mlp` with its fallback, shedding and degraded mode;
//!   [`timeline`]: the same server through an overload step and injected worker faults,
//!   over time;
//! - [`peer`]: the FastAPI + uvicorn + onnxruntime peer `bench` compares with;
//! - [`plots`]: SVG plots of every benchmark's results; [`scenario`]: runs described in
//!   TOML files; [`capacity`]: instances needed for a target from the measured curves;
//!   [`prometheus`]: the server's own figures from `/metrics`.
//!
//! Everything here talks to loopback addresses only ([`rest::check_loopback`]) and is bounded
//! in time: every run has a fixed duration, every request a timeout.

pub mod bench;
pub mod capacity;
pub mod manifest;
pub mod open_loop;
pub mod overload;
pub mod peer;
pub mod plots;
pub mod prometheus;
pub mod report;
pub mod rest;
pub mod scenario;
pub mod streams;
pub mod streams_bench;
pub mod sysinfo;
pub mod timeline;

/// The `mlp` model's interface: FP32 `features [batch, 256]` in, `[batch, 16]` out.
pub mod mlp {
    pub const INPUT: &str = "features";
    pub const FEATURES: usize = 256;
    pub const OUTPUT_WIDTH: usize = 16;
}

/// The one latency histogram of every load loop: microseconds, from 1 µs to 10 minutes.
pub mod hist {
    use std::time::Duration;

    pub type Histogram = hdrhistogram::Histogram<u64>;
    pub const MAX_US: u64 = 600_000_000;

    /// 3 significant digits for run totals; 2 for the thousands of bins of a timeline (a plot
    /// needs no more).
    pub fn new(digits: u8) -> Histogram {
        Histogram::new_with_bounds(1, MAX_US, digits).expect("histogram bounds are valid")
    }

    /// A duration as a histogram value, clamped to the bounds.
    pub fn micros(d: Duration) -> u64 {
        d.as_micros().clamp(1, MAX_US as u128) as u64
    }

    /// The value at quantile `q` (0..=1) in milliseconds; 0 without data.
    pub fn ms(h: &Histogram, q: f64) -> f64 {
        if h.is_empty() {
            return 0.0;
        }
        h.value_at_quantile(q) as f64 / 1000.0
    }
}

/// Deterministic pseudo-random numbers (SplitMix64), so that every run sends the same data.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A float uniformly drawn from [-1, 1), with 24 bits of randomness.
    pub fn next_f32(&mut self) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        unit * 2.0 - 1.0
    }

    pub fn f32_vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next_f32()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_is_deterministic_and_in_range() {
        let a = SplitMix64::new(7).f32_vec(1000);
        let b = SplitMix64::new(7).f32_vec(1000);
        assert_eq!(a, b);
        assert!(a.iter().all(|v| (-1.0..1.0).contains(v)));
        assert_ne!(a, SplitMix64::new(8).f32_vec(1000));
    }
}
