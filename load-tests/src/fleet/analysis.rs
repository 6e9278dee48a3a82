//! The fleet drill's arithmetic over the answers the client saw, kept pure so that it is
//! tested on made-up answers: traffic per version in time bins ([`bins`]), when each instance
//! and the whole fleet served only the target version ([`convergence`]), and a version's first
//! and last answer ([`span`]). Times are seconds since the drill's start; an answer counts at
//! the time it came back.

use std::collections::BTreeMap;

use super::load::Answer;

/// The answers that came back within one bin, by version.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Bin {
    /// The bin's start, s relative to the origin given to [`bins`] (the deploy's return).
    pub t_s: f64,
    pub total: u64,
    /// Not a valid 200 (another status, a transport error, an invalid answer).
    pub failed: u64,
    /// Valid 200 answers per `model_version`.
    pub versions: BTreeMap<String, u64>,
}

/// The answers that came back in `[from, to)`, in bins of `width` s starting at `from`, each
/// bin's start given relative to `origin`. Every bin is there, empty or not.
pub fn bins(answers: &[Answer], from: f64, to: f64, width: f64, origin: f64) -> Vec<Bin> {
    // NaN bounds are no span either.
    if width.is_nan() || width <= 0.0 || to.is_nan() || from.is_nan() || to <= from {
        return Vec::new();
    }
    let n = ((to - from) / width).ceil() as usize;
    let mut out: Vec<Bin> = (0..n)
        .map(|i| Bin {
            t_s: from - origin + i as f64 * width,
            total: 0,
            failed: 0,
            versions: BTreeMap::new(),
        })
        .collect();
    for a in answers.iter().filter(|a| a.t_s >= from && a.t_s < to) {
        let i = (((a.t_s - from) / width) as usize).min(n - 1);
        let bin = &mut out[i];
        bin.total += 1;
        match (&a.version, a.ok()) {
            (Some(v), true) => *bin.versions.entry(v.clone()).or_default() += 1,
            _ => bin.failed += 1,
        }
    }
    out
}

/// How one instance came to serve only the target version, as the client saw it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct InstanceView {
    pub instance: String,
    /// Valid answers it gave in the span looked at.
    pub answers: u64,
    /// Its first answer from the target version.
    pub first_target_s: Option<f64>,
    /// Its last answer from any other version.
    pub last_other_s: Option<f64>,
    /// Its first target answer after its last other one: from then on it served only the
    /// target. `None` when it never did within the span.
    pub settled_s: Option<f64>,
}

/// Per instance and for the whole fleet: from when on only `target` served, among the valid
/// answers that came back in `(after, until]`. The fleet settled when its last instance did
/// (`None` if any instance never did, or gave no answer at all).
pub fn convergence(
    answers: &[Answer],
    instances: &[String],
    after: f64,
    until: f64,
    target: &str,
) -> (Vec<InstanceView>, Option<f64>) {
    let views: Vec<InstanceView> = instances
        .iter()
        .map(|id| {
            let mine: Vec<&Answer> = answers
                .iter()
                .filter(|a| a.t_s > after && a.t_s <= until && a.ok())
                .filter(|a| a.served_by.as_deref() == Some(id.as_str()))
                .collect();
            let is_target = |a: &&&Answer| a.version.as_deref() == Some(target);
            let first_target_s = mine.iter().find(is_target).map(|a| a.t_s);
            let last_other_s = mine.iter().rev().find(|a| !is_target(a)).map(|a| a.t_s);
            let settled_s = mine
                .iter()
                .filter(is_target)
                .find(|a| last_other_s.is_none_or(|last| a.t_s > last))
                .map(|a| a.t_s);
            InstanceView {
                instance: id.clone(),
                answers: mine.len() as u64,
                first_target_s,
                last_other_s,
                settled_s,
            }
        })
        .collect();
    let fleet = views
        .iter()
        .map(|v| v.settled_s)
        .collect::<Option<Vec<f64>>>()
        .filter(|all| !all.is_empty())
        .map(|all| all.into_iter().fold(f64::MIN, f64::max));
    (views, fleet)
}

/// A version's valid answers that came back in `(after, until]`: how many, the first, the last.
pub fn span(
    answers: &[Answer],
    version: &str,
    after: f64,
    until: f64,
) -> (u64, Option<f64>, Option<f64>) {
    let mut times = answers
        .iter()
        .filter(|a| a.t_s > after && a.t_s <= until && a.ok())
        .filter(|a| a.version.as_deref() == Some(version))
        .map(|a| a.t_s);
    let first = times.next();
    let (count, last) = times.fold((u64::from(first.is_some()), first), |(n, _), t| {
        (n + 1, Some(t))
    });
    (count, first, last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(t_s: f64, by: &str, version: &str) -> Answer {
        Answer {
            sent_s: t_s - 0.001,
            t_s,
            status: 200,
            version: Some(version.into()),
            served_by: Some(by.into()),
            error: None,
        }
    }

    fn failed(t_s: f64) -> Answer {
        Answer {
            sent_s: t_s - 0.001,
            t_s,
            status: 503,
            version: None,
            served_by: None,
            error: Some("no server".into()),
        }
    }

    #[test]
    fn bins_count_versions_and_failures_relative_to_the_origin() {
        let answers = vec![
            answer(10.0, "a", "1"),
            answer(10.1, "b", "1"),
            answer(10.3, "a", "2"),
            failed(10.4),
            answer(10.6, "b", "2"),
            answer(11.0, "b", "2"), // at the end: not in [from, to)
        ];
        let b = bins(&answers, 10.0, 11.0, 0.25, 10.5);
        assert_eq!(b.len(), 4);
        assert_eq!(b[0].t_s, -0.5);
        assert_eq!(b[3].t_s, 0.25);
        assert_eq!((b[0].total, b[0].failed), (2, 0));
        assert_eq!(b[0].versions["1"], 2);
        assert_eq!((b[1].total, b[1].failed), (2, 1));
        assert_eq!(b[1].versions["2"], 1);
        assert!(b[3].versions.is_empty());
        assert_eq!(b[2].versions["2"], 1);
        assert_eq!(b.iter().map(|b| b.total).sum::<u64>(), 5);
        assert!(bins(&answers, 1.0, 1.0, 0.25, 0.0).is_empty());
        assert!(bins(&answers, 1.0, 2.0, 0.0, 0.0).is_empty());
    }

    #[test]
    fn the_fleet_converges_when_its_last_instance_serves_only_the_target() {
        let ids = vec!["a".to_string(), "b".to_string()];
        let answers = vec![
            answer(0.5, "a", "1"), // before the deploy returned: ignored
            answer(1.1, "a", "1"),
            answer(1.2, "b", "1"),
            answer(1.5, "a", "2"),
            answer(1.6, "a", "1"), // a flips back once...
            answer(1.8, "a", "2"), // ...and settles here
            failed(1.9),           // failures do not move convergence
            answer(2.0, "b", "2"),
            answer(2.5, "a", "2"),
            answer(2.6, "b", "2"),
        ];
        let (views, fleet) = convergence(&answers, &ids, 1.0, 10.0, "2");
        assert_eq!(views[0].first_target_s, Some(1.5));
        assert_eq!(views[0].last_other_s, Some(1.6));
        assert_eq!(views[0].settled_s, Some(1.8));
        assert_eq!(views[0].answers, 5);
        assert_eq!(views[1].settled_s, Some(2.0));
        assert_eq!(fleet, Some(2.0));

        // An instance still on the old version at the end: the fleet has not converged.
        let mut stuck = answers.clone();
        stuck.push(answer(3.0, "b", "1"));
        let (views, fleet) = convergence(&stuck, &ids, 1.0, 10.0, "2");
        assert_eq!(views[1].settled_s, None);
        assert_eq!(fleet, None);

        // An instance that gave no answer: not known to have converged.
        let three = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        assert_eq!(convergence(&answers, &three, 1.0, 10.0, "2").1, None);
        // An instance that never left the target settles at its first answer.
        let (views, fleet) = convergence(&answers, &ids, 1.0, 10.0, "1");
        assert_eq!(views[1].settled_s, None);
        assert_eq!(fleet, None);
        let (_, fleet) = convergence(&answers, &ids, 1.0, 1.3, "1");
        assert_eq!(fleet, Some(1.2));
    }

    #[test]
    fn a_versions_span() {
        let answers = vec![
            answer(1.0, "a", "1"),
            answer(1.5, "a", "5"),
            answer(2.0, "b", "5"),
            answer(2.5, "b", "1"),
        ];
        assert_eq!(span(&answers, "5", 0.0, 10.0), (2, Some(1.5), Some(2.0)));
        assert_eq!(span(&answers, "5", 1.6, 10.0), (1, Some(2.0), Some(2.0)));
        assert_eq!(span(&answers, "9", 0.0, 10.0), (0, None, None));
    }
}
