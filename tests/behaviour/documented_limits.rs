//! What docs/limits.md and the README promise a REST client, checked over real sockets against
//! the bundled models: here, that every inference answer, an error's too, carries the
//! request's id in `x-request-id` (the one given, or the generated one the access log names).

use crate::common;

use serde_json::{json, Value};

/// Status, `x-request-id` and JSON body of an inference POST with optional headers.
async fn infer(url: &str, body: Vec<u8>, headers: &[(&str, &str)]) -> (u16, Option<String>, Value) {
    let mut request = common::client().post(url).body(body);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let id = response
        .headers()
        .get("x-request-id")
        .map(|v| v.to_str().unwrap().to_string());
    let text = response.text().await.unwrap();
    (
        status,
        id,
        serde_json::from_str(&text).unwrap_or(Value::Null),
    )
}

/// A request that must fail: path, body, extra headers, and the status it gets.
type Case = (String, Vec<u8>, Vec<(&'static str, &'static str)>, u16);

#[tokio::test]
async fn error_answers_carry_the_request_id_as_answers_do() {
    let url = common::bundled();
    let typed_ops = format!("{url}/v2/models/typed_ops/infer");
    let given = [("x-request-id", "trace-4711")];
    // Each kind of error a client can meet before or after its model: a malformed body, a
    // wrong input, an unknown model or version, an unsupported encoding, a body too large.
    let cases: Vec<Case> = vec![
        (typed_ops.clone(), b"{".to_vec(), vec![], 400),
        (
            typed_ops.clone(),
            json!({"inputs": []}).to_string().into_bytes(),
            vec![],
            400,
        ),
        (
            format!("{url}/v2/models/no_such_model/infer"),
            b"{}".to_vec(),
            vec![],
            404,
        ),
        (
            format!("{url}/v2/models/typed_ops/versions/9/infer"),
            b"{}".to_vec(),
            vec![],
            404,
        ),
        (
            typed_ops.clone(),
            b"{}".to_vec(),
            vec![("content-encoding", "br")],
            415,
        ),
        (typed_ops.clone(), vec![b' '; 200_000], vec![], 413),
    ];
    for (path, body, mut headers, status) in cases {
        headers.extend(given);
        let (got, id, json) = infer(&path, body, &headers).await;
        assert_eq!(got, status, "{path}: {json}");
        assert!(json["error"].is_string(), "{path}: {json}");
        assert_eq!(
            id.as_deref(),
            Some("trace-4711"),
            "{path} ({status}): {json}"
        );
    }
    // Without an id of its own (or with one that is not visible ASCII), the error names the
    // generated one, as a success does.
    for headers in [vec![], vec![("x-request-id", "a b")]] {
        let (status, id, _) = infer(&typed_ops, b"{".to_vec(), &headers).await;
        assert_eq!(status, 400);
        let id = id.expect("a generated request id");
        assert!(
            id.len() >= 16 && id.bytes().all(|b| b.is_ascii_graphic()),
            "{id}"
        );
    }
    // A success still echoes it, cut to 128 characters.
    let long = "r".repeat(300);
    let ok = json!({"inputs": [
        {"name": "a", "shape": [1, 4], "datatype": "INT64", "data": [1, 2, 3, 4]},
        {"name": "b", "shape": [1, 4], "datatype": "FP64", "data": [0.5, -1, 0, 2]},
        {"name": "mask", "shape": [1, 4], "datatype": "BOOL", "data": [true, false, true, false]}
    ]});
    let (status, id, json) = infer(
        &typed_ops,
        ok.to_string().into_bytes(),
        &[("x-request-id", long.as_str())],
    )
    .await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(id.as_deref(), Some(&long[..128]));
}
