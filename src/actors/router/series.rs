//! The metric series a router moves, looked up once rather than by their labels on every
//! event: a lookup by labels clones the label strings into a key and hashes it, each time.
//! Under a CPU overload the router sheds or degrades thousands of requests a second, and that
//! lookup was 0.43% of the server's CPU in the refusal-flood profile
//! (`load-tests/results/2026-12-06-refusal-series/`).

use std::sync::Arc;

use metrics::{Counter, Gauge, Histogram};

/// A version, as `(model, version)`: the one a request was asked of.
pub(super) type Asked = Arc<(String, String)>;

/// The series every dispatch or batch moves.
pub(super) struct BatchSeries {
    pub queue_depth: Gauge,
    pub batch_size: Histogram,
    pub batch_requests: Histogram,
    pub inference_duration: Histogram,
}

impl BatchSeries {
    pub fn new(labels: &[(&'static str, String); 2]) -> BatchSeries {
        BatchSeries {
            queue_depth: metrics::gauge!("streamserve_queue_depth", labels),
            batch_size: metrics::histogram!("streamserve_batch_size", labels),
            batch_requests: metrics::histogram!("streamserve_batch_requests", labels),
            inference_duration: metrics::histogram!(
                "streamserve_inference_duration_seconds",
                labels
            ),
        }
    }
}

/// How many versions asking through one fallback keep their counters here; past that (many
/// versions sharing one fallback), the last place is reused, and versions that take turns
/// in it are looked up by their labels each time.
const MAX_ASKED: usize = 8;

/// `streamserve_shed_total` and `streamserve_degraded_total`, labelled by the version the
/// client asked for. That is this router's own version, or, at a fallback, the primary that
/// handed the request over: the same few `Arc`s every time, so a pointer comparison finds
/// the counter.
pub(super) struct AskedSeries {
    /// This router's model name: the `served_by` label of the requests it takes as a fallback.
    served_by: String,
    own: Asked,
    own_shed: Counter,
    shed: Vec<(Asked, Counter)>,
    degraded: Vec<(Asked, Counter)>,
}

impl AskedSeries {
    /// The series of the router serving `own`. Its own shed counter exists from the start
    /// (`router::start` registers the version's series at 0 before it makes the router's
    /// state), so taking its handle now adds no series.
    pub fn new(own: Asked) -> AskedSeries {
        AskedSeries {
            served_by: own.0.clone(),
            own_shed: shed_counter(&own),
            own,
            shed: Vec::new(),
            degraded: Vec::new(),
        }
    }

    /// `streamserve_shed_total` of the version asked (this one when `None`).
    pub fn shed(&mut self, asked: Option<&Asked>) -> &Counter {
        match asked {
            Some(asked) if !Arc::ptr_eq(asked, &self.own) => {
                cached(&mut self.shed, asked, shed_counter)
            }
            _ => &self.own_shed,
        }
    }

    /// `streamserve_degraded_total` of a request `asked` handed to this router, its fallback.
    pub fn degraded(&mut self, asked: &Asked) -> &Counter {
        let served_by = &self.served_by;
        cached(&mut self.degraded, asked, |asked| {
            degraded_counter(asked, served_by)
        })
    }
}

fn degraded_counter(asked: &Asked, served_by: &str) -> Counter {
    metrics::counter!("streamserve_degraded_total", "model" => asked.0.clone(), "version" => asked.1.clone(), "served_by" => served_by.to_string())
}

fn shed_counter(asked: &Asked) -> Counter {
    metrics::counter!("streamserve_shed_total", "model" => asked.0.clone(), "version" => asked.1.clone())
}

/// The counter of `asked` in `cache`, made and kept on first use (in the last place once the
/// cache is full, so the versions seen first stay). Keeping the `Arc` keeps its address from
/// being reused by another version.
fn cached<'a>(
    cache: &'a mut Vec<(Asked, Counter)>,
    asked: &Asked,
    make: impl Fn(&Asked) -> Counter,
) -> &'a Counter {
    let by_pointer = cache
        .iter()
        .position(|(known, _)| Arc::ptr_eq(known, asked));
    let index = if let Some(index) = by_pointer {
        index
    } else if let Some(index) = cache.iter().position(|(known, _)| known == asked) {
        // The same version through another `Arc` (its primary was started again): keep that
        // one, so that the pointer finds it from now on.
        cache[index].0 = asked.clone();
        index
    } else if cache.len() < MAX_ASKED {
        cache.push((asked.clone(), make(asked)));
        cache.len() - 1
    } else {
        // Full: the last place is reused, so the versions seen first keep theirs.
        let last = cache.len() - 1;
        cache[last] = (asked.clone(), make(asked));
        last
    };
    &cache[index].1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_asked_version_keeps_one_counter_and_a_full_cache_still_answers() {
        let own: Asked = Arc::new(("fallback".into(), "1".into()));
        let mut series = AskedSeries::new(own.clone());
        let primary: Asked = Arc::new(("primary".into(), "1".into()));
        let same_labels: Asked = Arc::new(("primary".into(), "1".into()));
        series.degraded(&primary);
        series.degraded(&same_labels);
        assert_eq!(series.degraded.len(), 1, "found by its labels too");
        assert!(
            Arc::ptr_eq(&series.degraded[0].0, &same_labels),
            "and kept under the newer Arc"
        );
        series.shed(None);
        series.shed(Some(&own));
        assert!(series.shed.is_empty(), "its own shed counter is kept apart");
        for i in 0..MAX_ASKED + 3 {
            series.shed(Some(&Arc::new((format!("p{i}"), "1".into()))));
        }
        assert_eq!(series.shed.len(), MAX_ASKED);
        assert_eq!(
            series.shed[MAX_ASKED - 1].0 .0,
            format!("p{}", MAX_ASKED + 2)
        );
    }
}
