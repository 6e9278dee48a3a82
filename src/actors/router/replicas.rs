//! The replicas of one model version as its router sees them: each slot's live worker (or
//! none while it is replaced), the batch it runs, its fault book and restart history. No
//! actix: the router owns the table and asks it which worker is idle, busy or hung.

use std::time::{Duration, Instant};

use crate::actors::faults::FaultQueue;
use crate::actors::pending::Pending;
use crate::actors::worker::restart::Backoff;
use crate::actors::worker::WorkerHandle;

/// The batch a worker holds, for retry when it dies.
pub struct InFlight {
    pub items: Vec<Pending>,
    pub started: Instant,
}

pub struct Slot {
    pub handle: Option<WorkerHandle>,
    pub in_flight: Option<InFlight>,
    /// When the slot's worker last got a batch (`None`: not yet): among idle workers the one
    /// that ran last goes first ([`Replicas::next_idle`]).
    pub last_dispatch: Option<Instant>,
    pub faults: FaultQueue,
    /// Generation of the latest worker started for this slot (running or loading).
    pub generation: u64,
    /// When this slot's workers died recently, for restart backoff.
    pub backoff: Backoff,
}

impl Slot {
    pub fn new(faults: FaultQueue, now: Instant) -> Slot {
        Slot {
            handle: None,
            in_flight: None,
            last_dispatch: None,
            faults,
            generation: 0,
            backoff: Backoff::new(now),
        }
    }

    fn idle(&self) -> bool {
        self.handle.is_some() && self.in_flight.is_none()
    }
}

#[derive(Default)]
pub struct Replicas {
    pub slots: Vec<Slot>,
}

impl Replicas {
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Replicas with a live worker.
    pub fn healthy(&self) -> usize {
        self.slots.iter().filter(|s| s.handle.is_some()).count()
    }

    pub fn idle(&self) -> usize {
        self.slots.iter().filter(|s| s.idle()).count()
    }

    pub fn busy(&self) -> usize {
        self.slots.iter().filter(|s| s.in_flight.is_some()).count()
    }

    /// Whether a worker is running a batch: it holds one whose last request still waits for
    /// its answer (a worker answers its batch in order). A worker that has answered its batch
    /// but not yet reported (its thread not yet back on a core) does not count, so that a
    /// client's next request, sent on the answer, is not made to wait for that report
    /// ([`super::queue::BUSY_BATCH_DELAY`]). A hung worker counts until it is given up on.
    pub fn running(&self) -> bool {
        self.slots.iter().any(|s| {
            s.in_flight
                .as_ref()
                .and_then(|f| f.items.last())
                .is_some_and(|p| !p.reply.is_closed())
        })
    }

    /// Every live worker runs a batch.
    pub fn all_busy(&self) -> bool {
        self.slots
            .iter()
            .all(|s| s.handle.is_none() || s.in_flight.is_some())
    }

    /// The idle worker that ran a batch last (then the lowest-numbered of those that have not
    /// run one yet). Its thread is likely still awake (a worker that reports takes the next
    /// batch itself, with no other thread to wake), and its model's weights are the likeliest
    /// to be in the CPU's caches: on one core, handing batches to two replicas in turn cost
    /// ONNX Runtime more per call (docs/efficiency.md, "The idle replica that ran last takes
    /// the next batch"). Load still spreads: a replica gets a batch whenever those that ran
    /// later are busy.
    pub fn next_idle(&self) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.idle())
            .min_by_key(|(i, s)| (std::cmp::Reverse(s.last_dispatch), *i))
            .map(|(i, _)| i)
    }

    /// Replicas whose batch has run longer than `timeout`, with how long.
    pub fn hung(&self, timeout: Duration) -> Vec<(usize, Duration)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.in_flight.as_ref().map(|f| (i, f.started.elapsed())))
            .filter(|(_, running)| *running > timeout)
            .collect()
    }
}
