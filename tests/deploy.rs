//! The deployment files (`Dockerfile`, `.dockerignore`, `fly.toml`, `fly.gpu.toml`) checked
//! against each other, against the server's own defaults and manifest, and against the real
//! binary: the image's command line and environment are read from the Dockerfile and the binary
//! is started exactly so (with a free port on loopback and the repository's models instead of
//! /app/models), answers fly's health check, logs JSON, and exits 0 on SIGTERM within fly's
//! kill_timeout. No container engine is needed: the image's instructions are parsed, not built.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use streamserve::manifest::{Device, Manifest};
use toml::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(name: &str) -> String {
    std::fs::read_to_string(repo().join(name)).unwrap_or_else(|e| panic!("cannot read {name}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// A small Dockerfile reader: logical lines (continuations joined, comments dropped), stages,
// ARG expansion, and the forms of ENV, COPY and CMD that this Dockerfile uses.

#[derive(Debug)]
struct Stage {
    base: String,
    name: Option<String>,
    /// (KEYWORD, arguments with ARG values expanded)
    instructions: Vec<(String, String)>,
}

#[derive(Debug)]
struct Dockerfile {
    global_args: BTreeMap<String, String>,
    stages: Vec<Stage>,
}

#[derive(Debug)]
struct CopyInstr {
    from: Option<String>,
    sources: Vec<String>,
    dest: String,
}

fn logical_lines(text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut current = String::new();
    for raw in text.lines() {
        let trimmed = raw.trim();
        // Comment lines are dropped, also inside a continuation (as Docker does).
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                lines.push(std::mem::take(&mut current));
            }
        }
    }
    assert!(
        current.trim().is_empty(),
        "Dockerfile ends inside a continuation"
    );
    lines
}

/// `${NAME}` and `$NAME` replaced from `vars`; unknown names are left as written.
fn expand(text: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, len) = if let Some(braced) = after.strip_prefix('{') {
            let end = braced.find('}').expect("unterminated ${");
            (&braced[..end], end + 2)
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        match vars.get(name) {
            Some(value) if !name.is_empty() => out.push_str(value),
            _ => out.push_str(&rest[i..i + 1 + len]),
        }
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

/// Whitespace-separated words as a shell splits them: '...' is literal, "..." allows
/// backslash escapes; the quotes themselves are removed.
fn words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quote: Option<char> = None;
    let mut in_word = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') => word.extend(chars.next()),
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (_, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    assert!(quote.is_none(), "unbalanced quotes in {text:?}");
    if in_word {
        words.push(word);
    }
    words
}

impl Dockerfile {
    fn parse(text: &str) -> Dockerfile {
        let mut global_args = BTreeMap::new();
        let mut stages: Vec<Stage> = Vec::new();
        let mut stage_args = BTreeMap::new();
        for line in logical_lines(text) {
            let (keyword, args) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
            let keyword = keyword.to_ascii_uppercase();
            let args = args.trim();
            if keyword == "FROM" {
                let w: Vec<String> = words(&expand(args, &global_args))
                    .into_iter()
                    .filter(|w| !w.starts_with("--"))
                    .collect();
                let name = match w.as_slice() {
                    [_] => None,
                    [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some(name.clone()),
                    _ => panic!("cannot read FROM {args}"),
                };
                stages.push(Stage {
                    base: w[0].clone(),
                    name,
                    instructions: Vec::new(),
                });
                stage_args = BTreeMap::new();
                continue;
            }
            if keyword == "ARG" {
                let (name, default) = match args.split_once('=') {
                    Some((n, v)) => (n.trim().to_string(), Some(words(v).concat())),
                    None => (args.to_string(), None),
                };
                if stages.is_empty() {
                    global_args.insert(name, default.unwrap_or_default());
                } else if let Some(value) = default.or_else(|| global_args.get(&name).cloned()) {
                    stage_args.insert(name, value);
                }
                continue;
            }
            let stage = stages
                .last_mut()
                .unwrap_or_else(|| panic!("{keyword} before the first FROM"));
            stage
                .instructions
                .push((keyword, expand(args, &stage_args)));
        }
        assert!(!stages.is_empty(), "Dockerfile has no FROM");
        Dockerfile {
            global_args,
            stages,
        }
    }

    fn stage(&self, name: &str) -> &Stage {
        self.stages
            .iter()
            .find(|s| s.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("Dockerfile has no stage named {name}"))
    }

    /// The stage `docker build` (or fly's builder) produces for a build target.
    fn target(&self, target: Option<&str>) -> &Stage {
        match target {
            Some(name) => self.stage(name),
            None => self.stages.last().unwrap(),
        }
    }
}

impl Stage {
    fn label(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.base)
    }

    fn all<'a>(&'a self, keyword: &str) -> impl Iterator<Item = &'a str> + 'a {
        let keyword = keyword.to_string();
        self.instructions
            .iter()
            .filter(move |(k, _)| *k == keyword)
            .map(|(_, args)| args.as_str())
    }

    /// The last instruction of a kind (the one that counts for CMD, USER, STOPSIGNAL).
    fn last(&self, keyword: &str) -> Option<&str> {
        self.all(keyword).last()
    }

    fn env(&self) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        for args in self.all("ENV") {
            let w = words(args);
            if !w[0].contains('=') {
                // Legacy `ENV NAME value with spaces`.
                let (name, value) = args.split_once(char::is_whitespace).unwrap();
                env.insert(name.to_string(), value.trim().to_string());
                continue;
            }
            for pair in w {
                let (name, value) = pair
                    .split_once('=')
                    .unwrap_or_else(|| panic!("ENV word without '=': {pair}"));
                env.insert(name.to_string(), value.to_string());
            }
        }
        env
    }

    /// CMD in exec (JSON array) form: the process gets SIGTERM itself, not through `sh -c`.
    fn cmd(&self) -> Vec<String> {
        let cmd = self
            .last("CMD")
            .unwrap_or_else(|| panic!("stage {} has no CMD", self.label()));
        serde_json::from_str(cmd).unwrap_or_else(|_| {
            panic!(
                "stage {}: CMD must be in exec form [\"...\"] so that SIGTERM reaches streamserve, got {cmd}",
                self.label()
            )
        })
    }

    fn copies(&self) -> Vec<CopyInstr> {
        self.all("COPY")
            .map(|args| {
                let w = words(args);
                let mut from = None;
                let mut paths = Vec::new();
                for word in w {
                    if let Some(stage) = word.strip_prefix("--from=") {
                        from = Some(stage.to_string());
                    } else if !word.starts_with("--") {
                        paths.push(word);
                    }
                }
                let dest = paths.pop().expect("COPY without destination");
                assert!(!paths.is_empty(), "COPY without source: {args}");
                CopyInstr {
                    from,
                    sources: paths,
                    dest,
                }
            })
            .collect()
    }

    /// The path a file copied by `copy` has in the image.
    fn copied_to(copy: &CopyInstr, source: &str) -> String {
        if copy.dest.ends_with('/') {
            let file = source.rsplit('/').next().unwrap();
            format!("{}{file}", copy.dest)
        } else {
            copy.dest.clone()
        }
    }

    fn exposed_ports(&self) -> Vec<u16> {
        self.all("EXPOSE")
            .flat_map(words)
            .map(|p| {
                let port = p.split('/').next().unwrap();
                port.parse()
                    .unwrap_or_else(|_| panic!("EXPOSE {p} is not a port"))
            })
            .collect()
    }
}

/// The port the image's server listens for gRPC on: its environment's, else the server's
/// default (the image leaves it at that).
fn grpc_port(env: &BTreeMap<String, String>) -> u16 {
    env.get("STREAMSERVE_GRPC_PORT")
        .map(|p| p.parse().expect("STREAMSERVE_GRPC_PORT is a port"))
        .unwrap_or(streamserve::config::DEFAULT_GRPC_PORT)
}

// ---------------------------------------------------------------------------------------------
// fly.toml helpers

fn fly(name: &str) -> Value {
    toml::from_str(&read(name)).unwrap_or_else(|e| panic!("{name} is not valid TOML: {e}"))
}

fn get<'a>(config: &'a Value, path: &str) -> &'a Value {
    path.split('.')
        .try_fold(config, |v, key| v.get(key))
        .unwrap_or_else(|| panic!("missing key {path}"))
}

fn get_str<'a>(config: &'a Value, path: &str) -> &'a str {
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
fn duration(value: &Value) -> Duration {
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

fn health_check(config: &Value) -> &Value {
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
fn fly_stage<'a>(docker: &'a Dockerfile, config: &Value) -> &'a Stage {
    assert_eq!(get_str(config, "build.dockerfile"), "Dockerfile");
    let target = config
        .get("build")
        .and_then(|b| b.get("build-target"))
        .and_then(Value::as_str);
    docker.target(target)
}

fn dockerfile() -> Dockerfile {
    Dockerfile::parse(&read("Dockerfile"))
}

/// The smallest `max_queue` of any model version in the manifest the image ships.
fn smallest_max_queue() -> usize {
    let manifest = Manifest::load(&repo().join("models")).unwrap();
    manifest.models.iter().map(|m| m.max_queue).min().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Static checks

#[test]
fn dockerfile_pins_the_onnx_runtime_the_binary_is_built_for() {
    let docker = dockerfile();
    let version = docker
        .global_args
        .get("ORT_VERSION")
        .expect("ARG ORT_VERSION before the first FROM");
    assert_eq!(version, streamserve::runtime::ORT_VERSION);
    let requirements = read("requirements.txt");
    assert!(
        requirements
            .lines()
            .any(|l| l.trim() == format!("onnxruntime=={version}")),
        "requirements.txt pins onnxruntime=={version}"
    );
    for (stage, package) in [("ort-cpu", "onnxruntime"), ("ort-gpu", "onnxruntime-gpu")] {
        let stage = docker.stage(stage);
        let pip = stage.all("RUN").find(|r| r.contains("pip install"));
        let pip = pip.unwrap_or_else(|| panic!("{} runs pip install", stage.label()));
        assert!(
            words(pip).contains(&format!("{package}=={version}")),
            "{}: {pip}",
            stage.label()
        );
    }
}

/// Where `src/runtime/mod.rs` looks for the library when no path is configured.
fn library_search_paths() -> Vec<String> {
    let source = read("src/runtime/mod.rs");
    source
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| s.starts_with('/') && s.ends_with("/libonnxruntime.so"))
        .map(str::to_string)
        .collect()
}

fn check_runtime_stage(docker: &Dockerfile, stage: &Stage, ort_stage: &str) {
    let label = stage.label();
    let env = stage.env();
    let copies = stage.copies();
    let version = &docker.global_args["ORT_VERSION"];

    // The binary, built by the build stage, is what CMD runs.
    let build = docker
        .stages
        .iter()
        .find(|s| {
            s.all("RUN")
                .any(|r| r.contains("cargo build --release --locked --bin streamserve"))
        })
        .expect("a stage runs cargo build --release --locked --bin streamserve");
    let binary = copies
        .iter()
        .find(|c| {
            c.from.as_deref() == build.name.as_deref() && c.dest == "/usr/local/bin/streamserve"
        })
        .unwrap_or_else(|| panic!("{label}: COPY --from=build ... /usr/local/bin/streamserve"));
    assert_eq!(binary.sources.len(), 1);
    let cmd = stage.cmd();
    assert!(
        cmd[0] == "streamserve" || cmd[0] == "/usr/local/bin/streamserve",
        "{label}: CMD runs the copied binary: {cmd:?}"
    );
    assert_eq!(
        cmd.get(1).map(String::as_str),
        Some("serve"),
        "{label}: {cmd:?}"
    );

    // models/ lands where STREAMSERVE_MODELS points.
    let models = env
        .get("STREAMSERVE_MODELS")
        .unwrap_or_else(|| panic!("{label}: ENV STREAMSERVE_MODELS"));
    assert!(
        copies.iter().any(|c| c.from.is_none()
            && c.sources
                .iter()
                .any(|s| s.trim_end_matches('/') == "models")
            && c.dest.trim_end_matches('/') == models.trim_end_matches('/')),
        "{label}: COPY models/ {models}"
    );

    // libonnxruntime lands where the binary looks by default, taken from the pinned wheel.
    assert!(
        !env.contains_key("ORT_DYLIB_PATH"),
        "{label}: the library is found at its default path, no ORT_DYLIB_PATH needed"
    );
    let search = library_search_paths();
    assert!(
        search.contains(&"/usr/local/lib/libonnxruntime.so".to_string()),
        "src/runtime/mod.rs no longer looks in /usr/local/lib: {search:?}"
    );
    let lib = copies
        .iter()
        .find(|c| c.dest == "/usr/local/lib/libonnxruntime.so")
        .unwrap_or_else(|| panic!("{label}: COPY ... /usr/local/lib/libonnxruntime.so"));
    assert_eq!(lib.from.as_deref(), Some(ort_stage), "{label}");
    assert_eq!(lib.sources.len(), 1);
    assert!(
        lib.sources[0].ends_with(&format!("/onnxruntime/capi/libonnxruntime.so.{version}")),
        "{label}: {:?}",
        lib.sources
    );
    let pip = docker
        .stage(ort_stage)
        .all("RUN")
        .find(|r| r.contains("pip install"))
        .unwrap();
    let pip_words = words(pip);
    let target = pip_words
        .iter()
        .position(|w| w == "--target")
        .map(|i| pip_words[i + 1].clone())
        .expect("pip install --target <dir>");
    assert!(
        lib.sources[0].starts_with(&format!("{}/", target.trim_end_matches('/'))),
        "{label}: the library comes from the wheel installed in {target}"
    );

    // Runs as a user, serves on the port it exposes, stops on SIGTERM.
    let user = stage
        .last("USER")
        .unwrap_or_else(|| panic!("{label}: USER"));
    let uid = user.split(':').next().unwrap();
    assert!(uid != "root" && uid != "0", "{label}: runs as root");
    let port: u16 = env["STREAMSERVE_PORT"].parse().unwrap();
    assert_eq!(
        stage.exposed_ports(),
        vec![port, grpc_port(&env)],
        "{label}: EXPOSE (HTTP, gRPC)"
    );
    assert_eq!(stage.last("STOPSIGNAL"), Some("SIGTERM"), "{label}");
    assert_eq!(
        env["STREAMSERVE_HOST"], "0.0.0.0",
        "{label}: reachable from outside"
    );
    assert_eq!(env["STREAMSERVE_LOG_FORMAT"], "json", "{label}");
}

#[test]
fn runtime_stages_put_binary_models_and_library_where_the_server_looks() {
    let docker = dockerfile();
    let cpu = docker.target(None);
    assert_eq!(
        cpu.name.as_deref(),
        Some("cpu"),
        "the default (last) stage is the CPU image"
    );
    assert_eq!(cpu.base, "debian:bookworm-slim");
    check_runtime_stage(&docker, cpu, "ort-cpu");

    let gpu = docker.stage("gpu");
    assert!(
        gpu.base.starts_with("nvidia/cuda:") && gpu.base.contains("cudnn-runtime"),
        "{}",
        gpu.base
    );
    check_runtime_stage(&docker, gpu, "ort-gpu");
    // The CUDA provider is loaded from libonnxruntime's own directory.
    let copied: Vec<String> = gpu
        .copies()
        .iter()
        .filter(|c| c.from.as_deref() == Some("ort-gpu"))
        .flat_map(|c| {
            c.sources
                .iter()
                .map(|s| Stage::copied_to(c, s))
                .collect::<Vec<_>>()
        })
        .collect();
    for lib in [
        "libonnxruntime_providers_shared.so",
        "libonnxruntime_providers_cuda.so",
    ] {
        assert!(
            copied.contains(&format!("/usr/local/lib/{lib}")),
            "{copied:?}"
        );
    }
    // Both images run the same server the same way.
    assert_eq!(gpu.env(), cpu.env());
    assert_eq!(gpu.cmd(), cpu.cmd());
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

#[test]
fn docker_context_keeps_what_the_build_needs() {
    let patterns: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_start_matches('/').trim_end_matches('/').to_string())
        .collect();
    assert!(
        !patterns.iter().any(|p| p.starts_with('!')),
        "exceptions are not understood by this check"
    );
    // A pattern excludes a path when it names the path or one of its parent directories
    // (`**/` matches at any depth); `*` is not used for anything the build needs.
    let excluded = |path: &str| {
        patterns.iter().any(|p| {
            let p = p.strip_prefix("**/").unwrap_or(p);
            let components: Vec<&str> = path.split('/').collect();
            (1..=components.len()).any(|n| {
                let prefix = components[..n].join("/");
                prefix == p || components[n - 1] == p
            })
        })
    };
    for heavy in ["target", ".venv", ".git"] {
        assert!(excluded(heavy), ".dockerignore should leave out {heavy}");
    }
    let cargo: Value = toml::from_str(&read("Cargo.toml")).unwrap();
    let mut needed = vec![
        "Cargo.toml".to_string(),
        "Cargo.lock".to_string(),
        "build.rs".to_string(),
        "proto/inference/grpc_service.proto".to_string(),
        "proto/grpc/health/v1/health.proto".to_string(),
        "src/main.rs".to_string(),
        "models/models.toml".to_string(),
    ];
    if let Some(members) = cargo
        .get("workspace")
        .and_then(|w| w.get("members"))
        .and_then(Value::as_array)
    {
        for member in members
            .iter()
            .filter_map(Value::as_str)
            .filter(|m| *m != ".")
        {
            needed.push(format!("{member}/Cargo.toml"));
            needed.push(format!("{member}/src"));
        }
    }
    for entry in std::fs::read_dir(repo().join("models")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        needed.push(format!("models/{name}"));
    }
    for path in needed {
        assert!(repo().join(&path).exists(), "{path} does not exist");
        assert!(
            !excluded(&path),
            ".dockerignore leaves out {path}, which the build needs"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The image's command, run for real

/// The GPU image rewrites its manifest with `sed -i 's/^X/Y/' <STREAMSERVE_MODELS>/models.toml`;
/// the same substitution applied to the repository's manifest.
fn gpu_manifest(docker: &Dockerfile) -> String {
    let gpu = docker.stage("gpu");
    let models = &gpu.env()["STREAMSERVE_MODELS"];
    let run = gpu
        .all("RUN")
        .find(|r| r.contains("sed -i") && r.contains("models.toml"))
        .expect("the gpu stage edits models.toml");
    let w = words(run);
    let i = w.iter().position(|w| w == "-i").unwrap();
    assert_eq!(w[i + 2], format!("{models}/models.toml"));
    let expr = &w[i + 1];
    let parts: Vec<&str> = expr.split('/').collect();
    assert!(
        parts.len() == 4 && parts[0] == "s" && parts[3].is_empty(),
        "expected s/^pattern/replacement/, got {expr}"
    );
    let pattern = parts[1]
        .strip_prefix('^')
        .expect("the sed pattern is anchored at the line start");
    assert!(
        !pattern.contains(['.', '*', '[', '$', '\\']),
        "the sed pattern should be literal: {pattern}"
    );
    let mut replaced = 0;
    let text: Vec<String> = read("models/models.toml")
        .lines()
        .map(|line| match line.strip_prefix(pattern) {
            Some(rest) => {
                replaced += 1;
                format!("{}{rest}", parts[2])
            }
            None => line.to_string(),
        })
        .collect();
    assert!(
        replaced > 0,
        "the gpu stage's sed matches nothing in models/models.toml"
    );
    text.join("\n") + "\n"
}

#[test]
fn gpu_image_manifest_asks_for_cuda_with_cpu_fallback() {
    let manifest = Manifest::parse(&repo().join("models"), &gpu_manifest(&dockerfile())).unwrap();
    for m in &manifest.models {
        assert_eq!(m.device, Device::Cuda(0), "{}", m.name);
        assert!(
            m.allow_cpu_fallback,
            "{} would be refused without a GPU",
            m.name
        );
    }
}

/// The server process, killed if a check fails before it was stopped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Runs the stage's CMD with its ENV and nothing else from this process's environment but PATH
/// and ORT_DYLIB_PATH if set (here the library comes from the checkout's .venv, or that
/// variable, instead of the image's /usr/local/lib copy), the way the container would, except
/// for where it listens and where the models are. Checks that fly's health check answers 200
/// within its grace period, that every log line is JSON, and that SIGTERM ends the server with
/// status 0 within fly's kill_timeout.
async fn run_like_fly(stage: &Stage, config: &Value, models: &Path) -> Vec<Json> {
    let mut env = stage.env();
    env.insert("STREAMSERVE_HOST".into(), "127.0.0.1".into());
    env.insert("STREAMSERVE_PORT".into(), "0".into());
    env.insert("STREAMSERVE_MODELS".into(), models.display().to_string());
    let cmd = stage.cmd();
    let program = match cmd[0].as_str() {
        "streamserve" | "/usr/local/bin/streamserve" => env!("CARGO_BIN_EXE_streamserve"),
        other => panic!("CMD runs {other}"),
    };
    // A working directory that is not the checkout, as /app is not in the image.
    let workdir = std::env::temp_dir();
    let mut command = Command::new(program);
    command
        .args(&cmd[1..])
        .env_clear()
        .envs(&env)
        .current_dir(&workdir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for passthrough in ["PATH", "ORT_DYLIB_PATH"] {
        if let Some(value) = std::env::var_os(passthrough) {
            command.env(passthrough, value);
        }
    }
    let mut server = KillOnDrop(command.spawn().expect("streamserve starts"));
    let child = &mut server.0;

    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let stderr = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let mut logs: Vec<Json> = Vec::new();
    fn log_line(line: String, logs: &mut Vec<Json>) {
        let json: Json = serde_json::from_str(&line).unwrap_or_else(|_| {
            panic!("log line is not JSON (STREAMSERVE_LOG_FORMAT=json): {line}")
        });
        logs.push(json);
    }

    // The address comes from the "streamserve listening" line.
    let deadline = Instant::now() + Duration::from_secs(60);
    let addr = loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(remaining) {
            Ok(line) => {
                log_line(line, &mut logs);
                let last = logs.last().unwrap();
                if last["message"] == "streamserve listening" {
                    // gRPC listens beside HTTP, on a free port of its own as HTTP's is.
                    let grpc = last["grpc_addr"].as_str().expect("grpc_addr field");
                    assert!(
                        grpc.starts_with("127.0.0.1:") && !grpc.ends_with(":0"),
                        "{grpc}"
                    );
                    break last["addr"].as_str().expect("addr field").to_string();
                }
            }
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "never said it was listening; logs: {logs:?}\nstderr: {}",
                    stderr.join().unwrap()
                );
            }
        }
    };
    assert!(
        addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
        "{addr}"
    );

    // fly's check: GET <path>, each attempt bounded by the check's timeout, passing within the
    // grace period.
    let check = health_check(config);
    let path = get_str(check, "path");
    let timeout = duration(get(check, "timeout"));
    let grace = duration(get(check, "grace_period"));
    let client = reqwest::Client::builder().timeout(timeout).build().unwrap();
    let started = Instant::now();
    let status = loop {
        let status = match client.get(format!("http://{addr}{path}")).send().await {
            Ok(response) => response.status().as_u16(),
            Err(_) => 0,
        };
        if status == 200 || started.elapsed() > grace {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status, 200, "{path} within the grace period {grace:?}");

    // fly stops the machine: kill_signal, then kill_timeout to exit by itself.
    let kill_timeout = duration(get(config, "kill_timeout"));
    assert_eq!(get_str(config, "kill_signal"), "SIGTERM");
    let stopping = Instant::now();
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let exit = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if stopping.elapsed() > kill_timeout {
            let _ = child.kill();
            panic!("still running {kill_timeout:?} after SIGTERM: fly would kill it");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = stderr.join().unwrap();
    assert!(
        exit.success(),
        "exit status {exit} after SIGTERM; stderr: {stderr}"
    );
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(5)) {
        log_line(line, &mut logs);
    }
    assert!(
        logs.iter().any(|l| l["message"] == "streamserve stopped"),
        "logs: {logs:?}"
    );
    logs
}

#[tokio::test]
async fn image_command_serves_and_stops_as_fly_expects() {
    let docker = dockerfile();
    let config = fly("fly.toml");
    let stage = fly_stage(&docker, &config);
    let logs = run_like_fly(stage, &config, &repo().join("models")).await;
    assert!(logs.iter().all(|l| l["level"] != "ERROR"), "{logs:?}");
}

#[tokio::test]
async fn gpu_image_command_serves_without_a_gpu_through_cpu_fallback() {
    let docker = dockerfile();
    let config = fly("fly.gpu.toml");
    let stage = fly_stage(&docker, &config);
    // The gpu image's models directory: its rewritten manifest beside the bundled model files.
    let dir = std::env::temp_dir().join(format!("streamserve-deploy-gpu-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(repo().join("models")).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "models.toml" {
            std::os::unix::fs::symlink(entry.path(), dir.join(entry.file_name())).unwrap();
        }
    }
    std::fs::write(dir.join("models.toml"), gpu_manifest(&docker)).unwrap();
    run_like_fly(stage, &config, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
}
