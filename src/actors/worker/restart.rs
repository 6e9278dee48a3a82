//! Replacing a replica's dead worker. [`Backoff`] decides how long its router waits: at once
//! for a one-off crash, with growing backoff for a worker that keeps dying, and at once again
//! after the replica has served quietly for a while; it is pure (the caller passes the clock),
//! so the policy is tested without a model or a timer. [`restart`] then starts the
//! replacement, retrying until a session loads; a new replica gets one try ([`start_once`]).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{WorkerHandle, WorkerRecipe};
use crate::actors::faults::FaultQueue;

/// Deaths this far back no longer count towards the backoff.
pub const WINDOW: Duration = Duration::from_secs(60);
/// A worker that has been up this long without dying was healthy: its death is a first death
/// again, and its replacement starts at once. Longer than the longest backoff plus a model
/// load, so a worker that dies right after each restart cannot reset its own backoff.
pub const QUIET: Duration = Duration::from_secs(10);
/// The longest wait between a death and the restart.
pub const MAX_DELAY: Duration = Duration::from_secs(5);
/// Deaths remembered at most; past the one that reaches `MAX_DELAY` more change nothing.
const REMEMBERED: usize = 16;

/// The restart history of one replica.
#[derive(Debug)]
pub struct Backoff {
    /// Deaths within `WINDOW` since the last quiet period, oldest first.
    deaths: VecDeque<Instant>,
    /// When the replica's current worker started serving (`None` while it is being replaced).
    up_since: Option<Instant>,
}

impl Backoff {
    /// A replica whose worker started serving at `now`.
    pub fn new(now: Instant) -> Backoff {
        Backoff {
            deaths: VecDeque::new(),
            up_since: Some(now),
        }
    }

    /// The replica's new worker started serving at `now`.
    pub fn attached(&mut self, now: Instant) {
        self.up_since = Some(now);
    }

    /// Records that the replica's worker died at `now`; returns how long to wait before
    /// starting its replacement.
    pub fn died(&mut self, now: Instant) -> Duration {
        let quiet = self
            .up_since
            .take()
            .is_some_and(|up| now.saturating_duration_since(up) >= QUIET);
        if quiet {
            self.deaths.clear();
        }
        self.deaths
            .retain(|t| now.saturating_duration_since(*t) < WINDOW);
        if self.deaths.len() >= REMEMBERED {
            self.deaths.pop_front();
        }
        self.deaths.push_back(now);
        delay(self.deaths.len())
    }
}

/// The wait after the `recent`-th death in a row: none for the first (a one-off crash costs no
/// capacity for longer than a model load), then 100 ms doubling up to `MAX_DELAY`, so that a
/// worker that crashes on every batch cannot spin.
pub fn delay(recent: usize) -> Duration {
    match recent {
        0 | 1 => Duration::ZERO,
        n => (Duration::from_millis(100) * 2u32.saturating_pow(n as u32 - 2)).min(MAX_DELAY),
    }
}

/// Starts a replacement worker after `delay`, retrying with exponential backoff (100 ms
/// doubling to 5 s) until a session loads; resolves to the new worker's handle.
pub async fn restart(
    recipe: WorkerRecipe,
    replica: usize,
    generation: u64,
    faults: FaultQueue,
    delay: Duration,
) -> WorkerHandle {
    actix_web::rt::time::sleep(delay).await;
    let mut backoff = Duration::from_millis(100);
    let entry = &recipe.entry;
    loop {
        match start_once(&recipe, replica, generation, faults.clone()).await {
            Ok(handle) => return handle,
            Err(reason) => {
                tracing::error!(model = %entry.name, version = %entry.version, replica, %reason, "worker restart failed")
            }
        }
        actix_web::rt::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_DELAY);
    }
}

/// One try at starting a worker: its handle once its session has loaded, or why it did not. A
/// new replica (autoscaling) gets this one try: a replica that cannot load now (its file gone,
/// its device out of memory) is given up, and its budget goes back, rather than held by a slot
/// that retries forever and keeps its router from scaling either way.
pub async fn start_once(
    recipe: &WorkerRecipe,
    replica: usize,
    generation: u64,
    faults: FaultQueue,
) -> Result<WorkerHandle, String> {
    match recipe.spawn(replica, generation, faults).await {
        Ok(Ok(started)) => Ok(started.handle),
        Ok(Err(reason)) => Err(reason),
        Err(_) => Err("worker thread ended while loading".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn delays_grow_then_cap() {
        assert_eq!(delay(1), Duration::ZERO);
        assert_eq!(delay(2), 100 * MS);
        assert_eq!(delay(3), 200 * MS);
        assert_eq!(delay(5), 800 * MS);
        assert_eq!(delay(9), MAX_DELAY);
        assert_eq!(delay(1000), MAX_DELAY);
    }

    #[test]
    fn a_crash_loop_backs_off() {
        let t0 = Instant::now();
        let mut backoff = Backoff::new(t0);
        let mut now = t0 + 20 * MS;
        let mut waits = Vec::new();
        for _ in 0..6 {
            let wait = backoff.died(now);
            waits.push(wait);
            // Restarted after the wait (plus a 50 ms load), dies on its first batch.
            now += wait + 50 * MS;
            backoff.attached(now);
            now += MS;
        }
        assert_eq!(
            waits,
            vec![
                Duration::ZERO,
                100 * MS,
                200 * MS,
                400 * MS,
                800 * MS,
                1600 * MS
            ]
        );
    }

    #[test]
    fn a_quiet_period_resets_the_backoff() {
        // The case: a burst of panics, then a hang 30 s later waited 3.2 s.
        let t0 = Instant::now();
        let mut backoff = Backoff::new(t0);
        let mut now = t0;
        for _ in 0..6 {
            now += backoff.died(now) + 50 * MS;
            backoff.attached(now);
        }
        assert!(backoff.died(now + MS) > Duration::ZERO, "still in the loop");
        backoff.attached(now + 2000 * MS);
        let later = now + Duration::from_secs(30);
        assert_eq!(backoff.died(later), Duration::ZERO, "quiet for 28 s");
        // And the next death right after its restart backs off again, from the start.
        backoff.attached(later + 50 * MS);
        assert_eq!(backoff.died(later + 60 * MS), 100 * MS);
    }

    #[test]
    fn dying_again_while_being_replaced_is_not_quiet() {
        // No attach between two deaths (the replacement never served): no reset.
        let t0 = Instant::now();
        let mut backoff = Backoff::new(t0);
        assert_eq!(backoff.died(t0 + Duration::from_secs(20)), Duration::ZERO);
        assert_eq!(backoff.died(t0 + Duration::from_secs(40)), 100 * MS);
    }

    #[test]
    fn deaths_older_than_the_window_are_forgotten() {
        let t0 = Instant::now();
        let mut backoff = Backoff::new(t0);
        backoff.died(t0);
        backoff.attached(t0 + MS);
        // The replacement served for 4 ms: not quiet, the second death backs off.
        assert_eq!(backoff.died(t0 + 5 * MS), 100 * MS);
        // 61 s later with no attach in between: the window dropped both.
        assert_eq!(backoff.died(t0 + Duration::from_secs(61)), Duration::ZERO);
    }
}
