//! `Router`: one actor per model version. It owns the version's request queue and its
//! workers, and decides when and where each batch runs.
//!
//! Batching follows Triton's dynamic batcher: a batch is dispatched when `max_batch_size` rows
//! are waiting, or when the oldest request has waited `max_queue_delay`, whichever comes
//! first, and only to an idle worker (a low-priority batch not to the last idle one while
//! normal traffic is recent: [`queue::NORMAL_RECENT`]; a normal one, while another replica
//! runs, not before it has had [`queue::BUSY_BATCH_DELAY`] to fill). While every worker is
//! busy the queue keeps filling, so batches grow with load on their own.
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
//! The state lives in [`core`], behind a mutex: the caller's thread admits a request and hands
//! an idle worker its batch, and a worker's thread, done with a batch, takes the next one, so a
//! request wakes only its worker and its caller (`core.rs` says why). The flush clock
//! (`clock.rs`, one thread for the process) wakes it when a partial batch is due; the actor
//! keeps the watch and starts workers; callers hold a
//! [`RouterHandle`]. The rules live in plain parts: [`queue`] (lanes, when a batch is due and
//! what it holds, expiry, predicted wait), [`replicas`] (which worker is idle, busy or hung)
//! and [`scaling`] (when to add or remove a replica; `autoscale.rs` carries that out);
//! [`control`] holds the admin and supervisor messages.

mod autoscale;
mod clock;
mod control;
mod core;
pub mod queue;
mod replicas;
mod scaling;
mod series;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use actix::prelude::*;

use self::core::{Degrade, Effects, RouterCore, StartWorker};
use super::budget::{replica_memory_mb, Budgets};
use super::faults::FaultQueue;
use super::health::ModelHealth;
use super::pending::{Pending, Reply};
use super::worker::restart::{restart, start_once};
use super::worker::{ReportTarget, WorkerHandle, WorkerRecipe, WorkerReport};
use crate::model::{InferRequest, ModelInfo};
pub use control::{Drain, InjectFault, RouterStatus, Status};
pub use queue::Priority;

/// How often queued deadlines and running batches are checked.
const WATCH_INTERVAL: Duration = Duration::from_millis(50);

/// Finds the router of a fallback model by name, when it can serve (the supervisor gives each
/// router one that reads the catalog, so that routers need not know the catalog).
pub type FallbackLookup = Arc<dyn Fn(&str) -> Option<RouterHandle> + Send + Sync>;

/// A validated request to queue; the answer arrives on `reply`. From `ServedModel::infer`
/// only.
pub struct Infer {
    pub request: Arc<InferRequest>,
    pub reply: Reply,
    pub received: Instant,
    pub deadline: Option<Instant>,
    pub priority: Priority,
    /// Straight to the fallback when one is ready (the door was past its limit, or the
    /// stream this step is for is behind real time).
    pub fallback_first: bool,
}

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

/// Starts a router: its state, and its actor on an arbiter (thread) of its own. The version's
/// workers report to it from then on.
pub fn start(setup: RouterSetup) -> RouterHandle {
    // Here, not in `started`: the router's own thread may run that after the version is
    // already published as serving and scraped, and a counter that appears with its first
    // event hides that event from `rate()`.
    crate::telemetry::register_model_series(&setup.info);
    let reports = setup.recipe.reports.clone();
    let core = RouterCore::new(setup, Instant::now());
    // Published before any caller can reach the state (not in the actor's `started`, which
    // may run after the first requests and would overwrite what they set).
    core.publish_health();
    core.publish_queue();
    metrics::gauge!("streamserve_overloaded", &core.labels).set(0.0);
    metrics::gauge!("streamserve_replicas", &core.labels).set(core.replicas.len() as f64);
    let shared = Arc::new_cyclic(|me| Shared {
        core: Mutex::new(core),
        addr: OnceLock::new(),
        me: me.clone(),
    });
    let arbiter = Arbiter::new();
    let actor_shared = shared.clone();
    let addr = Router::start_in_arbiter(&arbiter.handle(), move |_| Router {
        shared: actor_shared,
    });
    let _ = shared.addr.set(addr);
    let target: Weak<Shared> = Arc::downgrade(&shared);
    reports.connect(target);
    // Replicas whose worker failed to load with the version are started again now (the
    // address is set: the starts go to the actor).
    let mut effects = Effects::default();
    shared.lock().start_missing(&mut effects);
    shared.apply(effects);
    RouterHandle(shared)
}

/// A router as its callers hold it: requests go straight into its state on the caller's
/// thread; control goes to its actor.
#[derive(Clone)]
pub struct RouterHandle(Arc<Shared>);

/// What the handles, the workers (weakly) and the actor share. The actor holds it too, so it
/// lives as long as the actor runs, whoever else lets go.
struct Shared {
    core: Mutex<RouterCore>,
    /// Set right after the actor starts, before anyone can reach the state.
    addr: OnceLock<Addr<Router>>,
    /// Itself, for the flush clock (which must not keep a stopped router alive).
    me: Weak<Shared>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, RouterCore> {
        // A panic under the lock cannot leave the state half-changed in a way the next
        // caller must not see: every rule re-reads it.
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a request in (or hands it to the fallback, or refuses it), then carries out what
    /// that asked of the actor. Gives it back untouched once the router has stopped.
    fn admit(&self, pending: Pending, degrade: Degrade) -> Result<(), Pending> {
        let mut effects = Effects::default();
        {
            let mut core = self.lock();
            if core.stopped {
                return Err(pending);
            }
            core.health.touch();
            core.admit(pending, degrade, &mut effects);
        }
        self.apply(effects);
        Ok(())
    }

    /// Carries out what the state asked for, with the lock released: hands workers their
    /// batches (one a worker cannot take goes back under the lock), arms the flush clock, sends
    /// the actor its worker starts, and hands requests to fallbacks (their routers' own locks, taken only
    /// now that this router's is released).
    fn apply(&self, effects: Effects) {
        let Effects {
            wake_at,
            starts,
            handoffs,
            batches,
        } = effects;
        for dispatched in batches {
            if dispatched.inbox.submit(dispatched.batch).is_err() {
                let mut effects = Effects::default();
                self.lock()
                    .undelivered(dispatched.replica, dispatched.generation, &mut effects);
                self.apply(effects);
            }
        }
        if let Some(at) = wake_at {
            clock::arm(at, self.me.clone());
        }
        // The address is set before any caller or worker can reach the state, and the
        // actor's own first watch comes a tick (50 ms) after it starts.
        if let Some(addr) = self.addr.get() {
            for start in starts {
                addr.do_send(start);
            }
        }
        for (fallback, pending) in handoffs {
            // A fallback that stopped since it was looked up drops the request, as before:
            // its caller hears that the router dropped it.
            let _ = fallback.0.admit(pending, Degrade::Never);
        }
    }
}

impl clock::Flush for Shared {
    fn flush(&self) {
        let mut effects = Effects::default();
        {
            let mut core = self.lock();
            if core.stopped {
                return;
            }
            core.flush(&mut effects);
        }
        self.apply(effects);
    }
}

impl ReportTarget for Shared {
    fn report(&self, report: WorkerReport) -> bool {
        let mut effects = Effects::default();
        {
            let mut core = self.lock();
            if core.stopped {
                return false;
            }
            core.on_report(report, &mut effects);
        }
        self.apply(effects);
        true
    }
}

impl RouterHandle {
    /// Queues a validated request: admission, and the dispatch to an idle worker, run here
    /// on the caller's thread. The request is in the queue (or answered) when this returns,
    /// unless the router has stopped (its version was unloaded): then it comes back as it
    /// went in, never queued nor answered, for the caller to take elsewhere
    /// (`ServedModel::infer` takes it to the version loaded again after an idle unload).
    pub fn infer(&self, msg: Infer) -> Result<(), Infer> {
        let fallback_first = msg.fallback_first;
        let pending = Pending {
            request: msg.request,
            reply: msg.reply,
            enqueued: msg.received,
            deadline: msg.deadline,
            attempts: 0,
            degraded_from: None,
            priority: msg.priority,
        };
        let degrade = if fallback_first {
            Degrade::Now
        } else {
            Degrade::WhenShort
        };
        self.0.admit(pending, degrade).map_err(|pending| Infer {
            request: pending.request,
            reply: pending.reply,
            received: pending.enqueued,
            deadline: pending.deadline,
            priority: pending.priority,
            fallback_first,
        })
    }

    /// The actor, for the control messages.
    pub fn actor(&self) -> &Addr<Router> {
        self.0.addr.get().expect("set when the router started")
    }
}

/// The router's actor: the clock and the workers' starts, around the shared state.
pub struct Router {
    shared: Arc<Shared>,
}

/// A replacement worker, or a new replica's, that has loaded.
#[derive(Message)]
#[rtype(result = "()")]
struct Attach(WorkerHandle);

impl Router {
    fn lock(&self) -> MutexGuard<'_, RouterCore> {
        self.shared.lock()
    }

    /// Runs `step` on the state, then carries out its effects.
    fn with_core<R>(&mut self, step: impl FnOnce(&mut RouterCore, &mut Effects) -> R) -> R {
        let mut effects = Effects::default();
        let result = step(&mut self.lock(), &mut effects);
        self.shared.apply(effects);
        result
    }
}

impl Actor for Router {
    type Context = Context<Self>;

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        let mut core = self.lock();
        core.stopped = true;
        // Dropping the handles ends the worker threads; then the router's own arbiter.
        let replicas = core.replicas.len();
        core.budgets
            .cpu
            .give_back(replicas * core.recipe.entry.intra_threads);
        let memory_mb = replica_memory_mb(core.info.resources.model_file_bytes);
        core.budgets
            .memory
            .give_back(core.info.device, memory_mb * replicas as u64);
        core.replicas.slots.clear();
        // Whatever still waits (the actor ended some other way than a finished drain) is
        // dropped with its reply slot: its caller hears that the router dropped the request,
        // rather than waiting for a timer or a watch that will not run again.
        drop(core.queue.drain());
        metrics::gauge!("streamserve_workers", &core.labels).set(0.0);
        // 0 of 0: an unloaded version is not one without a healthy replica (the alert on
        // `streamserve_workers == 0` also asks for `streamserve_replicas > 0`).
        metrics::gauge!("streamserve_replicas", &core.labels).set(0.0);
        drop(core);
        Arbiter::current().stop();
    }

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(WATCH_INTERVAL, |router, ctx| {
            if router.with_core(|core, effects| core.watch(effects)) {
                ctx.stop();
            }
        });
    }
}

impl Handler<StartWorker> for Router {
    type Result = ();

    fn handle(&mut self, start: StartWorker, ctx: &mut Self::Context) {
        let recipe = self.lock().recipe.clone();
        let StartWorker {
            replica,
            generation,
            faults,
            delay,
            scaling_up,
        } = start;
        if scaling_up {
            // One try: a new replica that cannot load is given up (`autoscale.rs`).
            let started = async move { start_once(&recipe, replica, generation, faults).await };
            // Attached (or given up) under the same lock that ends the adding, so that no watch
            // sees the new slot empty and not adding, and scales it down before it serves.
            ctx.spawn(started.into_actor(self).map(move |started, router, _ctx| {
                router.with_core(|core, effects| {
                    core.scaler.added();
                    match started {
                        Ok(worker) => core.attach(worker, effects),
                        Err(reason) => core.scale_up_failed(replica, &reason),
                    }
                })
            }));
            return;
        }
        let started = restart(recipe, replica, generation, faults, delay);
        ctx.spawn(
            started
                .into_actor(self)
                .map(|started, _router, ctx| ctx.notify(Attach(started))),
        );
    }
}

impl Handler<Attach> for Router {
    type Result = ();

    fn handle(&mut self, Attach(worker): Attach, _ctx: &mut Self::Context) {
        self.with_core(|core, effects| core.attach(worker, effects));
    }
}
