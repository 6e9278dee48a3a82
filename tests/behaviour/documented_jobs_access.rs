//! What docs/access.md promises of a key's rows/s over gRPC, checked against the real server:
//! a request within the limit that comes too soon is RESOURCE_EXHAUSTED with `retry-after`,
//! and one of more rows than the limit ever lets through is INVALID_ARGUMENT, saying the most
//! there is (it had RESOURCE_EXHAUSTED with a `retry-after` of 60 s that no wait kept). The
//! REST side, and the counting of these refusals, are in tests/access_edges.rs (metrics).

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
