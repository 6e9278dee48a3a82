//! How long finished jobs are kept (docs/jobs.md, "Retention"): a job that succeeded, failed
//! or was cancelled stays listed, its state file in the jobs directory, for
//! `jobs_retention_secs` after it ended, and at most the `jobs_keep_finished` newest finished
//! jobs are kept; the others are forgotten, their record and state file removed, so that a
//! server that runs jobs for months neither lists nor holds every job it ever ran. What a job
//! wrote (its output, published or not) is never removed here, and a job that has not ended
//! is never forgotten. Swept when the registry starts, when a job ends, and every
//! [`sweep_every`] between. At start, the files jobs staged in the jobs directory that nothing
//! needs any more (a replaced table's local copy of an uploaded output) are removed too.

use std::sync::Arc;
use std::time::Duration;

use super::{now_ms, store, JobRecord, Jobs};

/// How long, and how many, finished jobs are kept (`None`: no such limit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    pub max_age: Option<Duration>,
    pub max_finished: Option<usize>,
}

impl Retention {
    /// No limit of either kind: nothing is ever forgotten.
    fn keeps_everything(&self) -> bool {
        self.max_age.is_none() && self.max_finished.is_none()
    }
}

/// When a finished job ended (a record from before `finished_unix_ms` was kept: when it was
/// made).
fn ended_ms(record: &JobRecord) -> u64 {
    record.finished_unix_ms.unwrap_or(record.created_unix_ms)
}

/// The finished jobs to forget, of `finished` (each one's id and when it ended) at `now_ms`:
/// those that ended longer than `max_age` ago, and beyond the newest `max_finished`.
fn to_forget<'a>(
    finished: impl Iterator<Item = (&'a str, u64)>,
    now_ms: u64,
    retention: &Retention,
) -> Vec<String> {
    let mut finished: Vec<(&str, u64)> = finished.collect();
    // Newest first; the id breaks ties, so that which of two jobs ended in the same
    // millisecond goes does not depend on the table's order.
    finished.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(a.0)));
    let max_age_ms = retention
        .max_age
        .map(|age| u64::try_from(age.as_millis()).unwrap_or(u64::MAX));
    finished
        .into_iter()
        .enumerate()
        .filter(|&(rank, (_, ended))| {
            let too_old = max_age_ms.is_some_and(|max| now_ms.saturating_sub(ended) > max);
            let too_many = retention.max_finished.is_some_and(|max| rank >= max);
            too_old || too_many
        })
        .map(|(_, (id, _))| id.to_string())
        .collect()
}

/// How often finished jobs are swept between the jobs' own ends: often enough that a job is
/// gone soon after its time is up (a tenth of the retention), at most every minute, at least
/// every 100 ms apart.
pub(super) fn sweep_every(retention: &Retention) -> Option<Duration> {
    let age = retention.max_age?;
    Some((age / 10).clamp(Duration::from_millis(100), Duration::from_secs(60)))
}

impl Jobs {
    /// Forgets the finished jobs past their retention: each one's record, and its state file.
    /// Returns how many.
    pub(super) fn prune_finished(&self) -> usize {
        let retention = self.inner.retention;
        if retention.keeps_everything() {
            return 0;
        }
        let mut table = self.table();
        let forget = to_forget(
            table
                .values()
                .filter(|e| e.record.state.finished())
                .map(|e| (e.record.id.as_str(), ended_ms(&e.record))),
            now_ms(),
            &retention,
        );
        for id in &forget {
            // Under the table's lock, as every change of a job's file: a job forgotten here
            // cannot be saved again meanwhile (a finished job's task writes nothing more).
            table.remove(id);
            if let Err(e) = store::remove(&self.inner.dir, id) {
                tracing::warn!(job = %id, error = %e, "cannot remove a finished job's state file");
            }
        }
        if !forget.is_empty() {
            tracing::info!(
                jobs = forget.len(),
                "finished batch jobs past their retention removed"
            );
        }
        forget.len()
    }

    /// Removes, at start, the files that jobs staged in the jobs directory and that no
    /// unfinished job or published table needs any more: the local copies of uploaded outputs
    /// whose tables were replaced (earlier servers kept every one: a copy of the output at
    /// every refresh), and what a crash left of a finished job's staging. A file
    /// that is some job's own output (a path the user named) is kept.
    pub(super) fn remove_leftovers(&self) {
        let Ok(entries) = std::fs::read_dir(&self.inner.dir) else {
            return;
        };
        let table = self.table();
        let needed = |id: &str, path: &std::path::Path| {
            table.get(id).is_some_and(|e| !e.record.state.finished())
                || table
                    .values()
                    .any(|e| e.record.spec.upload_to.is_none() && e.record.spec.output == path)
                || self.inner.published.serves(path)
        };
        let mut removed = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(super::record::staged_for) else {
                continue;
            };
            if needed(id, &path) {
                continue;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "cannot remove a finished job's staged file")
                }
            }
        }
        if removed > 0 {
            tracing::info!(
                files = removed,
                "staged files of finished batch jobs removed from the jobs directory"
            );
        }
    }

    /// Sweeps finished jobs every [`sweep_every`] on the jobs' runtime, for as long as the
    /// registry lives (the task holds it weakly) and its runtime runs.
    pub(super) fn sweep_periodically(&self) {
        let Some(every) = sweep_every(&self.inner.retention) else {
            return;
        };
        let inner = Arc::downgrade(&self.inner);
        self.inner.runtime.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = inner.upgrade() else { return };
                let jobs = Jobs { inner };
                // Off the runtime's workers: it takes the table's lock and removes files.
                let _ = tokio::task::spawn_blocking(move || jobs.prune_finished()).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR_MS: u64 = 3_600_000;

    fn retention(hours: Option<u64>, max: Option<usize>) -> Retention {
        Retention {
            max_age: hours.map(|h| Duration::from_secs(h * 3600)),
            max_finished: max,
        }
    }

    fn forget(jobs: &[(&str, u64)], now: u64, retention: Retention) -> Vec<String> {
        let mut ids = to_forget(jobs.iter().copied(), now, &retention);
        ids.sort();
        ids
    }

    #[test]
    fn jobs_past_their_age_are_forgotten_and_younger_ones_kept() {
        let now = 100 * HOUR_MS;
        let jobs = [
            ("a", now - 25 * HOUR_MS),
            ("b", now - 23 * HOUR_MS),
            ("c", now),
        ];
        assert_eq!(forget(&jobs, now, retention(Some(24), None)), ["a"]);
        // Exactly at its age it is still kept.
        assert!(forget(&[("d", now - 24 * HOUR_MS)], now, retention(Some(24), None)).is_empty());
        // A clock that went back keeps the job.
        assert!(forget(&[("e", now + HOUR_MS)], now, retention(Some(1), None)).is_empty());
        assert!(forget(&jobs, now, retention(None, None)).is_empty());
    }

    #[test]
    fn beyond_the_count_the_oldest_finished_go_first() {
        let now = 10 * HOUR_MS;
        let jobs = [("old", 1), ("mid", 2), ("new", 3), ("newest", 4)];
        assert_eq!(forget(&jobs, now, retention(None, Some(2))), ["mid", "old"]);
        assert_eq!(
            forget(&jobs, now, retention(None, Some(1))),
            ["mid", "new", "old"]
        );
        assert!(forget(&jobs, now, retention(None, Some(4))).is_empty());
        // Both limits: whichever removes more.
        let jobs = [
            ("a", now - 3 * HOUR_MS),
            ("b", now - HOUR_MS / 2),
            ("c", now),
        ];
        assert_eq!(forget(&jobs, now, retention(Some(1), Some(2))), ["a"]);
        assert_eq!(forget(&jobs, now, retention(Some(1), Some(1))), ["a", "b"]);
    }

    #[test]
    fn sweeps_follow_the_retention_within_bounds() {
        let every = |secs| {
            sweep_every(&Retention {
                max_age: Some(Duration::from_secs(secs)),
                max_finished: None,
            })
        };
        assert_eq!(every(1), Some(Duration::from_millis(100)));
        assert_eq!(every(100), Some(Duration::from_secs(10)));
        assert_eq!(every(7 * 86_400), Some(Duration::from_secs(60)));
        assert_eq!(sweep_every(&retention(None, Some(5))), None);
    }
}
