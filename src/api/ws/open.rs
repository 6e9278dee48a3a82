//! Opening a stream's session from its `start` message, in one of three ways: a new stream; a
//! stream that lives on this instance, by its `stream_id` (results the client missed are sent
//! again); or a stream taken over from a checkpoint's `resume` token, which any instance that
//! shares the fleet's token keys can do (docs/streaming.md, "Resume on any instance").
//!
//! A new stream, and one restored here from its checkpoint, hold their place among the
//! caller's key's open streams in their session, for as long as the stream lives (its resume
//! window included); a resume of a live stream takes none. Every refused resume is counted and
//! logged by its reason (`stream::resume`).
//!
//! A resume of a stream that already ended here with its summary is answered from the tail the
//! hub keeps of it ([`EndedReplay`]): what the client missed, summary included, then the end
//! (a WebSocket's close 1000, a gRPC sequence's answer). So is one that races the end: it
//! found the session live, and the session stopped at its summary before it could attach
//! ([`AttachError::EndedHere`]). A takeover from a token is `takeover.rs`.

mod takeover;

use std::sync::Arc;

use actix::prelude::*;
use actix_ws::CloseCode;
use bytestring::ByteString;
use tokio::sync::{mpsc, oneshot};

use super::StreamsConfig;
use crate::access::{Access, Pass};
use crate::actors::catalog::{ServedModel, SharedCatalog};
use crate::actors::stream_hub::{Found, Lookup, Register, StreamHub};
use crate::actors::stream_session::{
    Attach, AttachRefused, Attached, Connection, EndedTail, ServedBy, StreamModels, StreamParams,
    StreamSession, TailRefused,
};
use crate::actors::supervisor::EnsureLoaded;
use crate::error::ServeError;
use crate::manifest::StreamKind;
use crate::stream::protocol::StartMessage;
use crate::stream::resume::ResumeRefusal;
use crate::untrusted::Untrusted;

/// Who opened the stream, on which model (its default version, as the URL asked): what a
/// takeover checks the token's model and version against.
pub(in crate::api) struct Caller {
    pub served: ServedModel,
    pub pass: Pass,
    pub access: Arc<Access>,
}

/// How a `start` found its stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(in crate::api) enum Opening {
    New,
    /// The stream's live session here, by `stream_id` or by a token.
    Resumed,
    /// Restored here from its checkpoint's token.
    TakenOver,
}

/// Why a `start` opened no stream.
#[derive(Debug)]
pub(in crate::api) enum OpenError {
    /// It cannot be served (1008 on a WebSocket), and the reason says why.
    Refused(String),
    /// A resume refused (1008), counted and logged by its reason when it was made.
    Resume(ResumeRefusal, String),
    /// The caller's key holds as many open streams as it may (1013: one may end).
    KeyLimit(ServeError),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Refused(reason) | OpenError::Resume(_, reason) => f.write_str(reason),
            OpenError::KeyLimit(error) => write!(f, "{error}"),
        }
    }
}

impl OpenError {
    /// The WebSocket close code that carries it.
    pub fn close_code(&self) -> CloseCode {
        match self {
            OpenError::Refused(_) | OpenError::Resume(..) => CloseCode::Policy,
            OpenError::KeyLimit(_) => CloseCode::Again,
        }
    }
}

impl From<String> for OpenError {
    fn from(reason: String) -> OpenError {
        OpenError::Refused(reason)
    }
}

/// A session to attach the connection to, and how.
pub(in crate::api) struct Opened {
    pub session: Addr<StreamSession>,
    /// The stream's id and model, for the log.
    pub id: Arc<str>,
    pub model: String,
    pub opening: Opening,
    /// Results after this `seq` are (re)sent on attaching.
    pub last_seq: Option<u64>,
    /// The counter of the token the client resumed with.
    pub token_counter: Option<u32>,
    /// This call made the session (a new stream, or one restored from its checkpoint), rather
    /// than finding it live: only then may a refused start end it.
    pub created: bool,
    /// Where the session checks, as the connection attaches, that its versions still serve.
    pub catalog: Arc<SharedCatalog>,
    /// Where a resume whose session stopped before it attached finds the stream's end.
    pub hub: Addr<StreamHub>,
}

/// A resume of a stream that ended here with its summary, from the tail the hub kept: the
/// connection sends `started`, then `missed` (the messages after the client's `last_seq`,
/// exactly as they were sent, the summary last), then closes 1000 "stream ended".
pub(in crate::api) struct EndedReplay {
    pub id: Arc<str>,
    pub model: String,
    pub started: ByteString,
    pub missed: Vec<ByteString>,
}

impl EndedReplay {
    /// Counts and logs the replay as a resume of its stream, on either transport.
    pub fn count_resume(&self) {
        metrics::counter!("streamserve_stream_resumes_total", "model" => self.model.clone())
            .increment(1);
        tracing::info!(stream = %self.id, model = %self.model, how = "ended",
            missed = self.missed.len(), "stream resumed");
    }
}

/// What a `start` opened: a session to attach to, or the end of a stream that ended here.
pub(in crate::api) enum Outcome {
    Session(Opened),
    Ended(EndedReplay),
}

/// A connection attached to its session: what the session sends it, and the session's word
/// to close it (a code and reason, once what is queued is sent).
pub(in crate::api) struct AttachedConnection {
    pub attached: Attached,
    pub messages: mpsc::Receiver<ByteString>,
    pub close: oneshot::Receiver<(CloseCode, String)>,
}

/// Why a connection could not attach to its session.
pub(in crate::api) enum AttachError {
    /// The session refused it, and the reason says why: the stream already ended, the resume
    /// token is older than one already used, or the results to send again from `last_seq` are
    /// no longer kept (or were never sent).
    Refused(String),
    /// The session ended before it could answer.
    Ended,
    /// A resume raced the stream's end: the session stopped at its summary before the
    /// connection attached, and this is what the client missed of the end, summary last.
    EndedHere(EndedReplay),
}

impl Opened {
    /// Attaches a new connection to the session, which then sends its messages (up to
    /// `capacity` waiting) to it: the one way WebSocket and gRPC transports take a session.
    pub async fn attach(&self, capacity: usize) -> Result<AttachedConnection, AttachError> {
        let (messages_tx, messages) = mpsc::channel(capacity);
        let (close_tx, close) = oneshot::channel();
        let attach = Attach {
            connection: Connection {
                messages: messages_tx,
                close: close_tx,
            },
            last_seq: self.last_seq,
            token_counter: self.token_counter,
            catalog: Some(self.catalog.snapshot()),
        };
        match self.session.send(attach).await {
            Ok(Ok(attached)) => {
                if self.opening != Opening::New {
                    let how = match self.opening {
                        Opening::TakenOver => "takeover",
                        _ => "local",
                    };
                    tracing::info!(stream = %self.id, model = %self.model, how,
                        generation = attached.generation, "stream resumed");
                }
                Ok(AttachedConnection {
                    attached,
                    messages,
                    close,
                })
            }
            Ok(Err(AttachRefused::Ended)) | Err(_) if self.opening != Opening::New => {
                Err(self.ended_meanwhile().await)
            }
            Ok(Err(refused)) => {
                if let Some(reason) = self.resume_refusal(&refused) {
                    reason.record(&self.model, Some(&self.id));
                }
                Err(AttachError::Refused(refused.to_string()))
            }
            Err(_) => Err(AttachError::Ended),
        }
    }

    /// A resume whose session stopped between the hub's answer and the attach: if the stream
    /// ended with its summary, the client gets what it missed of the end, as a resume that
    /// came a moment later would (docs/streaming.md, "After `end`"), or the refusal such a
    /// resume gets; a stream that stopped otherwise (failed, its resume window passed) is
    /// gone, as before.
    async fn ended_meanwhile(&self) -> AttachError {
        let Found::Finished(tail) = lookup(&self.hub, &self.id).await else {
            return AttachError::Ended;
        };
        // The refusal a later resume of the same kind gets (by a token, or by stream_id).
        let (reason, refused) = if self.token_counter.is_some() {
            (ResumeRefusal::Ended, ended(&self.id))
        } else {
            (ResumeRefusal::UnknownStream, unknown_stream(&self.id))
        };
        match replay_ended(
            self.id.clone(),
            tail,
            self.last_seq,
            OpenError::Resume(reason, refused),
        ) {
            Ok(Outcome::Ended(replay)) => AttachError::EndedHere(replay),
            Ok(Outcome::Session(_)) => AttachError::Ended,
            Err(refused) => {
                reason.record(&self.model, Some(&self.id));
                AttachError::Refused(refused.to_string())
            }
        }
    }

    /// A session's refusal of a resume, as a resume refusal (a new stream's is none).
    fn resume_refusal(&self, refused: &AttachRefused) -> Option<ResumeRefusal> {
        if self.opening == Opening::New {
            return None;
        }
        Some(match refused {
            AttachRefused::Ended => ResumeRefusal::Ended,
            AttachRefused::Superseded { .. } => ResumeRefusal::Superseded,
            AttachRefused::NotKept { .. } | AttachRefused::Beyond { .. } => ResumeRefusal::LastSeq,
        })
    }
}

/// Finds or makes the session `start` asks for, or the tail of the stream it resumes if that
/// ended here; a refused resume is counted and logged here.
pub(in crate::api) async fn open_stream(
    start: StartMessage,
    caller: Caller,
    config: &StreamsConfig,
) -> Result<Outcome, OpenError> {
    let model = caller.served.info.name.clone();
    let named = start.stream_id.clone();
    let opened = open(start, caller, config).await;
    if let Err(OpenError::Resume(reason, _)) = &opened {
        reason.record(&model, named.as_deref());
    }
    opened
}

fn ended(id: &str) -> String {
    format!("stream '{}' has ended", Untrusted(id))
}

fn unknown_stream(id: &str) -> String {
    format!("unknown or expired stream_id '{}'", Untrusted(id))
}

/// What the hub knows of stream `id`; of a session that has just stopped, once its end has
/// reached the hub ([`Found::Stopping`]: asked again, the hub has it).
pub(super) async fn lookup(hub: &Addr<StreamHub>, id: &str) -> Found {
    for _ in 0..3 {
        match hub.send(Lookup { id: id.to_string() }).await {
            Ok(Found::Stopping) => continue,
            Ok(found) => return found,
            Err(_) => return Found::Unknown,
        }
    }
    Found::Unknown
}

/// The answer to a resume of a stream that ended here: its tail from after `last_seq`, if the
/// hub still keeps it and the client lacks some of it; else `refused`.
fn replay_ended(
    id: Arc<str>,
    tail: Option<EndedTail>,
    last_seq: Option<u64>,
    refused: OpenError,
) -> Result<Outcome, OpenError> {
    let Some(tail) = tail else {
        return Err(refused);
    };
    match tail.missed(last_seq) {
        Ok(missed) => Ok(Outcome::Ended(EndedReplay {
            id,
            model: tail.model,
            started: tail.started,
            missed,
        })),
        Err(TailRefused::HasAll | TailRefused::NotKept) => Err(refused),
    }
}

async fn open(
    start: StartMessage,
    caller: Caller,
    config: &StreamsConfig,
) -> Result<Outcome, OpenError> {
    if let Some(token) = &start.resume {
        let checkpoint = config
            .keys
            .open(
                token,
                crate::registry::now_ms(),
                config.resume_window.as_millis() as u64,
            )
            .map_err(|e| OpenError::Resume((&e).into(), e.to_string()))?;
        if start
            .stream_id
            .as_ref()
            .is_some_and(|id| *id != checkpoint.stream_id)
        {
            return Err(OpenError::Resume(
                ResumeRefusal::OtherStream,
                "the resume token belongs to another stream than stream_id".into(),
            ));
        }
        return takeover::take_over(checkpoint, start.last_seq, caller, config).await;
    }
    if let Some(id) = start.stream_id {
        let unknown = || OpenError::Resume(ResumeRefusal::UnknownStream, unknown_stream(&id));
        let ended_here = |found| match found {
            Found::Finished(Some(tail)) => {
                // As a live stream's resume: its own model, at a version this caller may use.
                if tail.model != caller.served.info.name {
                    return Err(unknown());
                }
                caller
                    .access
                    .check_version(&caller.pass, &tail.model, &tail.version)
                    .map_err(|e| e.to_string())?;
                replay_ended(id.as_str().into(), Some(tail), start.last_seq, unknown())
            }
            _ => Err(unknown()),
        };
        let session = match lookup(&config.hub, &id).await {
            Found::Live(session) => session,
            found => return ended_here(found),
        };
        // The stream's own model, at a version this caller may use; a session that stopped
        // meanwhile (at its summary, say) is asked of the hub again.
        let Ok((model, version)) = session.send(ServedBy).await else {
            return ended_here(lookup(&config.hub, &id).await);
        };
        if model != caller.served.info.name {
            return Err(OpenError::Resume(
                ResumeRefusal::WrongModel,
                format!(
                    "stream '{}' is on model '{model}', not '{}'",
                    Untrusted(&id),
                    caller.served.info.name
                ),
            ));
        }
        caller
            .access
            .check_version(&caller.pass, &model, &version)
            .map_err(|e| e.to_string())?;
        return Ok(Outcome::Session(Opened {
            session,
            id: id.into(),
            model,
            opening: Opening::Resumed,
            last_seq: start.last_seq,
            token_counter: None,
            created: false,
            catalog: config.catalog.clone(),
            hub: config.hub.clone(),
        }));
    }
    if start.last_seq.is_some() {
        return Err("last_seq is only meaningful with stream_id or resume"
            .to_string()
            .into());
    }
    other_kinds_options(&start, caller.served.info.stream_kind())?;
    // Before the models load: a key at its limit costs nothing more.
    let name = caller.served.info.name.clone();
    let place = caller
        .access
        .stream_place(&caller.pass, &name)
        .map_err(OpenError::KeyLimit)?;
    let id: Arc<str> = uuid::Uuid::new_v4().simple().to_string().into();
    let params = params(config, start.sample_rate, &start, start.checkpoints);
    let hub = Some(config.hub.clone().recipient());
    let models = stage_models(caller.served, params.gate, config).await?;
    let session = StreamSession::new(id.clone(), models, params, hub)?
        .holding(place)
        .start();
    config.hub.do_send(Register {
        id: id.clone(),
        session: session.clone(),
    });
    Ok(Outcome::Session(Opened {
        session,
        id,
        model: name,
        opening: Opening::New,
        last_seq: None,
        token_counter: None,
        created: true,
        catalog: config.catalog.clone(),
        hub: config.hub.clone(),
    }))
}

/// Options of the other kind of stream than the model's (`vad` on a keyword spotter,
/// `keyword` on a voice activity model) are refused, not ignored: the client meant something
/// the stream will not do.
fn other_kinds_options(start: &StartMessage, kind: Option<StreamKind>) -> Result<(), OpenError> {
    let misplaced = match kind {
        Some(StreamKind::Keyword) if start.vad.given => "vad",
        Some(StreamKind::Vad) if start.keyword.given => "keyword",
        _ => return Ok(()),
    };
    let kind = match kind {
        Some(StreamKind::Keyword) => "a keyword",
        _ => "a voice activity",
    };
    Err(OpenError::Refused(format!(
        "`{misplaced}` options do not apply to this model's streams ({kind} stream)"
    )))
}

/// The models of a stream's stages, `model` (the stream's own) last, and its gate's: the
/// default versions of the models its declaration names, loaded if they are cold.
async fn stage_models(
    model: ServedModel,
    gated: bool,
    config: &StreamsConfig,
) -> Result<StreamModels, String> {
    let decl = model.info.stream.clone();
    let names = decl.iter().flat_map(|d| d.stages.iter().map(|s| &s.model));
    let mut stages = Vec::with_capacity(names.clone().count() + 1);
    for name in names {
        stages.push(load(name, "stage", config).await?);
    }
    stages.push(model);
    let gate = match decl
        .as_ref()
        .and_then(|d| d.gate.as_ref())
        .filter(|_| gated)
    {
        Some(gate) => Some(load(&gate.model, "gate", config).await?),
        None => None,
    };
    Ok(StreamModels { stages, gate })
}

/// A model the stream runs on besides its own, loaded if it is lazy.
async fn load(name: &str, role: &str, config: &StreamsConfig) -> Result<ServedModel, String> {
    let load = config.supervisor.send(EnsureLoaded {
        name: name.to_string(),
        version: None,
    });
    match load.await {
        Ok(Ok(served)) => Ok(served),
        Ok(Err(e)) => Err(format!(
            "the stream's {role} model '{name}' is not available: {e}"
        )),
        Err(_) => Err("the server is stopping".into()),
    }
}

/// A stream's parameters from its `start` (a restored stream takes its own from its
/// checkpoint) and the server's settings; `checkpoints`: whether it sends them.
fn params(
    config: &StreamsConfig,
    sample_rate: u32,
    start: &StartMessage,
    checkpoints: bool,
) -> StreamParams {
    let every = config.checkpoint_every.as_millis() as u64 * sample_rate as u64 / 1000;
    StreamParams {
        sample_rate: start.sample_rate,
        format: start.format,
        results: start.results,
        vad: start.vad.value.clone(),
        keyword: start.keyword.value.clone(),
        gate: start.gate.unwrap_or(true),
        resume_window: config.resume_window,
        keys: config.keys.clone(),
        checkpoint_samples: if checkpoints { every } else { 0 },
        pace: Some(config.pace.clone()),
    }
}
