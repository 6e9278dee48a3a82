//! A stream's checkpoints: issuing them (every `checkpoint_samples` of audio, and one last one
//! when the server shuts down, [`Handover`], or when a step finds a model version the stream
//! runs on taken out of service, or a connection that attaches finds the catalog no longer
//! serving it, [`Retired`]), and taking a stream over from one
//! ([`StreamSession::restore`]), on this instance or any other of the fleet that shares the
//! signing keys.
//!
//! Both handovers are one path ([`StreamSession::hand_over`]): a last checkpoint marked
//! `handover`, then a close 1001 whose reason says why. A retired version's is final for the
//! session (it can step no more; a resume from its token goes on on the model's default
//! version), so the session then stops; at a shutdown the process is going anyway.
//!
//! A checkpoint is taken at a chunk boundary: the stages' buffers and recurrent state after
//! the last completed step, the tracker's or detector's progress, and the counts of audio consumed and results
//! produced. A step in flight is not part of it; a stream restored from it computes that step
//! again, from the audio the client sends again, and gets the same result.

use actix::prelude::*;
use actix_ws::CloseCode;

use super::{StreamEnded, StreamModels, StreamParams, StreamSession};
use crate::actors::catalog::{Catalog, VersionState};
use crate::stream::checkpoint::{Checkpoint, MAX_SEGMENTS};
use crate::stream::pipeline::PipelineState;
use crate::stream::protocol::ServerMessage;

/// Longest close reason sent, in bytes (a WebSocket close frame holds 123 of reason).
const CLOSE_REASON_BYTES: usize = 120;

impl StreamSession {
    /// The stream as of its last completed step, as a checkpoint (counted).
    fn checkpoint(&mut self) -> Checkpoint {
        self.checkpoints += 1;
        self.checkpointed_at = self.samples_done;
        let mut tracker = self.tracker.snapshot();
        let over = tracker.segments.len().saturating_sub(MAX_SEGMENTS);
        tracker.segments.drain(..over);
        Checkpoint {
            stream_id: self.id.to_string(),
            model: self.model.info.name.clone(),
            version: self.model.info.version.clone(),
            sample_rate: self.params.sample_rate,
            format: self.params.format,
            results: self.params.results,
            vad: self.params.vad.clone(),
            keyword: self.params.keyword.clone(),
            gate: self.params.gate,
            counter: self.checkpoints,
            issued_at_ms: crate::registry::now_ms(),
            samples_done: self.samples_done,
            next_seq: self.next_seq,
            progress: self.progress.snapshot(),
            keywords: self.keywords.clone(),
            tracker,
            segments_omitted: self.segments_omitted + over as u64,
            retired: self.retired.is_some(),
        }
    }

    /// Sends the client a checkpoint (not a result: it has no `seq` and is not replayed).
    fn send_checkpoint(&mut self, handover: bool) {
        let checkpoint = self.checkpoint();
        let token = self.params.keys.seal(&checkpoint);
        metrics::counter!("streamserve_stream_checkpoints_total", &self.labels).increment(1);
        let text = ServerMessage::Checkpoint {
            token: &token,
            samples: checkpoint.samples_done,
            next_seq: checkpoint.next_seq,
            handover,
        }
        .to_json();
        self.send(text.into());
    }

    /// After a step: a checkpoint if `checkpoint_samples` of audio went by since the last.
    pub(super) fn maybe_checkpoint(&mut self) {
        let every = self.params.checkpoint_samples;
        if every > 0 && self.samples_done - self.checkpointed_at >= every {
            self.send_checkpoint(false);
        }
    }

    /// Takes over a stream from `checkpoint` (verified by the caller) on `model`, which must
    /// be the checkpoint's model. On the checkpoint's own version the model state goes on, and
    /// results up to `last_seq` are computed again but not sent: the client has them, and
    /// recomputing gives the same ones. On another version (`fresh_state`: the stream's is not
    /// served here) it starts again from a zero state, and its results are not the ones the
    /// client has (other speech events fall elsewhere, so a `seq` names another result): every
    /// one from the checkpoint on is sent, numbered after `last_seq` (`started` says so).
    pub fn restore(
        checkpoint: Checkpoint,
        models: StreamModels,
        mut params: StreamParams,
        last_seq: Option<u64>,
        fresh_state: bool,
        ended: Option<Recipient<StreamEnded>>,
    ) -> Result<StreamSession, String> {
        let model = &models.stages.last().ok_or("a stream needs a model")?.info;
        if checkpoint.model != model.name {
            return Err(format!(
                "the resume token is for a stream on model '{}', not '{}'",
                checkpoint.model, model.name
            ));
        }
        params.sample_rate = checkpoint.sample_rate;
        params.format = checkpoint.format;
        params.results = checkpoint.results;
        params.vad = checkpoint.vad.clone();
        params.keyword = checkpoint.keyword.clone();
        params.gate = checkpoint.gate;
        let mut session =
            StreamSession::new(checkpoint.stream_id.as_str().into(), models, params, ended)?;
        if fresh_state {
            session.progress = PipelineState::fresh_at(&session.layout, checkpoint.samples_done);
        } else {
            if !checkpoint.progress.fits(&session.layout) {
                return Err(format!(
                    "the resume token's model state does not fit {}:{}",
                    session.model.info.name, session.model.info.version
                ));
            }
            session.progress = checkpoint.progress;
        }
        session.keywords = checkpoint.keywords;
        session.tracker.restore(checkpoint.tracker);
        session.samples_done = checkpoint.samples_done;
        session.samples_received = checkpoint.samples_done;
        session.checkpointed_at = checkpoint.samples_done;
        session.next_seq = checkpoint.next_seq;
        session.checkpoints = checkpoint.counter;
        session.redeemed = Some(checkpoint.counter);
        if fresh_state {
            session.next_seq = session.next_seq.max(last_seq.map_or(0, |last| last + 1));
            session.fresh_state = true;
        } else {
            session.suppress_through = last_seq;
        }
        session.restored = true;
        session.segments_omitted = checkpoint.segments_omitted;
        Ok(session)
    }
}

/// The server is shutting down: send the client a last checkpoint (as of the last completed
/// step) and close with 1001, so that it resumes from it on another instance.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Handover;

impl Handler<Handover> for StreamSession {
    type Result = ();

    fn handle(&mut self, _: Handover, _ctx: &mut Self::Context) {
        if self.finished || self.connection.is_none() {
            return;
        }
        self.hand_over(
            true,
            "server is shutting down; resume from the last checkpoint on another instance".into(),
        );
    }
}

/// The model version a step of the stream reached was taken out of service (a rollout, the
/// fleet or an admin unloaded it: [`ServeError::VersionRetired`]); nothing of that step ran.
///
/// [`ServeError::VersionRetired`]: crate::error::ServeError::VersionRetired
#[derive(Clone, Debug)]
pub struct Retired {
    pub model: String,
    pub version: String,
}

impl Retired {
    /// The close's reason: what was retired, and what to do (within a close frame's room).
    pub fn reason(&self, checkpoints: bool) -> String {
        let todo = if checkpoints {
            "resume from the last checkpoint"
        } else {
            "start the stream again"
        };
        let reason = format!(
            "model version taken out of service ({}:{}); {todo}",
            self.model, self.version
        );
        if reason.len() <= CLOSE_REASON_BYTES {
            return reason;
        }
        format!("model version taken out of service; {todo}")
    }
}

impl StreamSession {
    /// The last checkpoint (`checkpoint`: if the stream sends them), marked `handover`, then a
    /// close 1001 for `reason`: the one way a stream is handed over, at a shutdown and when
    /// its version is retired. The checkpoint is as of the last completed step: a step in
    /// flight is not in it, and the client sends its audio again from the checkpoint.
    fn hand_over(&mut self, checkpoint: bool, reason: String) {
        if checkpoint {
            self.send_checkpoint(true);
            metrics::counter!("streamserve_stream_handovers_total", &self.labels).increment(1);
        }
        self.disconnect(CloseCode::Away, reason);
    }

    /// A step found `model:version` taken out of service: the stream can step no more here.
    /// It hands over to the connection attached now, or to the next one that attaches
    /// ([`StreamSession::hand_over_retired`]); until then it keeps its resume window.
    pub(super) fn version_retired(
        &mut self,
        model: String,
        version: String,
        ctx: &mut Context<Self>,
    ) {
        tracing::info!(stream = %self.id, %model, %version,
            "a model version of the stream was taken out of service; it hands over");
        self.retired = Some(Retired { model, version });
        if self.connection.is_some() {
            self.hand_over_retired(ctx);
        }
    }

    /// The first of the stream's model versions (its stages', its own, its gate's) that
    /// `catalog` no longer serves through the router the stream holds: taken out of service
    /// (a deploy, the fleet, an admin), as a step of the stream would find it. A version the
    /// stream holds is never unloaded for idleness, so a router that is not the catalog's is
    /// one that stopped.
    pub(super) fn out_of_service(&self, catalog: &Catalog) -> Option<Retired> {
        self.stages.iter().find_map(|stage| {
            let (model, version) = (&stage.info.name, &stage.info.version);
            let listed = catalog
                .models
                .get(model)
                .and_then(|m| m.versions.get(version));
            let serving = matches!(listed, Some(VersionState::Serving(served))
                if served.router.actor() == stage.router.actor());
            (!serving).then(|| Retired {
                model: model.clone(),
                version: version.clone(),
            })
        })
    }

    /// Hands a retired stream over and stops it: results sent stay sent, and flushes waiting
    /// are answered (with the checkpoint before them), so a transport that answers per request
    /// answers the one in flight with the handover.
    pub(super) fn hand_over_retired(&mut self, ctx: &mut Context<Self>) {
        let Some(retired) = self.retired.clone() else {
            return;
        };
        let checkpoints = self.params.checkpoint_samples > 0;
        self.hand_over(checkpoints, retired.reason(checkpoints));
        self.finished = true;
        // Before the flushes' answers: the resume may follow at once.
        self.place = None;
        self.settle_flushes(true);
        ctx.stop();
    }
}

/// How far a copy of a stream is, for a resume that finds it live.
#[derive(Message)]
#[rtype(result = "CopyProgress")]
pub struct Progress;

/// The answer to [`Progress`].
#[derive(Clone, Copy, Debug, Default)]
pub struct CopyProgress {
    /// The audio it holds, in samples.
    pub received: u64,
    /// The results the client can have had from it: a restored copy counts those it is
    /// computing again without sending (the client has them), not only those it has sent.
    pub results: u64,
    /// The newest checkpoint a client resumed it with (tokens older than this are refused).
    pub redeemed: Option<u32>,
}

impl Handler<Progress> for StreamSession {
    type Result = MessageResult<Progress>;

    fn handle(&mut self, _: Progress, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(CopyProgress {
            received: self.samples_received,
            results: self
                .next_seq
                .max(self.suppress_through.map_or(0, |through| through + 1)),
            redeemed: self.redeemed,
        })
    }
}

/// Which model version a stream runs on: a resume by `stream_id` must come from a caller
/// of that model, allowed that version.
#[derive(Message)]
#[rtype(result = "(String, String)")]
pub struct ServedBy;

impl Handler<ServedBy> for StreamSession {
    type Result = MessageResult<ServedBy>;

    fn handle(&mut self, _: ServedBy, _ctx: &mut Self::Context) -> Self::Result {
        let info = &self.model.info;
        MessageResult((info.name.clone(), info.version.clone()))
    }
}

/// Another copy of the stream took over: this one stops, quietly (its client is elsewhere).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Retire;

impl Handler<Retire> for StreamSession {
    type Result = ();

    fn handle(&mut self, _: Retire, ctx: &mut Self::Context) {
        self.disconnect(
            CloseCode::Policy,
            "superseded: the stream went on from a newer checkpoint".into(),
        );
        ctx.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retired_streams_close_reason_says_what_and_what_to_do_within_a_close_frame() {
        let retired = Retired {
            model: "silero_vad".into(),
            version: "2".into(),
        };
        assert_eq!(
            retired.reason(true),
            "model version taken out of service (silero_vad:2); resume from the last checkpoint"
        );
        assert!(retired.reason(false).ends_with("; start the stream again"));
        // A name too long for the frame is left out, never cut in the middle of a character.
        let long = Retired {
            model: "é".repeat(200),
            version: "1".into(),
        };
        let reason = long.reason(true);
        assert!(reason.len() <= 123, "{} bytes", reason.len());
        assert!(
            reason.ends_with("resume from the last checkpoint"),
            "{reason}"
        );
    }
}
