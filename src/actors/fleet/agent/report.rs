//! What the agent tells about itself: its heartbeat report (what it serves of each model,
//! its part in each rollout, what it could not get) and its account for `GET /admin/registry`.

use std::collections::BTreeMap;

use super::Agent;
use crate::actors::catalog::{Catalog, VersionState};
use crate::actors::supervisor::traffic::Traffic;
use crate::actors::supervisor::Readiness;
use crate::registry::records::{CanaryShare, InstanceReport, ModelReport, VersionReport, FORMAT};

impl Agent {
    /// This instance's report: every model it knows, as its catalog has it now.
    pub(super) fn report(&self, catalog: &Catalog, now: u64) -> InstanceReport {
        let options = &self.fleet.shared.options;
        let mut models = BTreeMap::new();
        for (name, model) in &catalog.models {
            let versions = model
                .versions
                .iter()
                .map(|(v, state)| {
                    let (requests, errors) = match state {
                        VersionState::Serving(s) => {
                            let t = Traffic::of(&s.health);
                            (t.requests, t.errors)
                        }
                        _ => (0, 0),
                    };
                    let report = VersionReport {
                        state: state.label().to_string(),
                        requests,
                        errors,
                    };
                    (v.clone(), report)
                })
                .collect();
            let rollout = self.desired.get(name).and_then(|(d, _)| {
                let rollout = d.rollout.as_ref()?;
                let prepared = self
                    .outcomes
                    .get(name)
                    .and_then(|o| o.versions.get(&rollout.version))
                    == Some(&Readiness::Ready);
                Some(self.parts.get(name)?.report(prepared))
            });
            let unavailable = self
                .unavailable
                .iter()
                .filter(|((n, _), _)| n == name)
                .map(|((_, v), (reason, _))| (v.clone(), reason.to_string()))
                .collect();
            models.insert(
                name.clone(),
                ModelReport {
                    default: model.default_version().map(str::to_string),
                    canary: model.canary.as_ref().map(|c| CanaryShare {
                        version: c.version.clone(),
                        percent: c.percent,
                    }),
                    versions,
                    rollout,
                    unavailable,
                },
            );
        }
        InstanceReport {
            format: FORMAT,
            id: options.instance_id.clone(),
            url: options.url.clone(),
            streamserve: env!("CARGO_PKG_VERSION").to_string(),
            boot: self.boot.clone(),
            duplicate: self.duplicate.as_ref().map(|(text, _)| text.clone()),
            started_at_ms: self.started_at_ms,
            heartbeat_at_ms: now,
            poll_ms: options.poll.as_millis() as u64,
            registry_error: self.registry_error(),
            models,
        }
    }

    pub(super) fn publish_status(&self, now: u64) {
        let models: serde_json::Map<String, serde_json::Value> = self
            .desired
            .iter()
            .map(|(name, (desired, etag))| {
                let outcome = self.outcomes.get(name);
                let value = serde_json::json!({
                    "desired": desired,
                    "from_cache": etag.is_none(),
                    "routing": outcome.map(|o| serde_json::json!({
                        "default": o.default,
                        "canary": o.canary,
                        "versions": o.versions,
                    })),
                    "fetching": self.fetching.keys().filter(|(n, _)| n == name).map(|(_, v)| v).collect::<Vec<_>>(),
                });
                (name.clone(), value)
            })
            .collect();
        let status = serde_json::json!({
            "registry": self.fleet.shared.store.uri(),
            "instance": self.me(),
            "reachable": self.reachable,
            "registry_error": self.registry_error(),
            "duplicate_instance": self.duplicate.as_ref().map(|(text, _)| text),
            "last_poll_ms": now,
            "polls": self.polls,
            "live_instances": self.others.len() + 1,
            "models": models,
            "report": self.mine,
        });
        *self.fleet.shared.status.lock().expect("status lock") = status;
    }
}
