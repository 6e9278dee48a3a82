//! Bytes in and out, and open connections, per protocol: what the network side of the server
//! carries, beside what its models compute. Each protocol counts where it moves its bytes:
//!
//! - HTTP (in the door, `api/door/`, which every request passes and which already wraps
//!   every request body): request and response *bodies*, not headers; a request body as the
//!   server reads it, a response body as it is handed to the connection ([`count_response`]:
//!   its size when known, else chunk by chunk). A WebSocket upgrade is left to the WebSocket
//!   count.
//! - WebSocket (`api/ws/`): the payload of each frame read and written (text, binary, ping,
//!   pong), not the frame headers.
//! - gRPC (`api/grpc/counted.rs`): what goes through each connection's socket, HTTP/2 framing
//!   and headers included (TLS records when TLS is on). tonic's bodies can only be wrapped
//!   through `http-body`'s trait, which this crate does not depend on; the connection is
//!   where the bytes can be seen without it, and where the open connections are counted.
//!
//! The handles are made once ([`install`]): counting a chunk is one atomic add.

use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_web::dev::ServiceResponse;
use actix_web::web::Bytes;
use metrics::{Counter, Gauge};

/// A protocol the server speaks, as the `protocol` label names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http = 0,
    WebSocket = 1,
    Grpc = 2,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Http, Protocol::WebSocket, Protocol::Grpc];

    pub fn label(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::WebSocket => "websocket",
            Protocol::Grpc => "grpc",
        }
    }
}

struct Handles {
    received: [Counter; 3],
    sent: [Counter; 3],
    /// Open connections: HTTP's and gRPC's (a WebSocket is an HTTP connection, and its
    /// streams have `streamserve_stream_connections`).
    open: [Option<Gauge>; 3],
}

static HANDLES: OnceLock<Handles> = OnceLock::new();

/// Makes the handles and puts every series at 0 (called once the recorder is installed; before
/// that, nothing is counted).
pub(super) fn install() {
    HANDLES.get_or_init(|| {
        let counter = |name: &'static str| {
            Protocol::ALL.map(|p| {
                let counter = metrics::counter!(name, "protocol" => p.label());
                counter.increment(0);
                counter
            })
        };
        let open = Protocol::ALL.map(|p| {
            (p != Protocol::WebSocket).then(|| {
                let gauge =
                    metrics::gauge!("streamserve_open_connections", "protocol" => p.label());
                gauge.increment(0.0);
                gauge
            })
        });
        Handles {
            received: counter("streamserve_received_bytes_total"),
            sent: counter("streamserve_sent_bytes_total"),
            open,
        }
    });
}

/// Counts `bytes` received over `protocol`.
pub fn received(protocol: Protocol, bytes: usize) {
    if let Some(h) = HANDLES.get() {
        h.received[protocol as usize].increment(bytes as u64);
    }
}

/// Counts `bytes` sent over `protocol`.
pub fn sent(protocol: Protocol, bytes: usize) {
    if let Some(h) = HANDLES.get() {
        h.sent[protocol as usize].increment(bytes as u64);
    }
}

/// One open connection, counted until dropped with it.
#[derive(Debug)]
pub struct ConnectionGuard(Option<&'static Gauge>);

impl ConnectionGuard {
    pub fn new(protocol: Protocol) -> ConnectionGuard {
        let gauge = HANDLES
            .get()
            .and_then(|h| h.open[protocol as usize].as_ref());
        if let Some(gauge) = gauge {
            gauge.increment(1.0);
        }
        ConnectionGuard(gauge)
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if let Some(gauge) = self.0 {
            gauge.decrement(1.0);
        }
    }
}

/// For `HttpServer::on_connect`: the connection's data holds a guard, dropped with it.
pub fn on_http_connect(_: &dyn std::any::Any, data: &mut actix_web::dev::Extensions) {
    data.insert(ConnectionGuard::new(Protocol::Http));
}

/// Counts an HTTP response's body as it goes out (not for a WebSocket upgrade, whose bytes are
/// counted as WebSocket's, nor for HEAD, which sends none).
pub fn count_response(
    response: ServiceResponse<BoxBody>,
    upgrade: bool,
    head: bool,
) -> ServiceResponse<BoxBody> {
    if upgrade || head {
        return response;
    }
    match response.response().body().size() {
        BodySize::None => response,
        BodySize::Sized(n) => {
            sent(Protocol::Http, n as usize);
            response
        }
        BodySize::Stream => response.map_body(|_, body| BoxBody::new(CountedBody(body))),
    }
}

/// A streamed response body that counts its chunks as they go out.
struct CountedBody(BoxBody);

impl MessageBody for CountedBody {
    type Error = Box<dyn std::error::Error>;

    fn size(&self) -> BodySize {
        self.0.size()
    }

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let next = Pin::new(&mut self.0).poll_next(cx);
        if let Poll::Ready(Some(Ok(chunk))) = &next {
            sent(Protocol::Http, chunk.len());
        }
        next
    }
}
