//! Closed-loop REST load: `concurrency` tasks, each sending one Open Inference Protocol
//! inference request at a time to `POST /v2/models/{model}/infer` and the next as soon as the
//! answer is in, for a warm-up period (not measured) and then a measured period.
//!
//! Every answer is checked, not just counted: a 200 whose body does not parse, or whose
//! outputs are not FP32 `[rows, 16]` with the right amount of data, counts as an error.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use reqwest::Url;
use serde::Deserialize;

use crate::cli::{count, secs};
use crate::hist::{self, Histogram};
use crate::{mlp, SplitMix64};

/// Header of the binary tensor data extension: the length of the JSON part of a body.
/// Pooled connections idle this long are dropped by the client itself: below the 5 s
/// keep-alive of common servers (uvicorn, actix's default), so that the client never sends on
/// a connection the server is closing (a "connection closed before message completed" error
/// that would be the load generator's doing, not the server's).
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

pub const HEADER_CONTENT_LENGTH: &str = "Inference-Header-Content-Length";

/// Upper bounds that keep any run finite and modest.
pub const MAX_CONCURRENCY: usize = 1024;
pub const MAX_DURATION: Duration = Duration::from_secs(3600);
pub const MAX_ROWS: usize = 4096;

/// `loadgen rest`'s options (closed loop; `--rate` and its bound are the open loop's).
#[derive(Clone, Debug, clap::Args)]
pub struct RestOptions {
    /// Server base URL; loopback IP addresses only.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Model to load; it must have the mlp interface (FP32 features [rows, 256] -> [rows, 16]).
    #[arg(long, default_value = "mlp")]
    pub model: String,
    /// Requests in flight at once (closed loop).
    #[arg(long, default_value_t = 8, value_parser = count(1, MAX_CONCURRENCY))]
    pub concurrency: usize,
    /// Measured seconds.
    #[arg(long = "duration-secs", value_name = "DURATION_SECS", default_value = "10", value_parser = secs(1, 3600))]
    pub duration: Duration,
    /// Unmeasured warm-up seconds before the measured period.
    #[arg(long = "warmup-secs", value_name = "WARMUP_SECS", default_value = "1", value_parser = secs(0, 600))]
    pub warmup: Duration,
    /// Rows per request (input shape [rows, 256]); at most the model's max_batch_size.
    #[arg(long, default_value_t = 1, value_parser = count(1, MAX_ROWS))]
    pub rows: usize,
    /// Send the input as binary tensor data (Inference-Header-Content-Length) and ask for
    /// binary outputs, instead of JSON arrays.
    #[arg(long)]
    pub binary: bool,
    /// Seconds to wait for one answer before counting it as a transport error.
    #[arg(long = "timeout-secs", value_name = "TIMEOUT_SECS", default_value = "30", value_parser = secs(1, 600))]
    pub request_timeout: Duration,
    /// No progress lines on stderr.
    #[arg(long)]
    pub quiet: bool,
}

/// The command line's defaults, quiet.
impl Default for RestOptions {
    fn default() -> Self {
        RestOptions {
            quiet: true,
            ..crate::cli::defaults()
        }
    }
}

impl RestOptions {
    /// The inference endpoint, after checking every bound and that the URL is loopback.
    pub fn endpoint(&self) -> anyhow::Result<Url> {
        if self.concurrency == 0 || self.concurrency > MAX_CONCURRENCY {
            bail!(
                "concurrency must be 1..={MAX_CONCURRENCY}, got {}",
                self.concurrency
            );
        }
        if self.duration.is_zero() || self.duration > MAX_DURATION {
            bail!(
                "duration must be more than 0 and at most {}s",
                MAX_DURATION.as_secs()
            );
        }
        if self.warmup > MAX_DURATION {
            bail!("warm-up must be at most {}s", MAX_DURATION.as_secs());
        }
        if self.rows == 0 || self.rows > MAX_ROWS {
            bail!("rows must be 1..={MAX_ROWS}, got {}", self.rows);
        }
        if self.request_timeout.is_zero() || self.request_timeout > Duration::from_secs(600) {
            bail!("request timeout must be more than 0 and at most 600s");
        }
        check_model_name(&self.model)?;
        let base = check_loopback(&self.url)?;
        base.join(&format!("v2/models/{}/infer", self.model))
            .with_context(|| format!("cannot build the inference URL from {base}"))
    }
}

/// A model name as the server's URLs take it: letters, digits, '_', '-', '.'.
pub fn check_model_name(model: &str) -> anyhow::Result<()> {
    if model.is_empty()
        || !model
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
    {
        bail!("model name '{model}' must be non-empty and use only letters, digits, '_', '-', '.'");
    }
    Ok(())
}

/// Parses a server base URL and refuses anything but plain HTTP to a loopback IP address:
/// this tool generates load and must never point it at another machine.
pub fn check_loopback(url: &str) -> anyhow::Result<Url> {
    let mut parsed = Url::parse(url)
        .with_context(|| format!("'{url}' is not a URL (expected http://127.0.0.1:PORT)"))?;
    if parsed.scheme() != "http" {
        bail!("'{url}': only plain http:// to a loopback address is supported");
    }
    // `host_str` gives IPv6 literals in brackets; a domain name does not parse as an address.
    let host = parsed.host_str().unwrap_or("");
    let loopback = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        bail!(
            "refusing to send load to '{url}': only loopback IP addresses (127.0.0.0/8, [::1]) are allowed; \
             use e.g. http://127.0.0.1:8080 (host names, even localhost, are not resolved)"
        );
    }
    if parsed.query().is_some() || parsed.fragment().is_some() || !parsed.username().is_empty() {
        bail!("'{url}': give the server's base URL only, e.g. http://127.0.0.1:8080");
    }
    if !parsed.path().ends_with('/') {
        let path = format!("{}/", parsed.path());
        parsed.set_path(&path);
    }
    Ok(parsed)
}

/// One request body, built once per task and sent over and over (a cheap `Bytes` clone).
#[derive(Clone, Debug)]
pub struct RequestBody {
    pub body: Bytes,
    /// `Some(json length)` when the body uses the binary tensor data extension.
    pub json_length: Option<usize>,
}

/// An Open Inference Protocol request for the `mlp` interface: `features` FP32
/// `[rows, 256]`, filled with deterministic pseudo-random numbers from `seed`.
pub fn mlp_request(rows: usize, seed: u64, binary: bool) -> RequestBody {
    let values = SplitMix64::new(seed).f32_vec(rows * mlp::FEATURES);
    let shape = [rows, mlp::FEATURES];
    if binary {
        let nbytes = values.len() * 4;
        let json = serde_json::json!({
            "inputs": [{
                "name": mlp::INPUT, "shape": shape, "datatype": "FP32",
                "parameters": { "binary_data_size": nbytes },
            }],
            "parameters": { "binary_data_output": true },
        });
        let mut body = serde_json::to_vec(&json).expect("request JSON serialises");
        let json_length = body.len();
        body.reserve(nbytes);
        for v in &values {
            body.extend_from_slice(&v.to_le_bytes());
        }
        RequestBody {
            body: body.into(),
            json_length: Some(json_length),
        }
    } else {
        // Keys in the order Triton's and KServe's clients write them, `data` last (`json!`
        // would sort them, `data` first): the server reads data that follows its datatype
        // and shape in one pass.
        #[derive(serde::Serialize)]
        struct Input<'a> {
            name: &'a str,
            shape: [usize; 2],
            datatype: &'a str,
            data: &'a [f32],
        }
        #[derive(serde::Serialize)]
        struct Request<'a> {
            inputs: [Input<'a>; 1],
        }
        let request = Request {
            inputs: [Input {
                name: mlp::INPUT,
                shape,
                datatype: "FP32",
                data: &values,
            }],
        };
        RequestBody {
            body: serde_json::to_vec(&request)
                .expect("request JSON serialises")
                .into(),
            json_length: None,
        }
    }
}

#[derive(Deserialize)]
struct ResponseJson {
    #[serde(default)]
    parameters: Option<ResponseParameters>,
    outputs: Vec<OutputJson>,
}

#[derive(Deserialize)]
struct ResponseParameters {
    #[serde(default)]
    batch_size: Option<u64>,
    #[serde(default)]
    queue_time_us: Option<u64>,
    #[serde(default)]
    compute_time_us: Option<u64>,
    /// True when the model's fallback served the request (overload).
    #[serde(default)]
    degraded: Option<bool>,
}

/// What the server says about how it served one request (response `parameters`); zero where
/// it did not say.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerSide {
    /// Rows in the model call that served the request (its own and its batch mates').
    pub batch_size: u64,
    /// From the request's arrival to its batch starting, in microseconds.
    pub queue_us: u64,
    /// The model call, in microseconds.
    pub compute_us: u64,
    /// Requests served by the model's fallback (`parameters.degraded`): 0 or 1 for one answer.
    pub degraded: u64,
}

#[derive(Deserialize)]
struct OutputJson {
    name: String,
    datatype: String,
    shape: Vec<i64>,
    #[serde(default)]
    data: Option<Vec<f32>>,
    #[serde(default)]
    parameters: Option<OutputParameters>,
}

#[derive(Deserialize)]
struct OutputParameters {
    #[serde(default)]
    binary_data_size: Option<usize>,
}

impl ServerSide {
    pub fn add(&mut self, other: &ServerSide) {
        self.batch_size += other.batch_size;
        self.queue_us += other.queue_us;
        self.compute_us += other.compute_us;
        self.degraded += other.degraded;
    }
}

/// Checks a 200 answer: every output FP32 `[rows, 16]` with exactly that much data, inline or
/// in the binary section. Returns what the server says about how it served the request.
pub fn check_mlp_response(
    body: &[u8],
    json_length: Option<usize>,
    rows: usize,
) -> Result<ServerSide, String> {
    let (json, binary) = match json_length {
        None => (body, &[][..]),
        Some(n) if n <= body.len() => body.split_at(n),
        Some(n) => {
            return Err(format!(
                "{HEADER_CONTENT_LENGTH} is {n} but the body has {} bytes",
                body.len()
            ))
        }
    };
    let parsed: ResponseJson =
        serde_json::from_slice(json).map_err(|e| format!("response JSON does not parse: {e}"))?;
    if parsed.outputs.is_empty() {
        return Err("response has no outputs".into());
    }
    let elements = rows * mlp::OUTPUT_WIDTH;
    let mut binary_expected = 0;
    for out in &parsed.outputs {
        let want = [rows as i64, mlp::OUTPUT_WIDTH as i64];
        if out.shape != want {
            return Err(format!(
                "output '{}' has shape {:?}, expected {:?}",
                out.name, out.shape, want
            ));
        }
        if out.datatype != "FP32" {
            return Err(format!(
                "output '{}' is {}, expected FP32",
                out.name, out.datatype
            ));
        }
        match (
            &out.data,
            out.parameters.as_ref().and_then(|p| p.binary_data_size),
        ) {
            (Some(data), None) if data.len() == elements => {}
            (Some(data), None) => {
                return Err(format!(
                    "output '{}' has {} values, expected {elements}",
                    out.name,
                    data.len()
                ))
            }
            (None, Some(size)) if size == elements * 4 => binary_expected += size,
            (None, Some(size)) => {
                return Err(format!(
                    "output '{}' has {size} binary bytes, expected {}",
                    out.name,
                    elements * 4
                ))
            }
            (Some(_), Some(_)) => {
                return Err(format!(
                    "output '{}' has both data and binary_data_size",
                    out.name
                ))
            }
            (None, None) => return Err(format!("output '{}' has no data", out.name)),
        }
    }
    if binary.len() != binary_expected {
        return Err(format!(
            "binary section has {} bytes, outputs claim {binary_expected}",
            binary.len()
        ));
    }
    Ok(parsed
        .parameters
        .map_or(ServerSide::default(), |p| ServerSide {
            batch_size: p.batch_size.unwrap_or(0),
            queue_us: p.queue_time_us.unwrap_or(0),
            compute_us: p.compute_time_us.unwrap_or(0),
            degraded: u64::from(p.degraded.unwrap_or(false)),
        }))
}

/// The result of one closed-loop run (the measured period only, except `warmup_*`).
#[derive(Clone, Debug)]
pub struct RestReport {
    pub url: String,
    pub model: String,
    pub concurrency: usize,
    pub rows: usize,
    pub binary: bool,
    /// Length of the measured period.
    pub measured: Duration,
    /// Answers that were 200 and passed [`check_mlp_response`].
    pub ok: u64,
    /// Failures by kind: `"http 503"`, `"transport"`, `"invalid response"`.
    pub errors: BTreeMap<String, u64>,
    /// Requests that completed (any outcome) during warm-up, and how many of those failed.
    pub warmup_requests: u64,
    pub warmup_errors: u64,
    /// The first failure seen, for diagnosis.
    pub first_error: Option<String>,
    /// Latency of successful requests, in microseconds.
    pub latency_us: Histogram,
    /// Sums over successful requests of what the server reported ([`ServerSide`]).
    pub server_sums: ServerSide,
}

impl RestReport {
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    pub fn requests_per_sec(&self) -> f64 {
        self.ok as f64 / self.measured.as_secs_f64()
    }

    pub fn rows_per_sec(&self) -> f64 {
        self.requests_per_sec() * self.rows as f64
    }

    /// Latency at quantile `q` (0..=1) in milliseconds; 0 without data.
    pub fn latency_ms(&self, q: f64) -> f64 {
        hist::ms(&self.latency_us, q)
    }

    pub fn max_ms(&self) -> f64 {
        self.latency_us.max() as f64 / 1000.0
    }

    pub fn mean_ms(&self) -> f64 {
        self.latency_us.mean() / 1000.0
    }

    fn mean_of(&self, sum: u64) -> f64 {
        if self.ok == 0 {
            0.0
        } else {
            sum as f64 / self.ok as f64
        }
    }

    /// Mean rows of the model call that served a request, as the server reported it.
    pub fn mean_batch_rows(&self) -> f64 {
        self.mean_of(self.server_sums.batch_size)
    }

    /// Mean server-reported queue time (arrival to batch start), milliseconds.
    pub fn mean_queue_ms(&self) -> f64 {
        self.mean_of(self.server_sums.queue_us) / 1000.0
    }

    /// Mean server-reported model-call time, milliseconds.
    pub fn mean_compute_ms(&self) -> f64 {
        self.mean_of(self.server_sums.compute_us) / 1000.0
    }

    /// The run as JSON: what `results.json` files hold of it and the summary prints.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "concurrency": self.concurrency,
            "rows_per_request": self.rows,
            "measured_s": self.measured.as_secs_f64(),
            "ok": self.ok,
            "errors": self.errors,
            "warmup_requests": self.warmup_requests,
            "warmup_errors": self.warmup_errors,
            "first_error": self.first_error,
            "requests_per_s": self.requests_per_sec(),
            "rows_per_s": self.rows_per_sec(),
            "latency_ms": {
                "p50": self.latency_ms(0.5), "p90": self.latency_ms(0.9), "p99": self.latency_ms(0.99),
                "p99.9": self.latency_ms(0.999), "max": self.max_ms(), "mean": self.mean_ms(),
            },
            "server_reported": {
                "mean_batch_rows": self.mean_batch_rows(),
                "mean_queue_ms": self.mean_queue_ms(),
                "mean_model_call_ms": self.mean_compute_ms(),
            },
        })
    }

    /// A human-readable summary, several lines (`templates/summary.txt.j2`).
    pub fn summary(&self) -> String {
        let extra = serde_json::json!({
            "kind": "rest", "url": self.url, "model": self.model, "binary": self.binary,
            "degraded": self.server_sums.degraded,
        });
        crate::report::summary(&self.to_json(), extra)
    }
}

/// Counters shared with the progress printer.
#[derive(Default)]
struct Live {
    ok: AtomicU64,
    errors: AtomicU64,
}

/// One task's own tallies, merged at the end (no locking on the hot path).
struct TaskStats {
    ok: u64,
    errors: BTreeMap<String, u64>,
    warmup_requests: u64,
    warmup_errors: u64,
    first_error: Option<String>,
    latency_us: Histogram,
    server_sums: ServerSide,
}

impl TaskStats {
    fn new() -> TaskStats {
        TaskStats {
            ok: 0,
            errors: BTreeMap::new(),
            warmup_requests: 0,
            warmup_errors: 0,
            first_error: None,
            latency_us: hist::new(3),
            server_sums: ServerSide::default(),
        }
    }
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

async fn task_loop(
    client: reqwest::Client,
    url: Url,
    body: RequestBody,
    rows: usize,
    measure_start: Instant,
    measure_end: Instant,
    live: Arc<Live>,
) -> TaskStats {
    let mut stats = TaskStats::new();
    while Instant::now() < measure_end {
        let started = Instant::now();
        let outcome = send_one(&client, &url, &body, rows).await;
        let done = Instant::now();
        // A request counts towards the period in which it completed; one that completes after
        // the end of the measured period is not counted at all.
        let measured = done >= measure_start && done <= measure_end;
        let warmup = done < measure_start;
        match outcome {
            Ok(server) => {
                live.ok.fetch_add(1, Ordering::Relaxed);
                if measured {
                    stats.ok += 1;
                    stats.server_sums.add(&server);
                    let us = hist::micros(done.duration_since(started));
                    stats.latency_us.saturating_record(us);
                } else if warmup {
                    stats.warmup_requests += 1;
                }
            }
            Err(failure) => {
                live.errors.fetch_add(1, Ordering::Relaxed);
                if stats.first_error.is_none() {
                    stats.first_error = Some(failure.describe());
                }
                if measured {
                    *stats.errors.entry(failure.kind()).or_default() += 1;
                } else if warmup {
                    stats.warmup_requests += 1;
                    stats.warmup_errors += 1;
                }
                if matches!(failure, Failure::Transport(_)) {
                    // Connection refused and the like fail instantly: do not spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
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
    for i in 0..options.concurrency {
        let body = mlp_request(options.rows, 0x5EED_0000 + i as u64, options.binary);
        tasks.spawn(task_loop(
            client.clone(),
            url.clone(),
            body,
            options.rows,
            measure_start,
            measure_end,
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

    let mut merged = TaskStats::new();
    let deadline = measure_end + options.request_timeout + Duration::from_secs(5);
    let joined = tokio::time::timeout_at(deadline.into(), async {
        while let Some(result) = tasks.join_next().await {
            let stats = result.context("a load task panicked")?;
            merged.ok += stats.ok;
            for (kind, n) in stats.errors {
                *merged.errors.entry(kind).or_default() += n;
            }
            merged.warmup_requests += stats.warmup_requests;
            merged.warmup_errors += stats.warmup_errors;
            if merged.first_error.is_none() {
                merged.first_error = stats.first_error;
            }
            merged
                .latency_us
                .add(&stats.latency_us)
                .expect("same histogram bounds");
            merged.server_sums.add(&stats.server_sums);
        }
        anyhow::Ok(())
    })
    .await;
    if let Some(p) = progress {
        p.abort();
    }
    match joined {
        Ok(result) => result?,
        Err(_) => {
            tasks.abort_all();
            bail!("load tasks did not finish by their deadline");
        }
    }
    Ok(RestReport {
        url: options.url.clone(),
        model: options.model.clone(),
        concurrency: options.concurrency,
        rows: options.rows,
        binary: options.binary,
        measured: options.duration,
        ok: merged.ok,
        errors: merged.errors,
        warmup_requests: merged.warmup_requests,
        warmup_errors: merged.warmup_errors,
        first_error: merged.first_error,
        latency_us: merged.latency_us,
        server_sums: merged.server_sums,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_only() {
        assert!(check_loopback("http://127.0.0.1:8080").is_ok());
        assert!(check_loopback("http://127.3.2.1:1/").is_ok());
        assert!(check_loopback("http://[::1]:8080").is_ok());
        for bad in [
            "http://10.0.0.1:8080",
            "http://example.com",
            "http://localhost:8080",
            "https://127.0.0.1:8080",
            "http://0.0.0.0:8080",
            "127.0.0.1:8080",
            "http://127.0.0.1:8080/?q=1",
        ] {
            assert!(check_loopback(bad).is_err(), "{bad} was accepted");
        }
        let url = RestOptions {
            url: "http://127.0.0.1:9/".into(),
            ..RestOptions::default()
        }
        .endpoint()
        .unwrap();
        assert_eq!(url.as_str(), "http://127.0.0.1:9/v2/models/mlp/infer");
    }

    #[test]
    fn bounds_are_enforced() {
        let bad: [fn(&mut RestOptions); 5] = [
            |o| o.concurrency = 0,
            |o| o.concurrency = MAX_CONCURRENCY + 1,
            |o| o.duration = Duration::ZERO,
            |o| o.rows = 0,
            |o| o.model = "../x".into(),
        ];
        for change in bad {
            let mut o = RestOptions::default();
            change(&mut o);
            assert!(o.endpoint().is_err(), "{o:?} was accepted");
        }
    }

    #[test]
    fn bodies() {
        let json = mlp_request(2, 1, false);
        assert!(json.json_length.is_none());
        let v: serde_json::Value = serde_json::from_slice(&json.body).unwrap();
        assert_eq!(v["inputs"][0]["shape"], serde_json::json!([2, 256]));
        assert_eq!(v["inputs"][0]["data"].as_array().unwrap().len(), 512);

        let bin = mlp_request(2, 1, true);
        let n = bin.json_length.unwrap();
        assert_eq!(bin.body.len() - n, 512 * 4);
        let v: serde_json::Value = serde_json::from_slice(&bin.body[..n]).unwrap();
        assert_eq!(v["inputs"][0]["parameters"]["binary_data_size"], 2048);
        assert!(v["inputs"][0].get("data").is_none());
        // Same data both ways.
        let first = f32::from_le_bytes(bin.body[n..n + 4].try_into().unwrap());
        assert_eq!(first as f64, v_first(&json));
    }

    fn v_first(body: &RequestBody) -> f64 {
        let v: serde_json::Value = serde_json::from_slice(&body.body).unwrap();
        v["inputs"][0]["data"][0].as_f64().unwrap() as f32 as f64
    }

    #[test]
    fn response_checks() {
        let good = br#"{"model_name":"mlp","model_version":"1","parameters":{"batch_size":3},
            "outputs":[{"name":"logits","datatype":"FP32","shape":[1,16],"data":[0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15]}]}"#;
        assert_eq!(
            check_mlp_response(good, None, 1),
            Ok(ServerSide {
                batch_size: 3,
                queue_us: 0,
                compute_us: 0,
                degraded: 0,
            })
        );
        assert!(check_mlp_response(good, None, 2)
            .unwrap_err()
            .contains("shape"));
        let short = br#"{"outputs":[{"name":"l","datatype":"FP32","shape":[1,16],"data":[0]}]}"#;
        assert!(check_mlp_response(short, None, 1)
            .unwrap_err()
            .contains("values"));
        let json = br#"{"outputs":[{"name":"l","datatype":"FP32","shape":[1,16],"parameters":{"binary_data_size":64}}]}"#;
        let mut body = json.to_vec();
        body.extend_from_slice(&[0u8; 64]);
        assert_eq!(
            check_mlp_response(&body, Some(json.len()), 1),
            Ok(ServerSide::default())
        );
        body.push(0);
        assert!(check_mlp_response(&body, Some(json.len()), 1)
            .unwrap_err()
            .contains("binary section"));
        assert!(check_mlp_response(b"{", None, 1).is_err());
        let degraded = br#"{"parameters":{"batch_size":2,"degraded":true,"served_by":"mlp_small:1"},
            "outputs":[{"name":"l","datatype":"FP32","shape":[1,16],"data":[0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15]}]}"#;
        assert_eq!(check_mlp_response(degraded, None, 1).unwrap().degraded, 1);
    }
}
