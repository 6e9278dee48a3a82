//! The supervisor: the one writer of the model catalog. It takes over the manifest ([`Start`]),
//! loads versions (at startup, or on the first request for `load = "lazy"`: [`EnsureLoaded`]),
//! unloads idle ones (`idle_unload_secs`, scale to zero) or on request ([`Unload`]), and runs
//! deployments; every change becomes a new [`Catalog`] published to the [`SharedCatalog`].
//! A version unloaded for idleness loads again for the requests and streams that still held
//! it ([`Reload`], from their handle's relay: `served.rs`).
//!
//! A model that cannot be served (hash mismatch, file missing, GPU unusable) is refused with a
//! clear log line and listed as unavailable; every other model keeps serving. Workers that die
//! are their router's to restart, not the supervisor's.
//!
//! This file is the actor, its state and its catalog writes. The rest is in files by concern,
//! which use this one and not each other, except that deployments smoke-test through loading:
//! - [`loading`]: loading one version ([`load_version`]), its checks and resource estimate.
//! - [`rollout`]: [`Deploy`], [`Rollback`] and [`Rollouts`], one file per [`Strategy`].
//! - [`fleet`]: what the fleet agent asks when a model registry drives this instance
//!   ([`AddVersions`], [`Route`]).

mod fleet;
mod loading;
mod rollout;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::future::join_all;
use tokio::sync::oneshot;

use super::budget::Budgets;
use super::catalog::{Canary, Catalog, SharedCatalog, VersionState};
use super::served::{Reload, ServedModel};
use crate::error::ServeError;
use crate::manifest::{compare_versions, Manifest, ModelEntry};
use crate::monitor::WatchSettings;
use crate::runtime::Sessions;
use crate::stream::layout::declared_models;
use fleet::FleetRouting;
pub use fleet::{AddVersions, Readiness, Route, RouteOutcome};
use loading::DOES_NOT_FIT;
pub use loading::{load_version, model_info};
use rollout::Deployments;
pub use rollout::{traffic, Deploy, Rollback, Rollouts, Strategy};

/// The supervisor actor: see the module's documentation.
pub struct Supervisor {
    sessions: Sessions,
    published: Arc<SharedCatalog>,
    budgets: Arc<Budgets>,
    catalog: Catalog,
    entries: HashMap<Key, Arc<ModelEntry>>,
    waiting: HashMap<Key, Vec<oneshot::Sender<Result<ServedModel, ServeError>>>>,
    deployments: Deployments,
    fleet: FleetRouting,
    /// How each loaded version's model monitor works.
    watch: WatchSettings,
}

/// A model version: (name, version).
type Key = (String, String);

/// How [`Supervisor::ensure`] answers: the version once it serves, or why it cannot.
type Loaded = oneshot::Receiver<Result<ServedModel, ServeError>>;

/// The answer of [`Supervisor::ensure`], as a future.
async fn when_loaded(loaded: Loaded) -> Result<ServedModel, ServeError> {
    loaded
        .await
        .unwrap_or_else(|_| Err(ServeError::ShuttingDown))
}

impl Supervisor {
    pub fn new(
        sessions: Sessions,
        published: Arc<SharedCatalog>,
        budgets: Arc<Budgets>,
    ) -> Supervisor {
        Supervisor {
            sessions,
            published,
            budgets,
            catalog: Catalog::default(),
            entries: HashMap::new(),
            waiting: HashMap::new(),
            deployments: Deployments::default(),
            fleet: FleetRouting::default(),
            watch: WatchSettings::default(),
        }
    }

    /// Sets how the model monitor of each version loaded from now on works.
    pub fn with_watch(mut self, watch: WatchSettings) -> Supervisor {
        self.watch = watch;
        self
    }

    fn publish(&self) {
        self.published.publish(self.catalog.clone());
    }

    fn state(&self, key: &Key) -> Option<&VersionState> {
        self.catalog.models.get(&key.0)?.versions.get(&key.1)
    }

    fn set_state(&mut self, key: &Key, state: VersionState) {
        self.catalog
            .models
            .entry(key.0.clone())
            .or_default()
            .versions
            .insert(key.1.clone(), state);
    }

    /// Makes `version` the default of `name` (a deployment's or a rollback's); publish after.
    fn set_default(&mut self, name: &str, version: &str) {
        let model = self.catalog.models.get_mut(name).expect("model exists");
        model.default_override = Some(version.to_string());
    }

    /// Sets or clears `name`'s canary and its share of traffic; publish after.
    fn set_canary(&mut self, name: &str, canary: Option<Canary>) {
        if let Some(model) = self.catalog.models.get_mut(name) {
            model.canary = canary;
        }
    }

    fn served(&self, key: &Key) -> Option<ServedModel> {
        match self.state(key)? {
            VersionState::Serving(served) => Some(served.clone()),
            _ => None,
        }
    }

    /// The version a request without a version goes to (ignoring any canary).
    fn default_of(&self, name: &str) -> Result<String, ServeError> {
        let model = self
            .catalog
            .models
            .get(name)
            .ok_or_else(|| ServeError::ModelNotFound(name.to_string()))?;
        model
            .default_version()
            .map(str::to_string)
            .ok_or_else(|| ServeError::ModelNotFound(name.to_string()))
    }

    fn key(&self, name: &str, version: Option<&str>) -> Result<Key, ServeError> {
        if !self.catalog.models.contains_key(name) {
            return Err(ServeError::ModelNotFound(name.to_string()));
        }
        let version = match version {
            Some(v) => v.to_string(),
            None => self.default_of(name)?,
        };
        if !self
            .entries
            .contains_key(&(name.to_string(), version.clone()))
        {
            let available = self
                .catalog
                .models
                .get(name)
                .map(|m| m.sorted_versions().join(", "))
                .unwrap_or_default();
            return Err(ServeError::VersionNotFound {
                model: name.to_string(),
                version,
                available,
            });
        }
        Ok((name.to_string(), version))
    }

    /// Starts loading `key` unless it is loaded or loading; the receiver resolves when it is.
    fn ensure(&mut self, key: Key, ctx: &mut Context<Self>) -> Loaded {
        let (tx, rx) = oneshot::channel();
        match self.state(&key) {
            Some(VersionState::Serving(served)) => {
                let _ = tx.send(Ok(served.clone()));
            }
            Some(VersionState::Unavailable { reason, .. }) => {
                let _ = tx.send(Err(ServeError::ModelUnavailable {
                    model: format!("{}:{}", key.0, key.1),
                    reason: reason.clone(),
                }));
            }
            Some(VersionState::Loading { .. }) => self.waiting.entry(key).or_default().push(tx),
            Some(VersionState::Cold { entry, .. }) => {
                let entry = entry.clone();
                self.waiting.entry(key.clone()).or_default().push(tx);
                self.start_loading(key, entry, ctx);
            }
            None => {
                let _ = tx.send(Err(ServeError::ModelNotFound(key.0.clone())));
            }
        }
        rx
    }

    /// Marks `key` loading and loads it in the background; [`Self::loaded`] takes the outcome.
    fn start_loading(&mut self, key: Key, entry: Arc<ModelEntry>, ctx: &mut Context<Self>) {
        self.set_state(
            &key,
            VersionState::Loading {
                entry: entry.clone(),
            },
        );
        self.publish();
        let started = Instant::now();
        tracing::info!(model = %key.0, version = %key.1, "loading on demand");
        let load = load_version(
            entry,
            self.sessions,
            self.published.clone(),
            self.budgets.clone(),
            self.watch,
        );
        ctx.spawn(load.into_actor(self).map(move |state, supervisor, _ctx| {
            // Only a load that ends serving is a cold start; a refusal was logged with its
            // reason by `load_version` (and by `loaded`, for one that does not fit).
            if let VersionState::Serving(_) = &state {
                let cold_start = started.elapsed();
                metrics::histogram!("streamserve_model_load_seconds", "model" => key.0.clone(), "version" => key.1.clone())
                    .record(cold_start.as_secs_f64());
                tracing::info!(model = %key.0, version = %key.1, cold_start_ms = cold_start.as_millis() as u64, "loaded");
            }
            supervisor.loaded(key, state);
        }));
    }

    /// Takes a load's outcome: publishes the version's new state and answers whoever waits for
    /// it. A version refused for lack of memory stays loadable (cold, with the reason).
    fn loaded(&mut self, key: Key, state: VersionState) {
        let answer = match &state {
            VersionState::Serving(served) => Ok(served.clone()),
            VersionState::Unavailable { reason, .. } => Err(ServeError::ModelUnavailable {
                model: format!("{}:{}", key.0, key.1),
                reason: reason.clone(),
            }),
            _ => Err(ServeError::ModelCold {
                model: key.0.clone(),
                version: key.1.clone(),
            }),
        };
        let state = match state {
            // Memory may free up later (an unload, a scale-down): stay loadable.
            VersionState::Unavailable { entry, reason } if reason.starts_with(DOES_NOT_FIT) => {
                tracing::warn!(model = %key.0, version = %key.1, %reason, "not loaded");
                VersionState::Cold {
                    entry,
                    last_error: Some(reason),
                }
            }
            other => other,
        };
        self.set_state(&key, state);
        self.publish();
        for waiter in self.waiting.remove(&key).unwrap_or_default() {
            let _ = waiter.send(answer.clone());
        }
    }

    /// Refuses (409) to unload a version that a rollout uses.
    fn not_in_rollout(&self, key: &Key) -> Result<(), ServeError> {
        if !self.deployments.involves(&key.0, &key.1) {
            return Ok(());
        }
        Err(ServeError::Conflict(format!(
            "{}:{} is part of a rollout in progress (a running canary, or a deploy or \
             rollback being prepared); wait for it or roll it back first",
            key.0, key.1
        )))
    }

    /// Takes a version out of service: new requests no longer reach it, its router finishes
    /// what it holds and stops, and the workers end. It loads again on demand.
    fn unload(&mut self, key: &Key, why: &str) -> bool {
        let Some(served) = self.served(key) else {
            return false;
        };
        let entry = self.entries[key].clone();
        self.set_state(
            key,
            VersionState::Cold {
                entry,
                last_error: None,
            },
        );
        self.publish();
        self.fleet.forget(key);
        served.drain();
        tracing::info!(model = %key.0, version = %key.1, why, "unloading");
        event(&key.0, "unloaded");
        true
    }

    /// Every 250 ms: unloads versions idle past their `idle_unload_secs` (unless a rollout
    /// uses them, or a request or stream holds them), sends the probes that are due, and ends
    /// the canary steps that are due.
    fn tick(&mut self, ctx: &mut Context<Self>) {
        let now_ms = crate::telemetry::uptime_ms();
        let idle: Vec<Key> = self
            .entries
            .iter()
            .filter_map(|(key, entry)| {
                let idle_after = entry.idle_unload?;
                let served = self.served(key)?;
                let idle_for =
                    now_ms.saturating_sub(served.health.last_used_ms.load(Ordering::Relaxed));
                let in_rollout = self.deployments.involves(&key.0, &key.1) || self.fleet.holds(key);
                // A request or stream that holds it (its body still arriving, a silent stream)
                // uses it, however long ago its router last saw a request.
                let in_use = served.holders() > 0;
                (idle_for >= idle_after.as_millis() as u64 && !in_rollout && !in_use)
                    .then(|| key.clone())
            })
            .collect();
        for key in idle {
            // Before its router can stop: a request resolved to it before this unload (its
            // body still arriving) or a stream that holds it is taken to the version loaded
            // again, as a request that comes after the unload loads it, not dropped.
            if let Some(served) = self.served(&key) {
                served.reload_with(ctx.address().recipient());
            }
            self.unload(&key, "idle");
        }
        self.run_due_probes(now_ms);
        self.judge_rollouts();
    }

    /// Sends each serving version's golden-input probe when it is due, through the version's
    /// own router, one at a time per version; the outcome lands in its model monitor.
    fn run_due_probes(&self, now_ms: u64) {
        for model in self.catalog.models.values() {
            for state in model.versions.values() {
                let VersionState::Serving(served) = state else {
                    continue;
                };
                if served.watch.take_due_probe(now_ms) {
                    let served = served.clone();
                    actix::spawn(async move {
                        let outcome = loading::run_probe(&served).await;
                        served.watch.record_probe(outcome);
                    });
                }
            }
        }
    }
}

/// Counts a deployment event of `model` (`streamserve_rollout_events_total`).
fn event(model: &str, event: &'static str) {
    metrics::counter!("streamserve_rollout_events_total", "model" => model.to_string(), "event" => event).increment(1);
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(Duration::from_millis(250), |supervisor, ctx| {
            supervisor.tick(ctx)
        });
    }
}

/// Take over a manifest: eager versions load now (the answer comes once they have), lazy ones
/// wait for their first request.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Start(pub Manifest);

impl Handler<Start> for Supervisor {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, Start(manifest): Start, ctx: &mut Self::Context) -> Self::Result {
        // Versions that declare a stream over other models load once those have: their
        // declaration is checked against them when they load (loading.rs).
        let mut loads = Vec::new();
        let mut after = Vec::new();
        for entry in manifest.models {
            let entry = Arc::new(entry);
            let key = (entry.name.clone(), entry.version.clone());
            self.entries.insert(key.clone(), entry.clone());
            crate::telemetry::register_rollout_series(&entry.name);
            self.set_state(
                &key,
                VersionState::Cold {
                    entry: entry.clone(),
                    last_error: None,
                },
            );
            if entry.lazy {
                continue;
            }
            let over_others = entry
                .stream
                .as_ref()
                .is_some_and(|decl| !declared_models(decl).is_empty());
            if over_others {
                after.push(key);
            } else {
                loads.push(self.ensure(key, ctx));
            }
        }
        for (name, model) in self.catalog.models.iter_mut() {
            let highest = |lazy: bool| {
                self.entries
                    .values()
                    .filter(|e| &e.name == name && e.lazy == lazy)
                    .map(|e| e.version.clone())
                    .max_by(|a, b| compare_versions(a, b))
            };
            model.manifest_default = highest(false).or_else(|| highest(true));
        }
        self.publish();
        Box::pin(join_all(loads).into_actor(self).then(|_, act, ctx| {
            let loads: Vec<_> = after.into_iter().map(|key| act.ensure(key, ctx)).collect();
            join_all(loads).into_actor(act).map(|_, _, _| ())
        }))
    }
}

/// Resolve a version for a request, loading it first if it is not loaded.
#[derive(Message)]
#[rtype(result = "Result<ServedModel, ServeError>")]
pub struct EnsureLoaded {
    pub name: String,
    pub version: Option<String>,
}

impl Handler<EnsureLoaded> for Supervisor {
    type Result = ResponseFuture<Result<ServedModel, ServeError>>;

    fn handle(&mut self, msg: EnsureLoaded, ctx: &mut Self::Context) -> Self::Result {
        match self.key(&msg.name, msg.version.as_deref()) {
            // Held for the request or stream that asked, as the catalog's handles are.
            Ok(key) => {
                let loaded = when_loaded(self.ensure(key, ctx));
                Box::pin(async move { loaded.await.map(|served| served.held()) })
            }
            Err(e) => Box::pin(async move { Err(e) }),
        }
    }
}

impl Handler<Reload> for Supervisor {
    type Result = ResponseFuture<Result<ServedModel, ServeError>>;

    fn handle(&mut self, msg: Reload, ctx: &mut Self::Context) -> Self::Result {
        self.handle(
            EnsureLoaded {
                name: msg.name,
                version: Some(msg.version),
            },
            ctx,
        )
    }
}

/// Unload a version now (admin).
#[derive(Message)]
#[rtype(result = "Result<serde_json::Value, ServeError>")]
pub struct Unload {
    pub name: String,
    pub version: Option<String>,
}

impl Handler<Unload> for Supervisor {
    type Result = Result<serde_json::Value, ServeError>;

    fn handle(&mut self, msg: Unload, _ctx: &mut Self::Context) -> Self::Result {
        let key = self.key(&msg.name, msg.version.as_deref())?;
        self.not_in_rollout(&key)?;
        let unloaded = self.unload(&key, "admin request");
        Ok(serde_json::json!({ "model": key.0, "version": key.1, "unloaded": unloaded }))
    }
}

/// Unload every loaded version of a model now (Triton's repository unload, which unloads the
/// model, not one version of it). Refused, unloading nothing, while any of its versions is
/// part of a rollout. Answers the versions it took out of service.
#[derive(Message)]
#[rtype(result = "Result<Vec<String>, ServeError>")]
pub struct UnloadAll {
    pub name: String,
}

impl Handler<UnloadAll> for Supervisor {
    type Result = Result<Vec<String>, ServeError>;

    fn handle(&mut self, msg: UnloadAll, _ctx: &mut Self::Context) -> Self::Result {
        let Some(model) = self.catalog.models.get(&msg.name) else {
            return Err(ServeError::ModelNotFound(msg.name));
        };
        let loaded: Vec<Key> = model
            .sorted_versions()
            .into_iter()
            .map(|version| (msg.name.clone(), version))
            .filter(|key| self.served(key).is_some())
            .collect();
        for key in &loaded {
            self.not_in_rollout(key)?;
        }
        Ok(loaded
            .into_iter()
            .filter(|key| self.unload(key, "admin request"))
            .map(|(_, version)| version)
            .collect())
    }
}
