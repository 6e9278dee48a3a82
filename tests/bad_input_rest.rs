//! REST (KServe v2 JSON) bad input gets a precise 4xx with a KServe-style `{"error": ...}`, and good requests sent at
//! the same time are unaffected.

mod common;

use common::*;
use serde_json::{json, Value};

fn features_input(shape: Value, datatype: &str, data: Value) -> Value {
    json!({"inputs": [{"name": "features", "shape": shape, "datatype": datatype, "data": data}]})
}

#[tokio::test]
async fn each_kind_of_bad_request_gets_a_precise_error() {
    let url = bundled();
    let c = client();
    let infer = format!("{url}/v2/models/mlp/infer");
    let row = features(1, 1);

    expect(
        post_raw(&c, &infer, b"{\"inputs\": [".to_vec(), &[]).await,
        400,
        "malformed inference request JSON",
    );
    expect(
        post_raw(&c, &infer, b"\x00\xffgarbage".to_vec(), &[]).await,
        400,
        "malformed",
    );
    expect(
        post_raw(&c, &infer, b"".to_vec(), &[]).await,
        400,
        "malformed",
    );
    expect(
        post(&c, &infer, &json!({"inputs": {"name": "x"}})).await,
        400,
        "malformed",
    );
    expect(
        post(
            &c,
            &format!("{url}/v2/models/ghost/infer"),
            &mlp_request(&row),
        )
        .await,
        404,
        "unknown model 'ghost'",
    );
    expect(
        post(
            &c,
            &format!("{url}/v2/models/mlp/versions/2/infer"),
            &mlp_request(&row),
        )
        .await,
        404,
        "no version '2'",
    );

    let wrong_name =
        json!({"inputs": [{"name": "pixels", "shape": [1, 256], "datatype": "FP32", "data": row}]});
    expect(
        post(&c, &infer, &wrong_name).await,
        400,
        "has no input 'pixels'",
    );
    expect(
        post(&c, &infer, &json!({"inputs": []})).await,
        400,
        "needs input 'features'",
    );
    expect(
        post(
            &c,
            &infer,
            &features_input(json!([1, 256]), "FP64", json!(row)),
        )
        .await,
        400,
        "must be FP32, got FP64",
    );
    expect(
        post(
            &c,
            &infer,
            &features_input(json!([1, 256]), "FP16", json!(row)),
        )
        .await,
        400,
        "'FP16' is not supported",
    );
    expect(
        post(
            &c,
            &infer,
            &features_input(json!([256]), "FP32", json!(row)),
        )
        .await,
        400,
        "must have 2 dimensions",
    );
    expect(
        post(
            &c,
            &infer,
            &features_input(json!([1, 128]), "FP32", json!(row[..128])),
        )
        .await,
        400,
        "dimension 1 must be 256",
    );
    expect(
        post(
            &c,
            &infer,
            &features_input(json!([2, 256]), "FP32", json!(row)),
        )
        .await,
        400,
        "needs 512 elements, got 256",
    );
    expect(
        post(
            &c,
            &infer,
            &features_input(json!([1, 256]), "FP32", json!(vec!["a"; 256])),
        )
        .await,
        400,
        "input 'features'",
    );
    expect(
        post(
            &c,
            &infer,
            &features_input(json!([-1, 256]), "FP32", json!(row)),
        )
        .await,
        400,
        "negative dimension",
    );
    expect(
        post(
            &c,
            &infer,
            &features_input(json!([0, 256]), "FP32", json!([])),
        )
        .await,
        400,
        "empty batch",
    );
    let too_many = features(2, 65);
    expect(
        post(&c, &infer, &mlp_request(&too_many)).await,
        400,
        "exceeds model 'mlp' max_batch_size of 64",
    );
    let mut no_data = features_input(json!([1, 256]), "FP32", json!(null));
    no_data["inputs"][0].as_object_mut().unwrap().remove("data");
    expect(post(&c, &infer, &no_data).await, 400, "has no data");
    let mut bad_output = mlp_request(&row);
    bad_output["outputs"] = json!([{"name": "embedding"}]);
    expect(
        post(&c, &infer, &bad_output).await,
        400,
        "has no output 'embedding'",
    );

    let typed = format!("{url}/v2/models/typed_ops/infer");
    let typed_body = |a: Value| {
        json!({"inputs": [
            {"name": "a", "shape": [1, 4], "datatype": "INT64", "data": a},
            {"name": "b", "shape": [1, 4], "datatype": "FP64", "data": [0, 0, 0, 0]},
            {"name": "mask", "shape": [1, 4], "datatype": "BOOL", "data": [true, true, true, true]}]})
    };
    expect(
        post(&c, &typed, &typed_body(json!([1, 2, 3.5, 4]))).await,
        400,
        "element 2 (3.5) is not a valid INT64",
    );
    expect(
        post(&c, &typed, &typed_body(json!([1, 2, true, 4]))).await,
        400,
        "not a valid INT64",
    );
}

#[tokio::test]
async fn oversized_bodies_get_413_and_the_server_keeps_serving() {
    let url = start(&repo().join("models"), |config| {
        config.max_body_bytes = 4096
    });
    let c = client();
    let infer = format!("{url}/v2/models/mlp/infer");
    let big = mlp_request(&features(1, 8));
    expect(
        post(&c, &infer, &big).await,
        413,
        "exceeds the limit of 4096 bytes",
    );
    // Without a Content-Length (chunked), the limit still holds while streaming.
    let body = serde_json::to_vec(&big).unwrap();
    let stream = futures_util::stream::iter(
        body.chunks(1000)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let response = c
        .post(&infer)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 413);

    let small: Vec<f32> = vec![0.5; 256];
    let (status, _) = post(&c, &infer, &json!({"inputs": [{"name": "features", "shape": [1, 256], "datatype": "FP32", "data": small}]})).await;
    assert_eq!(status, 200, "a body under the limit is served");
}

#[tokio::test]
async fn good_requests_are_unaffected_by_concurrent_bad_ones() {
    let url = bundled();
    let c = client();
    let infer = format!("{url}/v2/models/mlp/infer");
    let mut tasks = Vec::new();
    for i in 0..120u64 {
        let (c, infer) = (c.clone(), infer.clone());
        tasks.push(tokio::spawn(async move {
            if i % 3 == 0 {
                let x = features(i, 1);
                let (status, response) = post(&c, &infer, &mlp_request(&x)).await;
                (true, status, response)
            } else if i % 3 == 1 {
                let (status, response) = post(
                    &c,
                    &infer,
                    &features_input(json!([1, 256]), "FP32", json!([1.0])),
                )
                .await;
                (false, status, response)
            } else {
                let response = c.post(&infer).body("\u{1}not json").send().await.unwrap();
                (false, response.status().as_u16(), Value::Null)
            }
        }));
    }
    let mut good = 0;
    for task in tasks {
        let (is_good, status, response) = task.await.unwrap();
        if is_good {
            assert_eq!(status, 200, "{response}");
            assert_eq!(response["outputs"][0]["shape"], json!([1, 16]));
            good += 1;
        } else {
            assert_eq!(status, 400);
        }
    }
    assert_eq!(good, 40);
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

#[tokio::test]
async fn compressed_requests_are_decoded_and_bounded() {
    let url = start(&repo().join("models"), |config| {
        config.max_body_bytes = 64 * 1024
    });
    let c = client();
    let infer = format!("{url}/v2/models/mlp/infer");
    let x = features(11, 2);
    let plain = serde_json::to_vec(&mlp_request(&x)).unwrap();
    let (status, expected) = post(&c, &infer, &mlp_request(&x)).await;
    assert_eq!(status, 200);

    let (status, got) = post_raw(
        &c,
        &infer,
        gzip(&plain),
        &[("Content-Encoding", "gzip".into())],
    )
    .await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(output_f32(&got, "logits"), output_f32(&expected, "logits"));

    let deflated = {
        use std::io::Write;
        let mut encoder =
            flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(&plain).unwrap();
        encoder.finish().unwrap()
    };
    let (status, got) = post_raw(
        &c,
        &infer,
        deflated,
        &[("Content-Encoding", "deflate".into())],
    )
    .await;
    assert_eq!(status, 200, "{got}");

    // A small body that inflates past the limit is refused, not inflated without bound: the
    // server stops within one inflated block (32 KiB) of the limit, where the size it reports
    // was reached.
    let bomb = gzip(&vec![b' '; 10 * 1024 * 1024]);
    assert!(bomb.len() < 64 * 1024);
    let got = post_raw(&c, &infer, bomb, &[("Content-Encoding", "gzip".into())]).await;
    let message = got.1["error"].as_str().unwrap_or_default().to_string();
    expect(got, 413, "exceeds the limit of 65536 bytes");
    let inflated: usize = message
        .strip_prefix("request body of ")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no size in '{message}'"));
    assert!(
        inflated <= (64 + 32) * 1024,
        "inflated {inflated} bytes: {message}"
    );

    expect(
        post_raw(
            &c,
            &infer,
            plain.clone(),
            &[("Content-Encoding", "br-unknown".into())],
        )
        .await,
        415,
        "'br-unknown' is not supported",
    );
    // A body that is not gzip at all: a plain reason, no decoder internals.
    let got = post_raw(&c, &infer, plain, &[("Content-Encoding", "gzip".into())]).await;
    assert!(!got.1.to_string().contains("Custom {"), "{}", got.1);
    expect(got, 400, "the request body is not valid gzip data");
}

#[tokio::test]
async fn out_of_range_floats_and_misshapen_bodies_get_400() {
    let url = bundled();
    let c = client();
    let infer = format!("{url}/v2/models/mlp/infer");
    let mut row: Vec<Value> = features(2, 1).into_iter().map(|v| json!(v)).collect();
    row[5] = json!(1e39);
    let (status, body) = post(
        &c,
        &infer,
        &features_input(json!([1, 256]), "FP32", json!(row)),
    )
    .await;
    expect((status, body.clone()), 400, "input 'features'");
    expect(
        (status, body),
        400,
        "element 5 (1e39) is out of range for FP32",
    );
    row[5] = json!(-1e39);
    expect(
        post(
            &c,
            &infer,
            &features_input(json!([1, 256]), "FP32", json!(row)),
        )
        .await,
        400,
        "element 5 (-1e39) is out of range",
    );
    // The largest finite FP32 values are fine.
    row[5] = json!(3.4e38);
    assert_eq!(
        post(
            &c,
            &infer,
            &features_input(json!([1, 256]), "FP32", json!(row))
        )
        .await
        .0,
        200
    );
    let typed = format!("{url}/v2/models/typed_ops/infer");
    let typed_body = |b: &str| {
        format!(
            r#"{{"inputs": [
            {{"name": "a", "shape": [1, 4], "datatype": "INT64", "data": [0, 0, 0, 0]}},
            {{"name": "b", "shape": [1, 4], "datatype": "FP64", "data": {b}}},
            {{"name": "mask", "shape": [1, 4], "datatype": "BOOL", "data": [true, true, true, true]}}]}}"#
        )
    };
    let (status, body) =
        post_raw(&c, &typed, typed_body("[0, 1e400, 0, 0]").into_bytes(), &[]).await;
    expect((status, body.clone()), 400, "input 'b'");
    expect((status, body), 400, "out of range");
    expect(
        post_raw(
            &c,
            &typed,
            typed_body(r#"[0, "NaN", 0, 0]"#).into_bytes(),
            &[],
        )
        .await,
        400,
        "input 'b'",
    );

    let not_an_object = "the request body must be a JSON object with \"inputs\"";
    expect(
        post_raw(&c, &infer, b"[]".to_vec(), &[]).await,
        400,
        not_an_object,
    );
    let wrapped = serde_json::to_vec(&json!([mlp_request(&features(1, 1))])).unwrap();
    expect(post_raw(&c, &infer, wrapped, &[]).await, 400, not_an_object);
    expect(
        post_raw(&c, &infer, b" 42".to_vec(), &[]).await,
        400,
        not_an_object,
    );

    let x = features(3, 2);
    let ragged = json!([x[..256], x[256..511]]);
    expect(
        post(&c, &infer, &features_input(json!([2, 256]), "FP32", ragged)).await,
        400,
        "input 'features': data[1] has 255 elements, but shape [2, 256] needs 256 on axis 1",
    );
    let one_row = json!([x]);
    expect(
        post(
            &c,
            &infer,
            &features_input(json!([2, 256]), "FP32", one_row),
        )
        .await,
        400,
        "data[0] has at least 257 elements",
    );
    let transposed: Vec<Vec<f32>> = (0..256).map(|i| vec![x[i], x[256 + i]]).collect();
    expect(
        post(
            &c,
            &infer,
            &features_input(json!([2, 256]), "FP32", json!(transposed)),
        )
        .await,
        400,
        "data[0] has 2 elements, but shape [2, 256] needs 256 on axis 1",
    );
    let mut mixed: Vec<Value> = x[..511].iter().map(|v| json!(v)).collect();
    mixed.push(json!([x[511]]));
    expect(
        post(
            &c,
            &infer,
            &features_input(json!([2, 256]), "FP32", json!(mixed)),
        )
        .await,
        400,
        "data[511] is an array, but data[0] is a number",
    );
    // Flat and exactly nested data are both still accepted.
    let nested = json!([x[..256], x[256..]]);
    assert_eq!(
        post(&c, &infer, &features_input(json!([2, 256]), "FP32", nested))
            .await
            .0,
        200
    );
    assert_eq!(post(&c, &infer, &mlp_request(&x)).await.0, 200);
}

#[tokio::test]
async fn silero_metadata_declares_the_shapes_and_values_it_takes() {
    let url = bundled();
    let c = client();
    let (status, meta) = get(&c, &format!("{url}/v2/models/silero_vad")).await;
    assert_eq!(status, 200);
    assert_eq!(
        meta["inputs"][0],
        json!({"name": "input", "datatype": "FP32", "shape": [-1, 576]})
    );
    assert_eq!(
        meta["parameters"]["input_rules"],
        json!({"input": {"shapes": [[-1, 576], [-1, 288]], "paired_with": "sr"}, "sr": {"values": [16000, 8000]}})
    );
    assert_eq!(meta["parameters"]["allow_non_finite"], json!(false));
    // Triton's dims leave out the batch axis, wherever batch_axes puts it.
    let (status, config) = get(&c, &format!("{url}/v2/models/silero_vad/config")).await;
    assert_eq!(status, 200, "{config}");
    assert_eq!(config["input"][0]["dims"], json!([576]));
    assert_eq!(config["input"][1]["dims"], json!([2, 128]));
    assert_eq!(config["input"][2]["dims"], json!([]));
    // Models without declarations advertise the model's own shapes, as before.
    let (_, mlp) = get(&c, &format!("{url}/v2/models/mlp")).await;
    assert_eq!(mlp["parameters"]["input_rules"], json!({}));
}

#[tokio::test]
async fn silero_inputs_it_cannot_take_are_refused_up_front() {
    let url = bundled();
    let c = client();
    let infer = format!("{url}/v2/models/silero_vad/infer");
    let failures_before = counter(
        &metrics_text(&c, url).await,
        "streamserve_inference_failures_total",
        "silero_vad",
    );
    let cases = [
        (1, 16000, "input 'input' has shape [1, 1], but model 'silero_vad' takes [-1, 576] (with sr = 16000) or [-1, 288] (with sr = 8000)"),
        (100_000, 16000, "input 'input' has shape [1, 100000]"),
        (576, 12345, "input 'sr' must be one of 16000, 8000; got 12345"),
        (576, 8000, "with sr = 8000 it must be [-1, 288]"),
    ];
    for (samples, sr, needle) in cases {
        let (status, body) = post(&c, &infer, &vad_request(samples, sr)).await;
        expect((status, body.clone()), 400, needle);
        let message = body["error"].as_str().unwrap();
        assert!(
            !message.contains('\n') && !message.contains("Non-zero status"),
            "{message}"
        );
    }
    for (samples, sr) in [(576, 16000), (288, 8000)] {
        let (status, body) = post(&c, &infer, &vad_request(samples, sr)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["outputs"][0]["shape"], json!([1, 1]));
    }
    assert_unharmed(&c, url, "silero_vad", failures_before).await;
}

#[tokio::test]
async fn model_errors_caused_by_the_request_are_client_errors() {
    // Without the manifest's declarations the same requests reach ONNX Runtime, which
    // refuses them with INVALID_ARGUMENT: still a 400 with a one-line reason, not a failure
    // of the replica, and the good requests around them are served.
    let url = start(&undeclared_silero_dir("silero_raw"), |_| {});
    let c = client();
    let infer = format!("{url}/v2/models/silero_raw/infer");
    let mut tasks = Vec::new();
    for i in 0..60usize {
        let (c, infer) = (c.clone(), infer.clone());
        tasks.push(tokio::spawn(async move {
            let (samples, sr, good) = match i % 4 {
                0 | 2 => (576, 16000, true),
                1 => (1, 16000, false),
                _ if i % 8 == 3 => (100_000, 16000, false),
                _ => (576, 12345, false),
            };
            (good, post(&c, &infer, &vad_request(samples, sr)).await)
        }));
    }
    for task in tasks {
        let (good, (status, body)) = task.await.unwrap();
        if good {
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["outputs"][0]["shape"], json!([1, 1]));
        } else {
            expect(
                (status, body.clone()),
                400,
                "model 'silero_raw' cannot run this input: ",
            );
            let message = body["error"].as_str().unwrap();
            assert!(
                message.contains(" node: ")
                    && !message.contains('\n')
                    && !message.contains("Status Message"),
                "{message}"
            );
        }
    }
    assert_unharmed(&c, &url, "silero_raw", 0.0).await;
}

#[tokio::test]
async fn non_finite_outputs_are_spelt_out_not_null() {
    let url = bundled();
    let c = client();
    let infer = format!("{url}/v2/models/mlp/infer");
    // Finite, in range, and large enough that the model's arithmetic overflows to NaN.
    let huge = vec![1e38f32; 256];
    let (status, body) = post(&c, &infer, &mlp_request(&huge)).await;
    assert_eq!(status, 200, "{body}");
    for output in body["outputs"].as_array().unwrap() {
        let data = output["data"].as_array().unwrap();
        assert_eq!(data.len(), 16);
        assert!(data.iter().all(|v| v == "NaN"), "{output}");
    }
    let mut binary = mlp_request(&huge);
    binary["outputs"] = json!([{"name": "logits", "parameters": {"binary_data": true}}]);
    let response = c.post(&infer).json(&binary).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let json_len: usize = response.headers()["Inference-Header-Content-Length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let bytes = response.bytes().await.unwrap();
    let logits: Vec<f32> = bytes[json_len..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(logits.len(), 16);
    assert!(logits.iter().all(|v| v.is_nan()));
}

#[tokio::test]
async fn good_requests_are_unaffected_by_concurrent_bad_values() {
    let url = bundled();
    let c = client();
    let mlp = format!("{url}/v2/models/mlp/infer");
    let vad = format!("{url}/v2/models/silero_vad/infer");
    let (_, expected) = post(&c, &vad, &vad_request(576, 16000)).await;
    let failures_before = counter(
        &metrics_text(&c, url).await,
        "streamserve_inference_failures_total",
        "silero_vad",
    );
    let mut tasks = Vec::new();
    for i in 0..120u64 {
        let (c, mlp, vad) = (c.clone(), mlp.clone(), vad.clone());
        tasks.push(tokio::spawn(async move {
            let (good, url, body) = match i % 6 {
                0 => (Some("mlp"), mlp, mlp_request(&features(i, 1))),
                1 => (Some("vad"), vad, vad_request(576, 16000)),
                2 => (None, vad, vad_request(1, 16000)),
                3 => (None, vad, vad_request(576, 12345)),
                4 => {
                    let mut row: Vec<Value> =
                        features(i, 1).into_iter().map(|v| json!(v)).collect();
                    row[0] = json!(1e39);
                    (
                        None,
                        mlp,
                        features_input(json!([1, 256]), "FP32", json!(row)),
                    )
                }
                _ => {
                    let x = features(i, 2);
                    let ragged = json!([x[..256], x[256..300]]);
                    (None, mlp, features_input(json!([2, 256]), "FP32", ragged))
                }
            };
            let (status, response) = post(&c, &url, &body).await;
            (good, status, response)
        }));
    }
    let mut good = 0;
    for task in tasks {
        let (which, status, response) = task.await.unwrap();
        match which {
            Some(which) => {
                assert_eq!(status, 200, "{response}");
                if which == "vad" {
                    for name in ["output", "stateN"] {
                        assert_close(
                            &output_f32(&response, name),
                            &output_f32(&expected, name),
                            name,
                        );
                    }
                } else {
                    assert_eq!(response["outputs"][0]["shape"], json!([1, 16]));
                }
                good += 1;
            }
            None => assert_eq!(status, 400, "{response}"),
        }
    }
    assert_eq!(good, 40);
    assert_unharmed(&c, url, "silero_vad", failures_before).await;
}
