//! `ServedModel`: the handle of one serving model version, as the catalog lists it, and
//! [`ServedModel::infer`], the one way to run a request on a model. REST, WebSocket streams,
//! the supervisor's smoke test (and the protocols to come) all call it: it hands the request
//! to the version's router with its reply slot and deadline, and resolves to the answer or a
//! typed error. Its other methods are the router's controls (status, faults, drain), so that
//! nothing outside the actors touches the router's messages or reply slots.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// Queues a validated request on this version (or its fallback, in degraded mode) and
    /// resolves to its one answer. The request is handed over before this returns, so calls
    /// made one after another are queued in that order (a stream's steps rely on it).
    pub fn infer(
        &self,
        request: InferRequest,
        options: InferOptions,
    ) -> impl Future<Output = Result<InferResponse, ServeError>> + 'static {
        let (tx, answer) = oneshot::channel();
        self.router.infer(Infer {
            request,
            reply: Reply::new(tx),
            received: options.received,
            deadline: options.deadline,
            priority: options.priority,
            fallback_first: options.fallback_first,
        });
        async move {
            answer.await.unwrap_or_else(|_| {
                Err(ServeError::WorkerLost(
                    "the router dropped the request".into(),
                ))
            })
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
