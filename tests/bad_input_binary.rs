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
