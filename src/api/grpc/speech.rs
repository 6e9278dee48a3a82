//! `streamserve.speech.v1.Speech`: the speech call shapes Triton's protocol has no room for,
//! on the same stream session as every other speech stream (batched across streams with
//! them). `Segments` is server streaming (a WAV file in, speech events out as they are found,
//! then the summary); `Summarize` is client streaming (audio in pieces, the summary out).
//! Bidirectional speech streams are Triton's sequences on `ModelStreamInfer` (`sequence/`).

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bytestring::ByteString;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

use super::proto::speech::speech_server::Speech;
use super::proto::speech::*;
use crate::access::StreamPass;
use crate::actors::stream_session::{
    feed, Attach, Connection, Detach, End, FeedError, StreamModels, StreamParams, StreamSession,
    AUDIO_CREDITS,
};
use crate::api::door::limit::StreamRefused;
use crate::api::AppState;
use crate::error::ServeError;
use crate::manifest::StreamKind;
use crate::stream::audio::{read_wav, SampleFormat};
use crate::stream::keyword::KeywordOptions;
use crate::stream::protocol::{ResultsMode, SegmentSecs, SentMessage as Sent};

/// Longest a call waits for the model between two events.
const EVENT_WAIT: Duration = Duration::from_secs(60);

pub struct SpeechService {
    pub state: Arc<AppState>,
}

/// A session running for one call, and the messages it writes.
struct Running {
    session: Addr<StreamSession>,
    messages: mpsc::Receiver<ByteString>,
    credits: Arc<tokio::sync::Semaphore>,
    generation: u64,
    model: String,
    version: String,
    _access: StreamPass,
}

fn vad_options(vad: Option<VadOptions>) -> crate::stream::vad::VadOptions {
    let defaults = crate::stream::vad::VadOptions::default();
    let vad = vad.unwrap_or_default();
    crate::stream::vad::VadOptions {
        threshold: vad.threshold.unwrap_or(defaults.threshold),
        neg_threshold: vad.neg_threshold,
        min_speech_ms: vad.min_speech_ms.unwrap_or(defaults.min_speech_ms),
        min_silence_ms: vad.min_silence_ms.unwrap_or(defaults.min_silence_ms),
        speech_pad_ms: vad.speech_pad_ms.unwrap_or(defaults.speech_pad_ms),
    }
}

impl SpeechService {
    /// Lets the caller in and starts a session on `model` (events and summary only).
    async fn open(
        &self,
        metadata: &MetadataMap,
        peer: Option<IpAddr>,
        model: &str,
        sample_rate: u32,
        vad: Option<VadOptions>,
        capacity: usize,
    ) -> Result<Running, Status> {
        let state = &self.state;
        let (pass, served) = state.admitted(metadata, peer, model, None).await?;
        if served.info.stream_kind() != Some(StreamKind::Vad) {
            return Err(ServeError::invalid(format!(
                "model '{}' does not serve streams (it has no `stream = \"vad\"` in the manifest)",
                served.info.name
            ))
            .into());
        }
        state
            .access
            .check_version(&pass, &served.info.name, &served.info.version)?;
        let access = state.access.stream(&pass, &served.info.name)?;
        if let Err(refused) = state.admission.admit_stream() {
            let retry_after = Duration::from_secs(1);
            return Err(match refused {
                StreamRefused::AtLimit => ServeError::Busy {
                    limit: state.admission.limit(),
                    retry_after,
                },
                StreamRefused::StreamsBehind => ServeError::StreamsBehind { retry_after },
            }
            .into());
        }
        let params = StreamParams {
            sample_rate,
            format: SampleFormat::F32,
            results: ResultsMode::Events,
            vad: vad_options(vad),
            keyword: KeywordOptions::default(),
            gate: true,
            resume_window: Duration::ZERO,
            keys: state.streams.keys.clone(),
            checkpoint_samples: 0,
            pace: Some(state.streams.pace.clone()),
        };
        let (model, version) = (served.info.name.clone(), served.info.version.clone());
        let id: Arc<str> = uuid::Uuid::new_v4().simple().to_string().into();
        let session = StreamSession::new(id, StreamModels::alone(served), params, None)
            .map_err(|e| Status::from(ServeError::invalid(e)))?;
        // An actor starts on an actix thread, not on gRPC's runtime.
        let (started_tx, started) = oneshot::channel();
        state.streams.arbiters.next().spawn_fn(move || {
            let _ = started_tx.send(session.start());
        });
        let session = started
            .await
            .map_err(|_| Status::unavailable("the server is stopping"))?;
        // Past `capacity` messages waiting, the session cuts the call loose as a client that
        // does not read (and its summary is lost): each caller keeps below it.
        let (tx, messages) = mpsc::channel(capacity);
        let (close, _) = oneshot::channel();
        let attach = Attach {
            connection: Connection {
                messages: tx,
                close,
            },
            last_seq: None,
            token_counter: None,
            // A new stream, its steps the first to reach its versions.
            catalog: None,
        };
        let attached = session
            .send(attach)
            .await
            .map_err(|_| Status::unavailable("the stream session stopped"))?
            .map_err(|e| Status::from(ServeError::Inference(e.to_string())))?;
        Ok(Running {
            session,
            messages,
            credits: attached.credits,
            generation: attached.generation,
            model,
            version,
            _access: access,
        })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // A call that ends early (an error, a client gone) stops its session: these streams
        // do not resume (their resume window is zero).
        self.session.do_send(Detach {
            generation: self.generation,
        });
    }
}

impl Running {
    /// Hands `samples` to the session as it has room for them (backpressure on the caller).
    async fn feed(&self, samples: Vec<f32>) -> Result<(), Status> {
        fed_status(feed(&self.session, &self.credits, samples, EVENT_WAIT).await)
    }

    /// [`feed`](Self::feed), taking the session's messages meanwhile: for a call that answers
    /// with the summary only, whose events (two a speech segment, thousands in an hour's
    /// recording) would otherwise wait unread until the audio is over, fill the session's
    /// queue, and have the call cut loose without its summary. An `error` the stream sent
    /// (its model failed) is the call's answer.
    async fn feed_skipping_events(&mut self, samples: Vec<f32>) -> Result<(), Status> {
        let fed = feed(&self.session, &self.credits, samples, EVENT_WAIT);
        let mut fed = std::pin::pin!(fed);
        loop {
            tokio::select! {
                // The session's messages first: what it sent before it stopped explains why.
                biased;
                text = self.messages.recv() => match text.as_deref().map(serde_json::from_str::<Sent>) {
                    Some(Ok(Sent::Error { message })) => return Err(Status::unavailable(message)),
                    Some(_) => {}
                    None => return Err(Status::internal("the stream ended without a summary")),
                },
                fed = &mut fed => return fed_status(fed),
            }
        }
    }

    /// The next event or the summary (`None`: the session's other messages are skipped).
    async fn next(&mut self) -> Result<Option<speech_event::Event>, Status> {
        loop {
            let text = match tokio::time::timeout(EVENT_WAIT, self.messages.recv()).await {
                Ok(Some(text)) => text,
                Ok(None) => return Err(Status::internal("the stream ended without a summary")),
                Err(_) => {
                    return Err(Status::deadline_exceeded(
                        "no result from the model for 60 s",
                    ))
                }
            };
            let Ok(sent) = serde_json::from_str::<Sent>(&text) else {
                return Err(Status::internal("an unreadable stream message"));
            };
            return Ok(Some(match sent {
                Sent::SpeechStart { t, .. } => speech_event::Event::SpeechStart(t),
                Sent::SpeechEnd { t, .. } => speech_event::Event::SpeechEnd(t),
                Sent::Summary {
                    duration,
                    chunks,
                    segments,
                    ..
                } => speech_event::Event::Summary(self.summary(duration, chunks, &segments)),
                Sent::Error { message } => return Err(Status::unavailable(message)),
                Sent::Started { .. }
                | Sent::Checkpoint { .. }
                | Sent::Vad { .. }
                | Sent::Score { .. }
                | Sent::Keyword { .. } => continue,
            }));
        }
    }

    fn summary(&self, duration: f64, chunks: u64, segments: &[SegmentSecs]) -> Summary {
        Summary {
            model: self.model.clone(),
            version: self.version.clone(),
            duration,
            chunks,
            segments: segments
                .iter()
                .map(|s| Segment {
                    start: s.start,
                    end: s.end,
                })
                .collect(),
        }
    }
}

/// How audio given to a session went, as the call's status.
fn fed_status(fed: Result<(), FeedError>) -> Result<(), Status> {
    match fed {
        Ok(()) => Ok(()),
        Err(FeedError::Ended) => Err(Status::internal("the stream session stopped")),
        Err(FeedError::Stalled) => Err(Status::deadline_exceeded(
            "the model took no audio for 60 s",
        )),
    }
}

/// A piece's audio: PCM16 bytes or float samples in [-1, 1], one of the two.
fn piece_audio(piece: AudioPiece) -> Result<Vec<f32>, Status> {
    match (piece.pcm16.is_empty(), piece.samples.is_empty()) {
        (true, true) => Ok(Vec::new()),
        (false, false) => Err(Status::invalid_argument(
            "a piece has pcm16 or samples, not both",
        )),
        (false, true) => SampleFormat::Pcm16
            .decode(&piece.pcm16)
            .map_err(Status::invalid_argument),
        (true, false) => match piece
            .samples
            .iter()
            .position(|v| !(v.is_finite() && (-1.0..=1.0).contains(v)))
        {
            Some(i) => Err(Status::invalid_argument(format!(
                "sample {i} of the piece is {}, outside [-1, 1]",
                piece.samples[i]
            ))),
            None => Ok(piece.samples),
        },
    }
}

type Events = Pin<Box<dyn futures_util::Stream<Item = Result<SpeechEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Speech for Arc<SpeechService> {
    type SegmentsStream = Events;

    async fn segments(
        &self,
        request: Request<SegmentsRequest>,
    ) -> Result<Response<Events>, Status> {
        let peer = request.remote_addr().map(|a| a.ip());
        let (metadata, _, request) = request.into_parts();
        let wav = read_wav(&request.wav).map_err(Status::invalid_argument)?;
        // The whole file goes in before its events are read: room for every one it can have
        // (two a chunk at most), as the one-shot endpoint has.
        let capacity = wav.samples.len() / 128 + 16;
        let mut running = self
            .open(
                &metadata,
                peer,
                &request.model,
                wav.sample_rate,
                request.vad,
                capacity,
            )
            .await?;
        running
            ._access
            .audio_samples(wav.samples.len(), wav.sample_rate)?;
        let (tx, rx) = mpsc::channel(64);
        let work = self.state.work.begin();
        tokio::spawn(async move {
            let _work = work;
            let fed = running.feed(wav.samples).await;
            running.session.do_send(End);
            if let Err(status) = fed {
                let _ = tx.send(Err(status)).await;
                return;
            }
            loop {
                let event = running.next().await;
                let last = matches!(event, Ok(Some(speech_event::Event::Summary(_))) | Err(_));
                let item = event.map(|event| SpeechEvent { event });
                if last {
                    // The stream's place goes back before the client hears it is over.
                    drop(running);
                    let _ = tx.send(item).await;
                    return;
                }
                if tx.send(item).await.is_err() {
                    return; // the client went away
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn summarize(
        &self,
        request: Request<Streaming<AudioPiece>>,
    ) -> Result<Response<Summary>, Status> {
        let peer = request.remote_addr().map(|a| a.ip());
        let (metadata, _, mut pieces) = request.into_parts();
        let Some(first) = pieces.message().await? else {
            return Err(Status::invalid_argument(
                "no audio: the first piece names the model and its sample rate",
            ));
        };
        if first.model.is_empty() {
            return Err(Status::invalid_argument("the first piece names the model"));
        }
        let rate = if first.sample_rate == 0 {
            16000
        } else {
            first.sample_rate
        };
        let _work = self.state.work.begin();
        // Its events are taken as its audio goes in (`feed_skipping_events`): what waits
        // unread is what the session steps from its audio buffer while the call waits for
        // the client's next piece (two events a chunk at most: 512 at 8 kHz), twice over.
        let capacity = 4 * AUDIO_CREDITS / 256 + 16;
        let mut running = self
            .open(&metadata, peer, &first.model, rate, first.vad, capacity)
            .await?;
        let mut piece = Some(first);
        while let Some(next) = piece.take() {
            if !next.model.is_empty() && next.model != running.model {
                return Err(Status::invalid_argument(
                    "only the first piece names the model",
                ));
            }
            let samples = piece_audio(next)?;
            running._access.audio_samples(samples.len(), rate)?;
            running.feed_skipping_events(samples).await?;
            piece = pieces.message().await?;
        }
        running.session.do_send(End);
        loop {
            if let Some(speech_event::Event::Summary(summary)) = running.next().await? {
                return Ok(Response::new(summary));
            }
        }
    }
}
