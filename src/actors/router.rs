//! `Router`: one actor per model version. It owns the version's request queue and its
//! workers, and decides when and where each batch runs.
//!
//! Batching follows Triton's dynamic batcher: a batch is dispatched when `max_batch_size` rows
//! are waiting, or when the oldest request has waited `max_queue_delay`, whichever comes
//! first, and only to an idle worker. While every worker is busy the queue keeps filling, so
//! batches grow with load on their own.
//!
//! Admission, in order: a request goes to this model's queue while the model has a healthy
//! replica, is not overloaded (its predicted queue wait is within `slo_ms`, with hysteresis)
//! and its queue has room; otherwise to the fallback model named in the manifest (degraded
//! mode, flagged in the answer); otherwise it is refused at once with 429 or 503 and a
//! Retry-After. Queued requests past their deadline are answered 504 before they run.
//!
//! Supervision: a worker that panics or holds a batch past `hang_timeout_ms` is replaced (with
//! backoff, see `restart_policy`); the batch it held is retried once on another
//! replica, then goes to the fallback, and only then is answered 503. Every request gets
//! exactly one answer.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::faults::{Fault, FaultQueue};
use super::registry::{replica_memory_mb, Registry};
use super::restart_policy::Backoff;
use super::supervisor;
use super::worker::{Batch, BatchLayout, BatchOutcome, Pending, Reply, WorkerHandle, WorkerReport};
use crate::error::ServeError;
use crate::manifest::ModelEntry;
use crate::model::{InferRequest, ModelInfo};

/// How often queued deadlines and running batches are checked.
const WATCH_INTERVAL: Duration = Duration::from_millis(50);
/// Queue pressure must last this long before a replica is added.
const SCALE_UP_AFTER: Duration = Duration::from_secs(1);
/// A replica above `min_replicas` is removed after this long without any batch.
const SCALE_DOWN_IDLE: Duration = Duration::from_secs(5);

/// Health and traffic of a model version, written by its router and the API, read lock-free
/// by the health API and the supervisor (idle unload, canary judgement).
#[derive(Debug, Default)]
pub struct ModelHealth {
    pub healthy_replicas: AtomicUsize,
    pub replicas: usize,
    /// Milliseconds since the process started, at the last request.
    pub last_used_ms: AtomicU64,
    pub requests: AtomicU64,
    /// Answers with a 5xx status.
    pub errors: AtomicU64,
    pub latency_us: AtomicU64,
}

impl ModelHealth {
    pub fn new(healthy: usize, replicas: usize) -> ModelHealth {
        let health = ModelHealth {
            healthy_replicas: AtomicUsize::new(healthy),
            replicas,
            ..ModelHealth::default()
        };
        health.touch();
        health
    }

    pub fn touch(&self) {
        self.last_used_ms
            .store(crate::telemetry::uptime_ms(), Ordering::Relaxed);
    }

    /// Records one answered request.
    pub fn record(&self, server_error: bool, latency: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.latency_us
            .fetch_add(latency.as_micros() as u64, Ordering::Relaxed);
        if server_error {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn ready(&self) -> bool {
        self.healthy_replicas.load(Ordering::Relaxed) > 0
    }
}

/// Queue a validated request; the answer arrives on `reply`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Infer {
    pub request: InferRequest,
    pub reply: Reply,
    pub received: Instant,
    pub deadline: Option<Instant>,
}

/// A request that its primary model handed over (degraded mode). It is not handed on again.
#[derive(Message)]
#[rtype(result = "()")]
struct Fallback(Pending);

/// A replacement worker that the supervisor started for a dead one.
#[derive(Message)]
#[rtype(result = "()")]
struct Attach(WorkerHandle);

/// Queue a fault for one replica, or every replica (admin API, for tests and drills), for
/// its next `count` batches; answers how many replicas got it.
#[derive(Message)]
#[rtype(result = "Result<usize, ServeError>")]
pub struct InjectFault {
    pub replica: Option<usize>,
    pub fault: Fault,
    pub count: u64,
}

/// Stop once the queue and running batches are done (the version is being unloaded); the
/// workers end with it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Drain;

/// A snapshot of the router's state, for the admin API.
#[derive(Message)]
#[rtype(result = "RouterStatus")]
pub struct Status;

#[derive(Debug, serde::Serialize)]
pub struct RouterStatus {
    pub replicas: usize,
    pub queued: usize,
    pub healthy_replicas: usize,
    pub busy_replicas: usize,
    pub overloaded: bool,
    pub restarts: u64,
}

struct InFlight {
    items: Vec<Pending>,
    started: Instant,
}

struct Slot {
    handle: Option<WorkerHandle>,
    in_flight: Option<InFlight>,
    /// When the slot last got a batch: among idle workers the longest idle goes first, which
    /// spreads load evenly across replicas.
    last_dispatch: Instant,
    faults: FaultQueue,
    /// Generation of the latest worker started for this slot (running or loading).
    generation: u64,
    /// When this slot's workers died recently, for restart backoff.
    backoff: Backoff,
}

pub struct Router {
    info: Arc<ModelInfo>,
    /// `None` for models without a batch axis.
    layout: Option<Arc<BatchLayout>>,
    served_by: Arc<(String, String)>,
    entry: Arc<ModelEntry>,
    env: &'static ort::environment::Environment,
    registry: Arc<Registry>,
    queue: VecDeque<Pending>,
    queued_rows: usize,
    slots: Vec<Slot>,
    reports: flume::Sender<WorkerReport>,
    flush_timer: Option<SpawnHandle>,
    health: Arc<ModelHealth>,
    /// Smoothed compute time per batch, for wait predictions.
    mean_batch_time: Duration,
    overloaded: bool,
    restarts: u64,
    draining: bool,
    /// Since when the queue has held more than every worker can take at once.
    pressure_since: Option<Instant>,
    /// Since when no batch has run (for scaling down).
    idle_since: Instant,
    /// A replica being added (its session loading).
    scaling_up: bool,
    labels: [(&'static str, String); 2],
}

impl Router {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        info: Arc<ModelInfo>,
        entry: Arc<ModelEntry>,
        env: &'static ort::environment::Environment,
        registry: Arc<Registry>,
        workers: Vec<WorkerHandle>,
        faults: Vec<FaultQueue>,
        reports: flume::Sender<WorkerReport>,
        health: Arc<ModelHealth>,
    ) -> Router {
        let now = Instant::now();
        let mut slots: Vec<Slot> = faults
            .into_iter()
            .map(|faults| Slot {
                handle: None,
                in_flight: None,
                last_dispatch: now,
                faults,
                generation: 0,
                backoff: Backoff::new(now),
            })
            .collect();
        for worker in workers {
            let replica = worker.replica;
            slots[replica].handle = Some(worker);
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
        Router {
            served_by: Arc::new((info.name.clone(), info.version.clone())),
            info,
            layout,
            entry,
            env,
            registry,
            queue: VecDeque::new(),
            queued_rows: 0,
            slots,
            reports,
            flush_timer: None,
            health,
            mean_batch_time: Duration::from_millis(5),
            overloaded: false,
            restarts: 0,
            draining: false,
            pressure_since: None,
            idle_since: Instant::now(),
            scaling_up: false,
            labels,
        }
    }

    fn healthy(&self) -> usize {
        self.slots.iter().filter(|s| s.handle.is_some()).count()
    }

    fn publish_health(&self) {
        let healthy = self.healthy();
        self.health
            .healthy_replicas
            .store(healthy, Ordering::Relaxed);
        metrics::gauge!("streamserve_workers", &self.labels).set(healthy as f64);
    }

    fn publish_queue(&self) {
        metrics::gauge!("streamserve_queue_depth", &self.labels).set(self.queue.len() as f64);
    }

    /// How long the last request in the queue can expect to wait for its batch to start:
    /// batches that idle workers take at once cost nothing; the rest wait for rounds of
    /// batches on every healthy worker.
    fn predicted_wait(&self) -> Duration {
        let healthy = self.healthy().max(1);
        let idle = self
            .slots
            .iter()
            .filter(|s| s.handle.is_some() && s.in_flight.is_none())
            .count();
        let per_batch = self.info.batching.max_batch_size.max(1);
        let batches = self.queued_rows.div_ceil(per_batch);
        let rounds = batches.saturating_sub(idle).div_ceil(healthy) as u32;
        self.mean_batch_time * rounds
    }

    /// Updates the overload flag, with hysteresis: on above the SLO, off below half of it.
    fn update_overload(&mut self) {
        let Some(slo) = self.entry.slo else { return };
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

    fn idle_slot(&self) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.handle.is_some() && s.in_flight.is_none())
            .min_by_key(|(_, s)| s.last_dispatch)
            .map(|(i, _)| i)
    }

    /// The fallback's router, if this model has one and it can serve.
    fn fallback(&self) -> Option<Addr<Router>> {
        let name = self.info.fallback.as_deref()?;
        let served = self.registry.snapshot().resolve(name, None).ok()?;
        served.health.ready().then_some(served.router)
    }

    /// Hands a request to the fallback, marked degraded; gives it back when there is no
    /// fallback ready to take it.
    fn degrade(&self, mut pending: Pending) -> Result<(), Pending> {
        let Some(fallback) = self.fallback() else {
            return Err(pending);
        };
        // Counted as degraded by the fallback, once it has queued the request (it may shed it).
        pending.degraded_from = Some(self.served_by.clone());
        fallback.do_send(Fallback(pending));
        Ok(())
    }

    /// Takes a request in, hands it to the fallback, or refuses it.
    fn admit(&mut self, pending: Pending, may_degrade: bool, ctx: &mut Context<Self>) {
        let healthy = self.healthy() > 0;
        let full = self.queue.len() >= self.info.max_queue;
        if healthy && !full && !(self.overloaded && may_degrade && self.info.fallback.is_some()) {
            if let Some(asked) = &pending.degraded_from {
                metrics::counter!("streamserve_degraded_total", "model" => asked.0.clone(), "version" => asked.1.clone(), "served_by" => self.info.name.clone())
                    .increment(1);
            }
            self.queued_rows += pending.request.rows;
            self.queue.push_back(pending);
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
            self.drop_dead_front();
            let Some(oldest) = self.queue.front() else {
                break;
            };
            let Some(slot) = self.idle_slot() else { break };
            let batching = self.info.batching;
            let waited = oldest.enqueued.elapsed();
            let due = !self.info.batched()
                || self.queued_rows >= batching.max_batch_size
                || waited >= batching.max_queue_delay;
            if !due {
                if self.flush_timer.is_none() {
                    let wait = batching.max_queue_delay - waited;
                    self.flush_timer = Some(ctx.run_later(wait, |router, ctx| {
                        router.flush_timer = None;
                        router.dispatch(ctx);
                    }));
                }
                break;
            }
            let items = self.take_batch();
            if items.is_empty() {
                continue;
            }
            let batch = Batch {
                items: items.clone(),
                layout: self.layout.clone(),
                served_by: self.served_by.clone(),
            };
            let slot_ref = &mut self.slots[slot];
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
                        self.queued_rows += pending.request.rows;
                        self.queue.push_front(pending);
                    }
                    self.worker_lost(slot, "worker thread exited".into(), ctx);
                }
            }
        }
        self.update_overload();
        self.publish_queue();
    }

    /// Answers (or forgets) requests at the front that must not run: their client went away,
    /// or their deadline passed.
    fn drop_dead_front(&mut self) {
        let now = Instant::now();
        while let Some(front) = self.queue.front() {
            if !front.reply.is_closed() && front.deadline.is_none_or(|d| d > now) {
                break;
            }
            let gone = self.queue.pop_front().expect("front exists");
            self.queued_rows -= gone.request.rows;
            self.expire(&gone);
        }
    }

    fn expire(&self, pending: &Pending) {
        if pending.deadline.is_some_and(|d| d <= Instant::now()) {
            metrics::counter!("streamserve_deadline_exceeded_total", &self.labels).increment(1);
            pending.reply.send(Err(ServeError::DeadlineExceeded {
                waited: pending.enqueued.elapsed(),
            }));
        }
    }

    /// Takes the oldest request and every later one that fits beside it.
    fn take_batch(&mut self) -> Vec<Pending> {
        let first = self.queue.pop_front().expect("queue is not empty");
        self.queued_rows -= first.request.rows;
        let mut rows = first.request.rows;
        let mut items = vec![first];
        if self.info.batched() {
            let max = self.info.batching.max_batch_size;
            let now = Instant::now();
            let mut i = 0;
            // Bound the scan so a queue of incompatible shapes cannot make dispatch quadratic.
            let mut scanned = 0;
            while i < self.queue.len() && rows < max && scanned < 4 * max {
                scanned += 1;
                let candidate = &self.queue[i];
                if candidate.reply.is_closed() || candidate.deadline.is_some_and(|d| d <= now) {
                    let gone = self.queue.remove(i).expect("index in range");
                    self.queued_rows -= gone.request.rows;
                    self.expire(&gone);
                    continue;
                }
                if rows + candidate.request.rows <= max
                    && candidate
                        .request
                        .batches_with(&items[0].request, &self.info.input_axes)
                {
                    let taken = self.queue.remove(i).expect("index in range");
                    self.queued_rows -= taken.request.rows;
                    rows += taken.request.rows;
                    items.push(taken);
                } else {
                    i += 1;
                }
            }
        }
        items
    }

    /// Replaces a dead or hung worker and deals with the batch it held: each request is
    /// retried once (at the front of the queue) on this model, then handed to its fallback
    /// (degraded) if it has one, and only then answered 503. So a request meets at most two
    /// of this model's workers, which bounds the damage of an input that kills every worker.
    fn worker_lost(&mut self, replica: usize, reason: String, ctx: &mut Context<Self>) {
        let slot = &mut self.slots[replica];
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
                if pending.attempts == 0 && self.healthy() > 0 {
                    pending.attempts = 1;
                    metrics::counter!("streamserve_retries_total", &self.labels).increment(1);
                    self.queued_rows += pending.request.rows;
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
        let restart = supervisor::restart_worker(
            self.entry.clone(),
            replica,
            generation,
            self.env,
            self.reports.clone(),
            faults,
            delay,
        );
        ctx.spawn(restart.into_actor(self).map(|started, _router, ctx| {
            ctx.notify(Attach(started));
        }));
        if self.healthy() == 0 {
            // Nothing can serve the queue now: hand it to the fallback or answer it, rather
            // than let it wait for the restart.
            let waiting: Vec<Pending> = self.queue.drain(..).collect();
            self.queued_rows = 0;
            for pending in waiting {
                let may_degrade = pending.degraded_from.is_none();
                self.admit(pending, may_degrade, ctx);
            }
            self.publish_queue();
        }
        self.dispatch(ctx);
    }

    /// Adds a replica when the queue has stayed deeper than all workers can take for a second,
    /// and removes the newest one after `SCALE_DOWN_IDLE` without any batch, within the
    /// manifest's `min_replicas..=max_replicas` and the shared CPU budget.
    fn autoscale(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let busy = self.slots.iter().any(|s| s.in_flight.is_some());
        if busy || !self.queue.is_empty() {
            self.idle_since = now;
        }
        let per_batch = self.info.batching.max_batch_size.max(1);
        let pressure = self.queued_rows > per_batch * self.healthy().max(1)
            && self
                .slots
                .iter()
                .all(|s| s.handle.is_none() || s.in_flight.is_some());
        self.pressure_since = if pressure {
            self.pressure_since.or(Some(now))
        } else {
            None
        };
        let threads = self.entry.intra_threads;
        let memory_mb = replica_memory_mb(self.info.resources.model_file_bytes);
        let sustained = self
            .pressure_since
            .is_some_and(|t| now.duration_since(t) >= SCALE_UP_AFTER);
        if sustained && !self.scaling_up && self.slots.len() < self.entry.max_replicas {
            if !self.registry.cpu_budget.try_take(threads) {
                return; // the machine is full: the queue (and fallback) absorb the load
            }
            if self
                .registry
                .memory
                .try_take(self.info.device, memory_mb)
                .is_err()
            {
                self.registry.cpu_budget.give_back(threads);
                return;
            }
            self.scaling_up = true;
            self.pressure_since = None;
            let replica = self.slots.len();
            let faults = FaultQueue::default();
            self.slots.push(Slot {
                handle: None,
                in_flight: None,
                last_dispatch: now,
                faults: faults.clone(),
                generation: 0,
                backoff: Backoff::new(now),
            });
            tracing::info!(model = %self.info.name, version = %self.info.version, replica, "scaling up");
            metrics::counter!("streamserve_scale_events_total", "model" => self.info.name.clone(), "direction" => "up").increment(1);
            metrics::gauge!("streamserve_replicas", &self.labels).set(self.slots.len() as f64);
            let start = supervisor::restart_worker(
                self.entry.clone(),
                replica,
                0,
                self.env,
                self.reports.clone(),
                faults,
                Duration::ZERO,
            );
            ctx.spawn(start.into_actor(self).map(|started, router, ctx| {
                router.scaling_up = false;
                ctx.notify(Attach(started));
            }));
            return;
        }
        let idle_long = now.duration_since(self.idle_since) >= SCALE_DOWN_IDLE;
        if idle_long && self.slots.len() > self.entry.min_replicas && !self.scaling_up {
            let last = self.slots.len() - 1;
            if self.slots[last].in_flight.is_none() {
                self.slots.pop();
                self.registry.cpu_budget.give_back(threads);
                self.registry.memory.give_back(self.info.device, memory_mb);
                self.idle_since = now;
                tracing::info!(model = %self.info.name, version = %self.info.version, replica = last, "scaling down");
                metrics::counter!("streamserve_scale_events_total", "model" => self.info.name.clone(), "direction" => "down").increment(1);
                metrics::gauge!("streamserve_replicas", &self.labels).set(self.slots.len() as f64);
                self.publish_health();
            }
        }
    }

    /// Periodic watch: deadlines of queued requests, and batches running far too long.
    fn watch(&mut self, ctx: &mut Context<Self>) {
        self.autoscale(ctx);
        if self.draining
            && self.queue.is_empty()
            && self.slots.iter().all(|s| s.in_flight.is_none())
        {
            tracing::info!(model = %self.info.name, version = %self.info.version, "unloaded");
            ctx.stop();
            return;
        }
        let now = Instant::now();
        if self
            .queue
            .iter()
            .any(|p| p.deadline.is_some_and(|d| d <= now) || p.reply.is_closed())
        {
            let (keep, dead): (Vec<Pending>, Vec<Pending>) = self
                .queue
                .drain(..)
                .partition(|p| p.deadline.is_none_or(|d| d > now) && !p.reply.is_closed());
            self.queue = keep.into();
            self.queued_rows = self.queue.iter().map(|p| p.request.rows).sum();
            for pending in &dead {
                self.expire(pending);
            }
            self.publish_queue();
        }
        let hang_timeout = self.entry.hang_timeout;
        let hung: Vec<(usize, Duration)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.in_flight.as_ref().map(|f| (i, f.started.elapsed())))
            .filter(|(_, running)| *running > hang_timeout)
            .collect();
        for (replica, running) in hung {
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
        self.registry
            .cpu_budget
            .give_back(self.slots.len() * self.entry.intra_threads);
        let memory_mb = replica_memory_mb(self.info.resources.model_file_bytes);
        self.registry
            .memory
            .give_back(self.info.device, memory_mb * self.slots.len() as u64);
        self.slots.clear();
        metrics::gauge!("streamserve_workers", &self.labels).set(0.0);
        Arbiter::current().stop();
    }

    fn started(&mut self, ctx: &mut Self::Context) {
        self.publish_health();
        self.publish_queue();
        metrics::gauge!("streamserve_overloaded", &self.labels).set(0.0);
        metrics::gauge!("streamserve_replicas", &self.labels).set(self.slots.len() as f64);
        crate::telemetry::register_model_series(&self.info);
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
        let slot = &mut self.slots[report.replica];
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
                metrics::histogram!("streamserve_batch_size", &self.labels).record(rows as f64);
                metrics::histogram!("streamserve_batch_requests", &self.labels)
                    .record(requests as f64);
                metrics::histogram!("streamserve_inference_duration_seconds", &self.labels)
                    .record(compute.as_secs_f64());
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
            .slots
            .get(replica)
            .is_none_or(|s| worker.generation != s.generation)
        {
            return; // superseded while it loaded
        }
        tracing::info!(model = %self.info.name, version = %self.info.version, replica, generation = worker.generation, "worker restarted");
        let slot = &mut self.slots[replica];
        slot.handle = Some(worker);
        slot.in_flight = None;
        slot.last_dispatch = Instant::now();
        slot.backoff.attached(slot.last_dispatch);
        self.publish_health();
        self.dispatch(ctx);
    }
}

impl Handler<Drain> for Router {
    type Result = ();

    fn handle(&mut self, _: Drain, _ctx: &mut Self::Context) {
        self.draining = true;
    }
}

impl Handler<InjectFault> for Router {
    type Result = Result<usize, ServeError>;

    fn handle(&mut self, msg: InjectFault, _ctx: &mut Self::Context) -> Self::Result {
        let targets: Vec<usize> = match msg.replica {
            Some(r) if r < self.slots.len() => vec![r],
            Some(r) => {
                return Err(ServeError::invalid(format!(
                    "replica must be in 0..{} (the model has {} replicas), got {r}",
                    self.slots.len(),
                    self.slots.len()
                )))
            }
            None => (0..self.slots.len()).collect(),
        };
        // All or nothing. Only this actor adds faults and workers only take them, so a book
        // that has room now still has it below.
        let book = |r: usize| {
            self.slots[r]
                .faults
                .lock()
                .unwrap_or_else(|e| e.into_inner())
        };
        if let Some(full) = targets.iter().find(|&&r| !book(r).has_room_for(msg.fault)) {
            return Err(ServeError::Conflict(format!(
                "replica {full} already holds {} different queued faults; let them run first",
                super::faults::MAX_ENTRIES
            )));
        }
        for &replica in &targets {
            let _ = book(replica).push(msg.fault, msg.count);
        }
        tracing::warn!(model = %self.info.name, fault = ?msg.fault, count = msg.count, replicas = ?targets, "fault injected");
        Ok(targets.len())
    }
}

impl Handler<Status> for Router {
    type Result = MessageResult<Status>;

    fn handle(&mut self, _: Status, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(RouterStatus {
            replicas: self.slots.len(),
            queued: self.queue.len(),
            healthy_replicas: self.healthy(),
            busy_replicas: self.slots.iter().filter(|s| s.in_flight.is_some()).count(),
            overloaded: self.overloaded,
            restarts: self.restarts,
        })
    }
}
