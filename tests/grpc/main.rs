//! The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`), `grpc.health.v1`
//! and server reflection, with a tonic client over a real socket against the real server on
//! the bundled models. Answers are checked against REST's for the same input: the two
//! protocols share every step after decoding.

#[path = "../common/mod.rs"]
mod common;

mod bad_input;
mod documented;
mod inference;
mod metadata;
mod streams;

use std::collections::HashMap;
use std::sync::OnceLock;

use common::*;
use streamserve::api::grpc::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use streamserve::api::grpc::proto::inference::infer_parameter::ParameterChoice;
use streamserve::api::grpc::proto::inference::model_infer_request::InferInputTensor;
use streamserve::api::grpc::proto::inference::*;
use tonic::transport::Channel;
use tonic::Code;

type Client = GrpcInferenceServiceClient<Channel>;

/// The bundled server's HTTP base URL and gRPC endpoint.
fn server() -> &'static (String, String) {
    static SERVER: OnceLock<(String, String)> = OnceLock::new();
    SERVER.get_or_init(|| {
        let running = start_running(&repo().join("models"), |_| {});
        let grpc = running.grpc_addr.expect("gRPC is on by default");
        (format!("http://{}", running.addr), format!("http://{grpc}"))
    })
}

async fn connect(endpoint: &str) -> Channel {
    Channel::from_shared(endpoint.to_string())
        .unwrap()
        .connect()
        .await
        .expect("gRPC connects")
}

async fn grpc() -> Client {
    GrpcInferenceServiceClient::new(connect(&server().1).await)
}

fn raw_f32(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn tensor(
    name: &str,
    datatype: &str,
    shape: &[i64],
    contents: Option<InferTensorContents>,
) -> InferInputTensor {
    InferInputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape: shape.to_vec(),
        parameters: HashMap::new(),
        contents,
    }
}

/// An mlp request for `x` (rows of 256) in raw contents.
fn mlp_raw(x: &[f32]) -> ModelInferRequest {
    ModelInferRequest {
        model_name: "mlp".into(),
        inputs: vec![tensor(
            "features",
            "FP32",
            &[x.len() as i64 / 256, 256],
            None,
        )],
        raw_input_contents: vec![raw_f32(x)],
        ..Default::default()
    }
}

/// The same in typed contents.
fn mlp_typed(x: &[f32]) -> ModelInferRequest {
    let contents = InferTensorContents {
        fp32_contents: x.to_vec(),
        ..Default::default()
    };
    ModelInferRequest {
        model_name: "mlp".into(),
        inputs: vec![tensor(
            "features",
            "FP32",
            &[x.len() as i64 / 256, 256],
            Some(contents),
        )],
        ..Default::default()
    }
}

/// REST's answer for the same features: output name -> values.
async fn rest_mlp(x: &[f32]) -> HashMap<String, Vec<f32>> {
    let (status, body) = post(
        &client(),
        &format!("{}/v2/models/mlp/infer", server().0),
        &mlp_request(x),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    ["logits", "probabilities"]
        .into_iter()
        .map(|name| (name.to_string(), output_f32(&body, name)))
        .collect()
}

fn param(response: &ModelInferResponse, key: &str) -> ParameterChoice {
    response.parameters[key].parameter_choice.clone().unwrap()
}

/// The status of a call that must fail, with its message containing `needle`.
fn expect_status<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, needle: &str) {
    let status = result.expect_err("the call must fail");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "'{}' lacks '{needle}'",
        status.message()
    );
}
