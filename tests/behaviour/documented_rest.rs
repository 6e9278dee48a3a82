//! What the README promises a KServe v2 REST client, and what Triton's protocol means by the
//! same words, checked over real sockets against the bundled models: deadlines (`x-timeout-ms`,
//! Triton's `timeout` parameter, where 0 means none), `outputs` (an empty list asks for every
//! output, as an absent one does) and the binary tensor data extension's
//! `Inference-Header-Content-Length` (an error that says when it is missing or wrong).

use crate::common;

use serde_json::{json, Value};

/// A valid typed_ops request (one row), with `extra` merged into its top level.
fn typed_ops(extra: Value) -> Value {
    let mut body = json!({"inputs": [
        {"name": "a", "shape": [1, 4], "datatype": "INT64", "data": [1, 2, 3, 4]},
        {"name": "b", "shape": [1, 4], "datatype": "FP64", "data": [0.5, -1, 0, 2]},
        {"name": "mask", "shape": [1, 4], "datatype": "BOOL", "data": [true, false, true, false]}
    ]});
    if let Value::Object(extra) = extra {
        body.as_object_mut().unwrap().extend(extra);
    }
    body
}

/// Status and JSON body of a typed_ops inference with extra headers.
async fn infer(body: Vec<u8>, headers: &[(&str, &str)]) -> (u16, Value) {
    let url = format!("{}/v2/models/typed_ops/infer", common::bundled());
    let mut request = common::client().post(url).body(body);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let json = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    (status, json)
}

fn error(answer: &(u16, Value)) -> &str {
    answer.1["error"].as_str().unwrap_or("")
}

#[tokio::test]
async fn x_timeout_ms_past_its_range_is_refused_with_the_range() {
    let body = serde_json::to_vec(&typed_ops(json!({}))).unwrap();
    // A whole number, only too large: the answer says so, and what the most is (it was "must
    // be a whole number of milliseconds", which it is).
    for large in ["99999999999999999999", "18446744073709551616"] {
        let answer = infer(body.clone(), &[("x-timeout-ms", large)]).await;
        assert_eq!(answer.0, 400, "{}", answer.1);
        let message = error(&answer);
        assert!(
            message.contains(&format!("{large} is too large"))
                && message.contains("from 0 to 18446744073709551615"),
            "{message}"
        );
    }
    // The most it takes is taken.
    let answer = infer(body.clone(), &[("x-timeout-ms", "18446744073709551615")]).await;
    assert_eq!(answer.0, 200, "{}", answer.1);
    for bad in ["soon", "-1", "1.5"] {
        let answer = infer(body.clone(), &[("x-timeout-ms", bad)]).await;
        assert_eq!(answer.0, 400, "{}", answer.1);
        assert!(
            error(&answer).contains(&format!("'{bad}' is not one")),
            "{}",
            answer.1
        );
    }
}

#[tokio::test]
async fn triton_timeout_zero_is_no_timeout() {
    // Triton: "The default is 0 which indicates that the request has no timeout";
    // tritonclient sends `timeout=0` as it is. It was a deadline already passed: 504, never run.
    let body = typed_ops(json!({"parameters": {"timeout": 0}}));
    let answer = infer(serde_json::to_vec(&body).unwrap(), &[]).await;
    assert_eq!(answer.0, 200, "{}", answer.1);
    // Out of range: refused, saying the range.
    let body = br#"{"parameters":{"timeout":99999999999999999999},"inputs":[]}"#.to_vec();
    let answer = infer(body, &[]).await;
    assert_eq!(answer.0, 400, "{}", answer.1);
    assert!(
        error(&answer).contains("from 0 (none) to 18446744073709551615"),
        "{}",
        answer.1
    );
}

#[tokio::test]
async fn an_empty_outputs_list_returns_every_output() {
    // As an absent `outputs` (and as gRPC and Triton read it): it ran the model and answered
    // `"outputs": []`.
    let body = typed_ops(json!({"outputs": []}));
    let answer = infer(serde_json::to_vec(&body).unwrap(), &[]).await;
    assert_eq!(answer.0, 200, "{}", answer.1);
    let names: Vec<&str> = answer.1["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["sum", "masked", "positive", "masked_i32"]);
    assert_eq!(answer.1["outputs"][0]["data"], json!([1.5, 1.0, 3.0, 6.0]));
}

#[tokio::test]
async fn binary_data_without_a_right_header_length_names_the_header() {
    let json = serde_json::to_vec(&json!({"inputs": [
        {"name": "a", "shape": [1, 4], "datatype": "INT64", "parameters": {"binary_data_size": 32}},
        {"name": "b", "shape": [1, 4], "datatype": "FP64", "data": [0.5, -1, 0, 2]},
        {"name": "mask", "shape": [1, 4], "datatype": "BOOL", "data": [true, false, true, false]}
    ]}))
    .unwrap();
    let mut body = json.clone();
    for x in [1i64, 2, 3, 4] {
        body.extend_from_slice(&x.to_le_bytes());
    }
    let length = json.len().to_string();
    let answer = infer(
        body.clone(),
        &[("Inference-Header-Content-Length", &length)],
    )
    .await;
    assert_eq!(answer.0, 200, "{}", answer.1);
    // The header forgotten: the binary bytes were "trailing characters at line 1 column 318".
    let answer = infer(body.clone(), &[]).await;
    assert_eq!(answer.0, 400, "{}", answer.1);
    assert!(
        error(&answer).contains("needs the Inference-Header-Content-Length header"),
        "{}",
        answer.1
    );
    // The binary part forgotten too.
    let answer = infer(json.clone(), &[]).await;
    assert_eq!(answer.0, 400, "{}", answer.1);
    assert!(
        error(&answer).contains("no Inference-Header-Content-Length header"),
        "{}",
        answer.1
    );
    // The header short of the JSON, or past it: the JSON is cut there, and the answer says so.
    for n in [10, json.len() + 3] {
        let n = n.to_string();
        let answer = infer(body.clone(), &[("Inference-Header-Content-Length", &n)]).await;
        assert_eq!(answer.0, 400, "{}", answer.1);
        assert!(
            error(&answer).contains(&format!(
                "cut at Inference-Header-Content-Length = {n} bytes"
            )),
            "{}",
            answer.1
        );
    }
}
