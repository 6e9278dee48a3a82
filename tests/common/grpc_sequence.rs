//! A gRPC client for speech sequences in tests: Triton's sequence conventions on
//! `ModelStreamInfer` (`sequence_id`, `sequence_start`, `sequence_end`), a step's request and
//! the typed outputs and parameters of its answer, and a sequence's results gathered to
//! compare with another's or a WebSocket stream's.

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

use super::stream_client::{fixture_pcm16, stream_resumable, Ended, Run};

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
    call_with(c, None).await
}

async fn call_with(
    c: &mut Client,
    key: Option<&str>,
) -> (
    mpsc::Sender<ModelInferRequest>,
    Streaming<ModelStreamInferResponse>,
) {
    let (tx, rx) = mpsc::channel(64);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(key) = key {
        let bearer = format!("Bearer {key}").parse().unwrap();
        request.metadata_mut().insert("authorization", bearer);
    }
    let answers = c.model_stream_infer(request).await.unwrap().into_inner();
    (tx, answers)
}

/// A call for tests that take its steps one at a time: each sent, then its answer awaited.
pub struct Call {
    pub tx: mpsc::Sender<ModelInferRequest>,
    pub answers: Streaming<ModelStreamInferResponse>,
}

impl Call {
    /// A call, made with API key `key` if there is one.
    pub async fn open(c: &mut Client, key: Option<&str>) -> Call {
        let (tx, answers) = call_with(c, key).await;
        Call { tx, answers }
    }

    /// Sends `request` and waits for its answer.
    pub async fn ask(&mut self, request: ModelInferRequest) -> ModelStreamInferResponse {
        self.tx.send(request).await.unwrap();
        answer(&mut self.answers).await
    }

    /// [`ask`](Self::ask), for an answer that must be a success; its response.
    pub async fn ok(&mut self, request: ModelInferRequest) -> ModelInferResponse {
        let a = self.ask(request).await;
        assert_eq!(a.error_message, "", "{a:?}");
        a.infer_response.unwrap()
    }

    /// [`ask`](Self::ask), for an answer that must be an error containing `needle`.
    pub async fn refused(&mut self, request: ModelInferRequest, needle: &str) {
        let a = self.ask(request).await;
        assert!(a.error_message.contains(needle), "'{needle}' not in {a:?}");
    }
}

/// A stream with checkpoints on `silero_vad`, sequence 1 of a new call to `c` (left open):
/// `pcm` in steps of 4000 samples.
pub struct Checkpointed {
    pub stream_id: String,
    pub last_seq: i64,
    /// The newest checkpoint's token and its `checkpoint_samples`.
    pub token: String,
    pub samples: usize,
    pub call: Call,
}

pub async fn checkpointed(c: &mut Client, pcm: &[i16]) -> Checkpointed {
    let mut call = Call::open(c, None).await;
    let checkpoints = [("checkpoints", ParameterChoice::BoolParam(true))];
    let (mut stream_id, mut token, mut samples, mut last_seq) = (String::new(), None, 0, 0);
    for (i, chunk) in pcm.chunks(4000).enumerate() {
        let options: &[_] = if i == 0 { &checkpoints } else { &[] };
        let audio = Samples::Pcm(chunk);
        let r = call.ok(step(1, i == 0, false, audio, options)).await;
        if i == 0 {
            stream_id = text(&r, "stream_id");
        }
        last_seq = int(&r, "last_seq");
        if r.parameters.contains_key("checkpoint") {
            token = Some(text(&r, "checkpoint"));
            samples = int(&r, "checkpoint_samples") as usize;
        }
    }
    let token = token.expect("a checkpoint");
    Checkpointed {
        stream_id,
        last_seq,
        token,
        samples,
        call,
    }
}

/// A keys file (`--api-keys`) with one key, of `limits` (TOML lines); its path and the key.
pub fn api_key(limits: &str) -> (std::path::PathBuf, String) {
    let key = streamserve::access::keys::new_key().unwrap();
    let sha = hex::encode(streamserve::access::keys::hash(&key));
    let path = super::fleet::temp_dir("grpc-api-keys").join("keys.toml");
    let entry = format!("[[keys]]\nname = \"test\"\nsha256 = \"{sha}\"\n{limits}\n");
    std::fs::write(&path, entry).unwrap();
    (path, key)
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

/// The fleet's stream token keys (`--stream-token-keys`), in a file.
pub fn keys_file() -> std::path::PathBuf {
    let path = super::fleet::temp_dir("grpc-stream-keys").join("keys");
    std::fs::write(&path, "a-fleet-wide-stream-token-key-for-grpc-sequences\n").unwrap();
    path
}

/// One step of sequence `id` on silero_vad, with extra `parameters`.
pub fn step(
    id: i64,
    start: bool,
    end: bool,
    audio: Samples,
    parameters: &[(&str, ParameterChoice)],
) -> ModelInferRequest {
    step_on("silero_vad", id, start, end, audio, parameters)
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

/// Whether the bool parameter `key` is there and true.
pub fn flag(response: &ModelInferResponse, key: &str) -> bool {
    matches!(
        response
            .parameters
            .get(key)
            .and_then(|p| p.parameter_choice.clone()),
        Some(ParameterChoice::BoolParam(true))
    )
}

pub fn real(response: &ModelInferResponse, key: &str) -> f64 {
    match response.parameters[key].parameter_choice.clone().unwrap() {
        ParameterChoice::DoubleParam(x) => x,
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

/// What a sequence gave, gathered over its answers.
#[derive(Debug, Default, PartialEq)]
pub struct Results {
    /// (seq, t, probability) of every chunk.
    pub vad: Vec<(u64, f64, f32)>,
    pub speech_start: Vec<f64>,
    pub speech_end: Vec<f64>,
    pub segments: Vec<f64>,
}

impl Results {
    pub fn add(&mut self, r: &ModelInferResponse) {
        let (seq, t, probability) = (u64s(r, "seq"), f64s(r, "t"), f32s(r, "probability"));
        assert!(seq.len() == t.len() && t.len() == probability.len());
        for i in 0..seq.len() {
            self.vad.push((seq[i], t[i], probability[i]));
        }
        self.speech_start.extend(f64s(r, "speech_start"));
        self.speech_end.extend(f64s(r, "speech_end"));
        if r.outputs.iter().any(|o| o.name == "segments") {
            self.segments = f64s(r, "segments");
        }
    }

    /// The same from a WebSocket stream's messages.
    pub fn of_websocket(run: &Run) -> Results {
        let mut results = Results::default();
        for m in &run.results {
            let t = m["t"].as_f64();
            match m["type"].as_str().unwrap() {
                "vad" => results.vad.push((
                    m["seq"].as_u64().unwrap(),
                    t.unwrap(),
                    m["probability"].as_f64().unwrap() as f32,
                )),
                "speech_start" => results.speech_start.push(t.unwrap()),
                "speech_end" => results.speech_end.push(t.unwrap()),
                "summary" => {
                    for s in m["segments"].as_array().unwrap() {
                        results.segments.push(s["start"].as_f64().unwrap());
                        results.segments.push(s["end"].as_f64().unwrap());
                    }
                }
                _ => {}
            }
        }
        results
    }
}

pub fn fixture() -> (Vec<i16>, u32) {
    let (bytes, rate) = fixture_pcm16("two_phrases_16k");
    let pcm = bytes
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect();
    (pcm, rate)
}

/// The WebSocket stream's results for the fixture, on `running`.
pub async fn websocket_reference(running: &streamserve::server::Running) -> Results {
    let (bytes, rate) = fixture_pcm16("two_phrases_16k");
    let url = format!("http://{}", running.addr);
    let run = stream_resumable(&[url], &bytes, rate, 2048, Duration::ZERO, 0).await;
    assert!(matches!(run.ends[..], [Ended::Done]), "{:?}", run.ends);
    Results::of_websocket(&run)
}
