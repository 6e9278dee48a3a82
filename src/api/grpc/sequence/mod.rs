//! Speech streams over gRPC, with Triton's sequence conventions: on `ModelStreamInfer`, the
//! requests that carry `sequence_id` (`sequence_start` on the first, `sequence_end` on the
//! last) to a model that serves streams are the audio of one speech stream each, with its
//! state kept here (a `StreamSession`, as a WebSocket stream has: batched across streams,
//! checkpoints, resume, handover at a shutdown or when a version the stream runs on is
//! taken out of service). Each request is answered once, in order, with the results
//! its audio completed (`answer.rs`); the sequences of one call are independent and their
//! ids are the call's own, so a client cannot reach another call's stream by guessing an id.
//!
//! Per call, [`Sequences`] routes each step to its sequence's task, which owns the session's
//! connection and answers the step through a oneshot that the call's ordered queue awaits.
//! A refused `sequence_start` ends its task before its answer (the id is free at once) and
//! stops a stream it opened; a step's audio reaches the session tagged with the connection's
//! generation, so a call whose sequence another call resumed adds none. How a sequence
//! opens, resumes or finds its stream ended is `open.rs`.

mod answer;
mod open;
mod parse;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use actix_ws::CloseCode;
use futures_util::future::BoxFuture;
use prost::Message as _;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tonic::metadata::MetadataMap;

use super::convert;
use super::proto::inference::{InferParameter, ModelInferRequest, ModelStreamInferResponse};
use super::{draining, Stop};
use crate::actors::stream_session::{feed_from, EndFrom, FeedError, Flush, Flushed};
use crate::api::AppState;
use crate::manifest::StreamKind;
use crate::stream::idle::IdleTimer;
pub use answer::SEQUENCE_ID;
use answer::{mark_handover, Gathered, Taken, RETIRED, SEQUENCE_END, SEQUENCE_START};
use open::Live;
use parse::{audio_of, take_flags, SequenceKey};

/// Steps of one sequence queued behind the one being answered.
const QUEUED_STEPS: usize = 64;
/// Results a session may hand over between two steps (a resume replays up to the session's
/// 8,192 kept results at once).
const OUTGOING_CAPACITY: usize = 16384;
/// Longest a step waits for its audio's results, and a shutdown for a last checkpoint.
const STEP_WAIT: Duration = Duration::from_secs(60);
const HANDOVER_WAIT: Duration = Duration::from_secs(5);

/// Whether a request belongs to a sequence.
pub fn is_sequence(request: &ModelInferRequest) -> bool {
    [SEQUENCE_ID, SEQUENCE_START, SEQUENCE_END]
        .iter()
        .any(|key| request.parameters.contains_key(*key))
}

/// One request of a sequence, for its task.
struct Step {
    request: ModelInferRequest,
    start: bool,
    end: bool,
    answer: oneshot::Sender<ModelStreamInferResponse>,
}

/// The sequences of one `ModelStreamInfer` call.
pub struct Sequences {
    state: Arc<AppState>,
    stop: watch::Receiver<Stop>,
    metadata: Arc<MetadataMap>,
    peer: Option<IpAddr>,
    live: HashMap<SequenceKey, mpsc::Sender<Step>>,
    /// Each sequence's task; its output is its handover checkpoint, in a shutdown.
    tasks: JoinSet<Option<ModelStreamInferResponse>>,
}

/// Why a step of a sequence that this call does not hold is refused.
fn not_running(key: &SequenceKey) -> String {
    format!(
        "{key} is not running on this call (not started, or ended, failed or idle past \
         --stream-idle-secs): send sequence_start (with stream_id or resume to continue a \
         stream)"
    )
}

/// An answer that refuses a step, naming what it was for.
fn refused(
    request: &ModelInferRequest,
    sequence: Option<InferParameter>,
    message: String,
) -> ModelStreamInferResponse {
    let mut response = answer::Gathered::default().into_response(
        &request.model_name,
        &request.model_version,
        request.id.clone(),
        sequence.clone().unwrap_or_default(),
        false,
    );
    response.outputs.clear();
    if sequence.is_none() {
        response.parameters.remove(SEQUENCE_ID);
    }
    ModelStreamInferResponse {
        error_message: message,
        infer_response: Some(response),
    }
}

/// The answer to a step that was refused before it reached its sequence (the stream's memory
/// bound was full): it names the step's sequence, and the sequence is as it was.
pub fn refused_unread(request: &ModelInferRequest, message: String) -> ModelStreamInferResponse {
    refused(
        request,
        request.parameters.get(SEQUENCE_ID).cloned(),
        message,
    )
}

impl Sequences {
    pub fn new(
        state: Arc<AppState>,
        stop: watch::Receiver<Stop>,
        metadata: Arc<MetadataMap>,
        peer: Option<IpAddr>,
    ) -> Sequences {
        Sequences {
            state,
            stop,
            metadata,
            peer,
            live: HashMap::new(),
            tasks: JoinSet::new(),
        }
    }

    /// Hands a step to its sequence (starting it on `sequence_start`); the future is its
    /// answer. Called in the order the steps arrive, which is the order their audio is taken.
    pub fn route(
        &mut self,
        mut request: ModelInferRequest,
    ) -> BoxFuture<'static, ModelStreamInferResponse> {
        let flags = match take_flags(&mut request.parameters) {
            Ok(flags) => flags,
            Err(e) => return Box::pin(std::future::ready(refused(&request, None, e))),
        };
        let echo = Some(flags.echo.clone());
        // Sequences whose task is over (ended, failed, idle) are let go of.
        while self.tasks.try_join_next().is_some() {}
        self.live.retain(|_, steps| !steps.is_closed());
        if flags.start {
            if self.live.contains_key(&flags.key) {
                let message = format!(
                    "{} is running on this call: end it (sequence_end) before starting it again",
                    flags.key
                );
                return Box::pin(std::future::ready(refused(&request, echo, message)));
            }
            let (steps, queue) = mpsc::channel(QUEUED_STEPS);
            let task = SequenceTask {
                state: self.state.clone(),
                metadata: self.metadata.clone(),
                peer: self.peer,
                echo: flags.echo.clone(),
                model: request.model_name.clone(),
                version: request.model_version.clone(),
                kind: StreamKind::Vad,
                live: None,
                failed: None,
            };
            let idle = self.state.streams.idle_timeout;
            self.tasks.spawn(task.run(queue, self.stop.clone(), idle));
            self.live.insert(flags.key.clone(), steps);
        }
        let Some(steps) = self.live.get(&flags.key) else {
            let message = not_running(&flags.key);
            return Box::pin(std::future::ready(refused(&request, echo, message)));
        };
        let (answer, answered) = oneshot::channel();
        // What an answer that never comes names (the task ended with the step queued).
        let named = ModelInferRequest {
            model_name: request.model_name.clone(),
            model_version: request.model_version.clone(),
            id: request.id.clone(),
            ..Default::default()
        };
        let step = Step {
            request,
            start: flags.start,
            end: flags.end,
            answer,
        };
        let sent = steps.try_send(step);
        if flags.end {
            self.live.remove(&flags.key);
        }
        match sent {
            Ok(()) => {
                let key = flags.key;
                Box::pin(async move {
                    match answered.await {
                        Ok(answer) => answer,
                        Err(_) => refused(&named, echo, not_running(&key)),
                    }
                })
            }
            Err(mpsc::error::TrySendError::Full(step)) => {
                let message = format!("{}: more than {QUEUED_STEPS} steps queued", flags.key);
                Box::pin(std::future::ready(refused(&step.request, echo, message)))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                let message = not_running(&flags.key);
                Box::pin(std::future::ready(refused(&named, echo, message)))
            }
        }
    }

    /// The call is over (every step answered): sequences not ended wait for a resume (their
    /// sessions keep them for the resume window). In a shutdown, the answers nobody asked for
    /// come back: each sequence's last checkpoint, to send after every other answer.
    pub async fn finish(mut self) -> Vec<ModelStreamInferResponse> {
        self.live.clear();
        let mut handovers = Vec::new();
        let all = async {
            while let Some(done) = self.tasks.join_next().await {
                handovers.extend(done.ok().flatten());
            }
        };
        // Tasks past the deadline are aborted when the set drops.
        let _ = tokio::time::timeout(HANDOVER_WAIT + Duration::from_secs(1), all).await;
        handovers
    }
}

/// One sequence: its steps, in order.
struct SequenceTask {
    state: Arc<AppState>,
    metadata: Arc<MetadataMap>,
    peer: Option<IpAddr>,
    echo: InferParameter,
    model: String,
    version: String,
    /// What the stream's results are (known once it is open).
    kind: StreamKind,
    live: Option<Live>,
    /// Why the sequence cannot go on; every further step is answered with it.
    failed: Option<String>,
}

impl SequenceTask {
    /// Takes the sequence's steps in order until it ends, fails, sits idle past `idle` (its
    /// session then waits for a resume) or the server stops (its last checkpoint is then the
    /// task's output).
    async fn run(
        mut self,
        mut queue: mpsc::Receiver<Step>,
        stop: watch::Receiver<Stop>,
        idle: Duration,
    ) -> Option<ModelStreamInferResponse> {
        let stopping = draining(stop.clone());
        tokio::pin!(stopping);
        // Idle means no step since the task last began to wait for one.
        let mut idle = IdleTimer::new(idle);
        loop {
            tokio::select! {
                // A shutdown first, then a step already queued before the idle timer.
                biased;
                _ = &mut stopping => return self.stop_now(&mut queue).await,
                step = queue.recv() => match step {
                    // The call is over; in a shutdown (the call may see it first), hand over.
                    None if *stop.borrow() >= Stop::Draining => return self.stop_now(&mut queue).await,
                    None => return None,
                    Some(step) => {
                        let reply = self.step(step.request, step.start, step.end).await;
                        // A refused sequence_start leaves nothing: the id is free, and a
                        // stream the start opened is gone.
                        let refused_start = step.start && !reply.error_message.is_empty();
                        if refused_start && self.failed.is_none() {
                            self.failed = Some(reply.error_message.clone());
                        }
                        let over = step.end || self.failed.is_some();
                        if over {
                            // Before the answer: a new sequence_start of this id is then let
                            // in, and the key's stream place is back.
                            queue.close();
                            if let Some(live) = self.live.take() {
                                if refused_start {
                                    live.abandon().await;
                                }
                            }
                        }
                        let _ = step.answer.send(reply);
                        if over {
                            return None;
                        }
                        idle.touch();
                    }
                },
                _ = idle.expired() => {
                    tracing::info!(model = %self.model, "a gRPC sequence had no step within the idle time; it waits for a resume");
                    metrics::counter!("streamserve_stream_drops_total", "reason" => "idle").increment(1);
                    return None;
                }
            }
        }
    }

    /// In a shutdown: refuses the steps still queued, then hands the stream over.
    async fn stop_now(
        &mut self,
        queue: &mut mpsc::Receiver<Step>,
    ) -> Option<ModelStreamInferResponse> {
        queue.close();
        while let Ok(step) = queue.try_recv() {
            let message =
                "the server is shutting down; resume the sequence on another instance".to_string();
            let _ = step
                .answer
                .send(refused(&step.request, Some(self.echo.clone()), message));
        }
        self.last_checkpoint().await
    }

    /// A step's answer (a step that cannot be taken is refused, and the sequence goes on).
    async fn step(
        &mut self,
        mut request: ModelInferRequest,
        start: bool,
        end: bool,
    ) -> ModelStreamInferResponse {
        match self.take(&mut request, start, end).await {
            Ok((mut gathered, raw)) => {
                let mut error = gathered.error.take();
                // The stream was handed over under this step (a model version it runs on was
                // taken out of service): the answer carries its results and the handover
                // checkpoint, as a shutdown's does, and no error (Triton's client hides an
                // answer's outputs when it has one). The sequence is over; its later steps
                // are refused with the close's reason.
                let handover = gathered.handover;
                if handover {
                    self.failed = Some(error.take().unwrap_or_else(|| RETIRED.into()));
                }
                if let Some(reason) = &error {
                    self.failed = Some(reason.clone());
                }
                // The stream ended under a step that did not end it: a resume that took the
                // stream while the older call's `sequence_end` was being processed gets the
                // summary with its `sequence_start`. The sequence is over on this call, as
                // after a `sequence_end` (or a resume answered from the ended stream's tail).
                if gathered.summarized && !end && self.failed.is_none() {
                    gathered.ended = true;
                    self.failed = Some(open::ENDED.into());
                }
                if let Some(version) = gathered.version.clone() {
                    self.version = version;
                }
                let mut response = gathered.into_response(
                    &self.model,
                    &self.version,
                    std::mem::take(&mut request.id),
                    self.echo.clone(),
                    raw,
                );
                if let Some(reason) = self.failed.as_ref().filter(|_| handover) {
                    mark_handover(&mut response, Some(reason));
                }
                ModelStreamInferResponse {
                    error_message: error.unwrap_or_default(),
                    infer_response: Some(response),
                }
            }
            Err(message) => refused(&request, Some(self.echo.clone()), message),
        }
    }

    /// Takes a step's audio and gathers what it produced; `raw`: answer in raw bytes.
    async fn take(
        &mut self,
        request: &mut ModelInferRequest,
        start: bool,
        end: bool,
    ) -> Result<(Gathered, bool), String> {
        if let Some(reason) = &self.failed {
            return Err(reason.clone());
        }
        let format = match request.inputs.first().map(|input| input.datatype.as_str()) {
            Some("FP32") => "f32",
            _ => "pcm16",
        };
        // The options and the audio are checked before a start opens anything (a refused
        // start leaves nothing), and a later step's before it touches the stream.
        let options = answer::start_message(&request.parameters, start, format)?;
        // The message and its decoded audio count against the memory REST bodies share.
        let _memory = self
            .state
            .body_memory
            .hold(request.encoded_len())
            .map_err(|e| e.to_string())?;
        let decoded = convert::decode(request).map_err(|e| e.to_string())?;
        let samples = audio_of(decoded.inputs)?;
        if start {
            if let Some(ended) = self.open(request, options).await? {
                // Its stream ended here: the answer is what the call that lost its end missed.
                return Ok((ended, decoded.raw_output));
            }
        }
        let live = self
            .live
            .as_mut()
            .ok_or_else(|| "the sequence has no stream".to_string())?;
        let generation = live.attached.generation;
        let sent = samples.len();
        let mut taken = 0;
        if !samples.is_empty() {
            live.access
                .audio_samples(samples.len(), live.attached.sample_rate)
                .map_err(|e| e.to_string())?;
            // A stream a newer connection took over meanwhile drops the audio: the step is
            // then answered "superseded", having added nothing.
            let credits = &live.attached.credits;
            taken = match feed_from(&live.session, generation, credits, samples, STEP_WAIT).await {
                Ok(taken) => taken,
                // Handed over while it took the audio (its version was retired): the answer
                // carries the handover checkpoint the session sent before it stopped.
                Err(FeedError::Ended) => {
                    let mut gathered = Gathered::of(self.kind);
                    while let Ok(text) = live.messages.try_recv() {
                        gathered.add(&text);
                    }
                    if !gathered.handover {
                        return Err("the stream has ended".into());
                    }
                    gathered.error = live.close.try_recv().ok().map(|(_, reason)| reason);
                    return Ok((gathered, decoded.raw_output));
                }
                Err(FeedError::Stalled) => return Err("the stream took no audio for 60 s".into()),
            };
        }
        let mut gathered = Gathered::of(self.kind);
        // The session's answer to the step's flush or end (none: the end was not taken).
        let flushed: Option<Flushed>;
        if end {
            let (done, finished) = oneshot::channel();
            let done = Some(done);
            live.session.do_send(EndFrom { generation, done });
            // Everything up to the summary: the session then lets go of the connection,
            // or a resume took it over, and what this connection missed comes with `done`.
            let all = async {
                while let Some(text) = live.messages.recv().await {
                    gathered.add(&text);
                }
                finished.await.ok()
            };
            flushed = tokio::time::timeout(STEP_WAIT, all)
                .await
                .unwrap_or_else(|_| {
                    gathered.error = Some("the stream did not end within 60 s".into());
                    None
                });
        } else {
            let (answer, done) = oneshot::channel();
            live.session.do_send(Flush { generation, answer });
            let waited = tokio::time::timeout(STEP_WAIT, done).await;
            while let Ok(text) = live.messages.try_recv() {
                gathered.add(&text);
            }
            if waited.is_err() {
                gathered.error = Some("the stream's results did not come within 60 s".into());
            }
            flushed = waited.ok().and_then(Result::ok);
        }
        if live.closed.is_none() {
            live.closed = live.close.try_recv().ok();
        }
        let closed = live
            .closed
            .as_ref()
            .filter(|(code, _)| *code != CloseCode::Normal);
        let taken = Taken { sent, taken, end };
        gathered.settle(flushed, taken, closed.map(|(_, reason)| reason.as_str()));
        Ok((gathered, decoded.raw_output))
    }
}
