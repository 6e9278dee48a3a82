//! `StreamSession`: one actor per speech stream. It owns everything a stream needs between
//! steps: the model's recurrent state and audio context, audio not yet stepped, the voice
//! activity tracker, and the recent results a reconnecting client may have missed.
//!
//! Each step goes through the model's router like any request, so the steps of many streams
//! are batched into one model call (the state's batch axis). A stream has at most one step in
//! flight, because each step needs the state the previous one produced.
//!
//! The session outlives its WebSocket: when the connection drops it waits `resume_window` for
//! the client to come back with its stream id and last seen `seq`, then replays what the client
//! missed and carries on with the state intact (`attach.rs`). It also sends the client a signed checkpoint
//! every `checkpoint_samples` of audio, and one last one when the server shuts down
//! ([`checkpoint`]), from which any instance of the fleet can take the stream over.

mod attach;
mod checkpoint;
mod flush;

pub use checkpoint::{Handover, Progress, Retire, ServedBy};
pub use flush::{feed, FeedError, Flush};

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_ws::CloseCode;
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::catalog::ServedModel;
use super::served::InferOptions;
use crate::error::ServeError;
use crate::model::{InferRequest, InferResponse};
use crate::stream::audio::SampleFormat;
use crate::stream::checkpoint::TokenKeys;
use crate::stream::protocol::{ResultsMode, SegmentSecs, ServerMessage};
use crate::stream::vad::{window_for, VadEvent, VadInterface, VadOptions, VadTracker};
use crate::tensor::{NamedTensor, TensorData};

/// Audio samples a stream may have buffered before the server stops reading its socket.
pub const AUDIO_CREDITS: usize = 65536;
/// Results kept for replay to a resuming client.
const OUTBOX_LIMIT: usize = 8192;
/// Transient step failures (overload, restarting worker) retried before the stream fails.
const STEP_RETRIES: u32 = 40;

/// The session's link to the WebSocket currently attached to it.
pub struct Connection {
    pub messages: mpsc::Sender<Arc<str>>,
    /// Tells the connection to close, with a code and reason, once it has sent what is queued.
    pub close: oneshot::Sender<(CloseCode, String)>,
}

pub struct StreamParams {
    pub sample_rate: u32,
    pub format: SampleFormat,
    pub results: ResultsMode,
    pub vad: VadOptions,
    pub resume_window: Duration,
    /// Signs (and verifies) the stream's checkpoints.
    pub keys: Arc<TokenKeys>,
    /// Audio samples between two checkpoints; 0: none.
    pub checkpoint_samples: u64,
}

/// What a connection learns when it attaches.
pub struct Attached {
    pub generation: u64,
    pub credits: Arc<Semaphore>,
    pub format: SampleFormat,
    /// The stream's sample rate (a stream taken over has its checkpoint's).
    pub sample_rate: u32,
    /// The stream sends checkpoints: at shutdown it hands over ([`Handover`]).
    pub checkpoints: bool,
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Audio(pub Vec<f32>);

#[derive(Message)]
#[rtype(result = "()")]
pub struct End;

#[derive(Message)]
#[rtype(result = "Result<Attached, String>")]
pub struct Attach {
    pub connection: Connection,
    pub last_seq: Option<u64>,
    /// The counter of the checkpoint token the client resumed with, if it sent one: a token
    /// older than one already used to resume this stream is refused (a replay).
    pub token_counter: Option<u32>,
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Detach {
    pub generation: u64,
}

pub struct StreamSession {
    id: Arc<str>,
    model: ServedModel,
    vad: VadInterface,
    params: StreamParams,
    window: usize,
    context_len: usize,
    tracker: VadTracker,
    state: Vec<f32>,
    context: Vec<f32>,
    pending: VecDeque<f32>,
    samples_received: u64,
    samples_done: u64,
    /// When each complete-but-unstepped chunk became available, for chunk latency.
    chunk_ready: VecDeque<Instant>,
    in_flight: bool,
    retries: u32,
    ending: bool,
    finished: bool,
    next_seq: u64,
    outbox: VecDeque<(u64, Arc<str>)>,
    connection: Option<Connection>,
    generation: u64,
    credits: Arc<Semaphore>,
    resume_timer: Option<SpawnHandle>,
    ended: Option<Recipient<StreamEnded>>,
    labels: [(&'static str, String); 1],
    /// Checkpoints issued so far (including those of the instances before, when restored).
    checkpoints: u32,
    /// `samples_done` at the last checkpoint.
    checkpointed_at: u64,
    /// The newest checkpoint a client resumed this stream with.
    redeemed: Option<u32>,
    /// Results up to this `seq` are not sent: the client has them (a stream restored from a
    /// checkpoint computes them again).
    suppress_through: Option<u64>,
    /// Taken over from a checkpoint rather than started here.
    restored: bool,
    /// Its summary was sent.
    summarized: bool,
    /// Segments of the stream's start that the checkpoint it was taken over from left out.
    segments_omitted: u64,
    /// Flushes waiting for `samples_done` to reach their audio ([`Flush`]).
    flushes: Vec<(u64, oneshot::Sender<()>)>,
}

/// Told to whoever listed a stream (the hub) when its session ends, so that the listing goes
/// with it. A message of the session's, so that sessions need not know the hub.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StreamEnded {
    pub id: Arc<str>,
    /// Which session ended (another may have taken over the id since).
    pub session: Addr<StreamSession>,
    /// It ended with its summary (not dropped, not failed): a token of it can no longer
    /// resume it.
    pub summarized: bool,
}

impl StreamSession {
    /// A new stream on `model`; refuses sample rates and options the model cannot take.
    pub fn new(
        id: Arc<str>,
        model: ServedModel,
        params: StreamParams,
        ended: Option<Recipient<StreamEnded>>,
    ) -> Result<StreamSession, String> {
        let vad = VadInterface::resolve(&model.info)?;
        let (window, context_len) = window_for(params.sample_rate).ok_or_else(|| {
            format!(
                "sample_rate must be 16000 or 8000, got {}",
                params.sample_rate
            )
        })?;
        params.vad.validate()?;
        let labels = [("model", model.info.name.clone())];
        Ok(StreamSession {
            tracker: VadTracker::new(&params.vad, params.sample_rate, window),
            state: vec![0.0; vad.state_len],
            context: vec![0.0; context_len],
            id,
            model,
            vad,
            params,
            window,
            context_len,
            pending: VecDeque::new(),
            samples_received: 0,
            samples_done: 0,
            chunk_ready: VecDeque::new(),
            in_flight: false,
            retries: 0,
            ending: false,
            finished: false,
            next_seq: 0,
            outbox: VecDeque::new(),
            connection: None,
            generation: 0,
            credits: Arc::new(Semaphore::new(AUDIO_CREDITS)),
            resume_timer: None,
            ended,
            labels,
            checkpoints: 0,
            checkpointed_at: 0,
            redeemed: None,
            suppress_through: None,
            restored: false,
            summarized: false,
            segments_omitted: 0,
            flushes: Vec::new(),
        })
    }

    fn seconds(&self, samples: u64) -> f64 {
        samples as f64 / self.params.sample_rate as f64
    }

    /// Sends a message now (if a client is attached) and keeps it for replay.
    fn emit(&mut self, message: ServerMessage<'_>) {
        let text: Arc<str> = message.to_json().into();
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.outbox.len() == OUTBOX_LIMIT {
            self.outbox.pop_front();
        }
        self.outbox.push_back((seq, text.clone()));
        if self.suppress_through.is_some_and(|through| seq <= through) {
            return;
        }
        self.send(text);
    }

    fn send(&mut self, text: Arc<str>) {
        let Some(connection) = &self.connection else {
            return;
        };
        if connection.messages.try_send(text).is_err() {
            // The client is not reading its results: cut it loose; it may resume later.
            metrics::counter!("streamserve_stream_drops_total", "reason" => "slow_consumer")
                .increment(1);
            tracing::warn!(stream = %self.id, "client is not reading results; disconnecting it");
            self.disconnect(
                CloseCode::Policy,
                "client is not reading results fast enough; resume to continue".into(),
            );
        }
    }

    fn disconnect(&mut self, code: CloseCode, reason: String) {
        if let Some(connection) = self.connection.take() {
            let _ = connection.close.send((code, reason));
        }
    }

    fn maybe_step(&mut self, ctx: &mut Context<Self>) {
        if self.in_flight || self.finished {
            return;
        }
        let take = if self.pending.len() >= self.window {
            self.window
        } else if self.ending && !self.pending.is_empty() {
            self.pending.len()
        } else {
            if self.ending {
                self.finish(ctx);
            }
            return;
        };
        let mut audio = Vec::with_capacity(self.context_len + self.window);
        audio.extend_from_slice(&self.context);
        audio.extend(self.pending.iter().take(take));
        // The last chunk of a stream is padded with silence to a full window.
        audio.resize(self.context_len + self.window, 0.0);
        self.in_flight = true;
        self.send_step(audio, take, ctx);
    }

    fn send_step(&mut self, audio: Vec<f32>, take: usize, ctx: &mut Context<Self>) {
        let info = &self.model.info;
        let mut inputs: Vec<NamedTensor> = info
            .inputs
            .iter()
            .map(|spec| NamedTensor {
                name: spec.name.clone(),
                shape: Vec::new(),
                data: TensorData::Fp32(Vec::new()),
            })
            .collect();
        inputs[self.vad.audio_input].shape = vec![1, audio.len() as i64];
        inputs[self.vad.audio_input].data = TensorData::Fp32(audio.clone());
        inputs[self.vad.state_input].shape = self.vad.state_shape.clone();
        inputs[self.vad.state_input].data = TensorData::Fp32(self.state.clone());
        inputs[self.vad.rate_input].data = TensorData::Int64(vec![self.params.sample_rate as i64]);
        let request = InferRequest {
            inputs,
            rows: 1,
            outputs: vec![self.vad.probability_output, self.vad.state_output],
        };
        let answer = self.model.infer(request, InferOptions::now());
        ctx.spawn(
            answer
                .into_actor(self)
                .map(move |result, session, ctx| session.on_step(result, audio, take, ctx)),
        );
    }

    fn on_step(
        &mut self,
        result: Result<InferResponse, ServeError>,
        audio: Vec<f32>,
        take: usize,
        ctx: &mut Context<Self>,
    ) {
        let response = match result {
            Ok(response) => response,
            Err(
                e @ (ServeError::Overloaded { .. }
                | ServeError::NotReady { .. }
                | ServeError::WorkerLost(_)),
            ) if self.retries < STEP_RETRIES => {
                self.retries += 1;
                tracing::debug!(stream = %self.id, error = %e, "retrying stream step");
                ctx.run_later(Duration::from_millis(25), move |session, ctx| {
                    session.send_step(audio, take, ctx)
                });
                return;
            }
            Err(e) => {
                self.in_flight = false;
                self.fail(&e, ctx);
                return;
            }
        };
        self.retries = 0;
        self.in_flight = false;
        let (probability, state) = match (&response.outputs[0].data, &response.outputs[1].data) {
            (TensorData::Fp32(p), TensorData::Fp32(s))
                if !p.is_empty() && s.len() == self.state.len() =>
            {
                (p[0], s)
            }
            _ => {
                self.fail(
                    &ServeError::Inference(
                        "the VAD model returned outputs of an unexpected shape".into(),
                    ),
                    ctx,
                );
                return;
            }
        };
        self.state.copy_from_slice(state);
        let window_end = self.context_len + take;
        self.context
            .copy_from_slice(&audio[window_end - self.context_len..window_end]);
        self.pending.drain(..take);
        let chunk_start = self.samples_done;
        self.samples_done += take as u64;
        self.credits.add_permits(take);

        if let Some(ready) = self.chunk_ready.pop_front() {
            metrics::histogram!("streamserve_stream_chunk_latency_seconds", &self.labels)
                .record(ready.elapsed().as_secs_f64());
        }
        metrics::counter!("streamserve_stream_chunks_total", &self.labels).increment(1);
        if let Some(stats) = self.model.watch.stream_stats() {
            stats.add_audio(take as f64 / f64::from(self.params.sample_rate));
        }

        if response.degraded {
            metrics::counter!("streamserve_stream_degraded_chunks_total", &self.labels)
                .increment(1);
        }
        if self.params.results == ResultsMode::All {
            let t = self.seconds(chunk_start);
            self.emit(ServerMessage::Vad {
                seq: self.next_seq,
                t,
                probability,
                degraded: response.degraded,
            });
        }
        let mut events = Vec::new();
        self.tracker
            .push(chunk_start + self.window as u64, probability, &mut events);
        self.emit_events(&events);
        self.maybe_checkpoint();
        self.settle_flushes();
        self.maybe_step(ctx);
    }

    fn emit_events(&mut self, events: &[VadEvent]) {
        for event in events {
            let message = match *event {
                VadEvent::SpeechStart { sample } => ServerMessage::SpeechStart {
                    seq: self.next_seq,
                    t: self.seconds(sample),
                },
                VadEvent::SpeechEnd { sample } => {
                    let segment = self.tracker.segments.last().filter(|s| s.end == sample);
                    if let (Some(segment), Some(stats)) = (segment, self.model.watch.stream_stats())
                    {
                        let samples = segment.end.saturating_sub(segment.start);
                        stats.add_segment(samples as f64 / f64::from(self.params.sample_rate));
                    }
                    ServerMessage::SpeechEnd {
                        seq: self.next_seq,
                        t: self.seconds(sample),
                    }
                }
            };
            self.emit(message);
        }
    }

    fn finish(&mut self, ctx: &mut Context<Self>) {
        self.finished = true;
        let mut events = Vec::new();
        self.tracker.finish(self.samples_done, &mut events);
        self.emit_events(&events);
        let segments = self
            .tracker
            .segments
            .iter()
            .map(|s| SegmentSecs::from_samples(s, self.params.sample_rate))
            .collect();
        let chunks = self.samples_done.div_ceil(self.window as u64);
        self.emit(ServerMessage::Summary {
            seq: self.next_seq,
            duration: self.seconds(self.samples_done),
            chunks,
            segments,
            segments_omitted: self.segments_omitted,
        });
        self.summarized = true;
        self.disconnect(CloseCode::Normal, "stream ended".into());
        ctx.stop();
    }

    fn fail(&mut self, error: &ServeError, ctx: &mut Context<Self>) {
        tracing::error!(stream = %self.id, %error, "stream failed");
        metrics::counter!("streamserve_stream_drops_total", "reason" => "inference_error")
            .increment(1);
        let message = error.to_string();
        self.emit(ServerMessage::Error {
            code: "inference_failed",
            message: &message,
        });
        self.finished = true;
        let code = if matches!(
            error,
            ServeError::Overloaded { .. } | ServeError::NotReady { .. }
        ) {
            CloseCode::Again
        } else {
            CloseCode::Error
        };
        self.disconnect(code, message.chars().take(120).collect());
        ctx.stop();
    }
}

impl Actor for StreamSession {
    type Context = Context<Self>;

    fn stopped(&mut self, ctx: &mut Self::Context) {
        // Wakes a connection waiting for audio credits: this stream takes no more audio.
        self.credits.close();
        if let Some(ended) = &self.ended {
            ended.do_send(StreamEnded {
                id: self.id.clone(),
                session: ctx.address(),
                summarized: self.summarized,
            });
        }
    }
}

impl Handler<Audio> for StreamSession {
    type Result = ();

    fn handle(&mut self, Audio(samples): Audio, ctx: &mut Self::Context) {
        if self.ending || self.finished {
            return;
        }
        let before = self.pending.len();
        self.samples_received += samples.len() as u64;
        self.pending.extend(samples);
        let now = Instant::now();
        let new_chunks = self.pending.len() / self.window - before / self.window;
        self.chunk_ready
            .extend(std::iter::repeat_n(now, new_chunks));
        self.maybe_step(ctx);
    }
}

impl Handler<End> for StreamSession {
    type Result = ();

    fn handle(&mut self, _: End, ctx: &mut Self::Context) {
        if !self.pending.len().is_multiple_of(self.window) {
            self.chunk_ready.push_back(Instant::now());
        }
        self.ending = true;
        self.maybe_step(ctx);
    }
}
