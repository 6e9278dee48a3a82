//! Logs (`tracing`, text or JSON lines) and metrics (`metrics`, rendered by the Prometheus
//! exporter). Both are process-wide, so both are installed at most once per process.

mod describe;

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// How log lines are written: text for people, JSON for log pipelines.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
    Default,
)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

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

thread_local! {
    static SUPERVISED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks the calling thread as one whose panics a supervisor handles (model workers): see
/// [`install_panic_hook`].
pub fn mark_supervised_thread() {
    SUPERVISED.with(|s| s.set(true));
}

/// Most one backtrace per this long is resolved and logged for supervised panics.
const BACKTRACE_EVERY_MS: u64 = 60_000;

/// Installs (once per process) a panic hook for supervised threads. A worker's panic is an
/// expected, handled event: its router restarts the worker and retries the batch. The default
/// hook would first print the panic, and with `RUST_BACKTRACE` set *resolve* a backtrace, on
/// the panicking thread; resolving symbols of a binary with debug info takes hundreds of
/// milliseconds (measured: replicas out for ~0.4 s instead of ~0.1 s in `loadgen timeline`),
/// and the router only hears of the death after it. Here a supervised panic becomes one
/// structured log event at once; a captured backtrace (as `RUST_BACKTRACE` asks) is resolved
/// and logged on a background thread at the lowest CPU priority, at most one per minute, so
/// that neither the resolution nor a crash loop takes CPU from serving. (It can still slow
/// serving for a few hundred ms, likely through page faults while the debug info is read: 1
/// run in 3 in `loadgen timeline`; unset `RUST_BACKTRACE` avoids it.) Panics of any other
/// thread go to the previous hook unchanged.
pub fn install_panic_hook() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        let (backtraces, pending) =
            std::sync::mpsc::sync_channel::<(String, std::backtrace::Backtrace)>(1);
        let spawned = std::thread::Builder::new()
            .name("panic-backtraces".into())
            .spawn(move || {
                let _ = lower_cpu_priority(19);
                for (thread, backtrace) in pending {
                    if tracing::dispatcher::has_been_set() {
                        tracing::error!(thread = %thread, backtrace = %backtrace, "backtrace of the panic above");
                    } else {
                        eprintln!("backtrace of thread '{thread}':\n{backtrace}");
                    }
                }
            });
        let backtraces = spawned.ok().map(|_| backtraces);
        let last_backtrace = std::sync::atomic::AtomicU64::new(u64::MAX);
        std::panic::set_hook(Box::new(move |info| {
            if !SUPERVISED.with(|s| s.get()) {
                return previous(info);
            }
            let thread = std::thread::current().name().unwrap_or("unnamed").to_string();
            let message = panic_text(info.payload());
            let location = info.location().map(|l| l.to_string()).unwrap_or_default();
            if tracing::dispatcher::has_been_set() {
                tracing::error!(thread = %thread, %location, panic = %message, "supervised thread panicked; its supervisor restarts it");
            } else {
                eprintln!("thread '{thread}' panicked at {location}: {message} (supervised: restarted)");
            }
            // Within a minute of the last one, no backtrace: not even the stack walk.
            let now = uptime_ms();
            let last = last_backtrace.load(std::sync::atomic::Ordering::Relaxed);
            if last != u64::MAX && now.saturating_sub(last) < BACKTRACE_EVERY_MS {
                return;
            }
            let backtrace = std::backtrace::Backtrace::capture();
            if backtrace.status() != std::backtrace::BacktraceStatus::Captured {
                return;
            }
            last_backtrace.store(now, std::sync::atomic::Ordering::Relaxed);
            if let Some(tx) = &backtraces {
                let _ = tx.try_send((thread, backtrace));
            }
        }));
    });
}

/// The text a panic was raised with (`panic!("...")` or a formatted message).
pub fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}

/// Lowers the calling thread's CPU priority to `nice` (Linux keeps it per thread), so that its
/// work takes CPU time mostly when nothing of normal priority wants it. Best effort: a failure
/// leaves the thread as it was, and is returned for the caller to log if it cares.
pub fn lower_cpu_priority(nice: i32) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    // SAFETY: plain system calls on the calling thread's own id; no memory is shared.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        if libc::setpriority(libc::PRIO_PROCESS, tid, nice) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
    Ok(())
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
            describe::describe();
            handle
        })
        .clone()
}

/// Why a stream was dropped (`streamserve_stream_drops_total`'s `reason`).
pub const STREAM_DROP_REASONS: &[&str] = &[
    "slow_consumer",
    "inference_error",
    "not_resumed",
    "idle",
    "write_timeout",
];

/// The `event` values of `streamserve_rollout_events_total`.
pub const ROLLOUT_EVENTS: &[&str] = &[
    "deploy_started",
    "deploy_failed",
    "switched",
    "canary_started",
    "canary_step",
    "promoted",
    "rolled_back",
    "unloaded",
];

/// Counters of one model version, labelled `model` and `version` (the model the client asked
/// for, also when its fallback served or shed the request).
const MODEL_COUNTERS: &[&str] = &[
    "streamserve_worker_restarts_total",
    "streamserve_retries_total",
    "streamserve_shed_total",
    "streamserve_deadline_exceeded_total",
    "streamserve_inference_failures_total",
];

/// The statuses of `streamserve_requests_total` a listed version's answers can fail with
/// (500 a failed model call, 503 nothing can serve it, 504 its deadline passed, 429 shed),
/// created at 0 by `/metrics` before it renders (api/metrics.rs: so for every listed version,
/// loaded, cold or refused): the error share alert takes `rate()` over them, which cannot see
/// the increment that creates a series. Other statuses (4xx of bad requests) are
/// the client's, and are created on first use.
pub const ERROR_STATUSES: &[&str] = &["429", "500", "503", "504"];

/// Whether gRPC listens, so its error series are created with REST's (set once at start).
static GRPC_LISTENS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Says that gRPC listens: from now on each version's error series are created for gRPC's
/// answers (`protocol="grpc"`) too.
pub fn grpc_listens() {
    GRPC_LISTENS.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Creates at 0 `streamserve_requests_total` of every status in [`ERROR_STATUSES`] for a
/// version the manifest lists (its names are the manifest's, a bounded set), for REST and,
/// when it listens, gRPC.
pub fn register_request_error_series(model: &str, version: &str) {
    let grpc = GRPC_LISTENS.load(std::sync::atomic::Ordering::Relaxed);
    for grpc in [false, true].into_iter().take(1 + usize::from(grpc)) {
        let which = SeriesOf {
            model,
            version,
            grpc,
        };
        for &status in ERROR_STATUSES {
            metrics::counter!("streamserve_requests_total", &which.labels(Some(status)))
                .increment(0);
        }
    }
}

/// The series answered requests move, for one served version, looked up once each: a lookup
/// by labels builds and hashes the label strings on every request (about 4% of a 1-row
/// request's CPU at concurrency 1, with the access line). Each is made on its first use, so
/// `/metrics` shows exactly the series it showed before. Only the common answers, 200 and the
/// 429 of an overload, have their counters here; other statuses are counted by their labels.
#[derive(Default)]
pub struct RequestSeries {
    /// REST, then gRPC (`protocol="grpc"`).
    protocols: [ProtocolSeries; 2],
    /// `streamserve_shed_total` of the door's refusals.
    shed: OnceLock<metrics::Counter>,
}

#[derive(Default)]
struct ProtocolSeries {
    ok: OnceLock<metrics::Counter>,
    /// `status="429"`: refusals come by the thousand a second when the server is short of
    /// CPU, where looking their series up by label each time is work it can least afford.
    busy: OnceLock<metrics::Counter>,
    duration: OnceLock<metrics::Histogram>,
    queue: OnceLock<metrics::Histogram>,
}

/// Which of a request's series: the labels `api::accounting` counts by, in its order (`model`,
/// `version`, then `status`, then `protocol`).
pub struct SeriesOf<'a> {
    pub model: &'a str,
    pub version: &'a str,
    pub grpc: bool,
}

impl SeriesOf<'_> {
    pub fn labels(&self, status: Option<&str>) -> Vec<(&'static str, String)> {
        let mut labels = vec![
            ("model", self.model.to_string()),
            ("version", self.version.to_string()),
        ];
        if let Some(status) = status {
            labels.push(("status", status.to_string()));
        }
        if self.grpc {
            labels.push(("protocol", "grpc".to_string()));
        }
        labels
    }
}

impl RequestSeries {
    fn of(&self, which: &SeriesOf<'_>) -> &ProtocolSeries {
        &self.protocols[which.grpc as usize]
    }

    /// `streamserve_requests_total{status="200"}`.
    pub fn ok(&self, which: &SeriesOf<'_>) -> &metrics::Counter {
        self.of(which).ok.get_or_init(|| {
            metrics::counter!("streamserve_requests_total", &which.labels(Some("200")))
        })
    }

    /// `streamserve_requests_total{status="429"}`.
    pub fn busy(&self, which: &SeriesOf<'_>) -> &metrics::Counter {
        self.of(which).busy.get_or_init(|| {
            metrics::counter!("streamserve_requests_total", &which.labels(Some("429")))
        })
    }

    /// `streamserve_shed_total` of this version, `model` and `version` (the series has no
    /// protocol label).
    pub fn shed(&self, model: &str, version: &str) -> &metrics::Counter {
        self.shed.get_or_init(|| {
            metrics::counter!("streamserve_shed_total", "model" => model.to_string(), "version" => version.to_string())
        })
    }

    pub fn duration(&self, which: &SeriesOf<'_>) -> &metrics::Histogram {
        self.of(which).duration.get_or_init(|| {
            metrics::histogram!("streamserve_request_duration_seconds", &which.labels(None))
        })
    }

    pub fn queue(&self, which: &SeriesOf<'_>) -> &metrics::Histogram {
        self.of(which).queue.get_or_init(|| {
            metrics::histogram!("streamserve_queue_duration_seconds", &which.labels(None))
        })
    }
}

/// Creates at 0 every counter series that a model version's router (and its streams) can
/// increment, when the router starts: a series that only appears with its first event hides
/// that event from `rate()` and `increase()`, and an alert on it has nothing to evaluate until
/// then.
pub fn register_model_series(info: &crate::model::ModelInfo) {
    let labels = [
        ("model", info.name.clone()),
        ("version", info.version.clone()),
    ];
    for &name in MODEL_COUNTERS {
        metrics::counter!(name, &labels).increment(0);
    }
    if let Some(fallback) = &info.fallback {
        metrics::counter!("streamserve_degraded_total", "model" => info.name.clone(), "version" => info.version.clone(), "served_by" => fallback.clone())
            .increment(0);
    }
    for direction in ["up", "down"] {
        metrics::counter!("streamserve_scale_events_total", "model" => info.name.clone(), "direction" => direction)
            .increment(0);
    }
    if info.stream.is_some() {
        let model = [("model", info.name.clone())];
        for name in [
            "streamserve_stream_chunks_total",
            "streamserve_stream_degraded_chunks_total",
            "streamserve_stream_behind_chunks_total",
            "streamserve_stream_resumes_total",
            "streamserve_stream_checkpoints_total",
            "streamserve_stream_handovers_total",
            "streamserve_stream_takeovers_total",
        ] {
            metrics::counter!(name, &model).increment(0);
        }
    }
    if let Some(stream) = &info.stream {
        for stage in stream.stages(&info.name) {
            metrics::counter!("streamserve_stream_stage_steps_total", "model" => info.name.clone(), "stage" => stage.model)
                .increment(0);
        }
        if let Some(gate) = &stream.gate {
            metrics::counter!("streamserve_stream_stage_steps_total", "model" => info.name.clone(), "stage" => gate.model.clone())
                .increment(0);
            metrics::counter!("streamserve_stream_stage_skips_total", "model" => info.name.clone(), "stage" => gate.stage.clone())
                .increment(0);
        }
        if stream.kind == crate::manifest::StreamKind::Keyword {
            metrics::counter!("streamserve_stream_keywords_total", "model" => info.name.clone())
                .increment(0);
        }
    }
}

/// Creates at 0 the rollout event series of a model the manifest names.
pub fn register_rollout_series(model: &str) {
    for &event in ROLLOUT_EVENTS {
        metrics::counter!("streamserve_rollout_events_total", "model" => model.to_string(), "event" => event)
            .increment(0);
    }
}

/// The registry's and the fleet's series at 0, for a server that follows a registry.
pub fn register_fleet_series() {
    metrics::gauge!("streamserve_registry_up").set(0.0);
    metrics::gauge!("streamserve_fleet_instances_live").set(1.0);
    metrics::gauge!("streamserve_fleet_duplicate_instance_id").set(0.0);
    for outcome in ["ok", "error"] {
        metrics::counter!("streamserve_registry_polls_total", "outcome" => outcome).increment(0);
    }
    for outcome in ["ok", "failed"] {
        metrics::counter!("streamserve_registry_fetches_total", "outcome" => outcome).increment(0);
    }
    for decision in ["switch", "promote", "rolled_out", "join", "abort"] {
        metrics::counter!("streamserve_fleet_decisions_total", "decision" => decision).increment(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With the hook installed, a supervised thread's panic is caught as before (its payload
    /// intact) and any other thread's panic still reaches the previous hook and unwinds.
    #[test]
    fn the_panic_hook_keeps_panics_catchable() {
        install_panic_hook();
        install_panic_hook(); // idempotent
        let supervised = std::thread::spawn(|| {
            mark_supervised_thread();
            std::panic::catch_unwind(|| panic!("injected")).unwrap_err()
        })
        .join()
        .expect("the panic was caught inside the thread");
        assert_eq!(supervised.downcast_ref::<&str>(), Some(&"injected"));
        let plain = std::thread::spawn(|| panic!("not supervised")).join();
        assert!(plain.is_err());
    }
}
