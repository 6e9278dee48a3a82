//! The agent's part in the fleet's rollouts: judging this instance's share of each running
//! rollout from its traffic counters ([`Part`]), and recording in the registry what the live
//! reports say each rollout should do next (switch, promote, join, roll back).

use std::collections::HashSet;

use super::Agent;
use crate::actors::catalog::{Catalog, VersionState};
use crate::actors::fleet::part::Part;
use crate::actors::supervisor::traffic::Traffic;
use crate::actors::supervisor::Readiness;
use crate::registry::fleet::{self, Decision};
use crate::registry::records::Strategy;
use crate::registry::store::WriteIf;
use crate::registry::{desired_key, RegistryError};

impl Agent {
    /// Updates this instance's part in each running rollout from its traffic counters.
    pub(super) fn judge_parts(&mut self, catalog: &Catalog, now: u64) {
        let traffic = |name: &str, version: Option<&String>| -> Traffic {
            version
                .and_then(|v| catalog.models.get(name)?.versions.get(v))
                .map(|state| match state {
                    VersionState::Serving(served) => Traffic::of(&served.health),
                    _ => Traffic::default(),
                })
                .unwrap_or_default()
        };
        let running: HashSet<String> = self
            .desired
            .iter()
            .filter(|(_, (d, _))| d.rollout.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        self.parts.retain(|name, _| running.contains(name));
        for (name, (desired, _)) in &self.desired {
            let Some(rollout) = &desired.rollout else {
                continue;
            };
            let new = traffic(name, Some(&rollout.version));
            let stable = traffic(name, rollout.from.as_ref());
            let part = self
                .parts
                .entry(name.clone())
                .and_modify(|p| {
                    if p.rollout_id != rollout.id {
                        *p = Part::new(rollout, now, new, stable);
                    }
                })
                .or_insert_with(|| Part::new(rollout, now, new, stable));
            let key = (name.clone(), rollout.version.clone());
            // A version that is not what its record says fails the rollout here; one that
            // could not be fetched (network, disk) is tried again, and only delays it.
            if let Some((e @ (RegistryError::Corrupt(_) | RegistryError::Refused(_)), _)) =
                self.unavailable.get(&key)
            {
                part.fail(e.to_string());
            }
            // A new version whose golden-input probe fails is wrong, however few errors it
            // answers with.
            if let Some(VersionState::Serving(served)) = catalog
                .models
                .get(name)
                .and_then(|m| m.versions.get(&rollout.version))
            {
                if let Some(error) = served.watch.probe_failing() {
                    part.fail(format!("the new version's probe fails: {error}"));
                }
            }
            let outcome = self.outcomes.get(name);
            if let Some(Readiness::Failed(reason)) =
                outcome.and_then(|o| o.versions.get(&rollout.version))
            {
                part.fail(reason.clone());
            }
            match rollout.strategy {
                Strategy::BlueGreen => {}
                Strategy::Canary => part.judge_canary(rollout, now, new, stable),
                Strategy::Rolling => {
                    let serving_new =
                        outcome.and_then(|o| o.default.as_ref()) == Some(&rollout.version);
                    part.judge_rolling(serving_new, now, new);
                }
            }
        }
    }

    /// Records what the live reports say each running rollout should do next.
    pub(super) async fn decide_all(&mut self, now: u64) {
        let live = self.live();
        let me = self.me().to_string();
        let store = self.fleet.shared.store.clone();
        let models: Vec<String> = self.desired.keys().cloned().collect();
        for name in models {
            let (desired, etag) = &self.desired[&name];
            let Some(decision) = fleet::decide(desired, &me, now, &live) else {
                continue;
            };
            let Some(tag) = etag.clone() else {
                continue;
            };
            let next = fleet::apply(desired, &decision, &me, now);
            match store
                .write_json(&desired_key(&name), &next, WriteIf::Matches(tag))
                .await
            {
                Ok(new_etag) => {
                    let label = decision_label(&decision);
                    metrics::counter!("streamserve_fleet_decisions_total", "decision" => label)
                        .increment(1);
                    match &decision {
                        Decision::Abort { instance, reason } => {
                            tracing::warn!(model = %name, %instance, %reason, "rollout rolled back fleet-wide")
                        }
                        _ => tracing::info!(model = %name, decision = label, "rollout moved on"),
                    }
                    let _ = self.fleet.shared.cache.save_desired(&next);
                    self.desired.insert(name, (next, Some(new_etag)));
                }
                // Another instance recorded it (or something else) first: read it next poll.
                Err(RegistryError::Conflict(_)) => {}
                Err(e) => self.unreachable(e),
            }
        }
    }
}

fn decision_label(decision: &Decision) -> &'static str {
    match decision {
        Decision::Switch => "switch",
        Decision::Promote => "promote",
        Decision::RolledOut => "rolled_out",
        Decision::Join => "join",
        Decision::Abort { .. } => "abort",
    }
}
