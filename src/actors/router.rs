//! `Router`: one actor per model version. It owns the version's request queue and its
//! workers, and decides when and where each batch runs.
//!
//! Batching follows Triton's dynamic batcher: a batch is dispatched when `max_batch_size` rows
//! are waiting, or when the oldest request has waited `max_queue_delay`, whichever comes
//! first, and only to an idle worker. While every worker is busy the queue keeps filling, so
//! batches grow with load on their own. Admission is a bounded queue: past `max_queue`
//! waiting requests a new one is refused at once with 429 and a Retry-After estimate.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::supervisor;
use super::worker::{Batch, BatchLayout, BatchOutcome, Pending, Reply, WorkerHandle, WorkerReport};
use crate::error::ServeError;
use crate::manifest::ModelEntry;
use crate::model::{InferRequest, ModelInfo};

/// Health of a model version, written by its router and read lock-free by the health API.
#[derive(Debug)]
pub struct ModelHealth {
    pub healthy_replicas: AtomicUsize,
    pub replicas: usize,
}

impl ModelHealth {
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
}

/// A replacement worker that the supervisor started for a dead one.
#[derive(Message)]
#[rtype(result = "()")]
struct Attach(WorkerHandle);

struct Slot {
    handle: Option<WorkerHandle>,
    busy: bool,
    /// When the slot last got a batch: among idle workers the longest idle goes first, which
    /// spreads load evenly across replicas.
    last_dispatch: Instant,
}

pub struct Router {
    info: Arc<ModelInfo>,
    /// `None` for models without a batch axis.
    layout: Option<Arc<BatchLayout>>,
    entry: Arc<ModelEntry>,
    env: &'static ort::environment::Environment,
    queue: VecDeque<Pending>,
    queued_rows: usize,
    slots: Vec<Slot>,
    reports: flume::Sender<WorkerReport>,
    flush_timer: Option<SpawnHandle>,
    health: Arc<ModelHealth>,
    /// Smoothed compute time per batch, for Retry-After estimates.
    mean_batch_time: Duration,
    labels: [(&'static str, String); 2],
}

impl Router {
    pub fn new(
        info: Arc<ModelInfo>,
        entry: Arc<ModelEntry>,
        env: &'static ort::environment::Environment,
        workers: Vec<WorkerHandle>,
        reports: flume::Sender<WorkerReport>,
        health: Arc<ModelHealth>,
    ) -> Router {
        let now = Instant::now();
        let mut slots: Vec<Slot> = (0..entry.replicas)
            .map(|_| Slot {
                handle: None,
                busy: false,
                last_dispatch: now,
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
            info,
            layout,
            entry,
            env,
            queue: VecDeque::new(),
            queued_rows: 0,
            slots,
            reports,
            flush_timer: None,
            health,
            mean_batch_time: Duration::from_millis(5),
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

    /// How long a newly refused client should wait before trying again.
    fn retry_after(&self) -> Duration {
        let workers = self.healthy().max(1) as u32;
        let per_batch = self.info.batching.max_batch_size.max(1) as u32;
        let batches = (self.queue.len() as u32).div_ceil(per_batch * workers);
        (self.mean_batch_time * batches).max(Duration::from_millis(100))
    }

    fn idle_slot(&self) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.handle.is_some() && !s.busy)
            .min_by_key(|(_, s)| s.last_dispatch)
            .map(|(i, _)| i)
    }

    /// Sends out every batch that is due, for as long as there are idle workers.
    fn dispatch(&mut self, ctx: &mut Context<Self>) {
        loop {
            // Callers that went away (client disconnected) need no inference.
            while self.queue.front().is_some_and(|p| p.reply.is_closed()) {
                let gone = self.queue.pop_front().expect("front exists");
                self.queued_rows -= gone.request.rows;
            }
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
            let batch = self.take_batch();
            let slot_ref = &mut self.slots[slot];
            let handle = slot_ref.handle.as_ref().expect("idle slot has a worker");
            match handle.submit(batch) {
                Ok(()) => {
                    slot_ref.busy = true;
                    slot_ref.last_dispatch = Instant::now();
                }
                Err(batch) => {
                    // The worker thread is gone without a report: requeue at the front, in order.
                    let replica = handle.replica;
                    for pending in batch.items.into_iter().rev() {
                        self.queued_rows += pending.request.rows;
                        self.queue.push_front(pending);
                    }
                    self.worker_lost(replica, "worker thread exited".into(), ctx);
                }
            }
        }
        self.publish_queue();
    }

    /// Takes the oldest request and every later one that fits beside it.
    fn take_batch(&mut self) -> Batch {
        let first = self.queue.pop_front().expect("queue is not empty");
        self.queued_rows -= first.request.rows;
        let mut rows = first.request.rows;
        let mut items = vec![first];
        if self.info.batched() {
            let max = self.info.batching.max_batch_size;
            let mut i = 0;
            // Bound the scan so a queue of incompatible shapes cannot make dispatch quadratic.
            let mut scanned = 0;
            while i < self.queue.len() && rows < max && scanned < 4 * max {
                scanned += 1;
                let candidate = &self.queue[i];
                if candidate.reply.is_closed() {
                    let gone = self.queue.remove(i).expect("index in range");
                    self.queued_rows -= gone.request.rows;
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
        Batch {
            items,
            layout: self.layout.clone(),
        }
    }

    fn worker_lost(&mut self, replica: usize, reason: String, ctx: &mut Context<Self>) {
        let slot = &mut self.slots[replica];
        let Some(handle) = slot.handle.take() else {
            return;
        };
        slot.busy = false;
        tracing::error!(model = %self.info.name, version = %self.info.version, replica, %reason, "worker died; restarting it");
        metrics::counter!("streamserve_worker_restarts_total", &self.labels).increment(1);
        self.publish_health();
        let restart = supervisor::restart_worker(
            self.entry.clone(),
            replica,
            handle.generation + 1,
            self.env,
            self.reports.clone(),
        );
        ctx.spawn(restart.into_actor(self).map(|started, _router, ctx| {
            ctx.notify(Attach(started));
        }));
        if self.healthy() == 0 {
            // Nothing can serve the queue now: answer it rather than let it wait unbounded.
            let retry_after = Duration::from_secs(1);
            for pending in self.queue.drain(..) {
                let _ = pending.reply.send(Err(ServeError::NotReady {
                    model: self.info.name.clone(),
                    reason: "no healthy replica; restarting".into(),
                    retry_after,
                }));
            }
            self.queued_rows = 0;
            self.publish_queue();
        }
    }
}

impl Actor for Router {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Self::Context) {
        self.publish_health();
        self.publish_queue();
    }
}

impl Handler<Infer> for Router {
    type Result = ();

    fn handle(&mut self, msg: Infer, ctx: &mut Self::Context) {
        if self.healthy() == 0 {
            let _ = msg.reply.send(Err(ServeError::NotReady {
                model: self.info.name.clone(),
                reason: "no healthy replica".into(),
                retry_after: Duration::from_secs(1),
            }));
            return;
        }
        if self.queue.len() >= self.info.max_queue {
            metrics::counter!("streamserve_shed_total", &self.labels).increment(1);
            let _ = msg.reply.send(Err(ServeError::Overloaded {
                model: self.info.name.clone(),
                queued: self.queue.len(),
                limit: self.info.max_queue,
                retry_after: self.retry_after(),
            }));
            return;
        }
        self.queued_rows += msg.request.rows;
        self.queue.push_back(Pending {
            request: msg.request,
            reply: msg.reply,
            enqueued: msg.received,
        });
        self.dispatch(ctx);
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
                slot.busy = false;
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
            BatchOutcome::Died { reason } => self.worker_lost(report.replica, reason, ctx),
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
        tracing::info!(model = %self.info.name, version = %self.info.version, replica, generation = worker.generation, "worker restarted");
        self.slots[replica] = Slot {
            handle: Some(worker),
            busy: false,
            last_dispatch: Instant::now(),
        };
        self.publish_health();
        self.dispatch(ctx);
    }
}
