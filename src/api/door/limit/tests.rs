//! The adaptive rule on its own (no clocks), and the door over real time.

use super::*;

fn controller() -> Controller {
    Controller {
        limit: 64.0,
        min: 8.0,
        max: 4096.0,
        late_windows: 0,
        best_rate: 0.0,
        to_answer_time: 0.0,
        fit_time: 0.010,
    }
}

fn window(answers: u32, late: u32, saturated: bool) -> Window {
    Window {
        answers,
        late,
        saturated,
        peak: 1000,
        overflowed: false,
        to_answer_secs: 0.0,
        rate: 0.0,
        busy: 0.0,
        to_fallback: false,
    }
}

#[test]
fn late_answers_shrink_the_limit_down_to_its_floor() {
    let mut c = controller();
    assert_eq!(
        c.after(window(100, 50, true), 1),
        64.0,
        "one late window is a burst"
    );
    assert_eq!(
        c.after(window(100, 50, true), 1),
        64.0,
        "two are a long burst"
    );
    assert_eq!(c.after(window(100, 50, true), 1), 64.0 * 0.8);
    for _ in 0..50 {
        c.after(window(100, 50, true), 1);
    }
    assert_eq!(c.limit, 8.0);
}

#[test]
fn late_answers_of_as_many_as_fit_do_not_cut_the_limit_until_the_door_refuses() {
    let mut c = controller();
    c.limit = 4096.0;
    // A closed loop of 128 connections that the server answers at 20k/s, each answer
    // 0.5 ms in its model: with 10 ms (twice a 5 ms target) besides, 210 fit. Their
    // answers are late all the same (waiting for the HTTP thread, say), but refusing some
    // would not make the others faster.
    let pool = Window {
        peak: 128,
        rate: 20_000.0,
        to_answer_secs: 100.0 * 0.0005,
        ..window(100, 50, false)
    };
    for _ in 0..10 {
        assert_eq!(c.after(pool, 1), 4096.0);
    }
    assert!((c.fits() - 210.0).abs() < 1e-6, "{}", c.fits());
    // Those windows counted as on time: once the door refuses, the plain rule's three
    // late windows in a row start from the first refusing one.
    let refusing = Window {
        peak: 150,
        overflowed: true,
        ..pool
    };
    assert_eq!(c.after(refusing, 1), 4096.0);
    assert_eq!(c.after(refusing, 1), 4096.0);
    assert_eq!(c.after(refusing, 1), 120.0);
    // And late windows go on cutting below what fits while the door refuses.
    for _ in 0..50 {
        c.after(refusing, 1);
    }
    assert_eq!(c.limit, 8.0);
    // More inside than fit is cut too, refused or not.
    let mut c = controller();
    let crowded = Window {
        peak: 1000,
        rate: 20_000.0,
        ..window(100, 50, true)
    };
    c.after(crowded, 1);
    c.after(crowded, 1);
    assert_eq!(c.after(crowded, 1), 64.0 * 0.8);
}

#[test]
fn what_fits_follows_a_server_that_got_slower() {
    let fast = Window {
        rate: 20_000.0,
        ..window(100, 0, false)
    };
    let mut c = controller();
    c.after(fast, 1);
    let slower = Window {
        rate: 5_000.0,
        ..window(100, 0, false)
    };
    // About 3.5 s of windows halve the best rate.
    for _ in 0..69 {
        c.after(slower, 1);
    }
    assert!((95.0..105.0).contains(&c.fits()), "{}", c.fits());
    for _ in 0..400 {
        c.after(slower, 1);
    }
    assert_eq!(c.fits(), 50.0);
    // A quiet spell counts its windows too.
    let mut c = controller();
    c.after(fast, 1);
    c.after(slower, 69);
    assert!((95.0..105.0).contains(&c.fits()), "{}", c.fits());
}

#[test]
fn a_cut_starts_from_what_was_inside_not_from_an_unreached_limit() {
    let mut c = controller();
    c.limit = 4096.0;
    let w = Window {
        peak: 300,
        ..window(100, 50, false)
    };
    c.after(w, 1);
    c.after(w, 1);
    assert_eq!(c.after(w, 1), 240.0);
}

#[test]
fn a_busy_cpu_sending_the_overflow_to_a_fallback_cuts_below_the_floor() {
    let late_busy = |to_fallback: bool| Window {
        busy: 1.0,
        to_fallback,
        overflowed: true,
        ..window(100, 50, true)
    };
    let cut_with = |w: Window| {
        let mut c = controller();
        for _ in 0..50 {
            c.after(w, 1);
        }
        c.limit
    };
    assert_eq!(
        cut_with(late_busy(true)),
        4.0,
        "model answers make way for the fallback's"
    );
    assert_eq!(
        cut_with(late_busy(false)),
        8.0,
        "refusals only: the floor holds"
    );
    assert_eq!(
        cut_with(Window {
            busy: 0.5,
            ..late_busy(true)
        }),
        8.0,
        "late, but the CPU is not what is short"
    );
    // Below the floor only while the CPU is busy and the overflow goes to a fallback: once a
    // window is not that (no fallback any more, or room on the CPU), back at the floor.
    let mut c = controller();
    c.limit = 4.0;
    c.after(late_busy(true), 1);
    assert_eq!(c.limit, 4.0);
    c.after(late_busy(false), 1);
    assert_eq!(c.limit, 8.0, "the fallback went away");
    c.limit = 4.0;
    c.after(window(100, 50, true), 1);
    assert_eq!(c.limit, 8.0, "the CPU had room");
}

#[test]
fn a_quiet_spell_on_a_busy_cpu_does_not_grow_the_limit() {
    let mut c = controller();
    c.limit = 16.0;
    let busy = Window {
        busy: 1.0,
        ..window(5, 0, false)
    };
    assert_eq!(c.after(busy, 21), 16.0);
    assert!(c.after(window(5, 0, false), 21) >= 150.0, "{}", c.limit);
}

#[test]
fn a_busy_cpu_keeping_up_keeps_its_limit_and_does_not_grow_it() {
    let mut c = controller();
    let busy_on_time = Window {
        busy: 0.99,
        overflowed: true,
        to_fallback: true,
        ..window(100, 0, true)
    };
    for _ in 0..50 {
        assert_eq!(c.after(busy_on_time, 1), 64.0);
    }
    let idle_on_time = Window {
        busy: 0.5,
        ..busy_on_time
    };
    assert!(c.after(idle_on_time, 1) > 64.0, "room on the CPU: it grows");
}

#[test]
fn a_full_window_within_the_target_grows_the_limit_and_recovers_within_a_second() {
    let mut c = controller();
    c.limit = 8.0;
    let windows_per_second = (Duration::from_secs(1).as_millis() / WINDOW.as_millis()) as u32;
    for _ in 0..windows_per_second {
        c.after(window(100, 0, true), 1);
    }
    assert!(c.limit >= 100.0, "{}", c.limit);
    for _ in 0..1000 {
        c.after(window(100, 0, true), 1);
    }
    assert_eq!(c.limit, 4096.0);
}

#[test]
fn a_limit_that_is_not_reached_stays_where_it_is_until_the_server_was_idle() {
    let mut c = controller();
    assert_eq!(c.after(window(100, 0, false), 1), 64.0);
    // Too few answers to judge, and a tenth late is within the rule.
    assert_eq!(c.after(window(3, 3, false), 1), 64.0);
    assert_eq!(c.after(window(100, 10, false), 1), 64.0);
    // A second without answers, then answers within the target: grown back past where
    // the overloads of the load suite settle it.
    c.limit = 16.0;
    assert!(c.after(window(5, 0, false), 21) >= 150.0, "{}", c.limit);
}

#[test]
fn the_door_refuses_past_its_limit_and_lets_in_again_when_a_place_frees() {
    let door = Arc::new(AdmissionLimit::new(
        Admission::Static,
        2,
        Duration::from_millis(20),
    ));
    let a = door.try_enter().unwrap();
    let _b = door.try_enter().unwrap();
    assert!(door.try_enter().is_none());
    assert!(door.refusing());
    a.answered_after(Duration::from_millis(1));
    assert!(door.try_enter().is_some());
    assert_eq!(door.limit(), 2);
}

#[test]
fn a_pool_that_keeps_as_many_inside_as_fit_is_never_refused_however_late_its_answers() {
    let door = Arc::new(AdmissionLimit::new(
        Admission::Adaptive,
        0,
        Duration::from_millis(5),
    ));
    // 64 connections, each sending its next request as soon as the last is answered;
    // every answer reports 20 ms outside the model (four times the target), at the
    // rate a loop without a model answers (far more than 64 fit in 10 ms of it).
    let mut pool: std::collections::VecDeque<_> =
        (0..64).map(|_| door.try_enter().unwrap()).collect();
    let until = Instant::now() + 8 * WINDOW;
    while Instant::now() < until {
        pool.pop_front()
            .unwrap()
            .answered_after(Duration::from_millis(20));
        pool.push_back(
            door.try_enter()
                .expect("a place for the pool's next request"),
        );
    }
    assert_eq!(door.limit(), DEFAULT_MAX_LIMIT);
    assert!(!door.refusing());
}

/// Answers `permit` as a request that waited `before_door` in its socket before the door took
/// it, and `late` after its model answered; its model's queue and compute took the rest of its
/// time inside.
fn answer(permit: AdmissionPermit, before_door: Duration, late: Duration) {
    let received = permit.entered - before_door;
    let to_answer = (before_door + permit.entered.elapsed()).saturating_sub(late);
    let response = InferResponse {
        outputs: Vec::new(),
        batch_size: 1,
        queue_time: to_answer,
        compute_time: Duration::ZERO,
        served_by: Arc::new(("m".into(), "1".into())),
        degraded: false,
    };
    permit.answered(received, &response);
}

/// `inside` requests kept inside the door for a second, each answered as [`answer`] says,
/// `inside / 4` a window (so each is inside for about four windows, 200 ms). The door's limit
/// after it, and whether it refused.
fn keep_inside(inside: usize, before_door: Duration, late: Duration) -> (usize, bool) {
    let door = Arc::new(AdmissionLimit::new(
        Admission::Adaptive,
        0,
        Duration::from_millis(5),
    ));
    // As if they had been coming for a while: those answered in the first window came in
    // four windows ago, those of the fourth one window ago.
    let mut queue: std::collections::VecDeque<_> = (0..inside)
        .map(|i| {
            let mut permit = door.try_enter().unwrap();
            permit.entered -= WINDOW * (4 - (4 * i / inside) as u32);
            permit
        })
        .collect();
    let mut refused = false;
    let until = Instant::now() + 20 * WINDOW;
    while Instant::now() < until {
        for _ in 0..inside / 4 {
            if let Some(permit) = queue.pop_front() {
                answer(permit, before_door, late);
            }
            match door.try_enter() {
                Some(permit) => queue.push_back(permit),
                None => refused = true,
            }
        }
        std::thread::sleep(WINDOW);
    }
    (door.limit(), refused)
}

#[test]
fn a_backlog_before_the_door_is_cut_however_long_it_waited_there() {
    // An overload: 400 inside the door, each after 300 ms in its socket, each answer 100 ms
    // late (the HTTP thread is behind), about 2k answers a second. Counted whole, the 300 ms
    // made 2k/s x 310 ms = 620 places fit, more than were inside, and the door never cut.
    let (limit, refused) = keep_inside(400, Duration::from_millis(300), Duration::from_millis(100));
    assert!(limit < 400, "the limit stayed at {limit}");
    assert!(refused);
}

#[test]
fn a_pool_waiting_its_turn_before_the_door_and_for_a_slow_model_still_fits() {
    // A pool of 400 connections: each request waits 30 ms in its socket for its turn and
    // 170 ms in its model, and its answer 20 ms for the HTTP thread. Its time inside is what
    // the server takes for it, so refusing some would not make the others faster.
    let (limit, refused) = keep_inside(400, Duration::from_millis(30), Duration::from_millis(20));
    assert_eq!(limit, DEFAULT_MAX_LIMIT);
    assert!(!refused);
}

#[test]
fn static_without_a_limit_lets_everyone_in() {
    let door = Arc::new(AdmissionLimit::new(
        Admission::Static,
        0,
        Duration::from_millis(20),
    ));
    let permits: Vec<_> = (0..10_000).map(|_| door.try_enter().unwrap()).collect();
    assert_eq!(permits.len(), 10_000);
    assert_eq!(door.limit(), usize::MAX);
    assert!(!door.refusing());
}

#[test]
fn the_adaptive_limit_starts_at_its_ceiling() {
    let small = AdmissionLimit::new(Admission::Adaptive, 4, Duration::from_millis(20));
    assert_eq!(small.limit(), 4);
    let default = AdmissionLimit::new(Admission::Adaptive, 0, Duration::from_millis(20));
    assert_eq!(default.limit(), DEFAULT_MAX_LIMIT);
}

#[test]
fn past_the_limit_a_model_with_a_fallback_gets_the_fallbacks_places_then_429() {
    let door = Arc::new(AdmissionLimit::new(
        Admission::Static,
        2,
        Duration::from_millis(20),
    ));
    let admitted: Vec<_> = (0..2)
        .map(|_| match door.enter(|| true) {
            Entry::Admitted(permit) => permit,
            _ => panic!("a place within the limit"),
        })
        .collect();
    assert!(admitted.iter().all(|p| !p.to_fallback()));
    // Past the limit: a model without a fallback is refused; one with a fallback gets one
    // of the fallbacks' places, as many as the limit.
    assert!(matches!(door.enter(|| false), Entry::Refused));
    let to_fallback: Vec<_> = (0..2)
        .map(|_| match door.enter(|| true) {
            Entry::Fallback(permit) => permit,
            _ => panic!("a fallback's place"),
        })
        .collect();
    assert!(to_fallback.iter().all(|p| p.to_fallback()));
    assert!(matches!(door.enter(|| true), Entry::Refused));
    assert!(door.refusing(), "an overflow turns new streams away");
    // A fallback's place given back lets the next overflow in there, not within the limit.
    drop(to_fallback);
    assert!(matches!(door.enter(|| false), Entry::Refused));
    assert!(matches!(door.enter(|| true), Entry::Fallback(_)));
    // A place within the limit given back is the next request's, fallback or not.
    drop(admitted);
    assert!(matches!(door.enter(|| true), Entry::Admitted(_)));
}

#[test]
fn the_fallbacks_places_start_at_the_floor_and_move_by_the_rule_on_their_own_answers() {
    let door = Arc::new(AdmissionLimit::new(
        Admission::Adaptive,
        256,
        Duration::from_millis(5),
    ));
    let fallback_limit = |door: &AdmissionLimit| door.lock().fallback.controller.limit;
    assert_eq!(fallback_limit(&door), MIN_LIMIT as f64);
    // Every place within the limit is taken and held. Past it, the fallbacks' places fill,
    // more arrive than they hold, and the fallbacks answer: first on time, then late.
    let _held: Vec<_> = (0..256).map(|_| door.try_enter().unwrap()).collect();
    let mut inside = std::collections::VecDeque::new();
    let mut overflow_for = |span: Duration, wait: Duration| {
        let until = Instant::now() + span;
        while Instant::now() < until {
            while let Entry::Fallback(permit) = door.enter(|| true) {
                inside.push_back(permit);
            }
            let answered: Option<AdmissionPermit> = inside.pop_front();
            answered
                .expect("a fallback's place to give back")
                .answered_after(wait);
        }
    };
    overflow_for(6 * WINDOW, Duration::from_millis(1));
    let grown = fallback_limit(&door);
    assert!(
        grown > MIN_LIMIT as f64,
        "on time and full, it grows: {grown}"
    );
    overflow_for(8 * WINDOW, Duration::from_millis(20));
    let cut = fallback_limit(&door);
    assert!(cut < grown, "late, it is cut: {grown} -> {cut}");
    assert_eq!(
        door.limit(),
        256,
        "the limit itself is moved by its own answers only"
    );
}
