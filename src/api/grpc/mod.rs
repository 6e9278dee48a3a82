//! The gRPC front end: the Open Inference Protocol (`inference.GRPCInferenceService`, the
//! KServe v2 protocol with Triton's additions, so that `tritonclient.grpc` works unchanged),
//! `grpc.health.v1.Health`, and server reflection (so `grpcurl` needs no proto files), on
//! plaintext HTTP/2 (h2c) beside the HTTP listener.
//!
//! - `inference.rs`: the inference service; `convert.rs`: its tensors; `model_config.rs`:
//!   Triton's `ModelConfig`; `health.rs`: the health service.
//! - `counted.rs`: each connection's bytes and the open connections, for `/metrics`.
//! - This file: the listener, on a runtime of its own (tonic needs a multi-threaded tokio
//!   runtime; the actors take messages from any thread), its message limits, its HTTP/2
//!   windows (see `builder`), status messages cut to size, and its part of the graceful
//!   shutdown ([`GrpcServer::drain`], [`GrpcServer::stop`]).
//!
//! The proto files are vendored in `proto/` (sources and licences in `proto/README.md`) and
//! compiled by `build.rs` in pure Rust.

mod convert;
mod counted;
mod health;
mod inference;
mod model_config;
mod sequence;
mod speech;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tonic::codec::CompressionEncoding;
use tonic::codegen::http;
use tonic::metadata::MetadataMap;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Code, Status};

use super::AppState;
use crate::error::MAX_GRPC_MESSAGE;

/// The generated protocol types, services and clients.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto {
    pub mod inference {
        tonic::include_proto!("inference");
    }
    pub mod health {
        tonic::include_proto!("grpc.health.v1");
    }
    pub mod speech {
        tonic::include_proto!("streamserve.speech.v1");
    }
    /// The compiled descriptors of every vendored proto file, for reflection.
    pub const DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));
}

/// The inference service's full name (also a name `grpc.health.v1` answers for).
pub const INFERENCE_SERVICE: &str = "inference.GRPCInferenceService";

/// Where the gRPC server is in the shutdown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stop {
    Serving,
    /// No new connections or calls; calls in flight finish, streams end after their answers.
    Draining,
    /// The drain time is up: whatever is left is dropped.
    Now,
}

/// Resolves once the server drains. A dropped sender (a server whose `Running` was dropped,
/// as tests do) never drains.
async fn draining(mut stop: watch::Receiver<Stop>) {
    if stop.wait_for(|s| *s >= Stop::Draining).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The call's deadline from its `grpc-timeout` header (`<up to 8 digits><H|M|S|m|u|n>`).
fn grpc_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The id a call is logged under: the request's `id`, else an `x-request-id` header, else a
/// fresh one.
fn request_id(metadata: &MetadataMap, id: &str) -> String {
    let header = metadata
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .and_then(crate::untrusted::request_id);
    crate::untrusted::request_id(id)
        .or(header)
        .unwrap_or_else(crate::untrusted::new_request_id)
}

/// tonic's words for a message over the decoding limit.
const TOO_LARGE: &str = "Error, decoded message length too large";

/// A transport error as the protocol names it: tonic reports a message over the limit as
/// OUT_OF_RANGE, where gRPC's status code table says RESOURCE_EXHAUSTED.
fn transport_status(status: Status) -> Status {
    if status.code() == Code::OutOfRange && status.message().starts_with(TOO_LARGE) {
        Status::resource_exhausted(status.message().to_string())
    } else {
        status
    }
}

/// [`transport_status`] for unary calls, whose decoding error tonic answers before any handler
/// runs (a trailers-only response: the status is in the headers).
fn fix_too_large<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    let too_large = headers.get("grpc-status").is_some_and(|v| v == "11")
        && headers
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|m| {
                m.starts_with(&TOO_LARGE.replace(' ', "%20")) || m.starts_with(TOO_LARGE)
            });
    if too_large {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    }
    response
}

/// What every answer passes through on its way out: [`fix_too_large`], then [`cap_message`].
fn fix_status<B>(response: http::Response<B>) -> http::Response<B> {
    let mut response = fix_too_large(response);
    cap_message(response.headers_mut());
    response
}

/// A status message in the headers (a trailers-only answer: every error of a unary call, and
/// of a stream before its first answer) cut to [`MAX_GRPC_MESSAGE`] bytes, whoever built the
/// `Status`: a longer one can make the client refuse the answer (RESOURCE_EXHAUSTED, its
/// metadata limit) in place of its real code. `ServeError::to_grpc_status` already cuts the
/// server's own errors; this is for the rest. (The trailers after a stream's answers are out
/// of reach: tonic's bodies can only be wrapped through `http-body`, see `counted.rs`.)
fn cap_message(headers: &mut http::HeaderMap) {
    let Some(encoded) = headers.get("grpc-message") else {
        return;
    };
    if encoded.len() <= MAX_GRPC_MESSAGE {
        return; // percent-encoded, it is at least as long as the message
    }
    let message = percent_encoding::percent_decode(encoded.as_bytes())
        .decode_utf8_lossy()
        .into_owned();
    let std::borrow::Cow::Owned(capped) = crate::error::grpc_message(&message) else {
        return;
    };
    let mut fixed = http::HeaderMap::new();
    if Status::new(Code::Unknown, capped)
        .add_header(&mut fixed)
        .is_ok()
    {
        if let Some(value) = fixed.remove("grpc-message") {
            headers.insert("grpc-message", value);
        }
    }
}

/// The running gRPC listener.
pub struct GrpcServer {
    pub addr: SocketAddr,
    stop: watch::Sender<Stop>,
    stopped: watch::Receiver<bool>,
}

/// What the gRPC listener is configured with.
pub struct GrpcConfig {
    /// The port, bound by the caller before the models loaded (so that a taken port failed the
    /// start at once, and port 0 is resolved).
    pub listener: std::net::TcpListener,
    /// The transport, made with its TLS files before the models loaded.
    pub transport: Transport,
    pub max_message: usize,
    pub workers: usize,
}

/// The gRPC transport's settings, TLS included. Made by [`transport`] before anything slow
/// starts, so that a TLS file that cannot be used fails the start at once, as a port in use
/// does, not after minutes of loading models.
pub struct Transport(Server);

/// HTTP/2 receive window of one call (stream): how much of a call's request the client may send
/// before the server reads it.
const STREAM_WINDOW: u32 = 1024 * 1024;

/// HTTP/2 receive window of a connection, shared by all its calls.
const CONNECTION_WINDOW: u32 = 16 * STREAM_WINDOW;

/// The transport, with TLS when a certificate is configured (`tls`: the PEM files of the
/// certificate chain and its private key; `None`: h2c). The files are read here, so that a
/// missing or malformed one fails the start, naming the file but never printing the key.
pub fn transport(tls: Option<(&std::path::Path, &std::path::Path)>) -> anyhow::Result<Transport> {
    builder(tls).map(Transport)
}

fn builder(tls: Option<(&std::path::Path, &std::path::Path)>) -> anyhow::Result<Server> {
    // Flow control: a call whose requests are not read (a `ModelStreamInfer` with 64 requests
    // in flight whose client does not read the answers) holds its unread bytes against both
    // its stream's window and its connection's. With hyper's defaults (1 MiB each) one such
    // stream spends the whole connection window, and every other call on that connection
    // (unary ones, `ServerLive`) waits until the stream is cancelled. A stream window well
    // under the connection's (1:16, as gRPC-Go's) leaves a stalled stream holding only its
    // own; it takes 16 of them to hold up a connection. The stream window stays hyper's 1 MiB,
    // so a call's upload rate is what it was; a connection buffers at most 16 MiB unread.
    // (Not hyper's adaptive window: it sets the stream window to the connection's.)
    let server = Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW);
    let Some((cert, key)) = tls else {
        return Ok(server);
    };
    let read = |path: &std::path::Path, what: &str| {
        std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("cannot read the gRPC TLS {what} {}: {e}", path.display()))
    };
    let identity = Identity::from_pem(read(cert, "certificate")?, read(key, "key")?);
    server
        .tls_config(ServerTlsConfig::new().identity(identity))
        .map_err(|e| {
            anyhow::anyhow!(
                "gRPC TLS: {} and {} are not a PEM certificate chain and its private key ({e})",
                cert.display(),
                key.display()
            )
        })
}

impl GrpcServer {
    /// Serves the listener on a runtime thread of its own.
    pub fn start(state: Arc<AppState>, config: GrpcConfig) -> anyhow::Result<GrpcServer> {
        let Transport(builder) = config.transport;
        let listener = config.listener;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.workers.max(1))
            .thread_name("grpc")
            .enable_all()
            .build()?;
        let (stop, stop_rx) = watch::channel(Stop::Serving);
        let (stopped_tx, stopped) = watch::channel(false);
        let max_message = config.max_message;
        std::thread::Builder::new()
            .name("streamserve-grpc".into())
            .spawn(move || {
                runtime.block_on(serve(builder, listener, state, stop_rx, max_message));
                runtime.shutdown_timeout(Duration::from_millis(100));
                let _ = stopped_tx.send(true);
            })?;
        Ok(GrpcServer {
            addr,
            stop,
            stopped,
        })
    }

    /// Stops taking connections and calls (GOAWAY); calls in flight go on, streams end once
    /// their answers are sent, health turns NOT_SERVING.
    pub fn drain(&self) {
        self.stop.send_if_modified(|s| {
            let changed = *s < Stop::Draining;
            *s = (*s).max(Stop::Draining);
            changed
        });
    }

    /// Waits until the server has stopped, at most until `deadline`; then drops what is left.
    pub async fn stop(&self, deadline: tokio::time::Instant) {
        self.drain();
        let mut stopped = self.stopped.clone();
        let done = tokio::time::timeout_at(deadline, stopped.wait_for(|s| *s))
            .await
            .is_ok();
        if !done {
            tracing::warn!("gRPC calls still open when the drain time was up; closing them");
            let _ = self.stop.send(Stop::Now);
            let _ = tokio::time::timeout(Duration::from_secs(1), stopped.wait_for(|s| *s)).await;
        }
    }
}

async fn serve(
    builder: Server,
    listener: std::net::TcpListener,
    state: Arc<AppState>,
    stop: watch::Receiver<Stop>,
    max_message: usize,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(error = %e, "gRPC listener failed");
            return;
        }
    };
    // Small answers: without TCP_NODELAY, Nagle's algorithm holds one back behind the peer's
    // delayed ACK (as on the HTTP listener).
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    // Each connection counts its bytes, and itself while open (`counted.rs`).
    let incoming =
        futures_util::StreamExt::map(incoming, |accepted| accepted.map(counted::Counted::new));
    let inference = Arc::new(inference::Inference {
        state: state.clone(),
        max_message,
        stop: stop.clone(),
    });
    // Requests compressed as tritonclient's `compression_algorithm` sends them (gzip or
    // deflate, as Triton takes); the message limit bounds the inflated size (tonic inflates
    // into a buffer of at most `max_message`), so a small message cannot expand without bound.
    let inference =
        proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer::new(inference)
            .accept_compressed(CompressionEncoding::Gzip)
            .accept_compressed(CompressionEncoding::Deflate)
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message);
    let speech = proto::speech::speech_server::SpeechServer::new(Arc::new(speech::SpeechService {
        state: state.clone(),
    }))
    .accept_compressed(CompressionEncoding::Gzip)
    .accept_compressed(CompressionEncoding::Deflate)
    .max_decoding_message_size(max_message)
    .max_encoding_message_size(max_message);
    let health = proto::health::health_server::HealthServer::new(Arc::new(health::HealthService {
        state,
        stop: stop.clone(),
    }));
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::DESCRIPTORS)
    };
    let (reflection_v1, reflection_v1alpha) =
        match (reflection().build_v1(), reflection().build_v1alpha()) {
            (Ok(v1), Ok(v1alpha)) => (v1, v1alpha),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "gRPC reflection cannot read the descriptors");
                return;
            }
        };
    let graceful = draining(stop.clone());
    let mut now = stop.clone();
    let server = builder
        .layer(tower::util::MapResponseLayer::new(fix_status))
        .add_service(inference)
        .add_service(speech)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(incoming, graceful);
    tokio::select! {
        result = server => {
            if let Err(e) = result {
                tracing::error!(error = %e, "gRPC server failed");
            }
        }
        _ = async { let _ = now.wait_for(|s| *s == Stop::Now).await; std::future::pending::<()>().await } => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        let parse = |v: &str| {
            let mut m = MetadataMap::new();
            m.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&m)
        };
        assert_eq!(parse("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse("9n"), Some(Duration::from_nanos(9)));
        assert_eq!(parse("123456789S"), None, "at most 8 digits");
        assert_eq!(parse("S"), None);
        assert_eq!(parse("5x"), None);
        assert_eq!(grpc_timeout(&MetadataMap::new()), None);
    }

    #[test]
    fn a_message_over_the_limit_is_resource_exhausted() {
        let status =
            Status::out_of_range(format!("{TOO_LARGE}: found 9 bytes, the limit is: 8 bytes"));
        assert_eq!(transport_status(status).code(), Code::ResourceExhausted);
        let other = Status::out_of_range("something else");
        assert_eq!(transport_status(other).code(), Code::OutOfRange);
        let response = status_response(Status::out_of_range(format!("{TOO_LARGE}: found 9")));
        assert_eq!(fix_too_large(response).headers()["grpc-status"], "8");
        let response = status_response(Status::invalid_argument("no"));
        assert_eq!(fix_too_large(response).headers()["grpc-status"], "3");
    }

    #[test]
    fn long_status_messages_are_cut_in_the_headers() {
        let long = format!("unknown service '{}' é%", "x".repeat(20_000));
        let response = fix_status(status_response(Status::not_found(long)));
        let status = Status::from_header_map(response.headers()).unwrap();
        assert_eq!(status.code(), Code::NotFound);
        assert!(status.message().len() <= MAX_GRPC_MESSAGE);
        assert!(status.message().starts_with("unknown service 'xxx"));
        assert!(
            status.message().ends_with(" bytes]"),
            "{}",
            status.message()
        );
        // Short ones pass as they are, escapes and all.
        let short = "a 'name' with é, % and\n";
        let response = fix_status(status_response(Status::invalid_argument(short)));
        let status = Status::from_header_map(response.headers()).unwrap();
        assert_eq!(status.message(), short);
    }

    fn status_response(status: Status) -> http::Response<()> {
        let mut response = http::Response::new(());
        status.add_header(response.headers_mut()).unwrap();
        response
    }
}
