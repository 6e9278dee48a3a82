//! Server configuration, from one source with three layers: command-line flags win over
//! environment variables (`STREAMSERVE_*`), which win over an optional TOML file
//! (`--config`), which wins over built-in defaults that just work.
//!
//! Each key is written down twice and merged by nothing hand-written:
//! - [`ServeArgs`] holds its flag, its environment variable and its help text (which names the
//!   default), each field an `Option` so that an unset flag falls through. clap reads flags and
//!   environment together, so those two layers are merged (and typed) by clap.
//! - [`Config`] holds its type and, in `Config::default()`, its default value. The TOML file is
//!   read straight into `Config` (`#[serde(default, deny_unknown_fields)]`), so toml names a
//!   misspelt or mistyped key with its line; the flags set are then laid over it by name, through
//!   their serde form, and only `normalise` (`config/validate.rs`) is per key.
//!
//! A layering crate (figment) was weighed: it would replace the ten lines of [`Config::resolve`]
//! but brings several crates (a proc-macro among them), and its gain, naming the layer a bad
//! value came from, matters only for the file: values from flags and environment are already
//! typed by clap, and toml's own errors (file, line, key) are clearer than a re-wrapped one.
//! A `STREAMSERVE_*` variable that no flag reads (a misspelling) is warned about at start-up,
//! with the name it probably meant (`config/env_vars.rs`).
//! Tests (`config/tests.rs`) check that the two lists name the same keys, that each
//! environment variable is `STREAMSERVE_<KEY>`, and that each help text's `[default: ...]` is
//! `Config::default()`'s.
//!
//! Adding a key: a field in `ServeArgs` (doc, flag, env), a field in `Config` and its default;
//! a duration or a thread count also gets its maximum in `config/validate.rs`, a secret its
//! place in `SECRET_KEYS`.
//!
//! Secrets: the admin token may come from `STREAMSERVE_ADMIN_TOKEN` or a file
//! (`admin_token_file`, e.g. a mounted secret) rather than a flag, which `ps` shows; the `Debug`
//! forms of `ServeArgs` and `Config` print it as `<redacted>`, and a config-file error never
//! quotes a secret's line (`config/validate.rs`).

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use serde::{Deserialize, Serialize};

/// Flags of `streamserve serve`, each with its environment variable. Each is optional here so
/// that an unset flag falls through to the config file, then to [`Config::default()`]; the
/// `[default: ...]` in a help text must be that default (a test checks it).
#[derive(Args, Default, Serialize)]
pub struct ServeArgs {
    /// TOML config file with any of the keys below (snake_case).
    #[arg(long, env = "STREAMSERVE_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 0.0.0.0].
    #[arg(long, env = "STREAMSERVE_HOST")]
    pub host: Option<String>,
    /// Port to listen on; 0 picks a free one [default: 8080].
    #[arg(long, env = "STREAMSERVE_PORT")]
    pub port: Option<u16>,
    /// Model directory holding `models.toml` [default: models].
    #[arg(long, env = "STREAMSERVE_MODELS")]
    pub models: Option<PathBuf>,
    /// Log line format [default: text].
    #[arg(long, env = "STREAMSERVE_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter in `RUST_LOG` syntax; a directive that does not parse is an error
    /// [default: info].
    #[arg(long, env = "STREAMSERVE_LOG")]
    pub log: Option<String>,
    /// Largest request body accepted, in bytes [default: 67108864].
    #[arg(long, env = "STREAMSERVE_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// HTTP worker threads; 1 to 1024 [default: number of CPUs].
    #[arg(long, env = "STREAMSERVE_HTTP_WORKERS")]
    pub http_workers: Option<usize>,
    /// Path of libonnxruntime; otherwise `ORT_DYLIB_PATH`, then the project's `.venv`.
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_dylib: Option<PathBuf>,
    /// Seconds a dropped stream waits for its client to resume [default: 30].
    #[arg(long, env = "STREAMSERVE_STREAM_RESUME_SECS")]
    pub stream_resume_secs: Option<u64>,
    /// Milliseconds of audio between two checkpoints a stream sends its client (resume
    /// tokens: how much audio a client keeps to send again after a crash); 0 = none
    /// [default: 1000].
    #[arg(long, env = "STREAMSERVE_STREAM_CHECKPOINT_MS")]
    pub stream_checkpoint_ms: Option<u64>,
    /// File of the keys that sign stream checkpoints, one per line, the first signing, all
    /// verifying (`streamserve keys new-stream-key`): the same file on every instance lets a
    /// stream resume on any of them. Unset = a key of this process's own.
    #[arg(long, env = "STREAMSERVE_STREAM_TOKEN_KEYS")]
    pub stream_token_keys: Option<PathBuf>,
    /// The same keys as a value, comma-separated, the first signing, for platforms whose
    /// secrets are environment variables (`fly secrets set STREAMSERVE_STREAM_TOKEN_KEY=...`);
    /// not with `--stream-token-keys`. Prefer the environment variable: a flag shows in `ps`.
    #[arg(long, env = "STREAMSERVE_STREAM_TOKEN_KEY", hide_env_values = true)]
    pub stream_token_key: Option<String>,
    /// Seconds without audio (nor `end`) after which a stream is closed; pings do not count; at
    /// least 1 [default: 30].
    #[arg(long, env = "STREAMSERVE_STREAM_IDLE_SECS")]
    pub stream_idle_secs: Option<u64>,
    /// Seconds, from SIGTERM, to finish in-flight work and exit; a second signal exits at
    /// once; at most 86400 [default: 30].
    #[arg(long, env = "STREAMSERVE_DRAIN_SECS")]
    pub drain_secs: Option<u64>,
    /// Seconds an idle HTTP keep-alive connection stays open [default: 75]. Longer than the
    /// idle timeout of any proxy or client pool in front (fly's proxy, load balancers' 60 s),
    /// so that they close idle connections first and never send a request on one the server
    /// is closing.
    #[arg(long, env = "STREAMSERVE_KEEP_ALIVE_SECS")]
    pub keep_alive_secs: Option<u64>,
    /// Inference requests decoded, queued or running at once, at most; beyond the door's
    /// limit new ones get an immediate 429. With `admission = adaptive` this is the ceiling
    /// the limit moves under (0: 4096); with `static`, the limit itself (0: none)
    /// [default: 0].
    #[arg(long, env = "STREAMSERVE_MAX_INFLIGHT")]
    pub max_inflight: Option<usize>,
    /// How the door limits the inference requests it lets in: `adaptive` moves the limit with
    /// the latency it measures (up to `max_inflight` when that is set), so that admitted
    /// requests stay within `admission_target_ms` when the CPU (HTTP, JSON), not a model
    /// queue, is short; `static` holds it at `max_inflight` (0: no limit) [default: adaptive].
    #[arg(long, env = "STREAMSERVE_ADMISSION")]
    pub admission: Option<Admission>,
    /// The adaptive limit's latency target, in milliseconds: the time an admitted request may
    /// spend inside the server outside its model's queue and compute (reading, decoding,
    /// waiting for the HTTP thread, encoding); at least 1 [default: 5].
    #[arg(long, env = "STREAMSERVE_ADMISSION_TARGET_MS")]
    pub admission_target_ms: Option<u64>,
    /// CPU threads all replicas may use together; autoscaling adds replicas only within it
    /// [default: number of CPUs].
    #[arg(long, env = "STREAMSERVE_CPU_BUDGET")]
    pub cpu_budget: Option<usize>,
    /// RAM (MiB) that CPU replicas may use together; models that would not fit are refused
    /// [default: the memory available at startup].
    #[arg(long, env = "STREAMSERVE_MEMORY_BUDGET_MB")]
    pub memory_budget_mb: Option<u64>,
    /// VRAM (MiB) per GPU that its replicas may use together; 0 = not budgeted [default: 0].
    #[arg(long, env = "STREAMSERVE_VRAM_BUDGET_MB")]
    pub vram_budget_mb: Option<u64>,
    /// Token that enables the admin API (/admin, `Authorization: Bearer <token>`); unset = off.
    /// Trimmed; empty or with control characters it is an error. Prefer the environment
    /// variable or `--admin-token-file`: a flag shows in `ps`.
    #[arg(long, env = "STREAMSERVE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// File whose contents (trimmed) are the admin token, e.g. a mounted secret; instead of
    /// `--admin-token`, not with it.
    #[arg(long, env = "STREAMSERVE_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Seconds a request body may take to arrive, whole; slower ones get 408; at least 1
    /// [default: 60].
    #[arg(long, env = "STREAMSERVE_BODY_TIMEOUT_SECS")]
    pub body_timeout_secs: Option<u64>,
    /// Slowest average rate a request body may arrive at after its first 2 s, in bytes per
    /// second; slower ones (and stalled ones) get 408 [default: 16384].
    #[arg(long, env = "STREAMSERVE_MIN_BODY_BYTES_PER_SEC")]
    pub min_body_bytes_per_sec: Option<u64>,
    /// Open connections accepted at once; beyond it new ones wait in the listen backlog.
    /// 0 = derived from the open-file limit, leaving room for model files [default: 0].
    #[arg(long, env = "STREAMSERVE_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Memory (MiB) that request bodies being read and decoded may hold together; a body that
    /// would go beyond it gets 503 with Retry-After; at least 1 [default: 512].
    #[arg(long, env = "STREAMSERVE_MAX_BODY_MEMORY_MB")]
    pub max_body_memory_mb: Option<u64>,
    /// API keys file (TOML; see docs/access.md): when set, inference (REST, gRPC, streams) needs
    /// a key from it, within the models and limits it gives; re-read when it changes; unset =
    /// no keys needed.
    #[arg(long, env = "STREAMSERVE_API_KEYS")]
    pub api_keys: Option<PathBuf>,
    /// File whose contents (trimmed, at least 16 characters) are the secret under which the
    /// keys file's `hmac_sha256` entries are keyed.
    #[arg(long, env = "STREAMSERVE_API_KEY_SECRET_FILE")]
    pub api_key_secret_file: Option<PathBuf>,
    /// Header that carries the API key: `authorization` takes `Bearer <key>`, any other
    /// header the bare key [default: authorization].
    #[arg(long, env = "STREAMSERVE_API_KEY_HEADER")]
    pub api_key_header: Option<String>,
    /// Requests per second (burst: twice that) from one client address, for callers without
    /// an API key's own limits; 0 = no limit [default: 0].
    #[arg(long, env = "STREAMSERVE_CLIENT_REQUESTS_PER_SEC")]
    pub client_requests_per_sec: Option<u32>,
    /// Addresses or CIDR ranges of the proxies in front (comma-separated) whose
    /// `Fly-Client-IP` / `X-Forwarded-For` name the client; from anyone else those headers are
    /// ignored.
    #[arg(long, env = "STREAMSERVE_TRUSTED_PROXIES")]
    pub trusted_proxies: Option<String>,
    /// Port of the gRPC listener (the Open Inference Protocol over plaintext HTTP/2, on the
    /// same address as HTTP); 0 picks a free one, `off` turns gRPC off [default: 8081, or a
    /// free port when --port is 0].
    #[arg(long, env = "STREAMSERVE_GRPC_PORT")]
    pub grpc_port: Option<GrpcPort>,
    /// Port of a second listener for speech only (the stream and segments endpoints, and
    /// health), on HTTP threads of its own, so that a flood of requests on `--port` cannot
    /// hold up open streams' chunks; 0 picks a free one. Streams are served on `--port` too.
    /// Unset: no such listener.
    #[arg(long, env = "STREAMSERVE_STREAM_PORT")]
    pub stream_port: Option<u16>,
    /// HTTP worker threads of the `--stream-port` listener; 1 to 1024 [default: 1].
    #[arg(long, env = "STREAMSERVE_STREAM_WORKERS")]
    pub stream_workers: Option<usize>,
    /// Largest gRPC message received or sent, in bytes [default: max_body_bytes].
    #[arg(long, env = "STREAMSERVE_GRPC_MAX_MESSAGE_BYTES")]
    pub grpc_max_message_bytes: Option<usize>,
    /// PEM file of the certificate chain the gRPC listener presents: with
    /// `--grpc-tls-key`, gRPC takes TLS only (HTTP/2 over TLS, ALPN h2). Unset = plaintext
    /// HTTP/2 (h2c), for a proxy that terminates TLS.
    #[arg(long, env = "STREAMSERVE_GRPC_TLS_CERT")]
    pub grpc_tls_cert: Option<PathBuf>,
    /// PEM file of the private key of `--grpc-tls-cert` (a file, e.g. a mounted secret; it is
    /// read once at startup and never logged).
    #[arg(long, env = "STREAMSERVE_GRPC_TLS_KEY")]
    pub grpc_tls_key: Option<PathBuf>,
    /// Model registry to follow (docs/registry.md): `s3://bucket/prefix` (endpoint and keys
    /// from `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`),
    /// `gs://`, `az://`, `file:///dir` or a directory. Models in it are served beside those of
    /// `models`, as its desired state says; unset = the model directory alone.
    #[arg(long, env = "STREAMSERVE_REGISTRY")]
    pub registry: Option<String>,
    /// Seconds between two polls of the registry; 0.1 to 86400 [default: 5.0].
    #[arg(long, env = "STREAMSERVE_REGISTRY_POLL_SECS")]
    pub registry_poll_secs: Option<f64>,
    /// Directory that keeps the versions taken from the registry (sha256-verified) and its
    /// last desired state, to serve them after a restart while the registry is unreachable
    /// [default: .streamserve-cache].
    #[arg(long, env = "STREAMSERVE_REGISTRY_CACHE")]
    pub registry_cache: Option<PathBuf>,
    /// Seconds the server waits at startup for the registry's versions to load before it
    /// listens (serving what it has if they are not in by then) [default: 120].
    #[arg(long, env = "STREAMSERVE_REGISTRY_WAIT_SECS")]
    pub registry_wait_secs: Option<u64>,
    /// This instance's name in the fleet (letters, digits, `_-.`); unset = `FLY_MACHINE_ID`,
    /// else the host name and a random suffix.
    #[arg(long, env = "STREAMSERVE_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// The URL at which the fleet's operators can reach this instance, shown by
    /// `registry status`.
    #[arg(long, env = "STREAMSERVE_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// Watch every model version's inputs and outputs in /metrics: histograms on buckets
    /// fixed per version, NaN and infinity counts, input ranges and drift scores; `false`
    /// turns the recording off (probes still run) [default: true].
    #[arg(long, env = "STREAMSERVE_MONITOR_OUTPUTS")]
    pub monitor_outputs: Option<bool>,
    /// Rows answered after load that a version's drift reference is frozen from, when no
    /// `profile.json` was published with it; at least 1 [default: 1000].
    #[arg(long, env = "STREAMSERVE_DRIFT_REFERENCE_ROWS")]
    pub drift_reference_rows: Option<u64>,
    /// Rows each drift score is computed over; at least 1 [default: 1000].
    #[arg(long, env = "STREAMSERVE_DRIFT_WINDOW_ROWS")]
    pub drift_window_rows: Option<u64>,
    /// A model version whose last golden-input probe (`probe.json`) failed answers "not
    /// ready" on its readiness endpoints [default: false].
    #[arg(long, env = "STREAMSERVE_PROBE_READINESS")]
    pub probe_readiness: Option<bool>,
    /// Directory that keeps batch jobs' state files (docs/jobs.md): unfinished jobs resume
    /// from it when the server starts [default: .streamserve-jobs].
    #[arg(long, env = "STREAMSERVE_JOBS_DIR")]
    pub jobs_dir: Option<PathBuf>,
    /// Seconds a finished batch job (succeeded, failed or cancelled) stays listed after it
    /// ended; then its record and state file are removed (never its output). 0 = no age
    /// limit; at most 3650 days [default: 604800].
    #[arg(long, env = "STREAMSERVE_JOBS_RETENTION_SECS")]
    pub jobs_retention_secs: Option<u64>,
    /// Most finished batch jobs kept; beyond it the oldest finished are removed first, as
    /// past `jobs_retention_secs`. 0 = no count limit [default: 1000].
    #[arg(long, env = "STREAMSERVE_JOBS_KEEP_FINISHED")]
    pub jobs_keep_finished: Option<usize>,
}

/// Where gRPC listens: a port (0: a free one), or nowhere. Written `8081` or `"off"`, in TOML
/// and on the command line alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrpcPort {
    Off,
    Port(u16),
}

impl std::str::FromStr for GrpcPort {
    type Err = String;
    fn from_str(s: &str) -> Result<GrpcPort, String> {
        match s.trim() {
            "off" => Ok(GrpcPort::Off),
            port => port
                .parse()
                .map(GrpcPort::Port)
                .map_err(|_| format!("'{s}' is neither a port (0-65535) nor 'off'")),
        }
    }
}

impl Serialize for GrpcPort {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            GrpcPort::Off => serializer.serialize_str("off"),
            GrpcPort::Port(port) => serializer.serialize_u16(*port),
        }
    }
}

impl<'de> Deserialize<'de> for GrpcPort {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<GrpcPort, D::Error> {
        struct PortVisitor;
        impl serde::de::Visitor<'_> for PortVisitor {
            type Value = GrpcPort;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a port (0-65535) or \"off\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<GrpcPort, E> {
                u16::try_from(v)
                    .map(GrpcPort::Port)
                    .map_err(|_| E::custom(format!("port {v} is out of range (0-65535)")))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<GrpcPort, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("port {v} is out of range (0-65535)")))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<GrpcPort, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_any(PortVisitor)
    }
}

pub use crate::telemetry::LogFormat;

/// The resolved configuration the server runs with; also the keys of the TOML file, each
/// documented on its flag in [`ServeArgs`]. Keys the file leaves out take `Config::default()`.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub host: String,
    pub port: u16,
    pub models: PathBuf,
    pub log_format: LogFormat,
    pub log: String,
    pub max_body_bytes: usize,
    pub http_workers: usize,
    pub ort_dylib: Option<PathBuf>,
    pub stream_resume_secs: u64,
    pub stream_checkpoint_ms: u64,
    pub stream_token_keys: Option<PathBuf>,
    pub stream_token_key: Option<String>,
    pub stream_idle_secs: u64,
    pub drain_secs: u64,
    pub keep_alive_secs: u64,
    /// Filled from `admin_token_file` by [`Config::resolve`] when that is set.
    pub admin_token: Option<String>,
    pub admin_token_file: Option<PathBuf>,
    pub cpu_budget: usize,
    pub max_inflight: usize,
    pub admission: Admission,
    pub admission_target_ms: u64,
    /// `None`: the memory available when the server starts.
    pub memory_budget_mb: Option<u64>,
    pub vram_budget_mb: u64,
    pub body_timeout_secs: u64,
    pub min_body_bytes_per_sec: u64,
    /// 0: derived from the open-file limit.
    pub max_connections: usize,
    pub max_body_memory_mb: u64,
    pub api_keys: Option<PathBuf>,
    pub api_key_secret_file: Option<PathBuf>,
    pub api_key_header: String,
    pub client_requests_per_sec: u32,
    /// Comma-separated addresses or CIDR ranges.
    pub trusted_proxies: Option<String>,
    /// `None`: 8081, or a free port when `port` is 0 (see [`Config::grpc_listen_port`]).
    pub grpc_port: Option<GrpcPort>,
    /// `None`: no speech-only listener.
    pub stream_port: Option<u16>,
    pub stream_workers: usize,
    /// `None`: `max_body_bytes`.
    pub grpc_max_message_bytes: Option<usize>,
    pub grpc_tls_cert: Option<PathBuf>,
    pub grpc_tls_key: Option<PathBuf>,
    pub registry: Option<String>,
    pub registry_poll_secs: f64,
    pub registry_cache: PathBuf,
    pub registry_wait_secs: u64,
    /// `None`: see [`crate::actors::fleet::default_instance_id`].
    pub instance_id: Option<String>,
    pub advertise_url: Option<String>,
    pub monitor_outputs: bool,
    pub drift_reference_rows: u64,
    pub drift_window_rows: u64,
    pub probe_readiness: bool,
    pub jobs_dir: PathBuf,
    /// 0: finished jobs are not removed for their age.
    pub jobs_retention_secs: u64,
    /// 0: no limit on how many finished jobs are kept.
    pub jobs_keep_finished: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            host: "0.0.0.0".into(),
            port: 8080,
            models: PathBuf::from("models"),
            log_format: LogFormat::Text,
            log: "info".into(),
            max_body_bytes: 64 * 1024 * 1024,
            http_workers: cpus(),
            ort_dylib: None,
            stream_resume_secs: 30,
            stream_checkpoint_ms: 1000,
            stream_token_keys: None,
            stream_token_key: None,
            stream_idle_secs: 30,
            drain_secs: 30,
            keep_alive_secs: 75,
            admin_token: None,
            admin_token_file: None,
            cpu_budget: cpus(),
            max_inflight: 0,
            admission: Admission::Adaptive,
            admission_target_ms: 5,
            memory_budget_mb: None,
            vram_budget_mb: 0,
            body_timeout_secs: 60,
            min_body_bytes_per_sec: 16 * 1024,
            max_connections: 0,
            max_body_memory_mb: 512,
            api_keys: None,
            api_key_secret_file: None,
            api_key_header: "authorization".into(),
            client_requests_per_sec: 0,
            trusted_proxies: None,
            grpc_port: None,
            stream_port: None,
            stream_workers: 1,
            grpc_max_message_bytes: None,
            grpc_tls_cert: None,
            grpc_tls_key: None,
            registry: None,
            registry_poll_secs: 5.0,
            registry_cache: PathBuf::from(".streamserve-cache"),
            registry_wait_secs: 120,
            instance_id: None,
            advertise_url: None,
            monitor_outputs: true,
            drift_reference_rows: 1000,
            drift_window_rows: 1000,
            probe_readiness: false,
            jobs_dir: PathBuf::from(".streamserve-jobs"),
            jobs_retention_secs: 7 * 86_400,
            jobs_keep_finished: 1000,
        }
    }
}

/// How the door limits the inference requests it lets in (see `ServeArgs::admission`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Admission {
    /// A concurrency limit that follows the latency measured inside the server.
    #[default]
    Adaptive,
    /// `max_inflight` as it is (0: no limit): the behaviour before the adaptive limit.
    Static,
}

/// The gRPC port when none is configured (HTTP's 8080 plus one, as KServe and Triton pair them).
pub const DEFAULT_GRPC_PORT: u16 = 8081;

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

impl Config {
    /// Lays flags and environment (already merged by clap) over the config file, whose keys
    /// missing from it are the defaults, then applies the per-key rules.
    pub fn resolve(args: ServeArgs) -> anyhow::Result<Config> {
        Ok(Config::layered(args)?.normalise()?)
    }

    /// The layers merged, before the per-key rules (which read the admin token's file):
    /// enough for `check-models` to find the model directory as `serve` does.
    pub fn layered(args: ServeArgs) -> anyhow::Result<Config> {
        let file = match &args.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        // Before the merge (the file's in `from_file`): NaN and infinity have no JSON form and
        // would read as "unset".
        if let Some(secs) = args.registry_poll_secs {
            validate::check_poll_secs(secs).context("flags and environment")?;
        }
        let serde_json::Value::Object(mut merged) = serde_json::to_value(&file)? else {
            unreachable!("a struct serializes to a map")
        };
        let serde_json::Value::Object(flags) =
            serde_json::to_value(&args).context("flags and environment")?
        else {
            unreachable!("a struct serializes to a map")
        };
        // An unset flag is null; it leaves the file's (or default) value in place.
        merged.extend(flags.into_iter().filter(|(_, value)| !value.is_null()));
        serde_json::from_value(merged.into()).context("flags and environment")
    }

    /// The port gRPC listens on (0: a free one), or `None` when gRPC is off. Unset, it is 8081,
    /// except beside a free HTTP port (`port = 0`: tests, benchmarks), where it is a free port
    /// too, so that two such servers never contend for 8081.
    pub fn grpc_listen_port(&self) -> Option<u16> {
        match self.grpc_port {
            Some(GrpcPort::Off) => None,
            Some(GrpcPort::Port(port)) => Some(port),
            None if self.port == 0 => Some(0),
            None => Some(DEFAULT_GRPC_PORT),
        }
    }

    /// How each model version's monitor works.
    pub fn watch_settings(&self) -> crate::monitor::WatchSettings {
        crate::monitor::WatchSettings {
            enabled: self.monitor_outputs,
            reference_rows: self.drift_reference_rows,
            window_rows: self.drift_window_rows,
            probe_gates_readiness: self.probe_readiness,
        }
    }

    /// How long, and how many, finished batch jobs are kept.
    pub fn jobs_retention(&self) -> crate::jobs::Retention {
        crate::jobs::Retention {
            max_age: (self.jobs_retention_secs > 0)
                .then(|| std::time::Duration::from_secs(self.jobs_retention_secs)),
            max_finished: (self.jobs_keep_finished > 0).then_some(self.jobs_keep_finished),
        }
    }

    /// The largest gRPC message, received or sent.
    pub fn grpc_max_message(&self) -> usize {
        self.grpc_max_message_bytes.unwrap_or(self.max_body_bytes)
    }

    /// Reads a TOML config file; keys it leaves out are the defaults.
    pub fn from_file(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let config: Config =
            toml::from_str(&text).map_err(|e| validate::file_error(path, &text, &e))?;
        validate::check_poll_secs(config.registry_poll_secs)
            .with_context(|| format!("config file {}", path.display()))?;
        Ok(config)
    }
}

/// Keys whose values `Debug` never prints.
const SECRET_KEYS: &[&str] = &["admin_token", "stream_token_key"];

/// `Debug` of a configuration struct through its serde form, so that it lists every key
/// without a third copy of them, with the secret ones redacted.
fn debug_redacted(
    name: &str,
    first: Option<(&str, &dyn fmt::Debug)>,
    value: &impl Serialize,
    f: &mut fmt::Formatter<'_>,
) -> fmt::Result {
    let Ok(serde_json::Value::Object(map)) = serde_json::to_value(value) else {
        return f.write_str(name);
    };
    let mut out = f.debug_struct(name);
    if let Some((key, value)) = first {
        out.field(key, value);
    }
    for (key, value) in &map {
        if SECRET_KEYS.contains(&key.as_str()) && !value.is_null() {
            out.field(key, &format_args!("<redacted>"));
        } else {
            out.field(key, &format_args!("{value}"));
        }
    }
    out.finish()
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        debug_redacted("Config", None, self, f)
    }
}

impl fmt::Debug for ServeArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        debug_redacted("ServeArgs", Some(("config", &self.config)), self, f)
    }
}

mod check;
mod env_vars;
#[cfg(test)]
mod tests;
mod validate;

pub use check::CheckArgs;
pub use env_vars::{known_vars, unknown_vars, warn_unknown_vars, UnknownVar, ENV_PREFIX};
pub use validate::{ConfigError, MAX_DURATION_SECS, MAX_JOBS_RETENTION_SECS, MAX_WORKERS};
