//! Scale to zero (`idle_unload_secs`) against what still uses a version: a request whose body
//! is still arriving when the version has been idle for its seconds, and a speech stream that
//! is silent for longer than that. Both hold the version, so it is not unloaded under them,
//! and they are served (they got 503 "the router dropped the request", and the stream its
//! close 1011, when the unload stopped the version's router under them). Once they are done the
//! version unloads as before. And the replica count the model metadata gives is the number the
//! router runs now, autoscaled, not the manifest's.

use crate::common;

use std::time::Duration;

use common::stream_client::*;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

/// The bundled models, with `idle_unload_secs = 1` on each of `idle`.
fn server(idle: &[&str]) -> String {
    let mut manifest = bundled_manifest();
    for name in idle {
        let line = format!("name = \"{name}\"\n");
        assert!(manifest.contains(&line), "{name} is bundled");
        manifest = manifest.replacen(&line, &format!("{line}idle_unload_secs = 1\n"), 1);
    }
    start(&model_dir(&manifest), |config| {
        // The test's slow body pauses for longer than the door's grace before its minimum rate.
        config.min_body_bytes_per_sec = 0;
    })
}

/// The state `/v2/models` lists for version 1 of `model`.
async fn state(c: &reqwest::Client, url: &str, model: &str) -> String {
    let (_, list) = get(c, &format!("{url}/v2/models")).await;
    list["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == model && m["version"] == "1")
        .map(|m| m["state"].as_str().unwrap().to_string())
        .unwrap()
}

async fn eventually_unloaded(c: &reqwest::Client, url: &str, model: &str) {
    for _ in 0..100 {
        if state(c, url, model).await == "UNLOADED" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{model} was not unloaded once nothing held it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_body_arrives_past_the_idle_unload_is_served() {
    let url = server(&["mlp"]);
    let c = client();
    let infer = format!("{url}/v2/models/mlp/infer");
    let (status, _) = post(&c, &infer, &mlp_request(&features(1, 1))).await;
    assert_eq!(status, 200, "warm-up");
    // Headers and the body's first bytes now; the rest after two seconds of idleness.
    let body = mlp_request(&features(2, 1)).to_string();
    let addr = url.trim_start_matches("http://");
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v2/models/mlp/infer HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(&body.as_bytes()[..10]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(
        state(&c, &url, "mlp").await,
        "READY",
        "the request holds its version"
    );
    socket.write_all(&body.as_bytes()[10..]).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(30), socket.read_to_string(&mut answer))
        .await
        .expect("an answer within 30 s")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let json: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(json["model_version"], "1");
    assert_eq!(json["parameters"]["served_by"], "mlp:1");
    // Answered, it holds nothing: scale to zero goes on.
    eventually_unloaded(&c, &url, "mlp").await;
    let (status, body) = post(&c, &infer, &mlp_request(&features(3, 1))).await;
    assert_eq!(status, 200, "loaded again on demand: {body}");
}

/// Reads `n` VAD results from `ws`; an error message fails the test.
async fn results(ws: &mut Socket, n: usize) -> Vec<Value> {
    let mut got = Vec::new();
    while got.len() < n {
        let next = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
        match next.expect("a result within 10 s") {
            Some(Ok(Message::Text(text))) => {
                let m: Value = serde_json::from_str(&text).unwrap();
                assert_ne!(m["type"], "error", "{m}");
                if m["type"] == "vad" {
                    got.push(m);
                }
            }
            Some(Ok(Message::Close(frame))) => panic!("closed: {frame:?}"),
            Some(Ok(_)) => {}
            other => panic!("no result: {other:?}"),
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_silent_past_the_idle_unload_keeps_its_model_and_goes_on() {
    let url = server(&["silero_vad"]);
    let c = client();
    let (audio, rate) = fixture_pcm16("two_phrases_16k");
    assert_eq!(rate, 16000);
    // Four 512-sample chunks before the silence, four after.
    let chunk = 512 * 2;
    let mut ws = connect(&url).await.unwrap();
    let start = json!({"type": "start", "sample_rate": 16000, "format": "pcm16"});
    ws.send(Message::text(start.to_string())).await.unwrap();
    ws.send(Message::binary(audio[..4 * chunk].to_vec()))
        .await
        .unwrap();
    let before = results(&mut ws, 4).await;
    assert_eq!(before[3]["seq"], 3);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(
        state(&c, &url, "silero_vad").await,
        "READY",
        "an open stream holds its model"
    );
    ws.send(Message::binary(audio[4 * chunk..8 * chunk].to_vec()))
        .await
        .unwrap();
    let after = results(&mut ws, 4).await;
    let seqs: Vec<_> = after.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [4, 5, 6, 7], "{after:?}");
    ws.send(Message::text(json!({"type": "end"}).to_string()))
        .await
        .unwrap();
    let mut summary = None;
    let mut close = None;
    while let Some(Ok(message)) = ws.next().await {
        match message {
            Message::Text(text) => {
                let m: Value = serde_json::from_str(&text).unwrap();
                assert_ne!(m["type"], "error", "{m}");
                if m["type"] == "summary" {
                    summary = Some(m);
                }
            }
            Message::Close(frame) => close = frame.map(|f| f.code),
            _ => {}
        }
    }
    assert_eq!(summary.expect("a summary")["chunks"], 8);
    assert_eq!(close, Some(CloseCode::Normal));
    // Ended, it holds nothing: scale to zero goes on.
    eventually_unloaded(&c, &url, "silero_vad").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn model_metadata_counts_the_replicas_running_after_a_scale_up() {
    let manifest = format!(
        r#"
        [[models]]
        name = "mlp"
        version = "1"
        file = "{{models}}/mlp/1/model.onnx"
        sha256 = "{MLP_SHA}"
        replicas = 1
        max_replicas = 2
        max_batch_size = 4
        "#
    );
    let url = start(&model_dir(&manifest), |config| {
        config.admin_token = Some("t".into());
        config.cpu_budget = 4;
    });
    let c = client();
    let (_, metadata) = get(&c, &format!("{url}/v2/models/mlp")).await;
    assert_eq!(metadata["parameters"]["replicas"], 1);
    // Slow batches under 16 clients keep the queue deeper than one replica takes: it scales up.
    let fault = json!({"fault": {"kind": "slow", "ms": 100}, "count": 60});
    inject_fault(&c, &url, "t", "mlp", fault).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..16)
        .map(|i| {
            let (c, url, stop) = (c.clone(), url.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let request = mlp_request(&features(i, 1));
                    post(&c, &format!("{url}/v2/models/mlp/infer"), &request).await;
                }
            })
        })
        .collect();
    let router = async || {
        let list: Value = c
            .get(format!("{url}/admin/models"))
            .bearer_auth("t")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        list["models"][0]["router"].clone()
    };
    let mut scaled = false;
    for _ in 0..100 {
        if router().await["replicas"] == 2 {
            scaled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(scaled, "mlp did not scale up");
    let (_, metadata) = get(&c, &format!("{url}/v2/models/mlp")).await;
    assert_eq!(metadata["parameters"]["replicas"], 2, "{metadata}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
}
