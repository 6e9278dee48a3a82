//! Unit tests of the open-loop generator: option bounds, and runs against a loopback port
//! nobody listens on that check every scheduled request is accounted for, per bin too.

use super::*;

/// Options against `url`, 100 requests/s, at most 64 in flight.
fn options(url: String) -> OpenLoopOptions {
    OpenLoopOptions {
        rest: RestOptions {
            url,
            ..RestOptions::default()
        },
        rate: 100.0,
        steps: Vec::new(),
        timeline_bin: None,
        max_in_flight: 64,
        label: "t".into(),
    }
}

/// `check` accepts `base` and refuses it after each of `bad`.
fn refused(base: OpenLoopOptions, bad: &[fn(&mut OpenLoopOptions)]) {
    assert!(base.check().is_ok());
    for change in bad {
        let mut o = base.clone();
        change(&mut o);
        assert!(o.check().is_err(), "{o:?} was accepted");
    }
}

#[test]
fn bounds() {
    refused(
        options("http://127.0.0.1:9".into()),
        &[
            |o| o.rate = 0.0,
            |o| o.rate = f64::NAN,
            |o| o.rate = MAX_RATE * 2.0,
            |o| o.max_in_flight = 0,
            |o| o.rest.url = "http://10.1.1.1:9".into(),
        ],
    );
}

#[test]
fn steps_must_be_ordered_and_valid() {
    let mut base = options("http://127.0.0.1:9".into());
    base.steps = vec![
        (Duration::from_secs(1), 10.0),
        (Duration::from_secs(2), 20.0),
    ];
    base.timeline_bin = Some(Duration::from_millis(100));
    refused(
        base,
        &[
            |o| {
                o.steps = vec![
                    (Duration::from_secs(2), 10.0),
                    (Duration::from_secs(1), 20.0),
                ]
            },
            |o| o.steps = vec![(Duration::from_secs(1), 0.0)],
            |o| o.timeline_bin = Some(Duration::from_millis(1)),
        ],
    );
}

/// Runs `change`d options against a loopback port nobody listens on.
fn run_against_nobody(change: impl FnOnce(&mut OpenLoopOptions)) -> OpenLoopReport {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut options = options(format!("http://127.0.0.1:{port}"));
    options.rest.request_timeout = Duration::from_secs(2);
    change(&mut options);
    options.check().unwrap();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(&options))
        .unwrap()
}

/// Against a port nobody listens on, every request ends as a transport error: all
/// accounted for, none unanswered.
#[test]
fn every_request_is_accounted_for() {
    let report = run_against_nobody(|o| {
        (o.rest.duration, o.rest.warmup) = (Duration::from_millis(500), Duration::from_millis(100));
        (o.rate, o.max_in_flight) = (200.0, 16);
    });
    assert!(
        report.scheduled >= 90 && report.scheduled <= 110,
        "{report:?}"
    );
    assert_eq!(report.sent + report.not_sent, report.scheduled);
    assert_eq!(report.unanswered, 0, "{}", report.summary());
    assert_eq!(report.transport, report.sent, "{}", report.summary());
    assert_eq!(report.ok(), 0);
}

/// A stepped rate with a timeline: each bin holds the requests its segment's rate
/// schedules, and every scheduled request lands in exactly one bin.
#[test]
fn rate_steps_and_timeline_bins() {
    let report = run_against_nobody(|o| {
        (o.rest.duration, o.rest.warmup) = (Duration::from_millis(800), Duration::from_millis(200));
        o.steps = vec![(Duration::from_millis(500), 400.0)];
        (o.timeline_bin, o.max_in_flight) = (Some(Duration::from_millis(250)), 1000);
    });
    let counts: Vec<u64> = report.timeline.iter().map(|b| b.scheduled).collect();
    assert_eq!(counts, vec![25, 25, 100, 100], "{report:?}");
    let starts: Vec<u128> = report
        .timeline
        .iter()
        .map(|b| b.start.as_millis())
        .collect();
    assert_eq!(starts, vec![0, 250, 500, 750]);
    for b in &report.timeline {
        assert_eq!(b.sent + b.not_sent, b.scheduled);
        // Nobody listens: every sent request failed, none vanished.
        assert_eq!(b.failed, b.sent, "{b:?}");
        assert_eq!(b.ok_primary + b.ok_degraded + b.shed, 0);
        assert!(b.latency_ms(0.5).is_none());
    }
    // The measured period (from 200 ms) holds 5 + 25 + 200 requests.
    assert_eq!(report.scheduled, 230, "{}", report.summary());
    assert_eq!(report.unanswered, 0);
}
