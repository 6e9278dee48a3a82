//! Logs (`tracing`, text or JSON lines) and metrics (`metrics`, rendered by the Prometheus
//! exporter). Both are process-wide, so both are installed at most once per process.

use std::sync::OnceLock;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the log subscriber; a second call (tests start several servers) is a no-op.
pub fn init_logging(format: LogFormat, filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();
static STARTED: OnceLock<std::time::Instant> = OnceLock::new();

/// Milliseconds since the process first asked (a monotonic clock that fits an atomic).
pub fn uptime_ms() -> u64 {
    STARTED
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// Installs the metrics recorder once and returns the handle that renders `/metrics`.
pub fn metrics_handle() -> PrometheusHandle {
    PROMETHEUS
        .get_or_init(|| {
            const SECONDS: &[f64] = &[
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0,
            ];
            const SIZES: &[f64] = &[
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
            ];
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Prefix("streamserve_batch_".into()), SIZES)
                })
                .expect("bucket lists are non-empty")
                .install_recorder()
                .expect("no other metrics recorder is installed");
            describe();
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(
        "streamserve_requests_total",
        "Inference requests answered, by model, version and HTTP status"
    );
    describe_histogram!(
        "streamserve_request_duration_seconds",
        Unit::Seconds,
        "End-to-end inference request latency inside the server"
    );
    describe_histogram!(
        "streamserve_queue_duration_seconds",
        Unit::Seconds,
        "Time a request waited in its router's queue before its batch started"
    );
    describe_histogram!(
        "streamserve_inference_duration_seconds",
        Unit::Seconds,
        "Time of one model call (one batch) on a worker"
    );
    describe_histogram!("streamserve_batch_size", Unit::Count, "Rows per model call");
    describe_histogram!(
        "streamserve_batch_requests",
        Unit::Count,
        "Requests per model call"
    );
    describe_gauge!(
        "streamserve_queue_depth",
        Unit::Count,
        "Requests waiting in a router's queue"
    );
    describe_gauge!(
        "streamserve_workers",
        Unit::Count,
        "Healthy workers (replicas) per model version"
    );
    describe_counter!(
        "streamserve_shed_total",
        "Requests refused with 429 because the queue was full"
    );
    describe_counter!(
        "streamserve_worker_restarts_total",
        "Workers replaced after dying"
    );
    describe_counter!(
        "streamserve_inference_failures_total",
        "Model calls that returned an error"
    );
}
