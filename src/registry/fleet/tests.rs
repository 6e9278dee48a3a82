//! The fleet rules on hand-made documents: what each strategy routes, when a rollout moves on,
//! and what deploy and rollback write.

use super::*;
use crate::registry::records::{ModelReport, FORMAT, HISTORY_KEPT};

const T0: u64 = 1_000_000;

fn desired(default: &str) -> Desired {
    Desired {
        format: FORMAT,
        model: "m".into(),
        default: Some(default.into()),
        rollout: None,
        history: vec![],
    }
}

fn deploy(strategy: Strategy) -> DeployRequest {
    DeployRequest {
        version: "2".into(),
        strategy,
        steps: vec![10, 50, 100],
        step_secs: 10,
        hold_secs: 5,
        smoke_test: true,
        by: "op".into(),
        id: "r1".into(),
    }
}

fn rolling_out(strategy: Strategy) -> Desired {
    start(&desired("1"), deploy(strategy), T0).unwrap()
}

/// An instance's report at `at`, with its part in rollout `r1`.
fn report(id: &str, at: u64, part: Option<RolloutReport>) -> InstanceReport {
    let mut models = std::collections::BTreeMap::new();
    models.insert(
        "m".to_string(),
        ModelReport {
            rollout: part,
            ..ModelReport::default()
        },
    );
    InstanceReport {
        format: FORMAT,
        id: id.into(),
        heartbeat_at_ms: at,
        poll_ms: 1000,
        models,
        ..InstanceReport::default()
    }
}

fn part(prepared: bool) -> RolloutReport {
    RolloutReport {
        id: "r1".into(),
        prepared,
        ..RolloutReport::default()
    }
}

#[test]
fn liveness_follows_the_heartbeat_with_a_floor() {
    let r = report("a", T0, None);
    assert!(is_live(&r, T0 + LIVE_FLOOR_MS));
    assert!(!is_live(&r, T0 + LIVE_FLOOR_MS + 1));
    let slow = InstanceReport {
        poll_ms: 10_000,
        ..r
    };
    assert!(is_live(&slow, T0 + 4 * 10_000));
}

#[test]
fn without_a_rollout_every_instance_routes_the_default() {
    let plan = plan(&desired("1"), "a", T0, &[]);
    assert_eq!(plan.default.as_deref(), Some("1"));
    assert_eq!(plan.canary, None);
    assert!(plan.prepare.is_empty());
}

#[test]
fn blue_green_prepares_everywhere_and_switches_once_all_are_ready() {
    let d = rolling_out(Strategy::BlueGreen);
    let plan = plan(&d, "a", T0, &[]);
    assert_eq!(
        plan.default.as_deref(),
        Some("1"),
        "the old version until the switch"
    );
    assert_eq!(plan.prepare, vec!["2".to_string()]);
    assert!(plan.smoke_test);

    let ready = report("a", T0, Some(part(true)));
    let loading = report("b", T0, Some(part(false)));
    assert_eq!(decide(&d, "a", T0, &[ready.clone(), loading]), None);
    // An instance that has not reported on this rollout yet is waited for too.
    let silent = report("b", T0, None);
    assert_eq!(decide(&d, "a", T0, &[ready.clone(), silent]), None);
    let also_ready = report("b", T0, Some(part(true)));
    assert_eq!(
        decide(&d, "b", T0, &[ready, also_ready]),
        Some(Decision::Switch)
    );

    let next = apply(&d, &Decision::Switch, "b", T0 + 5);
    assert_eq!(next.default.as_deref(), Some("2"));
    assert_eq!(next.rollout, None);
    let last = next.history.last().unwrap();
    assert_eq!(
        (last.event, last.version.as_str()),
        (EventKind::Switched, "2")
    );
    assert_eq!(last.by, "instance b");
}

#[test]
fn a_blue_green_instance_that_cannot_load_blocks_the_switch_and_says_why() {
    let d = rolling_out(Strategy::BlueGreen);
    let failed = RolloutReport {
        failed: Some("does not fit: 900 MiB".into()),
        ..part(false)
    };
    let live = [
        report("a", T0, Some(part(true))),
        report("b", T0, Some(failed)),
    ];
    assert_eq!(decide(&d, "a", T0, &live), None, "blocked, not aborted");
    assert_eq!(
        blocked_by(&d, &live),
        vec![("b".to_string(), "does not fit: 900 MiB".to_string())]
    );
}

#[test]
fn a_canary_moves_in_step_on_every_instance_from_the_recorded_start() {
    let d = rolling_out(Strategy::Canary);
    let at = |secs: u64| plan(&d, "a", T0 + secs * 1000, &[]).canary.unwrap().percent;
    assert_eq!(
        (at(0), at(9), at(10), at(19), at(20), at(99)),
        (10, 10, 50, 50, 100, 100)
    );
    assert_eq!(plan(&d, "a", T0, &[]).default.as_deref(), Some("1"));
    assert_eq!(canary_step(d.rollout.as_ref().unwrap(), T0 + 30_000), 3);
}

#[test]
fn a_canary_is_promoted_when_every_live_instance_passed_the_last_step() {
    let d = rolling_out(Strategy::Canary);
    let passed = |step| RolloutReport {
        passed_step: Some(step),
        ..part(true)
    };
    let end = T0 + 30_000;
    let live = [
        report("a", end, Some(passed(2))),
        report("b", end, Some(passed(1))),
    ];
    assert_eq!(
        decide(&d, "a", end, &live),
        None,
        "b has not judged the last step"
    );
    let live = [
        report("a", end, Some(passed(2))),
        report("b", end, Some(passed(2))),
    ];
    assert_eq!(decide(&d, "a", end - 1, &live), None, "not over yet");
    assert_eq!(decide(&d, "a", end, &live), Some(Decision::Promote));
    let next = apply(&d, &Decision::Promote, "a", end);
    assert_eq!(next.default.as_deref(), Some("2"));
    assert_eq!(next.history.last().unwrap().event, EventKind::Promoted);
}

#[test]
fn one_instance_failing_a_canary_rolls_back_the_whole_fleet() {
    let d = rolling_out(Strategy::Canary);
    let failed = RolloutReport {
        failed: Some("step 1 (10%): slow".into()),
        ..part(true)
    };
    let live = [
        report("a", T0, Some(part(true))),
        report("b", T0, Some(failed)),
    ];
    let decision = decide(&d, "a", T0, &live).unwrap();
    assert_eq!(
        decision,
        Decision::Abort {
            instance: "b".into(),
            reason: "step 1 (10%): slow".into()
        }
    );
    let next = apply(&d, &decision, "a", T0);
    assert_eq!(
        next.default.as_deref(),
        Some("1"),
        "the stable version stays"
    );
    assert_eq!(next.rollout, None);
    let last = next.history.last().unwrap();
    assert_eq!(last.event, EventKind::RolledBack);
    assert_eq!(
        last.reason.as_deref(),
        Some("instance b: step 1 (10%): slow")
    );
}

#[test]
fn reports_about_another_rollout_do_not_count() {
    let d = rolling_out(Strategy::BlueGreen);
    let stale = RolloutReport {
        id: "r0".into(),
        ..part(true)
    };
    assert_eq!(decide(&d, "a", T0, &[report("a", T0, Some(stale))]), None);
}

#[test]
fn rolling_moves_one_instance_at_a_time_after_the_last_one_held() {
    let mut d = rolling_out(Strategy::Rolling);
    let live = vec![report("b", T0, None), report("a", T0, None)];
    // The smallest id goes first; the others keep the old version and load nothing.
    assert_eq!(plan(&d, "a", T0, &live).prepare, vec!["2".to_string()]);
    assert!(plan(&d, "b", T0, &live).prepare.is_empty());
    assert_eq!(plan(&d, "b", T0, &live).default.as_deref(), Some("1"));
    // a is ready: its turn is recorded.
    let live = vec![report("a", T0, Some(part(true))), report("b", T0, None)];
    assert_eq!(decide(&d, "b", T0, &live), None, "not b's turn");
    assert_eq!(decide(&d, "a", T0, &live), Some(Decision::Join));
    d = apply(&d, &Decision::Join, "a", T0);
    assert_eq!(plan(&d, "a", T0, &live).default.as_deref(), Some("2"));
    // b waits until a has been healthy on 2 for hold_secs (5 s).
    let healthy = |since| RolloutReport {
        healthy_since_ms: Some(since),
        ..part(true)
    };
    let live = vec![
        report("a", T0 + 1000, Some(healthy(T0 + 1000))),
        report("b", T0 + 1000, None),
    ];
    assert!(plan(&d, "b", T0 + 5999, &live).prepare.is_empty());
    assert_eq!(
        plan(&d, "b", T0 + 6000, &live).prepare,
        vec!["2".to_string()]
    );
    let live = vec![
        report("a", T0 + 6000, Some(healthy(T0 + 1000))),
        report("b", T0 + 6000, Some(part(true))),
    ];
    assert_eq!(decide(&d, "b", T0 + 6000, &live), Some(Decision::Join));
    d = apply(&d, &Decision::Join, "b", T0 + 6000);
    // b's report does not say it is healthy on 2 yet: not done, however long a's held.
    let live = vec![
        report("a", T0 + 20_000, Some(healthy(T0 + 1000))),
        report("b", T0 + 20_000, Some(part(true))),
    ];
    assert_eq!(decide(&d, "a", T0 + 20_000, &live), None);
    // Done once the last one held too.
    let live = vec![
        report("a", T0 + 7000, Some(healthy(T0 + 1000))),
        report("b", T0 + 7000, Some(healthy(T0 + 7000))),
    ];
    assert_eq!(decide(&d, "a", T0 + 11_999, &live), None);
    assert_eq!(
        decide(&d, "a", T0 + 12_000, &live),
        Some(Decision::RolledOut)
    );
    let next = apply(&d, &Decision::RolledOut, "a", T0 + 12_000);
    assert_eq!(next.default.as_deref(), Some("2"));
    assert_eq!(next.history.last().unwrap().event, EventKind::RolledOut);
}

#[test]
fn a_rolling_update_does_not_wait_for_a_dead_instance() {
    let mut d = rolling_out(Strategy::Rolling);
    d = apply(&d, &Decision::Join, "a", T0);
    // a switched, then died: its report is gone from the live list; b may go.
    let live = vec![report("b", T0 + 100, None)];
    assert_eq!(
        plan(&d, "b", T0 + 100, &live).prepare,
        vec!["2".to_string()]
    );
}

#[test]
fn deploy_refuses_a_second_rollout_and_the_current_default() {
    let d = rolling_out(Strategy::Canary);
    let err = start(&d, deploy(Strategy::BlueGreen), T0).unwrap_err();
    assert!(
        err.to_string()
            .contains("a canary rollout of m:2 is running"),
        "{err}"
    );
    let err = start(&desired("2"), deploy(Strategy::BlueGreen), T0).unwrap_err();
    assert!(err.to_string().contains("already the default"), "{err}");
}

#[test]
fn deploy_checks_canary_steps() {
    for steps in [
        vec![],
        vec![50],
        vec![0, 100],
        vec![50, 50, 100],
        vec![60, 101],
    ] {
        let request = DeployRequest {
            steps: steps.clone(),
            ..deploy(Strategy::Canary)
        };
        assert!(start(&desired("1"), request, T0).is_err(), "{steps:?}");
    }
    let request = DeployRequest {
        step_secs: 0,
        ..deploy(Strategy::Canary)
    };
    assert!(start(&desired("1"), request, T0).is_err());
}

#[test]
fn a_first_version_becomes_the_default_at_once() {
    let d = start(&Desired::new("m"), deploy(Strategy::Canary), T0).unwrap();
    assert_eq!(d.default.as_deref(), Some("2"));
    assert_eq!(d.rollout, None);
}

#[test]
fn rollback_stops_a_rollout_or_returns_to_what_the_last_one_replaced() {
    let d = rolling_out(Strategy::Canary);
    let back = roll_back(&d, None, "op", "bad", T0).unwrap();
    assert_eq!(
        (back.default.as_deref(), back.rollout.is_none()),
        (Some("1"), true)
    );
    assert!(roll_back(&d, Some("7"), "op", "bad", T0).is_err());

    let switched = apply(
        &rolling_out(Strategy::BlueGreen),
        &Decision::Switch,
        "a",
        T0,
    );
    let back = roll_back(&switched, None, "op", "bad", T0 + 1).unwrap();
    assert_eq!(back.default.as_deref(), Some("1"));
    assert_eq!(back.history.last().unwrap().from.as_deref(), Some("2"));
    // A second rollback has nothing to go back to (it does not flip back to 2)...
    let err = roll_back(&back, None, "op", "again", T0 + 2).unwrap_err();
    assert!(err.to_string().contains("--to VERSION"), "{err}");
    // ...unless told where.
    let forward = roll_back(&back, Some("2"), "op", "again", T0 + 2).unwrap();
    assert_eq!(forward.default.as_deref(), Some("2"));
    assert!(roll_back(&forward, Some("2"), "op", "x", T0 + 3).is_err());
}

#[test]
fn history_keeps_the_newest_entries() {
    let mut d = desired("1");
    for i in 0..(HISTORY_KEPT as u64 + 10) {
        d.record(Event {
            at_ms: i,
            event: EventKind::Deploy,
            version: "2".into(),
            from: None,
            strategy: None,
            by: "op".into(),
            reason: None,
        });
    }
    assert_eq!(d.history.len(), HISTORY_KEPT);
    assert_eq!(d.history[0].at_ms, 10);
}
