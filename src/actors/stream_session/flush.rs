//! `Flush`: answered once every whole chunk of the audio a stream holds has been stepped and
//! its results handed to the connection, so that a transport with one answer per request
//! (gRPC sequences) can collect what a request's audio produced. A partial chunk waits for
//! more audio (or the end), as it does on WebSocket.

use actix::prelude::*;
use tokio::sync::oneshot;

use super::StreamSession;

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
        let whole = self.pending.len() / self.window * self.window;
        self.flushes
            .push((self.samples_done + whole as u64, answer));
        self.settle_flushes();
    }
}
