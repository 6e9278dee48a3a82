//! `ServedModel`: the handle of one serving model version, as the catalog lists it, and
//! [`ServedModel::infer`], the one way to run a request on a model. REST, WebSocket streams,
//! the supervisor's smoke test (and the protocols to come) all call it: it hands the request
//! to the version's router with its reply slot and deadline, and resolves to the answer or a
//! typed error. Its other methods are the router's controls (status, faults, drain), so that
//! nothing outside the actors touches the router's messages or reply slots.
//!
//! A version is "in use", and never unloaded for idleness, while a handle taken from the
//! catalog for a request or a stream ([`ServedModel::held`]) lives: from the moment a request
//! is resolved (its body may still be arriving) until it is answered, and for a stream's whole
//! life, silent or not. A handle taken in the instant of an idle unload may still find its
//! router stopped: the router gives the request back unqueued, and the handle's [`Relay`]
//! takes it to the version loaded again, as a request after the unload would have loaded it.
//! Its answer is counted there ([`Sent::Answered`]'s `by`), not on the stopped version.
//!
//! A version taken out of service otherwise (a rollout, the fleet, an admin's unload) serves
//! nothing more: a request that still reaches it is not run. [`ServedModel::infer`] answers it
//! [`ServeError::VersionRetired`] (a stream's step must not move to another version unasked);
//! [`ServedModel::send`] gives it back ([`Sent::Retired`]), so that REST and gRPC can send a
//! request that asked for the model, not a version, to its default version now (`api/rest.rs`).

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use actix::{Message, Recipient};
use tokio::sync::oneshot;

use super::faults::Fault;
use super::health::ModelHealth;
use super::pending::Reply;
pub use super::router::Priority;
use super::router::{Drain, Infer, InjectFault, RouterHandle, RouterStatus, Status};
use crate::error::ServeError;
use crate::model::{InferRequest, InferResponse, ModelInfo};
use crate::monitor::ModelWatch;
use crate::telemetry::RequestSeries;

/// A version that is being served.
#[derive(Clone)]
pub struct ServedModel {
    pub info: Arc<ModelInfo>,
    pub router: RouterHandle,
    pub health: Arc<ModelHealth>,
    /// What its inputs and outputs look like, drift and probe ([`crate::monitor`]).
    pub watch: Arc<ModelWatch>,
    /// The request series its answers move, looked up once.
    pub series: Arc<RequestSeries>,
    /// Who holds the version, and where its requests go once its router has stopped.
    pub hold: Hold,
}

/// Load a version again after an idle unload and answer its new handle: what a [`Relay`] asks
/// the supervisor (which answers as for a request's `EnsureLoaded` of that version).
#[derive(Message)]
#[rtype(result = "Result<ServedModel, ServeError>")]
pub struct Reload {
    pub name: String,
    pub version: String,
}

/// What every handle of one loaded version shares: how many handles hold it (see the module),
/// and how a handle whose router has stopped reaches the version that serves after it. Only a
/// version unloaded for idleness gets a way to load it again
/// ([`reload_with`](Relay::reload_with)): what still reaches one unloaded by a rollout, the
/// fleet or an admin is answered [`ServeError::VersionRetired`], never run.
#[derive(Default)]
pub struct Relay {
    /// Handles of the version held for requests and streams ([`ServedModel::held`]).
    holders: AtomicUsize,
    /// Set by the supervisor just before it drains the version for idleness.
    reload: OnceLock<Recipient<Reload>>,
    /// The version loaded again, once a request needed it.
    next: Mutex<Option<ServedModel>>,
}

impl Relay {
    fn reload_with(&self, supervisor: Recipient<Reload>) {
        let _ = self.reload.set(supervisor);
    }

    fn next(&self) -> Option<ServedModel> {
        self.next.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_next(&self, served: ServedModel) {
        *self.next.lock().unwrap_or_else(|e| e.into_inner()) = Some(served);
    }
}

/// A handle's share of its version's [`Relay`]. A held one counts among the version's holders,
/// and so does each of its clones, until dropped; the catalog's own copies do not count.
#[derive(Default)]
pub struct Hold {
    relay: Arc<Relay>,
    counted: bool,
}

impl Hold {
    fn counted(relay: Arc<Relay>) -> Hold {
        relay.holders.fetch_add(1, Ordering::AcqRel);
        Hold {
            relay,
            counted: true,
        }
    }
}

impl Clone for Hold {
    fn clone(&self) -> Hold {
        if self.counted {
            Hold::counted(self.relay.clone())
        } else {
            Hold {
                relay: self.relay.clone(),
                counted: false,
            }
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if self.counted {
            self.relay.holders.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// How long a request whose version was unloaded under it waits for the version to load again
/// (as long as a request to a cold version waits at the door).
const RELOAD_WAIT: Duration = Duration::from_secs(60);

/// What a request's caller hears when its router stopped and nothing serves after it.
fn dropped() -> ServeError {
    ServeError::WorkerLost("the router dropped the request".into())
}

/// What became of a request given to [`ServedModel::send`].
pub enum Sent {
    /// Its answer (or refusal), and the handle of the version that took it when that is not
    /// the one it was sent to (the version loaded again after an idle unload): its answer is
    /// counted there.
    Answered {
        answer: Result<InferResponse, ServeError>,
        by: Option<ServedModel>,
    },
    /// Nothing of it ran: its version was taken out of service (a rollout, the fleet, an
    /// admin) before the request reached its router. The request, to send to another version
    /// or answer [`ServeError::VersionRetired`] ([`ServedModel::retired`] of `stopped`, the
    /// version it reached).
    Retired {
        request: Arc<InferRequest>,
        stopped: ServedModel,
    },
}

/// Which router took a request ([`ServedModel::hand_over`]).
enum Handed {
    /// The handle's own.
    Here,
    /// That of a version loaded again after the handle's was unloaded for idleness.
    To(ServedModel),
    /// None: every router on the way has stopped; the last stopped handle, and the request.
    Back(ServedModel, Infer),
}

/// Why [`ServedModel::reload`] did not hand a request over.
enum Unsent {
    Retired {
        request: Arc<InferRequest>,
        stopped: ServedModel,
    },
    Failed(ServeError),
}

/// When a request arrived, by when it must have started running, and its lane.
#[derive(Clone, Copy, Debug)]
pub struct InferOptions {
    /// Queue time is counted from here (the first byte the server read, for REST).
    pub received: Instant,
    /// After this the request is answered 504 instead of being run.
    pub deadline: Option<Instant>,
    pub priority: Priority,
    /// Straight to the model's fallback, if it has one that is loaded: the door was past its
    /// limit, or the stream this step is for is behind real time (the CPU is short, and the
    /// fallback's answer costs less of it).
    pub fallback_first: bool,
}

impl InferOptions {
    /// Arrived now, no deadline, normal priority.
    pub fn now() -> InferOptions {
        InferOptions::received_at(Instant::now())
    }

    pub fn received_at(received: Instant) -> InferOptions {
        InferOptions {
            received,
            deadline: None,
            priority: Priority::Normal,
            fallback_first: false,
        }
    }

    /// A deadline `timeout` after the request arrived.
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> InferOptions {
        self.deadline = timeout.map(|t| self.received + t);
        self
    }

    pub fn with_priority(mut self, priority: Priority) -> InferOptions {
        self.priority = priority;
        self
    }

    pub fn with_fallback_first(mut self, fallback_first: bool) -> InferOptions {
        self.fallback_first = fallback_first;
        self
    }
}

impl ServedModel {
    /// This handle, held for a request or a stream: the version is not unloaded for idleness
    /// while it (or a clone of it) lives. What the catalog hands out.
    pub fn held(&self) -> ServedModel {
        ServedModel {
            hold: Hold::counted(self.hold.relay.clone()),
            ..self.clone()
        }
    }

    /// The version is about to be unloaded for idleness: what still reaches its stopped
    /// router loads it again through `supervisor` (see [`Relay`]).
    pub fn reload_with(&self, supervisor: Recipient<Reload>) {
        self.hold.relay.reload_with(supervisor);
    }

    /// How many held handles of this version live now.
    pub fn holders(&self) -> usize {
        self.hold.relay.holders.load(Ordering::Acquire)
    }

    /// Queues a validated request on this version (or its fallback, in degraded mode) and
    /// resolves to its one answer. The request is handed over before this returns, so calls
    /// made one after another are queued in that order (a stream's steps rely on it); only a
    /// request whose version was unloaded for idleness under it, and must wait for it to load
    /// again, is handed over later (see the module). A request that reaches a version taken
    /// out of service is answered [`ServeError::VersionRetired`]; [`send`](Self::send) gives
    /// it back instead, and says which version answered.
    pub fn infer(
        &self,
        request: InferRequest,
        options: InferOptions,
    ) -> impl Future<Output = Result<InferResponse, ServeError>> + 'static {
        let sent = self.send(Arc::new(request), options);
        async move {
            match sent.await {
                Sent::Answered { answer, .. } => answer,
                Sent::Retired { stopped, .. } => Err(stopped.retired()),
            }
        }
    }

    /// [`infer`](Self::infer), for a caller that counts the answer under the version that gave
    /// it, and may send a request whose version was taken out of service to another one: what
    /// the REST and gRPC inference requests use. Handed over before this returns, as `infer`.
    pub fn send(
        &self,
        request: Arc<InferRequest>,
        options: InferOptions,
    ) -> impl Future<Output = Sent> + 'static {
        let (tx, answer) = oneshot::channel();
        let handed = self.hand_over(Infer {
            request,
            reply: Reply::new(tx),
            received: options.received,
            deadline: options.deadline,
            priority: options.priority,
            fallback_first: options.fallback_first,
        });
        async move {
            let by = match handed {
                Handed::Here => None,
                Handed::To(next) => Some(next),
                Handed::Back(stopped, infer) => match stopped.reload(infer).await {
                    Ok(served) => Some(served),
                    Err(Unsent::Retired { request, stopped }) => {
                        return Sent::Retired { request, stopped }
                    }
                    Err(Unsent::Failed(e)) => {
                        return Sent::Answered {
                            answer: Err(e),
                            by: None,
                        }
                    }
                },
            };
            Sent::Answered {
                answer: answer.await.unwrap_or_else(|_| Err(dropped())),
                by,
            }
        }
    }

    /// What a request that reached this version after it was taken out of service is told.
    pub fn retired(&self) -> ServeError {
        ServeError::VersionRetired {
            model: self.info.name.clone(),
            version: self.info.version.clone(),
        }
    }

    /// Hands `infer` to this version's router or, once that has stopped, to the version loaded
    /// again after it (and after that one, ...), and says which took it. Gives it back, never
    /// queued, with the last stopped handle, when no version serves after it yet.
    fn hand_over(&self, infer: Infer) -> Handed {
        let mut infer = match self.router.infer(infer) {
            Ok(()) => return Handed::Here,
            Err(infer) => infer,
        };
        let mut stopped = self.clone();
        while let Some(next) = stopped.hold.relay.next() {
            match next.router.infer(infer) {
                Ok(()) => {
                    // Straight there next time, past the stopped ones between.
                    self.hold.relay.set_next(next.clone());
                    return Handed::To(next);
                }
                Err(back) => (infer, stopped) = (back, next),
            }
        }
        Handed::Back(stopped, infer)
    }

    /// This version's router has stopped and nothing serves after it yet: when it was unloaded
    /// for idleness, loads it again (or waits for the load another request started), hands
    /// `infer` to it and answers its handle; otherwise gives the request back unrun.
    async fn reload(self, infer: Infer) -> Result<ServedModel, Unsent> {
        let Some(supervisor) = self.hold.relay.reload.get().cloned() else {
            // Not unloaded for idleness (a rollout, the fleet or an admin took it out of
            // service), or its router stopped for another reason (shutdown): nothing of the
            // request ran.
            return Err(Unsent::Retired {
                request: infer.request,
                stopped: self,
            });
        };
        let load = supervisor.send(Reload {
            name: self.info.name.clone(),
            version: self.info.version.clone(),
        });
        let served = match tokio::time::timeout(RELOAD_WAIT, load).await {
            Ok(Ok(Ok(loaded))) => loaded,
            Ok(Ok(Err(e))) => return Err(Unsent::Failed(e)),
            Ok(Err(_)) => return Err(Unsent::Failed(ServeError::ShuttingDown)),
            Err(_) => {
                return Err(Unsent::Failed(ServeError::NotReady {
                    model: self.info.name.clone(),
                    reason: format!("version {} is still loading", self.info.version),
                    retry_after: Duration::from_secs(5),
                }))
            }
        };
        tracing::debug!(model = %self.info.name, version = %self.info.version, "request taken to the version loaded again");
        self.hold.relay.set_next(served.clone());
        // Loaded this instant: a router that stopped already (unloaded again, or the server
        // shutting down) is not chased further.
        match served.hand_over(infer) {
            Handed::Here => Ok(served),
            Handed::To(next) => Ok(next),
            Handed::Back(..) => Err(Unsent::Failed(dropped())),
        }
    }

    /// Stops taking requests once the queue and running batches are done; the workers end.
    pub fn drain(&self) {
        self.router.actor().do_send(Drain);
    }

    /// The router's queue and replicas now; `None` once it has stopped.
    pub async fn status(&self) -> Option<RouterStatus> {
        self.router.actor().send(Status).await.ok()
    }

    /// Queues `fault` for the next `count` batches of one replica, or of every replica;
    /// answers how many replicas got it.
    pub async fn inject_fault(
        &self,
        replica: Option<usize>,
        fault: Fault,
        count: u64,
    ) -> Result<usize, ServeError> {
        self.router
            .actor()
            .send(InjectFault {
                replica,
                fault,
                count,
            })
            .await
            .map_err(|_| ServeError::WorkerLost("router is gone".into()))?
    }
}
