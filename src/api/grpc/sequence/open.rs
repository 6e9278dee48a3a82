//! How a sequence takes its stream: its `sequence_start` lets the caller in and opens the
//! stream, or finds the one it resumes (by `stream_id` or a checkpoint's `resume`) and attaches
//! to it ([`Live`]: the connection the sequence holds until it ends or the call does); a
//! resume of a stream that ended here is answered from the tail the hub keeps of it, its
//! summary last. At a shutdown, the stream's last checkpoint is the sequence's last answer.

use actix::prelude::*;
use actix_ws::CloseCode;
use bytestring::ByteString;
use tokio::sync::{mpsc, oneshot};

use super::super::proto::inference::{ModelInferRequest, ModelStreamInferResponse};
use super::answer::{mark_handover, Gathered};
use super::{SequenceTask, HANDOVER_WAIT, OUTGOING_CAPACITY};
use crate::access::StreamPass;
use crate::actors::stream_session::{Abandon, Attached, Detach, Handover, StreamSession};
use crate::api::ws::open::{open_stream, AttachError, Caller, EndedReplay, Outcome};
use crate::stream::protocol::StartMessage;

/// What ends a sequence whose resume was answered with its stream's end, as a `sequence_end`
/// does: a later step of it is refused as one of a sequence this call does not run.
pub(super) const ENDED: &str =
    "the stream has ended (its summary answered the sequence_start that \
                     resumed it): send sequence_start to begin another";

/// The session of a started sequence, and the connection its messages come through.
pub(super) struct Live {
    pub(super) session: Addr<StreamSession>,
    pub(super) attached: Attached,
    pub(super) messages: mpsc::Receiver<ByteString>,
    pub(super) close: oneshot::Receiver<(CloseCode, String)>,
    /// How the session closed this connection, once it has: kept, as every later step of a
    /// superseded connection is refused with it.
    pub(super) closed: Option<(CloseCode, String)>,
    pub(super) access: StreamPass,
    /// This call made the session (`Opened::created`).
    pub(super) created: bool,
}

impl Live {
    /// The sequence's start was refused: a stream this call made (a new one, or one restored
    /// from a checkpoint) stops at once, and has given back its place among the caller's open
    /// streams when this returns; a stream it found live waits for a resume as before. Not
    /// "the first to attach": when two takeovers of one token race, the one that lost the
    /// race may attach first.
    pub(super) async fn abandon(self) {
        if self.created {
            let abandon = Abandon {
                generation: self.attached.generation,
            };
            let _ = self.session.send(abandon).await;
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        // The session keeps the stream for a resume (a finished one ignores this).
        self.session.do_send(Detach {
            generation: self.attached.generation,
        });
    }
}

impl SequenceTask {
    /// Lets the caller in and opens (or finds, to resume) the stream a `sequence_start` asks
    /// for. `Some`: the stream it resumes ended here, and this is the step's whole answer.
    pub(super) async fn open(
        &mut self,
        request: &ModelInferRequest,
        start: StartMessage,
    ) -> Result<Option<Gathered>, String> {
        let state = &self.state;
        let version = (!request.model_version.is_empty()).then_some(request.model_version.as_str());
        let (pass, served) = state
            .admitted(&*self.metadata, self.peer, &request.model_name, version)
            .await
            .map_err(|e| e.to_string())?;
        let Some(kind) = served.info.stream_kind() else {
            return Err(format!(
                "model '{}' does not serve streams: sequences go to a model whose manifest \
                 entry declares a `stream` (a voice activity or keyword model)",
                served.info.name
            ));
        };
        state
            .access
            .check_version(&pass, &served.info.name, &served.info.version)
            .map_err(|e| e.to_string())?;
        // The stream's place among the key's open streams is its session's (taken when the
        // stream is new, none for a resume).
        let access = state.access.stream_allowance(&pass);
        let resuming = start.stream_id.is_some() || start.resume.is_some();
        if !resuming {
            state
                .admission
                .admit_stream()
                .map_err(|refused| refused.to_string())?;
        }
        self.model = served.info.name.clone();
        self.version = served.info.version.clone();
        self.kind = kind;
        let caller = Caller {
            served,
            pass: pass.without_permit(),
            access: state.access.clone(),
        };
        // Sessions are actors: they start on an actix thread, not on gRPC's runtime.
        let (opened_tx, opened) = oneshot::channel();
        let streams = state.streams.clone();
        streams.arbiters.next().spawn_fn(move || {
            actix::spawn(async move {
                let _ = opened_tx.send(open_stream(start, caller, &streams).await);
            });
        });
        let outcome = opened
            .await
            .map_err(|_| "the server is stopping".to_string())?
            .map_err(|refused| refused.to_string())?;
        let opened = match outcome {
            Outcome::Session(opened) => opened,
            Outcome::Ended(replay) => return Ok(Some(self.ended(replay))),
        };
        let connection = match opened.attach(OUTGOING_CAPACITY).await {
            Ok(connection) => connection,
            Err(AttachError::Refused(reason)) => return Err(reason),
            Err(AttachError::Ended) => return Err("the stream has ended".into()),
            // The stream ended with its summary as this resume came: what the client missed.
            Err(AttachError::EndedHere(replay)) => return Ok(Some(self.ended(replay))),
        };
        self.live = Some(Live {
            created: opened.created,
            session: opened.session,
            attached: connection.attached,
            messages: connection.messages,
            close: connection.close,
            closed: None,
            access,
        });
        Ok(None)
    }

    /// The answer to a resume of a stream that ended here (its end's answer was lost with the
    /// call): `started`, then the messages after the client's `last_seq`, exactly as the
    /// stream sent them, its summary last, as a WebSocket's resume gets them. The sequence is
    /// then over on this call, as after its `sequence_end`.
    fn ended(&mut self, replay: EndedReplay) -> Gathered {
        replay.count_resume();
        let mut gathered = Gathered::of(self.kind);
        for text in std::iter::once(&replay.started).chain(&replay.missed) {
            gathered.add(text);
        }
        gathered.ended = true;
        self.failed = Some(ENDED.into());
        gathered
    }

    /// The stream's last checkpoint, as an answer of its own (no request asked for it) for
    /// the client to resume from elsewhere; streams without checkpoints have none to give.
    pub(super) async fn last_checkpoint(&mut self) -> Option<ModelStreamInferResponse> {
        let live = self.live.as_mut()?;
        if !live.attached.checkpoints || self.failed.is_some() {
            return None;
        }
        live.session.do_send(Handover);
        let mut gathered = Gathered::of(self.kind);
        let all = async {
            while let Some(text) = live.messages.recv().await {
                gathered.add(&text);
            }
        };
        let _ = tokio::time::timeout(HANDOVER_WAIT, all).await;
        if !gathered.handover {
            return None;
        }
        let mut response = gathered.into_response(
            &self.model,
            &self.version,
            String::new(),
            self.echo.clone(),
            false,
        );
        // Not an error: Triton's client hides an answer's outputs when it has one.
        mark_handover(&mut response, None);
        Some(ModelStreamInferResponse {
            error_message: String::new(),
            infer_response: Some(response),
        })
    }
}
