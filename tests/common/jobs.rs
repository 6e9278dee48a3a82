//! Batch jobs from the outside: a server with the jobs API on (admin token, a jobs
//! directory), `mlp` rows as JSON Lines, and the calls to submit and follow jobs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::*;

pub const TOKEN: &str = "ops";

pub fn manifest() -> String {
    format!(
        r#"
        [[models]]
        name = "mlp"
        version = "1"
        file = "{{models}}/mlp/1/model.onnx"
        sha256 = "{MLP_SHA}"
        replicas = 1
        max_batch_size = 64
        max_queue = 4096
        "#
    )
}

/// A fresh empty directory.
pub fn scratch(name: &str) -> PathBuf {
    let dir = model_dir("").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn server(jobs_dir: &Path) -> streamserve::server::Running {
    let jobs_dir = jobs_dir.to_path_buf();
    start_running(&model_dir(&manifest()), move |config| {
        config.admin_token = Some(TOKEN.into());
        config.jobs_dir = jobs_dir;
        config.drain_secs = 1;
    })
}

pub fn row(i: usize) -> Value {
    let mut request = mlp_request(&features(i as u64, 1));
    request["key"] = json!(format!("row-{i}"));
    request
}

pub fn write_input(path: &Path, rows: usize) {
    let mut text = String::new();
    for i in 0..rows {
        text.push_str(&row(i).to_string());
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

pub async fn call(
    c: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> (u16, Value) {
    let mut request = c.request(method, url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

pub async fn submit(c: &reqwest::Client, url: &str, body: Value) -> (u16, Value) {
    call(
        c,
        reqwest::Method::POST,
        &format!("{url}/v2/jobs"),
        Some(body),
        Some(TOKEN),
    )
    .await
}

pub async fn job(c: &reqwest::Client, url: &str, id: &str) -> Value {
    let (status, job) = call(
        c,
        reqwest::Method::GET,
        &format!("{url}/v2/jobs/{id}"),
        None,
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{job}");
    job
}

/// Polls the job until `done` says so (or fails the test after `limit`).
pub async fn wait_until(
    c: &reqwest::Client,
    url: &str,
    id: &str,
    limit: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let start = Instant::now();
    loop {
        let job = job(c, url, id).await;
        if done(&job) {
            return job;
        }
        assert!(start.elapsed() < limit, "job did not get there: {job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn finished(job: &Value) -> bool {
    ["succeeded", "failed", "cancelled"].contains(&job["state"].as_str().unwrap())
}

pub fn output_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
