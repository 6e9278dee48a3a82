//! What a stream session sends its connection: its messages, each numbered (`seq`) and kept
//! for a client that resumes after missing them (the outbox, [`OUTBOX_LIMIT`] of them), or cut
//! loose when it does not read them; and its end, the summary after `end` or the error of a
//! failed step, after which the session stops (the hub keeps an ended stream's tail,
//! `tail.rs`).
//!
//! [`OUTBOX_LIMIT`]: super::OUTBOX_LIMIT

use actix::prelude::*;
use actix_ws::CloseCode;
use bytestring::ByteString;

use super::{StreamSession, OUTBOX_LIMIT};
use crate::error::ServeError;
use crate::manifest::StreamKind;
use crate::stream::protocol::{SegmentSecs, ServerMessage};
use crate::stream::vad::VadEvent;

impl StreamSession {
    /// Sends a message now (if a client is attached) and keeps it for replay.
    pub(super) fn emit(&mut self, message: ServerMessage<'_>) {
        let text = ByteString::from(message.to_json());
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.outbox.len() == OUTBOX_LIMIT {
            self.outbox.pop_front();
        }
        self.outbox.push_back((seq, text.clone()));
        if self.suppress_through.is_some_and(|through| seq <= through) {
            return;
        }
        self.send(text);
    }

    pub(super) fn send(&mut self, text: ByteString) {
        let Some(connection) = &self.connection else {
            return;
        };
        if connection.messages.try_send(text).is_err() {
            // The client is not reading its results: cut it loose; it may resume later.
            metrics::counter!("streamserve_stream_drops_total", "reason" => "slow_consumer")
                .increment(1);
            tracing::warn!(stream = %self.id, "client is not reading results; disconnecting it");
            self.disconnect(
                CloseCode::Policy,
                "client is not reading results fast enough; resume to continue".into(),
            );
        }
    }

    pub(super) fn disconnect(&mut self, code: CloseCode, reason: String) {
        if let Some(connection) = self.connection.take() {
            let _ = connection.close.send((code, reason));
        }
    }

    /// Numbers the next message after every result the client has, so that the stream's last
    /// message (its summary, or its error) is sent even when its audio ended before the
    /// client's `last_seq` (a resume that sent `end` without its audio again): the results it
    /// has stay unsent, and its `seq`s stay gapless.
    pub(super) fn past_suppressed(&mut self) {
        if let Some(through) = self.suppress_through {
            self.next_seq = self.next_seq.max(through + 1);
        }
    }

    pub(super) fn emit_events(&mut self, events: &[VadEvent]) {
        for event in events {
            let message = match *event {
                VadEvent::SpeechStart { sample } => ServerMessage::SpeechStart {
                    seq: self.next_seq,
                    t: self.seconds(sample),
                },
                VadEvent::SpeechEnd { sample } => {
                    let segment = self.tracker.segments.last().filter(|s| s.end == sample);
                    if let (Some(segment), Some(stats)) = (segment, self.model.watch.stream_stats())
                    {
                        let samples = segment.end.saturating_sub(segment.start);
                        stats.add_segment(samples as f64 / f64::from(self.params.sample_rate));
                    }
                    ServerMessage::SpeechEnd {
                        seq: self.next_seq,
                        t: self.seconds(sample),
                    }
                }
            };
            self.emit(message);
        }
    }

    pub(super) fn finish(&mut self, ctx: &mut Context<Self>) {
        self.finished = true;
        let mut events = Vec::new();
        self.tracker.finish(self.samples_done, &mut events);
        self.emit_events(&events);
        let segments = self
            .tracker
            .segments
            .iter()
            .map(|s| SegmentSecs::from_samples(s, self.params.sample_rate))
            .collect();
        let chunks = self
            .samples_done
            .div_ceil(self.layout.chunk_samples() as u64);
        self.past_suppressed();
        self.emit(ServerMessage::Summary {
            seq: self.next_seq,
            duration: self.seconds(self.samples_done),
            chunks,
            segments,
            segments_omitted: self.segments_omitted,
            keywords: (self.kind == StreamKind::Keyword).then_some(self.keywords.events),
        });
        self.summarized = true;
        self.settle_flushes(true);
        // Before the close: a client that hears its stream ended may open another at once.
        self.place = None;
        self.disconnect(CloseCode::Normal, "stream ended".into());
        ctx.stop();
    }

    pub(super) fn fail(&mut self, error: &ServeError, ctx: &mut Context<Self>) {
        tracing::error!(stream = %self.id, %error, "stream failed");
        metrics::counter!("streamserve_stream_drops_total", "reason" => "inference_error")
            .increment(1);
        let message = error.to_string();
        self.past_suppressed();
        self.emit(ServerMessage::Error {
            code: "inference_failed",
            message: &message,
        });
        self.finished = true;
        self.place = None;
        let code = if matches!(
            error,
            ServeError::Overloaded { .. } | ServeError::NotReady { .. }
        ) {
            CloseCode::Again
        } else {
            CloseCode::Error
        };
        self.disconnect(code, message.chars().take(120).collect());
        ctx.stop();
    }
}
