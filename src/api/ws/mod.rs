//! Speech streams over WebSocket (`GET /v1/streams/{model}`) and the one-shot form of the same
//! pipeline (`POST /v1/models/{model}/segments` with a WAV body).
//!
//! This file is the transport only: it parses frames into `StreamSession` messages and writes
//! the session's messages back; `open.rs` finds or makes the session a `start` asks for, and
//! `segments.rs` is the one-shot endpoint. Each connection is two tasks: a reader (start
//! message, audio,
//! `end`; it stops reading while the session holds its audio budget, which is the backpressure
//! a too-fast client feels) and a writer (`write.rs`: results and pongs out, with a deadline
//! per write, so a client that stops reading is dropped without holding anything else up; the
//! reader never writes once the stream has started). The client's bytes pass a guard that
//! refuses an oversized frame by its header (`frame_limit.rs`), and a client that stops taking
//! the server's bytes is dropped by the kernel (`stall.rs`).

mod frame_limit;
pub(super) mod open;
mod segments;
mod stall;
mod write;

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use actix_web::{web, FromRequest, HttpRequest, HttpResponse};
use actix_ws::{AggregatedMessage, AggregatedMessageStream, CloseCode, ProtocolError};
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

use super::door::limit::AdmissionLimit;
use super::AppState;
use crate::access::{Pass, StreamPass};
use crate::actors::catalog::ServedModel;
use crate::actors::catalog::SharedCatalog;
use crate::actors::stream_hub::StreamHub;
use crate::actors::stream_session::{
    Attached, AudioFrom, Detach, EndFrom, Handover, StreamSession, AUDIO_CREDITS,
};
use crate::actors::supervisor::Supervisor;
use crate::error::ServeError;
use crate::machine::traffic::{self, Protocol};
use crate::stream::checkpoint::TokenKeys;
use crate::stream::idle::IdleTimer;
use crate::stream::pace::StreamPace;
use crate::stream::protocol::{ClientMessage, StartMessage};
use open::AttachError;

/// Largest WebSocket frame (and reassembled message) accepted.
pub const MAX_FRAME_BYTES: usize = 64 * 1024;
const START_TIMEOUT: Duration = Duration::from_secs(10);
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
    // The key's open streams are counted by their sessions: a new stream's place is taken
    // once `start` says it is new (a resume of one the key holds takes none, and is never
    // refused for it, though its old connection may still be open).
    let stream_pass = state.access.stream_allowance(&pass);
    let caller = open::Caller {
        served,
        pass: pass.without_permit(),
        access: state.access.clone(),
    };
    // actix-ws checks a frame's size only once all of it has arrived: the guard refuses it by
    // its header, before buffering any of it.
    let guarded = frame_limit::FrameLimit::new(body.into_inner(), MAX_FRAME_BYTES);
    let mut guarded = actix_web::dev::Payload::from(frame_limit::boxed(guarded));
    let body = web::Payload::from_request(&req, &mut guarded).await?;
    let (mut response, session, messages) = actix_ws::handle(&req, body)?;
    // The handshake is good and this is a stream's connection now: one whose client stops
    // taking its bytes is dropped by the kernel (stall.rs).
    stall::drop_when_stalled(&req);
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
    /// The session stopped (it takes no more audio), and closes the socket itself.
    SessionStopped,
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
        Err(ReadEnd::Gone | ReadEnd::HandedOver | ReadEnd::SessionStopped) => return,
        Err(ReadEnd::Close(code, reason)) => {
            return write::close_with_error(ws, code, reason).await
        }
    };
    let resuming = start.stream_id.is_some() || start.resume.is_some();
    // A server short of CPU keeps the streams it has in real time rather than take on more:
    // a new stream is told to retry (1013), a resumed one (already counted here) goes on.
    if !resuming {
        if let Err(refused) = admission.admit_stream() {
            return write::close_with_error(ws, CloseCode::Again, refused.to_string()).await;
        }
    }
    let opened = match open::open_stream(start, caller, &config).await {
        Ok(open::Outcome::Session(opened)) => opened,
        Ok(open::Outcome::Ended(replay)) => return write::replay_ended(ws, replay).await,
        Err(refused) => {
            return write::close_with_error(ws, refused.close_code(), refused.to_string()).await
        }
    };
    let (attached, messages_rx, close_rx) = match opened.attach(OUTGOING_CAPACITY).await {
        Ok(c) => (c.attached, c.messages, c.close),
        Err(AttachError::Refused(reason)) => {
            return write::close_with_error(ws, CloseCode::Policy, reason).await
        }
        Err(AttachError::Ended) => {
            return write::close_with_error(ws, CloseCode::Away, "stream has ended".into()).await
        }
        // The stream ended with its summary as this resume came: what the client missed.
        Err(AttachError::EndedHere(replay)) => return write::replay_ended(ws, replay).await,
    };
    let session = opened.session;
    let (reader_close_tx, reader_close_rx) = mpsc::channel(1);
    let (pongs, pongs_rx) = mpsc::channel(write::PONGS_QUEUED);
    let (session_close, mut session_let_go) = relay_close(close_rx);
    let mut writer = actix_web::rt::spawn(write::write_loop(
        ws.clone(),
        write::Outgoing {
            messages: messages_rx,
            session_close,
            reader_close: reader_close_rx,
            pongs: pongs_rx,
        },
    ));
    let limits = ReadLimits {
        access: &access,
        sample_rate: attached.sample_rate.max(1),
    };
    // The connection can end on the other side first: the session let go of the stream (its
    // end, a newer connection, a client not reading its results), or the writer gave up on a
    // client that took nothing for its write timeout. Then nothing more is read: the client's
    // audio would go nowhere.
    let reading = read_loop(&mut messages, &pongs, &session, &attached, &config, limits);
    let (end, mut let_go, mut writer_done) = tokio::select! {
        end = reading => (end, false, false),
        _ = &mut session_let_go => (ReadEnd::Gone, true, false),
        _ = &mut writer => (ReadEnd::Gone, false, true),
    };
    // The session stopped while the reader waited for room for its audio: its word to close
    // (a handover's, say) is on its way to the writer, which must send it rather than be
    // ended as for a client that is gone. The word comes at once, or none will (a session
    // that dropped the connection unsaid lets go the same instant).
    let end = match end {
        ReadEnd::SessionStopped => {
            let _ = tokio::time::timeout(HANDOVER_WAIT, &mut session_let_go).await;
            let_go = true;
            ReadEnd::Gone
        }
        end => end,
    };
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
        ReadEnd::Gone | ReadEnd::SessionStopped => {}
    }
    session.do_send(Detach {
        generation: attached.generation,
    });
    // A dropped reader side ends the writer at once, without a close: for a client that is
    // gone, not for one the session let go of (the writer sends it what the session said).
    if !let_go {
        drop(reader_close_tx);
    }
    if !writer_done {
        // Not long: each of its writes has a deadline.
        let _ = writer.await;
    }
    // The last handles on the connection go with this task (the client's frames, the
    // session's sender): actix then ends the response and closes the socket; a client that
    // stopped reading blocks that close, and the kernel ends its connection (stall.rs).
}

/// Passes the session's word that it let go of the connection on to the writer (which sends
/// it as the close); the other receiver completes at the same time, to stop the reader.
fn relay_close(
    close: oneshot::Receiver<(CloseCode, String)>,
) -> (
    oneshot::Receiver<(CloseCode, String)>,
    oneshot::Receiver<()>,
) {
    let (to_writer, for_writer) = oneshot::channel();
    let (let_go, reader_stops) = oneshot::channel::<()>();
    actix_web::rt::spawn(async move {
        // An error: the session dropped the connection without a word (the writer says
        // "stream closed").
        if let Ok(close) = close.await {
            let _ = to_writer.send(close);
        }
        drop(let_go);
    });
    (for_writer, reader_stops)
}

async fn read_start(
    ws: &mut actix_ws::Session,
    messages: &mut AggregatedMessageStream,
) -> Result<StartMessage, ReadEnd> {
    // Within START_TIMEOUT of the upgrade, however many pings come first.
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    let late = || ReadEnd::Close(CloseCode::Policy, "no start message within 10 s".into());
    loop {
        let next = tokio::time::timeout_at(deadline, messages.recv())
            .await
            .map_err(|_| late())?;
        match counted(next) {
            None | Some(Ok(AggregatedMessage::Close(_))) => return Err(ReadEnd::Gone),
            Some(Err(e)) => return Err(protocol_error(e)),
            // A client that does not read its pongs holds the reader no longer than that.
            Some(Ok(AggregatedMessage::Ping(bytes))) => {
                let _ = tokio::time::timeout_at(deadline, write::pong(ws, &bytes))
                    .await
                    .map_err(|_| late())?;
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
    messages: &mut AggregatedMessageStream,
    pongs: &mpsc::Sender<Bytes>,
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
    // Idle means no audio (nor `end`) since the reader last began to wait for some: pings
    // and pongs do not keep a stream open.
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
                    format!("no audio for {} s", config.idle_timeout.as_secs()),
                );
            }
        };
        let message = match next {
            None => return ReadEnd::Gone,
            Some(Err(e)) => return protocol_error(e),
            Some(Ok(message)) => message,
        };
        // Text is `end`, or closes the stream: either way the client was not idle.
        if let AggregatedMessage::Text(_) = message {
            idle.touch();
        }
        match message {
            AggregatedMessage::Binary(bytes) => {
                let samples = match attached.format.decode(&bytes) {
                    Ok(samples) => samples,
                    Err(reason) => return ReadEnd::Close(CloseCode::Invalid, reason),
                };
                if samples.is_empty() {
                    continue;
                }
                idle.touch();
                if samples.len() > AUDIO_CREDITS {
                    return ReadEnd::Close(CloseCode::Size, "audio frame too long".into());
                }
                if let Err(e) = limits.access.audio_samples(samples.len(), limits.sample_rate) {
                    // Over the key's audio rate, a later frame may pass: 1013, try again. A
                    // frame of more audio than the rate ever lets through never will: 1008.
                    let never = matches!(e, ServeError::InvalidRequest(_));
                    let code = if never { CloseCode::Policy } else { CloseCode::Again };
                    return ReadEnd::Close(code, e.to_string());
                }
                // Backpressure: wait until the session has room for this audio.
                match attached.credits.acquire_many(samples.len() as u32).await {
                    Ok(permit) => permit.forget(),
                    Err(_) => return ReadEnd::SessionStopped,
                }
                // The wait for room is the server's, not the client's idleness.
                idle.touch();
                // Dropped by the session (its credits given back) if a resume superseded
                // this connection meanwhile.
                session.do_send(AudioFrom {
                    generation: attached.generation,
                    samples,
                });
            }
            AggregatedMessage::Text(text) => match serde_json::from_str::<ClientMessage>(&text) {
                // Ignored if a resume superseded this connection: the stream is the newer one's.
                Ok(ClientMessage::End) => session.do_send(EndFrom {
                    generation: attached.generation,
                    done: None,
                }),
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
            // Answered by the writer; when it has pongs enough waiting, not at all: the
            // reader never waits on a client that does not read.
            AggregatedMessage::Ping(bytes) => {
                let _ = pongs.try_send(bytes);
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

fn protocol_error(error: ProtocolError) -> ReadEnd {
    if let Some(too_large) = frame_limit::frame_too_large(&error) {
        return ReadEnd::Close(CloseCode::Size, too_large.to_string());
    }
    match error {
        ProtocolError::Overflow => ReadEnd::Close(
            CloseCode::Size,
            format!("frame larger than {MAX_FRAME_BYTES} bytes"),
        ),
        // actix-ws reports these as I/O errors (tests/behaviour/bad_input_ws.rs pins the mapping): a
        // message over the limit in fragments each under it, text that is not UTF-8, and (its
        // other invalid data) a frame with reserved bits set, a protocol error.
        ProtocolError::Io(e) if e.to_string().contains("maximum continuation size") => {
            ReadEnd::Close(
                CloseCode::Size,
                format!("message larger than {MAX_FRAME_BYTES} bytes"),
            )
        }
        ProtocolError::Io(e) if e.kind() == std::io::ErrorKind::InvalidData && not_utf8(&e) => {
            ReadEnd::Close(
                CloseCode::Invalid,
                format!("text message is not UTF-8 ({e})"),
            )
        }
        // Reserved bits set, say ("I/O error: " says nothing to the client).
        ProtocolError::Io(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            ReadEnd::Close(CloseCode::Protocol, e.to_string())
        }
        other => ReadEnd::Close(CloseCode::Protocol, other.to_string()),
    }
}

/// Whether actix-ws's invalid data is text that is not UTF-8: a frame's (a `Utf8Error`) or a
/// fragmented message's (its text).
fn not_utf8(error: &std::io::Error) -> bool {
    error
        .get_ref()
        .is_some_and(|inner| inner.is::<std::str::Utf8Error>())
        || error.to_string().contains("utf-8")
}
