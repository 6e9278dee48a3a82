//! Stepped rollouts: a canary, or a rolling update, takes a growing share of its model's
//! default traffic, one step at a time. At the end of each step it is judged against the
//! stable version over the same time ([`judge`](super::traffic::judge)): worse rolls it back
//! and unloads it; otherwise its share grows, and after the last step it becomes the default
//! and the stable version is unloaded.
//!
//! A rolling update is the same machinery with two differences, decided when it starts: its
//! steps are one replica's share each ([`rolling_steps`]) and it is judged on errors only.

use std::time::{Duration, Instant};

use super::super::{event, Key, Supervisor};
use super::traffic::{self, Traffic, Verdict};
use super::{Deploy, Strategy};
use crate::actors::catalog::Canary;
use crate::actors::served::ServedModel;

/// A running canary (or rolling update) of one model.
pub(super) struct CanaryRollout {
    /// Canaries are also judged on latency; rolling updates only on errors.
    judge_latency: bool,
    pub(super) version: String,
    pub(super) stable: String,
    /// The canary's share of traffic at each step, in percent; the last is 100.
    steps: Vec<u32>,
    step: usize,
    step_secs: u64,
    step_started: Instant,
    /// Both versions' counters when the step started.
    canary_base: Traffic,
    stable_base: Traffic,
}

impl CanaryRollout {
    fn percent(&self) -> u32 {
        self.steps[self.step]
    }

    fn step_due(&self) -> bool {
        self.step_started.elapsed() >= Duration::from_secs(self.step_secs)
    }

    /// For the admin API.
    pub(super) fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "canary": self.version,
            "stable": self.stable,
            "percent": self.percent(),
            "step": self.step,
            "steps": self.steps,
        })
    }
}

/// A rolling update's steps for a version of `replicas` replicas: one replica's share more at
/// each (100/N %, rounded down, ending at 100), and at least two steps, so that even a single
/// replica is judged on half the traffic before it takes all of it. Past 100 replicas a
/// replica's share is under one percent: a share that rounds to 0 (a step in which the new
/// version would get no traffic, and pass unjudged) or to the last step's is left out, so
/// that the steps stay strictly increasing in 1..=100 as an operator's canary steps must.
pub(super) fn rolling_steps(replicas: usize) -> Vec<u32> {
    let n = replicas.max(2) as u64;
    let mut steps: Vec<u32> = (1..=n)
        .map(|k| (k * 100 / n) as u32)
        .filter(|p| *p > 0)
        .collect();
    steps.dedup();
    steps
}

/// Starts a stepped rollout of `key`, loaded as `served`, against `stable`: its first step's
/// share of the default traffic goes to it now. Returns the admin API's answer.
pub(super) fn start(
    supervisor: &mut Supervisor,
    key: Key,
    stable: String,
    served: &ServedModel,
    deploy: &Deploy,
) -> serde_json::Value {
    let (name, version) = key;
    let rolling = deploy.strategy == Strategy::Rolling;
    let steps = if rolling {
        rolling_steps(served.info.replicas)
    } else {
        deploy.steps.clone()
    };
    let stable_base = supervisor
        .served(&(name.clone(), stable.clone()))
        .map(|s| Traffic::of(&s.health))
        .unwrap_or_default();
    let rollout = CanaryRollout {
        judge_latency: deploy.strategy == Strategy::Canary,
        version: version.clone(),
        stable: stable.clone(),
        steps: steps.clone(),
        step: 0,
        step_secs: deploy.step_secs,
        step_started: Instant::now(),
        canary_base: Traffic::of(&served.health),
        stable_base,
    };
    let percent = rollout.percent();
    supervisor.deployments.running.insert(name.clone(), rollout);
    supervisor.set_canary(
        &name,
        Some(Canary {
            version: version.clone(),
            percent,
        }),
    );
    supervisor.deployments.last_rollback.remove(&name);
    supervisor.publish();
    event(&name, "canary_started");
    serde_json::json!({
        "model": name,
        "strategy": if rolling { "rolling" } else { "canary" },
        "stable": stable,
        "canary": version,
        "steps": steps,
        "step_secs": deploy.step_secs,
    })
}

/// Ends `name`'s canary step if it is due: worse than stable rolls back, otherwise the share
/// grows, and after the last step the canary becomes the default.
pub(super) fn judge(supervisor: &mut Supervisor, name: &str) {
    let Some(rollout) = supervisor.deployments.running.get(name) else {
        return;
    };
    // A failing probe rolls back at once, without waiting for the step to end.
    let probe_error = supervisor
        .served(&(name.to_string(), rollout.version.clone()))
        .and_then(|canary| canary.watch.probe_failing());
    if let Some(error) = probe_error {
        abort(
            supervisor,
            name,
            &format!("the canary's probe fails: {error}"),
        );
        return;
    }
    if !rollout.step_due() {
        return;
    }
    let (Some(canary), Some(stable)) = (
        supervisor.served(&(name.to_string(), rollout.version.clone())),
        supervisor.served(&(name.to_string(), rollout.stable.clone())),
    ) else {
        abort(
            supervisor,
            name,
            "a version of the rollout is no longer serving",
        );
        return;
    };
    let verdict = traffic::judge(
        Traffic::of(&canary.health).since(rollout.canary_base),
        Traffic::of(&stable.health).since(rollout.stable_base),
        rollout.judge_latency,
    );
    if let Verdict::Worse(reason) = verdict {
        abort(supervisor, name, &reason);
        return;
    }
    let rollout = supervisor
        .deployments
        .running
        .get_mut(name)
        .expect("checked above");
    rollout.step += 1;
    if rollout.step >= rollout.steps.len() {
        promote(supervisor, name);
        return;
    }
    rollout.step_started = Instant::now();
    rollout.canary_base = Traffic::of(&canary.health);
    rollout.stable_base = Traffic::of(&stable.health);
    let percent = rollout.percent();
    let version = rollout.version.clone();
    supervisor.set_canary(name, Some(Canary { version, percent }));
    supervisor.publish();
    tracing::info!(model = name, percent, "canary step");
    event(name, "canary_step");
}

/// After the last step: the canary becomes the default, and the stable version goes.
fn promote(supervisor: &mut Supervisor, name: &str) {
    let rollout = supervisor
        .deployments
        .running
        .remove(name)
        .expect("a running rollout");
    supervisor.set_canary(name, None);
    supervisor.set_default(name, &rollout.version);
    supervisor
        .deployments
        .previous_default
        .insert(name.to_string(), rollout.stable.clone());
    supervisor.publish();
    tracing::info!(model = name, version = %rollout.version, "canary promoted");
    event(name, "promoted");
    supervisor.unload(
        &(name.to_string(), rollout.stable),
        "replaced by the promoted canary",
    );
}

/// Rolls `name`'s canary back: all traffic to the stable version again, the canary unloaded,
/// and `reason` kept for the admin API.
pub(super) fn abort(supervisor: &mut Supervisor, name: &str, reason: &str) {
    let Some(rollout) = supervisor.deployments.running.remove(name) else {
        return;
    };
    supervisor.set_canary(name, None);
    supervisor.publish();
    tracing::warn!(model = name, version = %rollout.version, reason, "canary rolled back");
    event(name, "rolled_back");
    supervisor
        .deployments
        .last_rollback
        .insert(name.to_string(), reason.to_string());
    supervisor.unload(&(name.to_string(), rollout.version), "canary rolled back");
}

#[cfg(test)]
mod tests {
    use super::rolling_steps;

    #[test]
    fn rolling_steps_are_one_replicas_share_each_ending_at_100() {
        assert_eq!(rolling_steps(1), vec![50, 100]);
        assert_eq!(rolling_steps(2), vec![50, 100]);
        assert_eq!(rolling_steps(3), vec![33, 66, 100]);
        assert_eq!(rolling_steps(4), vec![25, 50, 75, 100]);
    }

    #[test]
    fn past_100_replicas_no_step_is_empty_or_repeated() {
        for replicas in [99, 100, 101, 128, 300, 1024] {
            let steps = rolling_steps(replicas);
            assert!(steps[0] >= 1, "{replicas}: {steps:?}");
            assert!(
                steps.windows(2).all(|w| w[0] < w[1]),
                "{replicas}: {steps:?}"
            );
            assert_eq!(steps.last(), Some(&100), "{replicas}: {steps:?}");
        }
        assert_eq!(rolling_steps(100), (1..=100).collect::<Vec<u32>>());
    }
}
