//! Shared test support: start the real server in-process on 127.0.0.1:0 with real models, and
//! build model directories whose manifests point at the bundled model files.
#![allow(dead_code)]

pub mod child;
pub mod fleet;
pub mod grpc_sequence;
pub mod jobs;
pub mod stream_client;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::{json, Value};
use streamserve::config::Config;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Starts a server on `models` and returns its base URL.
pub fn start(models: &Path, tweak: impl FnOnce(&mut Config)) -> String {
    format!("http://{}", start_running(models, tweak).addr)
}

/// Starts a server on `models` (HTTP and gRPC on free ports) and returns its handle.
pub fn start_running(
    models: &Path,
    tweak: impl FnOnce(&mut Config),
) -> streamserve::server::Running {
    let mut config = Config {
        host: "127.0.0.1".into(),
        port: 0,
        models: models.to_path_buf(),
        http_workers: 2,
        ..Config::default()
    };
    tweak(&mut config);
    streamserve::server::spawn(config).expect("server starts")
}

/// One server on the bundled models, shared by the tests of a test binary.
pub fn bundled() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| start(&repo().join("models"), |_| {}))
}

/// A fresh model directory whose `models.toml` is `manifest`, with `{models}` replaced by the
/// absolute path of the bundled models directory.
pub fn model_dir(manifest: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "streamserve-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let models = repo().join("models");
    std::fs::write(
        dir.join("models.toml"),
        manifest.replace("{models}", models.to_str().unwrap()),
    )
    .unwrap();
    dir
}

/// The bundled manifest's text with every `file` made absolute, to be written elsewhere (with
/// changes) by a test that needs the bundled models under other settings.
pub fn bundled_manifest() -> String {
    let models = repo().join("models");
    std::fs::read_to_string(models.join("models.toml"))
        .unwrap()
        .replace("file = \"", &format!("file = \"{}/", models.display()))
}

/// Makes `silero_vad`'s replicas slow (120 ms a batch) for their next 3 batches, through the
/// admin API of a server started with admin token "t": while streams run, their steps would
/// queue past Silero's 30 ms SLO, so new ones go to its fallback (`vad_energy`) until the
/// queue drains.
pub async fn slow_silero_for_three_batches(url: &str) {
    let fault = json!({"fault": {"kind": "slow", "ms": 120}, "count": 3});
    inject_fault(&client(), url, "t", "silero_vad", fault).await;
}

/// Injects a fault into `model` through the admin API (`fault`: the request's body, as
/// README's "Drills" has it) with the admin token `token`; the server must take it.
pub async fn inject_fault(c: &reqwest::Client, url: &str, token: &str, model: &str, fault: Value) {
    let response = c
        .post(format!("{url}/admin/models/{model}/faults"))
        .bearer_auth(token)
        .json(&fault)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
}

/// The bundled models' names, as the repository listings sort them.
pub const BUNDLED_MODELS: [&str; 8] = [
    "hey_marvin",
    "mlp",
    "mlp_small",
    "silero_vad",
    "typed_ops",
    "vad_energy",
    "ww_embedding",
    "ww_melspec",
];

pub const MLP_SHA: &str = "682ec0e4afa4d55060b8b4465d0e2ee9f78ac23bbe28b6999a1db956956e1943";

/// A `[[models]]` entry of `mlp` at `version` on the bundled mlp file (for [`model_dir`]),
/// with `extra` TOML lines (settings) after its identity.
pub fn mlp_entry(version: &str, extra: &str) -> String {
    format!(
        "[[models]]\nname = \"mlp\"\nversion = \"{version}\"\n\
         file = \"{{models}}/mlp/1/model.onnx\"\nsha256 = \"{MLP_SHA}\"\n{extra}\n\n"
    )
}
pub const MLP_SMALL_SHA: &str = "1ee4e3ca0ab831f8b5d0012533fdfe38626360da2dfded1adc62f14bb97bb481";

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap()
}

/// Deterministic features for the mlp model: `rows` rows of 256 values, seeded by `seed`.
pub fn features(seed: u64, rows: usize) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..rows * 256)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

pub fn mlp_request(data: &[f32]) -> Value {
    json!({ "inputs": [{ "name": "features", "shape": [data.len() / 256, 256], "datatype": "FP32", "data": data }] })
}

pub async fn post(client: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    let response = client
        .post(url)
        .json(body)
        .send()
        .await
        .expect("request sent");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")),
    )
}

/// The server's Prometheus `/metrics` text.
pub async fn metrics_text(client: &reqwest::Client, base: &str) -> String {
    client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("/metrics answers")
        .text()
        .await
        .expect("/metrics is text")
}

/// An admin API call: `body` is POSTed as JSON, or with `None` a GET; the admin `token` as
/// bearer. The status and the JSON answer (`Null` for an empty body; a body that is not JSON
/// fails the test).
pub async fn admin_call(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let request = match body {
        Some(body) => client.post(url).json(body),
        None => client.get(url),
    };
    let response = request
        .bearer_auth(token)
        .send()
        .await
        .expect("request sent");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    if text.is_empty() {
        return (status, Value::Null);
    }
    let value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    (status, value)
}

/// The row named `name` in a listing's `models` (`/v2/models`, the status page's JSON).
pub fn model_row<'a>(list: &'a Value, name: &str) -> &'a Value {
    list["models"]
        .as_array()
        .and_then(|rows| rows.iter().find(|row| row["name"] == name))
        .unwrap_or_else(|| panic!("{name} is not listed: {list}"))
}

pub async fn get(client: &reqwest::Client, url: &str) -> (u16, Value) {
    let response = client.get(url).send().await.expect("request sent");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// The output `name` of a JSON inference response as f32s.
pub fn output_f32(response: &Value, name: &str) -> Vec<f32> {
    let output = response["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == name)
        .unwrap_or_else(|| panic!("no output {name} in {response}"));
    output["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

pub fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 + 1e-5 * y.abs(),
            "{what}: element {i}: {x} vs {y}"
        );
    }
}

/// POSTs raw bytes with extra headers; returns the status and the JSON body (which every
/// error must have).
pub async fn post_raw(
    c: &reqwest::Client,
    url: &str,
    body: Vec<u8>,
    headers: &[(&str, String)],
) -> (u16, Value) {
    let mut request = c.post(url).body(body);
    for (k, v) in headers {
        request = request.header(*k, v);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("error body is not JSON: {text}")),
    )
}

/// Asserts the status and that the `error` message contains `needle`.
pub fn expect(got: (u16, Value), status: u16, needle: &str) {
    assert_eq!(got.0, status, "{}", got.1);
    let message = got.1["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error field: {}", got.1));
    assert!(
        message.contains(needle),
        "error '{message}' lacks '{needle}'"
    );
}

/// The sum of a Prometheus counter's series for `model` (0 when it has none yet).
pub fn counter(metrics: &str, name: &str, model: &str) -> f64 {
    let label = format!("model=\"{model}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A Silero VAD step as JSON: `samples` of silence, a zero state, sample rate `sr`.
pub fn vad_request(samples: usize, sr: i64) -> Value {
    json!({"inputs": [
        {"name": "input", "shape": [1, samples], "datatype": "FP32", "data": vec![0.0f32; samples]},
        {"name": "state", "shape": [2, 1, 128], "datatype": "FP32", "data": vec![0.0f32; 256]},
        {"name": "sr", "shape": [], "datatype": "INT64", "data": [sr]}]})
}

/// silero_vad without the bundled manifest's input declarations, under another name: its
/// bad requests reach ONNX Runtime.
pub fn undeclared_silero_dir(name: &str) -> PathBuf {
    model_dir(&format!(
        r#"
        [[models]]
        name = "{name}"
        version = "1"
        file = "{{models}}/silero_vad/1/model.onnx"
        sha256 = "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3"
        max_batch_size = 64
        max_queue_delay_ms = 2.0
        batch_axes = {{ state = 1, stateN = 1, sr = "shared" }}
        "#
    ))
}

/// The value of one sample in `/metrics` text; `series` is written as the exporter writes it,
/// name and labels in order, e.g. `streamserve_shed_total{model="mlp",version="1"}`.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Asserts that bad requests did a model no harm: its inference failures counter is still
/// `failures_before` and it is ready.
pub async fn assert_unharmed(c: &reqwest::Client, url: &str, model: &str, failures_before: f64) {
    let metrics = metrics_text(c, url).await;
    assert_eq!(
        counter(&metrics, "streamserve_inference_failures_total", model),
        failures_before,
        "inference failures of {model}"
    );
    assert_eq!(
        get(c, &format!("{url}/v2/models/{model}/ready")).await.0,
        200,
        "{model} is ready"
    );
}

/// The `# TYPE` names without a `# HELP` line.
pub fn undescribed(text: &str) -> Vec<String> {
    let named = |prefix: &str| -> std::collections::BTreeSet<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix(prefix)?.split_whitespace().next())
            .map(str::to_string)
            .collect()
    };
    let help = named("# HELP ");
    named("# TYPE ")
        .into_iter()
        .filter(|name| !help.contains(name))
        .collect()
}
