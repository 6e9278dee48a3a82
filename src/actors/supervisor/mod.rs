//! The supervisor: starts every model version of the manifest (verifying its sha256, loading a
//! worker per replica, starting its router on an arbiter of its own), publishes the result to
//! the [`Registry`], and restarts workers that die (after the wait that
//! [`restart_policy`](super::restart_policy) decides).
//!
//! A model that cannot be served (hash mismatch, file missing, GPU unusable) is refused with a
//! clear log line and listed as unavailable; every other model keeps serving.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::future::join_all;

use tokio::sync::oneshot;

use super::budget::{replica_memory_mb, Budgets};
use super::faults::FaultQueue;
use super::health::ModelHealth;
use super::registry::{Canary, Catalog, Registry, VersionState};
use super::router::{self, FallbackLookup, RouterSetup};
use super::served::{InferOptions, ServedModel};
use super::worker::{WorkerHandle, WorkerRecipe, WorkerReport};
use crate::error::ServeError;
use crate::manifest::{
    compare_versions, verify_sha256, BatchAxis, Manifest, ModelEntry, StreamKind,
};
use crate::model::ModelInfo;
use crate::runtime::{Sessions, TensorSpec};
use crate::stream::vad::VadInterface;

/// The supervisor actor: the one writer of the model catalog. It loads versions (at startup,
/// or on the first request for `load = "lazy"`), unloads idle ones (`idle_unload_secs`, scale
/// to zero), and runs deployments: blue/green (load beside, smoke-test, switch atomically,
/// drain the old) and canary (a growing share of traffic, judged against the stable version,
/// promoted or rolled back automatically).
pub struct Supervisor {
    sessions: Sessions,
    registry: Arc<Registry>,
    budgets: Arc<Budgets>,
    catalog: Catalog,
    entries: HashMap<Key, Arc<ModelEntry>>,
    waiting: HashMap<Key, Vec<oneshot::Sender<Result<ServedModel, ServeError>>>>,
    /// The default each model had before its last deployment, for rollback.
    previous_default: HashMap<String, String>,
    rollouts: HashMap<String, CanaryRollout>,
    /// Why each model's last canary was rolled back.
    last_rollback: HashMap<String, String>,
}

type Key = (String, String);

/// Traffic counters of a version at some moment, to judge a canary step by its deltas.
#[derive(Clone, Copy, Default)]
struct Traffic {
    requests: u64,
    errors: u64,
    latency_us: u64,
}

impl Traffic {
    fn of(health: &ModelHealth) -> Traffic {
        Traffic {
            requests: health.requests.load(Ordering::Relaxed),
            errors: health.errors.load(Ordering::Relaxed),
            latency_us: health.latency_us.load(Ordering::Relaxed),
        }
    }

    fn since(self, base: Traffic) -> Traffic {
        Traffic {
            requests: self.requests - base.requests,
            errors: self.errors - base.errors,
            latency_us: self.latency_us - base.latency_us,
        }
    }

    fn error_rate(self) -> f64 {
        self.errors as f64 / self.requests.max(1) as f64
    }

    fn mean_latency_us(self) -> f64 {
        self.latency_us as f64 / self.requests.max(1) as f64
    }
}

struct CanaryRollout {
    /// Canaries are also judged on latency; rolling updates only on errors.
    judge_latency: bool,
    version: String,
    stable: String,
    steps: Vec<u32>,
    step: usize,
    step_secs: u64,
    step_started: Instant,
    canary_base: Traffic,
    stable_base: Traffic,
}

impl Supervisor {
    pub fn new(sessions: Sessions, registry: Arc<Registry>, budgets: Arc<Budgets>) -> Supervisor {
        Supervisor {
            sessions,
            registry,
            budgets,
            catalog: Catalog::default(),
            entries: HashMap::new(),
            waiting: HashMap::new(),
            previous_default: HashMap::new(),
            rollouts: HashMap::new(),
            last_rollback: HashMap::new(),
        }
    }

    fn publish(&self) {
        self.registry.publish(self.catalog.clone());
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
    fn ensure(
        &mut self,
        key: Key,
        ctx: &mut Context<Self>,
    ) -> oneshot::Receiver<Result<ServedModel, ServeError>> {
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
                self.set_state(
                    &key,
                    VersionState::Loading {
                        entry: entry.clone(),
                    },
                );
                self.publish();
                self.waiting.entry(key.clone()).or_default().push(tx);
                let started = Instant::now();
                tracing::info!(model = %key.0, version = %key.1, "loading on demand");
                ctx.spawn(load_version(entry, self.sessions, self.registry.clone(), self.budgets.clone()).into_actor(self).map(
                    move |state, supervisor, _ctx| {
                        let cold_start = started.elapsed();
                        metrics::histogram!("streamserve_model_load_seconds", "model" => key.0.clone(), "version" => key.1.clone())
                            .record(cold_start.as_secs_f64());
                        tracing::info!(model = %key.0, version = %key.1, cold_start_ms = cold_start.as_millis() as u64, "loaded");
                        supervisor.loaded(key, state);
                    },
                ));
            }
            None => {
                let _ = tx.send(Err(ServeError::ModelNotFound(key.0.clone())));
            }
        }
        rx
    }

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
        served.drain();
        tracing::info!(model = %key.0, version = %key.1, why, "unloading");
        event(&key.0, "unloaded");
        true
    }

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
                let in_rollout = self
                    .rollouts
                    .values()
                    .any(|r| r.version == key.1 || r.stable == key.1);
                (idle_for >= idle_after.as_millis() as u64 && !in_rollout).then(|| key.clone())
            })
            .collect();
        for key in idle {
            self.unload(&key, "idle");
        }
        let names: Vec<String> = self.rollouts.keys().cloned().collect();
        for name in names {
            self.judge_canary(&name, ctx);
        }
    }

    /// Ends a canary step: worse than stable rolls back, otherwise the share grows, and after
    /// the last step the canary becomes the default.
    fn judge_canary(&mut self, name: &str, _ctx: &mut Context<Self>) {
        let Some(rollout) = self.rollouts.get(name) else {
            return;
        };
        if rollout.step_started.elapsed() < Duration::from_secs(rollout.step_secs) {
            return;
        }
        let (Some(canary), Some(stable)) = (
            self.served(&(name.to_string(), rollout.version.clone())),
            self.served(&(name.to_string(), rollout.stable.clone())),
        ) else {
            self.abort_canary(name, "a version of the rollout is no longer serving");
            return;
        };
        let c = Traffic::of(&canary.health).since(rollout.canary_base);
        let s = Traffic::of(&stable.health).since(rollout.stable_base);
        let worse_errors = c.error_rate() > s.error_rate() + 0.05;
        let worse_latency = rollout.judge_latency
            && s.requests > 0
            && c.mean_latency_us() > 2.0 * s.mean_latency_us() + 5000.0;
        if c.requests >= 5 && (worse_errors || worse_latency) {
            let reason = format!(
                "canary worse than stable: errors {:.1}% vs {:.1}%, mean latency {:.1} ms vs {:.1} ms",
                100.0 * c.error_rate(),
                100.0 * s.error_rate(),
                c.mean_latency_us() / 1000.0,
                s.mean_latency_us() / 1000.0
            );
            self.abort_canary(name, &reason);
            return;
        }
        let rollout = self.rollouts.get_mut(name).expect("checked above");
        rollout.step += 1;
        if rollout.step >= rollout.steps.len() {
            let rollout = self.rollouts.remove(name).expect("checked above");
            let model = self.catalog.models.get_mut(name).expect("model exists");
            model.canary = None;
            model.default_override = Some(rollout.version.clone());
            self.previous_default
                .insert(name.to_string(), rollout.stable.clone());
            self.publish();
            tracing::info!(model = name, version = %rollout.version, "canary promoted");
            event(name, "promoted");
            self.unload(
                &(name.to_string(), rollout.stable),
                "replaced by the promoted canary",
            );
            return;
        }
        rollout.step_started = Instant::now();
        rollout.canary_base = Traffic::of(&canary.health);
        rollout.stable_base = Traffic::of(&stable.health);
        let percent = rollout.steps[rollout.step];
        let version = rollout.version.clone();
        if let Some(model) = self.catalog.models.get_mut(name) {
            model.canary = Some(Canary { version, percent });
        }
        self.publish();
        tracing::info!(model = name, percent, "canary step");
        event(name, "canary_step");
    }

    fn abort_canary(&mut self, name: &str, reason: &str) {
        let Some(rollout) = self.rollouts.remove(name) else {
            return;
        };
        if let Some(model) = self.catalog.models.get_mut(name) {
            model.canary = None;
        }
        self.publish();
        tracing::warn!(model = name, version = %rollout.version, reason, "canary rolled back");
        event(name, "rolled_back");
        self.last_rollback
            .insert(name.to_string(), reason.to_string());
        self.unload(&(name.to_string(), rollout.version), "canary rolled back");
    }
}

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
        let mut loads = Vec::new();
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
            if !entry.lazy {
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
        Box::pin(
            async move {
                join_all(loads).await;
            }
            .into_actor(self),
        )
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
        let rx = match self.key(&msg.name, msg.version.as_deref()) {
            Ok(key) => self.ensure(key, ctx),
            Err(e) => return Box::pin(async move { Err(e) }),
        };
        Box::pin(async move { rx.await.unwrap_or_else(|_| Err(ServeError::ShuttingDown)) })
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
        if self
            .rollouts
            .values()
            .any(|r| r.version == key.1 || r.stable == key.1)
        {
            return Err(ServeError::Conflict(format!(
                "{}:{} is part of a running canary; roll it back first",
                key.0, key.1
            )));
        }
        let unloaded = self.unload(&key, "admin request");
        Ok(serde_json::json!({ "model": key.0, "version": key.1, "unloaded": unloaded }))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    BlueGreen,
    Canary,
    /// Traffic moves to the new version one replica's share at a time (100/N % per step for
    /// its N replicas), each step gated on the new version's error rate only.
    Rolling,
}

/// Make `version` the default of `name` (admin).
#[derive(Message)]
#[rtype(result = "Result<serde_json::Value, ServeError>")]
pub struct Deploy {
    pub name: String,
    pub version: String,
    pub strategy: Strategy,
    /// Canary traffic shares, in percent: strictly increasing, ending at 100 (the admin API
    /// checks them, and `step_secs`, before sending this).
    pub steps: Vec<u32>,
    pub step_secs: u64,
    /// Run one request of zeros through the new version before it takes traffic.
    pub smoke_test: bool,
}

impl Handler<Deploy> for Supervisor {
    type Result = ResponseActFuture<Self, Result<serde_json::Value, ServeError>>;

    fn handle(&mut self, msg: Deploy, ctx: &mut Self::Context) -> Self::Result {
        let prepared = (|| {
            let key = self.key(&msg.name, Some(&msg.version))?;
            let stable = self.default_of(&msg.name)?;
            if self.rollouts.contains_key(&msg.name) {
                return Err(ServeError::Conflict(format!(
                    "a canary of '{}' is running; wait for it or roll it back",
                    msg.name
                )));
            }
            if stable == msg.version && msg.strategy != Strategy::BlueGreen {
                return Err(ServeError::Conflict(format!(
                    "{}:{} is already the default",
                    msg.name, msg.version
                )));
            }
            // Whether the new version fits beside the running one is the memory budget's call,
            // made when it loads (a refusal changes nothing).
            let was_cold = self.served(&key).is_none();
            Ok((key, stable, was_cold))
        })();
        let (key, stable, was_cold) = match prepared {
            Ok(p) => p,
            Err(e) => return Box::pin(actix::fut::ready(Err(e))),
        };
        event(&key.0, "deploy_started");
        let loading = self.ensure(key.clone(), ctx);
        let smoke = msg.smoke_test;
        Box::pin(
            async move {
                let served = loading.await.unwrap_or_else(|_| Err(ServeError::ShuttingDown))?;
                if smoke {
                    smoke_test(&served).await?;
                }
                Ok::<ServedModel, ServeError>(served)
            }
            .into_actor(self)
            .map(move |loaded, supervisor, _ctx| {
                let served = match loaded {
                    Ok(served) => served,
                    Err(e) => {
                        if was_cold {
                            supervisor.unload(&key, "deployment failed");
                        }
                        event(&key.0, "deploy_failed");
                        return Err(ServeError::Conflict(format!("deployment of {}:{} failed, nothing changed: {e}", key.0, key.1)));
                    }
                };
                let (name, version) = key.clone();
                match msg.strategy {
                    Strategy::BlueGreen => {
                        let model = supervisor.catalog.models.get_mut(&name).expect("model exists");
                        model.default_override = Some(version.clone());
                        supervisor.previous_default.insert(name.clone(), stable.clone());
                        supervisor.publish();
                        event(&name, "switched");
                        tracing::info!(model = %name, from = %stable, to = %version, "blue/green switch");
                        if stable != version {
                            supervisor.unload(&(name.clone(), stable.clone()), "replaced by blue/green switch");
                        }
                        Ok(serde_json::json!({"model": name, "strategy": "blue_green", "from": stable, "to": version, "device": served.info.device.to_string()}))
                    }
                    Strategy::Canary | Strategy::Rolling => {
                        let steps: Vec<u32> = if msg.strategy == Strategy::Rolling {
                            let n = served.info.replicas.max(2) as u32;
                            (1..=n).map(|k| k * 100 / n).collect()
                        } else {
                            msg.steps.clone()
                        };
                        let strategy = if msg.strategy == Strategy::Rolling { "rolling" } else { "canary" };
                        let stable_health = supervisor.served(&(name.clone(), stable.clone())).map(|s| Traffic::of(&s.health)).unwrap_or_default();
                        supervisor.rollouts.insert(name.clone(), CanaryRollout {
                            judge_latency: msg.strategy == Strategy::Canary,
                            version: version.clone(),
                            stable: stable.clone(),
                            steps: steps.clone(),
                            step: 0,
                            step_secs: msg.step_secs,
                            step_started: Instant::now(),
                            canary_base: Traffic::of(&served.health),
                            stable_base: stable_health,
                        });
                        let model = supervisor.catalog.models.get_mut(&name).expect("model exists");
                        model.canary = Some(Canary { version: version.clone(), percent: steps[0] });
                        supervisor.last_rollback.remove(&name);
                        supervisor.publish();
                        event(&name, "canary_started");
                        Ok(serde_json::json!({"model": name, "strategy": strategy, "stable": stable, "canary": version, "steps": steps, "step_secs": msg.step_secs}))
                    }
                }
            }),
        )
    }
}

/// Put the previous default back (admin): aborts a running canary, or undoes the last switch.
#[derive(Message)]
#[rtype(result = "Result<serde_json::Value, ServeError>")]
pub struct Rollback {
    pub name: String,
}

impl Handler<Rollback> for Supervisor {
    type Result = ResponseActFuture<Self, Result<serde_json::Value, ServeError>>;

    fn handle(&mut self, msg: Rollback, ctx: &mut Self::Context) -> Self::Result {
        let name = msg.name;
        if !self.catalog.models.contains_key(&name) {
            return Box::pin(actix::fut::ready(Err(ServeError::ModelNotFound(name))));
        }
        if self.rollouts.contains_key(&name) {
            self.abort_canary(&name, "rolled back by an operator");
            return Box::pin(actix::fut::ready(Ok(
                serde_json::json!({"model": name, "rolled_back": "canary"}),
            )));
        }
        let current = match self.default_of(&name) {
            Ok(v) => v,
            Err(e) => return Box::pin(actix::fut::ready(Err(e))),
        };
        // A rollback consumes the previous default, at once (a second rollback, even one
        // sent while this one loads, has nothing to go back to rather than undoing this one);
        // it is put back if this one fails.
        let Some(previous) = self.previous_default.remove(&name) else {
            return Box::pin(actix::fut::ready(Err(ServeError::Conflict(format!(
                "'{name}' has no previous version to roll back to: no deployment changed its \
                 default since it started or since the last rollback"
            )))));
        };
        let loading = self.ensure((name.clone(), previous.clone()), ctx);
        Box::pin(
            async move {
                loading
                    .await
                    .unwrap_or_else(|_| Err(ServeError::ShuttingDown))
            }
            .into_actor(self)
            .map(move |loaded, supervisor, _ctx| {
                if let Err(e) = loaded {
                    supervisor.previous_default.entry(name).or_insert(previous);
                    return Err(e);
                }
                let model = supervisor
                    .catalog
                    .models
                    .get_mut(&name)
                    .expect("model exists");
                model.default_override = Some(previous.clone());
                supervisor.publish();
                event(&name, "rolled_back");
                if current != previous {
                    supervisor.unload(&(name.clone(), current.clone()), "rolled back");
                }
                Ok(serde_json::json!({"model": name, "from": current, "to": previous}))
            }),
        )
    }
}

/// The state of rollouts, for the admin API.
#[derive(Message)]
#[rtype(result = "serde_json::Value")]
pub struct Rollouts;

impl Handler<Rollouts> for Supervisor {
    type Result = MessageResult<Rollouts>;

    fn handle(&mut self, _: Rollouts, _ctx: &mut Self::Context) -> Self::Result {
        let running: serde_json::Map<String, serde_json::Value> = self
            .rollouts
            .iter()
            .map(|(name, r)| {
                (name.clone(), serde_json::json!({"canary": r.version, "stable": r.stable, "percent": r.steps[r.step], "step": r.step, "steps": r.steps}))
            })
            .collect();
        MessageResult(
            serde_json::json!({"running": running, "last_rollback": self.last_rollback, "previous_default": self.previous_default}),
        )
    }
}

/// One request of zeros (dynamic dimensions 1; declared shapes and values where the manifest
/// declares them) through a freshly loaded version.
async fn smoke_test(served: &ServedModel) -> Result<(), ServeError> {
    let info = &served.info;
    let request = info.validate(info.example_inputs(), None)?;
    served.infer(request, InferOptions::now()).await?;
    Ok(())
}

/// How a refusal for lack of memory starts: such a version stays loadable later.
const DOES_NOT_FIT: &str = "does not fit";

/// Loads one model version: verifies its sha256, starts a worker per replica (each loads its
/// own session), checks the interface against the manifest, and starts its router on an
/// arbiter of its own. A version that cannot be served comes back `Unavailable` with the reason.
pub async fn load_version(
    entry: Arc<ModelEntry>,
    sessions: Sessions,
    registry: Arc<Registry>,
    budgets: Arc<Budgets>,
) -> VersionState {
    let started = Instant::now();
    let refuse = |reason: String| {
        tracing::error!(model = %entry.name, version = %entry.version, %reason, "model refused");
        VersionState::Unavailable {
            entry: entry.clone(),
            reason,
        }
    };
    if let Err(reason) = verify_sha256(&entry) {
        return refuse(reason);
    }
    let (reports_tx, reports_rx) = flume::unbounded::<WorkerReport>();
    let recipe = WorkerRecipe {
        entry: entry.clone(),
        sessions,
        reports: reports_tx,
    };
    let faults: Vec<FaultQueue> = (0..entry.replicas).map(|_| FaultQueue::default()).collect();
    let loading =
        (0..entry.replicas).map(|replica| recipe.spawn(replica, 0, faults[replica].clone()));
    let mut workers: Vec<WorkerHandle> = Vec::new();
    let mut interface = None;
    let mut failures = Vec::new();
    for result in join_all(loading).await {
        match result {
            Ok(Ok(started)) => {
                interface.get_or_insert((started.inputs, started.outputs));
                workers.push(started.handle);
            }
            Ok(Err(reason)) => failures.push(reason),
            Err(_) => failures.push("worker thread ended while loading".to_string()),
        }
    }
    let Some((mut inputs, outputs)) = interface else {
        return refuse(
            failures
                .first()
                .cloned()
                .unwrap_or_else(|| "no replica loaded".into()),
        );
    };
    if !failures.is_empty() {
        tracing::warn!(model = %entry.name, version = %entry.version, failed = failures.len(), reason = %failures[0], "some replicas failed to load");
    }
    let (input_axes, output_axes) = match batch_axes(&entry, &inputs, &outputs) {
        Ok(axes) => axes,
        Err(reason) => return refuse(reason),
    };
    let input_rules = match crate::rules::resolve(&entry, &mut inputs, &input_axes) {
        Ok(rules) => rules,
        Err(reason) => return refuse(reason),
    };
    let device = workers[0].device;
    let info = Arc::new(ModelInfo {
        name: entry.name.clone(),
        version: entry.version.clone(),
        inputs,
        input_rules,
        allow_non_finite: entry.allow_non_finite,
        outputs,
        batching: entry.batching,
        input_axes,
        output_axes,
        stream: entry.stream,
        device,
        replicas: entry.replicas,
        max_queue: entry.max_queue,
        fallback: entry.fallback.clone(),
        sha256: entry.sha256.clone(),
        description: entry.description.clone(),
        source: entry.source.clone(),
        resources: {
            let file = std::fs::metadata(&entry.file).map(|m| m.len()).unwrap_or(0);
            let estimate = (file * 2 * entry.replicas as u64).div_ceil(1 << 20);
            let on_gpu = matches!(device, crate::manifest::Device::Cuda(_));
            crate::model::Resources {
                cpu_threads: entry.replicas * entry.intra_threads,
                ram_mb: if on_gpu { 0 } else { estimate },
                vram_mb: if on_gpu { estimate } else { 0 },
                model_file_bytes: file,
            }
        },
    });
    if info.stream == Some(StreamKind::Vad) {
        if let Err(reason) = VadInterface::resolve(&info) {
            return refuse(format!("stream = \"vad\", but {reason}"));
        }
    }
    // Ready as soon as this returns: the router only starts (and publishes) on its own thread.
    let health = Arc::new(ModelHealth::new(workers.len(), entry.replicas));
    let memory_mb = replica_memory_mb(info.resources.model_file_bytes) * workers.len() as u64;
    if let Err(reason) = budgets.memory.try_take(device, memory_mb) {
        return refuse(format!("{DOES_NOT_FIT}: {reason}"));
    }
    let threads = entry.replicas * entry.intra_threads;
    if !budgets.cpu.take(threads) {
        tracing::info!(model = %entry.name, version = %entry.version, threads, budget = budgets.cpu.total,
            "replicas now use more threads than the CPU budget; no model can scale up until some are released");
    }
    let fallback: FallbackLookup = Arc::new(move |name| {
        let served = registry.snapshot().resolve(name, None).ok()?;
        served.health.ready().then_some(served.router)
    });
    let router = router::start(
        RouterSetup {
            info: info.clone(),
            recipe,
            budgets,
            fallback,
            workers,
            faults,
            health: health.clone(),
        },
        reports_rx,
    );
    tracing::info!(
        model = %entry.name, version = %entry.version, device = %device, replicas = entry.replicas,
        max_batch_size = entry.batching.max_batch_size, start_ms = started.elapsed().as_millis() as u64,
        "model serving"
    );
    VersionState::Serving(ServedModel {
        info,
        router,
        health,
    })
}

/// Resolves each tensor's batch axis (0 unless the manifest's `batch_axes` says otherwise) and
/// checks that the model can really be stacked that way.
fn batch_axes(
    entry: &ModelEntry,
    inputs: &[TensorSpec],
    outputs: &[TensorSpec],
) -> Result<(Vec<BatchAxis>, Vec<BatchAxis>), String> {
    let batched = entry.batching.max_batch_size > 0;
    for name in entry.batch_axes.keys() {
        if !inputs.iter().chain(outputs).any(|s| &s.name == name) {
            return Err(format!(
                "batch_axes names '{name}', which is neither an input nor an output"
            ));
        }
    }
    let resolve = |specs: &[TensorSpec]| -> Result<Vec<BatchAxis>, String> {
        specs
            .iter()
            .map(|spec| {
                let axis = entry.batch_axes.get(&spec.name).copied().unwrap_or(BatchAxis::Axis(0));
                if let (true, BatchAxis::Axis(k)) = (batched, axis) {
                    if spec.shape.get(k).copied() != Some(-1) {
                        return Err(format!(
                            "max_batch_size is {} but '{}' has shape {:?}, without a dynamic axis {k} to batch on; \
                             name its batch axis in batch_axes, or set max_batch_size = 0",
                            entry.batching.max_batch_size, spec.name, spec.shape
                        ));
                    }
                }
                Ok(axis)
            })
            .collect()
    };
    let input_axes = resolve(inputs)?;
    let output_axes = resolve(outputs)?;
    if batched && !input_axes.iter().any(|a| matches!(a, BatchAxis::Axis(_))) {
        return Err(
            "max_batch_size is set but every input is shared; no input carries the batch".into(),
        );
    }
    Ok((input_axes, output_axes))
}
