//! How an instance starts while its registry does not answer: from what its cache kept, in a
//! few seconds, not after the store client has timed out and retried every read of the first
//! polls (three reads in a row, the list of models, a version's record and the list again,
//! each up to its connect timeout three times over against an address that drops packets;
//! 40 s in all before the instance listened, in `tests/behaviour/registry_edges.rs`).
//!
//! With desired states in the cache, the first read of the registry may take
//! [`FIRST_ANSWER`]; past that the instance starts from the cache. Versions are then taken
//! from the cache alone, and the routing is re-sent every [`SETTLE_STEP`], without asking
//! the registry, until every model's default is loaded (or failed): the server listens then,
//! and the polls of the registry go on in the background, catching up when it answers.

use std::time::Duration;

use super::{Agent, Key};
use crate::registry::{now_ms, RegistryError};

/// How long the first poll waits for the registry when the cache can stand in for it. A
/// store that answers at all answers a listing well within it; a slower one is caught up
/// with on the next poll.
const FIRST_ANSWER: Duration = Duration::from_secs(3);
/// How often the routing is re-sent while the models load at a start without the registry.
pub(super) const SETTLE_STEP: Duration = Duration::from_millis(200);
/// Settling stops after this long even if some model never settles, so that the registry is
/// polled again whatever happens.
const SETTLE_LIMIT_MS: u64 = 60_000;

impl Agent {
    /// The first poll's read of the registry: bounded by [`FIRST_ANSWER`] when the cache
    /// has desired states to start from. Returns whether the registry answered.
    pub(super) async fn first_read(&mut self) -> bool {
        if self.fleet.shared.cache.load_desired().is_empty() {
            return self.read_desired().await;
        }
        match tokio::time::timeout(FIRST_ANSWER, self.read_desired()).await {
            Ok(reachable) => reachable,
            Err(_) => {
                self.start_from_cache();
                self.unreachable(RegistryError::Unreachable(format!(
                    "{}: no answer within {} s of starting; serving what the cache kept",
                    self.fleet.shared.store.uri(),
                    FIRST_ANSWER.as_secs()
                )));
                false
            }
        }
    }

    /// Takes the desired states the cache kept, for the models not read from the registry.
    pub(super) fn start_from_cache(&mut self) {
        for desired in self.fleet.shared.cache.load_desired() {
            if self.desired.contains_key(&desired.model) {
                continue;
            }
            tracing::info!(model = %desired.model, "desired state from the cache");
            self.desired.insert(desired.model.clone(), (desired, None));
        }
    }

    /// Lists `key` from the cache alone (its record and its verified file); what the cache
    /// does not have waits for the registry to answer.
    pub(super) async fn take_from_cache(&mut self, key: &Key) {
        match self.fleet.take_cached(&key.0, &key.1).await {
            Ok(sha256) => {
                self.sha256.insert(key.clone(), sha256);
                self.unavailable.remove(key);
                self.listed.insert(key.clone());
            }
            // Noted at time 0, so that it is fetched as soon as the registry answers rather
            // than a retry delay later: nothing has been tried against the registry yet.
            Err(e) => {
                self.unavailable.insert(key.clone(), (e, 0));
            }
        }
    }

    /// Whether the agent is starting without the registry and its models are still loading.
    pub(super) fn settling(&self) -> bool {
        !*self.fleet.shared.synced.borrow()
            && self.read_failed
            && self.polls > 0
            && now_ms().saturating_sub(self.started_at_ms) < SETTLE_LIMIT_MS
    }

    /// One step of settling: the routing again (a loaded version is ready now), and the
    /// first sync once everything settled.
    pub(super) async fn settle(&mut self) {
        let now = now_ms();
        self.route_all(now).await;
        let catalog = self.fleet.shared.catalog.snapshot();
        self.mine = self.report(&catalog, now);
        self.publish_status(now);
        if self.settled() {
            let _ = self.fleet.shared.synced.send(true);
        }
    }
}
