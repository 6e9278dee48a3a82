//! A Rust client of streamserve's gRPC API (the Open Inference Protocol, `inference.
//! GRPCInferenceService`), with the client code this crate generates from the vendored protos:
//! checks the server is ready, reads the model's metadata, sends one `mlp` inference with raw
//! (little-endian) FP32 contents and prints the answer.
//!
//!     cargo run --release --example grpc_infer                        # 127.0.0.1:8081, mlp
//!     cargo run --release --example grpc_infer -- http://host:8081 mlp_small
//!
//! Another Rust project gets the same client by compiling `proto/` with `tonic-prost-build`
//! (as `build.rs` here does), or can use any gRPC client with `proto/inference/grpc_service.proto`.

use std::time::Duration;

use streamserve::api::grpc::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use streamserve::api::grpc::proto::inference::model_infer_request::InferInputTensor;
use streamserve::api::grpc::proto::inference::{
    ModelInferRequest, ModelMetadataRequest, ServerReadyRequest,
};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let endpoint = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:8081".into());
    let model = args.next().unwrap_or_else(|| "mlp".into());

    let channel = tonic::transport::Channel::from_shared(endpoint.clone())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {endpoint}: {e}"))?;
    let mut client = GrpcInferenceServiceClient::new(channel);

    let ready = client
        .server_ready(ServerReadyRequest {})
        .await?
        .into_inner();
    println!("server ready: {}", ready.ready);
    let metadata = client
        .model_metadata(ModelMetadataRequest {
            name: model.clone(),
            version: String::new(),
        })
        .await?
        .into_inner();
    for input in &metadata.inputs {
        println!("input  {} {} {:?}", input.name, input.datatype, input.shape);
    }

    // One row of 256 features, the `mlp` interface (FP32 [rows, 256] -> [rows, 16]).
    let features: Vec<f32> = (0..256).map(|i| (i as f32 / 256.0) - 0.5).collect();
    let request = ModelInferRequest {
        model_name: model,
        id: "grpc-example-1".into(),
        inputs: vec![InferInputTensor {
            name: "features".into(),
            datatype: "FP32".into(),
            shape: vec![1, 256],
            ..Default::default()
        }],
        raw_input_contents: vec![features.iter().flat_map(|v| v.to_le_bytes()).collect()],
        ..Default::default()
    };
    let answer = match client.model_infer(request).await {
        Ok(answer) => answer.into_inner(),
        Err(status) => {
            // 429-equivalents (a full queue, the door's admission limit) come as
            // RESOURCE_EXHAUSTED with `retry-after` metadata.
            let retry = status
                .metadata()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string();
            return Err(format!(
                "inference failed: {:?}: {} (retry-after: {retry})",
                status.code(),
                status.message()
            )
            .into());
        }
    };
    println!(
        "answer {} from {} version {}",
        answer.id, answer.model_name, answer.model_version
    );
    for (output, raw) in answer.outputs.iter().zip(&answer.raw_output_contents) {
        let values: Vec<f32> = raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let best = values
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, v)| format!("class {i} ({v:.4})"))
            .unwrap_or_default();
        println!(
            "output {} {} {:?}: highest {best}",
            output.name, output.datatype, output.shape
        );
    }
    Ok(())
}
