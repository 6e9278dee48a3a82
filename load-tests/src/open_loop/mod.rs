//! Open-loop REST load: requests go out at a constant rate, on a fixed schedule, whether or
//! not earlier ones have been answered (arrivals do not wait for the server, as real clients'
//! do not). Latency runs from each request's *scheduled* send time, so a server (or a load
//! generator) that falls behind shows up in the figures instead of quietly lowering the rate
//! (no coordinated omission).
//!
//! In-flight requests are bounded: a request due while the bound is reached is not sent and
//! is counted as such. Every request that is sent ends with an HTTP status or a transport
//! error (the request timeout bounds it), and the run waits for all of them: `unanswered`
//! must come out 0.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::hist::{self, Histogram};
use crate::rest::{self, Failure, RestOptions};

mod results;

pub use results::{OpenLoopReport, TimelineBin};

/// Upper bounds that keep any run finite and modest.
pub const MAX_RATE: f64 = 200_000.0;
pub const MAX_IN_FLIGHT: usize = 8192;
const SHARDS: usize = 16;

#[derive(Clone, Debug)]
pub struct OpenLoopOptions {
    /// Target, model, rows, binary, duration, warm-up, timeout and quiet as for closed loop
    /// (`concurrency` is not used).
    pub rest: RestOptions,
    /// Requests per second, on a fixed schedule.
    pub rate: f64,
    /// Rate changes: from each offset (since the start of the warm-up) on, that many requests/s,
    /// in increasing order of offset. Empty: `rate` throughout.
    pub steps: Vec<(Duration, f64)>,
    /// Width of the time bins of [`OpenLoopReport::timeline`]; `None`: no timeline.
    pub timeline_bin: Option<Duration>,
    /// Requests in flight at most; one due beyond that is not sent (and counted).
    pub max_in_flight: usize,
    /// Prefix of the progress lines.
    pub label: String,
}

impl OpenLoopOptions {
    pub fn check(&self) -> anyhow::Result<reqwest::Url> {
        let valid_rate = |r: f64| r.is_finite() && r > 0.0 && r <= MAX_RATE;
        if !valid_rate(self.rate) || self.steps.iter().any(|s| !valid_rate(s.1)) {
            bail!("rate must be more than 0 and at most {MAX_RATE} requests/s");
        }
        if self.steps.windows(2).any(|w| w[0].0 >= w[1].0) {
            bail!("rate steps must be in increasing order of time");
        }
        if let Some(bin) = self.timeline_bin {
            let total = self.rest.warmup + self.rest.duration;
            if bin < Duration::from_millis(10)
                || total.as_secs_f64() / bin.as_secs_f64() > 100_000.0
            {
                bail!("timeline bins must be at least 10 ms wide and at most 100000 in all");
            }
        }
        if self.max_in_flight == 0 || self.max_in_flight > MAX_IN_FLIGHT {
            bail!("max in-flight must be 1..={MAX_IN_FLIGHT}");
        }
        self.rest.endpoint()
    }
}

#[derive(Default)]
struct Tally {
    ok_primary: u64,
    ok_degraded: u64,
    statuses: BTreeMap<u16, u64>,
    transport: u64,
    invalid: u64,
    first_error: Option<String>,
}

struct Shard {
    tally: Tally,
    ok: Histogram,
    primary: Histogram,
    shed: Histogram,
}

struct Shared {
    shards: Vec<Mutex<Shard>>,
    /// Per-bin outcomes when a timeline was asked for (one lock: a bin update is a few adds).
    timeline: Option<(Duration, Mutex<Vec<TimelineBin>>)>,
    in_flight: AtomicU64,
    /// Outcomes recorded for requests of the measured period.
    outcomes: AtomicU64,
    /// Live counts for the progress line (all periods), by [`class`]: 200 from the model,
    /// 200 degraded, refused, other failures.
    live: [AtomicU64; 4],
}

/// Runs open-loop load as `options` say. Must run inside a multi-threaded tokio runtime. Ends
/// within warm-up + duration + request timeout + 5 s.
pub async fn run(options: &OpenLoopOptions) -> anyhow::Result<OpenLoopReport> {
    let url = options.check()?;
    let rest_options = &options.rest;
    let client = rest::http_client(options.max_in_flight, rest_options.request_timeout)?;
    let body = rest::mlp_request(rest_options.rows, 0x0BE1_0000, rest_options.binary);
    let shared = Arc::new(Shared {
        shards: (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    tally: Tally::default(),
                    ok: hist::new(3),
                    primary: hist::new(3),
                    shed: hist::new(3),
                })
            })
            .collect(),
        timeline: options.timeline_bin.map(|bin| {
            let total = rest_options.warmup + rest_options.duration;
            let n = (total.as_secs_f64() / bin.as_secs_f64()).ceil() as u32;
            let bins = (0..n).map(|i| TimelineBin::new(bin * i)).collect();
            (bin, Mutex::new(bins))
        }),
        in_flight: AtomicU64::new(0),
        outcomes: AtomicU64::new(0),
        live: Default::default(),
    });

    let start = Instant::now();
    let measure_start = start + rest_options.warmup;
    let measure_end = measure_start + rest_options.duration;
    let progress = (!rest_options.quiet).then(|| {
        tokio::spawn(progress_lines(
            options.label.clone(),
            shared.clone(),
            start,
            measure_start,
            measure_end,
        ))
    });
    let (mut scheduled_n, mut sent, mut not_sent) = (0u64, 0u64, 0u64);
    // Per-bin counts of the scheduler's own decisions (only this task touches them).
    let mut bin_counts: Vec<[u64; 3]> = shared.timeline.as_ref().map_or(Vec::new(), |(_, bins)| {
        vec![[0; 3]; bins.lock().expect("unpoisoned").len()]
    });
    let mut max_lag = Duration::ZERO;
    let mut peak = 0u64;
    let mut i: u64 = 0;
    // The schedule is a sequence of constant-rate segments: request k of a segment is due at
    // segment start + k / rate (no accumulated rounding).
    let (mut segment_start, mut segment_rate, mut k) = (0.0f64, options.rate, 0u64);
    let mut next_step = 0;
    loop {
        let mut offset = segment_start + k as f64 / segment_rate;
        while let Some(&(at, rate)) = options.steps.get(next_step) {
            if offset < at.as_secs_f64() {
                break;
            }
            (segment_start, segment_rate, k) = (at.as_secs_f64(), rate, 0);
            offset = segment_start;
            next_step += 1;
        }
        k += 1;
        let scheduled = start + Duration::from_secs_f64(offset);
        if scheduled >= measure_end {
            break;
        }
        i += 1;
        let bin = bin_index(&shared, start, scheduled);
        let now = Instant::now();
        if scheduled > now {
            tokio::time::sleep_until(scheduled.into()).await;
        } else {
            max_lag = max_lag.max(now - scheduled);
        }
        let measured = scheduled >= measure_start;
        scheduled_n += u64::from(measured);
        let in_flight = shared.in_flight.load(Ordering::Relaxed);
        let counts = bin.and_then(|b| bin_counts.get_mut(b));
        if in_flight >= options.max_in_flight as u64 {
            not_sent += u64::from(measured);
            if let Some(c) = counts {
                c[0] += 1;
                c[2] += 1;
            }
            continue;
        }
        if let Some(c) = counts {
            c[0] += 1;
            c[1] += 1;
        }
        peak = peak.max(in_flight + 1);
        sent += u64::from(measured);
        shared.in_flight.fetch_add(1, Ordering::Relaxed);
        let (client, url, body, shared) =
            (client.clone(), url.clone(), body.clone(), shared.clone());
        let rows = rest_options.rows;
        let shard = (i as usize) % SHARDS;
        tokio::spawn(async move {
            let outcome = rest::send_one(&client, &url, &body, rows).await;
            record(&shared, shard, scheduled, measured, bin, outcome);
            shared.in_flight.fetch_sub(1, Ordering::Relaxed);
        });
    }
    // Every sent request ends within the request timeout; wait for them, boundedly.
    let deadline = Instant::now() + rest_options.request_timeout + Duration::from_secs(5);
    while shared.in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if let Some(p) = progress {
        p.abort();
    }

    let mut report = OpenLoopReport {
        url: rest_options.url.clone(),
        model: rest_options.model.clone(),
        rows: rest_options.rows,
        binary: rest_options.binary,
        rate: options.rate,
        measured: rest_options.duration,
        max_in_flight: options.max_in_flight,
        scheduled: scheduled_n,
        sent,
        not_sent,
        ok_primary: 0,
        ok_degraded: 0,
        statuses: BTreeMap::new(),
        transport: 0,
        invalid: 0,
        unanswered: 0,
        first_error: None,
        latency_ok_us: hist::new(3),
        latency_primary_us: hist::new(3),
        latency_shed_us: hist::new(3),
        max_schedule_lag: max_lag,
        peak_in_flight: peak,
        started: start,
        timeline: Vec::new(),
    };
    if let Some((_, bins)) = &shared.timeline {
        let mut bins = std::mem::take(&mut *bins.lock().expect("unpoisoned"));
        for (b, c) in bins.iter_mut().zip(&bin_counts) {
            [b.scheduled, b.sent, b.not_sent] = *c;
        }
        report.timeline = bins;
    }
    for shard in &shared.shards {
        let shard = shard.lock().expect("no panics while holding a shard");
        let t = &shard.tally;
        report.ok_primary += t.ok_primary;
        report.ok_degraded += t.ok_degraded;
        for (code, n) in &t.statuses {
            *report.statuses.entry(*code).or_default() += n;
        }
        report.transport += t.transport;
        report.invalid += t.invalid;
        if report.first_error.is_none() {
            report.first_error = t.first_error.clone();
        }
        report.latency_ok_us.add(&shard.ok).expect("same bounds");
        report
            .latency_primary_us
            .add(&shard.primary)
            .expect("same bounds");
        report
            .latency_shed_us
            .add(&shard.shed)
            .expect("same bounds");
    }
    report.unanswered = sent.saturating_sub(shared.outcomes.load(Ordering::Relaxed));
    Ok(report)
}

/// The timeline bin of a request scheduled at `scheduled`, if a timeline is kept.
fn bin_index(shared: &Shared, start: Instant, scheduled: Instant) -> Option<usize> {
    let (width, _) = shared.timeline.as_ref()?;
    Some(((scheduled - start).as_nanos() / width.as_nanos().max(1)) as usize)
}

/// How a request ended, as the timeline and the progress line count it: 0 a 200 from the
/// model itself, 1 a 200 from its fallback, 2 refused (429/503), 3 any other failure.
fn class(outcome: &Result<rest::ServerSide, Failure>) -> usize {
    match outcome {
        Ok(server) if server.degraded > 0 => 1,
        Ok(_) => 0,
        Err(Failure::Status(429 | 503, _)) => 2,
        Err(_) => 3,
    }
}

fn record(
    shared: &Shared,
    shard: usize,
    scheduled: Instant,
    measured: bool,
    bin: Option<usize>,
    outcome: Result<rest::ServerSide, Failure>,
) {
    let us = hist::micros(scheduled.elapsed());
    let class = class(&outcome);
    shared.live[class].fetch_add(1, Ordering::Relaxed);
    if let (Some((_, bins)), Some(bin)) = (&shared.timeline, bin) {
        if let Some(b) = bins.lock().expect("unpoisoned").get_mut(bin) {
            *[
                &mut b.ok_primary,
                &mut b.ok_degraded,
                &mut b.shed,
                &mut b.failed,
            ][class] += 1;
            if class < 2 {
                let h = b.latency_ok_us.get_or_insert_with(|| hist::new(2));
                h.saturating_record(us);
            }
        }
    }
    if !measured {
        return;
    }
    let mut shard = shared.shards[shard]
        .lock()
        .expect("no panics while holding a shard");
    match outcome {
        Ok(server) => {
            shard.ok.saturating_record(us);
            if server.degraded > 0 {
                shard.tally.ok_degraded += 1;
            } else {
                shard.tally.ok_primary += 1;
                shard.primary.saturating_record(us);
            }
        }
        Err(failure) => {
            match &failure {
                Failure::Status(code, _) => {
                    *shard.tally.statuses.entry(*code).or_default() += 1;
                    if *code == 429 || *code == 503 {
                        shard.shed.saturating_record(us);
                    }
                }
                Failure::Transport(_) => shard.tally.transport += 1,
                Failure::Invalid(_) => shard.tally.invalid += 1,
            }
            // Refusals are expected under overload; remember the first other failure.
            let refusal = matches!(failure, Failure::Status(429 | 503, _));
            if shard.tally.first_error.is_none() && !refusal {
                shard.tally.first_error = Some(failure.describe());
            }
        }
    }
    drop(shard);
    shared.outcomes.fetch_add(1, Ordering::Relaxed);
}

async fn progress_lines(
    label: String,
    shared: Arc<Shared>,
    start: Instant,
    measure_start: Instant,
    measure_end: Instant,
) {
    let mut last = [0u64; 4];
    rest::progress_ticks(start, measure_start, measure_end, |t, phase| {
        let current = shared.live.each_ref().map(|n| n.load(Ordering::Relaxed));
        eprintln!(
            "[{label}] {t:>4.0}s {phase:<8} ok {:>6}/s  degraded {:>6}/s  refused {:>6}/s  other {:>5}/s  in flight {}",
            current[0] - last[0],
            current[1] - last[1],
            current[2] - last[2],
            current[3] - last[3],
            shared.in_flight.load(Ordering::Relaxed),
        );
        last = current;
    })
    .await
}

#[cfg(test)]
mod tests;
