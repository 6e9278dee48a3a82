//! The binary tensor data extension's bad input gets a precise 400 with a KServe-style
//! `{"error": ...}`, and the server keeps serving.

mod common;

use common::*;
use serde_json::{json, Value};

#[tokio::test]
async fn binary_extension_errors() {
    let url = bundled();
    let c = client();
    let infer = format!("{url}/v2/models/mlp/infer");
    let header = |n: usize| json!({"inputs": [{"name": "features", "shape": [1, 256], "datatype": "FP32", "parameters": {"binary_data_size": n}}]});
    let with_tail = |json_part: &Value, tail: usize| {
        let mut body = serde_json::to_vec(json_part).unwrap();
        let n = body.len();
        body.extend(std::iter::repeat_n(0u8, tail));
        (body, n)
    };

    let (body, n) = with_tail(&header(1024), 1000);
    expect(
        post_raw(
            &c,
            &infer,
            body,
            &[("Inference-Header-Content-Length", n.to_string())],
        )
        .await,
        400,
        "only 1000 binary bytes remain",
    );
    let (body, n) = with_tail(&header(1024), 1030);
    expect(
        post_raw(
            &c,
            &infer,
            body,
            &[("Inference-Header-Content-Length", n.to_string())],
        )
        .await,
        400,
        "no input claims them",
    );
    let (body, n) = with_tail(&header(1022), 1022);
    expect(
        post_raw(
            &c,
            &infer,
            body,
            &[("Inference-Header-Content-Length", n.to_string())],
        )
        .await,
        400,
        "not a whole number of FP32",
    );
    let (body, _) = with_tail(&header(1024), 1024);
    expect(
        post_raw(
            &c,
            &infer,
            body.clone(),
            &[("Inference-Header-Content-Length", "999999".into())],
        )
        .await,
        400,
        "but the body has only",
    );
    expect(
        post_raw(
            &c,
            &infer,
            body,
            &[("Inference-Header-Content-Length", "lots".into())],
        )
        .await,
        400,
        "must be a byte count",
    );
}

/// Posts a JSON header and raw tensor bytes; returns the status, the JSON part and the binary
/// part of the answer.
async fn binary_post(
    c: &reqwest::Client,
    url: &str,
    json_part: &Value,
    binary: &[u8],
) -> (u16, Value, Vec<u8>) {
    let mut body = serde_json::to_vec(json_part).unwrap();
    let n = body.len();
    body.extend_from_slice(binary);
    let response = c
        .post(url)
        .header("Inference-Header-Content-Length", n.to_string())
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
    let n = json_len.unwrap_or(bytes.len());
    let header = serde_json::from_slice(&bytes[..n])
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&bytes)));
    (status, header, bytes[n..].to_vec())
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// features for mlp with `special` at element `at`, sent as binary.
fn mlp_binary(special: f32, at: usize, outputs: Value) -> (Value, Vec<u8>) {
    let mut x = features(7, 1);
    x[at] = special;
    let raw = f32_bytes(&x);
    let header = json!({
        "inputs": [{"name": "features", "shape": [1, 256], "datatype": "FP32", "parameters": {"binary_data_size": raw.len()}}],
        "outputs": outputs,
    });
    (header, raw)
}

/// A Silero VAD step as binary tensors.
fn vad_binary(samples: usize, sr: i64) -> (Value, Vec<u8>) {
    let mut raw = f32_bytes(&vec![0.0; samples]);
    raw.extend(f32_bytes(&[0.0; 256]));
    raw.extend(sr.to_le_bytes());
    let header = json!({"inputs": [
        {"name": "input", "shape": [1, samples], "datatype": "FP32", "parameters": {"binary_data_size": samples * 4}},
        {"name": "state", "shape": [2, 1, 128], "datatype": "FP32", "parameters": {"binary_data_size": 1024}},
        {"name": "sr", "shape": [], "datatype": "INT64", "parameters": {"binary_data_size": 8}}]});
    (header, raw)
}

#[tokio::test]
async fn non_finite_bits_are_refused_with_the_input_and_element() {
    let url = bundled();
    let c = client();
    let infer = format!("{url}/v2/models/mlp/infer");
    for (special, shown) in [
        (f32::NAN, "is NaN"),
        (f32::INFINITY, "is inf"),
        (f32::NEG_INFINITY, "is -inf"),
        (f32::from_bits(0x7fc0_0001), "is NaN"), // a NaN with a payload
    ] {
        let (header, raw) = mlp_binary(special, 3, json!(null));
        let (status, body, _) = binary_post(&c, &infer, &header, &raw).await;
        expect(
            (status, body),
            400,
            &format!(
                "input 'features' element 3 {shown}: model 'mlp' takes finite FP32 values only"
            ),
        );
    }
    // The same for FP64 bits.
    let typed = format!("{url}/v2/models/typed_ops/infer");
    let mut raw: Vec<u8> = [0i64; 4].iter().flat_map(|v| v.to_le_bytes()).collect();
    raw.extend(
        [0.5f64, f64::NAN, 0.0, 0.0]
            .iter()
            .flat_map(|v| v.to_le_bytes()),
    );
    raw.extend([1u8; 4]);
    let header = json!({"inputs": [
        {"name": "a", "shape": [1, 4], "datatype": "INT64", "parameters": {"binary_data_size": 32}},
        {"name": "b", "shape": [1, 4], "datatype": "FP64", "parameters": {"binary_data_size": 32}},
        {"name": "mask", "shape": [1, 4], "datatype": "BOOL", "parameters": {"binary_data_size": 4}}]});
    let (status, body, _) = binary_post(&c, &typed, &header, &raw).await;
    expect((status, body), 400, "input 'b' element 1 is NaN");
    // Finite extremes are data like any other.
    let (header, raw) = mlp_binary(f32::MAX, 3, json!(null));
    assert_eq!(binary_post(&c, &infer, &header, &raw).await.0, 200);
}

#[tokio::test]
async fn a_model_may_allow_non_finite_inputs_and_gets_them_back_either_way() {
    let dir = model_dir(&format!(
        r#"
        [[models]]
        name = "mlp_nan"
        version = "1"
        file = "{{models}}/mlp/1/model.onnx"
        sha256 = "{MLP_SHA}"
        max_batch_size = 8
        allow_non_finite = true
        "#
    ));
    let url = start(&dir, |_| {});
    let c = client();
    let infer = format!("{url}/v2/models/mlp_nan/infer");
    let (_, meta) = get(&c, &format!("{url}/v2/models/mlp_nan")).await;
    assert_eq!(meta["parameters"]["allow_non_finite"], json!(true));
    let outputs = json!([
        {"name": "logits", "parameters": {"binary_data": true}},
        {"name": "probabilities", "parameters": {"binary_data": false}}]);
    let (header, raw) = mlp_binary(f32::NAN, 0, outputs);
    let (status, body, tail) = binary_post(&c, &infer, &header, &raw).await;
    assert_eq!(status, 200, "{body}");
    // Binary output: the bits as computed; JSON output: spelt out, never null.
    let logits: Vec<f32> = tail
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(logits.len(), 16);
    assert!(logits.iter().all(|v| v.is_nan()), "{logits:?}");
    let probabilities = body["outputs"][1]["data"].as_array().unwrap();
    assert_eq!(probabilities.len(), 16);
    assert!(probabilities.iter().all(|v| v == "NaN"), "{body}");
}

#[tokio::test]
async fn silero_binary_inputs_it_cannot_take_are_client_errors() {
    let url = bundled();
    let c = client();
    let infer = format!("{url}/v2/models/silero_vad/infer");
    let failures = |m: &str| counter(m, "streamserve_inference_failures_total", "silero_vad");
    let before = failures(&metrics_text(&c, url).await);
    for (samples, sr, needle) in [
        (1, 16000, "input 'input' has shape [1, 1]"),
        (100_000, 16000, "input 'input' has shape [1, 100000]"),
        (
            576,
            12345,
            "input 'sr' must be one of 16000, 8000; got 12345",
        ),
    ] {
        let (header, raw) = vad_binary(samples, sr);
        let (status, body, _) = binary_post(&c, &infer, &header, &raw).await;
        expect((status, body), 400, needle);
    }
    let (header, raw) = vad_binary(288, 8000);
    assert_eq!(binary_post(&c, &infer, &header, &raw).await.0, 200);
    assert_unharmed(&c, url, "silero_vad", before).await;

    // Past the declarations, ONNX Runtime's own refusal is a client error too.
    let url = start(&undeclared_silero_dir("silero_raw_bin"), |_| {});
    let infer = format!("{url}/v2/models/silero_raw_bin/infer");
    for (samples, sr) in [(1, 16000), (576, 12345)] {
        let (header, raw) = vad_binary(samples, sr);
        let (status, body, _) = binary_post(&c, &infer, &header, &raw).await;
        expect(
            (status, body),
            400,
            "model 'silero_raw_bin' cannot run this input: ",
        );
    }
    assert_unharmed(&c, &url, "silero_raw_bin", 0.0).await;
}

#[tokio::test]
async fn good_binary_requests_are_unaffected_by_concurrent_bad_ones() {
    let url = bundled();
    let c = client();
    let mlp = format!("{url}/v2/models/mlp/infer");
    let vad = format!("{url}/v2/models/silero_vad/infer");
    let failures = |m: &str| counter(m, "streamserve_inference_failures_total", "silero_vad");
    let before = failures(&metrics_text(&c, url).await);
    let mut tasks = Vec::new();
    for i in 0..90u64 {
        let (c, mlp, vad) = (c.clone(), mlp.clone(), vad.clone());
        tasks.push(tokio::spawn(async move {
            let (good, url, (header, raw)) = match i % 6 {
                0 => (true, mlp, mlp_binary(0.25, 0, json!(null))),
                1 => (true, vad, vad_binary(576, 16000)),
                2 => (false, mlp, mlp_binary(f32::NAN, 9, json!(null))),
                3 => (false, mlp, mlp_binary(f32::INFINITY, 0, json!(null))),
                4 => (false, vad, vad_binary(1, 16000)),
                _ => (false, vad, vad_binary(576, 12345)),
            };
            let (status, body, _) = binary_post(&c, &url, &header, &raw).await;
            (good, status, body)
        }));
    }
    let mut good = 0;
    for task in tasks {
        let (is_good, status, body) = task.await.unwrap();
        if is_good {
            assert_eq!(status, 200, "{body}");
            good += 1;
        } else {
            assert_eq!(status, 400, "{body}");
        }
    }
    assert_eq!(good, 30);
    assert_eq!(failures(&metrics_text(&c, url).await), before);
}
