//! Closed-loop gRPC load on streamserve's `inference.GRPCInferenceService` (the generated tonic
//! client of `streamserve::api::grpc::proto`), the same `mlp` request as the REST loop's:
//!
//! - [`run_unary`]: `concurrency` tasks, each calling `ModelInfer` (input in
//!   `raw_input_contents`) and the next as soon as the answer is in;
//! - [`run_stream`]: `ModelStreamInfer`, the `concurrency` requests in flight shared by
//!   ⌈concurrency / window⌉ bidirectional streams ([`stream_windows`]): each stream sends its
//!   window of requests, then one more for every answer (answers come in order, each checked
//!   against the id of the request it answers).
//!
//! Both spread their calls and streams over `connections` HTTP/2 connections (tonic channels),
//! count every answer as the REST loop does ([`tally::record`]) and return a [`RestReport`].

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures_util::future::BoxFuture;
use futures_util::stream::{BoxStream, StreamExt};
use streamserve::api::grpc::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use streamserve::api::grpc::proto::inference::infer_parameter::ParameterChoice;
use streamserve::api::grpc::proto::inference::model_infer_request::InferInputTensor;
use streamserve::api::grpc::proto::inference::{
    ModelInferRequest, ModelInferResponse, ModelStreamInferResponse,
};

use super::options::stream_windows;
use super::tally::{self, Failed, Period};
use crate::rest::{self, RestReport, ServerSide};
use crate::{mlp, SplitMix64};

/// The largest message either way: a request of 64 rows is 64 KiB; the answers are smaller.
const MAX_MESSAGE: usize = 16 << 20;

/// The first request data seed, as the REST loop's (task i sends seed + i).
const SEED: u64 = 0x5EED_0000;

/// One `ModelInfer` call.
type UnaryCall = Arc<
    dyn Fn(ModelInferRequest) -> BoxFuture<'static, Result<ModelInferResponse, Failed>>
        + Send
        + Sync,
>;
/// The answers of one `ModelStreamInfer` call.
type Answers = BoxStream<'static, Result<ModelStreamInferResponse, Failed>>;
/// Opens a `ModelStreamInfer` call that sends what the given requests yield.
type OpenStream =
    Arc<dyn Fn(Requests) -> BoxFuture<'static, Result<Answers, Failed>> + Send + Sync>;

/// The requests of one stream, as the load loop hands them over (a concrete stream type: a
/// boxed one keeps the compiler from proving the call's future `Send`).
struct Requests(tokio::sync::mpsc::UnboundedReceiver<ModelInferRequest>);

impl futures_util::Stream for Requests {
    type Item = ModelInferRequest;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<ModelInferRequest>> {
        self.0.poll_recv(cx)
    }
}

/// One HTTP/2 connection to the server, as its two kinds of call (the client's own types stay
/// inside [`connect`]).
struct Connection {
    unary: UnaryCall,
    open: OpenStream,
}

/// A failure a status stands for, by its code (`grpc Unavailable`).
macro_rules! status_failed {
    ($status:expr) => {{
        let status = $status;
        Failed::new(
            format!("grpc {:?}", status.code()),
            status.message().to_string(),
        )
    }};
}

/// Opens one connection to the gRPC listener at `addr` (loopback only).
async fn connect(addr: SocketAddr) -> anyhow::Result<Connection> {
    if !addr.ip().is_loopback() {
        bail!("refusing to send load to {addr}: only loopback addresses are allowed");
    }
    let client = GrpcInferenceServiceClient::connect(format!("http://{addr}"))
        .await
        .with_context(|| format!("cannot connect to the gRPC listener at {addr}"))?
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let unary_client = client.clone();
    let unary: UnaryCall = Arc::new(move |request| {
        let mut client = unary_client.clone();
        Box::pin(async move {
            match client.model_infer(request).await {
                Ok(response) => Ok(response.into_inner()),
                Err(status) => Err(status_failed!(status)),
            }
        })
    });
    let open: OpenStream = Arc::new(move |requests| {
        let mut client = client.clone();
        Box::pin(async move {
            let answers = match client.model_stream_infer(requests).await {
                Ok(response) => response.into_inner(),
                Err(status) => return Err(status_failed!(status)),
            };
            let answers: Answers =
                futures_util::stream::unfold(answers, |mut answers| async move {
                    let item = match answers.message().await {
                        Ok(Some(answer)) => Ok(answer),
                        Ok(None) => return None,
                        Err(status) => Err(status_failed!(status)),
                    };
                    Some((item, answers))
                })
                .boxed();
            Ok(answers)
        })
    });
    Ok(Connection { unary, open })
}

/// `mlp`'s request as REST sends it: `features` FP32 `[rows, 256]` of the same pseudo-random
/// numbers (from `seed`), here as raw little-endian bytes in `raw_input_contents` (so the
/// server answers in `raw_output_contents`).
pub fn mlp_request(rows: usize, seed: u64) -> ModelInferRequest {
    let values = SplitMix64::new(seed).f32_vec(rows * mlp::FEATURES);
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    ModelInferRequest {
        model_name: "mlp".into(),
        inputs: vec![InferInputTensor {
            name: mlp::INPUT.into(),
            datatype: "FP32".into(),
            shape: vec![rows as i64, mlp::FEATURES as i64],
            ..Default::default()
        }],
        raw_input_contents: vec![raw],
        ..Default::default()
    }
}

/// Checks an answer as the REST loop does: every output FP32 `[rows, 16]` with exactly that
/// much data, raw (`raw_output_contents`, one entry per output) or typed (`fp32_contents`).
/// Returns what the server says about how it served the request (its `parameters`).
pub fn check_response(answer: &ModelInferResponse, rows: usize) -> Result<ServerSide, String> {
    if answer.outputs.is_empty() {
        return Err("response has no outputs".into());
    }
    let raw = &answer.raw_output_contents;
    if !raw.is_empty() && raw.len() != answer.outputs.len() {
        return Err(format!(
            "{} raw_output_contents for {} outputs",
            raw.len(),
            answer.outputs.len()
        ));
    }
    let elements = rows * mlp::OUTPUT_WIDTH;
    let want = [rows as i64, mlp::OUTPUT_WIDTH as i64];
    for (i, out) in answer.outputs.iter().enumerate() {
        if out.shape != want {
            return Err(format!(
                "output '{}' has shape {:?}, expected {want:?}",
                out.name, out.shape
            ));
        }
        if out.datatype != "FP32" {
            return Err(format!(
                "output '{}' is {}, expected FP32",
                out.name, out.datatype
            ));
        }
        let typed = out.contents.as_ref().map_or(0, |c| c.fp32_contents.len());
        let got = match raw.get(i) {
            Some(bytes) if typed == 0 && bytes.len() == elements * 4 => continue,
            Some(bytes) if typed == 0 => format!("{} raw bytes", bytes.len()),
            Some(_) => "both raw and typed contents".into(),
            None if typed == elements => continue,
            None => format!("{typed} values"),
        };
        return Err(format!(
            "output '{}' has {got}, expected {elements} FP32 values",
            out.name
        ));
    }
    let int = |key: &str| match answer
        .parameters
        .get(key)
        .and_then(|p| p.parameter_choice.as_ref())
    {
        Some(ParameterChoice::Int64Param(n)) => u64::try_from(*n).unwrap_or(0),
        Some(ParameterChoice::Uint64Param(n)) => *n,
        _ => 0,
    };
    let degraded = matches!(
        answer
            .parameters
            .get("degraded")
            .and_then(|p| p.parameter_choice.as_ref()),
        Some(ParameterChoice::BoolParam(true))
    );
    Ok(ServerSide {
        batch_size: int("batch_size"),
        queue_us: int("queue_time_us"),
        compute_us: int("compute_time_us"),
        degraded: u64::from(degraded),
    })
}

/// Checks one answer of a stream: no `error_message`, an `infer_response` for the request
/// with id `id` (the one due next: answers come in order), and [`check_response`].
pub fn check_stream_answer(
    answer: &ModelStreamInferResponse,
    id: &str,
    rows: usize,
) -> Result<ServerSide, Failed> {
    if !answer.error_message.is_empty() {
        return Err(Failed::new(
            "stream error_message",
            answer.error_message.clone(),
        ));
    }
    let Some(response) = &answer.infer_response else {
        return Err(Failed::invalid("a stream answer without infer_response"));
    };
    if response.id != id {
        return Err(Failed::invalid(format!(
            "the answer for id {:?} came when {id:?} was due",
            response.id
        )));
    }
    check_response(response, rows).map_err(Failed::invalid)
}

/// One closed-loop gRPC run's settings.
#[derive(Clone, Debug)]
pub struct GrpcLoad {
    pub addr: SocketAddr,
    pub concurrency: usize,
    pub rows: usize,
    pub warmup: Duration,
    pub duration: Duration,
    /// HTTP/2 connections at most (never more than calls or streams).
    pub connections: usize,
    /// Requests in flight per stream at most ([`run_stream`]).
    pub stream_window: usize,
    pub request_timeout: Duration,
}

impl GrpcLoad {
    fn empty(&self) -> RestReport {
        let url = format!("grpc://{}", self.addr);
        RestReport::empty(&url, "mlp", self.concurrency, self.rows, true)
    }

    /// `n` connections, at most `self.connections`.
    async fn connect(&self, n: usize) -> anyhow::Result<Vec<Connection>> {
        let mut connections = Vec::new();
        for _ in 0..n.clamp(1, self.connections.max(1)) {
            connections.push(connect(self.addr).await?);
        }
        Ok(connections)
    }

    /// Waits for every task and merges their tallies, boundedly.
    async fn join(
        &self,
        tasks: tokio::task::JoinSet<RestReport>,
        period: Period,
    ) -> anyhow::Result<RestReport> {
        let mut all = self.empty();
        all.measured = self.duration;
        let deadline = period.end + 2 * self.request_timeout + Duration::from_secs(5);
        rest::join_tallies(tasks, &mut all, deadline, "gRPC load").await?;
        Ok(all)
    }
}

/// Closed-loop `ModelInfer` calls as `load` says. Must run inside a multi-threaded tokio
/// runtime; ends within warm-up + duration + one request timeout (or fails by its deadline).
pub async fn run_unary(load: &GrpcLoad) -> anyhow::Result<RestReport> {
    let connections = load.connect(load.concurrency).await?;
    let period = Period::after(load.warmup, load.duration);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..load.concurrency {
        let call = connections[i % connections.len()].unary.clone();
        let request = mlp_request(load.rows, SEED + i as u64);
        tasks.spawn(unary_task(call, request, load.clone(), period));
    }
    load.join(tasks, period).await
}

async fn unary_task(
    call: UnaryCall,
    request: ModelInferRequest,
    load: GrpcLoad,
    period: Period,
) -> RestReport {
    let mut stats = load.empty();
    while Instant::now() < period.end {
        let sent = Instant::now();
        let outcome = match tokio::time::timeout(load.request_timeout, call(request.clone())).await
        {
            Ok(Ok(answer)) => check_response(&answer, load.rows).map_err(Failed::invalid),
            Ok(Err(failed)) => Err(failed),
            Err(_) => Err(no_answer(load.request_timeout)),
        };
        // A refused connection and the like fail at once: do not spin.
        let pause = outcome
            .as_ref()
            .is_err_and(|f| f.kind != "invalid response");
        tally::record(&mut stats, period, (sent, Instant::now()), outcome);
        if pause {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    stats
}

fn no_answer(timeout: Duration) -> Failed {
    Failed::new(
        "transport",
        format!("no answer within {:.0} s", timeout.as_secs_f64()),
    )
}

/// Closed-loop `ModelStreamInfer` as `load` says: `load.concurrency` requests in flight over
/// [`stream_windows`] streams. Must run inside a multi-threaded tokio runtime.
pub async fn run_stream(load: &GrpcLoad) -> anyhow::Result<RestReport> {
    let windows = stream_windows(load.concurrency, load.stream_window);
    let connections = load.connect(windows.len()).await?;
    let period = Period::after(load.warmup, load.duration);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, window) in windows.into_iter().enumerate() {
        let open = connections[i % connections.len()].open.clone();
        let request = mlp_request(load.rows, SEED + i as u64);
        tasks.spawn(stream_task(open, request, window, load.clone(), period));
    }
    load.join(tasks, period).await
}

/// One stream's requests in flight: their ids and when each was handed to the client.
struct Stream {
    window: usize,
    request: ModelInferRequest,
    next_id: u64,
    in_flight: VecDeque<(String, Instant)>,
}

impl Stream {
    fn send(&mut self, tx: &tokio::sync::mpsc::UnboundedSender<ModelInferRequest>) {
        let mut request = self.request.clone();
        request.id = self.next_id.to_string();
        self.next_id += 1;
        self.in_flight
            .push_back((request.id.clone(), Instant::now()));
        // The receiver lives as long as the call; a call that ended fails below anyway.
        let _ = tx.send(request);
    }

    /// Every request still in flight fails as `failed` says.
    fn fail_all(&mut self, stats: &mut RestReport, period: Period, failed: Failed) {
        let now = Instant::now();
        for (_, sent) in self.in_flight.drain(..) {
            tally::record(stats, period, (sent, now), Err(failed.clone()));
        }
    }
}

/// Streams one after the other until the period ends: a stream that breaks fails what it had
/// in flight, and the next one starts after 10 ms.
async fn stream_task(
    open: OpenStream,
    request: ModelInferRequest,
    window: usize,
    load: GrpcLoad,
    period: Period,
) -> RestReport {
    let mut stats = load.empty();
    let mut stream = Stream {
        window,
        request,
        next_id: 0,
        in_flight: VecDeque::with_capacity(window),
    };
    while Instant::now() < period.end {
        if let Err(failed) = one_stream(&open, &mut stream, &load, &mut stats, period).await {
            stream.fail_all(&mut stats, period, failed);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    stats
}

/// One `ModelStreamInfer` call: the window sent, one request more per answer until the period
/// ends, then every answer awaited and the stream closed. `Err` when it broke.
async fn one_stream(
    open: &OpenStream,
    stream: &mut Stream,
    load: &GrpcLoad,
    stats: &mut RestReport,
    period: Period,
) -> Result<(), Failed> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<ModelInferRequest>();
    let requests = Requests(rx);
    // Queued before the call starts, so that the window goes out with it.
    for _ in 0..stream.window {
        stream.send(&tx);
    }
    let mut answers = match tokio::time::timeout(load.request_timeout, open(requests)).await {
        Ok(opened) => opened?,
        Err(_) => return Err(no_answer(load.request_timeout)),
    };
    while !stream.in_flight.is_empty() {
        let answer = match tokio::time::timeout(load.request_timeout, answers.next()).await {
            Ok(Some(answer)) => answer?,
            Ok(None) => {
                let detail = "the server ended the stream with requests unanswered";
                return Err(Failed::new("transport", detail));
            }
            Err(_) => return Err(no_answer(load.request_timeout)),
        };
        let done = Instant::now();
        let (id, sent) = stream
            .in_flight
            .pop_front()
            .expect("a request is in flight");
        let outcome = check_stream_answer(&answer, &id, load.rows);
        tally::record(stats, period, (sent, done), outcome);
        if done < period.end {
            stream.send(&tx);
        }
    }
    // The end of the requests; the server then ends its side: wait for that, briefly.
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(1), answers.next()).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use streamserve::api::grpc::proto::inference::model_infer_response::InferOutputTensor;
    use streamserve::api::grpc::proto::inference::{InferParameter, InferTensorContents};

    fn output(name: &str, shape: Vec<i64>, typed: Option<usize>) -> InferOutputTensor {
        InferOutputTensor {
            name: name.into(),
            datatype: "FP32".into(),
            shape,
            contents: typed.map(|n| InferTensorContents {
                fp32_contents: vec![0.5; n],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn raw_answer(rows: usize) -> ModelInferResponse {
        let shape = vec![rows as i64, 16];
        let int = |n| InferParameter {
            parameter_choice: Some(ParameterChoice::Int64Param(n)),
        };
        ModelInferResponse {
            model_name: "mlp".into(),
            outputs: vec![
                output("logits", shape.clone(), None),
                output("probabilities", shape, None),
            ],
            raw_output_contents: vec![vec![0; rows * 64], vec![0; rows * 64]],
            parameters: [
                ("batch_size".to_string(), int(5)),
                ("queue_time_us".to_string(), int(40)),
            ]
            .into_iter()
            .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn requests_carry_the_rest_loops_data_raw() {
        let r = mlp_request(2, 9);
        assert_eq!(r.model_name, "mlp");
        assert_eq!(r.inputs[0].shape, [2, 256]);
        assert_eq!(r.raw_input_contents[0].len(), 2 * 256 * 4);
        let rest = crate::rest::mlp_request(2, 9, true);
        let n = rest.json_length.unwrap();
        assert_eq!(
            &rest.body[n..],
            &r.raw_input_contents[0][..],
            "same bytes as REST binary"
        );
    }

    #[test]
    fn answers_are_checked() {
        let server = check_response(&raw_answer(1), 1).unwrap();
        assert_eq!(
            (server.batch_size, server.queue_us, server.compute_us),
            (5, 40, 0)
        );
        assert!(check_response(&raw_answer(1), 2)
            .unwrap_err()
            .contains("shape"));
        let mut short = raw_answer(1);
        short.raw_output_contents[1].pop();
        assert!(check_response(&short, 1)
            .unwrap_err()
            .contains("63 raw bytes"));
        let mut missing = raw_answer(1);
        missing.raw_output_contents.pop();
        assert!(check_response(&missing, 1).is_err());
        let typed = ModelInferResponse {
            outputs: vec![output("logits", vec![3, 16], Some(48))],
            ..Default::default()
        };
        assert!(check_response(&typed, 3).is_ok());
        let typed_short = ModelInferResponse {
            outputs: vec![output("logits", vec![3, 16], Some(47))],
            ..Default::default()
        };
        assert!(check_response(&typed_short, 3)
            .unwrap_err()
            .contains("47 values"));
        assert!(check_response(&ModelInferResponse::default(), 1).is_err());
    }

    #[test]
    fn stream_answers_must_come_in_order_and_without_error() {
        let mut answer = raw_answer(1);
        answer.id = "7".into();
        let ok = ModelStreamInferResponse {
            error_message: String::new(),
            infer_response: Some(answer),
        };
        assert!(check_stream_answer(&ok, "7", 1).is_ok());
        let wrong = check_stream_answer(&ok, "6", 1).unwrap_err();
        assert_eq!(wrong.kind, "invalid response");
        let error = ModelStreamInferResponse {
            error_message: "model mlp: overloaded".into(),
            infer_response: None,
        };
        assert_eq!(
            check_stream_answer(&error, "7", 1).unwrap_err().kind,
            "stream error_message"
        );
    }
}
