//! What the fleet agent (`actors/fleet/`) asks of the supervisor when this instance follows a
//! model registry: [`AddVersions`] lists versions it took from the registry (cold, loadable
//! like the manifest's), and [`Route`] makes one model's routing what the desired state says
//! (its default, a canary's share, versions to load ahead), answering how ready each version
//! is, so that the agent can report it to the fleet.
//!
//! A version is routed only as the registry's file: the route carries each version's sha256
//! from its record, and a version listed here with another file (a bundled one of the same
//! name and version) is [`Readiness::Failed`], never routed under the registry's label; a
//! version whose record the agent has not read yet is [`Readiness::Unknown`].
//!
//! Routing changes make before they break: a new default or canary takes traffic only once it
//! is serving (and has passed its smoke test, when asked); until then the old routing stays,
//! and versions the registry no longer wants are unloaded only after that.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use actix::prelude::*;

use super::loading::smoke_test;
use super::{Key, Supervisor};
use crate::actors::catalog::{Canary, VersionState};
use crate::manifest::ModelEntry;

/// What the supervisor remembers of the registry's wishes: per model, the versions its last
/// routing uses (held: never unloaded idle), and how each version's smoke test went.
#[derive(Default)]
pub(super) struct FleetRouting {
    held: HashMap<String, BTreeSet<String>>,
    smoke: HashMap<Key, Smoke>,
}

#[derive(Clone, Debug)]
enum Smoke {
    Running,
    Passed,
    Failed(String),
}

impl FleetRouting {
    /// Whether the registry's routing uses `key` (so it is not unloaded idle).
    pub(super) fn holds(&self, key: &Key) -> bool {
        self.held.get(&key.0).is_some_and(|v| v.contains(&key.1))
    }

    /// A version left service: its next load is smoke-tested again.
    pub(super) fn forget(&mut self, key: &Key) {
        self.smoke.remove(key);
    }
}

/// Add versions taken from the registry. Each answer is `Err` with the reason when that
/// version cannot be listed (the same name and version already listed with another file).
#[derive(Message)]
#[rtype(result = "Vec<Result<(), String>>")]
pub struct AddVersions(pub Vec<ModelEntry>);

impl Handler<AddVersions> for Supervisor {
    type Result = MessageResult<AddVersions>;

    fn handle(
        &mut self,
        AddVersions(entries): AddVersions,
        _ctx: &mut Self::Context,
    ) -> Self::Result {
        let mut answers = Vec::with_capacity(entries.len());
        let mut added = false;
        for entry in entries {
            let key = (entry.name.clone(), entry.version.clone());
            if let Some(known) = self.entries.get(&key) {
                answers.push(if known.sha256 == entry.sha256 {
                    Ok(())
                } else {
                    Err(format!(
                        "{}:{} is already listed with sha256 {} (the bundled manifest?), the \
                         registry's has {}; versions are immutable, so it is not replaced",
                        key.0, key.1, known.sha256, entry.sha256
                    ))
                });
                continue;
            }
            crate::telemetry::register_rollout_series(&entry.name);
            tracing::info!(model = %key.0, version = %key.1, "version added from the registry");
            let entry = Arc::new(entry);
            self.entries.insert(key.clone(), entry.clone());
            self.set_state(
                &key,
                VersionState::Cold {
                    entry,
                    last_error: None,
                },
            );
            added = true;
            answers.push(Ok(()));
        }
        if added {
            self.publish();
        }
        MessageResult(answers)
    }
}

/// How one model is to be routed (see `registry::fleet::Plan`).
#[derive(Message, Clone, Debug, Default, PartialEq, Eq)]
#[rtype(result = "RouteOutcome")]
pub struct Route {
    pub name: String,
    pub default: Option<String>,
    pub canary: Option<Canary>,
    /// Versions to load (and smoke-test) before they take traffic.
    pub prepare: Vec<String>,
    pub smoke_test: bool,
    /// Each version's sha256 as its registry record says (versions without one are not
    /// known to be the registry's yet).
    pub sha256: BTreeMap<String, String>,
}

impl Route {
    fn versions(&self) -> BTreeSet<String> {
        let mut versions: BTreeSet<String> = self.default.iter().cloned().collect();
        versions.extend(self.canary.iter().map(|c| c.version.clone()));
        versions.extend(self.prepare.iter().cloned());
        versions
    }
}

/// How ready a version of a [`Route`] is on this instance.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Readiness {
    /// Serving (and its smoke test passed, when one was asked for).
    Ready,
    Loading,
    Failed(String),
    /// Not listed here (not downloaded yet).
    Unknown,
}

/// The routing after a [`Route`]: each of its versions' readiness, and the default and canary
/// in force (the old ones while the new are not ready).
#[derive(Clone, Debug, Default)]
pub struct RouteOutcome {
    pub versions: BTreeMap<String, Readiness>,
    pub default: Option<String>,
    pub canary: Option<Canary>,
}

impl Handler<Route> for Supervisor {
    type Result = MessageResult<Route>;

    fn handle(&mut self, route: Route, ctx: &mut Self::Context) -> Self::Result {
        let name = route.name.clone();
        super::rollout::abort_running(self, &name, "the registry's desired state took over");
        let wanted = route.versions();
        // The first time, every version serving now is the registry's to keep or let go.
        let before = match self.fleet.held.get(&name) {
            Some(held) => held.clone(),
            None => self.serving_versions(&name),
        };
        let versions: BTreeMap<String, Readiness> = wanted
            .iter()
            .map(|v| {
                let key = (name.clone(), v.clone());
                let expected = route.sha256.get(v).map(String::as_str);
                (
                    v.clone(),
                    self.readiness(&key, expected, route.smoke_test, ctx),
                )
            })
            .collect();
        let ready = |v: &str| versions.get(v) == Some(&Readiness::Ready);
        let mut changed = false;
        // Pinned, not derived: a model's default would otherwise follow its highest version,
        // and a version listed ahead of a blue/green switch would take traffic before it.
        // A model with no default yet (none pinned, none from the manifest) is pinned to the
        // registry's at once, listed or not: requests then wait for it (503) rather than go to
        // whichever version happens to be listed.
        let model = self.catalog.models.entry(name.clone()).or_default();
        model.fleet_managed = true;
        let pinned = model.default_override.clone();
        let unpinned = pinned.is_none() && model.manifest_default.is_none();
        // Unpinned, a version still on its way may be pinned, but never another file than the
        // registry's under its label.
        let other_file = |v: &str| {
            let listed = self.entries.get(&(name.clone(), v.to_string()));
            route
                .sha256
                .get(v)
                .zip(listed)
                .is_some_and(|(expected, entry)| *expected != entry.sha256)
        };
        let target = route
            .default
            .as_deref()
            .filter(|d| ready(d) || (unpinned && !other_file(d)));
        if let Some(default) = target {
            if pinned.as_deref() != Some(default) {
                tracing::info!(model = %name, version = default, "default set by the registry");
                self.set_default(&name, default);
                changed = true;
            }
        }
        let canary = route.canary.clone().filter(|c| ready(&c.version));
        let current = self
            .catalog
            .models
            .get(&name)
            .and_then(|m| m.canary.clone());
        if current != canary {
            self.set_canary(&name, canary.clone());
            changed = true;
        }
        if changed {
            self.publish();
        }
        // What stays: what the plan uses, and the default in force until the new one is ready.
        let default = self.default_of(&name).ok();
        let mut keep = wanted;
        keep.extend(default.iter().cloned());
        for version in before.difference(&keep) {
            let key = (name.clone(), version.clone());
            self.unload(&key, "no longer in the registry's desired state");
        }
        self.fleet.held.insert(name.clone(), keep);
        MessageResult(RouteOutcome {
            versions,
            default,
            canary,
        })
    }
}

impl Supervisor {
    fn serving_versions(&self, name: &str) -> BTreeSet<String> {
        self.catalog
            .models
            .get(name)
            .map(|m| {
                m.versions
                    .iter()
                    .filter(|(_, s)| matches!(s, VersionState::Serving(_)))
                    .map(|(v, _)| v.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// How ready `key` is, as the file with `expected` sha256; starts loading it, or its
    /// smoke test, if that is what it needs.
    fn readiness(
        &mut self,
        key: &Key,
        expected: Option<&str>,
        smoke: bool,
        ctx: &mut Context<Self>,
    ) -> Readiness {
        let Some(entry) = self.entries.get(key) else {
            return Readiness::Unknown;
        };
        let Some(expected) = expected else {
            return Readiness::Unknown;
        };
        if entry.sha256 != expected {
            return Readiness::Failed(format!(
                "{}:{} here is another file (sha256 {}) than the registry's (sha256 {expected}); \
                 versions are immutable, so it is not served under that version",
                key.0, key.1, entry.sha256
            ));
        }
        match self.state(key) {
            Some(VersionState::Serving(served)) if smoke => match self.fleet.smoke.get(key) {
                Some(Smoke::Passed) => Readiness::Ready,
                Some(Smoke::Running) => Readiness::Loading,
                Some(Smoke::Failed(reason)) => Readiness::Failed(reason.clone()),
                None => {
                    let served = served.clone();
                    self.fleet.smoke.insert(key.clone(), Smoke::Running);
                    let key = key.clone();
                    let test = async move { smoke_test(&served).await };
                    ctx.spawn(test.into_actor(self).map(move |result, supervisor, _| {
                        let smoke = match result {
                            Ok(()) => Smoke::Passed,
                            Err(e) => Smoke::Failed(format!("smoke test failed: {e}")),
                        };
                        if let Smoke::Failed(reason) = &smoke {
                            tracing::warn!(model = %key.0, version = %key.1, %reason, "registry version refused");
                        }
                        // Only if it is still the same load (an unload forgets the result).
                        if let Some(Smoke::Running) = supervisor.fleet.smoke.get(&key) {
                            supervisor.fleet.smoke.insert(key, smoke);
                        }
                    }));
                    Readiness::Loading
                }
            },
            Some(VersionState::Serving(_)) => Readiness::Ready,
            Some(VersionState::Loading { .. }) => Readiness::Loading,
            Some(VersionState::Unavailable { reason, .. }) => Readiness::Failed(reason.clone()),
            Some(VersionState::Cold {
                last_error: Some(reason),
                ..
            }) => Readiness::Failed(reason.clone()),
            Some(VersionState::Cold { .. }) => {
                // Loading starts now; the answer comes through later routes, not this receiver.
                drop(self.ensure(key.clone(), ctx));
                Readiness::Loading
            }
            None => Readiness::Unknown,
        }
    }
}
