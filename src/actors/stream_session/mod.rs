//! `StreamSession`: one actor per speech stream. It owns everything a stream needs between
//! steps: its progress through the stages its model declares (`stream::pipeline`: buffers,
//! recurrent state, audio not yet stepped), the voice activity tracker or keyword detector,
//! and the recent results a reconnecting client may have missed.
//!
//! Each step goes through its stage model's router like any request, so the steps of many
//! streams are batched into one model call (`step.rs`). A stream has at most one step in
//! flight, because each step needs the state or frames the one before produced.
//!
//! The session outlives its WebSocket: when the connection drops it waits `resume_window` for
//! the client to come back with its stream id and last seen `seq`, then replays what the client
//! missed and carries on with the state intact (`attach.rs`); audio and its end from a
//! connection carry its generation ([`AudioFrom`], [`EndFrom`]), so one a resume superseded
//! no longer alters the stream. It also sends the client a signed checkpoint
//! every `checkpoint_samples` of audio, and one last one when the server shuts down or a
//! version it runs on is taken out of service ([`checkpoint`]), from which any instance of the
//! fleet can take the stream over.

mod attach;
mod checkpoint;
mod flush;
mod out;
mod step;
mod tail;

pub use attach::{AttachRefused, SUPERSEDED};
pub use checkpoint::{Handover, Progress, Retire, ServedBy};
pub use flush::{feed, feed_from, EndFrom, FeedError, Flush, Flushed};
pub use tail::{EndedTail, TailRefused};

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_ws::CloseCode;
use bytestring::ByteString;
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::catalog::{Catalog, ServedModel};
use crate::access::StreamPlace;
use crate::manifest::StreamKind;
use crate::model::ModelInfo;
use crate::stream::audio::SampleFormat;
use crate::stream::checkpoint::TokenKeys;
use crate::stream::keyword::{KeywordDetector, KeywordOptions};
use crate::stream::pace::{Schedule, StreamPace, DEFAULT_BEHIND_AFTER};
use crate::stream::pipeline::{Layout, PipelineState};
use crate::stream::protocol::ResultsMode;
use crate::stream::vad::{VadOptions, VadTracker};

/// Audio samples a stream may have buffered before the server stops reading its socket.
pub const AUDIO_CREDITS: usize = 65536;
/// Results kept for replay to a resuming client.
const OUTBOX_LIMIT: usize = 8192;
/// Transient step failures (overload, restarting worker) retried before the stream fails.
const STEP_RETRIES: u32 = 40;

/// The session's link to the WebSocket currently attached to it.
pub struct Connection {
    pub messages: mpsc::Sender<ByteString>,
    /// Tells the connection to close, with a code and reason, once it has sent what is queued.
    pub close: oneshot::Sender<(CloseCode, String)>,
}

pub struct StreamParams {
    pub sample_rate: u32,
    pub format: SampleFormat,
    pub results: ResultsMode,
    pub vad: VadOptions,
    pub keyword: KeywordOptions,
    /// Run the gate the stream's declaration names, if any.
    pub gate: bool,
    pub resume_window: Duration,
    /// Signs (and verifies) the stream's checkpoints.
    pub keys: Arc<TokenKeys>,
    /// Audio samples between two checkpoints; 0: none.
    pub checkpoint_samples: u64,
    /// Where the stream reports whether it keeps real time (the door reads it); `None` for
    /// audio that is not live (a whole file), which is never behind.
    pub pace: Option<Arc<StreamPace>>,
}

/// The models a stream runs on: its stages in order, its own model last, and its gate's.
pub struct StreamModels {
    pub stages: Vec<ServedModel>,
    pub gate: Option<ServedModel>,
}

impl StreamModels {
    /// A stream on one model that declares no stages before it and no gate.
    pub fn alone(model: ServedModel) -> StreamModels {
        StreamModels {
            stages: vec![model],
            gate: None,
        }
    }
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

/// Audio from whoever holds a stream no other connection can take over (a whole file, a
/// `Speech` call: streams not listed for resume). A connection that may be superseded by a
/// resume (a WebSocket, a gRPC sequence) sends [`AudioFrom`].
#[derive(Message)]
#[rtype(result = "()")]
pub struct Audio(pub Vec<f32>);

/// Audio from the connection of `generation` (its [`Attached`]): the stream takes it only
/// while that connection is the stream's own. Audio a superseded connection sent after a
/// newer one attached is dropped, and the credits it took are given back: the newer
/// connection was told how much audio the stream holds, and sends on from there. The answer
/// says whether the stream took it (a transport that answers per request needs to know).
#[derive(Message)]
#[rtype(result = "bool")]
pub struct AudioFrom {
    pub generation: u64,
    pub samples: Vec<f32>,
}

/// The audio is over (see [`Audio`] for who sends this; a connection sends [`EndFrom`]).
#[derive(Message)]
#[rtype(result = "()")]
pub struct End;

/// The connection of `generation` gives up a stream it was the first to attach to (its
/// opening step was refused): the stream stops at once, without a resume window, as if it
/// had never been opened. Ignored once another connection has attached.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Abandon {
    pub generation: u64,
}

#[derive(Message)]
#[rtype(result = "Result<Attached, AttachRefused>")]
pub struct Attach {
    pub connection: Connection,
    pub last_seq: Option<u64>,
    /// The counter of the checkpoint token the client resumed with, if it sent one: a token
    /// older than one already used to resume this stream is refused (a replay).
    pub token_counter: Option<u32>,
    /// The catalog as the connection found it: a version of the stream's that it no longer
    /// serves was taken out of service while no step reached it (the stream had no client),
    /// and the stream hands this connection over at once (`checkpoint.rs`). `None`: a
    /// transport whose streams are its own only (no resume), whose steps find it.
    pub catalog: Option<Arc<Catalog>>,
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Detach {
    pub generation: u64,
}

pub struct StreamSession {
    id: Arc<str>,
    /// The stream's model: its last stage, whose output is the stream's result.
    model: ServedModel,
    kind: StreamKind,
    /// The models of the stream's stages, in order (`model` is the last), then its gate's:
    /// indexed as the layout indexes steps.
    stages: Vec<ServedModel>,
    layout: Layout,
    progress: PipelineState,
    /// What a keyword stream listens for.
    phrase: String,
    params: StreamParams,
    tracker: VadTracker,
    keywords: KeywordDetector,
    samples_received: u64,
    samples_done: u64,
    /// Where each complete-but-unstepped chunk ends (samples), and when it became available,
    /// for chunk latency: over when every stage has done what its audio lets it.
    chunk_ready: VecDeque<(u64, Instant)>,
    /// When the stream's chunks are due, from its first answer on this connection (`step.rs`).
    schedule: Option<Schedule>,
    /// The oldest waiting chunk, or the last completed one, was more than `behind_after` late
    /// when the last step went: steps go to the models' fallbacks until it catches up
    /// (`step.rs`).
    behind: bool,
    /// How late the last completed chunk was against the real-time schedule, up to its last
    /// step's answer (so counting the model's queue and compute, which a waiting chunk's
    /// lateness does not).
    last_done_late: Duration,
    /// The stream model's `slo_ms`, or [`DEFAULT_BEHIND_AFTER`].
    behind_after: Duration,
    /// A stage's answer was degraded since the last stage last answered.
    degraded: bool,
    in_flight: bool,
    retries: u32,
    ending: bool,
    finished: bool,
    next_seq: u64,
    outbox: VecDeque<(u64, ByteString)>,
    connection: Option<Connection>,
    generation: u64,
    credits: Arc<Semaphore>,
    resume_timer: Option<SpawnHandle>,
    ended: Option<Recipient<StreamEnded>>,
    labels: [(&'static str, String); 1],
    /// Per stage: the stream's model and the stage's.
    stage_labels: Vec<[(&'static str, String); 2]>,
    /// The series every step or chunk moves, looked up once: a lookup by labels clones
    /// them and hashes the key each time, which a stream would do 30 times a second.
    per_step: StepMetrics,
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
    flushes: flush::Flushes,
    /// Its place among its caller's key's open streams: held while the stream lives, through
    /// its resume window, and given back the moment it ends.
    place: Option<StreamPlace>,
    /// Taken over on another version than its checkpoint's, from a zero state (the results
    /// from the checkpoint on are the new version's, all sent, numbered after the client's),
    /// and the connection that took it over has not been told yet.
    fresh_state: bool,
    /// A step reached a model version taken out of service (`checkpoint.rs`, [`Retired`]):
    /// the stream steps no more, and hands over to the next connection that attaches.
    retired: Option<checkpoint::Retired>,
}

/// A stream's chunk counter and latency histogram, and each stage's step counter.
struct StepMetrics {
    chunks: metrics::Counter,
    /// Chunks completed while the stream was behind real time.
    behind_chunks: metrics::Counter,
    chunk_latency: metrics::Histogram,
    stage_steps: Vec<metrics::Counter>,
}

impl StepMetrics {
    fn new(
        labels: &[(&'static str, String); 1],
        stage_labels: &[[(&'static str, String); 2]],
    ) -> StepMetrics {
        StepMetrics {
            chunks: metrics::counter!("streamserve_stream_chunks_total", labels),
            behind_chunks: metrics::counter!("streamserve_stream_behind_chunks_total", labels),
            chunk_latency: metrics::histogram!("streamserve_stream_chunk_latency_seconds", labels),
            stage_steps: stage_labels
                .iter()
                .map(|l| metrics::counter!("streamserve_stream_stage_steps_total", l))
                .collect(),
        }
    }
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
    /// Its last messages, for a resume that missed them (a summarized stream with checkpoints).
    pub tail: Option<EndedTail>,
}

impl StreamSession {
    /// A new stream on its models; refuses sample rates and options the stream cannot take.
    pub fn new(
        id: Arc<str>,
        models: StreamModels,
        params: StreamParams,
        ended: Option<Recipient<StreamEnded>>,
    ) -> Result<StreamSession, String> {
        let model = models
            .stages
            .last()
            .ok_or("a stream needs a model")?
            .clone();
        let gated = models.gate.is_some();
        let mut stages = models.stages;
        stages.extend(models.gate);
        let mut decl = model
            .info
            .stream
            .clone()
            .ok_or_else(|| format!("model '{}' does not serve streams", model.info.name))?;
        if !gated && decl.gate.is_some() {
            // The client asked for the stream without its gate.
            Arc::make_mut(&mut decl).gate = None;
        }
        let infos: Vec<&ModelInfo> = stages.iter().map(|s| &*s.info).collect();
        let layout = Layout::resolve(&decl, &infos, params.sample_rate)?;
        match decl.kind {
            StreamKind::Vad => params.vad.validate()?,
            StreamKind::Keyword => params.keyword.validate()?,
        }
        let labels = [("model", model.info.name.clone())];
        let stage_labels: Vec<_> = stages
            .iter()
            .map(|s| {
                [
                    ("model", model.info.name.clone()),
                    ("stage", s.info.name.clone()),
                ]
            })
            .collect();
        let per_step = StepMetrics::new(&labels, &stage_labels);
        let chunk = layout.chunk_samples();
        let behind_after = model.info.slo.unwrap_or(DEFAULT_BEHIND_AFTER);
        Ok(StreamSession {
            tracker: VadTracker::new(&params.vad, params.sample_rate, chunk),
            keywords: KeywordDetector::default(),
            progress: PipelineState::new(&layout),
            kind: decl.kind,
            phrase: decl.phrase.clone().unwrap_or_default(),
            layout,
            stages,
            id,
            model,
            params,
            samples_received: 0,
            samples_done: 0,
            chunk_ready: VecDeque::new(),
            schedule: None,
            behind: false,
            last_done_late: Duration::ZERO,
            behind_after,
            degraded: false,
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
            stage_labels,
            per_step,
            checkpoints: 0,
            checkpointed_at: 0,
            redeemed: None,
            suppress_through: None,
            restored: false,
            summarized: false,
            segments_omitted: 0,
            flushes: flush::Flushes::default(),
            place: None,
            fresh_state: false,
            retired: None,
        })
    }

    /// The session holds the stream's place among its key's open streams until it stops.
    pub fn holding(mut self, place: StreamPlace) -> StreamSession {
        self.place = Some(place);
        self
    }

    fn seconds(&self, samples: u64) -> f64 {
        samples as f64 / self.params.sample_rate as f64
    }
}

impl Actor for StreamSession {
    type Context = Context<Self>;

    fn stopped(&mut self, ctx: &mut Self::Context) {
        // Wakes a connection waiting for audio credits: this stream takes no more audio.
        self.credits.close();
        self.place = None;
        if let Some(ended) = &self.ended {
            ended.do_send(StreamEnded {
                id: self.id.clone(),
                session: ctx.address(),
                summarized: self.summarized,
                tail: self.ended_tail(),
            });
        }
    }
}

impl StreamSession {
    /// Adds audio to the stream, to step as its chunks complete.
    fn take_audio(&mut self, samples: &[f32], ctx: &mut Context<Self>) {
        if self.ending || self.finished || self.retired.is_some() {
            return;
        }
        let chunk = self.layout.chunk_samples() as u64;
        let before = self.samples_received;
        self.samples_received += samples.len() as u64;
        self.progress.push_audio(samples);
        let now = Instant::now();
        let first_new = before / chunk + 1;
        let last_new = self.samples_received / chunk;
        self.chunk_ready
            .extend((first_new..=last_new).map(|n| (n * chunk, now)));
        self.maybe_step(ctx);
    }

    /// The audio is over: the last partial chunk is stepped, then the summary sent.
    fn end_audio(&mut self, ctx: &mut Context<Self>) {
        if !self
            .samples_received
            .is_multiple_of(self.layout.chunk_samples() as u64)
        {
            self.chunk_ready
                .push_back((self.samples_received, Instant::now()));
        }
        self.ending = true;
        self.maybe_step(ctx);
    }
}

impl Handler<Audio> for StreamSession {
    type Result = ();

    fn handle(&mut self, Audio(samples): Audio, ctx: &mut Self::Context) {
        self.take_audio(&samples, ctx);
    }
}

impl Handler<AudioFrom> for StreamSession {
    type Result = bool;

    fn handle(&mut self, audio: AudioFrom, ctx: &mut Self::Context) -> bool {
        if audio.generation != self.generation {
            // A superseded connection's: not the stream's audio. Its credits go back, or
            // the stream's room would shrink by what it sent.
            tracing::debug!(stream = %self.id, samples = audio.samples.len(), "audio from a superseded connection dropped");
            self.credits.add_permits(audio.samples.len());
            return false;
        }
        self.take_audio(&audio.samples, ctx);
        true
    }
}

impl Handler<End> for StreamSession {
    type Result = ();

    fn handle(&mut self, _: End, ctx: &mut Self::Context) {
        self.end_audio(ctx);
    }
}

impl Handler<Abandon> for StreamSession {
    type Result = ();

    fn handle(&mut self, abandon: Abandon, ctx: &mut Self::Context) {
        if abandon.generation != self.generation || self.finished {
            return;
        }
        tracing::debug!(stream = %self.id, "the stream's opening step was refused; it stops");
        self.finished = true;
        // Before the answer: the caller's next start may take the place at once.
        self.place = None;
        self.connection = None;
        ctx.stop();
    }
}
