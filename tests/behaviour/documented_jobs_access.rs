//! What docs/access.md promises of a key's rows/s over gRPC, checked against the real server:
//! a request within the limit that comes too soon is RESOURCE_EXHAUSTED with `retry-after`,
//! and one of more rows than the limit ever lets through is INVALID_ARGUMENT, saying the most
//! there is (it had RESOURCE_EXHAUSTED with a `retry-after` of 60 s that no wait kept). The
//! REST side, and the counting of these refusals, are in tests/access_edges.rs (metrics).
//! And docs/jobs.md's predictions by key: a POST answered from the table keeps its
//! connection, as any answered request does.

use crate::common;

use common::jobs::manifest;
use common::*;
use streamserve::api::grpc::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use streamserve::api::grpc::proto::inference::model_infer_request::InferInputTensor;
use streamserve::api::grpc::proto::inference::ModelInferRequest;
use tonic::Code;

/// A `rows`-row request for `mlp`, carrying `key` as `authorization: Bearer <key>`.
fn rows_request(rows: usize, key: &str) -> tonic::Request<ModelInferRequest> {
    let data: Vec<u8> = features(1, rows)
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let mut request = tonic::Request::new(ModelInferRequest {
        model_name: "mlp".into(),
        inputs: vec![InferInputTensor {
            name: "features".into(),
            datatype: "FP32".into(),
            shape: vec![rows as i64, 256],
            ..Default::default()
        }],
        raw_input_contents: vec![data],
        ..Default::default()
    });
    let value = format!("Bearer {key}").parse().unwrap();
    request.metadata_mut().insert("authorization", value);
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_grpc_more_rows_than_a_key_ever_lets_through_is_invalid_argument() {
    let key = streamserve::access::keys::new_key().unwrap();
    let sha = hex::encode(streamserve::access::keys::hash(&key));
    let file = model_dir("").join("keys.toml");
    let entry = format!(
        "[[keys]]\nname = \"rows-4\"\nsha256 = \"{sha}\"\nmodels = [\"mlp\"]\nrows_per_sec = 4\n"
    );
    std::fs::write(&file, entry).unwrap();
    let running = start_running(&model_dir(&manifest()), |c| c.api_keys = Some(file));
    let endpoint = format!("http://{}", running.grpc_addr.expect("gRPC is on"));
    let channel = tonic::transport::Channel::from_shared(endpoint)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = GrpcInferenceServiceClient::new(channel);

    let never = grpc.model_infer(rows_request(8, &key)).await.unwrap_err();
    assert_eq!(never.code(), Code::InvalidArgument, "{never:?}");
    assert!(never.metadata().get("retry-after").is_none(), "{never:?}");
    assert!(
        never.message().contains("at most 4 rows per request"),
        "{never:?}"
    );
    // It took nothing from the key's rows: 4 pass, then the next is over the rate.
    grpc.model_infer(rows_request(4, &key)).await.unwrap();
    let soon = grpc.model_infer(rows_request(1, &key)).await.unwrap_err();
    assert_eq!(soon.code(), Code::ResourceExhausted, "{soon:?}");
    assert!(soon.metadata().get("retry-after").is_some(), "{soon:?}");
    running.shutdown().await;
}

/// A `POST` of a key the table holds is answered from the table, and its body (the inputs for
/// a miss) is read all the same: the connection stays open for the next request. The body
/// was left unread, so the server closed the connection after each hit, and a request
/// pipelined behind it went unanswered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_answered_from_the_table_keeps_its_connection() {
    use common::jobs::{finished, row, scratch, server, submit, wait_until, write_input};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dir = scratch("predictions-keep-alive");
    let running = server(&dir.join("jobs"));
    let url = format!("http://{}", running.addr);
    let c = client();
    let input = dir.join("in.jsonl");
    write_input(&input, 4);
    let job = serde_json::json!({"model": "mlp", "input": input,
                                 "output": dir.join("out.jsonl"), "publish": true});
    let (status, submitted) = submit(&c, &url, job).await;
    assert_eq!(status, 202, "{submitted}");
    let id = submitted["id"].as_str().unwrap();
    let done = wait_until(&c, &url, id, std::time::Duration::from_secs(30), finished).await;
    assert_eq!(done["state"], "succeeded", "{done}");

    let body = row(1).to_string();
    let one = format!(
        "POST /v2/models/mlp/predictions/row-1 HTTP/1.1\r\nHost: x\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut socket = tokio::net::TcpStream::connect(running.addr).await.unwrap();
    socket.write_all(one.repeat(2).as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let answers = |seen: &[u8]| {
        String::from_utf8_lossy(seen)
            .matches("HTTP/1.1 200")
            .count()
    };
    while answers(&seen) < 2 && std::time::Instant::now() < deadline {
        let read = tokio::time::timeout(std::time::Duration::from_secs(5), socket.read(&mut buf));
        match read.await {
            Ok(Ok(n)) if n > 0 => seen.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&seen).to_ascii_lowercase();
    assert_eq!(answers(&seen), 2, "both pipelined hits answered: {text}");
    assert_eq!(
        text.matches("x-prediction-source: table").count(),
        2,
        "{text}"
    );
    assert!(!text.contains("connection: close"), "{text}");
}
