//! The closed loop itself: `concurrency` tasks each sending one request after another and
//! keeping their own tallies, merged at the end; the HTTP client, one request's send and check,
//! and the progress lines are shared with the open loop.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use reqwest::Url;

use super::{
    check_mlp_response, mlp_request, RequestBody, RestOptions, RestReport, ServerSide,
    HEADER_CONTENT_LENGTH, POOL_IDLE_TIMEOUT,
};
use crate::protocols::tally::{self, Period};

/// Counters shared with the progress printer.
#[derive(Default)]
struct Live {
    ok: AtomicU64,
    errors: AtomicU64,
}

pub(crate) enum Failure {
    Status(u16, String),
    Transport(String),
    Invalid(String),
}

impl Failure {
    pub(crate) fn kind(&self) -> String {
        match self {
            Failure::Status(code, _) => format!("http {code}"),
            Failure::Transport(_) => "transport".into(),
            Failure::Invalid(_) => "invalid response".into(),
        }
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            Failure::Status(code, body) => format!("HTTP {code}: {body}"),
            Failure::Transport(e) => format!("transport: {e}"),
            Failure::Invalid(e) => format!("invalid response: {e}"),
        }
    }
}

impl tally::Counted for Failure {
    fn key(self) -> String {
        self.kind()
    }

    fn text(&self) -> String {
        self.describe()
    }
}

pub(crate) async fn send_one(
    client: &reqwest::Client,
    url: &Url,
    body: &RequestBody,
    rows: usize,
) -> Result<ServerSide, Failure> {
    let mut request = client.post(url.clone()).body(body.body.clone());
    request = match body.json_length {
        Some(n) => request
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .header(HEADER_CONTENT_LENGTH, n.to_string()),
        None => request.header(reqwest::header::CONTENT_TYPE, "application/json"),
    };
    let response = request
        .send()
        .await
        .map_err(|e| Failure::Transport(error_chain(&e)))?;
    let status = response.status();
    let json_length = response
        .headers()
        .get(HEADER_CONTENT_LENGTH)
        .map(|v| v.to_str().ok().and_then(|s| s.trim().parse::<usize>().ok()));
    let bytes = response
        .bytes()
        .await
        .map_err(|e| Failure::Transport(error_chain(&e)))?;
    if !status.is_success() {
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned();
        return Err(Failure::Status(status.as_u16(), text));
    }
    let json_length = match json_length {
        None => None,
        Some(Some(n)) => Some(n),
        Some(None) => {
            return Err(Failure::Invalid(format!(
                "{HEADER_CONTENT_LENGTH} is not a byte count"
            )))
        }
    };
    check_mlp_response(&bytes, json_length, rows).map_err(Failure::Invalid)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// Sends `body` again and again until the end of `period`, counting into `stats` (this task's
/// own tally, no locking on the hot path; empty, its `rows` those of `body`).
async fn task_loop(
    client: reqwest::Client,
    url: Url,
    body: RequestBody,
    mut stats: RestReport,
    period: Period,
    live: Arc<Live>,
) -> RestReport {
    while Instant::now() < period.end {
        let started = Instant::now();
        let outcome = send_one(&client, &url, &body, stats.rows).await;
        let done = Instant::now();
        let counter = if outcome.is_ok() {
            &live.ok
        } else {
            &live.errors
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let transport = matches!(outcome, Err(Failure::Transport(_)));
        // A request counts towards the period in which it completed; one that completes after
        // the end of the measured period is not counted at all.
        tally::record(&mut stats, period, (started, done), outcome);
        if transport {
            // Connection refused and the like fail instantly: do not spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    stats
}

/// Runs closed-loop load as `options` say and returns what it measured. Must run inside a
/// multi-threaded tokio runtime. Ends within warm-up + duration + one request timeout.
pub async fn run(options: &RestOptions) -> anyhow::Result<RestReport> {
    let url = options.endpoint()?;
    let client = http_client(options.concurrency, options.request_timeout)?;

    let start = Instant::now();
    let measure_start = start + options.warmup;
    let measure_end = measure_start + options.duration;
    let live = Arc::new(Live::default());
    let mut tasks = tokio::task::JoinSet::new();
    let mut report = RestReport::empty(
        &options.url,
        &options.model,
        options.concurrency,
        options.rows,
        options.binary,
    );
    let period = Period {
        start: measure_start,
        end: measure_end,
    };
    for i in 0..options.concurrency {
        let body = mlp_request(options.rows, 0x5EED_0000 + i as u64, options.binary);
        tasks.spawn(task_loop(
            client.clone(),
            url.clone(),
            body,
            report.clone(),
            period,
            live.clone(),
        ));
    }
    let progress = (!options.quiet).then(|| {
        let live = live.clone();
        let label = format!("c={}", options.concurrency);
        tokio::spawn(progress_lines(
            label,
            live,
            start,
            measure_start,
            measure_end,
        ))
    });

    let deadline = measure_end + options.request_timeout + Duration::from_secs(5);
    let joined = join_tallies(tasks, &mut report, deadline, "load").await;
    if let Some(p) = progress {
        p.abort();
    }
    report.measured = options.duration;
    joined.map(|()| report)
}

/// Waits for every task of a load loop (`what`: "load", "gRPC load") and adds their tallies to
/// `report`; aborts them all when they have not finished by `deadline`.
pub(crate) async fn join_tallies(
    mut tasks: tokio::task::JoinSet<RestReport>,
    report: &mut RestReport,
    deadline: Instant,
    what: &str,
) -> anyhow::Result<()> {
    let joined = tokio::time::timeout_at(deadline.into(), async {
        while let Some(result) = tasks.join_next().await {
            report.absorb(result.with_context(|| format!("a {what} task panicked"))?);
        }
        anyhow::Ok(())
    })
    .await;
    match joined {
        Ok(result) => result,
        Err(_) => {
            tasks.abort_all();
            bail!("{what} tasks did not finish by their deadline");
        }
    }
}

/// The HTTP client of both load loops, keeping up to `pool` idle connections.
pub(crate) fn http_client(pool: usize, timeout: Duration) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy() // loopback only: never route through an HTTP(S)_PROXY from the environment
        .tcp_nodelay(true)
        .pool_max_idle_per_host(pool)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(5))
        .build()
        .context("cannot build the HTTP client")
}

/// Ticks every second from `start` + 1 s for the progress lines of both load loops, each with
/// the seconds since `start` and the phase of the second that just ended (named by its middle).
pub(crate) async fn progress_ticks(
    start: Instant,
    measure_start: Instant,
    measure_end: Instant,
    mut line: impl FnMut(f64, &str),
) {
    let mut tick = tokio::time::interval_at(
        (start + Duration::from_secs(1)).into(),
        Duration::from_secs(1),
    );
    loop {
        let now: Instant = tick.tick().await.into();
        let middle = now - Duration::from_millis(500);
        let phase = if middle < measure_start {
            "warm-up"
        } else if middle <= measure_end {
            "measure"
        } else {
            "draining"
        };
        line(now.duration_since(start).as_secs_f64(), phase);
    }
}

async fn progress_lines(
    label: String,
    live: Arc<Live>,
    start: Instant,
    measure_start: Instant,
    measure_end: Instant,
) {
    let mut last_ok = 0u64;
    progress_ticks(start, measure_start, measure_end, |t, phase| {
        let (ok, err) = (
            live.ok.load(Ordering::Relaxed),
            live.errors.load(Ordering::Relaxed),
        );
        eprintln!(
            "[loadgen {label}] {t:>4.0}s {phase:<8} {:>8.0} req/s  ok {ok}  errors {err}",
            (ok - last_ok) as f64,
        );
        last_ok = ok;
    })
    .await
}
