//! When a model version gains or loses a replica, pure (the caller passes the clock): a
//! replica is added when the queue has stayed deeper than every worker can take at once for
//! `SCALE_UP_AFTER` (not within `SCALE_UP_RETRY` of one that failed to load), and the newest
//! one is removed after `SCALE_DOWN_IDLE` without any batch (not a serving one while another is
//! being replaced: [`Load::newest_idle`]), within the manifest's `min_replicas..=max_replicas`. Whether the machine's budgets have
//! room is the router's question, asked only when this says `Up`.

use std::time::{Duration, Instant};

/// Queue pressure must last this long before a replica is added.
pub const SCALE_UP_AFTER: Duration = Duration::from_secs(1);
/// A replica above `min_replicas` is removed after this long without any batch.
pub const SCALE_DOWN_IDLE: Duration = Duration::from_secs(5);
/// After a new replica failed to load, no other is tried for this long (a file gone or a
/// device out of memory does not mend in a second, and each try loads a session).
pub const SCALE_UP_RETRY: Duration = Duration::from_secs(10);

/// What the router sees at one watch tick.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    /// A batch runs or a request waits.
    pub active: bool,
    /// More rows wait than every healthy worker can take at once, and no worker is idle.
    pub pressure: bool,
    pub replicas: usize,
    /// The newest replica runs no batch, and taking it out leaves no other short (it can go).
    pub newest_idle: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Scale {
    Hold,
    Up,
    Down,
}

#[derive(Debug)]
pub struct Autoscaler {
    min: usize,
    max: usize,
    /// Since when the pressure has lasted.
    pressure_since: Option<Instant>,
    /// Since when no batch has run and no request has waited.
    idle_since: Instant,
    /// A replica being added (its session loading).
    adding: bool,
    /// No replica is added before this: the last one failed to load.
    hold_until: Option<Instant>,
}

impl Autoscaler {
    pub fn new(min: usize, max: usize, now: Instant) -> Autoscaler {
        Autoscaler {
            min,
            max,
            pressure_since: None,
            idle_since: now,
            adding: false,
            hold_until: None,
        }
    }

    /// What to do now. After `Up`, call [`started_adding`](Self::started_adding) if the budgets let
    /// the router add one; after `Down`, the replica is gone.
    pub fn decide(&mut self, load: Load, now: Instant) -> Scale {
        if load.active {
            self.idle_since = now;
        }
        self.pressure_since = if load.pressure {
            self.pressure_since.or(Some(now))
        } else {
            None
        };
        let sustained = self
            .pressure_since
            .is_some_and(|t| now.duration_since(t) >= SCALE_UP_AFTER);
        let held = self.hold_until.is_some_and(|t| now < t);
        if sustained && !self.adding && !held && load.replicas < self.max {
            return Scale::Up;
        }
        let idle_long = now.duration_since(self.idle_since) >= SCALE_DOWN_IDLE;
        if idle_long && load.replicas > self.min && !self.adding && load.newest_idle {
            self.idle_since = now;
            return Scale::Down;
        }
        Scale::Hold
    }

    /// The router took the budget for a new replica and is starting it.
    pub fn started_adding(&mut self) {
        self.adding = true;
        self.pressure_since = None;
    }

    /// The new replica is serving (or gave up).
    pub fn added(&mut self) {
        self.adding = false;
    }

    /// The new replica failed to load (after [`added`](Self::added)): the next is tried
    /// [`SCALE_UP_RETRY`] from `now` at the earliest.
    pub fn failed_to_add(&mut self, now: Instant) {
        self.hold_until = Some(now + SCALE_UP_RETRY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(active: bool, pressure: bool, replicas: usize) -> Load {
        Load {
            active,
            pressure,
            replicas,
            newest_idle: true,
        }
    }

    #[test]
    fn sustained_pressure_adds_one_replica_at_a_time_up_to_max() {
        let t0 = Instant::now();
        let mut s = Autoscaler::new(1, 3, t0);
        assert_eq!(s.decide(load(true, true, 1), t0), Scale::Hold);
        let later = t0 + SCALE_UP_AFTER;
        assert_eq!(s.decide(load(true, true, 1), later), Scale::Up);
        s.started_adding();
        assert_eq!(
            s.decide(load(true, true, 1), later + SCALE_UP_AFTER),
            Scale::Hold,
            "one at a time"
        );
        s.added();
        // The pressure clock restarted when the replica started loading, not when it came up.
        assert_eq!(
            s.decide(load(true, true, 2), later + SCALE_UP_AFTER * 3 / 2),
            Scale::Hold
        );
        let t1 = later + SCALE_UP_AFTER;
        assert_eq!(
            s.decide(load(true, true, 2), t1 + SCALE_UP_AFTER),
            Scale::Up
        );
        s.started_adding();
        s.added();
        let t2 = t1 + 3 * SCALE_UP_AFTER;
        s.decide(load(true, true, 3), t2);
        assert_eq!(
            s.decide(load(true, true, 3), t2 + SCALE_UP_AFTER),
            Scale::Hold,
            "at max"
        );
    }

    #[test]
    fn a_replica_that_failed_to_load_holds_the_next_back() {
        let t0 = Instant::now();
        let mut s = Autoscaler::new(1, 3, t0);
        s.decide(load(true, true, 1), t0);
        assert_eq!(
            s.decide(load(true, true, 1), t0 + SCALE_UP_AFTER),
            Scale::Up
        );
        s.started_adding();
        let failed = t0 + SCALE_UP_AFTER * 2;
        s.added();
        s.failed_to_add(failed);
        s.decide(load(true, true, 1), failed);
        assert_eq!(
            s.decide(load(true, true, 1), failed + SCALE_UP_AFTER),
            Scale::Hold,
            "held back"
        );
        assert_eq!(
            s.decide(load(true, true, 1), failed + SCALE_UP_RETRY),
            Scale::Up
        );
    }

    #[test]
    fn pressure_that_stops_resets_the_clock() {
        let t0 = Instant::now();
        let mut s = Autoscaler::new(1, 2, t0);
        s.decide(load(true, true, 1), t0);
        s.decide(load(true, false, 1), t0 + SCALE_UP_AFTER / 2);
        assert_eq!(
            s.decide(load(true, true, 1), t0 + SCALE_UP_AFTER),
            Scale::Hold
        );
    }

    #[test]
    fn idle_replicas_above_min_go_one_per_idle_period() {
        let t0 = Instant::now();
        let mut s = Autoscaler::new(1, 3, t0);
        assert_eq!(
            s.decide(load(false, false, 3), t0 + SCALE_DOWN_IDLE / 2),
            Scale::Hold
        );
        assert_eq!(
            s.decide(load(false, false, 3), t0 + SCALE_DOWN_IDLE),
            Scale::Down
        );
        assert_eq!(
            s.decide(load(false, false, 2), t0 + SCALE_DOWN_IDLE),
            Scale::Hold
        );
        assert_eq!(
            s.decide(load(false, false, 2), t0 + 2 * SCALE_DOWN_IDLE),
            Scale::Down
        );
        assert_eq!(
            s.decide(load(false, false, 1), t0 + 4 * SCALE_DOWN_IDLE),
            Scale::Hold,
            "at min"
        );
        // A busy newest replica stays; activity restarts the idle clock.
        let mut s = Autoscaler::new(1, 3, t0);
        let busy = Load {
            newest_idle: false,
            ..load(false, false, 2)
        };
        assert_eq!(s.decide(busy, t0 + SCALE_DOWN_IDLE), Scale::Hold);
        s.decide(load(true, false, 2), t0 + SCALE_DOWN_IDLE);
        assert_eq!(
            s.decide(load(false, false, 2), t0 + SCALE_DOWN_IDLE * 3 / 2),
            Scale::Hold
        );
    }
}
