//! A request on its way through a router's queue and a worker's batch: its exactly-once
//! [`Reply`] slot, the [`Pending`] entry that carries it, and the [`Batch`] a worker runs.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::oneshot;

use super::router::queue::{Priority, Queued};
use crate::error::ServeError;
use crate::manifest::BatchAxis;
use crate::model::{InferRequest, InferResponse};

type ReplySender = oneshot::Sender<Result<InferResponse, ServeError>>;

/// Where a request's one answer goes. Clones share the slot: the first `send` delivers, later
/// ones are ignored, so a request is answered exactly once however its batch ends.
#[derive(Clone)]
pub struct Reply(Arc<Mutex<Option<ReplySender>>>);

impl Reply {
    pub fn new(sender: ReplySender) -> Reply {
        Reply(Arc::new(Mutex::new(Some(sender))))
    }

    /// Delivers the answer unless one was already given; returns whether this one was.
    pub fn send(&self, answer: Result<InferResponse, ServeError>) -> bool {
        let sender = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        sender.is_some_and(|s| s.send(answer).is_ok())
    }

    /// Answered already, or nobody is waiting any more (the client went away).
    pub fn is_closed(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_none_or(|s| s.is_closed())
    }
}

/// A request waiting in a router's queue or riding in a batch.
#[derive(Clone)]
pub struct Pending {
    pub request: Arc<InferRequest>,
    pub reply: Reply,
    pub enqueued: Instant,
    /// After this the request is answered 504 instead of being run.
    pub deadline: Option<Instant>,
    /// Times this request was in a batch whose worker died.
    pub attempts: u8,
    /// Set when a primary model handed this request to its fallback: the model and version
    /// the client asked for, which its metrics are labelled with wherever it ends.
    pub degraded_from: Option<Arc<(String, String)>>,
    pub priority: Priority,
}

impl Queued for Pending {
    fn rows(&self) -> usize {
        self.request.rows
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
        self.reply.is_closed()
    }
}

/// Where each input's and output's batch axis is, for stacking requests into one call.
#[derive(Debug)]
pub struct BatchLayout {
    pub inputs: Vec<BatchAxis>,
    pub outputs: Vec<BatchAxis>,
}

/// What a router hands a worker: requests that can share one model call.
pub struct Batch {
    pub items: Vec<Pending>,
    /// How to stack the requests; `None` for a model without a batch axis (one request, run
    /// as sent).
    pub layout: Option<Arc<BatchLayout>>,
    /// The model and version that serve this batch, for the answers.
    pub served_by: Arc<(String, String)>,
}
