//! The Open Inference Protocol surface, over real HTTP against the real server and models.

mod common;

use common::*;
use serde_json::{json, Value};

#[tokio::test]
async fn health_and_server_metadata() {
    let url = bundled();
    let c = client();
    assert_eq!(
        get(&c, &format!("{url}/v2/health/live")).await,
        (200, json!({"live": true}))
    );
    assert_eq!(
        get(&c, &format!("{url}/v2/health/ready")).await,
        (200, json!({"ready": true}))
    );
    let (status, meta) = get(&c, &format!("{url}/v2")).await;
    assert_eq!(status, 200);
    assert_eq!(meta["name"], "streamserve");
    assert!(meta["extensions"]
        .as_array()
        .unwrap()
        .contains(&json!("binary_tensor_data")));
    let (status, body) = get(&c, &format!("{url}/v2/no/such/thing")).await;
    assert_eq!(status, 404);
    assert!(body["error"].is_string());
}

#[tokio::test]
async fn model_listing_metadata_and_readiness() {
    let url = bundled();
    let c = client();
    let (status, list) = get(&c, &format!("{url}/v2/models")).await;
    assert_eq!(status, 200);
    let names: Vec<&str> = list["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, BUNDLED_MODELS);
    assert!(list["models"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["state"] == "READY"));

    let (status, meta) = get(&c, &format!("{url}/v2/models/mlp")).await;
    assert_eq!(status, 200);
    assert_eq!(meta["name"], "mlp");
    assert_eq!(meta["versions"], json!(["1"]));
    assert_eq!(meta["platform"], "onnxruntime_onnx");
    assert_eq!(meta["parameters"]["resources"]["cpu_threads"], 2);
    assert_eq!(meta["parameters"]["resources"]["model_file_bytes"], 5317146);
    assert_eq!(
        meta["inputs"],
        json!([{"name": "features", "datatype": "FP32", "shape": [-1, 256]}])
    );
    assert_eq!(
        meta["outputs"][0],
        json!({"name": "logits", "datatype": "FP32", "shape": [-1, 16]})
    );
    assert_eq!(meta["outputs"][1]["name"], "probabilities");

    let (status, pinned) = get(&c, &format!("{url}/v2/models/mlp/versions/1")).await;
    assert_eq!((status, &pinned["name"]), (200, &json!("mlp")));
    let (status, body) = get(&c, &format!("{url}/v2/models/mlp/versions/7")).await;
    assert_eq!(status, 404);
    assert!(
        body["error"].as_str().unwrap().contains("no version '7'"),
        "{body}"
    );
    let (status, body) = get(&c, &format!("{url}/v2/models/nope")).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "unknown model 'nope'");

    let (status, config) = get(&c, &format!("{url}/v2/models/mlp/config")).await;
    assert_eq!(status, 200);
    assert_eq!(config["max_batch_size"], 64);
    assert_eq!(config["input"][0]["dims"], json!([256]));
    assert_eq!(config["instance_group"][0]["count"], 2);

    assert_eq!(get(&c, &format!("{url}/v2/models/mlp/ready")).await.0, 200);
    assert_eq!(
        get(&c, &format!("{url}/v2/models/mlp/versions/1/ready"))
            .await
            .0,
        200
    );
    assert_eq!(get(&c, &format!("{url}/v2/models/nope/ready")).await.0, 404);

    let index: Value = c
        .post(format!("{url}/v2/repository/index"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(index.as_array().unwrap().len(), BUNDLED_MODELS.len());
}

#[tokio::test]
async fn infer_json_returns_every_output_with_version_and_id() {
    let url = bundled();
    let c = client();
    let x = features(1, 2);
    let mut body = mlp_request(&x);
    body["id"] = json!("req-42");
    let (status, response) = post(&c, &format!("{url}/v2/models/mlp/infer"), &body).await;
    assert_eq!(status, 200, "{response}");
    assert_eq!(response["model_name"], "mlp");
    assert_eq!(response["model_version"], "1");
    assert_eq!(response["id"], "req-42");
    let outputs = response["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 2);
    assert_eq!(outputs[0]["shape"], json!([2, 16]));
    assert_eq!(outputs[0]["datatype"], "FP32");
    let probabilities = output_f32(&response, "probabilities");
    for row in probabilities.chunks(16) {
        let sum: f32 = row.iter().sum();
        assert!((sum - 1.0).abs() < 1e-4, "softmax rows sum to 1, got {sum}");
    }
}

#[tokio::test]
async fn output_selection_and_version_pinning() {
    let url = bundled();
    let c = client();
    let mut body = mlp_request(&features(2, 1));
    body["outputs"] = json!([{"name": "probabilities"}]);
    let (status, response) =
        post(&c, &format!("{url}/v2/models/mlp/versions/1/infer"), &body).await;
    assert_eq!(status, 200, "{response}");
    let outputs = response["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 1);
    assert_eq!(outputs[0]["name"], "probabilities");

    let (status, response) =
        post(&c, &format!("{url}/v2/models/mlp/versions/3/infer"), &body).await;
    assert_eq!(status, 404);
    assert!(response["error"]
        .as_str()
        .unwrap()
        .contains("no version '3'"));
}

#[tokio::test]
async fn nested_json_data_is_accepted() {
    let url = bundled();
    let c = client();
    let x = features(3, 2);
    let nested: Vec<Vec<f32>> = x.chunks(256).map(|r| r.to_vec()).collect();
    let body = json!({"inputs": [{"name": "features", "shape": [2, 256], "datatype": "FP32", "data": nested}]});
    let (status, a) = post(&c, &format!("{url}/v2/models/mlp/infer"), &body).await;
    assert_eq!(status, 200, "{a}");
    let (_, b) = post(&c, &format!("{url}/v2/models/mlp/infer"), &mlp_request(&x)).await;
    assert_eq!(output_f32(&a, "logits"), output_f32(&b, "logits"));
}

#[tokio::test]
async fn datatypes_int64_fp64_bool_int32() {
    let url = bundled();
    let c = client();
    let body = json!({"inputs": [
        {"name": "a", "shape": [2, 4], "datatype": "INT64", "data": [1, 2, 3, 4, -5, 6, 9007199254740993i64, 8]},
        {"name": "b", "shape": [2, 4], "datatype": "FP64", "data": [0.5, -1.0, 0.0, 2.0, 1.0, 1.0, 0.0, -0.25]},
        {"name": "mask", "shape": [2, 4], "datatype": "BOOL", "data": [true, false, true, false, true, true, true, false]}
    ]});
    let (status, r) = post(&c, &format!("{url}/v2/models/typed_ops/infer"), &body).await;
    assert_eq!(status, 200, "{r}");
    let out = |name: &str| {
        r["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(out("sum")["datatype"], "FP64");
    assert_eq!(
        out("sum")["data"],
        json!([1.5, 1.0, 3.0, 6.0, -4.0, 7.0, 9007199254740992.0, 7.75])
    );
    assert_eq!(out("masked")["datatype"], "INT64");
    // INT64 survives the trip exactly, beyond what an f64 could hold.
    assert_eq!(
        out("masked")["data"],
        json!([1, 0, 3, 0, -5, 6, 9007199254740993i64, 0])
    );
    assert_eq!(out("positive")["datatype"], "BOOL");
    assert_eq!(
        out("positive")["data"],
        json!([true, false, false, true, true, true, false, false])
    );
    assert_eq!(out("masked_i32")["datatype"], "INT32");
    assert_eq!(out("masked_i32")["data"], json!([1, 0, 3, 0, -5, 6, 1, 0]));
}

/// Splits a binary-extension response into its JSON header and binary tail.
async fn binary_post(
    c: &reqwest::Client,
    url: &str,
    json_part: &Value,
    binary: &[u8],
) -> (u16, Value, Vec<u8>) {
    let header = serde_json::to_vec(json_part).unwrap();
    let mut body = header.clone();
    body.extend_from_slice(binary);
    let response = c
        .post(url)
        .header("Inference-Header-Content-Length", header.len().to_string())
        .header("Content-Type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let json_len: Option<usize> = response
        .headers()
        .get("Inference-Header-Content-Length")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    let bytes = response.bytes().await.unwrap().to_vec();
    match json_len {
        Some(n) => (
            status,
            serde_json::from_slice(&bytes[..n]).unwrap(),
            bytes[n..].to_vec(),
        ),
        None => (status, serde_json::from_slice(&bytes).unwrap(), Vec::new()),
    }
}

#[tokio::test]
async fn binary_tensor_data_in_and_out() {
    let url = bundled();
    let c = client();
    let x = features(4, 3);
    let raw: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    let json_part = json!({
        "inputs": [{"name": "features", "shape": [3, 256], "datatype": "FP32", "parameters": {"binary_data_size": raw.len()}}],
        "outputs": [{"name": "logits", "parameters": {"binary_data": true}}, {"name": "probabilities", "parameters": {"binary_data": false}}]
    });
    let (status, header, tail) =
        binary_post(&c, &format!("{url}/v2/models/mlp/infer"), &json_part, &raw).await;
    assert_eq!(status, 200, "{header}");
    assert_eq!(
        header["outputs"][0]["parameters"]["binary_data_size"],
        3 * 16 * 4
    );
    assert!(header["outputs"][0].get("data").is_none());
    assert_eq!(tail.len(), 3 * 16 * 4);
    let logits: Vec<f32> = tail
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();

    let (_, json_answer) = post(&c, &format!("{url}/v2/models/mlp/infer"), &mlp_request(&x)).await;
    assert_close(
        &logits,
        &output_f32(&json_answer, "logits"),
        "binary vs JSON logits",
    );
    assert_close(
        &output_f32(&header, "probabilities"),
        &output_f32(&json_answer, "probabilities"),
        "probabilities",
    );

    // Request-level binary_data_output applies to every output.
    let json_part = json!({
        "parameters": {"binary_data_output": true},
        "inputs": [{"name": "features", "shape": [3, 256], "datatype": "FP32", "parameters": {"binary_data_size": raw.len()}}]
    });
    let (status, header, tail) =
        binary_post(&c, &format!("{url}/v2/models/mlp/infer"), &json_part, &raw).await;
    assert_eq!(status, 200);
    assert_eq!(tail.len(), 2 * 3 * 16 * 4);
    assert!(header["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|o| o.get("data").is_none()));
}

#[tokio::test]
async fn binary_bool_and_int64() {
    let url = bundled();
    let c = client();
    let a: Vec<u8> = [1i64, -2, 3, 4]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let b: Vec<u8> = [1.0f64, -1.0, 0.5, 0.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let mask = vec![1u8, 1, 0, 1];
    let mut raw = a.clone();
    raw.extend(&b);
    raw.extend(&mask);
    let json_part = json!({
        "inputs": [
            {"name": "a", "shape": [1, 4], "datatype": "INT64", "parameters": {"binary_data_size": 32}},
            {"name": "b", "shape": [1, 4], "datatype": "FP64", "parameters": {"binary_data_size": 32}},
            {"name": "mask", "shape": [1, 4], "datatype": "BOOL", "parameters": {"binary_data_size": 4}}
        ],
        "outputs": [{"name": "positive", "parameters": {"binary_data": true}}, {"name": "masked", "parameters": {"binary_data": true}}]
    });
    let (status, header, tail) = binary_post(
        &c,
        &format!("{url}/v2/models/typed_ops/infer"),
        &json_part,
        &raw,
    )
    .await;
    assert_eq!(status, 200, "{header}");
    assert_eq!(&tail[..4], &[1, 0, 1, 0]);
    let masked: Vec<i64> = tail[4..]
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(masked, vec![1, -2, 0, 4]);
}

#[tokio::test]
async fn silero_vad_runs_without_a_batch_axis() {
    let url = bundled();
    let c = client();
    let audio: Vec<f32> = (0..576).map(|i| (i as f32 * 0.05).sin() * 0.3).collect();
    let body = json!({"inputs": [
        {"name": "input", "shape": [1, 576], "datatype": "FP32", "data": audio},
        {"name": "state", "shape": [2, 1, 128], "datatype": "FP32", "data": vec![0.0f32; 256]},
        {"name": "sr", "shape": [], "datatype": "INT64", "data": [16000]}
    ]});
    let (status, r) = post(&c, &format!("{url}/v2/models/silero_vad/infer"), &body).await;
    assert_eq!(status, 200, "{r}");
    let p = output_f32(&r, "output");
    assert_eq!(p.len(), 1);
    assert!((0.0..=1.0).contains(&p[0]));
    assert_eq!(r["outputs"][1]["shape"], json!([2, 1, 128]));
}

#[tokio::test]
async fn metrics_expose_requests_batches_queue_and_workers() {
    let url = bundled();
    let c = client();
    let (status, _) = post(
        &c,
        &format!("{url}/v2/models/mlp/infer"),
        &mlp_request(&features(9, 1)),
    )
    .await;
    assert_eq!(status, 200);
    let text = metrics_text(&c, url).await;
    for needle in [
        "streamserve_requests_total{model=\"mlp\",version=\"1\",status=\"200\"}",
        "streamserve_request_duration_seconds_bucket{model=\"mlp\",version=\"1\"",
        "streamserve_batch_size_bucket{model=\"mlp\",version=\"1\"",
        "streamserve_inference_duration_seconds_count{model=\"mlp\",version=\"1\"}",
        "streamserve_queue_depth{model=\"mlp\",version=\"1\"}",
        "streamserve_workers{model=\"mlp\",version=\"1\"} 2",
    ] {
        assert!(text.contains(needle), "metrics lack {needle}:\n{text}");
    }
}

/// Idle keep-alive connections: closed by the server after `keep_alive_secs`, kept open
/// (for the clients and proxies in front to close first) under the default.
#[test]
fn idle_keep_alive_connections_close_after_the_configured_time() {
    use std::io::{Read, Write};
    use std::time::Duration;

    let models = common::repo().join("models");
    let short = common::start(&models, |c| c.keep_alive_secs = 1);
    let default = common::start(&models, |_| {});
    let open = |base: &str| {
        let addr = base.trim_start_matches("http://");
        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        tcp.write_all(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = tcp.read(&mut buf).unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
        tcp
    };
    let mut closing = open(&short);
    let mut staying = open(&default);

    // The 1 s connection ends (EOF) well within 10 s.
    closing
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(
        closing.read(&mut buf).unwrap(),
        0,
        "expected the server to close"
    );

    // The default one is still open after 2 s idle, and still serves.
    staying
        .set_read_timeout(Some(Duration::from_millis(2000)))
        .unwrap();
    let err = staying.read(&mut buf).unwrap_err();
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{err}"
    );
    staying
        .write_all(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    staying
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let n = staying.read(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
}
