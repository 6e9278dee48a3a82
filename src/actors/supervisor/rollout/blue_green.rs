//! Blue/green: the new version, loaded beside the old and smoke-tested, becomes the default in
//! one catalog publish (every request after it goes to the new version), and the old one drains
//! and unloads. The old default is remembered, so a [`Rollback`](super::Rollback) can undo it.

use super::super::{event, Key, Supervisor};
use crate::actors::served::ServedModel;

/// Switches `key`'s model from `stable` to `key`'s version, loaded as `served`. Returns the
/// admin API's answer.
pub(super) fn switch(
    supervisor: &mut Supervisor,
    key: Key,
    stable: String,
    served: &ServedModel,
) -> serde_json::Value {
    let (name, version) = key;
    supervisor.set_default(&name, &version);
    supervisor
        .deployments
        .previous_default
        .insert(name.clone(), stable.clone());
    supervisor.publish();
    event(&name, "switched");
    tracing::info!(model = %name, from = %stable, to = %version, "blue/green switch");
    if stable != version {
        supervisor.unload(
            &(name.clone(), stable.clone()),
            "replaced by blue/green switch",
        );
    }
    serde_json::json!({
        "model": name,
        "strategy": "blue_green",
        "from": stable,
        "to": version,
        "device": served.info.device.to_string(),
    })
}
