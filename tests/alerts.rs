//! The alerts and dashboard that ship (deploy/prometheus, deploy/grafana), checked the way they
//! will be used: `promtool` checks the rules and the example config and runs the rules' unit
//! tests; every metric the rules and the dashboard name is one a running server exports; and
//! a real Prometheus scraping a real server fires the restarts alert for an injected fault,
//! and not the service-down one.
//!
//! Needs Debian's Prometheus (`promtool`, `prometheus`): `scripts/setup.sh --observe` installs
//! it. The metrics recorder is process-wide, so the scrape test serves a model name of its own.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// Series a server exports only in some setups (following a model registry; on a host with
/// GPUs): checked against their descriptions in src/telemetry/describe.rs instead of a running
/// server's /metrics.
const ONLY_IN_SOME_SETUPS: &[&str] = &[
    "streamserve_registry_up",
    "streamserve_fleet_duplicate_instance_id",
    "streamserve_predictions_refresh_failures_total",
    "streamserve_gpu_utilization_ratio",
    "streamserve_gpu_memory_used_bytes",
    "streamserve_gpu_memory_total_bytes",
];

const RULES: &str = "deploy/prometheus/streamserve-rules.yml";
const RULE_TESTS: &str = "deploy/prometheus/streamserve-rules.test.yml";
const CONFIG: &str = "deploy/prometheus/prometheus.yml";
const DASHBOARD: &str = "deploy/grafana/streamserve-dashboard.json";
/// The scrape job's name the rules expect (they match `job=~".*streamserve.*"`).
const JOB: &str = "streamserve";
const TOKEN: &str = "alerts-token";

/// The path of a Prometheus tool, or a failure that says how to install it.
fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not installed: these tests run Debian's Prometheus; \
                 install it with `scripts/setup.sh --observe` (apt-get install prometheus)"
            )
        })
}

/// Runs `tool args` in `dir` and fails with its output unless it succeeds.
fn run_tool(name: &str, args: &[&str], dir: &Path) -> String {
    let output = Command::new(tool(name))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{name} did not start: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "{name} {} failed:\n{text}",
        args.join(" ")
    );
    text
}

#[test]
fn promtool_checks_the_rules_and_config_and_the_rules_pass_their_unit_tests() {
    let repo = repo();
    run_tool("promtool", &["check", "rules", RULES], &repo);
    // Unit tests name the rules file relative to themselves.
    let tests = repo.join(RULE_TESTS);
    let text = run_tool(
        "promtool",
        &[
            "test",
            "rules",
            tests.file_name().unwrap().to_str().unwrap(),
        ],
        tests.parent().unwrap(),
    );
    assert!(text.contains("SUCCESS"), "{text}");
    // The example config loads the rules (relative to itself, so it checks from anywhere).
    let text = run_tool("promtool", &["check", "config", CONFIG], &repo);
    assert!(text.contains("1 rule files found"), "{text}");
}

/// Every alert in the rules has a unit test that fires it.
#[test]
fn every_alert_has_a_unit_test() {
    let rules = rules_yaml();
    let tests = std::fs::read_to_string(repo().join(RULE_TESTS)).unwrap();
    let mut alerts = 0;
    for rule in all_rules(&rules) {
        let Some(alert) = rule["alert"].as_str() else {
            continue;
        };
        alerts += 1;
        for key in ["for", "labels", "annotations"] {
            assert!(!rule[key].is_null(), "{alert} has no `{key}`");
        }
        assert!(rule["labels"]["severity"].is_string(), "{alert}: severity");
        for key in ["summary", "description", "runbook"] {
            assert!(
                rule["annotations"][key].is_string(),
                "{alert}: annotation {key}"
            );
        }
        let runbook = rule["annotations"]["runbook"].as_str().unwrap();
        assert!(
            runbook_exists(runbook),
            "{alert}: runbook {runbook} not found"
        );
        assert!(
            tests.contains(&format!("alertname: {alert}\n")),
            "{alert} has no unit test in {RULE_TESTS}"
        );
    }
    assert!(alerts >= 10, "only {alerts} alerts");
}

/// Whether `path#anchor` names a file of this repository with a heading of that anchor
/// (GitHub's: lower case, punctuation dropped, spaces as dashes).
fn runbook_exists(runbook: &str) -> bool {
    let (path, anchor) = runbook.split_once('#').unwrap_or((runbook, ""));
    let Ok(text) = std::fs::read_to_string(repo().join(path)) else {
        return false;
    };
    anchor.is_empty()
        || text.lines().any(|line| {
            let Some(heading) = line.strip_prefix('#') else {
                return false;
            };
            let slug: String = heading
                .trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
                .map(|c| if c == ' ' { '-' } else { c })
                .collect();
            slug == anchor
        })
}

fn rules_yaml() -> serde_yaml::Value {
    serde_yaml::from_str(&std::fs::read_to_string(repo().join(RULES)).unwrap())
        .expect("the rules file is YAML")
}

fn all_rules(rules: &serde_yaml::Value) -> Vec<serde_yaml::Value> {
    rules["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules").clone())
        .collect()
}

/// Metric names in a PromQL expression: identifiers that start with `streamserve_` or
/// `process_` and are not function calls; recording rules' names (with a `:`) are not
/// metrics.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = BTreeSet::new();
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if !is_ident(chars[i]) || (i > 0 && (is_ident(chars[i - 1]) || chars[i - 1] == '$')) {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && is_ident(chars[i]) {
            i += 1;
        }
        let token: String = chars[start..i].iter().collect();
        let next = chars[i..].iter().find(|c| **c != ' ').copied();
        if (token.starts_with("streamserve_") || token.starts_with("process_"))
            && !token.contains(':')
            && next != Some('(')
        {
            names.insert(token);
        }
    }
    names
}

/// A histogram's series name without its `_bucket`, `_sum` or `_count`.
fn base_name(name: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .unwrap_or(name)
}

/// Every PromQL string in the dashboard: panel targets' `expr` and template variables' queries.
fn dashboard_queries(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", Value::String(s)) | ("query", Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_queries(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| dashboard_queries(v, out)),
        _ => {}
    }
}

#[test]
fn metric_name_tokenizer() {
    let names = metric_names(
        "histogram_quantile(0.99, sum by (le) (rate(streamserve_x_seconds_bucket{a=\"b\"}[5m]))) \
         / model_version:streamserve_y:ratio > 0 and process_open_fds / streamserve_z \
         label_values(streamserve_w, model) $streamserve_not",
    );
    let want = [
        "process_open_fds",
        "streamserve_w",
        "streamserve_x_seconds_bucket",
        "streamserve_z",
    ];
    assert_eq!(names.into_iter().collect::<Vec<_>>(), want);
}

/// Runs one short speech stream, so that the stream histograms have series.
async fn one_stream(url: &str) {
    let ws_url = format!("{}/v1/streams/silero_vad", url.replace("http://", "ws://"));
    let (ws, _) = tokio_tungstenite::connect_async(ws_url)
        .await
        .expect("the stream opens");
    let (mut sink, mut stream) = ws.split();
    let start = json!({"type": "start", "sample_rate": 16000});
    sink.send(Message::text(start.to_string())).await.unwrap();
    // Half a second of a quiet tone, 100 ms per frame.
    let samples: Vec<u8> = (0..8000)
        .flat_map(|i| (((i as f32 * 0.05).sin() * 3000.0) as i16).to_le_bytes())
        .collect();
    for frame in samples.chunks(3200) {
        sink.send(Message::binary(frame.to_vec())).await.unwrap();
    }
    sink.send(Message::text(json!({"type": "end"}).to_string()))
        .await
        .unwrap();
    let read = async {
        while let Some(Ok(message)) = stream.next().await {
            if message.is_close() {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the stream ends after its end message");
}

/// The bundled models, with mlp's file copied beside a probe (a golden input of zeros whose
/// answer any logits pass): the probe's series exist only for versions that have one.
fn models_with_probe() -> PathBuf {
    let bundled = repo().join("models");
    let dir = model_dir("");
    let manifest = bundled_manifest().replace(
        &format!("file = \"{}/mlp/1/model.onnx\"", bundled.display()),
        "file = \"mlp/model.onnx\"",
    );
    std::fs::write(dir.join("models.toml"), manifest).unwrap();
    std::fs::create_dir_all(dir.join("mlp")).unwrap();
    std::fs::copy(bundled.join("mlp/1/model.onnx"), dir.join("mlp/model.onnx")).unwrap();
    let probe = serde_json::json!({
        "inputs": [{"name": "features", "shape": [1, 256], "datatype": "FP32", "data": vec![0.0; 256]}],
        "outputs": [{"name": "logits", "data": vec![0.0; 16], "atol": 1e9}],
    });
    std::fs::write(dir.join("mlp/probe.json"), probe.to_string()).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_rules_and_the_dashboard_name_is_exported() {
    // Names the rules use.
    let mut referenced: BTreeSet<(String, String)> = BTreeSet::new();
    for rule in all_rules(&rules_yaml()) {
        let what = rule["alert"]
            .as_str()
            .or(rule["record"].as_str())
            .unwrap()
            .to_string();
        for name in metric_names(rule["expr"].as_str().expect("expr")) {
            referenced.insert((name, format!("rule {what}")));
        }
    }
    // Names the dashboard uses (it parses, and has queries).
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join(DASHBOARD)).unwrap())
            .expect("the dashboard is JSON");
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, &mut queries);
    assert!(queries.len() >= 15, "only {} queries", queries.len());
    for query in &queries {
        for name in metric_names(query) {
            referenced.insert((name, "the dashboard".to_string()));
        }
    }
    assert!(referenced.len() >= 20, "{referenced:?}");

    // What a server exports once it has answered two requests and run a stream, with a probe
    // on mlp and drift windows of one row (so that a drift score exists after the second).
    let url = start(&models_with_probe(), |c| {
        c.drift_reference_rows = 1;
        c.drift_window_rows = 1;
    });
    let c = client();
    for seed in [1, 2] {
        let (status, body) = post(
            &c,
            &format!("{url}/v2/models/mlp/infer"),
            &mlp_request(&features(seed, 1)),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    one_stream(&url).await;
    let mut text = metrics_text(&c, &url).await;
    for _ in 0..50 {
        if text.contains("streamserve_probe_checks_total{model=\"mlp\",version=\"1\"} 1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        text = metrics_text(&c, &url).await;
    }
    let exported: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split_whitespace().next())
        .collect();
    let telemetry = std::fs::read_to_string(repo().join("src/telemetry/describe.rs")).unwrap();

    let mut missing = Vec::new();
    for (name, user) in &referenced {
        let base = base_name(name);
        if exported.contains(name.as_str()) || exported.contains(base) {
            continue;
        }
        if ONLY_IN_SOME_SETUPS.contains(&base) && telemetry.contains(&format!("\"{base}\"")) {
            continue;
        }
        missing.push(format!("{name} (in {user})"));
    }
    assert!(
        missing.is_empty(),
        "named but not exported by the server: {missing:#?}\n/metrics:\n{text}"
    );
}

/// A Prometheus server of this test's own; killed when dropped.
struct Prometheus {
    child: Child,
    url: String,
    dir: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Prometheus {
    /// The log Prometheus wrote, for failure messages.
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The shipped rules with every `for:` set to 0s, so that an alert fires at its first true
/// evaluation; the expressions stay the shipped ones.
fn rules_without_for() -> String {
    std::fs::read_to_string(repo().join(RULES))
        .unwrap()
        .lines()
        .map(|line| match line.trim_start().strip_prefix("for:") {
            Some(_) => format!("{}for: 0s", &line[..line.len() - line.trim_start().len()]),
            None => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Starts Prometheus scraping `target` every second as job `streamserve`, evaluating the
/// shipped rules (with `for: 0s`) every second.
fn start_prometheus(target: &str) -> Prometheus {
    let dir = std::env::temp_dir().join(format!(
        "streamserve-alerts-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(dir.join("rules.yml"), rules_without_for()).unwrap();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - rules.yml\n\
         scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: [\"{target}\"]\n"
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let port = free_port();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = Command::new(tool("prometheus"))
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("prometheus starts");
    Prometheus {
        child,
        url: format!("http://127.0.0.1:{port}"),
        dir,
    }
}

/// Polls until `check` returns Some, or fails after `limit` with `what`.
async fn eventually<T, F, Fut>(limit: Duration, what: &str, prometheus: &Prometheus, check: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < until,
            "{what} within {limit:?}; Prometheus log:\n{}",
            prometheus.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn prometheus_json(c: &reqwest::Client, url: &str) -> Option<Value> {
    let response = c.get(url).send().await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.json().await.ok()
}

/// The alerts Prometheus reports now (pending and firing).
async fn alerts(c: &reqwest::Client, prometheus: &str) -> Vec<Value> {
    prometheus_json(c, &format!("{prometheus}/api/v1/alerts"))
        .await
        .and_then(|v| v["data"]["alerts"].as_array().cloned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prometheus_scrapes_a_server_and_the_restarts_alert_fires_for_an_injected_fault() {
    let started = Instant::now();
    let dir = model_dir(&format!(
        r#"
        [[models]]
        name = "alerting_mlp"
        version = "1"
        file = "{{models}}/mlp/1/model.onnx"
        sha256 = "{MLP_SHA}"
        replicas = 2
        max_batch_size = 8
        max_queue_delay_ms = 0
        "#
    ));
    let url = start(&dir, |config| config.admin_token = Some(TOKEN.into()));
    let target = url.trim_start_matches("http://").to_string();
    let prometheus = start_prometheus(&target);
    let c = client();
    let p = prometheus.url.clone();

    eventually(
        Duration::from_secs(20),
        "Prometheus is ready",
        &prometheus,
        || {
            let (c, p) = (c.clone(), p.clone());
            async move {
                let response = c.get(format!("{p}/-/ready")).send().await.ok()?;
                response.status().is_success().then_some(())
            }
        },
    )
    .await;
    // Prometheus has scraped the restarts counter at 0 before the fault, so that increase()
    // sees the restarts (the server creates it at 0 when the version starts serving).
    let query = format!(
        "{p}/api/v1/query?query=streamserve_worker_restarts_total%7Bmodel%3D%22alerting_mlp%22%7D"
    );
    eventually(
        Duration::from_secs(15),
        "Prometheus scraped streamserve_worker_restarts_total at 0",
        &prometheus,
        || {
            let (c, query) = (c.clone(), query.clone());
            async move {
                let answer = prometheus_json(&c, &query).await?;
                let result = answer["data"]["result"].as_array()?.first()?.clone();
                (result["value"][1] == "0").then_some(())
            }
        },
    )
    .await;

    // The fault: every replica panics on its next 3 batches, with requests flowing.
    let fault = json!({"fault": {"kind": "panic"}, "count": 3});
    inject_fault(&c, &url, TOKEN, "alerting_mlp", fault).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..4)
        .map(|i| {
            let (c, url, stop) = (c.clone(), url.clone(), stop.clone());
            tokio::spawn(async move {
                let infer = format!("{url}/v2/models/alerting_mlp/infer");
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // 200, or 503 when a request's retry also met a panicking worker.
                    let _ = c
                        .post(&infer)
                        .json(&mlp_request(&features(i * 1_000_000 + n, 1)))
                        .send()
                        .await;
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        })
        .collect();

    let firing = eventually(
        Duration::from_secs(30),
        "StreamserveWorkerRestarts fired for alerting_mlp",
        &prometheus,
        || {
            let (c, p) = (c.clone(), p.clone());
            async move {
                alerts(&c, &p).await.into_iter().find(|a| {
                    a["labels"]["alertname"] == "StreamserveWorkerRestarts"
                        && a["labels"]["model"] == "alerting_mlp"
                        && a["state"] == "firing"
                })
            }
        },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    assert_eq!(firing["labels"]["version"], "1", "{firing}");
    assert_eq!(firing["labels"]["severity"], "warning", "{firing}");
    assert_eq!(firing["labels"]["job"], JOB, "{firing}");
    assert!(
        firing["annotations"]["description"]
            .as_str()
            .is_some_and(|d| d.contains("alerting_mlp") && d.contains("version 1")),
        "{firing}"
    );

    // The server is up all along: the service-down alerts do not fire.
    let now = alerts(&c, &p).await;
    for quiet in ["StreamserveDown", "StreamserveTargetMissing"] {
        assert!(
            !now.iter().any(|a| a["labels"]["alertname"] == quiet),
            "{quiet} is active: {now:#?}"
        );
    }
    let up = prometheus_json(&c, &format!("{p}/api/v1/query?query=up")).await;
    assert_eq!(
        up.as_ref()
            .map(|u| u["data"]["result"][0]["value"][1].clone()),
        Some(json!("1")),
        "{up:?}"
    );
    eprintln!("scrape test took {:?}", started.elapsed());
}
