//! Deployments: changing which version of a model takes its traffic, as the admin API asks.
//! [`Deploy`] checks the request, loads the new version (and smoke-tests it), then hands over
//! to its [`Strategy`], one file each: [`blue_green`] switches the default at once; [`canary`]
//! moves a growing share of traffic, step by step, judged by [`traffic`] against the stable
//! version (a rolling update is a canary judged on errors only, one replica's share a step).
//! [`Rollback`] puts the previous default back; [`Rollouts`] reports on them all.
//!
//! What deployments remember between messages is one value, [`Deployments`], so that the rest
//! of the supervisor asks it one question (is a version part of a rollout in progress?) and the
//! strategies own their state.
//!
//! One change of a model's default at a time: a deploy or rollback reserves its model from the
//! moment it is accepted until its answer (loading and smoke-testing take seconds, and another
//! deploy starting meanwhile would act on a default that is about to change), and a second one
//! is refused (409) while the reservation or a running canary holds the model.

mod blue_green;
mod canary;
pub mod traffic;

use std::collections::HashMap;

use actix::prelude::*;

use super::loading::smoke_test;
use super::{event, when_loaded, Supervisor};
use crate::actors::served::ServedModel;
use crate::error::ServeError;
use canary::CanaryRollout;

/// What deployments remember: the deploys and rollbacks being prepared, the running canaries
/// (and rolling updates), the default each model had before its last deployment (for
/// rollback), and why each model's last canary was rolled back.
#[derive(Default)]
pub(super) struct Deployments {
    pending: HashMap<String, Pending>,
    running: HashMap<String, CanaryRollout>,
    previous_default: HashMap<String, String>,
    last_rollback: HashMap<String, String>,
}

/// A model's reservation by a deploy or rollback that has not answered yet (its new version
/// loads, or is smoke-tested).
struct Pending {
    /// What holds it, for the refusal: "deployment" or "rollback".
    what: &'static str,
    /// The default when it was accepted, and the version it goes to: neither may be unloaded
    /// (idle or on request) before it answers.
    from: String,
    to: String,
}

impl Deployments {
    /// Whether `model:version` is part of a rollout in progress: the canary or the stable
    /// version of the model's running rollout, or either version of a deploy or rollback being
    /// prepared. Such a version is neither unloaded idle nor on request. (Another model's
    /// version of the same name is not held.)
    pub(super) fn involves(&self, model: &str, version: &str) -> bool {
        let running = self
            .running
            .get(model)
            .is_some_and(|r| r.version == version || r.stable == version);
        let pending = self
            .pending
            .get(model)
            .is_some_and(|p| p.from == version || p.to == version);
        running || pending
    }

    /// Reserves `model`, free by [`Self::check_free`], for a deploy or rollback (`what`) from
    /// its default `from` to `to`, until [`Self::release`].
    fn reserve(&mut self, model: &str, what: &'static str, from: &str, to: &str) {
        let pending = Pending {
            what,
            from: from.to_string(),
            to: to.to_string(),
        };
        let held = self.pending.insert(model.to_string(), pending);
        debug_assert!(held.is_none(), "{model} was reserved twice");
    }

    /// Refuses (409) while a deploy or rollback of `model` is being prepared.
    fn check_free(&self, model: &str) -> Result<(), ServeError> {
        match self.pending.get(model) {
            Some(holder) => Err(ServeError::Conflict(format!(
                "a {} of '{model}' is in progress; wait for its answer and try again",
                holder.what
            ))),
            None => Ok(()),
        }
    }

    /// Ends `model`'s reservation: its deploy or rollback has answered, whatever the answer.
    fn release(&mut self, model: &str) {
        self.pending.remove(model);
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
            // Answered, whatever the outcome: the model is free for the next deploy or rollback.
            supervisor.deployments.release(&key.0);
            let served = match ready.and_then(|_| supervisor.still_deployable(&key, &stable)) {
                Ok(served) => served,
                Err(e) => {
                    // Loaded for this deployment only: it goes again (unless something else
                    // made it the default meanwhile).
                    let is_default = supervisor.default_of(&key.0).ok() == Some(key.1.clone());
                    if was_cold && !is_default {
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
    /// Whether `msg` can start: the version exists, no other deploy or rollback of the model is
    /// being prepared or running, and a stepped rollout has somewhere to go. If so, reserves the
    /// model until the deploy answers, and returns the version's key and the current default.
    fn check_deploy(&mut self, msg: &Deploy) -> Result<(super::Key, String), ServeError> {
        let key = self.key(&msg.name, Some(&msg.version))?;
        let stable = self.default_of(&msg.name)?;
        if self.deployments.running.contains_key(&msg.name) {
            return Err(ServeError::Conflict(format!(
                "a canary of '{}' is running; wait for it or roll it back",
                msg.name
            )));
        }
        self.deployments.check_free(&msg.name)?;
        if stable == msg.version && msg.strategy != Strategy::BlueGreen {
            return Err(ServeError::Conflict(format!(
                "{}:{} is already the default",
                msg.name, msg.version
            )));
        }
        self.deployments
            .reserve(&msg.name, "deployment", &stable, &msg.version);
        Ok((key, stable))
    }

    /// Whether a deployment of `key` from `stable`, now loaded and smoke-tested, can still
    /// take over: the reservation keeps other deploys and rollbacks out, but not the fleet
    /// agent's routing, which may have changed the default or unloaded the version meanwhile.
    /// Returns the version as it serves now.
    fn still_deployable(&self, key: &super::Key, stable: &str) -> Result<ServedModel, ServeError> {
        let default = self.default_of(&key.0)?;
        if default != stable {
            return Err(ServeError::Conflict(format!(
                "the default of '{}' changed from {stable} to {default} while it was prepared",
                key.0
            )));
        }
        self.served(key).ok_or_else(|| {
            ServeError::Conflict(format!(
                "{}:{} stopped serving while it was prepared",
                key.0, key.1
            ))
        })
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
        if let Err(e) = self.deployments.check_free(&name) {
            return Box::pin(actix::fut::ready(Err(e)));
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
        // A rollback consumes the previous default at once, and puts it back if it fails. The
        // model is reserved until it answers, like a deployment's.
        let Some(previous) = self.deployments.previous_default.remove(&name) else {
            return Box::pin(actix::fut::ready(Err(ServeError::Conflict(format!(
                "'{name}' has no previous version to roll back to: no deployment changed its \
                 default since it started or since the last rollback"
            )))));
        };
        self.deployments
            .reserve(&name, "rollback", &current, &previous);
        let loading = when_loaded(self.ensure((name.clone(), previous.clone()), ctx));
        Box::pin(
            loading
                .into_actor(self)
                .map(move |loaded, supervisor, _ctx| {
                    supervisor.deployments.release(&name);
                    // As for a deployment: the fleet agent may have moved the default meanwhile.
                    let unchanged = supervisor.default_of(&name).ok() == Some(current.clone());
                    let loaded = loaded.and_then(|served| match unchanged {
                        true => Ok(served),
                        false => Err(ServeError::Conflict(format!(
                            "the default of '{name}' changed from {current} while the rollback \
                             was prepared; nothing rolled back"
                        ))),
                    });
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
