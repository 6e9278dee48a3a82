//! The run itself: the closed-loop capacity measurement (unless a rate is given), then the
//! open loop with its rate steps, the faults injected through the admin API on schedule, and
//! the server's `/metrics` scraped alongside.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::json;

use super::{EventRecord, Plan, ServerSample, TimelineOptions, ADMIN_TOKEN, SCRAPE_EVERY};
use crate::bench::cpu_since;
use crate::open_loop::{self, OpenLoopOptions, OpenLoopReport};
use crate::overload::PRIMARY;
use crate::prometheus;
use crate::rest::{self, RestOptions};
use crate::sysinfo::{wait_for_quiet, CpuShare, CpuSnapshot};

fn plan_label(plan: &Plan, reference_rate: f64) -> String {
    match plan {
        Plan::Rate { share } => format!("rate {:.0}/s ({share}×)", reference_rate * share),
        Plan::PanicAll => "every replica panics".into(),
        Plan::Hang { replica, ms } => format!("replica {replica} hangs {ms} ms"),
    }
}

async fn scrape(client: &reqwest::Client, base: &str, t0: Instant) -> Option<ServerSample> {
    let text = prometheus::fetch(client, base).await?;
    let label = format!("model=\"{PRIMARY}\"");
    let m = |name: &str| prometheus::sum(&text, name, &label, None);
    Some(ServerSample {
        t_s: t0.elapsed().as_secs_f64(),
        healthy_replicas: m("streamserve_workers"),
        queue_depth: m("streamserve_queue_depth"),
        restarts: m("streamserve_worker_restarts_total"),
        overloaded: m("streamserve_overloaded"),
    })
}

async fn inject(client: &reqwest::Client, base: &str, plan: &Plan) -> String {
    let body = match plan {
        Plan::PanicAll => json!({ "fault": { "kind": "panic" } }),
        Plan::Hang { replica, ms } => {
            json!({ "fault": { "kind": "hang", "ms": ms }, "replica": replica })
        }
        Plan::Rate { .. } => return String::new(),
    };
    match client
        .post(format!("{base}/admin/models/{PRIMARY}/faults"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&body)
        .send()
        .await
    {
        Ok(r) => {
            let status = r.status().as_u16();
            format!("{status} {}", r.text().await.unwrap_or_default().trim())
        }
        Err(e) => format!("admin request failed: {e}"),
    }
}

/// Everything measured in one run.
pub(super) struct Measured {
    /// The closed-loop capacity run (req/s, p99 ms), when the rate was not given.
    pub(super) capacity: Option<(f64, f64)>,
    /// What the shares are multiples of: the capacity, or the given rate.
    pub(super) reference_rate: f64,
    pub(super) base_rate: f64,
    pub(super) events: Vec<EventRecord>,
    pub(super) server: Vec<ServerSample>,
    pub(super) report: OpenLoopReport,
    pub(super) cpu: Option<CpuShare>,
}

pub(super) fn run_on(
    options: &TimelineOptions,
    plan: &[(Duration, Plan)],
    base: &str,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<Measured> {
    let closed = options.mlp.capacity_load(base);
    let (capacity, reference_rate, base_rate) = match options.rate {
        Some(rate) => (None, rate, rate),
        None => {
            wait_for_quiet(crate::sysinfo::QUIET_CORES, options.mlp.common.quiet_wait);
            eprintln!(
                "[timeline] capacity: closed loop, concurrency {} ...",
                options.mlp.capacity_concurrency
            );
            let report = runtime.block_on(rest::run(&closed))?;
            eprint!("{}", report.summary());
            let rps = report.requests_per_sec();
            if rps <= 0.0 {
                bail!(
                    "the capacity run had no successful request:\n{}",
                    report.summary()
                );
            }
            (
                Some((rps, report.latency_ms(0.99))),
                rps,
                rps * options.base_share,
            )
        }
    };
    std::thread::sleep(Duration::from_secs(1));
    wait_for_quiet(crate::sysinfo::QUIET_CORES, options.mlp.common.quiet_wait);

    let steps: Vec<(Duration, f64)> = plan
        .iter()
        .filter_map(|(at, p)| match p {
            Plan::Rate { share } => Some((*at, reference_rate * share)),
            _ => None,
        })
        .collect();
    let open = OpenLoopOptions {
        rest: RestOptions {
            duration: options.duration,
            warmup: Duration::ZERO,
            ..closed
        },
        rate: base_rate,
        steps,
        timeline_bin: Some(options.bin),
        max_in_flight: options.mlp.max_in_flight,
        label: "timeline".into(),
    };
    open.check()?;
    let client = crate::sysinfo::metrics_client()?;

    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let scraper = {
        let (client, base, stop) = (client.clone(), base.to_string(), stop.clone());
        let bound = options.duration + Duration::from_secs(60);
        runtime.spawn(async move {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(SCRAPE_EVERY);
            while !stop.load(Ordering::Relaxed) && t0.elapsed() < bound {
                tick.tick().await;
                samples.extend(scrape(&client, &base, t0).await);
            }
            samples
        })
    };
    let faults: Vec<_> = plan
        .iter()
        .filter(|(_, p)| !matches!(p, Plan::Rate { .. }))
        .map(|(at, p)| {
            let (client, base, p, at) = (client.clone(), base.to_string(), p.clone(), *at);
            runtime.spawn(async move {
                tokio::time::sleep_until((t0 + at).into()).await;
                let sent = Instant::now();
                let answer = inject(&client, &base, &p).await;
                (at, p, sent, answer)
            })
        })
        .collect();
    eprintln!(
        "[timeline] open loop at {base_rate:.0}/s for {:.0} s, events: {}",
        options.duration.as_secs_f64(),
        plan.iter()
            .map(|(at, p)| format!(
                "{:.1} s {}",
                at.as_secs_f64(),
                plan_label(p, reference_rate)
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let before = CpuSnapshot::take();
    let report = runtime.block_on(open_loop::run(&open));
    let cpu = cpu_since(before);
    stop.store(true, Ordering::Relaxed);
    let report = report?;
    let mut server = runtime.block_on(scraper).unwrap_or_default();
    // One more look once everything is answered: the state the run left the server in.
    server.extend(runtime.block_on(scrape(&client, base, t0)));
    let offset = report.started.saturating_duration_since(t0).as_secs_f64();
    for s in &mut server {
        s.t_s -= offset;
    }
    let mut events: Vec<EventRecord> = plan
        .iter()
        .filter(|(_, p)| matches!(p, Plan::Rate { .. }))
        .map(|(at, p)| EventRecord {
            label: plan_label(p, reference_rate),
            planned_s: at.as_secs_f64(),
            at_s: at.as_secs_f64(),
            answer: None,
        })
        .collect();
    for task in faults {
        let (at, p, sent, answer) = runtime
            .block_on(task)
            .context("a fault injection task failed")?;
        events.push(EventRecord {
            label: plan_label(&p, reference_rate),
            planned_s: at.as_secs_f64(),
            at_s: sent.saturating_duration_since(report.started).as_secs_f64(),
            answer: Some(answer),
        });
    }
    events.sort_by(|a, b| a.planned_s.total_cmp(&b.planned_s));
    Ok(Measured {
        capacity,
        reference_rate,
        base_rate,
        events,
        server,
        report,
        cpu,
    })
}
