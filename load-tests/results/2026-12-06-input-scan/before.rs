// The scan as it was (5a52397), in a timing loop: rustc --edition 2021 -C opt-level=3 before.rs && ./before

use std::time::Instant;
fn scan_floats<T>(values: &[T], finite: impl Fn(T) -> bool) -> (f64, f64, usize)
where
    T: Copy + PartialOrd + Into<f64>,
{
    let Some(&first) = values.iter().find(|&&v| finite(v)) else {
        return (f64::INFINITY, f64::NEG_INFINITY, values.len());
    };
    const LANES: usize = 8;
    let (mut lo, mut hi, mut bad) = ([first; LANES], [first; LANES], [0u32; LANES]);
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for lane in 0..LANES {
            let v = chunk[lane];
            lo[lane] = if v < lo[lane] { v } else { lo[lane] };
            hi[lane] = if v > hi[lane] { v } else { hi[lane] };
            bad[lane] += u32::from(!finite(v));
        }
    }
    let mut nonfinite: usize = bad.iter().map(|&b| b as usize).sum();
    nonfinite += rest.iter().filter(|&&v| !finite(v)).count();
    if nonfinite > 0 {
        // Infinities took part above: the rare slow way, finite values only.
        let finite_values = values.iter().copied().filter(|&v| finite(v));
        let (min, max) = finite_values.fold((first, first), |(lo, hi), v| {
            (if v < lo { v } else { lo }, if v > hi { v } else { hi })
        });
        return (min.into(), max.into(), nonfinite);
    }
    let fold = |init: T, better: fn(T, T) -> bool| {
        lo.iter()
            .chain(&hi)
            .chain(rest)
            .fold(init, |acc, &v| if better(v, acc) { v } else { acc })
    };
    (
        fold(first, |v, acc| v < acc).into(),
        fold(first, |v, acc| v > acc).into(),
        0,
    )
}


fn main() {
    let n = 11_648usize;
    let v: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1013) as f32 * 0.001 - 0.5).collect();
    let mut acc = 0.0;
    let reps = 20000;
    let t = Instant::now();
    for _ in 0..reps {
        let (lo, hi, bad) = scan_floats(std::hint::black_box(&v), f32::is_finite);
        acc += lo + hi + bad as f64;
    }
    let el = t.elapsed();
    println!("{:.1} us per call, {:.3} ns per value (acc {acc})", el.as_secs_f64()*1e6/reps as f64, el.as_secs_f64()*1e9/(reps*n) as f64);
}
