//! The arithmetic of drift, pure and unit-tested: bucket edges made from a reference's
//! quantiles, which bucket a value falls in, and the population stability index (PSI) of an
//! observed distribution against the reference's shares.
//!
//! Buckets follow Prometheus' `le` rule: bucket `i` holds values `<= edges[i]`, and one more
//! bucket past the last edge holds the rest (`+Inf`). NaN falls in none: it is counted apart.

/// How many buckets a reference profile cuts each output into: deciles. Enough for PSI to see
/// a shift of a tenth of the mass, few enough that each bucket of a 1,000-row window holds
/// about a hundred values.
pub const BUCKETS: usize = 10;

/// Added to every share before PSI's logarithm, so that an empty bucket on either side gives a
/// large, finite score instead of infinity (the usual smoothing of PSI).
const EPSILON: f64 = 1e-4;

/// Upper edges of the buckets, strictly increasing; values above the last one go to `+Inf`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Edges(pub Vec<f64>);

impl Edges {
    /// The edges that cut `samples` into `buckets` parts of equal mass (its quantiles), with
    /// repeated quantiles merged (a few distinct values, such as class labels, give fewer
    /// buckets). `samples` is sorted in place; NaN must have been left out.
    pub fn from_quantiles(samples: &mut [f64], buckets: usize) -> Edges {
        samples.sort_by(f64::total_cmp);
        let mut edges: Vec<f64> = Vec::with_capacity(buckets);
        if samples.is_empty() {
            return Edges(edges);
        }
        for k in 1..buckets {
            let at = (k * samples.len()) / buckets;
            let edge = samples[at.min(samples.len() - 1)];
            if edges.last().is_none_or(|&last| edge > last) && edge.is_finite() {
                edges.push(edge);
            }
        }
        // The largest sample closes the last finite bucket, so the reference puts nothing
        // in `+Inf`: a value above everything seen in the reference is drift.
        let max = samples[samples.len() - 1];
        if max.is_finite() && edges.last().is_none_or(|&last| max > last) {
            edges.push(max);
        }
        Edges(edges)
    }

    /// Number of buckets, `+Inf` included.
    pub fn buckets(&self) -> usize {
        self.0.len() + 1
    }

    /// The bucket of `value` (not NaN).
    #[inline]
    pub fn bucket(&self, value: f64) -> usize {
        self.0.partition_point(|&edge| edge < value)
    }

    /// Each bucket's share of `samples` (NaN left out).
    pub fn shares(&self, samples: &[f64]) -> Vec<f64> {
        let mut counts = vec![0u64; self.buckets()];
        for &v in samples {
            counts[self.bucket(v)] += 1;
        }
        let total = samples.len().max(1) as f64;
        counts.iter().map(|&c| c as f64 / total).collect()
    }
}

/// The population stability index of `observed` counts against the reference `shares` (same
/// buckets): `sum((o - r) * ln(o / r))` over the buckets. Under 0.1 is usually read as no
/// shift, 0.1-0.25 as a moderate one, above 0.25 as a large one. `None` with nothing observed.
pub fn psi(shares: &[f64], observed: &[u64]) -> Option<f64> {
    let total: u64 = observed.iter().sum();
    if total == 0 || shares.len() != observed.len() {
        return None;
    }
    let score = shares
        .iter()
        .zip(observed)
        .map(|(&r, &o)| {
            let r = r + EPSILON;
            let o = o as f64 / total as f64 + EPSILON;
            (o - r) * (o / r).ln()
        })
        .sum();
    Some(score)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uniform(n: usize, from: f64, to: f64) -> Vec<f64> {
        (0..n)
            .map(|i| from + (to - from) * i as f64 / n as f64)
            .collect()
    }

    #[test]
    fn quantile_edges_cut_equal_mass_and_follow_le() {
        let mut samples = uniform(1000, 0.0, 1.0);
        let edges = Edges::from_quantiles(&mut samples, 10);
        assert_eq!(edges.buckets(), 11);
        let shares = edges.shares(&samples);
        for share in &shares[..10] {
            assert!((share - 0.1).abs() < 0.01, "{shares:?}");
        }
        assert_eq!(
            shares[10], 0.0,
            "the reference puts nothing above its maximum"
        );
        assert_eq!(
            edges.bucket(edges.0[0]),
            0,
            "a value on an edge is in that bucket (le)"
        );
        assert_eq!(edges.bucket(2.0), 10);
    }

    #[test]
    fn repeated_values_give_fewer_buckets() {
        let mut labels: Vec<f64> = (0..100).map(|i| (i % 3) as f64).collect();
        let edges = Edges::from_quantiles(&mut labels, 10);
        assert_eq!(edges.0, vec![0.0, 1.0, 2.0]);
        assert!(Edges::from_quantiles(&mut [], 10).0.is_empty());
    }

    #[test]
    fn psi_is_near_zero_for_the_same_distribution_and_large_for_a_shift() {
        let mut reference = uniform(10_000, 0.0, 1.0);
        let edges = Edges::from_quantiles(&mut reference, BUCKETS);
        let shares = edges.shares(&reference);
        let count = |values: &[f64]| {
            let mut c = vec![0u64; edges.buckets()];
            values.iter().for_each(|&v| c[edges.bucket(v)] += 1);
            c
        };
        let same = psi(&shares, &count(&uniform(1000, 0.0005, 1.0))).unwrap();
        assert!(same < 0.01, "{same}");
        let shifted = psi(&shares, &count(&uniform(1000, 0.5, 1.5))).unwrap();
        assert!(shifted > 1.0, "{shifted}");
        assert_eq!(psi(&shares, &vec![0; edges.buckets()]), None);
    }
}
