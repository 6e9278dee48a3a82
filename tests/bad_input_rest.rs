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

    // A small body that inflates past the limit is refused, not inflated without bound.
    let bomb = gzip(&vec![b' '; 10 * 1024 * 1024]);
    assert!(bomb.len() < 64 * 1024);
    expect(
        post_raw(&c, &infer, bomb, &[("Content-Encoding", "gzip".into())]).await,
        413,
        "exceeds the limit",
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
