//! A gRPC client for speech sequences in tests: Triton's sequence conventions on
//! `ModelStreamInfer` (`sequence_id`, `sequence_start`, `sequence_end`), a step's request and
//! the typed outputs and parameters of its answer.

use std::collections::HashMap;
use std::time::Duration;

use streamserve::api::grpc::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use streamserve::api::grpc::proto::inference::infer_parameter::ParameterChoice;
use streamserve::api::grpc::proto::inference::model_infer_request::InferInputTensor;
use streamserve::api::grpc::proto::inference::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Streaming;

pub type Client = GrpcInferenceServiceClient<Channel>;

pub async fn grpc_client(running: &streamserve::server::Running) -> Client {
    let endpoint = format!("http://{}", running.grpc_addr.unwrap());
    let channel = Channel::from_shared(endpoint)
        .unwrap()
        .connect()
        .await
        .unwrap();
    GrpcInferenceServiceClient::new(channel)
}

/// A call: its request sender and its answers.
pub async fn call(
    c: &mut Client,
) -> (
    mpsc::Sender<ModelInferRequest>,
    Streaming<ModelStreamInferResponse>,
) {
    let (tx, rx) = mpsc::channel(64);
    let answers = c
        .model_stream_infer(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, answers)
}

pub fn p(choice: ParameterChoice) -> InferParameter {
    InferParameter {
        parameter_choice: Some(choice),
    }
}

/// The audio a step carries.
pub enum Samples<'a> {
    None,
    /// INT16 PCM, in raw contents.
    Pcm(&'a [i16]),
    /// FP32 in [-1, 1], in typed contents.
    Float(&'a [f32]),
}

/// One step of sequence `id` on `model`, with extra `parameters`.
pub fn step_on(
    model: &str,
    id: i64,
    start: bool,
    end: bool,
    audio: Samples,
    parameters: &[(&str, ParameterChoice)],
) -> ModelInferRequest {
    let mut request = ModelInferRequest {
        model_name: model.into(),
        id: format!("{id}-{start}-{end}"),
        ..Default::default()
    };
    request
        .parameters
        .insert("sequence_id".into(), p(ParameterChoice::Int64Param(id)));
    request.parameters.insert(
        "sequence_start".into(),
        p(ParameterChoice::BoolParam(start)),
    );
    request
        .parameters
        .insert("sequence_end".into(), p(ParameterChoice::BoolParam(end)));
    for (key, value) in parameters {
        request.parameters.insert(key.to_string(), p(value.clone()));
    }
    let input = |datatype: &str, n: usize, contents| InferInputTensor {
        name: "AUDIO".into(),
        datatype: datatype.into(),
        shape: vec![n as i64],
        parameters: HashMap::new(),
        contents,
    };
    match audio {
        Samples::None => {}
        Samples::Pcm(pcm) => {
            request.inputs.push(input("INT16", pcm.len(), None));
            request
                .raw_input_contents
                .push(pcm.iter().flat_map(|s| s.to_le_bytes()).collect());
        }
        Samples::Float(samples) => {
            let contents = InferTensorContents {
                fp32_contents: samples.to_vec(),
                ..Default::default()
            };
            request
                .inputs
                .push(input("FP32", samples.len(), Some(contents)));
        }
    }
    request
}

pub fn output<'a>(response: &'a ModelInferResponse, name: &str) -> (usize, &'a [u8]) {
    let at = response
        .outputs
        .iter()
        .position(|o| o.name == name)
        .unwrap_or_else(|| panic!("no output '{name}'"));
    let bytes = response
        .raw_output_contents
        .get(at)
        .map_or(&[][..], Vec::as_slice);
    (at, bytes)
}

pub fn f64s(response: &ModelInferResponse, name: &str) -> Vec<f64> {
    let (at, bytes) = output(response, name);
    if response.raw_output_contents.is_empty() {
        return response.outputs[at].contents.clone().unwrap().fp64_contents;
    }
    bytes
        .chunks_exact(8)
        .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

pub fn f32s(response: &ModelInferResponse, name: &str) -> Vec<f32> {
    let (at, bytes) = output(response, name);
    if response.raw_output_contents.is_empty() {
        return response.outputs[at].contents.clone().unwrap().fp32_contents;
    }
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

pub fn u64s(response: &ModelInferResponse, name: &str) -> Vec<u64> {
    let (at, bytes) = output(response, name);
    if response.raw_output_contents.is_empty() {
        return response.outputs[at]
            .contents
            .clone()
            .unwrap()
            .uint64_contents;
    }
    bytes
        .chunks_exact(8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

pub fn int(response: &ModelInferResponse, key: &str) -> i64 {
    match response.parameters[key].parameter_choice.clone().unwrap() {
        ParameterChoice::Int64Param(n) => n,
        other => panic!("{key}: {other:?}"),
    }
}

pub fn text(response: &ModelInferResponse, key: &str) -> String {
    match response.parameters[key].parameter_choice.clone().unwrap() {
        ParameterChoice::StringParam(s) => s,
        other => panic!("{key}: {other:?}"),
    }
}

pub async fn answer(answers: &mut Streaming<ModelStreamInferResponse>) -> ModelStreamInferResponse {
    tokio::time::timeout(Duration::from_secs(30), answers.message())
        .await
        .expect("an answer within 30 s")
        .unwrap()
        .expect("the call goes on")
}

/// An answer that must be a success; its response.
pub async fn ok(answers: &mut Streaming<ModelStreamInferResponse>) -> ModelInferResponse {
    let a = answer(answers).await;
    assert_eq!(a.error_message, "", "{a:?}");
    a.infer_response.unwrap()
}
