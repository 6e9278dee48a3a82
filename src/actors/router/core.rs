//! `RouterCore`: one model version's queue, replicas and admission state, and the rules that
//! move them. It sits behind a mutex that every thread with news takes for a moment: the
//! caller's thread admits its request and, when a worker is idle, hands it the batch; a
//! worker's thread reports its batch done and takes the next one itself. The router actor
//! ([`super::Router`]) only keeps the watch and starts workers; batching delays are the flush
//! clock's (`clock.rs`).
//!
//! Why a lock and not the actor's mailbox: with the mailbox, a request crossed four threads
//! (caller -> router -> worker -> caller, and the worker's report back to the router), and on
//! an idle server each crossing wakes a sleeping thread. Scheduling was about 40% of the
//! server's CPU for a 1-row request at concurrency 1 (docs/efficiency.md). Now a request wakes
//! two: its worker, and its caller. What needs a timer or an `await` is left to the clock or
//! the actor as [`Effects`], carried out once the lock is released (never while holding it, so
//! that two routers handing requests to each other's fallback cannot deadlock). One consequence: when a
//! version's last worker dies, the requests it hands to its fallback travel after the lock is
//! released, so a request admitted meanwhile on another thread may reach the fallback before
//! them. Each is answered exactly once all the same; only their order at the fallback can
//! differ (a stream keeps one step in flight, so its steps are not affected).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::queue::{BatchPolicy, BatchQueue, Due, Priority, BUSY_WAIT_MAX_BATCH_TIME};
use super::replicas::{InFlight, Replicas, Slot};
use super::scaling::Autoscaler;
use super::series::{AskedSeries, BatchSeries};
use super::{FallbackLookup, RouterHandle, RouterSetup};
use crate::actors::budget::Budgets;
use crate::actors::faults::FaultQueue;
use crate::actors::health::ModelHealth;
use crate::actors::pending::{Batch, BatchLayout, Pending};
use crate::actors::worker::{BatchOutcome, Inbox, WorkerHandle, WorkerRecipe, WorkerReport};
use crate::error::ServeError;
use crate::model::ModelInfo;

/// Whether a request may go to the model's fallback instead of its queue.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Degrade {
    /// No: it comes from its primary already.
    Never,
    /// When this model cannot take it well: overloaded (predicted wait past `slo_ms`), its
    /// queue full, or no healthy replica.
    WhenShort,
    /// At once, when a fallback is ready: the door was past its limit, or a stream step's
    /// stream is behind real time, so the CPU is short, and the fallback's answer costs less
    /// of it. Without a ready fallback the request is queued here as usual.
    Now,
}

/// What the state machine asks of the actor, once the lock is released.
#[derive(Default)]
pub(super) struct Effects {
    /// Dispatch again at this instant (the flush clock's): the oldest request of a partial
    /// batch has not waited `max_queue_delay` yet, and no wake-up is set for it.
    pub wake_at: Option<Instant>,
    /// Workers to start: replacements of dead or hung ones, and new replicas.
    pub starts: Vec<StartWorker>,
    /// Requests handed to a fallback model (degraded mode).
    pub handoffs: Vec<(RouterHandle, Pending)>,
    /// Batches for idle workers, sent once the lock is released: the send wakes the worker,
    /// and on a busy core the woken thread may run at once; holding the lock then would stop
    /// every caller and the worker's own report until the sender ran again.
    pub batches: Vec<Dispatched>,
}

/// A batch on its way to a replica's worker.
pub(super) struct Dispatched {
    pub replica: usize,
    pub generation: u64,
    pub inbox: Inbox,
    pub batch: Batch,
}

/// A worker to start for a replica, after `delay` (restart backoff).
#[derive(actix::Message)]
#[rtype(result = "()")]
pub(super) struct StartWorker {
    pub replica: usize,
    pub generation: u64,
    pub faults: FaultQueue,
    pub delay: Duration,
    /// A new replica (autoscaling) rather than a replacement.
    pub scaling_up: bool,
}

pub(super) struct RouterCore {
    pub info: Arc<ModelInfo>,
    /// `None` for models without a batch axis.
    layout: Option<Arc<BatchLayout>>,
    served_by: Arc<(String, String)>,
    pub recipe: WorkerRecipe,
    pub budgets: Arc<Budgets>,
    fallback: FallbackLookup,
    pub queue: BatchQueue<Pending>,
    pub replicas: Replicas,
    pub scaler: Autoscaler,
    /// When the earliest wake-up set on the flush clock comes (a later batch deadline waits
    /// for it; an earlier one sets another).
    flush_at: Option<Instant>,
    pub health: Arc<ModelHealth>,
    /// Smoothed compute time per batch, for wait predictions.
    mean_batch_time: Duration,
    pub overloaded: bool,
    pub restarts: u64,
    pub draining: bool,
    /// The actor has stopped (the version is unloaded): requests that still arrive are given
    /// back to their callers unqueued ([`super::RouterHandle::infer`]).
    pub stopped: bool,
    pub labels: [(&'static str, String); 2],
    series: BatchSeries,
    asked: AskedSeries,
}

impl RouterCore {
    pub fn new(setup: RouterSetup, now: Instant) -> RouterCore {
        let RouterSetup {
            info,
            recipe,
            budgets,
            fallback,
            workers,
            faults,
            health,
        } = setup;
        let mut replicas = Replicas {
            slots: faults.into_iter().map(|f| Slot::new(f, now)).collect(),
        };
        for worker in workers {
            let replica = worker.replica;
            replicas.slots[replica].handle = Some(worker);
        }
        let labels = [
            ("model", info.name.clone()),
            ("version", info.version.clone()),
        ];
        let layout = info.batched().then(|| {
            Arc::new(BatchLayout {
                inputs: info.input_axes.clone(),
                outputs: info.output_axes.clone(),
            })
        });
        let entry = &recipe.entry;
        let queue = BatchQueue::new(BatchPolicy {
            max_batch_size: if info.batched() {
                info.batching.max_batch_size
            } else {
                0
            },
            max_queue_delay: info.batching.max_queue_delay,
            max_queue: info.max_queue,
        });
        let served_by = Arc::new((info.name.clone(), info.version.clone()));
        RouterCore {
            asked: AskedSeries::new(served_by.clone()),
            served_by,
            scaler: Autoscaler::new(entry.min_replicas, entry.max_replicas, now),
            info,
            layout,
            recipe,
            budgets,
            fallback,
            queue,
            replicas,
            flush_at: None,
            health,
            mean_batch_time: Duration::from_millis(5),
            overloaded: false,
            restarts: 0,
            draining: false,
            stopped: false,
            series: BatchSeries::new(&labels),
            labels,
        }
    }

    /// Publishes the replica counts (healthy, and all the router runs) to the version's
    /// health and the `streamserve_workers` gauge; called whenever either changes.
    pub fn publish_health(&self) {
        let healthy = self.replicas.healthy();
        self.health
            .healthy_replicas
            .store(healthy, Ordering::Relaxed);
        self.health
            .replicas
            .store(self.replicas.len(), Ordering::Relaxed);
        metrics::gauge!("streamserve_workers", &self.labels).set(healthy as f64);
    }

    pub fn publish_queue(&self) {
        self.series.queue_depth.set(self.queue.len() as f64);
    }

    fn predicted_wait(&self) -> Duration {
        self.queue.predicted_wait(
            self.replicas.idle(),
            self.replicas.healthy(),
            self.mean_batch_time,
        )
    }

    /// Updates the overload flag, with hysteresis: on above the SLO, off below half of it.
    fn update_overload(&mut self) {
        let Some(slo) = self.recipe.entry.slo else {
            return;
        };
        let wait = self.predicted_wait();
        let overloaded = if self.overloaded {
            wait > slo / 2
        } else {
            wait > slo
        };
        if overloaded != self.overloaded {
            self.overloaded = overloaded;
            tracing::warn!(model = %self.info.name, version = %self.info.version, overloaded, predicted_wait_ms = wait.as_millis() as u64, "overload state changed");
            metrics::gauge!("streamserve_overloaded", &self.labels).set(overloaded as u8 as f64);
        }
    }

    fn retry_after(&self) -> Duration {
        self.predicted_wait().max(Duration::from_millis(100))
    }

    /// Hands a request to the fallback, marked degraded; gives it back when there is no
    /// fallback ready to take it.
    fn degrade(&self, mut pending: Pending, effects: &mut Effects) -> Result<(), Pending> {
        let Some(fallback) = self
            .info
            .fallback
            .as_deref()
            .and_then(|f| (self.fallback)(f))
        else {
            return Err(pending);
        };
        // Counted as degraded by the fallback, once it has queued the request (it may shed it).
        pending.degraded_from = Some(self.served_by.clone());
        effects.handoffs.push((fallback, pending));
        Ok(())
    }

    /// Takes a request in, hands it to the fallback, or refuses it.
    pub fn admit(&mut self, pending: Pending, degrade: Degrade, effects: &mut Effects) {
        if self.stopped {
            return;
        }
        let may_degrade = degrade != Degrade::Never;
        // Whether the fallback was asked already (and none was ready): asked once per request.
        let mut fallback_tried = degrade == Degrade::Now;
        let pending = if degrade == Degrade::Now {
            match self.degrade(pending, effects) {
                Ok(()) => return,
                Err(pending) => pending,
            }
        } else {
            pending
        };
        let healthy = self.replicas.healthy() > 0;
        let full = !self.queue.has_room();
        // Low priority absorbs the squeeze: it leaves the queue's second half and an
        // overloaded model to normal traffic.
        let squeezed = self.overloaded || 2 * self.queue.len() >= self.info.max_queue;
        let yield_to_normal = pending.priority == Priority::Low && squeezed;
        // Overloaded: new requests go to the fallback while one is ready. One that is not
        // (cold, loading, without a healthy replica) takes nothing, and the request is queued
        // here as on a model without a fallback, up to `max_queue`: a 429 while the queue has
        // room would shed the load the queue is there to absorb.
        let pending = if self.overloaded && may_degrade && !fallback_tried {
            fallback_tried = true;
            match self.degrade(pending, effects) {
                Ok(()) => return,
                Err(pending) => pending,
            }
        } else {
            pending
        };
        let queue_it = healthy && !full && !yield_to_normal;
        if queue_it {
            if let Some(asked) = &pending.degraded_from {
                self.asked.degraded(asked).increment(1);
            }
            self.queue.push(pending);
            self.update_overload();
            self.dispatch(effects);
            return;
        }
        let pending = if may_degrade && !fallback_tried {
            match self.degrade(pending, effects) {
                Ok(()) => return,
                Err(pending) => pending,
            }
        } else {
            pending
        };
        let error = if !healthy {
            ServeError::NotReady {
                model: self.info.name.clone(),
                reason: "no healthy replica".into(),
                retry_after: Duration::from_secs(1),
            }
        } else {
            // Labelled by the model the client asked for, even when its fallback sheds it.
            self.asked.shed(pending.degraded_from.as_ref()).increment(1);
            ServeError::Overloaded {
                model: self.info.name.clone(),
                queued: self.queue.len(),
                limit: self.info.max_queue,
                retry_after: self.retry_after(),
            }
        };
        pending.reply.send(Err(error));
    }

    /// The flush clock's wake-up came: dispatch what is due now.
    pub fn flush(&mut self, effects: &mut Effects) {
        self.flush_at = None;
        self.dispatch(effects);
    }

    /// Sends out every batch that is due, for as long as there are idle workers.
    pub fn dispatch(&mut self, effects: &mut Effects) {
        loop {
            let now = Instant::now();
            let dead = self.queue.remove_dead_fronts(now);
            self.expire(&dead);
            let Some(slot) = self.replicas.next_idle() else {
                break;
            };
            let last_idle = self.replicas.idle() == 1 && self.replicas.healthy() > 1;
            if last_idle && self.queue.low_waits_for_normal(now) {
                break;
            }
            let (replicas, quick) = (
                &self.replicas,
                self.mean_batch_time < BUSY_WAIT_MAX_BATCH_TIME,
            );
            match self.queue.due(now, || quick && replicas.running()) {
                Due::Empty => break,
                Due::At(when) => {
                    if self.flush_at.is_none_or(|at| when < at) {
                        self.flush_at = Some(when);
                        effects.wake_at = Some(when);
                    }
                    break;
                }
                Due::Now => {}
            }
            let axes = &self.info.input_axes;
            let mut dead = Vec::new();
            let items = self.queue.take_batch(
                now,
                |candidate: &Pending, first: &Pending| {
                    candidate.request.batches_with(&first.request, axes)
                },
                &mut dead,
            );
            self.expire(&dead);
            if items.is_empty() {
                continue;
            }
            let batch = Batch {
                items: items.clone(),
                layout: self.layout.clone(),
                served_by: self.served_by.clone(),
            };
            let slot_ref = &mut self.replicas.slots[slot];
            let handle = slot_ref.handle.as_ref().expect("idle slot has a worker");
            effects.batches.push(Dispatched {
                replica: slot,
                generation: handle.generation,
                inbox: handle.inbox(),
                batch,
            });
            slot_ref.in_flight = Some(InFlight {
                items,
                started: Instant::now(),
            });
            slot_ref.last_dispatch = Some(Instant::now());
        }
        self.update_overload();
        self.publish_queue();
    }

    /// Answers the requests taken out of the queue unrun: 504 past their deadline; those whose
    /// client went away are forgotten.
    fn expire(&self, dead: &[Pending]) {
        let now = Instant::now();
        for pending in dead {
            if pending.deadline.is_some_and(|d| d <= now) {
                metrics::counter!("streamserve_deadline_exceeded_total", &self.labels).increment(1);
                pending.reply.send(Err(ServeError::DeadlineExceeded {
                    waited: pending.enqueued.elapsed(),
                }));
            }
        }
    }

    /// Replaces a dead or hung worker and deals with the batch it held: each request is
    /// retried once (at the front of the queue) on this model, then handed to its fallback
    /// (degraded) if it has one, and only then answered 503. So a request meets at most two
    /// of this model's workers, which bounds the damage of an input that kills every worker.
    pub fn worker_lost(&mut self, replica: usize, reason: String, effects: &mut Effects) {
        let slot = &mut self.replicas.slots[replica];
        if slot.handle.take().is_none() {
            return;
        }
        let lost = slot.in_flight.take();
        let delay = slot.backoff.died(Instant::now());
        slot.generation += 1;
        effects.starts.push(StartWorker {
            replica,
            generation: slot.generation,
            faults: slot.faults.clone(),
            delay,
            scaling_up: false,
        });
        self.restarts += 1;
        tracing::error!(model = %self.info.name, version = %self.info.version, replica, %reason, "worker lost; restarting it");
        metrics::counter!("streamserve_worker_restarts_total", &self.labels).increment(1);
        self.publish_health();
        if let Some(lost) = lost {
            for mut pending in lost.items.into_iter().rev() {
                if pending.reply.is_closed() {
                    continue;
                }
                if pending.attempts == 0 && self.replicas.healthy() > 0 {
                    pending.attempts = 1;
                    metrics::counter!("streamserve_retries_total", &self.labels).increment(1);
                    self.queue.push_front(pending);
                    continue;
                }
                let pending = if pending.degraded_from.is_none() {
                    match self.degrade(pending, effects) {
                        Ok(()) => continue,
                        Err(pending) => pending,
                    }
                } else {
                    pending
                };
                pending
                    .reply
                    .send(Err(ServeError::WorkerLost(reason.clone())));
            }
        }
        if self.replicas.healthy() == 0 {
            // Nothing can serve the queue now: hand it to the fallback or answer it, rather
            // than let it wait for the restart.
            for pending in self.queue.drain() {
                let degrade = if pending.degraded_from.is_none() {
                    Degrade::WhenShort
                } else {
                    Degrade::Never
                };
                self.admit(pending, degrade, effects);
            }
            self.publish_queue();
        }
        self.dispatch(effects);
    }

    /// A batch its worker could not take (the thread is gone): unless the replica was replaced
    /// meanwhile (then the batch was dealt with as the lost worker's), its requests go back to
    /// the front of the queue, in order, and the worker is replaced.
    pub fn undelivered(&mut self, replica: usize, generation: u64, effects: &mut Effects) {
        let Some(slot) = self.replicas.slots.get_mut(replica) else {
            return;
        };
        if slot.handle.as_ref().map(|h| h.generation) != Some(generation) {
            return;
        }
        if let Some(lost) = slot.in_flight.take() {
            for pending in lost.items.into_iter().rev() {
                self.queue.push_front(pending);
            }
        }
        self.worker_lost(replica, "worker thread exited".into(), effects);
    }

    /// A worker's report, on the worker's thread: the replica is idle again (and may take the
    /// next batch at once), or its worker died.
    pub fn on_report(&mut self, report: WorkerReport, effects: &mut Effects) {
        let Some(slot) = self.replicas.slots.get_mut(report.replica) else {
            return; // a report from a replica that was scaled down
        };
        if slot.handle.as_ref().map(|h| h.generation) != Some(report.generation) {
            return; // a report from a worker that was already replaced
        }
        match report.outcome {
            BatchOutcome::Done {
                rows,
                requests,
                compute,
                failed,
            } => {
                slot.in_flight = None;
                self.mean_batch_time = (self.mean_batch_time * 7 + compute) / 8;
                self.series.batch_size.record(rows as f64);
                self.series.batch_requests.record(requests as f64);
                self.series.inference_duration.record(compute.as_secs_f64());
                if failed {
                    metrics::counter!("streamserve_inference_failures_total", &self.labels)
                        .increment(1);
                }
            }
            BatchOutcome::Died { reason } => self.worker_lost(
                report.replica,
                format!("worker panicked: {reason}"),
                effects,
            ),
        }
        self.dispatch(effects);
    }

    /// Starts a worker for each replica whose first one failed to load with the version (the
    /// version serves on those that loaded): replicas are the router's to keep up, whatever
    /// ended their worker. Called once, when the router starts.
    pub fn start_missing(&mut self, effects: &mut Effects) {
        for (replica, slot) in self.replicas.slots.iter_mut().enumerate() {
            if slot.handle.is_some() {
                continue;
            }
            slot.generation += 1;
            tracing::warn!(model = %self.info.name, version = %self.info.version, replica, "replica did not load with the version; starting it again");
            effects.starts.push(StartWorker {
                replica,
                generation: slot.generation,
                faults: slot.faults.clone(),
                delay: slot.backoff.died(Instant::now()),
                scaling_up: false,
            });
        }
    }

    /// A started worker takes its replica's slot, unless a newer one was started since.
    pub fn attach(&mut self, worker: WorkerHandle, effects: &mut Effects) {
        let replica = worker.replica;
        if self
            .replicas
            .slots
            .get(replica)
            .is_none_or(|s| worker.generation != s.generation)
        {
            return; // superseded while it loaded
        }
        tracing::info!(model = %self.info.name, version = %self.info.version, replica, generation = worker.generation, "worker restarted");
        let slot = &mut self.replicas.slots[replica];
        slot.handle = Some(worker);
        slot.in_flight = None;
        slot.last_dispatch = None;
        slot.backoff.attached(Instant::now());
        self.publish_health();
        self.dispatch(effects);
    }

    /// Periodic watch: autoscaling, deadlines of queued requests, and batches running far too
    /// long. Returns `true` when a drained version has finished and the actor should stop.
    pub fn watch(&mut self, effects: &mut Effects) -> bool {
        self.autoscale(effects);
        if self.draining && self.queue.is_empty() && self.replicas.busy() == 0 {
            tracing::info!(model = %self.info.name, version = %self.info.version, "unloaded");
            // Under this same lock: a request that still arrives (from a caller holding an old
            // handle) is given back at once, not queued behind a timer that will never fire.
            self.stopped = true;
            return true;
        }
        let dead = self.queue.remove_dead(Instant::now());
        if !dead.is_empty() {
            self.expire(&dead);
            self.publish_queue();
        }
        for (replica, running) in self.replicas.hung(self.recipe.entry.hang_timeout) {
            self.worker_lost(
                replica,
                format!("worker hung: batch running for {} ms", running.as_millis()),
                effects,
            );
        }
        false
    }
}
