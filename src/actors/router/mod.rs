//! `Router`: one actor per model version. It owns the version's request queue and its
//! workers, and decides when and where each batch runs.
//!
//! Batching follows Triton's dynamic batcher: a batch is dispatched when `max_batch_size` rows
//! are waiting, or when the oldest request has waited `max_queue_delay`, whichever comes
//! first, and only to an idle worker (a low-priority batch not to the last idle one while
//! normal traffic is recent: [`queue::NORMAL_RECENT`]). While every worker is busy the queue keeps filling, so
//! batches grow with load on their own.
//!
//! Admission, in order: a request goes to this model's queue while the model has a healthy
//! replica, is not overloaded (its predicted queue wait is within `slo_ms`, with hysteresis)
//! and its queue has room (for low-priority requests: while the model is not overloaded and
//! its queue is less than half full); otherwise to the fallback model named in the manifest (degraded
//! mode, flagged in the answer); otherwise it is refused at once with 429 or 503 and a
//! Retry-After. Queued requests past their deadline are answered 504 before they run.
//!
//! Supervision: a worker that panics or holds a batch past `hang_timeout_ms` is replaced (with
//! backoff, see `worker::restart`); the batch it held is retried once on another
//! replica, then goes to the fallback, and only then is answered 503. Every request gets
//! exactly one answer.
//!
//! The rules live in plain parts this actor wires together: [`queue`] (lanes, when a batch is
//! due and what it holds, expiry, predicted wait), [`replicas`] (which worker is idle, busy or
//! hung) and [`scaling`] (when to add or remove a replica; `autoscale.rs` carries that out);
//! [`control`] holds the admin and supervisor messages. The actor owns their state, the timers, the metrics, and the workers'
//! channels.

mod autoscale;
mod control;
pub mod queue;
mod replicas;
mod scaling;
#[cfg(test)]
mod tests;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::budget::{replica_memory_mb, Budgets};
use super::faults::FaultQueue;
use super::health::ModelHealth;
use super::pending::{Batch, BatchLayout, Pending, Reply};
use super::worker::restart::restart;
use super::worker::{BatchOutcome, WorkerHandle, WorkerRecipe, WorkerReport};
use crate::error::ServeError;
use crate::model::{InferRequest, ModelInfo};
pub use control::{Drain, InjectFault, RouterStatus, Status};
pub use queue::Priority;
use queue::{BatchPolicy, BatchQueue, Due};
use replicas::{InFlight, Replicas, Slot};
use scaling::Autoscaler;

/// How often queued deadlines and running batches are checked.
const WATCH_INTERVAL: Duration = Duration::from_millis(50);

/// Finds the router of a fallback model by name, when it can serve (the supervisor gives each
/// router one that reads the catalog, so that routers need not know the catalog).
pub type FallbackLookup = Arc<dyn Fn(&str) -> Option<Addr<Router>> + Send + Sync>;

/// Queue a validated request; the answer arrives on `reply`. Sent by `ServedModel::infer`
/// only.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Infer {
    pub request: InferRequest,
    pub reply: Reply,
    pub received: Instant,
    pub deadline: Option<Instant>,
    pub priority: Priority,
}

/// A request that its primary model handed over (degraded mode). It is not handed on again.
#[derive(Message)]
#[rtype(result = "()")]
struct Fallback(Pending);

/// A replacement worker that the supervisor started for a dead one.
#[derive(Message)]
#[rtype(result = "()")]
struct Attach(WorkerHandle);

/// What a router starts with: the version, its first workers (one per replica; a replica
/// whose worker failed to load has none and is restarted), and what it shares with others.
pub struct RouterSetup {
    pub info: Arc<ModelInfo>,
    pub recipe: WorkerRecipe,
    pub budgets: Arc<Budgets>,
    pub fallback: FallbackLookup,
    pub workers: Vec<WorkerHandle>,
    /// One fault book per replica, shared with its workers.
    pub faults: Vec<FaultQueue>,
    pub health: Arc<ModelHealth>,
}

/// Starts a router on an arbiter (thread) of its own, reading its workers' reports.
pub fn start(setup: RouterSetup, reports: flume::Receiver<WorkerReport>) -> Addr<Router> {
    // Here, not in `started`: the router's own thread may run that after the version is
    // already published as serving and scraped, and a counter that appears with its first
    // event hides that event from `rate()`.
    crate::telemetry::register_model_series(&setup.info);
    let arbiter = Arbiter::new();
    Router::start_in_arbiter(&arbiter.handle(), move |ctx| {
        ctx.add_stream(reports.into_stream());
        Router::new(setup)
    })
}

pub struct Router {
    info: Arc<ModelInfo>,
    /// `None` for models without a batch axis.
    layout: Option<Arc<BatchLayout>>,
    served_by: Arc<(String, String)>,
    recipe: WorkerRecipe,
    budgets: Arc<Budgets>,
    fallback: FallbackLookup,
    queue: BatchQueue<Pending>,
    replicas: Replicas,
    scaler: Autoscaler,
    flush_timer: Option<SpawnHandle>,
    health: Arc<ModelHealth>,
    /// Smoothed compute time per batch, for wait predictions.
    mean_batch_time: Duration,
    overloaded: bool,
    restarts: u64,
    draining: bool,
    labels: [(&'static str, String); 2],
    /// The series every dispatch or batch moves, looked up once (a lookup by labels clones
    /// them and hashes the key each time).
    series: BatchSeries,
}

struct BatchSeries {
    queue_depth: metrics::Gauge,
    batch_size: metrics::Histogram,
    batch_requests: metrics::Histogram,
    inference_duration: metrics::Histogram,
}

impl BatchSeries {
    fn new(labels: &[(&'static str, String); 2]) -> BatchSeries {
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

impl Router {
    fn new(setup: RouterSetup) -> Router {
        let now = Instant::now();
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
        Router {
            served_by: Arc::new((info.name.clone(), info.version.clone())),
            scaler: Autoscaler::new(entry.min_replicas, entry.max_replicas, now),
            info,
            layout,
            recipe,
            budgets,
            fallback,
            queue,
            replicas,
            flush_timer: None,
            health,
            mean_batch_time: Duration::from_millis(5),
            overloaded: false,
            restarts: 0,
            draining: false,
            series: BatchSeries::new(&labels),
            labels,
        }
    }

    fn publish_health(&self) {
        let healthy = self.replicas.healthy();
        self.health
            .healthy_replicas
            .store(healthy, Ordering::Relaxed);
        metrics::gauge!("streamserve_workers", &self.labels).set(healthy as f64);
    }

    fn publish_queue(&self) {
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
    fn degrade(&self, mut pending: Pending) -> Result<(), Pending> {
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
        fallback.do_send(Fallback(pending));
        Ok(())
    }

    /// Takes a request in, hands it to the fallback, or refuses it.
    fn admit(&mut self, pending: Pending, may_degrade: bool, ctx: &mut Context<Self>) {
        let healthy = self.replicas.healthy() > 0;
        let full = !self.queue.has_room();
        // Low priority absorbs the squeeze: it leaves the queue's second half and an
        // overloaded model to normal traffic.
        let squeezed = self.overloaded || 2 * self.queue.len() >= self.info.max_queue;
        let yield_to_normal = pending.priority == Priority::Low && squeezed;
        let to_fallback = self.overloaded && may_degrade && self.info.fallback.is_some();
        let queue_it = healthy && !full && !yield_to_normal && !to_fallback;
        if queue_it {
            if let Some(asked) = &pending.degraded_from {
                metrics::counter!("streamserve_degraded_total", "model" => asked.0.clone(), "version" => asked.1.clone(), "served_by" => self.info.name.clone())
                    .increment(1);
            }
            self.queue.push(pending);
            self.update_overload();
            self.dispatch(ctx);
            return;
        }
        let pending = if may_degrade {
            match self.degrade(pending) {
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
            let asked = pending.degraded_from.as_deref().unwrap_or(&self.served_by);
            metrics::counter!("streamserve_shed_total", "model" => asked.0.clone(), "version" => asked.1.clone())
                .increment(1);
            ServeError::Overloaded {
                model: self.info.name.clone(),
                queued: self.queue.len(),
                limit: self.info.max_queue,
                retry_after: self.retry_after(),
            }
        };
        pending.reply.send(Err(error));
    }

    /// Sends out every batch that is due, for as long as there are idle workers.
    fn dispatch(&mut self, ctx: &mut Context<Self>) {
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
            match self.queue.due(now) {
                Due::Empty => break,
                Due::At(when) => {
                    if self.flush_timer.is_none() {
                        let wait = when.saturating_duration_since(now);
                        self.flush_timer = Some(ctx.run_later(wait, |router, ctx| {
                            router.flush_timer = None;
                            router.dispatch(ctx);
                        }));
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
            match handle.submit(batch) {
                Ok(()) => {
                    slot_ref.in_flight = Some(InFlight {
                        items,
                        started: Instant::now(),
                    });
                    slot_ref.last_dispatch = Instant::now();
                }
                Err(_) => {
                    // The worker thread is gone without a report: requeue at the front, in order.
                    for pending in items.into_iter().rev() {
                        self.queue.push_front(pending);
                    }
                    self.worker_lost(slot, "worker thread exited".into(), ctx);
                }
            }
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
    fn worker_lost(&mut self, replica: usize, reason: String, ctx: &mut Context<Self>) {
        let slot = &mut self.replicas.slots[replica];
        if slot.handle.take().is_none() {
            return;
        }
        let lost = slot.in_flight.take();
        let delay = slot.backoff.died(Instant::now());
        slot.generation += 1;
        let generation = slot.generation;
        let faults = slot.faults.clone();
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
                    match self.degrade(pending) {
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
        let restarted = restart(self.recipe.clone(), replica, generation, faults, delay);
        ctx.spawn(restarted.into_actor(self).map(|started, _router, ctx| {
            ctx.notify(Attach(started));
        }));
        if self.replicas.healthy() == 0 {
            // Nothing can serve the queue now: hand it to the fallback or answer it, rather
            // than let it wait for the restart.
            for pending in self.queue.drain() {
                let may_degrade = pending.degraded_from.is_none();
                self.admit(pending, may_degrade, ctx);
            }
            self.publish_queue();
        }
        self.dispatch(ctx);
    }

    /// Periodic watch: deadlines of queued requests, and batches running far too long.
    fn watch(&mut self, ctx: &mut Context<Self>) {
        self.autoscale(ctx);
        if self.draining && self.queue.is_empty() && self.replicas.busy() == 0 {
            tracing::info!(model = %self.info.name, version = %self.info.version, "unloaded");
            ctx.stop();
            return;
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
                ctx,
            );
        }
    }
}

impl Actor for Router {
    type Context = Context<Self>;

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        // Dropping the handles ends the worker threads; then the router's own arbiter.
        let replicas = self.replicas.len();
        self.budgets
            .cpu
            .give_back(replicas * self.recipe.entry.intra_threads);
        let memory_mb = replica_memory_mb(self.info.resources.model_file_bytes);
        self.budgets
            .memory
            .give_back(self.info.device, memory_mb * replicas as u64);
        self.replicas.slots.clear();
        metrics::gauge!("streamserve_workers", &self.labels).set(0.0);
        // 0 of 0: an unloaded version is not one without a healthy replica (the alert on
        // `streamserve_workers == 0` also asks for `streamserve_replicas > 0`).
        metrics::gauge!("streamserve_replicas", &self.labels).set(0.0);
        Arbiter::current().stop();
    }

    fn started(&mut self, ctx: &mut Self::Context) {
        self.publish_health();
        self.publish_queue();
        metrics::gauge!("streamserve_overloaded", &self.labels).set(0.0);
        metrics::gauge!("streamserve_replicas", &self.labels).set(self.replicas.len() as f64);
        ctx.run_interval(WATCH_INTERVAL, |router, ctx| router.watch(ctx));
    }
}

impl Handler<Infer> for Router {
    type Result = ();

    fn handle(&mut self, msg: Infer, ctx: &mut Self::Context) {
        self.health.touch();
        let pending = Pending {
            request: Arc::new(msg.request),
            reply: msg.reply,
            enqueued: msg.received,
            deadline: msg.deadline,
            attempts: 0,
            degraded_from: None,
            priority: msg.priority,
        };
        self.admit(pending, true, ctx);
    }
}

impl Handler<Fallback> for Router {
    type Result = ();

    fn handle(&mut self, Fallback(pending): Fallback, ctx: &mut Self::Context) {
        self.health.touch();
        self.admit(pending, false, ctx);
    }
}

impl StreamHandler<WorkerReport> for Router {
    fn handle(&mut self, report: WorkerReport, ctx: &mut Self::Context) {
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
            BatchOutcome::Died { reason } => {
                self.worker_lost(report.replica, format!("worker panicked: {reason}"), ctx)
            }
        }
        self.dispatch(ctx);
    }

    fn finished(&mut self, _ctx: &mut Self::Context) {
        // The router holds a report sender itself, so this stream only ends with the router.
    }
}

impl Handler<Attach> for Router {
    type Result = ();

    fn handle(&mut self, Attach(worker): Attach, ctx: &mut Self::Context) {
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
        slot.last_dispatch = Instant::now();
        slot.backoff.attached(slot.last_dispatch);
        self.publish_health();
        self.dispatch(ctx);
    }
}
