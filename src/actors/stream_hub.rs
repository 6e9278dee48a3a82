//! `StreamHub`: the directory of live streams, so that a client reconnecting with its stream
//! id finds the session that holds its state. Sessions run on the arbiter of the connection
//! that created them (spreading streams over the HTTP worker threads); the hub only maps ids
//! to addresses and counts them. It also remembers, for a while, the streams that ended here
//! with their summary, so that a replayed resume token of one is refused, not restored; and,
//! for the resume window, the last messages of those that sent checkpoints ([`EndedTail`]),
//! so that a client whose connection dropped after its `end` can still get its summary.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::stream_session::{EndedTail, StreamEnded, StreamSession};

/// The most the hub's [`EndedTail`]s hold together: 1,024 full ones (64 KiB each). Past it the
/// oldest go first (a client that comes back does so within seconds); a resume that needed
/// one is refused `ended`, as it was before tails were kept.
pub const TAILS_BUDGET: usize = 64 * 1024 * 1024;

pub struct StreamHub {
    streams: HashMap<Arc<str>, Addr<StreamSession>>,
    /// Streams that ended here, and when.
    finished: HashMap<Arc<str>, Instant>,
    /// How long an ended stream is remembered: longer than its tokens live.
    finished_kept: Duration,
    tails: Tails,
}

impl StreamHub {
    /// A hub whose streams' tokens live `resume_window`.
    pub fn new(resume_window: Duration) -> StreamHub {
        StreamHub {
            streams: HashMap::new(),
            finished: HashMap::new(),
            finished_kept: (resume_window * 2).max(Duration::from_secs(60)),
            tails: Tails::new(resume_window, TAILS_BUDGET),
        }
    }
}

/// The tails of streams that ended here, each for `kept` (the resume window: every token of
/// the stream was issued before its end, so none is valid longer), all within `budget` bytes.
struct Tails {
    kept: Duration,
    budget: usize,
    bytes: usize,
    by_id: HashMap<Arc<str>, (Instant, EndedTail)>,
    /// Ids in the order their streams ended (so the order they expire in).
    order: VecDeque<(Instant, Arc<str>)>,
}

impl Tails {
    fn new(kept: Duration, budget: usize) -> Tails {
        Tails {
            kept,
            budget,
            bytes: 0,
            by_id: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn keep(&mut self, id: Arc<str>, tail: EndedTail, now: Instant) {
        self.expire(now);
        let size = tail.bytes();
        if size > self.budget {
            return;
        }
        if let Some((_, old)) = self.by_id.insert(id.clone(), (now, tail)) {
            self.bytes -= old.bytes();
        }
        self.bytes += size;
        self.order.push_back((now, id));
        while self.bytes > self.budget && !self.order.is_empty() {
            self.drop_oldest();
        }
    }

    fn get(&self, id: &str, now: Instant) -> Option<EndedTail> {
        let (at, tail) = self.by_id.get(id)?;
        (now.duration_since(*at) < self.kept).then(|| tail.clone())
    }

    fn expire(&mut self, now: Instant) {
        while let Some((at, _)) = self.order.front() {
            if now.duration_since(*at) < self.kept {
                break;
            }
            self.drop_oldest();
        }
    }

    fn drop_oldest(&mut self) {
        let Some((at, id)) = self.order.pop_front() else {
            return;
        };
        // Unless the id ended again since (its newer tail has its own place in the order).
        if self
            .by_id
            .get(&id)
            .is_some_and(|(kept_at, _)| *kept_at == at)
        {
            if let Some((_, tail)) = self.by_id.remove(&id) {
                self.bytes -= tail.bytes();
            }
        }
    }
}

/// What the hub knows of a stream id.
pub enum Found {
    Live(Addr<StreamSession>),
    /// Its session has stopped, and its [`StreamEnded`] is behind this question in the hub's
    /// mailbox (a session says so as it stops, before its own mailbox closes): asked again,
    /// the hub answers `Finished` or `Unknown`. A resume that races the stream's end sees
    /// this, and must not take it for an unknown stream.
    Stopping,
    /// It ended here with its summary; its last messages, if they are still kept.
    Finished(Option<EndedTail>),
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
/// that may be replaced (a stale copy the caller retired). `None`: the stream ended here (it
/// did while the caller restored it from a token): it is not listed again.
#[derive(Message)]
#[rtype(result = "Option<Addr<StreamSession>>")]
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
            let now = Instant::now();
            self.finished.retain(|_, at| now.duration_since(*at) < kept);
            if let Some(tail) = msg.tail {
                self.tails.keep(msg.id.clone(), tail, now);
            }
            self.finished.insert(msg.id, now);
        }
        self.publish();
    }
}

impl Handler<Lookup> for StreamHub {
    type Result = MessageResult<Lookup>;
    fn handle(&mut self, msg: Lookup, _: &mut Self::Context) -> Self::Result {
        let id = msg.id.as_str();
        MessageResult(match self.streams.get(id) {
            Some(session) if session.connected() => Found::Live(session.clone()),
            Some(_) => Found::Stopping,
            None if self.finished.contains_key(id) => {
                Found::Finished(self.tails.get(id, Instant::now()))
            }
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
            return MessageResult(Some(holder.clone()));
        }
        if self.finished.contains_key(&msg.id) {
            return MessageResult(None);
        }
        self.streams.insert(msg.id, msg.session.clone());
        self.publish();
        MessageResult(Some(msg.session))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytestring::ByteString;

    fn tail(summary_seq: u64, len: usize) -> EndedTail {
        EndedTail {
            model: "m".into(),
            version: "1".into(),
            started: ByteString::from_static("{}"),
            messages: vec![(summary_seq, ByteString::from("x".repeat(len)))].into(),
        }
    }

    const WINDOW: Duration = Duration::from_secs(30);

    #[test]
    fn a_tail_is_kept_for_the_resume_window() {
        let mut tails = Tails::new(WINDOW, 1 << 20);
        let t0 = Instant::now();
        tails.keep("a".into(), tail(3, 10), t0);
        assert!(tails
            .get("a", t0 + WINDOW - Duration::from_millis(1))
            .is_some());
        assert!(tails.get("a", t0 + WINDOW).is_none());
        assert!(tails.get("b", t0).is_none());
        // Ending another stream later lets the expired one go, and its bytes with it.
        tails.keep("b".into(), tail(5, 10), t0 + WINDOW);
        assert!(!tails.by_id.contains_key("a"));
        assert_eq!(tails.bytes, tail(5, 10).bytes());
        assert_eq!(tails.order.len(), 1);
    }

    #[test]
    fn past_the_budget_the_oldest_tails_go_first() {
        let one = tail(0, 1000).bytes();
        let mut tails = Tails::new(WINDOW, 3 * one);
        let t0 = Instant::now();
        for (i, id) in ["a", "b", "c", "d"].into_iter().enumerate() {
            tails.keep(
                id.into(),
                tail(0, 1000),
                t0 + Duration::from_millis(i as u64),
            );
        }
        assert!(tails.get("a", t0).is_none());
        for id in ["b", "c", "d"] {
            assert!(tails.get(id, t0).is_some(), "{id}");
        }
        assert_eq!(tails.bytes, 3 * one);
        // One larger than the whole budget is not kept, and costs the others nothing.
        tails.keep("e".into(), tail(0, 4 * one), t0);
        assert!(tails.get("e", t0).is_none());
        assert_eq!(tails.bytes, 3 * one);
    }

    #[test]
    fn an_id_that_ends_again_keeps_its_newer_tail() {
        let mut tails = Tails::new(WINDOW, 1 << 20);
        let t0 = Instant::now();
        tails.keep("a".into(), tail(3, 10), t0);
        tails.keep("a".into(), tail(7, 20), t0 + Duration::from_secs(10));
        // The first ending's place in the order expires; the newer tail stays.
        tails.expire(t0 + WINDOW);
        let kept = tails.get("a", t0 + WINDOW).expect("the newer tail");
        assert_eq!(kept.messages[0].0, 7);
        assert_eq!(tails.bytes, tail(7, 20).bytes());
        tails.expire(t0 + WINDOW + Duration::from_secs(10));
        assert_eq!(tails.bytes, 0);
        assert!(tails.by_id.is_empty());
    }
}
