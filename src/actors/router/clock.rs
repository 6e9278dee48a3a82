//! The flush clock: wakes a router when the request that would go next in a partial batch has
//! waited its `max_queue_delay` (or the busy or low-priority delay). One thread for the
//! process, over a heap of deadlines, waiting on a condition variable: the OS keeps such a
//! timeout to tens of microseconds, where the actors' timer (tokio's) rounds every deadline up
//! to the next whole millisecond. With that timer, a model on the default
//! `max_queue_delay_ms = 1` sent its one-request batch after 2.2 ms on an idle server
//! (`queue_time_us` of `typed_ops`), twice the delay it was given.
//!
//! A router is held weakly: one that has stopped is not kept alive by a timer it armed, and
//! its entry is dropped when it comes due.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::sync::{Condvar, Mutex, OnceLock, Weak};
use std::time::Instant;

/// What the clock wakes.
pub(super) trait Flush: Send + Sync {
    /// Sends out what is due (and arms the clock again for what is not yet).
    fn flush(&self);
}

/// Wakes `target` at `at` (not before), on the clock's thread.
pub(super) fn arm(at: Instant, target: Weak<dyn Flush>) {
    let clock = CLOCK.get_or_init(start);
    let mut state = clock.state.lock().unwrap_or_else(|e| e.into_inner());
    let earlier = state.heap.peek().is_none_or(|Reverse(next)| at < next.at);
    state.seq += 1;
    let seq = state.seq;
    state.heap.push(Reverse(Entry { at, seq, target }));
    drop(state);
    // The thread waits for the earliest deadline; only an earlier one changes that.
    if earlier {
        clock.wake.notify_one();
    }
}

static CLOCK: OnceLock<&'static Clock> = OnceLock::new();

struct Clock {
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    heap: BinaryHeap<Reverse<Entry>>,
    /// Keeps entries of the same instant in the order they were armed.
    seq: u64,
}

struct Entry {
    at: Instant,
    seq: u64,
    target: Weak<dyn Flush>,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

fn start() -> &'static Clock {
    let clock: &'static Clock = Box::leak(Box::new(Clock {
        state: Mutex::new(State::default()),
        wake: Condvar::new(),
    }));
    std::thread::Builder::new()
        .name("streamserve-flush-clock".into())
        .spawn(move || run(clock))
        .expect("the flush clock's thread starts");
    clock
}

fn run(clock: &'static Clock) {
    let lock = || clock.state.lock().unwrap_or_else(|e| e.into_inner());
    let mut state = lock();
    loop {
        let now = Instant::now();
        let wait = match state.heap.peek() {
            None => None,
            Some(Reverse(next)) if next.at > now => Some(next.at - now),
            Some(_) => {
                let Some(Reverse(due)) = state.heap.pop() else {
                    continue;
                };
                // The router's lock is taken with the clock's released: a router arms the
                // clock again from inside its flush.
                drop(state);
                if let Some(target) = due.target.upgrade() {
                    target.flush();
                }
                state = lock();
                continue;
            }
        };
        state = match wait {
            None => clock.wake.wait(state).unwrap_or_else(|e| e.into_inner()),
            Some(wait) => {
                clock
                    .wake
                    .wait_timeout(state, wait)
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{mpsc, Arc};
    use std::time::Duration;

    struct Sender(Mutex<mpsc::Sender<(u32, Instant)>>, u32);

    impl Flush for Sender {
        fn flush(&self) {
            let _ = self.0.lock().unwrap().send((self.1, Instant::now()));
        }
    }

    /// Each target is woken once, never before its deadline, in deadline order whatever the
    /// order they were armed in; one that has gone is skipped.
    #[test]
    fn wakes_each_target_at_or_after_its_deadline_in_deadline_order() {
        let (tx, rx) = mpsc::channel();
        let target = |n| Arc::new(Sender(Mutex::new(tx.clone()), n));
        let (a, b, gone) = (target(1), target(2), target(3));
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let weak = |t: &Arc<Sender>| Arc::downgrade(t) as Weak<dyn Flush>;
        arm(at(30), weak(&b));
        arm(at(10), weak(&a));
        arm(at(20), weak(&gone));
        drop(gone);
        let first = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let second = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!((first.0, second.0), (1, 2));
        assert!(first.1 >= at(10) && second.1 >= at(30));
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
    }
}
