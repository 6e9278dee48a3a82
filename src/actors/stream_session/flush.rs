//! For transports that hand a stream audio in calls rather than frames (gRPC): [`feed`]
//! gives a session audio as it has room for it, and `Flush` is answered once every whole
//! chunk of the audio a stream holds has been stepped and its results handed to the
//! connection, so that a transport with one answer per request (gRPC sequences) can collect
//! what a request's audio produced. A partial chunk waits for more audio (or the end), as it
//! does on WebSocket.
//!
//! A resume may supersede the connection between a request's audio being taken and its
//! answer. That audio counts (the newer connection is told so by `samples_received`), so the
//! request must not be told it was superseded: [`feed_from`] says how much of the audio the
//! stream took, and a flush of a superseded connection is answered with the results that went
//! to the newer connection instead ([`Flushed`]), so the request still gets its own.

use std::collections::VecDeque;
use std::time::Duration;

use actix::prelude::*;
use bytestring::ByteString;
use tokio::sync::{oneshot, Semaphore};

use super::{Audio, AudioFrom, StreamSession, AUDIO_CREDITS};

/// Audio handed to a session at once: well under its room, so that a piece always fits beside
/// a partial chunk (which holds some of the room until more audio comes).
const PIECE: usize = AUDIO_CREDITS / 4;
/// Superseded connections whose cut is remembered: a flush from one older than these has
/// long been answered (a connection waits for its flush before it sends more).
const CUTS_KEPT: usize = 8;

/// Why [`feed`] stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum FeedError {
    /// The session stopped (it takes no more audio).
    Ended,
    /// The session had no room for `wait`.
    Stalled,
}

/// Gives `session` its audio a piece at a time, each once the session has room for it
/// (`credits`, from its `Attached`): the backpressure a caller feels. For a stream no other
/// connection can take over; a connection that may be superseded uses [`feed_from`].
pub async fn feed(
    session: &Addr<StreamSession>,
    credits: &Semaphore,
    samples: Vec<f32>,
    wait: Duration,
) -> Result<(), FeedError> {
    for piece in pieces(samples) {
        room(credits, piece.len(), wait).await?;
        session.do_send(Audio(piece));
    }
    Ok(())
}

/// [`feed`] from the connection of `generation`; returns how many samples the stream took. A
/// session that a newer connection has taken over drops the audio (and gives its credits
/// back), so a superseded connection cannot add to the stream; each piece is acknowledged,
/// so that the caller knows whether its audio counted when it learns it was superseded.
pub async fn feed_from(
    session: &Addr<StreamSession>,
    generation: u64,
    credits: &Semaphore,
    samples: Vec<f32>,
    wait: Duration,
) -> Result<usize, FeedError> {
    let mut taken = 0;
    for piece in pieces(samples) {
        let len = piece.len();
        room(credits, len, wait).await?;
        let audio = AudioFrom {
            generation,
            samples: piece,
        };
        match session.send(audio).await {
            Ok(true) => taken += len,
            // The rest would be dropped too: the stream is the newer connection's.
            Ok(false) => break,
            Err(_) => return Err(FeedError::Ended),
        }
    }
    Ok(taken)
}

/// `samples` in pieces of at most [`PIECE`]; most often one, without a copy.
fn pieces(samples: Vec<f32>) -> Vec<Vec<f32>> {
    if samples.len() <= PIECE {
        return vec![samples];
    }
    samples.chunks(PIECE).map(<[f32]>::to_vec).collect()
}

/// Waits until `credits` has room for `len` samples, and takes it.
async fn room(credits: &Semaphore, len: usize, wait: Duration) -> Result<(), FeedError> {
    match tokio::time::timeout(wait, credits.acquire_many(len as u32)).await {
        Ok(Ok(permit)) => {
            permit.forget();
            Ok(())
        }
        Ok(Err(_)) => Err(FeedError::Ended),
        Err(_) => Err(FeedError::Stalled),
    }
}

/// Answers (through `answer`) when the audio received so far is stepped as far as it can be;
/// dropped unanswered if the stream ends first. `generation` is the asking connection's.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Flush {
    pub generation: u64,
    pub answer: oneshot::Sender<Flushed>,
}

/// A flush's answer.
#[derive(Debug, Default)]
pub struct Flushed {
    /// A newer connection attached after the one that asked.
    pub superseded: bool,
    /// When superseded: the results, up to the flush's audio, that went to the newer
    /// connection rather than to the one that asked (which never saw them).
    pub missed: Vec<ByteString>,
}

/// A flush waiting for its audio.
pub(super) struct Waiting {
    /// `samples_done` that answers it; `u64::MAX`: only the stream's end does.
    target: u64,
    generation: u64,
    answer: oneshot::Sender<Flushed>,
}

/// The flushes waiting, and where each superseded connection stopped getting results.
#[derive(Default)]
pub(super) struct Flushes {
    waiting: Vec<Waiting>,
    /// (generation, first `seq` it did not get), newest last.
    cuts: VecDeque<(u64, u64)>,
}

impl Flushes {
    /// The connection of `generation` gets no result from `seq` on (a newer one attached).
    pub(super) fn cut(&mut self, generation: u64, seq: u64) {
        if self.cuts.len() == CUTS_KEPT {
            self.cuts.pop_front();
        }
        self.cuts.push_back((generation, seq));
    }
}

impl StreamSession {
    /// Answers the flushes whose audio is stepped (after each step); `all`: every one (the
    /// stream is over, its summary sent).
    pub(super) fn settle_flushes(&mut self, all: bool) {
        if self.flushes.waiting.is_empty() {
            return;
        }
        let done = self.samples_done;
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.flushes.waiting)
            .into_iter()
            .partition(|w| all || w.target <= done);
        self.flushes.waiting = waiting;
        for flush in ready {
            let answer = self.flushed(flush.generation);
            let _ = flush.answer.send(answer);
        }
    }

    /// What a flush of the connection of `generation` is answered now.
    fn flushed(&self, generation: u64) -> Flushed {
        if generation == self.generation {
            return Flushed::default();
        }
        let cut = self.flushes.cuts.iter().find(|(g, _)| *g == generation);
        let suppressed = self.suppress_through;
        let missed = cut.map_or_else(Vec::new, |&(_, from)| {
            self.outbox
                .iter()
                .filter(|(seq, _)| *seq >= from && suppressed.is_none_or(|s| *seq > s))
                .map(|(_, text)| text.clone())
                .collect()
        });
        Flushed {
            superseded: true,
            missed,
        }
    }

    fn wait_for(&mut self, target: u64, generation: u64, answer: oneshot::Sender<Flushed>) {
        self.flushes.waiting.push(Waiting {
            target,
            generation,
            answer,
        });
        self.settle_flushes(false);
    }
}

impl Handler<Flush> for StreamSession {
    type Result = ();

    fn handle(&mut self, flush: Flush, _ctx: &mut Self::Context) {
        let chunk = self.layout.chunk_samples() as u64;
        let whole = self.progress.audio_pending() / chunk * chunk;
        self.wait_for(self.samples_done + whole, flush.generation, flush.answer);
    }
}

/// The audio of the connection of `generation` is over; ignored from a superseded connection,
/// which no longer speaks for the stream. `done`, if any, is answered once the stream has
/// ended (its summary sent), with what a superseded connection missed of it, or dropped at
/// once when the end is ignored.
#[derive(Message)]
#[rtype(result = "()")]
pub struct EndFrom {
    pub generation: u64,
    pub done: Option<oneshot::Sender<Flushed>>,
}

impl Handler<EndFrom> for StreamSession {
    type Result = ();

    fn handle(&mut self, end: EndFrom, ctx: &mut Self::Context) {
        if end.generation != self.generation {
            return;
        }
        if let Some(done) = end.done {
            // Registered before the end: a stream with nothing left to step ends at once.
            self.flushes.waiting.push(Waiting {
                target: u64::MAX,
                generation: end.generation,
                answer: done,
            });
        }
        self.end_audio(ctx);
    }
}
