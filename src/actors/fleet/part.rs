//! This instance's part in one model's fleet rollout: what it judged of the new version on its
//! own traffic. A canary is judged step by step against the stable version over the same time
//! (the rule of `supervisor/rollout/traffic.rs`, as on one machine); a rolling update, once
//! this instance switched, on the new version's errors alone. A failure is final for the
//! rollout: the instance reports it, and the fleet rolls back (`registry::fleet::decide`).
//!
//! Pure: counters and times come in as arguments, so the rules are unit-tested here.

use crate::actors::supervisor::traffic::{self, Traffic, Verdict};
use crate::registry::fleet::canary_step;
use crate::registry::records::{Rollout, RolloutReport};

pub(super) struct Part {
    pub(super) rollout_id: String,
    /// Canary: the step being watched, and both versions' counters when it began.
    step: usize,
    canary_base: Traffic,
    stable_base: Traffic,
    passed_step: Option<usize>,
    failed: Option<String>,
    /// Rolling: when the new version became the default here, and its counters then.
    switched_at_ms: Option<u64>,
    switch_base: Traffic,
}

impl Part {
    /// Starts watching `rollout` at `now_ms` (a late joiner watches from the step in force).
    pub(super) fn new(rollout: &Rollout, now_ms: u64, canary: Traffic, stable: Traffic) -> Part {
        Part {
            rollout_id: rollout.id.clone(),
            step: canary_step(rollout, now_ms).min(rollout.steps.len().saturating_sub(1)),
            canary_base: canary,
            stable_base: stable,
            passed_step: None,
            failed: None,
            switched_at_ms: None,
            switch_base: Traffic::default(),
        }
    }

    /// The rollout cannot go on here, for `reason` (the first reason stays).
    pub(super) fn fail(&mut self, reason: String) {
        self.failed.get_or_insert(reason);
    }

    /// Canary: judges the step(s) that ended by `now_ms` on the counters since they began.
    pub(super) fn judge_canary(
        &mut self,
        rollout: &Rollout,
        now_ms: u64,
        canary: Traffic,
        stable: Traffic,
    ) {
        let step = canary_step(rollout, now_ms);
        if self.failed.is_some() || step <= self.step {
            return;
        }
        let verdict = traffic::judge(
            canary.since(self.canary_base),
            stable.since(self.stable_base),
            true,
        );
        match verdict {
            Verdict::Worse(reason) => {
                let percent = rollout.steps.get(self.step).copied().unwrap_or(100);
                self.fail(format!("step {} ({percent}%): {reason}", self.step + 1));
            }
            Verdict::Pass => {
                self.passed_step = Some(step - 1);
                self.step = step;
                self.canary_base = canary;
                self.stable_base = stable;
            }
        }
    }

    /// Rolling: `serving_new` says whether the new version is this instance's default now;
    /// from the moment it is, its errors since then are judged.
    pub(super) fn judge_rolling(&mut self, serving_new: bool, now_ms: u64, new: Traffic) {
        if !serving_new || self.failed.is_some() {
            return;
        }
        if self.switched_at_ms.is_none() {
            self.switched_at_ms = Some(now_ms);
            self.switch_base = new;
            return;
        }
        if new.requests < self.switch_base.requests {
            // Loaded again since the switch: judge from here.
            self.switch_base = new;
        }
        if let Verdict::Worse(reason) =
            traffic::judge(new.since(self.switch_base), Traffic::default(), false)
        {
            self.fail(format!("after switching: {reason}"));
        }
    }

    /// The report of this part; `prepared` says whether the new version is ready here.
    pub(super) fn report(&self, prepared: bool) -> RolloutReport {
        RolloutReport {
            id: self.rollout_id.clone(),
            prepared,
            failed: self.failed.clone(),
            passed_step: self.passed_step,
            healthy_since_ms: self.switched_at_ms.filter(|_| self.failed.is_none()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::records::Strategy;

    fn canary() -> Rollout {
        Rollout {
            id: "r1".into(),
            strategy: Strategy::Canary,
            version: "2".into(),
            from: Some("1".into()),
            started_at_ms: 1_000_000,
            started_by: "t".into(),
            steps: vec![10, 50, 100],
            step_secs: 10,
            hold_secs: 0,
            smoke_test: true,
            switched: vec![],
        }
    }

    fn traffic(requests: u64, errors: u64, mean_ms: u64) -> Traffic {
        Traffic {
            requests,
            errors,
            latency_us: requests * mean_ms * 1000,
        }
    }

    #[test]
    fn a_canary_passes_its_steps_one_by_one_and_then_the_last() {
        let r = canary();
        let mut part = Part::new(&r, r.started_at_ms, Traffic::default(), Traffic::default());
        part.judge_canary(
            &r,
            r.started_at_ms + 5_000,
            traffic(5, 0, 1),
            traffic(50, 0, 1),
        );
        assert_eq!(
            part.report(true).passed_step,
            None,
            "the step has not ended"
        );
        part.judge_canary(
            &r,
            r.started_at_ms + 10_000,
            traffic(10, 0, 1),
            traffic(90, 0, 1),
        );
        assert_eq!(part.report(true).passed_step, Some(0));
        part.judge_canary(
            &r,
            r.started_at_ms + 30_500,
            traffic(60, 0, 1),
            traffic(140, 0, 1),
        );
        let report = part.report(true);
        assert_eq!(report.passed_step, Some(2), "every step is over");
        assert_eq!(report.failed, None);
    }

    #[test]
    fn a_slow_canary_fails_with_the_step_and_the_figures() {
        let r = canary();
        let mut part = Part::new(&r, r.started_at_ms, Traffic::default(), Traffic::default());
        part.judge_canary(
            &r,
            r.started_at_ms + 10_000,
            traffic(20, 0, 40),
            traffic(200, 0, 1),
        );
        let failed = part.report(true).failed.expect("worse than stable");
        assert!(
            failed.starts_with("step 1 (10%): canary worse than stable"),
            "{failed}"
        );
        // Final: later steps do not clear it.
        part.judge_canary(
            &r,
            r.started_at_ms + 20_000,
            traffic(40, 0, 1),
            traffic(400, 0, 1),
        );
        assert_eq!(part.report(true).failed, Some(failed));
    }

    #[test]
    fn a_late_joiner_judges_from_the_step_in_force() {
        let r = canary();
        let joined = r.started_at_ms + 25_000;
        let mut part = Part::new(&r, joined, traffic(3, 0, 1), traffic(3, 0, 1));
        part.judge_canary(
            &r,
            r.started_at_ms + 31_000,
            traffic(9, 0, 1),
            traffic(3, 0, 1),
        );
        assert_eq!(part.report(true).passed_step, Some(2));
    }

    #[test]
    fn a_rolling_instance_holds_until_its_errors_say_otherwise() {
        let mut part = Part::new(
            &Rollout {
                strategy: Strategy::Rolling,
                steps: vec![],
                ..canary()
            },
            0,
            Traffic::default(),
            Traffic::default(),
        );
        part.judge_rolling(false, 100, Traffic::default());
        assert_eq!(part.report(false).healthy_since_ms, None);
        part.judge_rolling(true, 200, traffic(4, 4, 1));
        assert_eq!(part.report(true).healthy_since_ms, Some(200));
        part.judge_rolling(true, 300, traffic(24, 4, 1));
        assert_eq!(
            part.report(true).failed,
            None,
            "no new errors since the switch"
        );
        part.judge_rolling(true, 400, traffic(44, 14, 1));
        let report = part.report(true);
        assert!(report.failed.unwrap().starts_with("after switching"));
        assert_eq!(report.healthy_since_ms, None);
    }
}
