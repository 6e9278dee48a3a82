//! `POST /v1/models/{model}/segments` with a WAV body: the one-shot form of a speech stream.
//! The file runs through a stream session like a live stream's (same batching, same VAD), its
//! events are collected, and the answer is the speech segments as JSON.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use super::stream_model;
use crate::actors::stream_session::{
    Attach, Audio, Connection, End, StreamModels, StreamParams, StreamSession,
};
use crate::api::AppState;
use crate::error::ServeError;
use crate::manifest::StreamKind;
use crate::stream::audio::{read_wav, SampleFormat};
use crate::stream::keyword::KeywordOptions;
use crate::stream::protocol::ResultsMode;
use crate::stream::vad::VadOptions;

/// VAD options for the one-shot endpoint, from the query string.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SegmentsQuery {
    threshold: Option<f32>,
    neg_threshold: Option<f32>,
    min_speech_ms: Option<u32>,
    min_silence_ms: Option<u32>,
    speech_pad_ms: Option<u32>,
}

/// `POST /v1/models/{model}/segments` with a WAV body: the speech segments as JSON, computed by
/// the same session and batching path as a live stream.
pub(super) async fn segments(
    state: web::Data<AppState>,
    path: web::Path<String>,
    query: web::Query<SegmentsQuery>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, ServeError> {
    let name = path.into_inner();
    let (pass, served) = stream_model(&state, &req, &name).await?;
    if served.info.stream_kind() != Some(StreamKind::Vad) {
        return Err(ServeError::invalid(format!(
            "model '{name}' is not a voice activity model: segments come from a `stream = \"vad\"` model"
        )));
    }
    state
        .access
        .check_version(&pass, &served.info.name, &served.info.version)?;
    let body = crate::api::body::read(&req, body, &state.body_limits(state.max_body_bytes)).await?;
    let wav = read_wav(&body.bytes).map_err(ServeError::invalid)?;
    drop(body);
    // A one-shot file is a stream for the key's limits: a place among its streams while it
    // runs, and its audio against the key's audio per minute.
    let stream_pass = state.access.stream(&pass, &served.info.name)?;
    stream_pass.audio_samples(wav.samples.len(), wav.sample_rate)?;
    let defaults = VadOptions::default();
    let q = query.into_inner();
    let vad = VadOptions {
        threshold: q.threshold.unwrap_or(defaults.threshold),
        neg_threshold: q.neg_threshold,
        min_speech_ms: q.min_speech_ms.unwrap_or(defaults.min_speech_ms),
        min_silence_ms: q.min_silence_ms.unwrap_or(defaults.min_silence_ms),
        speech_pad_ms: q.speech_pad_ms.unwrap_or(defaults.speech_pad_ms),
    };
    let params = StreamParams {
        sample_rate: wav.sample_rate,
        format: SampleFormat::F32,
        results: ResultsMode::Events,
        vad,
        keyword: KeywordOptions::default(),
        gate: true,
        resume_window: Duration::ZERO,
        keys: state.streams.keys.clone(),
        checkpoint_samples: 0,
        // A whole file, stepped as fast as the models go: no real time to keep.
        pace: None,
    };
    let info = served.info.clone();
    let id: Arc<str> = uuid::Uuid::new_v4().simple().to_string().into();
    let session = StreamSession::new(id, StreamModels::alone(served), params, None)
        .map_err(ServeError::invalid)?
        .start();
    // Events and the summary: at most two events per chunk.
    let capacity = wav.samples.len() / 128 + 16;
    let (tx, mut rx) = mpsc::channel(capacity);
    let (close_tx, _close_rx) = oneshot::channel();
    let attach = Attach {
        connection: Connection {
            messages: tx,
            close: close_tx,
        },
        last_seq: None,
        token_counter: None,
        // A new stream, its steps the first to reach its versions.
        catalog: None,
    };
    session
        .send(attach)
        .await
        .map_err(|_| ServeError::Inference("stream session stopped".into()))?
        .map_err(|refused| ServeError::Inference(refused.to_string()))?;
    let duration = wav.samples.len() as f64 / wav.sample_rate as f64;
    session.do_send(Audio(wav.samples));
    session.do_send(End);
    let _started = rx.recv().await;
    while let Some(text) = rx.recv().await {
        let message: serde_json::Value =
            serde_json::from_str(&text).expect("session messages are JSON");
        match message["type"].as_str() {
            Some("summary") => {
                return Ok(HttpResponse::Ok().json(json!({
                    "model_name": info.name,
                    "model_version": info.version,
                    "sample_rate": wav.sample_rate,
                    "duration": duration,
                    "chunks": message["chunks"],
                    "segments": message["segments"],
                })))
            }
            Some("error") => {
                return Err(ServeError::Inference(
                    message["message"]
                        .as_str()
                        .unwrap_or("stream failed")
                        .to_string(),
                ))
            }
            _ => {}
        }
    }
    Err(ServeError::Inference(
        "stream ended without a summary".into(),
    ))
}
