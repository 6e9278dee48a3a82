//! `StreamHub`: the directory of live streams, so that a client reconnecting with its stream
//! id finds the session that holds its state. Sessions run on the arbiter of the connection
//! that created them (spreading streams over the HTTP worker threads); the hub only maps ids
//! to addresses and counts them.

use std::collections::HashMap;
use std::sync::Arc;

use actix::prelude::*;

use super::stream_session::{StreamEnded, StreamSession};

#[derive(Default)]
pub struct StreamHub {
    streams: HashMap<Arc<str>, Addr<StreamSession>>,
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Register {
    pub id: Arc<str>,
    pub session: Addr<StreamSession>,
}

#[derive(Message)]
#[rtype(result = "Option<Addr<StreamSession>>")]
pub struct Lookup {
    pub id: String,
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
        self.streams.remove(&msg.id);
        self.publish();
    }
}

impl Handler<Lookup> for StreamHub {
    type Result = Option<Addr<StreamSession>>;
    fn handle(&mut self, msg: Lookup, _: &mut Self::Context) -> Self::Result {
        self.streams
            .get(msg.id.as_str())
            .filter(|a| a.connected())
            .cloned()
    }
}
