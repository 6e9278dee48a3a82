//! The fleet strategies as pure rules over the registry's documents, so that every instance
//! reaches the same conclusions from the same documents, and tests need no store, no clock
//! and no models:
//! - [`plan`]: how this instance routes a model now (its default, a canary share, what to
//!   load ahead), from the model's desired state;
//! - [`decide`]: whether the rollout moves on (switch, promote, finish, abort, or this
//!   instance's turn to switch), from the live instances' reports; any instance may find it,
//!   and the write that records it is conditional, so one of them wins and the rest follow;
//! - [`start`] and [`roll_back`]: what `registry deploy` and `registry rollback` write.
//!
//! Each instance is the only writer of its own catalog; the desired state is the only place
//! intent lives, so a rollout survives the restart of any instance, and an instance that
//! starts in the middle of one reads where it stands and joins it.

use super::records::{
    CanaryShare, Desired, Event, EventKind, InstanceReport, Rollout, RolloutReport, Strategy,
    Switched,
};
use super::RegistryError;

/// An instance counts as live while its last heartbeat is younger than this many of its poll
/// intervals...
pub const LIVE_POLLS: u64 = 4;
/// ...and never less than this (a slow poll must not make a healthy instance look dead).
pub const LIVE_FLOOR_MS: u64 = 5_000;

/// Whether `report`'s instance is live at `now_ms`.
pub fn is_live(report: &InstanceReport, now_ms: u64) -> bool {
    let window = LIVE_POLLS.saturating_mul(report.poll_ms).max(LIVE_FLOOR_MS);
    now_ms.saturating_sub(report.heartbeat_at_ms) <= window
}

/// How one instance routes one model.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The version that takes the traffic outside a canary's share.
    pub default: Option<String>,
    pub canary: Option<CanaryShare>,
    /// Versions to load (and smoke-test) before they take traffic.
    pub prepare: Vec<String>,
    pub smoke_test: bool,
}

impl Plan {
    /// Every version the plan uses: these stay loaded, the model's others may go.
    pub fn versions(&self) -> Vec<String> {
        let mut versions: Vec<String> = self.default.iter().cloned().collect();
        versions.extend(self.canary.iter().map(|c| c.version.clone()));
        versions.extend(self.prepare.iter().cloned());
        versions.sort();
        versions.dedup();
        versions
    }
}

/// The canary step in force at `now_ms`: its index, or `steps.len()` once every step has run.
pub fn canary_step(rollout: &Rollout, now_ms: u64) -> usize {
    let step_ms = rollout.step_secs.clamp(1, MAX_STEP_SECS) * 1000;
    let elapsed = now_ms.saturating_sub(rollout.started_at_ms);
    ((elapsed / step_ms) as usize).min(rollout.steps.len())
}

/// How `me` routes `desired`'s model at `now_ms`, given the live instances' reports.
pub fn plan(desired: &Desired, me: &str, now_ms: u64, live: &[InstanceReport]) -> Plan {
    let Some(rollout) = &desired.rollout else {
        return Plan {
            default: desired.default.clone(),
            ..Plan::default()
        };
    };
    let stable = rollout.from.clone().or_else(|| desired.default.clone());
    let mut plan = Plan {
        default: stable,
        smoke_test: rollout.smoke_test,
        ..Plan::default()
    };
    match rollout.strategy {
        Strategy::BlueGreen => plan.prepare = vec![rollout.version.clone()],
        Strategy::Canary => {
            let step = canary_step(rollout, now_ms).min(rollout.steps.len().saturating_sub(1));
            plan.canary = rollout.steps.get(step).map(|&percent| CanaryShare {
                version: rollout.version.clone(),
                percent,
            });
        }
        Strategy::Rolling => {
            if rollout.switched.iter().any(|s| s.instance == me) {
                plan.default = Some(rollout.version.clone());
            } else if next_to_switch(&desired.model, rollout, live, now_ms) == Some(me) {
                plan.prepare = vec![rollout.version.clone()];
            }
        }
    }
    plan
}

/// This instance's part in `rollout` as its report says, if the report is about it.
fn part<'a>(
    report: &'a InstanceReport,
    model: &str,
    rollout: &Rollout,
) -> Option<&'a RolloutReport> {
    report
        .models
        .get(model)?
        .rollout
        .as_ref()
        .filter(|r| r.id == rollout.id)
}

/// Rolling: the instance whose turn it is, if any may switch now: the live instance not yet
/// switched with the smallest id, once the last one to switch has stayed healthy for
/// `hold_secs` (or is gone: a dead instance is not waited for).
pub fn next_to_switch<'a>(
    model: &str,
    rollout: &Rollout,
    live: &'a [InstanceReport],
    now_ms: u64,
) -> Option<&'a str> {
    if !last_switched_held(model, rollout, live, now_ms) {
        return None;
    }
    live.iter()
        .map(|r| r.id.as_str())
        .filter(|id| !rollout.switched.iter().any(|s| s.instance == *id))
        .min()
}

/// Rolling: whether the last instance to switch has reported the new version healthy for
/// `hold_secs` (a report that does not say so yet has not held), or is gone (not waited for),
/// or none has switched.
fn last_switched_held(
    model: &str,
    rollout: &Rollout,
    live: &[InstanceReport],
    now_ms: u64,
) -> bool {
    let Some(last) = rollout.switched.last() else {
        return true;
    };
    let Some(report) = live.iter().find(|r| r.id == last.instance) else {
        return true;
    };
    let hold_ms = rollout.hold_secs.saturating_mul(1000);
    part(report, model, rollout)
        .and_then(|p| p.healthy_since_ms)
        .is_some_and(|since| now_ms.saturating_sub(since) >= hold_ms)
}

/// What the live instances' reports say the rollout should do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Blue/green: every live instance has the new version loaded: switch them all.
    Switch,
    /// Canary: every live instance passed the last step: the canary becomes the default.
    Promote,
    /// Rolling: every live instance switched, and the last one held.
    RolledOut,
    /// Rolling: it is this instance's turn, and it has the new version loaded.
    Join,
    /// A canary or rolling update failed on an instance: everyone goes back.
    Abort { instance: String, reason: String },
}

/// Why a blue/green rollout cannot switch: the live instances that failed to load the new
/// version, with their reasons.
pub fn blocked_by(desired: &Desired, live: &[InstanceReport]) -> Vec<(String, String)> {
    let Some(rollout) = &desired.rollout else {
        return Vec::new();
    };
    live.iter()
        .filter_map(|r| {
            let failed = part(r, &desired.model, rollout)?.failed.clone()?;
            Some((r.id.clone(), failed))
        })
        .collect()
}

/// What `me` finds the rollout should do next, if anything.
pub fn decide(
    desired: &Desired,
    me: &str,
    now_ms: u64,
    live: &[InstanceReport],
) -> Option<Decision> {
    let rollout = desired.rollout.as_ref()?;
    let model = &desired.model;
    let parts: Vec<(&InstanceReport, Option<&RolloutReport>)> =
        live.iter().map(|r| (r, part(r, model, rollout))).collect();
    if parts.is_empty() {
        return None;
    }
    if rollout.strategy != Strategy::BlueGreen {
        // A failed canary gate or a rolling instance that cannot serve the new version stops
        // the rollout everywhere; a blue/green one only waits (blocked_by says why).
        if let Some((report, reason)) = parts
            .iter()
            .find_map(|(r, p)| Some((*r, p.as_ref()?.failed.clone()?)))
        {
            return Some(Decision::Abort {
                instance: report.id.clone(),
                reason,
            });
        }
    }
    match rollout.strategy {
        Strategy::BlueGreen => parts
            .iter()
            .all(|(_, p)| p.is_some_and(|p| p.prepared && p.failed.is_none()))
            .then_some(Decision::Switch),
        Strategy::Canary => {
            let last = rollout.steps.len().checked_sub(1)?;
            let over = canary_step(rollout, now_ms) >= rollout.steps.len();
            let all_passed = parts
                .iter()
                .all(|(_, p)| p.and_then(|p| p.passed_step) == Some(last));
            (over && all_passed).then_some(Decision::Promote)
        }
        Strategy::Rolling => {
            let switched = |id: &str| rollout.switched.iter().any(|s| s.instance == id);
            if parts.iter().all(|(r, _)| switched(&r.id)) {
                // Everyone moved: done once the last one held (as for the next's turn).
                return last_switched_held(model, rollout, live, now_ms)
                    .then_some(Decision::RolledOut);
            }
            let mine = parts.iter().find(|(r, _)| r.id == me)?;
            let ready = mine.1.is_some_and(|p| p.prepared);
            (ready && !switched(me) && next_to_switch(model, rollout, live, now_ms) == Some(me))
                .then_some(Decision::Join)
        }
    }
}

/// The desired state after `decision`, as `me` records it at `now_ms`.
pub fn apply(desired: &Desired, decision: &Decision, me: &str, now_ms: u64) -> Desired {
    let mut next = desired.clone();
    let Some(rollout) = next.rollout.clone() else {
        return next;
    };
    let event = |kind: EventKind, reason: Option<String>| Event {
        at_ms: now_ms,
        event: kind,
        version: rollout.version.clone(),
        from: rollout.from.clone(),
        strategy: Some(rollout.strategy),
        by: format!("instance {me}"),
        reason,
    };
    match decision {
        Decision::Join => {
            if let Some(r) = next.rollout.as_mut() {
                r.switched.push(Switched {
                    instance: me.to_string(),
                    at_ms: now_ms,
                });
            }
        }
        Decision::Switch | Decision::Promote | Decision::RolledOut => {
            let kind = match decision {
                Decision::Switch => EventKind::Switched,
                Decision::Promote => EventKind::Promoted,
                _ => EventKind::RolledOut,
            };
            next.default = Some(rollout.version.clone());
            next.rollout = None;
            next.record(event(kind, None));
        }
        Decision::Abort { instance, reason } => {
            next.rollout = None;
            next.record(event(
                EventKind::RolledBack,
                Some(format!("instance {instance}: {reason}")),
            ));
        }
    }
    next
}

/// What `registry deploy` asks for.
#[derive(Clone, Debug)]
pub struct DeployRequest {
    pub version: String,
    pub strategy: Strategy,
    pub steps: Vec<u32>,
    pub step_secs: u64,
    pub hold_secs: u64,
    pub smoke_test: bool,
    pub by: String,
    pub id: String,
}

/// Most canary steps, and the longest step or hold, as the admin API allows.
pub const MAX_STEPS: usize = 20;
pub const MAX_STEP_SECS: u64 = 3600;

/// The desired state once `request` starts; refused while another rollout runs, or when the
/// version already is the default. A model's first version becomes its default at once.
pub fn start(
    desired: &Desired,
    request: DeployRequest,
    now_ms: u64,
) -> Result<Desired, RegistryError> {
    if let Some(running) = &desired.rollout {
        return Err(RegistryError::Refused(format!(
            "a {} rollout of {}:{} is running (started by {}); wait for it or roll it back",
            running.strategy.name(),
            desired.model,
            running.version,
            running.started_by
        )));
    }
    if desired.default.as_deref() == Some(request.version.as_str()) {
        return Err(RegistryError::Refused(format!(
            "{}:{} is already the default",
            desired.model, request.version
        )));
    }
    check_steps(&request)?;
    let mut next = desired.clone();
    next.format = super::records::FORMAT;
    let Some(from) = desired.default.clone() else {
        next.default = Some(request.version.clone());
        next.record(Event {
            at_ms: now_ms,
            event: EventKind::Switched,
            version: request.version,
            from: None,
            strategy: Some(request.strategy),
            by: request.by,
            reason: Some("the model's first version".into()),
        });
        return Ok(next);
    };
    next.record(Event {
        at_ms: now_ms,
        event: EventKind::Deploy,
        version: request.version.clone(),
        from: Some(from.clone()),
        strategy: Some(request.strategy),
        by: request.by.clone(),
        reason: None,
    });
    next.rollout = Some(Rollout {
        id: request.id,
        strategy: request.strategy,
        version: request.version,
        from: Some(from),
        started_at_ms: now_ms,
        started_by: request.by,
        steps: if request.strategy == Strategy::Canary {
            request.steps
        } else {
            Vec::new()
        },
        step_secs: request.step_secs,
        hold_secs: request.hold_secs,
        smoke_test: request.smoke_test,
        switched: Vec::new(),
    });
    Ok(next)
}

fn check_steps(request: &DeployRequest) -> Result<(), RegistryError> {
    let refuse = |why: String| Err(RegistryError::Refused(why));
    if request.strategy == Strategy::Canary {
        let steps = &request.steps;
        if steps.is_empty() || steps.len() > MAX_STEPS {
            return refuse(format!("a canary needs 1 to {MAX_STEPS} steps"));
        }
        if steps.iter().any(|&s| s == 0 || s > 100)
            || steps.windows(2).any(|w| w[0] >= w[1])
            || steps.last() != Some(&100)
        {
            return refuse(format!(
                "canary steps must be strictly increasing percentages in 1..=100 ending at 100, got {steps:?}"
            ));
        }
        if !(1..=MAX_STEP_SECS).contains(&request.step_secs) {
            return refuse(format!("step_secs must be in 1..={MAX_STEP_SECS}"));
        }
    }
    if request.strategy == Strategy::Rolling && request.hold_secs > MAX_STEP_SECS {
        return refuse(format!("hold_secs must be at most {MAX_STEP_SECS}"));
    }
    Ok(())
}

/// The desired state after `registry rollback`: a running rollout stops (every instance goes
/// back to its `from`); otherwise the default goes back to `to`, or to the version the last
/// completed rollout replaced.
pub fn roll_back(
    desired: &Desired,
    to: Option<&str>,
    by: &str,
    reason: &str,
    now_ms: u64,
) -> Result<Desired, RegistryError> {
    let mut next = desired.clone();
    if let Some(rollout) = &desired.rollout {
        if to.is_some_and(|to| Some(to) != rollout.from.as_deref()) {
            return Err(RegistryError::Refused(format!(
                "a rollout of {}:{} is running: a rollback returns to {} (run it without --to, then deploy)",
                desired.model,
                rollout.version,
                rollout.from.as_deref().unwrap_or("nothing")
            )));
        }
        next.rollout = None;
        next.record(Event {
            at_ms: now_ms,
            event: EventKind::RolledBack,
            version: rollout.version.clone(),
            from: rollout.from.clone(),
            strategy: Some(rollout.strategy),
            by: by.to_string(),
            reason: Some(reason.to_string()),
        });
        return Ok(next);
    }
    let current = desired.default.clone().ok_or_else(|| {
        RegistryError::Refused(format!(
            "{} has no default to roll back from",
            desired.model
        ))
    })?;
    let target = match to {
        Some(to) => to.to_string(),
        None => previous_default(desired).ok_or_else(|| {
            RegistryError::Refused(format!(
                "{}:{} did not replace another version by a deployment (its last change was a \
                 rollback, or it was the first); name the version: --to VERSION",
                desired.model, current
            ))
        })?,
    };
    if target == current {
        return Err(RegistryError::Refused(format!(
            "{}:{target} is already the default",
            desired.model
        )));
    }
    next.default = Some(target.clone());
    next.record(Event {
        at_ms: now_ms,
        event: EventKind::RolledBack,
        version: target,
        from: Some(current),
        strategy: None,
        by: by.to_string(),
        reason: Some(reason.to_string()),
    });
    Ok(next)
}

/// The version that the current default replaced, if a completed rollout made it the
/// default (the last event that set the default was a switch, promotion or roll-out).
fn previous_default(desired: &Desired) -> Option<String> {
    let current = desired.default.as_deref()?;
    let setter = desired.history.iter().rev().find(|e| match e.event {
        EventKind::Switched | EventKind::Promoted | EventKind::RolledOut => e.version == current,
        EventKind::RolledBack => e.version == current && e.strategy.is_none(),
        EventKind::Deploy => false,
    })?;
    match setter.event {
        EventKind::RolledBack => None,
        _ => setter.from.clone(),
    }
}

#[cfg(test)]
mod tests;
