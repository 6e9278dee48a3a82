//! fly.toml helpers, and the check that `fly.toml` and `fly.gpu.toml` deploy the right
//! Dockerfile stage with the image's environment, ports, health check and stop timing.

use std::collections::BTreeMap;
use std::time::Duration;

use streamserve::manifest::Manifest;
use toml::Value;

use super::dockerfile::{dockerfile, grpc_port, Dockerfile, Stage};
use super::{read, repo};

pub(crate) fn fly(name: &str) -> Value {
    toml::from_str(&read(name)).unwrap_or_else(|e| panic!("{name} is not valid TOML: {e}"))
}

pub(crate) fn get<'a>(config: &'a Value, path: &str) -> &'a Value {
    path.split('.')
        .try_fold(config, |v, key| v.get(key))
        .unwrap_or_else(|| panic!("missing key {path}"))
}

pub(crate) fn get_str<'a>(config: &'a Value, path: &str) -> &'a str {
    get(config, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path} is not a string"))
}

fn get_int(config: &Value, path: &str) -> i64 {
    get(config, path)
        .as_integer()
        .unwrap_or_else(|| panic!("{path} is not an integer"))
}

fn get_bool(config: &Value, path: &str) -> bool {
    get(config, path)
        .as_bool()
        .unwrap_or_else(|| panic!("{path} is not a boolean"))
}

/// A fly duration: a Go duration string ("35s", "1m30s", "500ms") or, for kill_timeout, an
/// integer number of seconds.
pub(crate) fn duration(value: &Value) -> Duration {
    if let Some(secs) = value.as_integer() {
        return Duration::from_secs(secs.try_into().expect("negative duration"));
    }
    let text = value
        .as_str()
        .expect("duration is neither integer nor string");
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or_else(|| panic!("duration {text:?} lacks a unit"));
        let number: f64 = rest[..digits]
            .parse()
            .unwrap_or_else(|_| panic!("bad duration {text:?}"));
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            other => panic!("unknown unit {other:?} in duration {text:?}"),
        };
        total += Duration::from_secs_f64(number * unit);
        rest = &rest[unit_len..];
    }
    total
}

pub(crate) fn health_check(config: &Value) -> &Value {
    let checks = get(config, "http_service.checks")
        .as_array()
        .expect("[[http_service.checks]] is an array of tables");
    checks
        .iter()
        .find(|c| c.get("path").and_then(Value::as_str) == Some("/v2/health/ready"))
        .expect("a [[http_service.checks]] on /v2/health/ready")
}

/// The server's drain on SIGTERM under this environment (STREAMSERVE_DRAIN_SECS, else the
/// built-in default).
fn drain_secs(env: &BTreeMap<String, String>) -> u64 {
    env.get("STREAMSERVE_DRAIN_SECS")
        .map(|v| v.parse().expect("STREAMSERVE_DRAIN_SECS is a number"))
        .unwrap_or_else(|| streamserve::config::Config::default().drain_secs)
}

/// The Dockerfile stage a fly config deploys.
pub(crate) fn fly_stage<'a>(docker: &'a Dockerfile, config: &Value) -> &'a Stage {
    assert_eq!(get_str(config, "build.dockerfile"), "Dockerfile");
    let target = config
        .get("build")
        .and_then(|b| b.get("build-target"))
        .and_then(Value::as_str);
    docker.target(target)
}

/// The smallest `max_queue` of any model version in the manifest the image ships.
fn smallest_max_queue() -> usize {
    let manifest = Manifest::load(&repo().join("models")).unwrap();
    manifest.models.iter().map(|m| m.max_queue).min().unwrap()
}

#[test]
fn fly_configs_match_the_image_and_the_server() {
    let docker = dockerfile();
    let max_queue = smallest_max_queue();
    for (name, gpu) in [("fly.toml", false), ("fly.gpu.toml", true)] {
        let config = fly(name);
        let stage = fly_stage(&docker, &config);
        let env = stage.env();
        assert!(!get_str(&config, "app").is_empty(), "{name}: app");
        assert!(!get_str(&config, "primary_region").is_empty(), "{name}");
        assert_eq!(
            stage.name.as_deref(),
            Some(if gpu { "gpu" } else { "cpu" }),
            "{name}"
        );

        // [env] says what the image already sets, nothing different.
        let fly_env: BTreeMap<String, String> = get(&config, "env")
            .as_table()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_str().expect("env values are strings").to_string(),
                )
            })
            .collect();
        assert_eq!(fly_env, env, "{name}: [env] vs the Dockerfile's ENV");

        // Stopping: the signal the server drains on, and longer than its drain.
        assert_eq!(get_str(&config, "kill_signal"), "SIGTERM", "{name}");
        let kill_timeout = duration(get(&config, "kill_timeout"));
        let drain = Duration::from_secs(drain_secs(&env));
        assert!(
            kill_timeout > drain,
            "{name}: kill_timeout {kill_timeout:?} must exceed the server's drain {drain:?}"
        );
        assert!(
            kill_timeout <= Duration::from_secs(300),
            "{name}: fly's maximum"
        );

        // The service: the port the server listens on and the image exposes.
        let port = get_int(&config, "http_service.internal_port");
        assert_eq!(port, 8080, "{name}");
        assert_eq!(env["STREAMSERVE_PORT"], port.to_string(), "{name}");
        let grpc = grpc_port(&env);
        assert_eq!(stage.exposed_ports(), vec![port as u16, grpc], "{name}");
        // gRPC: a TCP service on the server's gRPC port, TLS ending at fly's proxy with ALPN
        // h2 so that the plaintext HTTP/2 (h2c) listener gets the connection as it is.
        let services = get(&config, "services").as_array().expect("[[services]]");
        let service = services
            .iter()
            .find(|s| get_int(s, "internal_port") == i64::from(grpc))
            .unwrap_or_else(|| panic!("{name}: no service on the gRPC port {grpc}"));
        assert_eq!(get_str(service, "protocol"), "tcp", "{name}");
        let ports = get(service, "ports").as_array().unwrap();
        assert!(
            ports.iter().any(|p| {
                let handlers = get(p, "handlers").as_array().unwrap();
                let alpn = get(p, "tls_options.alpn").as_array().unwrap();
                handlers.len() == 1
                    && handlers[0].as_str() == Some("tls")
                    && alpn.iter().any(|a| a.as_str() == Some("h2"))
            }),
            "{name}: the gRPC service needs a tls port with alpn h2: {ports:?}"
        );
        assert_eq!(
            get_str(service, "concurrency.type"),
            "connections",
            "{name}"
        );
        assert_eq!(get_str(service, "auto_stop_machines"), "stop", "{name}");
        assert!(get_bool(&config, "http_service.force_https"), "{name}");
        assert_eq!(
            get_str(&config, "http_service.auto_stop_machines"),
            "stop",
            "{name}"
        );
        assert!(
            get_bool(&config, "http_service.auto_start_machines"),
            "{name}"
        );
        assert_eq!(
            get_int(&config, "http_service.min_machines_running"),
            0,
            "{name}"
        );

        // Fly stops sending to a machine at hard_limit in-flight requests, before any model's
        // queue could reach the max_queue at which the server answers 429.
        assert_eq!(
            get_str(&config, "http_service.concurrency.type"),
            "requests"
        );
        let soft = get_int(&config, "http_service.concurrency.soft_limit");
        let hard = get_int(&config, "http_service.concurrency.hard_limit");
        assert!(
            0 < soft && soft < hard && (hard as usize) < max_queue,
            "{name}: need 0 < soft_limit {soft} < hard_limit {hard} < smallest max_queue {max_queue}"
        );

        // The health check: readiness, answered before fly gives up on it.
        let check = health_check(&config);
        assert_eq!(
            check
                .get("method")
                .and_then(Value::as_str)
                .unwrap_or("GET")
                .to_ascii_uppercase(),
            "GET"
        );
        let interval = duration(get(check, "interval"));
        let timeout = duration(get(check, "timeout"));
        let grace = duration(get(check, "grace_period"));
        assert!(timeout < interval && !grace.is_zero(), "{name}: {check}");

        // Metrics scraped from the server's own endpoint.
        assert_eq!(get_int(&config, "metrics.port"), port, "{name}");
        assert_eq!(get_str(&config, "metrics.path"), "/metrics", "{name}");

        let vm = get(&config, "vm").as_array().expect("[[vm]]");
        assert_eq!(vm.len(), 1, "{name}");
        let size = get_str(&vm[0], "size");
        if gpu {
            // GPU presets are named after the GPU ("a10", "l40s", "a100-40gb", ...).
            let kind = get_str(&vm[0], "gpu_kind");
            assert!(
                !size.starts_with("shared-cpu-") && !size.starts_with("performance-"),
                "{name}: size {size} is not a GPU preset"
            );
            assert!(!kind.is_empty(), "{name}: gpu_kind");
        } else {
            assert!(size.starts_with("shared-cpu-") || size.starts_with("performance-"));
            assert!(vm[0].get("gpu_kind").is_none(), "{name}");
        }
    }
}
