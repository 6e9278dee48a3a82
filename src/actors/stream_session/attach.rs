//! A connection coming and going: `Attach` binds a WebSocket (or gRPC sequence) to the
//! session, new or resumed, replaying what the client missed; `Detach` marks it gone and
//! keeps the stream for its resume window before dropping it. A stream whose version was
//! retired while it had no connection (a step found it gone, or the catalog the connection
//! brings no longer serves it) hands the next one over at once (`checkpoint.rs`).

use std::time::Duration;

use actix::prelude::*;
use actix_ws::CloseCode;
use bytestring::ByteString;

use super::{Attach, Attached, Detach, StreamSession};
use crate::stream::protocol::ServerMessage;

/// The reason an older connection is closed with when a newer one attaches (1008): a
/// transport that answers per request tells it from the connection's other ends by it.
pub const SUPERSEDED: &str = "superseded by a newer connection to this stream";

/// Why a session refused a connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttachRefused {
    #[error("stream has already ended")]
    Ended,
    #[error(
        "resume token is superseded: the stream was resumed from a newer one \
         (checkpoint {redeemed}, this is {token})"
    )]
    Superseded { redeemed: u32, token: u32 },
    #[error(
        "results from seq {from} are no longer kept (oldest kept: {oldest}); start a new stream"
    )]
    NotKept { from: u64, oldest: u64 },
    #[error("last_seq {last_seq} is beyond the last result sent ({last_sent})")]
    Beyond { last_seq: u64, last_sent: i64 },
}

impl StreamSession {
    /// The `started` message of this stream as it stands: what a connection that attaches is
    /// told first (and what an ended stream's tail begins with, `tail.rs`).
    pub(super) fn started_message(&self, resumed: bool, fresh_state: bool) -> ServerMessage<'_> {
        ServerMessage::Started {
            stream_id: &self.id,
            resumed,
            model: &self.model.info.name,
            version: &self.model.info.version,
            sample_rate: self.params.sample_rate,
            format: self.params.format,
            chunk_samples: self.layout.chunk_samples(),
            samples_received: self.samples_received,
            next_seq: self.next_seq,
            resume_window_secs: self.params.resume_window.as_secs(),
            checkpoint_samples: self.params.checkpoint_samples,
            fresh_state,
        }
    }
}

impl Handler<Attach> for StreamSession {
    type Result = Result<Attached, AttachRefused>;

    fn handle(&mut self, attach: Attach, ctx: &mut Self::Context) -> Self::Result {
        if self.finished {
            return Err(AttachRefused::Ended);
        }
        let resumed = attach.last_seq.is_some() || self.generation > 0 || self.restored;
        if let (Some(token), Some(redeemed)) = (attach.token_counter, self.redeemed) {
            if token < redeemed {
                return Err(AttachRefused::Superseded { redeemed, token });
            }
        }
        let replay_from = attach.last_seq.map_or(0, |s| s + 1);
        if let Some(&(oldest, _)) = self.outbox.front() {
            if replay_from < oldest {
                return Err(AttachRefused::NotKept {
                    from: replay_from,
                    oldest,
                });
            }
        }
        // A restored stream has not computed again what the client already has.
        let known = self
            .next_seq
            .max(self.suppress_through.map_or(0, |through| through + 1));
        if replay_from > known {
            return Err(AttachRefused::Beyond {
                last_seq: replay_from - 1,
                last_sent: self.next_seq as i64 - 1,
            });
        }
        if let Some(timer) = self.resume_timer.take() {
            ctx.cancel_future(timer);
        }
        if let Some(token) = attach.token_counter {
            self.redeemed = Some(self.redeemed.map_or(token, |r| r.max(token)));
        }
        // A newer connection supersedes an older one that has not noticed it is gone.
        self.disconnect(CloseCode::Policy, SUPERSEDED.into());
        // Where the older connection's results stop: a flush of its still waiting is
        // answered with those after, which go to this one.
        self.flushes.cut(self.generation, self.next_seq);
        self.generation += 1;
        // The client was away: its real-time schedule starts again with this connection.
        self.schedule = None;
        self.last_done_late = Duration::ZERO;
        if resumed {
            metrics::counter!("streamserve_stream_resumes_total", &self.labels).increment(1);
        }
        // Said once, to the connection that took the stream over.
        let fresh_state = std::mem::take(&mut self.fresh_state);
        let started = self.started_message(resumed, fresh_state).to_json();
        let _ = attach.connection.messages.try_send(started.into());
        self.connection = Some(attach.connection);
        let missed: Vec<ByteString> = self
            .outbox
            .iter()
            .filter(|(seq, _)| *seq >= replay_from)
            .map(|(_, text)| text.clone())
            .collect();
        for text in missed {
            self.send(text);
        }
        // Its version was retired while no client was attached (a step found it, or no step
        // has run since and the catalog no longer serves it): this one gets what it missed,
        // then the handover.
        if self.retired.is_none() {
            self.retired = attach.catalog.and_then(|c| self.out_of_service(&c));
        }
        self.hand_over_retired(ctx);
        Ok(Attached {
            generation: self.generation,
            credits: self.credits.clone(),
            format: self.params.format,
            sample_rate: self.params.sample_rate,
            checkpoints: self.params.checkpoint_samples > 0,
        })
    }
}

impl Handler<Detach> for StreamSession {
    type Result = ();

    fn handle(&mut self, detach: Detach, ctx: &mut Self::Context) {
        if detach.generation != self.generation || self.finished {
            return;
        }
        self.connection = None;
        let window = self.params.resume_window;
        tracing::debug!(stream = %self.id, "connection lost; keeping the stream for {window:?}");
        self.resume_timer = Some(ctx.run_later(window, |session, ctx| {
            tracing::info!(stream = %session.id, "resume window passed; dropping the stream");
            metrics::counter!("streamserve_stream_drops_total", "reason" => "not_resumed")
                .increment(1);
            ctx.stop();
        }));
    }
}
