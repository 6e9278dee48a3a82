//! The router's side of autoscaling: [`scaling`](super::scaling) decides, from what the
//! router sees at a watch tick, whether a replica comes or goes; this turns the decision into
//! a worker started (if the shared CPU and memory budgets have room) or the newest one
//! stopped, with its metrics and log line.

use std::time::{Duration, Instant};

use super::core::{Effects, RouterCore, StartWorker};
use super::replicas::Slot;
use super::scaling::{Load, Scale};
use crate::actors::budget::replica_memory_mb;
use crate::actors::faults::FaultQueue;

impl RouterCore {
    /// Adds or removes a replica as [`scaling`](super::scaling) decides, within the shared CPU
    /// and memory budgets.
    pub(super) fn autoscale(&mut self, effects: &mut Effects) {
        let now = Instant::now();
        let rows_per_batch = self.info.batching.max_batch_size.max(1);
        let load = Load {
            active: self.replicas.busy() > 0 || !self.queue.is_empty(),
            pressure: self.queue.rows() > rows_per_batch * self.replicas.healthy().max(1)
                && self.replicas.all_busy(),
            replicas: self.replicas.len(),
            newest_idle: self.newest_can_go(),
        };
        let threads = self.recipe.entry.intra_threads;
        let memory_mb = replica_memory_mb(self.info.resources.model_file_bytes);
        match self.scaler.decide(load, now) {
            Scale::Hold => {}
            Scale::Up => {
                if !self.budgets.cpu.try_take(threads) {
                    return; // the machine is full: the queue (and fallback) absorb the load
                }
                if self
                    .budgets
                    .memory
                    .try_take(self.info.device, memory_mb)
                    .is_err()
                {
                    self.budgets.cpu.give_back(threads);
                    return;
                }
                self.scaler.started_adding();
                let replica = self.replicas.len();
                let faults = FaultQueue::default();
                self.replicas.slots.push(Slot::new(faults.clone(), now));
                tracing::info!(model = %self.info.name, version = %self.info.version, replica, "scaling up");
                metrics::counter!("streamserve_scale_events_total", "model" => self.info.name.clone(), "direction" => "up").increment(1);
                metrics::gauge!("streamserve_replicas", &self.labels)
                    .set(self.replicas.len() as f64);
                self.publish_health();
                effects.starts.push(StartWorker {
                    replica,
                    generation: 0,
                    faults,
                    delay: Duration::ZERO,
                    scaling_up: true,
                });
            }
            Scale::Down => {
                let last = self.replicas.len() - 1;
                self.remove_newest();
                tracing::info!(model = %self.info.name, version = %self.info.version, replica = last, "scaling down");
                metrics::counter!("streamserve_scale_events_total", "model" => self.info.name.clone(), "direction" => "down").increment(1);
            }
        }
    }

    /// Whether the newest replica can be taken out: it runs no batch, and it is either being
    /// replaced itself or every other replica serves. A serving replica is not removed while
    /// another is being replaced (a restart that backs off, or cannot load): that could leave
    /// the version with no worker at all, and every request a 503, until the restart lands.
    fn newest_can_go(&self) -> bool {
        let all_serve = self.replicas.healthy() == self.replicas.len();
        self.replicas
            .slots
            .last()
            .is_some_and(|s| s.in_flight.is_none() && (s.handle.is_none() || all_serve))
    }

    /// A new replica's worker could not load: its slot goes, with its budget, so that the
    /// router counts only replicas that serve or are being replaced, and may try again (or
    /// scale down) later. The slot is the newest one, empty, unless the router stopped
    /// meanwhile (then there is nothing to give back).
    pub(super) fn scale_up_failed(&mut self, replica: usize, reason: &str) {
        let newest_empty = replica + 1 == self.replicas.len()
            && self.replicas.slots[replica].handle.is_none()
            && self.replicas.slots[replica].in_flight.is_none();
        if self.stopped || !newest_empty {
            return;
        }
        self.remove_newest();
        self.scaler.failed_to_add(Instant::now());
        tracing::error!(model = %self.info.name, version = %self.info.version, replica, %reason, "new replica failed to load; not scaling up");
    }

    /// Takes out the newest replica and gives its budget back.
    fn remove_newest(&mut self) {
        self.replicas.slots.pop();
        self.budgets.cpu.give_back(self.recipe.entry.intra_threads);
        let memory_mb = replica_memory_mb(self.info.resources.model_file_bytes);
        self.budgets.memory.give_back(self.info.device, memory_mb);
        metrics::gauge!("streamserve_replicas", &self.labels).set(self.replicas.len() as f64);
        self.publish_health();
    }
}
