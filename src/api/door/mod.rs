//! The door every HTTP request passes, before and after its handler: one middleware
//! ([`Door::wrap`]) that
//!
//! - guards the request body against slow and stalled senders ([`SlowBodyGuard`]): a body must
//!   arrive within a whole-body deadline and, after a short grace, at a minimum average rate,
//!   or reading it fails with a timeout that handlers answer 408 and the connection closes. A
//!   client trickling one byte every two seconds holds a connection and its memory for seconds,
//!   not forever;
//! - counts the requests being handled and the open streams ([`Work`]), so a shutdown knows
//!   when what it has read is answered;
//! - marks every response `Connection: close` once the server is draining, so keep-alive
//!   clients leave after the answer they are waiting for instead of sending on a connection
//!   that is about to be cut;
//! - gives error responses that the framework builds without a body (405 with `Allow`, an
//!   extractor's 400) the same `{"error": "..."}` body as every other error.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{Payload, Service, ServiceRequest, ServiceResponse};
use actix_web::error::PayloadError;
use actix_web::http::{header, ConnectionType, Method, StatusCode};
use actix_web::web::Bytes;
use actix_web::{HttpMessage, HttpResponse};
use futures_util::Stream;
use tokio::time::{Instant, Sleep};

use crate::machine::traffic::{self, Protocol};

pub mod arrival;
pub mod limit;

/// The message a timed-out body read carries; [`is_body_timeout`] recognises it.
const BODY_TIMEOUT: &str = "request body arrived too slowly";
/// Time a body may take before the minimum rate applies (a connection's first bytes are slow).
const RATE_GRACE: Duration = Duration::from_secs(2);

/// How fast a request body must arrive.
#[derive(Clone, Copy, Debug)]
pub struct BodyPace {
    /// The whole body within this.
    pub deadline: Duration,
    /// After [`RATE_GRACE`], on average at least this many bytes per second (0: no minimum).
    pub min_bytes_per_sec: u64,
}

/// Requests being handled and streams open, shared by the door, the stream transport and the
/// shutdown.
#[derive(Default)]
pub struct Work {
    active: AtomicUsize,
    draining: AtomicBool,
}

impl Work {
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// From now on every response closes its connection.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Counts one unit of work until the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> WorkGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        WorkGuard(self.clone())
    }
}

pub struct WorkGuard(Arc<Work>);

impl Drop for WorkGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the middleware needs; cloned into every App worker.
#[derive(Clone)]
pub struct Door {
    pub pace: BodyPace,
    pub work: Arc<Work>,
}

impl Door {
    /// The middleware, for `App::wrap_fn`.
    pub fn wrap<S>(
        &self,
        mut req: ServiceRequest,
        service: &S,
    ) -> impl Future<Output = Result<ServiceResponse<BoxBody>, actix_web::Error>> + 'static
    where
        S: Service<ServiceRequest, Response = ServiceResponse<BoxBody>, Error = actix_web::Error>,
        S::Future: 'static,
    {
        let guard = self.work.begin();
        // A WebSocket upgrade's payload is the stream itself, paced (and its bytes counted) by
        // its own protocol. Every other body is read through the guard, which also counts it.
        let upgrade = req.headers().contains_key(header::UPGRADE);
        if !upgrade && has_body(&req) {
            let inner = req.take_payload();
            req.set_payload(Payload::Stream {
                payload: Box::pin(SlowBodyGuard::new(inner, self.pace)),
            });
        }
        let method = req.method().clone();
        let work = self.work.clone();
        let response = service.call(req);
        async move {
            let mut response = response.await?;
            if work.draining() {
                response
                    .response_mut()
                    .head_mut()
                    .set_connection_type(ConnectionType::Close);
            }
            drop(guard);
            let response = with_error_body(response, &method);
            Ok(traffic::count_response(
                response,
                upgrade,
                method == Method::HEAD,
            ))
        }
    }
}

fn has_body(req: &ServiceRequest) -> bool {
    let headers = req.headers();
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
}

/// An error status with an empty body gets `{"error": "..."}` like every other error.
fn with_error_body(
    response: ServiceResponse<BoxBody>,
    method: &actix_web::http::Method,
) -> ServiceResponse<BoxBody> {
    let status = response.status();
    let empty = matches!(
        response.response().body().size(),
        actix_web::body::BodySize::None | actix_web::body::BodySize::Sized(0)
    );
    if !(status.is_client_error() || status.is_server_error()) || !empty {
        return response;
    }
    let message = match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            let allowed = response
                .headers()
                .get(header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            format!("method {method} is not allowed on this path (allowed: {allowed})")
        }
        other => other
            .canonical_reason()
            .unwrap_or("request failed")
            .to_string(),
    };
    response.map_body(|head, _| {
        head.headers.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        let body = serde_json::json!({ "error": message }).to_string();
        BoxBody::new(body)
    })
}

/// Whether a body read failed because the body came too slowly.
pub fn is_body_timeout(error: &PayloadError) -> bool {
    match error {
        PayloadError::Io(e) => e.kind() == io::ErrorKind::TimedOut && e.to_string() == BODY_TIMEOUT,
        _ => false,
    }
}

/// Wraps a request body: ends it with a timeout error when it misses its [`BodyPace`].
pub struct SlowBodyGuard {
    inner: Payload,
    started: Instant,
    received: u64,
    pace: BodyPace,
    /// Fires when the body, at what it has received so far, falls behind its pace. Set only
    /// once the body has to be waited for: most bodies are in the socket buffer when read,
    /// and they cost no timer.
    alarm: Option<Pin<Box<Sleep>>>,
    done: bool,
}

impl SlowBodyGuard {
    pub fn new(inner: Payload, pace: BodyPace) -> SlowBodyGuard {
        SlowBodyGuard {
            inner,
            started: Instant::now(),
            received: 0,
            pace,
            alarm: None,
            done: false,
        }
    }

    /// The moment this body falls behind: the whole-body deadline, or the time by which the
    /// bytes received so far would be the minimum rate's worth.
    fn due(&self) -> Instant {
        let deadline = self.started + self.pace.deadline;
        if self.pace.min_bytes_per_sec == 0 {
            return deadline;
        }
        let earned =
            Duration::from_secs_f64(self.received as f64 / self.pace.min_bytes_per_sec as f64);
        deadline.min(self.started + RATE_GRACE + earned)
    }
}

impl Stream for SlowBodyGuard {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                this.received += chunk.len() as u64;
                traffic::received(Protocol::Http, chunk.len());
                if this.alarm.is_some() {
                    let due = this.due();
                    if let Some(alarm) = this.alarm.as_mut() {
                        alarm.as_mut().reset(due);
                    }
                }
                return Poll::Ready(Some(Ok(chunk)));
            }
            Poll::Ready(other) => {
                this.done = other.is_none();
                return Poll::Ready(other);
            }
            Poll::Pending => {}
        }
        let due = this.due();
        let alarm = this
            .alarm
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        if alarm.as_mut().poll(cx).is_ready() {
            this.done = true;
            return Poll::Ready(Some(Err(PayloadError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                BODY_TIMEOUT,
            )))));
        }
        Poll::Pending
    }
}

/// Query-string errors (e.g. `?threshold=abc`) as `{"error": ...}` 400s, like every other error.
pub fn query_errors() -> actix_web::web::QueryConfig {
    actix_web::web::QueryConfig::default().error_handler(|e, _| {
        crate::error::ServeError::invalid(format!("bad query string: {e}")).into()
    })
}

/// Path errors as `{"error": ...}` 400s.
pub fn path_errors() -> actix_web::web::PathConfig {
    actix_web::web::PathConfig::default()
        .error_handler(|e, _| crate::error::ServeError::invalid(format!("bad path: {e}")).into())
}

/// The 404 for paths no route knows.
pub async fn no_such_endpoint() -> HttpResponse {
    HttpResponse::NotFound().json(serde_json::json!({ "error": "no such endpoint" }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn pace(deadline_ms: u64, rate: u64) -> BodyPace {
        BodyPace {
            deadline: Duration::from_millis(deadline_ms),
            min_bytes_per_sec: rate,
        }
    }

    fn trickle(chunks: Vec<(u64, &'static [u8])>) -> Payload {
        let stream = futures_util::stream::iter(chunks).then(|(wait_ms, bytes)| async move {
            tokio::time::sleep(Duration::from_millis(wait_ms)).await;
            Ok::<_, PayloadError>(Bytes::from_static(bytes))
        });
        Payload::Stream {
            payload: Box::pin(stream),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_keeps_its_pace_arrives_whole() {
        let body = trickle(vec![(100, b"abc"), (100, b"def")]);
        let mut guard = SlowBodyGuard::new(body, pace(5_000, 1));
        let mut got = Vec::new();
        while let Some(chunk) = guard.next().await {
            got.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(got, b"abcdef");
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickle_below_the_minimum_rate_times_out() {
        // One byte every 2 s against 100 B/s: behind after the 2 s grace plus 10 ms.
        let chunks = (0..10).map(|_| (2_000, &b"x"[..])).collect();
        let mut guard = SlowBodyGuard::new(trickle(chunks), pace(60_000, 100));
        let started = Instant::now();
        let error = loop {
            match guard.next().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => break e,
                None => panic!("the trickle was accepted"),
            }
        };
        assert!(is_body_timeout(&error), "{error}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_times_out_at_its_deadline() {
        let body = trickle(vec![(0, b"abc"), (3_600_000, b"never")]);
        let mut guard = SlowBodyGuard::new(body, pace(1_000, 0));
        assert!(guard.next().await.unwrap().is_ok());
        let error = guard.next().await.unwrap().unwrap_err();
        assert!(is_body_timeout(&error));
        assert!(guard.next().await.is_none());
    }
}
