//! Speech streams over WebSocket (`GET /v1/streams/{model}`) and the one-shot form of the same
//! pipeline (`POST /v1/models/{model}/segments` with a WAV body).
//!
//! This file is the transport only: it parses frames into `StreamSession` messages and writes
//! the session's messages back; `open.rs` finds or makes the session a `start` asks for, and
//! `segments.rs` is the one-shot endpoint. Each connection is two tasks: a reader (start
//! message, audio,
//! `end`; it stops reading while the session holds its audio budget, which is the backpressure
//! a too-fast client feels) and a writer (results out, with a deadline per write, so a client
//! that stops reading is dropped without holding anything else up).

pub(super) mod open;
mod segments;

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{AggregatedMessage, AggregatedMessageStream, CloseCode, CloseReason, ProtocolError};
use bytestring::ByteString;
use tokio::sync::{mpsc, oneshot, watch};

use super::door::limit::AdmissionLimit;
use super::AppState;
use crate::access::{Pass, StreamPass};
use crate::actors::catalog::ServedModel;
use crate::actors::catalog::SharedCatalog;
use crate::actors::stream_hub::StreamHub;
use crate::actors::stream_session::{
    Attached, Audio, Detach, End, Handover, StreamSession, AUDIO_CREDITS,
};
use crate::actors::supervisor::Supervisor;
use crate::error::ServeError;
use crate::machine::traffic::{self, Protocol};
use crate::stream::checkpoint::TokenKeys;
use crate::stream::idle::IdleTimer;
use crate::stream::pace::StreamPace;
use crate::stream::protocol::{ClientMessage, ServerMessage, StartMessage};
use open::AttachError;

/// Largest WebSocket frame (and reassembled message) accepted.
pub const MAX_FRAME_BYTES: usize = 64 * 1024;
const START_TIMEOUT: Duration = Duration::from_secs(10);
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a shutdown waits for a stream's last checkpoint to be written.
const HANDOVER_WAIT: Duration = Duration::from_secs(5);
/// Messages queued for one connection before its client counts as not reading.
const OUTGOING_CAPACITY: usize = 1024;
/// The subprotocol a browser offers beside `bearer.<key>`, and which the handshake names back.
pub const SUBPROTOCOL: &str = "streamserve";

/// What stream connections share.
pub struct StreamsConfig {
    pub hub: Addr<StreamHub>,
    pub resume_window: Duration,
    pub idle_timeout: Duration,
    pub shutdown: watch::Receiver<bool>,
    /// Sign and verify checkpoints (the fleet's shared keys, or this process's own).
    pub keys: Arc<TokenKeys>,
    /// Audio between two checkpoints; zero: none.
    pub checkpoint_every: Duration,
    /// Where a stream taken over from a checkpoint finds its model version, and loads it.
    pub catalog: Arc<SharedCatalog>,
    pub supervisor: Addr<Supervisor>,
    /// Where sessions of transports outside actix's own threads (gRPC) live.
    pub arbiters: SessionArbiters,
    /// Whether the streams keep real time: sessions report to it, the door reads it.
    pub pace: Arc<StreamPace>,
}

/// Threads that run stream sessions for transports outside actix's threads (gRPC runs on a
/// tokio runtime of its own, where no actor can start), used in turn.
pub struct SessionArbiters {
    arbiters: Vec<Arbiter>,
    next: std::sync::atomic::AtomicUsize,
}

impl SessionArbiters {
    pub fn new(threads: usize) -> SessionArbiters {
        SessionArbiters {
            arbiters: (0..threads).map(|_| Arbiter::new()).collect(),
            next: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// The next thread's arbiter.
    pub fn next(&self) -> ArbiterHandle {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.arbiters[i % self.arbiters.len()].handle()
    }
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/v1/streams/{model}").route(web::get().to(open_stream)))
        .service(
            web::resource("/v1/models/{model}/segments").route(web::post().to(segments::segments)),
        );
}

/// Lets the caller in and finds the model, which must serve streams.
async fn stream_model(
    state: &AppState,
    req: &HttpRequest,
    name: &str,
) -> Result<(Pass, ServedModel), ServeError> {
    let peer = req.peer_addr().map(|a| a.ip());
    let (pass, served) = state.admitted(req.headers(), peer, name, None).await?;
    if served.info.stream.is_none() {
        return Err(ServeError::invalid(format!(
            "model '{name}' does not serve streams (its manifest entry has no `stream`)"
        )));
    }
    Ok((pass, served))
}

async fn open_stream(
    state: web::Data<AppState>,
    path: web::Path<String>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, actix_web::Error> {
    // Callers without access, and unknown and non-streaming models, are refused before the
    // upgrade, with a plain HTTP error.
    let name = path.into_inner();
    let (pass, served) = stream_model(&state, &req, &name).await?;
    state
        .access
        .check_version(&pass, &served.info.name, &served.info.version)?;
    let stream_pass = state.access.stream(&pass, &served.info.name)?;
    let caller = open::Caller {
        served,
        pass: pass.without_permit(),
        access: state.access.clone(),
    };
    let (mut response, session, messages) = actix_ws::handle(&req, body)?;
    // A browser that sent its key as a `bearer.<key>` subprotocol also offered `streamserve`,
    // which the handshake must name back (never the key).
    if crate::access::subprotocols(req.headers()).contains(&SUBPROTOCOL) {
        response.headers_mut().insert(
            actix_web::http::header::SEC_WEBSOCKET_PROTOCOL,
            actix_web::http::header::HeaderValue::from_static(SUBPROTOCOL),
        );
    }
    let streams = state.streams.clone();
    let admission = state.admission.clone();
    let messages = messages
        .max_frame_size(MAX_FRAME_BYTES)
        .aggregate_continuations()
        .max_continuation_size(MAX_FRAME_BYTES);
    // An open stream is work in flight: a shutdown waits for it to close (code 1001).
    let work = state.work.begin();
    actix_web::rt::spawn(async move {
        connection(session, messages, caller, streams, stream_pass, admission).await;
        drop(work);
    });
    Ok(response)
}

/// Why a connection ends, from the reader's side.
enum ReadEnd {
    /// The client closed or vanished: keep the stream for a resume.
    Gone,
    /// Close the socket with this code and reason (after an `error` message unless normal).
    Close(CloseCode, String),
    /// The server is shutting down and the session closes the socket after its checkpoint.
    HandedOver,
}

struct ConnectionGauge;
impl ConnectionGauge {
    fn new() -> ConnectionGauge {
        metrics::gauge!("streamserve_stream_connections").increment(1.0);
        ConnectionGauge
    }
}
impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        metrics::gauge!("streamserve_stream_connections").decrement(1.0);
    }
}

async fn connection(
    mut ws: actix_ws::Session,
    mut messages: AggregatedMessageStream,
    caller: open::Caller,
    config: Arc<StreamsConfig>,
    access: StreamPass,
    admission: Arc<AdmissionLimit>,
) {
    let _gauge = ConnectionGauge::new();
    let start = match read_start(&mut ws, &mut messages).await {
        Ok(start) => start,
        Err(ReadEnd::Gone | ReadEnd::HandedOver) => return,
        Err(ReadEnd::Close(code, reason)) => return close_with_error(ws, code, reason).await,
    };
    let resuming = start.stream_id.is_some() || start.resume.is_some();
    // A server short of CPU keeps the streams it has in real time rather than take on more:
    // a new stream is told to retry (1013), a resumed one (already counted here) goes on.
    if !resuming {
        if let Err(refused) = admission.admit_stream() {
            return close_with_error(ws, CloseCode::Again, refused.to_string()).await;
        }
    }
    let opened = match open::open_session(start, caller, &config).await {
        Ok(opened) => opened,
        Err(reason) => return close_with_error(ws, CloseCode::Policy, reason).await,
    };
    let (attached, messages_rx, close_rx) = match opened.attach(OUTGOING_CAPACITY).await {
        Ok(c) => (c.attached, c.messages, c.close),
        Err(AttachError::Refused(reason)) => {
            return close_with_error(ws, CloseCode::Policy, reason).await
        }
        Err(AttachError::Ended) => {
            return close_with_error(ws, CloseCode::Away, "stream has ended".into()).await
        }
    };
    let session = opened.session;
    if resuming {
        tracing::info!(generation = attached.generation, "stream resumed");
    }
    let (reader_close_tx, reader_close_rx) = mpsc::channel(1);
    let mut writer = actix_web::rt::spawn(write_loop(
        ws.clone(),
        messages_rx,
        close_rx,
        reader_close_rx,
    ));
    let limits = ReadLimits {
        access: &access,
        sample_rate: attached.sample_rate.max(1),
    };
    let end = read_loop(&mut ws, &mut messages, &session, &attached, &config, limits).await;
    let mut writer_done = false;
    match end {
        ReadEnd::Close(code, reason) => {
            let _ = reader_close_tx.send((code, reason)).await;
        }
        // The session writes its last checkpoint and closes; the reader's side stays open
        // until then (a dropped reader side ends the writer at once).
        ReadEnd::HandedOver => {
            writer_done = tokio::time::timeout(HANDOVER_WAIT, &mut writer)
                .await
                .is_ok();
        }
        ReadEnd::Gone => {}
    }
    session.do_send(Detach {
        generation: attached.generation,
    });
    drop(reader_close_tx);
    if !writer_done {
        let _ = writer.await;
    }
}

async fn read_start(
    ws: &mut actix_ws::Session,
    messages: &mut AggregatedMessageStream,
) -> Result<StartMessage, ReadEnd> {
    loop {
        let next = tokio::time::timeout(START_TIMEOUT, messages.recv())
            .await
            .map_err(|_| {
                ReadEnd::Close(CloseCode::Policy, "no start message within 10 s".into())
            })?;
        match counted(next) {
            None | Some(Ok(AggregatedMessage::Close(_))) => return Err(ReadEnd::Gone),
            Some(Err(e)) => return Err(protocol_error(e)),
            Some(Ok(AggregatedMessage::Ping(bytes))) => {
                let _ = pong(ws, &bytes).await;
            }
            Some(Ok(AggregatedMessage::Pong(_))) => {}
            Some(Ok(AggregatedMessage::Binary(_))) => {
                return Err(ReadEnd::Close(
                    CloseCode::Unsupported,
                    "send a start message before any audio".into(),
                ))
            }
            Some(Ok(AggregatedMessage::Text(text))) => {
                return match serde_json::from_str::<ClientMessage>(&text) {
                    Ok(ClientMessage::Start(start)) => Ok(start),
                    Ok(ClientMessage::End) => Err(ReadEnd::Close(
                        CloseCode::Policy,
                        "the first message must be a start message".into(),
                    )),
                    Err(e) => Err(ReadEnd::Close(
                        CloseCode::Invalid,
                        format!("malformed start message: {e}"),
                    )),
                };
            }
        }
    }
}

/// What bounds a connection's audio: its key's audio per minute, at the stream's rate.
#[derive(Clone, Copy)]
struct ReadLimits<'a> {
    access: &'a StreamPass,
    sample_rate: u32,
}

async fn read_loop(
    ws: &mut actix_ws::Session,
    messages: &mut AggregatedMessageStream,
    session: &Addr<StreamSession>,
    attached: &Attached,
    config: &StreamsConfig,
    limits: ReadLimits<'_>,
) -> ReadEnd {
    let mut shutdown = config.shutdown.clone();
    let stopping = async {
        // A dropped sender means nobody will ever ask for a shutdown, not that one began.
        if shutdown.wait_for(|stopping| *stopping).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let mut stopping = std::pin::pin!(stopping);
    // Idle means no message since the reader last began to wait for one.
    let mut idle = IdleTimer::new(config.idle_timeout);
    loop {
        let next = tokio::select! {
            // In this order: a shutdown first, then a message that is already here before
            // the idle timer, so that a reader running late never calls a stream idle that
            // sent in time.
            biased;
            _ = &mut stopping => {
                if attached.checkpoints {
                    // The session sends a last checkpoint and closes with 1001 itself.
                    session.do_send(Handover);
                    return ReadEnd::HandedOver;
                }
                return ReadEnd::Close(CloseCode::Away, "server is shutting down; reconnect to another instance".into());
            }
            next = messages.recv() => counted(next),
            _ = idle.expired() => {
                metrics::counter!("streamserve_stream_drops_total", "reason" => "idle")
                    .increment(1);
                return ReadEnd::Close(
                    CloseCode::Policy,
                    format!("no message for {} s", config.idle_timeout.as_secs()),
                );
            }
        };
        idle.touch();
        let message = match next {
            None => return ReadEnd::Gone,
            Some(Err(e)) => return protocol_error(e),
            Some(Ok(message)) => message,
        };
        match message {
            AggregatedMessage::Binary(bytes) => {
                let samples = match attached.format.decode(&bytes) {
                    Ok(samples) => samples,
                    Err(reason) => return ReadEnd::Close(CloseCode::Invalid, reason),
                };
                if samples.is_empty() {
                    continue;
                }
                if samples.len() > AUDIO_CREDITS {
                    return ReadEnd::Close(CloseCode::Size, "audio frame too long".into());
                }
                if let Err(e) = limits.access.audio_samples(samples.len(), limits.sample_rate) {
                    return ReadEnd::Close(CloseCode::Again, e.to_string());
                }
                // Backpressure: wait until the session has room for this audio.
                match attached.credits.acquire_many(samples.len() as u32).await {
                    Ok(permit) => permit.forget(),
                    Err(_) => return ReadEnd::Gone,
                }
                // The wait for room is the server's, not the client's idleness.
                idle.touch();
                session.do_send(Audio(samples));
            }
            AggregatedMessage::Text(text) => match serde_json::from_str::<ClientMessage>(&text) {
                Ok(ClientMessage::End) => session.do_send(End),
                Ok(ClientMessage::Start(_)) => {
                    return ReadEnd::Close(CloseCode::Policy, "stream already started; send audio or end".into())
                }
                Err(e) => {
                    return ReadEnd::Close(
                        CloseCode::Invalid,
                        format!("text messages must be {{\"type\":\"end\"}}; audio goes in binary frames ({e})"),
                    )
                }
            },
            AggregatedMessage::Ping(bytes) => {
                let _ = pong(ws, &bytes).await;
                idle.touch();
            }
            AggregatedMessage::Pong(_) => {}
            AggregatedMessage::Close(_) => return ReadEnd::Gone,
        }
    }
}

/// Counts a message read: its payload's bytes (`streamserve_received_bytes_total`).
fn counted<E>(next: Option<Result<AggregatedMessage, E>>) -> Option<Result<AggregatedMessage, E>> {
    if let Some(Ok(message)) = &next {
        let bytes = match message {
            AggregatedMessage::Text(text) => text.len(),
            AggregatedMessage::Binary(bytes)
            | AggregatedMessage::Ping(bytes)
            | AggregatedMessage::Pong(bytes) => bytes.len(),
            AggregatedMessage::Close(_) => 0,
        };
        traffic::received(Protocol::WebSocket, bytes);
    }
    next
}

/// Sends a text message, counting its payload (`streamserve_sent_bytes_total`).
async fn send_text(
    ws: &mut actix_ws::Session,
    text: impl Into<ByteString>,
) -> Result<(), actix_ws::Closed> {
    let text = text.into();
    traffic::sent(Protocol::WebSocket, text.len());
    ws.text(text).await
}

/// Answers a ping, counting the pong's payload.
async fn pong(ws: &mut actix_ws::Session, bytes: &[u8]) -> Result<(), actix_ws::Closed> {
    traffic::sent(Protocol::WebSocket, bytes.len());
    ws.pong(bytes).await
}

fn protocol_error(error: ProtocolError) -> ReadEnd {
    match error {
        ProtocolError::Overflow => ReadEnd::Close(
            CloseCode::Size,
            format!("frame larger than {MAX_FRAME_BYTES} bytes"),
        ),
        // actix-ws reports these two as I/O errors (tests/bad_input_ws.rs pins the mapping): a
        // message over the limit in fragments each under it, and text that is not UTF-8.
        ProtocolError::Io(e) if e.to_string().contains("maximum continuation size") => {
            ReadEnd::Close(
                CloseCode::Size,
                format!("message larger than {MAX_FRAME_BYTES} bytes"),
            )
        }
        ProtocolError::Io(e) if e.kind() == std::io::ErrorKind::InvalidData => ReadEnd::Close(
            CloseCode::Invalid,
            format!("text message is not UTF-8 ({e})"),
        ),
        other => ReadEnd::Close(CloseCode::Protocol, other.to_string()),
    }
}

async fn write_loop(
    mut ws: actix_ws::Session,
    mut messages: mpsc::Receiver<ByteString>,
    mut session_close: oneshot::Receiver<(CloseCode, String)>,
    mut reader_close: mpsc::Receiver<(CloseCode, String)>,
) {
    let (code, reason) = loop {
        tokio::select! {
            biased;
            // The reader's reason first: it detaches from the session right after, which
            // closes `messages`, and the close must say why rather than "stream closed".
            close = reader_close.recv() => match close {
                Some((code, reason)) => {
                    let error = ServerMessage::Error { code: error_code(code), message: &reason }.to_json();
                    let _ = send_text(&mut ws, error).await;
                    break (code, reason);
                }
                None => return,
            },
            message = messages.recv() => match message {
                Some(text) => {
                    match tokio::time::timeout(WRITE_TIMEOUT, send_text(&mut ws, text)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return,
                        Err(_) => {
                            metrics::counter!("streamserve_stream_drops_total", "reason" => "write_timeout").increment(1);
                            break (CloseCode::Policy, "client is not reading results; resume to continue".to_string());
                        }
                    }
                }
                // The session let go of this connection; it may have said why just before.
                None => break session_close.try_recv().unwrap_or((CloseCode::Away, "stream closed".to_string())),
            },
            close = &mut session_close => {
                // Send what the session queued before it asked to close (e.g. the summary).
                while let Ok(text) = messages.try_recv() {
                    if send_text(&mut ws, text).await.is_err() {
                        return;
                    }
                }
                break close.unwrap_or((CloseCode::Away, "stream closed".into()));
            }
        }
    };
    let _ = ws
        .close(Some(CloseReason {
            code,
            description: Some(truncate(reason)),
        }))
        .await;
}

async fn close_with_error(mut ws: actix_ws::Session, code: CloseCode, reason: String) {
    let error = ServerMessage::Error {
        code: error_code(code),
        message: &reason,
    }
    .to_json();
    let _ = send_text(&mut ws, error).await;
    let _ = ws
        .close(Some(CloseReason {
            code,
            description: Some(truncate(reason)),
        }))
        .await;
}

fn error_code(code: CloseCode) -> &'static str {
    match code {
        CloseCode::Invalid => "invalid_data",
        CloseCode::Unsupported => "unsupported_data",
        CloseCode::Size => "too_large",
        CloseCode::Away => "going_away",
        CloseCode::Protocol => "protocol_error",
        CloseCode::Again => "try_again",
        _ => "policy",
    }
}

/// Close reasons must fit a control frame (123 bytes).
fn truncate(mut reason: String) -> String {
    if reason.len() > 120 {
        let mut cut = 120;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
    reason
}
