//! Requests in flight when their version is taken out of service (a blue/green deploy, an
//! admin's unload) between the moment their headers were read (the version resolved) and the
//! moment their body was complete. A request to the model (`/v2/models/mlp/infer`) is served
//! by the model's default version now, once, and says so (`model_version`), and is counted
//! there; one to the version it named (`/versions/1/infer`), or whose key may not call the
//! default now, gets 503 with Retry-After (nothing ran). They got 503 "the router dropped the
//! request". Concurrent well-behaved clients are served throughout. Over real sockets: the
//! body is sent in two parts around the admin call.

use crate::common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "rollout-in-flight-token";

/// mlp version 1 (loaded) and version 2 (the same file, lazy: a deployment's candidate).
fn manifest() -> String {
    manifest_with("{models}/mlp/1/model.onnx", MLP_SHA)
}

/// mlp version 1, and version 2 from `file` (lazy).
fn manifest_with(file: &str, sha: &str) -> String {
    format!(
        r#"
        [[models]]
        name = "mlp"
        version = "1"
        file = "{{models}}/mlp/1/model.onnx"
        sha256 = "{MLP_SHA}"
        max_batch_size = 64

        [[models]]
        name = "mlp"
        version = "2"
        file = "{file}"
        sha256 = "{sha}"
        max_batch_size = 64
        load = "lazy"
        "#
    )
}

/// A server on `manifest` with the admin API, and with `keys` as its API keys file if any.
fn server_on(manifest: &str, keys: Option<std::path::PathBuf>) -> String {
    start(&model_dir(manifest), |config| {
        config.admin_token = Some(TOKEN.into());
        config.api_keys = keys;
        // The tests' bodies pause between their two parts.
        config.min_body_bytes_per_sec = 0;
    })
}

/// A server on [`manifest`].
fn server(keys: Option<std::path::PathBuf>) -> String {
    server_on(&manifest(), keys)
}

/// A request whose headers and first bytes are on the server: the rest comes with `finish`.
struct Slow {
    socket: tokio::net::TcpStream,
    rest: Vec<u8>,
}

async fn begin(url: &str, path: &str, key: Option<&str>) -> Slow {
    let body = mlp_request(&features(7, 1)).to_string().into_bytes();
    let addr = url.trim_start_matches("http://");
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{auth}\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(&body[..10]).await.unwrap();
    // Read, resolved and waiting for the rest of its body.
    tokio::time::sleep(Duration::from_millis(300)).await;
    Slow {
        socket,
        rest: body[10..].to_vec(),
    }
}

/// Sends the rest of the body; the response's status, its headers (lowercase) and its body.
/// Not at once: an unloaded version's router takes what comes while it drains (its queue
/// empty, it stops within milliseconds), and the request must come after.
async fn finish(mut slow: Slow) -> (u16, String, Value) {
    tokio::time::sleep(Duration::from_millis(1000)).await;
    slow.socket.write_all(&slow.rest).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), slow.socket.read_to_end(&mut raw))
        .await
        .expect("answered")
        .unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").expect("a response");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (
        status,
        head.to_ascii_lowercase(),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

async fn admin(c: &reqwest::Client, url: &str, path: &str, body: Value) -> (u16, Value) {
    common::admin_call(
        c,
        &format!("{url}/admin/models/mlp/{path}"),
        TOKEN,
        Some(&body),
    )
    .await
}

/// The `/status` row of `mlp`'s `version`.
async fn status_row(c: &reqwest::Client, url: &str, version: &str) -> Value {
    let (_, status) = common::admin_call(c, &format!("{url}/status"), TOKEN, None).await;
    status["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "mlp" && r["version"] == version)
        .cloned()
        .unwrap_or_else(|| panic!("no mlp:{version} in {status}"))
}

/// Clients asking `mlp` over and over until `stop`; each answers the versions that served it.
fn steady_clients(url: &str, stop: Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<Vec<String>>> {
    (0..2)
        .map(|seed| {
            let (c, url, stop) = (client(), url.to_string(), stop.clone());
            tokio::spawn(async move {
                let mut served = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let request = mlp_request(&features(seed, 1));
                    let (status, body) =
                        post(&c, &format!("{url}/v2/models/mlp/infer"), &request).await;
                    assert_eq!(status, 200, "a steady client was refused: {body}");
                    served.push(body["model_version"].as_str().unwrap().to_string());
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                served
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_to_the_model_deployed_away_under_it_is_served_by_the_new_default() {
    let url = server(None);
    let c = client();
    let stop = Arc::new(AtomicBool::new(false));
    let steady = steady_clients(&url, stop.clone());
    let slow = begin(&url, "/v2/models/mlp/infer", None).await;
    let (status, answer) = admin(
        &c,
        &url,
        "deploy",
        json!({"version": "2", "strategy": "blue_green"}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let (status, _, body) = finish(slow).await;
    assert_eq!(status, 200, "the request was not served: {body}");
    assert_eq!(body["model_version"], "2", "{body}");
    assert_eq!(body["parameters"]["served_by"], "mlp:2", "{body}");
    assert_eq!(output_f32(&body, "logits").len(), 16);
    stop.store(true, Ordering::Relaxed);
    let mut on_two = 1;
    for client in steady {
        let served = client.await.unwrap();
        on_two += served.iter().filter(|v| *v == "2").count();
    }
    // Counted under the version that answered: every answer that says version 2.
    let row = status_row(&c, &url, "2").await;
    assert_eq!(row["traffic"]["requests"], on_two, "{row}");
    assert_eq!(row["traffic"]["errors"], 0, "{row}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_to_the_version_unloaded_under_it_is_told_it_was_retired() {
    let url = server(None);
    let c = client();
    let slow = begin(&url, "/v2/models/mlp/versions/1/infer", None).await;
    let (status, answer) = admin(&c, &url, "unload", json!({"version": "1"})).await;
    assert_eq!(
        (status, &answer["unloaded"]),
        (200, &json!(true)),
        "{answer}"
    );
    let (status, head, body) = finish(slow).await;
    assert_eq!(status, 503, "{body}");
    assert!(head.contains("retry-after: 1"), "{head}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("taken out of service"), "{error}");
    assert!(!error.contains("dropped"), "{error}");
    // Nothing ran; asked again, the version loads and answers.
    let (status, body) = post(
        &c,
        &format!("{url}/v2/models/mlp/versions/1/infer"),
        &mlp_request(&features(7, 1)),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_that_may_not_call_the_new_default_is_not_served_by_it() {
    let key = streamserve::access::keys::new_key().unwrap();
    let sha = hex::encode(streamserve::access::keys::hash(&key));
    let keys = model_dir("").join("keys.toml");
    std::fs::write(
        &keys,
        format!("[[keys]]\nname = \"one\"\nsha256 = \"{sha}\"\nmodels = [\"mlp:1\"]\n"),
    )
    .unwrap();
    let url = server(Some(keys));
    let c = client();
    let slow = begin(&url, "/v2/models/mlp/infer", Some(&key)).await;
    let (status, answer) = admin(
        &c,
        &url,
        "deploy",
        json!({"version": "2", "strategy": "blue_green"}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let (status, head, body) = finish(slow).await;
    assert_eq!(status, 503, "{body}");
    assert!(head.contains("retry-after: 1"), "{head}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("taken out of service"),
        "{body}"
    );
    let row = status_row(&c, &url, "2").await;
    assert_eq!(
        row["traffic"]["requests"], 0,
        "version 2 served a key of version 1: {row}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_the_new_default_cannot_take_is_told_it_was_retired() {
    // Version 2 is another model altogether (other inputs and outputs): the request sent for
    // version 1 is not valid for it, and is not run there.
    let typed_ops = "{models}/typed_ops/1/model.onnx";
    let sha = "e491291eeeb4b687cde854db925c3c769498cd67b25c9f54b5eb5b14534916de";
    let url = server_on(&manifest_with(typed_ops, sha), None);
    let c = client();
    let slow = begin(&url, "/v2/models/mlp/infer", None).await;
    let (status, answer) = admin(
        &c,
        &url,
        "deploy",
        json!({"version": "2", "strategy": "blue_green"}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let (status, head, body) = finish(slow).await;
    assert_eq!(status, 503, "{body}");
    assert!(head.contains("retry-after: 1"), "{head}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("version 1 was taken out of service"),
        "{error}"
    );
    let row = status_row(&c, &url, "2").await;
    assert_eq!(row["traffic"]["requests"], 0, "{row}");
}
