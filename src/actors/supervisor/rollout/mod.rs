//! Deployments: changing which version of a model takes its traffic, as the admin API asks.
//! [`Deploy`] checks the request, loads the new version (and smoke-tests it), then hands over
//! to its [`Strategy`], one file each: [`blue_green`] switches the default at once; [`canary`]
//! moves a growing share of traffic, step by step, judged by [`traffic`] against the stable
//! version (a rolling update is a canary judged on errors only, one replica's share a step).
//! [`Rollback`] puts the previous default back; [`Rollouts`] reports on them all.
//!
//! What deployments remember between messages is one value, [`Deployments`], so that the rest
//! of the supervisor asks it one question (is a version part of a running rollout?) and the
//! strategies own their state.

mod blue_green;
mod canary;
pub mod traffic;

use std::collections::HashMap;

use actix::prelude::*;

use super::loading::smoke_test;
use super::{event, when_loaded, Supervisor};
use crate::error::ServeError;
use canary::CanaryRollout;

/// What deployments remember: the running canaries (and rolling updates), the default each
/// model had before its last deployment (for rollback), and why each model's last canary was
/// rolled back.
#[derive(Default)]
pub(super) struct Deployments {
    running: HashMap<String, CanaryRollout>,
    previous_default: HashMap<String, String>,
    last_rollback: HashMap<String, String>,
}

impl Deployments {
    /// Whether `model:version` is the canary or the stable version of the model's running
    /// rollout: such a version is neither unloaded idle nor on request. (Another model's
    /// version of the same name is not held.)
    pub(super) fn involves(&self, model: &str, version: &str) -> bool {
        self.running
            .get(model)
            .is_some_and(|r| r.version == version || r.stable == version)
    }
}

impl Supervisor {
    /// Ends every canary step that is due (called on the supervisor's tick).
    pub(super) fn judge_rollouts(&mut self) {
        let names: Vec<String> = self.deployments.running.keys().cloned().collect();
        for name in names {
            canary::judge(self, &name);
        }
    }
}

/// The strategies, as the registry names them; on one machine a rolling update moves traffic
/// to the new version one replica's share at a time (100/N % per step for its N replicas),
/// each step gated on the new version's error rate only.
pub use crate::registry::records::Strategy;

/// Stops `name`'s running canary or rolling update, if any (traffic back to its stable version).
pub(in crate::actors::supervisor) fn abort_running(
    supervisor: &mut Supervisor,
    name: &str,
    reason: &str,
) {
    canary::abort(supervisor, name, reason);
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
        let (key, stable) = match self.check_deploy(&msg) {
            Ok(checked) => checked,
            Err(e) => return Box::pin(actix::fut::ready(Err(e))),
        };
        // Whether the new version fits beside the running one is the memory budget's call,
        // made when it loads (a refusal changes nothing).
        let was_cold = self.served(&key).is_none();
        event(&key.0, "deploy_started");
        let loading = when_loaded(self.ensure(key.clone(), ctx));
        let smoke = msg.smoke_test;
        let ready = async move {
            let served = loading.await?;
            if smoke {
                smoke_test(&served).await?;
            }
            Ok::<_, ServeError>(served)
        };
        Box::pin(ready.into_actor(self).map(move |ready, supervisor, _ctx| {
            let served = match ready {
                Ok(served) => served,
                Err(e) => {
                    if was_cold {
                        supervisor.unload(&key, "deployment failed");
                    }
                    event(&key.0, "deploy_failed");
                    return Err(ServeError::Conflict(format!(
                        "deployment of {}:{} failed, nothing changed: {e}",
                        key.0, key.1
                    )));
                }
            };
            Ok(match msg.strategy {
                Strategy::BlueGreen => blue_green::switch(supervisor, key, stable, &served),
                Strategy::Canary | Strategy::Rolling => {
                    canary::start(supervisor, key, stable, &served, &msg)
                }
            })
        }))
    }
}

impl Supervisor {
    /// Whether `msg` can start: the version exists, no rollout of the model is running, and a
    /// stepped rollout has somewhere to go. Returns the version's key and the current default.
    fn check_deploy(&self, msg: &Deploy) -> Result<(super::Key, String), ServeError> {
        let key = self.key(&msg.name, Some(&msg.version))?;
        let stable = self.default_of(&msg.name)?;
        if self.deployments.running.contains_key(&msg.name) {
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
        Ok((key, stable))
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
        if self.deployments.running.contains_key(&name) {
            canary::abort(self, &name, "rolled back by an operator");
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
        let Some(previous) = self.deployments.previous_default.remove(&name) else {
            return Box::pin(actix::fut::ready(Err(ServeError::Conflict(format!(
                "'{name}' has no previous version to roll back to: no deployment changed its \
                 default since it started or since the last rollback"
            )))));
        };
        let loading = when_loaded(self.ensure((name.clone(), previous.clone()), ctx));
        Box::pin(
            loading
                .into_actor(self)
                .map(move |loaded, supervisor, _ctx| {
                    if let Err(e) = loaded {
                        supervisor
                            .deployments
                            .previous_default
                            .entry(name)
                            .or_insert(previous);
                        return Err(e);
                    }
                    supervisor.set_default(&name, &previous);
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
        let deployments = &self.deployments;
        let running: serde_json::Map<String, serde_json::Value> = deployments
            .running
            .iter()
            .map(|(name, rollout)| (name.clone(), rollout.status()))
            .collect();
        MessageResult(serde_json::json!({
            "running": running,
            "last_rollback": deployments.last_rollback,
            "previous_default": deployments.previous_default,
        }))
    }
}
