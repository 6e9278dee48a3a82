//! Opening a stream's session from its `start` message, in one of three ways: a new stream; a
//! stream that lives on this instance, by its `stream_id` (results the client missed are sent
//! again); or a stream taken over from a checkpoint's `resume` token, which any instance that
//! shares the fleet's token keys can do (docs/streaming.md, "Resume on any instance").

use std::sync::Arc;

use actix::prelude::*;

use super::StreamsConfig;
use crate::actors::catalog::ServedModel;
use crate::actors::stream_hub::{Found, Lookup, Register};
use crate::actors::stream_session::{StreamParams, StreamSession};
use crate::stream::checkpoint::Checkpoint;
use crate::stream::protocol::StartMessage;

/// A session to attach the connection to, and how.
pub(super) struct Opened {
    pub session: Addr<StreamSession>,
    /// Results after this `seq` are (re)sent on attaching.
    pub last_seq: Option<u64>,
    /// The counter of the token the client resumed with.
    pub token_counter: Option<u32>,
}

/// Finds or makes the session `start` asks for; an `Err` is the reason for a 1008 close.
pub(super) async fn open_session(
    start: StartMessage,
    served: ServedModel,
    config: &StreamsConfig,
) -> Result<Opened, String> {
    if let Some(token) = &start.resume {
        let checkpoint = config
            .keys
            .open(
                token,
                crate::registry::now_ms(),
                config.resume_window.as_millis() as u64,
            )
            .map_err(|e| e.to_string())?;
        if start
            .stream_id
            .as_ref()
            .is_some_and(|id| *id != checkpoint.stream_id)
        {
            return Err("the resume token belongs to another stream than stream_id".into());
        }
        return take_over(checkpoint, start.last_seq, served, config).await;
    }
    if let Some(id) = start.stream_id {
        return match config.hub.send(Lookup { id: id.clone() }).await {
            Ok(Found::Live(session)) => Ok(Opened {
                session,
                last_seq: start.last_seq,
                token_counter: None,
            }),
            _ => Err(format!("unknown or expired stream_id '{id}'")),
        };
    }
    if start.last_seq.is_some() {
        return Err("last_seq is only meaningful with stream_id or resume".into());
    }
    let id: Arc<str> = uuid::Uuid::new_v4().simple().to_string().into();
    let params = params(config, start.sample_rate, &start, start.checkpoints);
    let session = StreamSession::new(
        id.clone(),
        served,
        params,
        Some(config.hub.clone().recipient()),
    )?
    .start();
    config.hub.do_send(Register {
        id,
        session: session.clone(),
    });
    Ok(Opened {
        session,
        last_seq: None,
        token_counter: None,
    })
}

/// A stream from a verified checkpoint: the live session if it is still here (exact: it
/// sends again what the client missed), else a new session restored from the checkpoint on
/// the checkpoint's model version (or the default one, if its state fits).
async fn take_over(
    checkpoint: Checkpoint,
    last_seq: Option<u64>,
    served: ServedModel,
    config: &StreamsConfig,
) -> Result<Opened, String> {
    let token_counter = Some(checkpoint.counter);
    let id = checkpoint.stream_id.clone();
    match config.hub.send(Lookup { id: id.clone() }).await {
        Ok(Found::Live(session)) => {
            return Ok(Opened {
                session,
                last_seq,
                token_counter,
            })
        }
        Ok(Found::Finished) => return Err(format!("stream '{id}' has ended")),
        Ok(Found::Unknown) | Err(_) => {}
    }
    let model = config
        .catalog
        .snapshot()
        .resolve(&checkpoint.model, Some(&checkpoint.version))
        .unwrap_or(served);
    // A client that resumes from a checkpoint keeps getting them.
    let params = params(
        config,
        checkpoint.sample_rate,
        &StartMessage::default(),
        true,
    );
    let session = StreamSession::restore(
        checkpoint,
        model,
        params,
        last_seq,
        Some(config.hub.clone().recipient()),
    )?
    .start();
    metrics::counter!("streamserve_stream_takeovers_total").increment(1);
    config.hub.do_send(Register {
        id: id.into(),
        session: session.clone(),
    });
    Ok(Opened {
        session,
        last_seq: None,
        token_counter,
    })
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
        vad: start.vad.clone(),
        resume_window: config.resume_window,
        keys: config.keys.clone(),
        checkpoint_samples: if checkpoints { every } else { 0 },
    }
}
