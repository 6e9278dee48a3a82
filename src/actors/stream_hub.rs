//! `StreamHub`: the directory of live streams, so that a client reconnecting with its stream
//! id finds the session that holds its state. Sessions run on the arbiter of the connection
//! that created them (spreading streams over the HTTP worker threads); the hub only maps ids
//! to addresses and counts them. It also remembers, for a while, the streams that ended here
//! with their summary, so that a replayed resume token of one is refused, not restored.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::stream_session::{StreamEnded, StreamSession};

pub struct StreamHub {
    streams: HashMap<Arc<str>, Addr<StreamSession>>,
    /// Streams that ended here, and when.
    finished: HashMap<Arc<str>, Instant>,
    /// How long an ended stream is remembered: longer than its tokens live.
    finished_kept: Duration,
}

impl StreamHub {
    /// A hub whose streams' tokens live `resume_window`.
    pub fn new(resume_window: Duration) -> StreamHub {
        StreamHub {
            streams: HashMap::new(),
            finished: HashMap::new(),
            finished_kept: (resume_window * 2).max(Duration::from_secs(60)),
        }
    }
}

/// What the hub knows of a stream id.
pub enum Found {
    Live(Addr<StreamSession>),
    /// It ended here with its summary.
    Finished,
    Unknown,
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Register {
    pub id: Arc<str>,
    pub session: Addr<StreamSession>,
}

#[derive(Message)]
#[rtype(result = "Found")]
pub struct Lookup {
    pub id: String,
}

/// List `session` as stream `id`, unless a live session already is (two takeovers of one
/// stream racing): the answer is the session that holds the id. `replacing` names a session
/// that may be replaced (a stale copy the caller retired).
#[derive(Message)]
#[rtype(result = "Addr<StreamSession>")]
pub struct Adopt {
    pub id: Arc<str>,
    pub session: Addr<StreamSession>,
    pub replacing: Option<Addr<StreamSession>>,
}

impl StreamHub {
    fn publish(&self) {
        metrics::gauge!("streamserve_streams_open").set(self.streams.len() as f64);
    }
}

impl Actor for StreamHub {
    type Context = Context<Self>;
}

impl Handler<Register> for StreamHub {
    type Result = ();
    fn handle(&mut self, msg: Register, _: &mut Self::Context) {
        self.streams.insert(msg.id, msg.session);
        self.publish();
    }
}

impl Handler<StreamEnded> for StreamHub {
    type Result = ();
    fn handle(&mut self, msg: StreamEnded, _: &mut Self::Context) {
        // Only if it is still this session's id (a takeover may have listed another).
        if self.streams.get(&msg.id) == Some(&msg.session) {
            self.streams.remove(&msg.id);
        }
        if msg.summarized {
            let kept = self.finished_kept;
            self.finished.retain(|_, at| at.elapsed() < kept);
            self.finished.insert(msg.id, Instant::now());
        }
        self.publish();
    }
}

impl Handler<Lookup> for StreamHub {
    type Result = MessageResult<Lookup>;
    fn handle(&mut self, msg: Lookup, _: &mut Self::Context) -> Self::Result {
        let id = msg.id.as_str();
        MessageResult(match self.streams.get(id).filter(|a| a.connected()) {
            Some(session) => Found::Live(session.clone()),
            None if self.finished.contains_key(id) => Found::Finished,
            None => Found::Unknown,
        })
    }
}

impl Handler<Adopt> for StreamHub {
    type Result = MessageResult<Adopt>;
    fn handle(&mut self, msg: Adopt, _: &mut Self::Context) -> Self::Result {
        let holder = self
            .streams
            .get(&msg.id)
            .filter(|a| a.connected() && msg.replacing.as_ref() != Some(*a));
        if let Some(holder) = holder {
            return MessageResult(holder.clone());
        }
        self.streams.insert(msg.id, msg.session.clone());
        self.publish();
        MessageResult(msg.session)
    }
}
