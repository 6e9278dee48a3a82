//! Reading a tensor's values as `f64` for statistics, whatever its element type, and a
//! bounded, reproducible sample of them: what the reference profile is made from.

use crate::tensor::TensorData;

/// Most values of one tensor looked at per model call: a larger output (an image, a long
/// embedding batch, a stream model's recurrent state) is read at an even stride instead, so
/// that watching it costs a bounded, small share of the call. At 8,192, with 330 real-time
/// `silero_vad` streams on one core (batches of 18, each with a state output of 256 values
/// per row), the walk over the outputs took 1.4% of the server's CPU (a `perf` profile).
pub const MAX_VALUES_PER_CALL: usize = 1024;

trait ToF64: Copy {
    fn to_f64(self) -> f64;
}

macro_rules! to_f64_as {
    ($($t:ty),*) => { $(impl ToF64 for $t { #[inline] fn to_f64(self) -> f64 { self as f64 } })* };
}
to_f64_as!(u8, u16, u32, u64, i8, i16, i32, i64, f32, f64);

impl ToF64 for bool {
    #[inline]
    fn to_f64(self) -> f64 {
        if self {
            1.0
        } else {
            0.0
        }
    }
}

fn strided<T: ToF64>(values: &[T], limit: usize, f: &mut impl FnMut(f64)) {
    let step = values.len().div_ceil(limit.max(1)).max(1);
    values.iter().step_by(step).for_each(|&v| f(v.to_f64()));
}

/// Calls `f` with every value of `data`, or with an even stride of at most `limit` of them.
pub fn visit(data: &TensorData, limit: usize, mut f: impl FnMut(f64)) {
    crate::with_tensor_data!(data, v => strided(v, limit, &mut f))
}

/// A uniform sample of at most `capacity` values from a stream of them (reservoir sampling,
/// with a fixed seed: the same inputs give the same profile).
#[derive(Debug)]
pub struct Reservoir {
    values: Vec<f64>,
    seen: u64,
    capacity: usize,
    rng: fastrand::Rng,
}

impl Reservoir {
    pub fn new(capacity: usize) -> Reservoir {
        Reservoir {
            values: Vec::new(),
            seen: 0,
            capacity,
            rng: fastrand::Rng::with_seed(20261204),
        }
    }

    /// Offers one value; NaN is not a value of the distribution and is left out.
    pub fn offer(&mut self, value: f64) {
        if value.is_nan() {
            return;
        }
        self.seen += 1;
        if self.values.len() < self.capacity {
            self.values.push(value);
        } else {
            let slot = self.rng.u64(0..self.seen);
            if (slot as usize) < self.capacity {
                self.values[slot as usize] = value;
            }
        }
    }

    pub fn into_values(self) -> Vec<f64> {
        self.values
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_tensors_are_read_at_a_stride() {
        let mut seen = Vec::new();
        visit(&TensorData::Int32((0..100).collect()), 10, |v| seen.push(v));
        assert_eq!(
            seen,
            (0..100).step_by(10).map(f64::from).collect::<Vec<_>>()
        );
        let mut bools = Vec::new();
        visit(&TensorData::Bool(vec![true, false]), 10, |v| bools.push(v));
        assert_eq!(bools, vec![1.0, 0.0]);
    }

    #[test]
    fn the_reservoir_keeps_a_bounded_reproducible_sample() {
        let sample = |n: u32| {
            let mut r = Reservoir::new(100);
            (0..n).for_each(|i| r.offer(f64::from(i)));
            r.offer(f64::NAN);
            r.into_values()
        };
        assert_eq!(sample(50).len(), 50);
        assert_eq!(sample(10_000).len(), 100);
        assert_eq!(sample(10_000), sample(10_000));
        assert!(sample(10_000).iter().any(|&v| v > 5000.0));
    }
}
