//! For transports that hand a stream audio in calls rather than frames (gRPC): [`feed`]
//! gives a session audio as it has room for it, and `Flush` is answered once every whole
//! chunk of the audio a stream holds has been stepped and its results handed to the
//! connection, so that a transport with one answer per request (gRPC sequences) can collect
//! what a request's audio produced. A partial chunk waits for more audio (or the end), as it
//! does on WebSocket.

use std::time::Duration;

use actix::prelude::*;
use tokio::sync::{oneshot, Semaphore};

use super::{Audio, AudioFrom, StreamSession, AUDIO_CREDITS};

/// Audio handed to a session at once: well under its room, so that a piece always fits beside
/// a partial chunk (which holds some of the room until more audio comes).
const PIECE: usize = AUDIO_CREDITS / 4;

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
    in_pieces(credits, samples, wait, |piece| {
        session.do_send(Audio(piece))
    })
    .await
}

/// [`feed`] from the connection of `generation`: a session that a newer connection has taken
/// over drops the audio (and gives its credits back), so a superseded connection cannot add
/// to the stream.
pub async fn feed_from(
    session: &Addr<StreamSession>,
    generation: u64,
    credits: &Semaphore,
    samples: Vec<f32>,
    wait: Duration,
) -> Result<(), FeedError> {
    in_pieces(credits, samples, wait, |samples| {
        session.do_send(AudioFrom {
            generation,
            samples,
        })
    })
    .await
}

/// Hands `samples` to `give` in pieces, each once `credits` has room for it.
async fn in_pieces(
    credits: &Semaphore,
    samples: Vec<f32>,
    wait: Duration,
    give: impl Fn(Vec<f32>),
) -> Result<(), FeedError> {
    let give = &give;
    let one = |piece: Vec<f32>| async move {
        match tokio::time::timeout(wait, credits.acquire_many(piece.len() as u32)).await {
            Ok(Ok(permit)) => permit.forget(),
            Ok(Err(_)) => return Err(FeedError::Ended),
            Err(_) => return Err(FeedError::Stalled),
        }
        give(piece);
        Ok(())
    };
    // Most often one piece, given without a copy.
    if samples.len() <= PIECE {
        return one(samples).await;
    }
    for part in samples.chunks(PIECE) {
        one(part.to_vec()).await?;
    }
    Ok(())
}

/// Answers (through its sender) when the audio received so far is stepped as far as it can
/// be; dropped unanswered if the stream ends first.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Flush(pub oneshot::Sender<()>);

impl StreamSession {
    /// Answers the flushes whose audio is stepped (after each step).
    pub(super) fn settle_flushes(&mut self) {
        if self.flushes.is_empty() {
            return;
        }
        let done = self.samples_done;
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.flushes)
            .into_iter()
            .partition(|(target, _)| *target <= done);
        self.flushes = waiting;
        for (_, answer) in ready {
            let _ = answer.send(());
        }
    }
}

impl Handler<Flush> for StreamSession {
    type Result = ();

    fn handle(&mut self, Flush(answer): Flush, _ctx: &mut Self::Context) {
        let chunk = self.layout.chunk_samples() as u64;
        let whole = self.progress.audio_pending() / chunk * chunk;
        self.flushes.push((self.samples_done + whole, answer));
        self.settle_flushes();
    }
}
