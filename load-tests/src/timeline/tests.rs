//! Unit tests of the timeline benchmark, without a server: the event plan and its
//! refusals, and when latency counts as settled.

use serde_json::json;

use super::analysis::settle_times;
use super::*;
use crate::open_loop::TimelineBin;

#[test]
fn the_default_plan_is_in_time_order() {
    let plan = TimelineOptions::default().plan().unwrap();
    let kinds: Vec<&Plan> = plan.iter().map(|(_, p)| p).collect();
    assert_eq!(
        kinds,
        vec![
            &Plan::Rate { share: 2.0 },
            &Plan::Rate { share: 0.5 },
            &Plan::PanicAll,
            &Plan::Hang {
                replica: 0,
                ms: 3000
            }
        ]
    );
    assert!(plan.windows(2).all(|w| w[0].0 < w[1].0));
}

#[test]
fn with_a_given_rate_the_step_returns_to_it() {
    let options = TimelineOptions {
        rate: Some(300.0),
        ..TimelineOptions::default()
    };
    let plan = options.plan().unwrap();
    assert_eq!(plan[0].1, Plan::Rate { share: 2.0 });
    assert_eq!(plan[1].1, Plan::Rate { share: 1.0 });
}

#[test]
fn bad_plans_are_refused() {
    let bad: [fn(&mut TimelineOptions); 4] = [
        |o| o.hang_at = At(Some(Duration::from_secs(40))),
        |o| o.panic_at = At(Some(Duration::from_secs(8))),
        |o| o.hang_ms = 100,
        |o| o.step_share = 0.0,
    ];
    for change in bad {
        let mut o = TimelineOptions::default();
        change(&mut o);
        assert!(o.plan().is_err(), "{o:?} was accepted");
    }
}

fn bin(t_ms: u64, scheduled: u64, ok: u64, degraded: u64, p99_us: u64) -> TimelineBin {
    let mut h = crate::hist::new(2);
    for _ in 0..ok + degraded {
        h.record(p99_us).unwrap();
    }
    TimelineBin {
        start: Duration::from_millis(t_ms),
        scheduled,
        sent: scheduled,
        not_sent: 0,
        ok_primary: ok,
        ok_degraded: degraded,
        shed: 0,
        failed: 0,
        latency_ok_us: Some(h),
    }
}

#[test]
fn settling_is_the_first_lasting_return_to_baseline() {
    // 0–2 s calm (5 ms); an event at 2.0 s; bins 2.0–2.3 slow, 2.3–2.4 degraded; calm after.
    let mut bins = Vec::new();
    for i in 0..40u64 {
        let t = i * 100;
        bins.push(match t {
            2000..=2200 => bin(t, 10, 10, 0, 200_000),
            2300 => bin(t, 10, 5, 5, 5_000),
            _ => bin(t, 10, 10, 0, 5_000),
        });
    }
    let events = vec![EventRecord {
        label: "x".into(),
        planned_s: 2.0,
        at_s: 2.0,
        answer: None,
    }];
    let (limits, settles) = settle_times(&bins, Duration::from_millis(100), &events, 4.0);
    let (latency, _) = limits.unwrap();
    assert!((latency - 15.0).abs() < 0.5, "{latency}");
    assert_eq!(settles.len(), 1);
    let off = settles[0]["off_baseline_s"].as_f64().unwrap();
    assert!((off - 0.4).abs() < 1e-6, "{off}");
    assert_eq!(settles[0]["settled_before_next"], json!(true));

    // A lone slow bin after a full second on baseline does not move the settling point.
    bins[36] = bin(3600, 10, 10, 0, 200_000);
    let (_, again) = settle_times(&bins, Duration::from_millis(100), &events, 4.0);
    assert_eq!(again[0]["off_baseline_s"], settles[0]["off_baseline_s"]);

    // Off baseline until the end: not settled.
    for b in bins.iter_mut().skip(24) {
        *b = bin(b.start.as_millis() as u64, 10, 0, 10, 5_000);
    }
    let (_, never) = settle_times(&bins, Duration::from_millis(100), &events, 4.0);
    assert_eq!(never[0]["settled_before_next"], json!(false));
    assert_eq!(never[0]["off_baseline_s"], json!(null));
}
