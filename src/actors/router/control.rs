//! The router's control messages, from the admin API and the supervisor: inject a fault
//! into its replicas, report its state, and drain it before it is unloaded.

use actix::prelude::*;

use super::Router;
use crate::actors::faults::{Fault, MAX_ENTRIES};
use crate::error::ServeError;

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

impl Handler<Drain> for Router {
    type Result = ();

    fn handle(&mut self, _: Drain, _ctx: &mut Self::Context) {
        self.lock().draining = true;
    }
}

impl Handler<InjectFault> for Router {
    type Result = Result<usize, ServeError>;

    fn handle(&mut self, msg: InjectFault, _ctx: &mut Self::Context) -> Self::Result {
        let core = self.lock();
        let n = core.replicas.len();
        let targets: Vec<usize> = match msg.replica {
            Some(r) if r < n => vec![r],
            Some(r) => {
                return Err(ServeError::invalid(format!(
                    "replica must be in 0..{n} (the model has {n} replicas), got {r}"
                )))
            }
            None => (0..n).collect(),
        };
        // All or nothing. Only this actor adds faults and workers only take them, so a book
        // that has room now still has it below.
        let book = |r: usize| {
            core.replicas.slots[r]
                .faults
                .lock()
                .unwrap_or_else(|e| e.into_inner())
        };
        if let Some(full) = targets.iter().find(|&&r| !book(r).has_room_for(msg.fault)) {
            return Err(ServeError::Conflict(format!(
                "replica {full} already holds {} different queued faults; let them run first",
                MAX_ENTRIES
            )));
        }
        for &replica in &targets {
            let _ = book(replica).push(msg.fault, msg.count);
        }
        tracing::warn!(model = %core.info.name, fault = ?msg.fault, count = msg.count, replicas = ?targets, "fault injected");
        Ok(targets.len())
    }
}

impl Handler<Status> for Router {
    type Result = MessageResult<Status>;

    fn handle(&mut self, _: Status, _ctx: &mut Self::Context) -> Self::Result {
        let core = self.lock();
        MessageResult(RouterStatus {
            replicas: core.replicas.len(),
            queued: core.queue.len(),
            healthy_replicas: core.replicas.healthy(),
            busy_replicas: core.replicas.busy(),
            overloaded: core.overloaded,
            restarts: core.restarts,
        })
    }
}
