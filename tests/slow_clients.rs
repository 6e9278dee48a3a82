//! Connection-level bad input: bodies that trickle or stall, floods of such connections,
//! bodies larger than the model can take, bodies beyond the memory bound, and the wrong
//! method on a known path. Each gets a precise status with a JSON error, and well-behaved
//! clients (and health checks) sent at the same time are answered.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends a request head announcing `content_length` bytes, then `first` of the body.
async fn open_body(url: &str, path: &str, content_length: usize, first: &[u8]) -> TcpStream {
    let addr = url.trim_start_matches("http://");
    let mut socket = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {content_length}\r\n\r\n"
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(first).await.unwrap();
    socket
}

/// Reads what the server sends until it closes the connection (bounded by `within`):
/// the status and the JSON error of its one response.
async fn answer(socket: &mut TcpStream, within: Duration) -> (u16, Value, String) {
    let mut raw = Vec::new();
    tokio::time::timeout(within, socket.read_to_end(&mut raw))
        .await
        .expect("the server answered and closed the connection in time")
        .ok();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    let json = serde_json::from_str(body).unwrap_or(Value::Null);
    (status, json, text)
}

/// A good client: `n` inferences and a readiness check, all of which must succeed.
async fn good_client(url: String, n: u64) {
    let c = client();
    for i in 0..n {
        let (status, body) = post(
            &c,
            &format!("{url}/v2/models/mlp/infer"),
            &mlp_request(&features(i, 1)),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let ready = c
            .get(format!("{url}/v2/health/ready"))
            .send()
            .await
            .unwrap();
        assert_eq!(ready.status(), 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trickling_and_stalled_bodies_get_408_while_others_are_served() {
    let url = start(&repo().join("models"), |config| {
        config.min_body_bytes_per_sec = 1000;
        config.body_timeout_secs = 5;
    });
    let body = serde_json::to_vec(&mlp_request(&features(1, 1))).unwrap();
    // One byte every 500 ms: far below 1000 B/s once the 2 s grace is over.
    let trickle = {
        let (url, body) = (url.clone(), body.clone());
        tokio::spawn(async move {
            let mut socket = open_body(&url, "/v2/models/mlp/infer", body.len(), &body[..1]).await;
            for byte in &body[1..40] {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if socket.write_all(&[*byte]).await.is_err() {
                    break;
                }
            }
            answer(&mut socket, Duration::from_secs(20)).await
        })
    };
    // Half a body, then nothing.
    let mut stalled = open_body(
        &url,
        "/v2/models/mlp/infer",
        body.len(),
        &body[..body.len() / 2],
    )
    .await;
    good_client(url.clone(), 20).await;
    let (status, json, raw) = answer(&mut stalled, Duration::from_secs(20)).await;
    assert_eq!(status, 408, "{raw}");
    assert!(
        json["error"]
            .as_str()
            .unwrap()
            .contains("did not arrive in time"),
        "{json}"
    );
    assert!(
        raw.to_ascii_lowercase().contains("connection: close"),
        "{raw}"
    );
    let (status, json, raw) = trickle.await.unwrap();
    assert_eq!(status, 408, "{raw}");
    assert!(
        json["error"].as_str().unwrap().contains("bytes/s"),
        "{json}"
    );
    // Counters are per process, and other tests here time bodies out too: at least these two.
    let metrics = metrics_text(&client(), &url).await;
    let timeouts: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("streamserve_body_timeouts_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no body timeout counter in {metrics}"));
    assert!(timeouts >= 2.0, "{timeouts}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_slow_bodies_cannot_lock_out_new_clients() {
    // 40 slow connections against room for 16: new clients wait in the backlog until the
    // door's pace has cut the slow ones, and are then served.
    let url = start(&repo().join("models"), |config| {
        config.max_connections = 16;
        config.min_body_bytes_per_sec = 1000;
        config.body_timeout_secs = 4;
    });
    let mut slow = Vec::new();
    for _ in 0..40 {
        let url = url.clone();
        slow.push(tokio::spawn(async move {
            let mut socket = open_body(&url, "/v2/models/mlp/infer", 4096, b"{").await;
            let mut raw = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_secs(30), socket.read_to_end(&mut raw)).await;
            String::from_utf8_lossy(&raw).into_owned()
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::time::timeout(Duration::from_secs(30), good_client(url.clone(), 5))
        .await
        .expect("a new client is served once the slow bodies are cut");
    for connection in slow {
        let raw = connection.await.unwrap();
        assert!(
            raw.is_empty() || raw.starts_with("HTTP/1.1 408"),
            "a slow body gets 408 (or, still in the backlog at the end, nothing): {raw}"
        );
    }
}

#[tokio::test]
async fn a_body_larger_than_the_model_can_take_is_refused_before_it_is_read() {
    let url = bundled();
    // 63 MB announced, a few bytes sent: the answer comes from the head alone.
    let mut socket = open_body(url, "/v2/models/mlp/infer", 63 << 20, b"{\"inputs\"").await;
    let (status, json, raw) = answer(&mut socket, Duration::from_secs(10)).await;
    assert_eq!(status, 413, "{raw}");
    let message = json["error"].as_str().unwrap();
    assert!(
        message.contains("for model 'mlp'") && message.contains("max_batch_size 64"),
        "{message}"
    );
    // A full batch in pretty-printed JSON still fits the model's bound.
    let rows: Vec<Vec<f32>> = features(3, 64).chunks(256).map(|r| r.to_vec()).collect();
    let request = serde_json::json!({"inputs": [{"name": "features", "shape": [64, 256], "datatype": "FP32", "data": rows}]});
    let pretty = serde_json::to_vec_pretty(&request).unwrap();
    let (status, body) = post_raw(
        &client(),
        &format!("{url}/v2/models/mlp/infer"),
        pretty,
        &[("content-type", "application/json".into())],
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bodies_beyond_the_memory_bound_get_503_until_memory_is_free() {
    let url = start(&repo().join("models"), |config| {
        config.max_body_memory_mb = 1;
        config.min_body_bytes_per_sec = 0;
        config.body_timeout_secs = 60;
    });
    let c = client();
    let infer = format!("{url}/v2/models/mlp/infer");
    let body = serde_json::to_vec(&mlp_request(&features(2, 1))).unwrap();
    // Announcing a body takes nothing: only bytes that arrive count against the bound, so
    // headers alone cannot lock other clients out.
    let announced = open_body(&url, "/v1/models/silero_vad/segments", 1 << 20, b"RIFF").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let response = c.post(&infer).body(body.clone()).send().await.unwrap();
    assert_eq!(
        response.status(),
        200,
        "an announced, unsent body held the bound"
    );
    drop(announced);
    // A body larger than the whole bound could never be read: 413 at once, which a client
    // does not retry (a 503 + Retry-After would be retried for ever).
    let mut too_large = open_body(&url, "/v1/models/silero_vad/segments", 2 << 20, b"RIFF").await;
    let (status, json, _) = answer(&mut too_large, Duration::from_secs(10)).await;
    assert_eq!(status, 413, "{json}");
    assert!(
        json["error"]
            .as_str()
            .unwrap()
            .contains("--max-body-memory-mb"),
        "{json}"
    );
    // A WAV upload that has sent 961 KiB of its 1000 KiB holds the whole bound (reserved in
    // 64 KiB steps) while the rest is awaited.
    let mut holder = open_body(&url, "/v1/models/silero_vad/segments", 1000 * 1024, b"RIFF").await;
    holder.write_all(&vec![0u8; 961 * 1024]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let response = c.post(&infer).body(body.clone()).send().await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let json: Value = response.json().await.unwrap();
    assert!(
        json["error"].as_str().unwrap().contains("memory bound"),
        "{json}"
    );
    drop(holder);
    // The reservation ends with its connection.
    let mut answered = 0;
    for _ in 0..50 {
        let response = c.post(&infer).body(body.clone()).send().await.unwrap();
        if response.status() == 200 {
            answered += 1;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(answered, 1, "memory is free again once the holder has gone");
}

#[tokio::test]
async fn wrong_methods_get_405_with_allow_and_unknown_paths_404() {
    let url = bundled();
    let c = client();
    let response = c
        .get(format!("{url}/v2/models/mlp/infer"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "POST");
    let json: Value = response.json().await.unwrap();
    assert!(
        json["error"]
            .as_str()
            .unwrap()
            .contains("method GET is not allowed"),
        "{json}"
    );
    let response = c
        .delete(format!("{url}/v2/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "GET");
    let response = c
        .get(format!("{url}/v2/nothing/here"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let json: Value = response.json().await.unwrap();
    assert_eq!(json["error"], "no such endpoint");
    // A query string that does not parse is a JSON 400 too.
    let response = c
        .post(format!("{url}/v1/models/silero_vad/segments?threshold=abc"))
        .body(vec![0u8; 4])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let json: Value = response.json().await.unwrap();
    assert!(
        json["error"].as_str().unwrap().contains("bad query string"),
        "{json}"
    );
}
