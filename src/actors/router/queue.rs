//! The batching queue of one model version, pure: no actix, no metrics, no clock of its own
//! (the caller passes `now`), so every rule below is unit-tested in microseconds.
//!
//! - **Admission**: a request is queued while the queue holds fewer than `max_queue`
//!   requests ([`BatchQueue::has_room`]); the router decides what happens to the others.
//! - **Lanes**: normal requests go first; low-priority ones (low-priority API keys, bulk jobs)
//!   run only when no normal request waits, in batches of their own: a normal batch is not
//!   made longer (slower) by low-priority rows. A low-priority batch is due at half of
//!   `max_batch_size` rows or after [`LOW_BATCH_DELAY`] (or `max_queue_delay`, if longer), so
//!   that a job whose threads the OS runs last still fills its batches. While normal traffic is recent (within
//!   [`NORMAL_RECENT`]), the router keeps its last idle worker for it
//!   ([`BatchQueue::low_waits_for_normal`]), so that a normal request never queues behind a
//!   low-priority batch on a model with more than one replica.
//! - **When a batch is due** (Triton's dynamic batcher): at once for a model without a batch
//!   axis; otherwise when `max_batch_size` rows wait, or when the request that would go next
//!   has waited `max_queue_delay` ([`BatchQueue::due`]); while another replica runs a batch,
//!   at least [`BUSY_BATCH_DELAY`], so that replicas sharing the cores run full batches.
//! - **What a batch holds**: the next request and every later one that fits beside it (row
//!   budget, same shapes off the batch axis), scanning a bounded number of candidates.
//! - **Expiry**: requests whose deadline passed, or whose client went away, are taken out
//!   and handed back to the caller to answer (504) or forget.
//! - **Predicted wait**: how long the last request can expect to wait, from the rows queued,
//!   the idle and healthy workers and the time a batch takes; the overload rule uses it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The lane of a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// A caller is waiting: REST, gRPC, a stream's step.
    #[default]
    Normal,
    /// Work that may wait for normal traffic to pass, and that is refused (or sent to the
    /// fallback) first when the model is squeezed: low-priority API keys, bulk jobs.
    Low,
}

/// What the queue needs to know of an entry.
pub trait Queued {
    fn rows(&self) -> usize;
    fn priority(&self) -> Priority;
    /// When it entered the queue (the first time, for a retry).
    fn enqueued(&self) -> Instant;
    fn deadline(&self) -> Option<Instant>;
    /// Nobody waits for its answer any more (answered elsewhere, or the client went away).
    fn abandoned(&self) -> bool;

    fn dead(&self, now: Instant) -> bool {
        self.abandoned() || self.deadline().is_some_and(|d| d <= now)
    }
}

/// The manifest's batching settings, as the queue applies them.
#[derive(Clone, Copy, Debug)]
pub struct BatchPolicy {
    /// Rows per model call; 0: the model has no batch axis, each request runs alone.
    pub max_batch_size: usize,
    pub max_queue_delay: Duration,
    /// Requests queued at most, both lanes together.
    pub max_queue: usize,
}

impl BatchPolicy {
    fn batched(&self) -> bool {
        self.max_batch_size > 0
    }
}

/// When the next batch should go.
#[derive(Debug, PartialEq, Eq)]
pub enum Due {
    Empty,
    Now,
    /// Not before this, unless more requests arrive first.
    At(Instant),
}

/// How long after the last normal request low-priority batches leave a worker free for the
/// next one.
pub const NORMAL_RECENT: Duration = Duration::from_secs(1);
/// How long a low-priority batch waits to fill to half of `max_batch_size`.
pub const LOW_BATCH_DELAY: Duration = Duration::from_millis(2);
/// How long a normal batch waits to fill (up to `max_batch_size`) while another replica of the
/// model runs one (when `max_queue_delay` is shorter). Sent at once, each request that comes
/// while a replica is busy goes alone to the next idle one, and the replicas share the cores in
/// batches of a few rows. Measured on one core with the bundled `mlp` (two replicas), 1-row
/// requests at 32 in flight: batches of 5.3 at 7.8-8.2k requests/s sent at once, 8.7 at
/// 9.7-10.2k/s with this wait, and a lower p99 (docs/efficiency.md). An idle model still runs
/// a request at once, so a lone client waits for nothing.
pub const BUSY_BATCH_DELAY: Duration = Duration::from_millis(3);
/// The busy wait is for models whose batches are quick (smoothed compute per batch under
/// this): their per-call overhead is what it saves. A model running slow batches keeps
/// sending each request to an idle replica at once, so that requests queue behind a slow
/// spell and its predicted wait (and with it degraded mode) sees it; packed into the slow
/// batches instead, they would wait there unseen.
pub const BUSY_WAIT_MAX_BATCH_TIME: Duration = Duration::from_millis(6);

pub struct BatchQueue<T> {
    /// Normal, then low priority.
    lanes: [VecDeque<T>; 2],
    /// When the latest normal request entered the queue.
    last_normal: Option<Instant>,
    rows: usize,
    policy: BatchPolicy,
}

fn lane(priority: Priority) -> usize {
    match priority {
        Priority::Normal => 0,
        Priority::Low => 1,
    }
}

impl<T: Queued> BatchQueue<T> {
    pub fn new(policy: BatchPolicy) -> BatchQueue<T> {
        BatchQueue {
            lanes: [VecDeque::new(), VecDeque::new()],
            last_normal: None,
            rows: 0,
            policy,
        }
    }

    pub fn len(&self) -> usize {
        self.lanes[0].len() + self.lanes[1].len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows waiting, both lanes.
    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn has_room(&self) -> bool {
        self.len() < self.policy.max_queue
    }

    /// Queues at the back of its lane (the caller checked [`has_room`](Self::has_room)).
    pub fn push(&mut self, item: T) {
        if item.priority() == Priority::Normal {
            self.last_normal = self.last_normal.max(Some(item.enqueued()));
        }
        self.rows += item.rows();
        self.lanes[lane(item.priority())].push_back(item);
    }

    /// Queues at the front of its lane: a retry, or a batch given back, goes first. Push a
    /// batch's entries in reverse to keep their order.
    pub fn push_front(&mut self, item: T) {
        self.rows += item.rows();
        self.lanes[lane(item.priority())].push_front(item);
    }

    /// The next batch would be low priority while normal traffic is recent: the router does
    /// not give it its last idle worker.
    pub fn low_waits_for_normal(&self, now: Instant) -> bool {
        self.next_lane() == Some(1)
            && self
                .last_normal
                .is_some_and(|t| now.saturating_duration_since(t) < NORMAL_RECENT)
    }

    /// The lane the next batch comes from.
    fn next_lane(&self) -> Option<usize> {
        (0..2).find(|&l| !self.lanes[l].is_empty())
    }

    /// Whether a batch should go now; dead entries at the fronts should be taken out first
    /// ([`remove_dead_fronts`](Self::remove_dead_fronts)), or they count as waiting. `busy`:
    /// whether another replica of the model runs a batch ([`BUSY_BATCH_DELAY`]), asked only
    /// when it matters.
    pub fn due(&self, now: Instant, busy: impl FnOnce() -> bool) -> Due {
        let Some(l) = self.next_lane() else {
            return Due::Empty;
        };
        let next = self.lanes[l].front().expect("lane is not empty");
        let waited = now.saturating_duration_since(next.enqueued());
        // A low-priority batch waits a little for its sender to fill it: a job fed by
        // threads the OS runs last would otherwise send a worker batch after tiny batch.
        let delay = if l == 1 {
            self.policy.max_queue_delay.max(LOW_BATCH_DELAY)
        } else {
            self.policy.max_queue_delay
        };
        let full = if l == 1 {
            self.lanes[1].iter().map(Queued::rows).sum::<usize>() >= self.policy.max_batch_size / 2
        } else {
            self.rows >= self.policy.max_batch_size
        };
        if !self.policy.batched() || full {
            return Due::Now;
        }
        let delay = if l == 0 && delay < BUSY_BATCH_DELAY && busy() {
            BUSY_BATCH_DELAY
        } else {
            delay
        };
        if waited >= delay {
            Due::Now
        } else {
            Due::At(now + (delay - waited))
        }
    }

    /// Takes out the dead entries at the front of each lane, for the caller to answer.
    pub fn remove_dead_fronts(&mut self, now: Instant) -> Vec<T> {
        let mut dead = Vec::new();
        for l in 0..2 {
            while self.lanes[l].front().is_some_and(|f| f.dead(now)) {
                let gone = self.lanes[l].pop_front().expect("front exists");
                self.rows -= gone.rows();
                dead.push(gone);
            }
        }
        dead
    }

    /// Takes out every dead entry, wherever it waits.
    pub fn remove_dead(&mut self, now: Instant) -> Vec<T> {
        let mut dead = Vec::new();
        for queue in &mut self.lanes {
            if !queue.iter().any(|p| p.dead(now)) {
                continue;
            }
            let (keep, gone): (VecDeque<T>, VecDeque<T>) =
                queue.drain(..).partition(|p| !p.dead(now));
            *queue = keep;
            dead.extend(gone);
        }
        self.rows = self.lanes.iter().flatten().map(Queued::rows).sum();
        dead
    }

    /// The next batch: the next request and every later one of its lane that fits beside it
    /// within `max_batch_size` rows and that `batches_with(candidate, first)` accepts (same
    /// shapes off the batch axis). Dead entries met on the way are put in `dead`. Empty when
    /// the queue is.
    pub fn take_batch(
        &mut self,
        now: Instant,
        batches_with: impl Fn(&T, &T) -> bool,
        dead: &mut Vec<T>,
    ) -> Vec<T> {
        let Some(first_lane) = self.next_lane() else {
            return Vec::new();
        };
        let first = self.lanes[first_lane]
            .pop_front()
            .expect("lane is not empty");
        self.rows -= first.rows();
        let mut rows = first.rows();
        let mut items = vec![first];
        if !self.policy.batched() {
            return items;
        }
        let max = self.policy.max_batch_size;
        // Bound the scan so that a queue of incompatible shapes cannot make dispatch quadratic.
        let mut scanned = 0;
        let lane = &mut self.lanes[first_lane];
        let mut i = 0;
        while i < lane.len() && rows < max && scanned < 4 * max {
            scanned += 1;
            let candidate = &lane[i];
            if candidate.dead(now) {
                let gone = lane.remove(i).expect("index in range");
                self.rows -= gone.rows();
                dead.push(gone);
            } else if rows + candidate.rows() <= max && batches_with(candidate, &items[0]) {
                let taken = lane.remove(i).expect("index in range");
                self.rows -= taken.rows();
                rows += taken.rows();
                items.push(taken);
            } else {
                i += 1;
            }
        }
        items
    }

    /// Everything queued, normal priority first, leaving the queue empty.
    pub fn drain(&mut self) -> Vec<T> {
        self.rows = 0;
        let [normal, low] = &mut self.lanes;
        normal.drain(..).chain(low.drain(..)).collect()
    }

    /// How long the last request in the queue can expect to wait for its batch to start:
    /// batches that idle workers take at once cost nothing; the rest wait for rounds of
    /// batches on every healthy worker.
    pub fn predicted_wait(&self, idle: usize, healthy: usize, per_batch: Duration) -> Duration {
        let rows_per_batch = self.policy.max_batch_size.max(1);
        let batches = self.rows.div_ceil(rows_per_batch);
        let rounds = batches.saturating_sub(idle).div_ceil(healthy.max(1)) as u32;
        per_batch * rounds
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// A queue entry: `rows` rows of shape class `shape`.
    struct Item {
        id: u32,
        rows: usize,
        shape: u8,
        priority: Priority,
        enqueued: Instant,
        deadline: Option<Instant>,
        gone: Cell<bool>,
    }

    impl Queued for Item {
        fn rows(&self) -> usize {
            self.rows
        }
        fn priority(&self) -> Priority {
            self.priority
        }
        fn enqueued(&self) -> Instant {
            self.enqueued
        }
        fn deadline(&self) -> Option<Instant> {
            self.deadline
        }
        fn abandoned(&self) -> bool {
            self.gone.get()
        }
    }

    fn same_shape(a: &Item, b: &Item) -> bool {
        a.shape == b.shape
    }

    fn item(id: u32, rows: usize, at: Instant) -> Item {
        Item {
            id,
            rows,
            shape: 0,
            priority: Priority::Normal,
            enqueued: at,
            deadline: None,
            gone: Cell::new(false),
        }
    }

    fn queue(max_batch_size: usize, delay_ms: u64, max_queue: usize) -> BatchQueue<Item> {
        BatchQueue::new(BatchPolicy {
            max_batch_size,
            max_queue_delay: Duration::from_millis(delay_ms),
            max_queue,
        })
    }

    fn ids(items: &[Item]) -> Vec<u32> {
        items.iter().map(|i| i.id).collect()
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_batch_is_due_when_full_or_when_the_oldest_has_waited() {
        let t0 = Instant::now();
        let mut q = queue(4, 10, 100);
        assert_eq!(q.due(t0, || false), Due::Empty);
        q.push(item(1, 1, t0));
        assert_eq!(q.due(t0, || false), Due::At(t0 + 10 * MS));
        assert_eq!(q.due(t0 + 4 * MS, || false), Due::At(t0 + 10 * MS));
        assert_eq!(q.due(t0 + 10 * MS, || false), Due::Now);
        q.push(item(2, 3, t0 + MS));
        assert_eq!(q.rows(), 4);
        assert_eq!(
            q.due(t0 + MS, || false),
            Due::Now,
            "max_batch_size rows wait"
        );
    }

    #[test]
    fn while_a_replica_is_busy_the_next_batch_waits_to_fill() {
        let t0 = Instant::now();
        let mut q = queue(4, 0, 100);
        q.push(item(1, 1, t0));
        assert_eq!(
            q.due(t0, || false),
            Due::Now,
            "an idle model runs a request at once"
        );
        assert_eq!(q.due(t0, || true), Due::At(t0 + BUSY_BATCH_DELAY));
        assert_eq!(q.due(t0 + BUSY_BATCH_DELAY, || true), Due::Now);
        q.push(item(2, 3, t0));
        assert_eq!(q.due(t0, || true), Due::Now, "max_batch_size rows wait");
        // A longer max_queue_delay is kept; a model without a batch axis never waits.
        let mut q = queue(4, 10, 100);
        q.push(item(1, 1, t0));
        assert_eq!(q.due(t0, || true), Due::At(t0 + 10 * MS));
        let mut q = queue(0, 0, 100);
        q.push(item(1, 1, t0));
        assert_eq!(q.due(t0, || true), Due::Now);
    }

    #[test]
    fn a_model_without_a_batch_axis_runs_each_request_alone_at_once() {
        let t0 = Instant::now();
        let mut q = queue(0, 10, 100);
        q.push(item(1, 1, t0));
        q.push(item(2, 1, t0));
        assert_eq!(q.due(t0, || false), Due::Now);
        let mut dead = Vec::new();
        assert_eq!(ids(&q.take_batch(t0, same_shape, &mut dead)), vec![1]);
        assert_eq!(ids(&q.take_batch(t0, same_shape, &mut dead)), vec![2]);
        assert!(q.take_batch(t0, same_shape, &mut dead).is_empty());
    }

    #[test]
    fn a_batch_takes_what_fits_beside_the_oldest_in_order() {
        let t0 = Instant::now();
        let mut q = queue(4, 10, 100);
        q.push(item(1, 2, t0));
        q.push(item(2, 3, t0)); // does not fit beside 1
        let mut other_shape = item(3, 1, t0);
        other_shape.shape = 1;
        q.push(other_shape);
        q.push(item(4, 1, t0));
        q.push(item(5, 1, t0));
        let mut dead = Vec::new();
        assert_eq!(ids(&q.take_batch(t0, same_shape, &mut dead)), vec![1, 4, 5]);
        assert_eq!(q.rows(), 4);
        assert_eq!(ids(&q.take_batch(t0, same_shape, &mut dead)), vec![2]);
        assert_eq!(ids(&q.take_batch(t0, same_shape, &mut dead)), vec![3]);
        assert_eq!(q.rows(), 0);
        assert!(dead.is_empty());
    }

    #[test]
    fn the_scan_for_batch_mates_is_bounded() {
        let t0 = Instant::now();
        let mut q = queue(2, 10, 1000);
        q.push(item(0, 1, t0));
        for id in 1..=100 {
            let mut odd = item(id, 1, t0);
            odd.shape = 1;
            q.push(odd);
        }
        q.push(item(101, 1, t0)); // would fit, but lies beyond 4 * max_batch_size candidates
        let mut dead = Vec::new();
        assert_eq!(ids(&q.take_batch(t0, same_shape, &mut dead)), vec![0]);
    }

    #[test]
    fn dead_entries_are_handed_back_wherever_they_wait() {
        let t0 = Instant::now();
        let mut q = queue(8, 10, 100);
        let mut late = item(1, 1, t0);
        late.deadline = Some(t0 + 5 * MS);
        q.push(late);
        q.push(item(2, 1, t0));
        let gone = item(3, 1, t0);
        gone.gone.set(true);
        q.push(gone);
        q.push(item(4, 1, t0));
        assert!(q.remove_dead_fronts(t0).is_empty());
        assert_eq!(ids(&q.remove_dead_fronts(t0 + 5 * MS)), vec![1]);
        // Met while filling a batch.
        let mut dead = Vec::new();
        assert_eq!(
            ids(&q.take_batch(t0 + 5 * MS, same_shape, &mut dead)),
            vec![2, 4]
        );
        assert_eq!(ids(&dead), vec![3]);
        // Anywhere in the queue.
        q.push(item(5, 1, t0));
        let mut late = item(6, 2, t0);
        late.deadline = Some(t0 + MS);
        q.push(late);
        q.push(item(7, 1, t0));
        assert_eq!(ids(&q.remove_dead(t0 + MS)), vec![6]);
        assert_eq!(q.rows(), 2);
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn normal_requests_go_before_low_priority_ones() {
        let t0 = Instant::now();
        let mut q = queue(3, 10, 100);
        for id in 1..=2 {
            let mut bulk = item(id, 1, t0);
            bulk.priority = Priority::Low;
            q.push(bulk);
        }
        q.push(item(3, 1, t0 + MS));
        q.push(item(4, 1, t0 + MS));
        let mut dead = Vec::new();
        // Normal first, in a batch of its own; the last normal request is 1 ms old, so the
        // low-priority batch waits for a worker to spare.
        assert!(!q.low_waits_for_normal(t0 + MS));
        assert_eq!(
            ids(&q.take_batch(t0 + MS, same_shape, &mut dead)),
            vec![3, 4]
        );
        assert!(q.low_waits_for_normal(t0 + MS));
        assert!(!q.low_waits_for_normal(t0 + MS + NORMAL_RECENT));
        assert_eq!(
            ids(&q.take_batch(t0 + MS, same_shape, &mut dead)),
            vec![1, 2]
        );
        // The delay counts from the request that goes next.
        let mut bulk = item(5, 1, t0);
        bulk.priority = Priority::Low;
        q.push(bulk);
        q.push(item(6, 1, t0 + 8 * MS));
        assert_eq!(q.due(t0 + 10 * MS, || false), Due::At(t0 + 18 * MS));
    }

    #[test]
    fn a_low_priority_batch_waits_briefly_to_fill_to_half() {
        let t0 = Instant::now();
        let mut q = queue(8, 0, 100);
        let low = |id| {
            let mut bulk = item(id, 1, t0);
            bulk.priority = Priority::Low;
            bulk
        };
        q.push(low(1));
        assert_eq!(q.due(t0, || false), Due::At(t0 + LOW_BATCH_DELAY));
        assert_eq!(q.due(t0 + LOW_BATCH_DELAY, || false), Due::Now);
        for id in 2..=4 {
            q.push(low(id));
        }
        assert_eq!(q.due(t0, || false), Due::Now);
        // A normal request goes at once (max_queue_delay 0).
        let mut q = queue(8, 0, 100);
        q.push(item(5, 1, t0));
        assert_eq!(q.due(t0, || false), Due::Now);
    }

    #[test]
    fn retries_go_to_the_front_in_order_and_drain_empties_both_lanes() {
        let t0 = Instant::now();
        let mut q = queue(2, 10, 3);
        q.push(item(1, 1, t0));
        for id in [3, 2] {
            q.push_front(item(id, 1, t0));
        }
        assert!(!q.has_room());
        let mut bulk = item(4, 1, t0);
        bulk.priority = Priority::Low;
        q.push(bulk);
        assert_eq!(ids(&q.drain()), vec![2, 3, 1, 4]);
        assert!(q.is_empty());
        assert_eq!(q.rows(), 0);
    }

    #[test]
    fn predicted_wait_counts_rounds_beyond_the_idle_workers() {
        let t0 = Instant::now();
        let mut q = queue(4, 10, 100);
        let per_batch = 10 * MS;
        assert_eq!(q.predicted_wait(1, 2, per_batch), Duration::ZERO);
        for id in 0..12 {
            q.push(item(id, 1, t0)); // three batches of 4
        }
        assert_eq!(q.predicted_wait(3, 3, per_batch), Duration::ZERO);
        assert_eq!(q.predicted_wait(1, 2, per_batch), per_batch);
        assert_eq!(q.predicted_wait(0, 1, per_batch), 3 * per_batch);
        assert_eq!(q.predicted_wait(0, 0, per_batch), 3 * per_batch);
    }
}
