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
            newest_idle: self
                .replicas
                .slots
                .last()
                .is_some_and(|s| s.in_flight.is_none()),
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
                self.replicas.slots.pop();
                self.budgets.cpu.give_back(threads);
                self.budgets.memory.give_back(self.info.device, memory_mb);
                tracing::info!(model = %self.info.name, version = %self.info.version, replica = last, "scaling down");
                metrics::counter!("streamserve_scale_events_total", "model" => self.info.name.clone(), "direction" => "down").increment(1);
                metrics::gauge!("streamserve_replicas", &self.labels)
                    .set(self.replicas.len() as f64);
                self.publish_health();
            }
        }
    }
}
