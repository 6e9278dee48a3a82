//! A stream's steps: the next ready stage's window goes through that stage model's router
//! (batched there with other streams' steps), and its answer moves the stream on. The last
//! stage's answers become the stream's results: `vad` probabilities with speech events, or
//! keyword scores with `keyword` events. A stream behind real time (`check_pace`) asks for
//! its models' fallbacks until it has caught up.

use std::time::{Duration, Instant};

use actix::prelude::*;

use super::{StreamSession, STEP_RETRIES};
use crate::actors::served::InferOptions;
use crate::error::ServeError;
use crate::manifest::StreamKind;
use crate::model::InferResponse;
use crate::stream::pace::{still_behind, Schedule};
use crate::stream::pipeline::StepDone;
use crate::stream::protocol::{ResultsMode, ServerMessage};

impl StreamSession {
    pub(super) fn maybe_step(&mut self, ctx: &mut Context<Self>) {
        if self.in_flight || self.finished || self.retired.is_some() {
            return;
        }
        let skipped_before = self.progress.gated_skips();
        let next = self.progress.next_step(&self.layout, self.ending);
        self.count_skips(self.progress.gated_skips() - skipped_before);
        match next {
            Some(stage) => {
                self.in_flight = true;
                self.check_pace();
                self.send_step(stage, self.behind, ctx);
            }
            None if self.ending => self.finish(ctx),
            None => {}
        }
    }

    /// Whether the stream is behind real time: its oldest waiting chunk, or the last one
    /// completed (up to its answer), is late by more than `behind_after`. A stream falls
    /// behind when the CPU cannot keep up with all the streams: its audio waits here, one
    /// step at a time, where the router's predicted wait does not see it. While it is behind,
    /// its steps go straight to their models' fallbacks (where they have one), which cost less
    /// of the CPU, until it has caught up.
    ///
    /// The completed chunk counts because, on a full CPU, most of a chunk's lateness comes
    /// after its step goes: in the model's queue behind large batches and in their compute.
    /// Judged only by the waiting chunk, 420 Silero streams on one core kept a chunk p99 of
    /// 104-111 ms (`slo_ms` 30); judged by both, 52-60 ms, with about as many chunks on the
    /// fallback (load-tests/results/2026-12-06-streams-done-late/).
    fn check_pace(&mut self) {
        let (Some(schedule), Some(&(end, ready))) = (&self.schedule, self.chunk_ready.front())
        else {
            self.behind = false;
            return;
        };
        let late = schedule.late(end, ready, Instant::now());
        self.behind = still_behind(
            self.behind,
            late.max(self.last_done_late),
            self.behind_after,
        );
    }

    /// Sends `stage`'s next step. A retry builds the same request again: nothing it reads
    /// (the stage's window and state) moves while the step is in flight, and building it
    /// again is cheaper than keeping a copy of every step for the rare retry.
    /// `fallback_first`: straight to the stage model's fallback (the stream is behind).
    fn send_step(&mut self, stage: usize, fallback_first: bool, ctx: &mut Context<Self>) {
        let request = self.progress.request(&self.layout, stage);
        let options = InferOptions {
            fallback_first,
            ..InferOptions::now()
        };
        let answer = self.stages[stage].infer(request, options);
        ctx.spawn(
            answer
                .into_actor(self)
                .map(move |result, session, ctx| session.on_step(stage, result, ctx)),
        );
    }

    fn on_step(
        &mut self,
        stage: usize,
        result: Result<InferResponse, ServeError>,
        ctx: &mut Context<Self>,
    ) {
        let response = match result {
            Ok(response) => response,
            // Final for that version (never retried): nothing of the step ran, so the stream
            // is whole as of its last completed step, and hands over from there.
            Err(ServeError::VersionRetired { model, version }) => {
                self.in_flight = false;
                self.retries = 0;
                return self.version_retired(model, version, ctx);
            }
            Err(
                e @ (ServeError::Overloaded { .. }
                | ServeError::NotReady { .. }
                | ServeError::WorkerLost(_)),
            ) if self.retries < STEP_RETRIES => {
                self.retries += 1;
                tracing::debug!(stream = %self.id, error = %e, "retrying stream step");
                // Through the router's own choice: a fallback that shed the step (its queue
                // is shorter than its primary's) is not asked again.
                ctx.run_later(Duration::from_millis(25), move |session, ctx| {
                    session.send_step(stage, false, ctx)
                });
                return;
            }
            Err(e) => {
                self.in_flight = false;
                self.fail(&e, ctx);
                return;
            }
        };
        self.retries = 0;
        self.in_flight = false;
        let outputs: Vec<_> = response.outputs.into_iter().map(|t| t.data).collect();
        let done = match self.progress.complete(&self.layout, stage, &outputs) {
            Ok(done) => done,
            Err(reason) => return self.fail(&ServeError::Inference(reason), ctx),
        };
        self.degraded |= response.degraded;
        self.per_step.stage_steps[stage].increment(1);
        if stage == 0 {
            self.took_audio(done.audio_taken);
            if self.schedule.is_none() && self.params.pace.is_some() {
                let rate = self.params.sample_rate;
                self.schedule = Some(Schedule::new(Instant::now(), self.samples_done, rate));
            }
        }
        if stage + 1 == self.layout.stages.len() {
            self.result(done);
        }
        if !self.progress.downstream_ready(&self.layout) {
            self.chunks_done();
        }
        if stage == 0 {
            self.maybe_checkpoint();
            self.settle_flushes(false);
        }
        self.maybe_step(ctx);
    }

    /// Steps the gate skipped (only `next_step` skips) go to the gated stage's metric.
    fn count_skips(&self, skips: u64) {
        if let (Some(gate), 1..) = (&self.layout.gate, skips) {
            metrics::counter!(
                "streamserve_stream_stage_skips_total",
                &self.stage_labels[gate.gated]
            )
            .increment(skips);
        }
    }

    /// The first stage consumed `taken` new samples: the client may send that much more.
    fn took_audio(&mut self, taken: u64) {
        let chunk_start = self.samples_done;
        self.samples_done += taken;
        self.credits.add_permits(taken as usize);
        self.per_step.chunks.increment(1);
        if let Some(stats) = self.model.watch.stream_stats() {
            stats.add_audio(
                (self.samples_done - chunk_start) as f64 / f64::from(self.params.sample_rate),
            );
        }
    }

    /// Every stage has done what the audio stepped so far lets it: those chunks' latency
    /// (from when their audio came in) is over, whether or not they made a result (a keyword
    /// spotter makes none until its window fills).
    fn chunks_done(&mut self) {
        let now = Instant::now();
        while let Some(&(end, ready)) = self.chunk_ready.front() {
            if end > self.samples_done {
                break;
            }
            self.chunk_ready.pop_front();
            if let Some(schedule) = &self.schedule {
                self.last_done_late = schedule.late(end, ready, now);
            }
            self.per_step
                .chunk_latency
                .record(now.saturating_duration_since(ready).as_secs_f64());
            if let Some(pace) = &self.params.pace {
                pace.record(self.behind);
            }
            if self.behind {
                self.per_step.behind_chunks.increment(1);
            }
        }
    }

    /// The last stage answered: the stream's result for the audio up to `done.time`, of which
    /// the client sent the audio up to `done.heard` (the rest, at the stream's end, is padding).
    fn result(&mut self, done: StepDone) {
        let degraded = std::mem::take(&mut self.degraded);
        if degraded {
            metrics::counter!("streamserve_stream_degraded_chunks_total", &self.labels)
                .increment(1);
        }
        let all = self.params.results == ResultsMode::All;
        match self.kind {
            StreamKind::Vad => {
                let hop = self.layout.chunk_samples() as u64;
                if all {
                    self.emit(ServerMessage::Vad {
                        seq: self.next_seq,
                        t: self.seconds(done.time - hop),
                        probability: done.value,
                        degraded,
                    });
                }
                let mut events = Vec::new();
                self.tracker
                    .push_heard(done.time, done.heard, done.value, &mut events);
                self.emit_events(&events);
            }
            StreamKind::Keyword => {
                // The audio the score heard, to its end: for the stream's last step, whose
                // window the end completed with silence, the end of the audio (the padding
                // is not audio the client sent).
                let t = self.seconds(done.heard);
                if all {
                    self.emit(ServerMessage::Score {
                        seq: self.next_seq,
                        t,
                        score: done.value,
                        degraded,
                    });
                }
                let rate = self.params.sample_rate;
                if self
                    .keywords
                    .push(&self.params.keyword, rate, done.heard, done.value)
                {
                    metrics::counter!("streamserve_stream_keywords_total", &self.labels)
                        .increment(1);
                    let phrase = self.phrase.clone();
                    self.emit(ServerMessage::Keyword {
                        seq: self.next_seq,
                        t,
                        phrase: &phrase,
                        score: done.value,
                    });
                }
            }
        }
    }
}
