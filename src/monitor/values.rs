//! Reading a tensor's values as `f64` for statistics, whatever its element type, and a
//! bounded, reproducible sample of them: what the reference profile is made from. Also the
//! count of NaN over every value, which is not sampled (see [`count_nan`]).

use crate::tensor::TensorData;

/// Most values of one tensor looked at per model call: a larger output (an image, a long
/// embedding batch, a stream model's recurrent state) is read at an even stride instead,
/// starting one further on each call, so that watching it costs a bounded, small share of
/// the call. At 8,192, with 330 real-time `silero_vad` streams on one core (batches of 18,
/// each with a state output of 256 values per row), the walk over the outputs took 1.4% of
/// the server's CPU (a `perf` profile).
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

fn strided<T: ToF64>(values: &[T], limit: usize, phase: usize, f: &mut impl FnMut(f64)) {
    let step = values.len().div_ceil(limit.max(1)).max(1);
    let start = phase % step;
    values[start..]
        .iter()
        .step_by(step)
        .for_each(|&v| f(v.to_f64()));
}

/// Calls `f` with every value of `data`.
pub fn visit(data: &TensorData, mut f: impl FnMut(f64)) {
    crate::with_tensor_data!(data, v => strided(v, usize::MAX, 0, &mut f))
}

/// Calls `f` with every value of `data` or, past `limit` of them, with an even stride of at
/// most `limit` starting at `phase` (modulo the stride). Callers pass a count of their calls:
/// a stride that always started at the first value would read the same positions of every
/// call, e.g. only every fourth unit of a 128-wide recurrent state at a stride of 4, and a
/// distribution of those units is not the output's; moving the start covers every position
/// over successive calls.
pub fn visit_sampled(data: &TensorData, limit: usize, phase: usize, mut f: impl FnMut(f64)) {
    crate::with_tensor_data!(data, v => strided(v, limit, phase, &mut f))
}

/// How many values of `data` are NaN, over every value however large the tensor. A count
/// read from the stride of [`visit_sampled`] would see a single NaN in a large output only
/// once in a stride's worth of calls, so the NaN counter (and its alert) would miss wrong
/// answers. The check costs about 0.26 ns a value on the 2-core development machine, in cache
/// or not (`nan_count_cost` below, 2026-12-07): 1.5 us for `ww_embedding`'s largest answer
/// (6,144 values), 16 us for `silero_vad`'s state at 256 steps (65,536), 0.26 ms for 1M
/// values, where the sampled walk of a 1M-value call takes 7-8 us; next to the model call that
/// wrote those values, small. Only floats can hold NaN.
pub fn count_nan(data: &TensorData) -> u64 {
    match data {
        TensorData::Fp32(v) => nan_lanes(v, f32::is_nan),
        TensorData::Fp64(v) => nan_lanes(v, f64::is_nan),
        _ => 0,
    }
}

/// Counts in independent lanes with no branch per value: `filter().count()` took 0.37-0.73 ns
/// a value against 0.25 ns for this in the same micro-benchmark.
fn nan_lanes<T: Copy>(values: &[T], is_nan: impl Fn(T) -> bool + Copy) -> u64 {
    const LANES: usize = 16;
    let mut lanes = [0u64; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for lane in 0..LANES {
            lanes[lane] += u64::from(is_nan(chunk[lane]));
        }
    }
    let rest = rest.iter().filter(|&&v| is_nan(v)).count() as u64;
    lanes.iter().sum::<u64>() + rest
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
    fn large_tensors_are_read_at_a_stride_that_moves_from_call_to_call() {
        let data = TensorData::Int32((0..100).collect());
        let read = |phase| {
            let mut seen = Vec::new();
            visit_sampled(&data, 10, phase, |v| seen.push(v));
            seen
        };
        assert_eq!(
            read(0),
            (0..100).step_by(10).map(f64::from).collect::<Vec<_>>()
        );
        assert_eq!(
            read(3),
            (3..100).step_by(10).map(f64::from).collect::<Vec<_>>()
        );
        assert_eq!(read(13), read(3));
        // Ten successive calls read every value once.
        let mut all: Vec<f64> = (0..10).flat_map(read).collect();
        all.sort_by(f64::total_cmp);
        assert_eq!(all, (0..100).map(f64::from).collect::<Vec<_>>());
        let mut bools = Vec::new();
        visit(&TensorData::Bool(vec![true, false]), |v| bools.push(v));
        assert_eq!(bools, vec![1.0, 0.0]);
        let mut small = Vec::new();
        visit_sampled(&TensorData::Int32(vec![7, 8]), 10, 5, |v| small.push(v));
        assert_eq!(
            small,
            vec![7.0, 8.0],
            "under the limit every value, whatever the phase"
        );
    }

    #[test]
    fn every_nan_is_counted_however_large_the_tensor() {
        let mut values = vec![0.5f32; 1 << 20];
        values[0] = f32::NAN;
        values[777_777] = f32::NAN;
        let data = TensorData::Fp32(values);
        assert_eq!(count_nan(&data), 2);
        let mut sampled = 0;
        visit_sampled(&data, MAX_VALUES_PER_CALL, 1, |v| {
            sampled += u64::from(v.is_nan())
        });
        assert_eq!(
            sampled, 0,
            "the stride reads neither: why the count is not sampled"
        );
        for len in [0usize, 1, 15, 16, 17, 100] {
            let doubles: Vec<f64> = (0..len)
                .map(|i| if i % 3 == 0 { f64::NAN } else { 1.0 })
                .collect();
            assert_eq!(
                count_nan(&TensorData::Fp64(doubles)),
                len.div_ceil(3) as u64
            );
        }
        let infinities = TensorData::Fp32(vec![f32::INFINITY, f32::NEG_INFINITY]);
        assert_eq!(count_nan(&infinities), 0);
        assert_eq!(count_nan(&TensorData::Int32(vec![1; 5000])), 0);
    }

    /// The figure on [`count_nan`]: `cargo test --release --lib nan_count_cost -- --ignored
    /// --nocapture`.
    #[test]
    #[ignore]
    fn nan_count_cost() {
        use crate::monitor::bins::Edges;
        let edges = Edges((1..10).map(|i| f64::from(i) / 5.0 - 1.0).collect());
        for len in [6_144usize, 65_536, 1_000_000] {
            let values: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
            let data = TensorData::Fp32(values);
            let calls = (200_000_000 / len).max(200);
            let per_call = |f: &mut dyn FnMut(usize) -> u64| {
                let started = std::time::Instant::now();
                let found: u64 = (0..calls).map(&mut *f).sum();
                std::hint::black_box(found);
                started.elapsed().as_secs_f64() * 1e6 / calls as f64
            };
            let count_us = per_call(&mut |_| count_nan(std::hint::black_box(&data)));
            let mut counts = vec![0u64; edges.buckets()];
            let walk_us = per_call(&mut |call| {
                let mut nan = 0;
                visit_sampled(
                    std::hint::black_box(&data),
                    MAX_VALUES_PER_CALL,
                    call,
                    |v| {
                        if v.is_nan() {
                            nan += 1;
                        } else {
                            counts[edges.bucket(v)] += 1;
                        }
                    },
                );
                nan
            });
            eprintln!(
                "{len} FP32 values: NaN count over all {count_us:.2} us ({:.3} ns a value); sampled walk into buckets {walk_us:.2} us",
                count_us * 1000.0 / len as f64
            );
        }
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
