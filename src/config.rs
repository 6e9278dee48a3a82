//! Server configuration, from one source with three layers: command-line flags win over
//! environment variables (`STREAMSERVE_*`), which win over an optional TOML file
//! (`--config`), which wins over built-in defaults that just work.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

#[derive(Debug, Parser)]
#[command(
    name = "streamserve",
    version,
    about = "Serve ONNX models over the Open Inference Protocol"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the server on the models of a model directory.
    Serve(Box<ServeArgs>),
    /// Verify a model directory's manifest and hashes, then print what it holds.
    CheckModels(CheckArgs),
    /// Operate a running server through its admin API (load, unload, deploy, rollback, ...).
    Admin(crate::cli::AdminArgs),
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Model directory holding `models.toml`.
    #[arg(long, env = "STREAMSERVE_MODELS", default_value = "models")]
    pub models: PathBuf,
}

/// Flags of `streamserve serve`. Each is optional here so that an unset flag falls through
/// to the environment, then to the config file, then to the default.
#[derive(Debug, Args, Default)]
pub struct ServeArgs {
    /// TOML config file with any of the keys below (snake_case).
    #[arg(long, env = "STREAMSERVE_CONFIG")]
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
    /// Log filter in `RUST_LOG` syntax [default: info].
    #[arg(long, env = "STREAMSERVE_LOG")]
    pub log: Option<String>,
    /// Largest request body accepted, in bytes [default: 67108864].
    #[arg(long, env = "STREAMSERVE_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// HTTP worker threads [default: number of CPUs].
    #[arg(long, env = "STREAMSERVE_HTTP_WORKERS")]
    pub http_workers: Option<usize>,
    /// Path of libonnxruntime; otherwise `ORT_DYLIB_PATH`, then the project's `.venv`.
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_dylib: Option<PathBuf>,
    /// Seconds a dropped stream waits for its client to resume [default: 30].
    #[arg(long, env = "STREAMSERVE_STREAM_RESUME_SECS")]
    pub stream_resume_secs: Option<u64>,
    /// Seconds without audio after which a stream is closed [default: 30].
    #[arg(long, env = "STREAMSERVE_STREAM_IDLE_SECS")]
    pub stream_idle_secs: Option<u64>,
    /// Seconds to finish in-flight work after SIGTERM before exiting [default: 30].
    #[arg(long, env = "STREAMSERVE_DRAIN_SECS")]
    pub drain_secs: Option<u64>,
    /// Seconds an idle HTTP keep-alive connection stays open [default: 75]. Longer than the
    /// idle timeout of any proxy or client pool in front (fly's proxy, load balancers' 60 s),
    /// so that they close idle connections first and never send a request on one the server
    /// is closing.
    #[arg(long, env = "STREAMSERVE_KEEP_ALIVE_SECS")]
    pub keep_alive_secs: Option<u64>,
    /// Inference requests decoded, queued or running at once; beyond it new ones get an
    /// immediate 429. 0 = no limit [default: 0]. Worth setting for models whose inference
    /// outweighs the HTTP and JSON work of a request: shedding then saves real work.
    #[arg(long, env = "STREAMSERVE_MAX_INFLIGHT")]
    pub max_inflight: Option<usize>,
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
    #[arg(long, env = "STREAMSERVE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Seconds a request body may take to arrive, whole; slower ones get 408 [default: 60].
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
    /// would go beyond it gets 503 with Retry-After [default: 512].
    #[arg(long, env = "STREAMSERVE_MAX_BODY_MEMORY_MB")]
    pub max_body_memory_mb: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Keys accepted in the TOML config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    host: Option<String>,
    port: Option<u16>,
    models: Option<PathBuf>,
    log_format: Option<LogFormat>,
    log: Option<String>,
    max_body_bytes: Option<usize>,
    http_workers: Option<usize>,
    ort_dylib: Option<PathBuf>,
    stream_resume_secs: Option<u64>,
    stream_idle_secs: Option<u64>,
    drain_secs: Option<u64>,
    keep_alive_secs: Option<u64>,
    admin_token: Option<String>,
    cpu_budget: Option<usize>,
    max_inflight: Option<usize>,
    memory_budget_mb: Option<u64>,
    vram_budget_mb: Option<u64>,
    body_timeout_secs: Option<u64>,
    min_body_bytes_per_sec: Option<u64>,
    max_connections: Option<usize>,
    max_body_memory_mb: Option<u64>,
}

/// The resolved configuration the server runs with.
#[derive(Clone, Debug)]
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
    pub stream_idle_secs: u64,
    pub drain_secs: u64,
    pub keep_alive_secs: u64,
    pub admin_token: Option<String>,
    pub cpu_budget: usize,
    pub max_inflight: usize,
    /// `None`: the memory available when the server starts.
    pub memory_budget_mb: Option<u64>,
    pub vram_budget_mb: u64,
    pub body_timeout_secs: u64,
    pub min_body_bytes_per_sec: u64,
    /// 0: derived from the open-file limit.
    pub max_connections: usize,
    pub max_body_memory_mb: u64,
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
            http_workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            ort_dylib: None,
            stream_resume_secs: 30,
            stream_idle_secs: 30,
            drain_secs: 30,
            keep_alive_secs: 75,
            admin_token: None,
            cpu_budget: std::thread::available_parallelism().map_or(2, |n| n.get()),
            max_inflight: 0,
            memory_budget_mb: None,
            vram_budget_mb: 0,
            body_timeout_secs: 60,
            min_body_bytes_per_sec: 16 * 1024,
            max_connections: 0,
            max_body_memory_mb: 512,
        }
    }
}

impl Config {
    /// Resolves flags and environment (already merged by clap) over the config file over defaults.
    pub fn resolve(args: ServeArgs) -> anyhow::Result<Config> {
        let file = match &args.config {
            Some(path) => load_file(path)?,
            None => FileConfig::default(),
        };
        let defaults = Config::default();
        Ok(Config {
            host: args.host.or(file.host).unwrap_or(defaults.host),
            port: args.port.or(file.port).unwrap_or(defaults.port),
            models: args.models.or(file.models).unwrap_or(defaults.models),
            log_format: args
                .log_format
                .or(file.log_format)
                .unwrap_or(defaults.log_format),
            log: args.log.or(file.log).unwrap_or(defaults.log),
            max_body_bytes: args
                .max_body_bytes
                .or(file.max_body_bytes)
                .unwrap_or(defaults.max_body_bytes),
            http_workers: args
                .http_workers
                .or(file.http_workers)
                .unwrap_or(defaults.http_workers)
                .max(1),
            ort_dylib: args.ort_dylib.or(file.ort_dylib),
            stream_resume_secs: args
                .stream_resume_secs
                .or(file.stream_resume_secs)
                .unwrap_or(defaults.stream_resume_secs),
            stream_idle_secs: args
                .stream_idle_secs
                .or(file.stream_idle_secs)
                .unwrap_or(defaults.stream_idle_secs)
                .max(1),
            drain_secs: args
                .drain_secs
                .or(file.drain_secs)
                .unwrap_or(defaults.drain_secs),
            keep_alive_secs: args
                .keep_alive_secs
                .or(file.keep_alive_secs)
                .unwrap_or(defaults.keep_alive_secs),
            admin_token: args.admin_token.or(file.admin_token),
            cpu_budget: args
                .cpu_budget
                .or(file.cpu_budget)
                .unwrap_or(defaults.cpu_budget),
            max_inflight: args
                .max_inflight
                .or(file.max_inflight)
                .unwrap_or(defaults.max_inflight),
            memory_budget_mb: args.memory_budget_mb.or(file.memory_budget_mb),
            vram_budget_mb: args
                .vram_budget_mb
                .or(file.vram_budget_mb)
                .unwrap_or(defaults.vram_budget_mb),
            body_timeout_secs: args
                .body_timeout_secs
                .or(file.body_timeout_secs)
                .unwrap_or(defaults.body_timeout_secs)
                .max(1),
            min_body_bytes_per_sec: args
                .min_body_bytes_per_sec
                .or(file.min_body_bytes_per_sec)
                .unwrap_or(defaults.min_body_bytes_per_sec),
            max_connections: args
                .max_connections
                .or(file.max_connections)
                .unwrap_or(defaults.max_connections),
            max_body_memory_mb: args
                .max_body_memory_mb
                .or(file.max_body_memory_mb)
                .unwrap_or(defaults.max_body_memory_mb)
                .max(1),
        })
    }
}

fn load_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_file_and_file_over_defaults() {
        let dir = std::env::temp_dir().join(format!("streamserve-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.toml");
        std::fs::write(
            &path,
            "port = 9000\nhost = \"127.0.0.1\"\nlog_format = \"json\"\nkeep_alive_secs = 10\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path.clone()),
            port: Some(9100),
            ..ServeArgs::default()
        };
        let config = Config::resolve(args).unwrap();
        assert_eq!(config.port, 9100);
        assert_eq!(config.host, "127.0.0.1");
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(config.models, PathBuf::from("models"));
        assert_eq!(config.keep_alive_secs, 10);
        assert_eq!(Config::default().keep_alive_secs, 75);

        std::fs::write(&path, "prot = 1\n").unwrap();
        let err = Config::resolve(ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }
}
