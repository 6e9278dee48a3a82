//! The one error type that a request can end in, and its mappings to the protocols: to HTTP
//! (a status and a KServe-style `{"error": "..."}` body) and, beside it, to gRPC (a
//! [`tonic::Status`] code, the same message, and `retry-after` metadata where REST sends
//! `Retry-After`). WebSocket close codes are chosen in `api/ws.rs`.
//!
//! Every layer (protocol decoding, validation, routing, inference) returns a [`ServeError`];
//! `api/` turns it into its protocol's answer with the codes chosen here.

use std::time::Duration;

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};

#[derive(Debug, Clone, thiserror::Error)]
pub enum ServeError {
    #[error("unknown model '{0}'")]
    ModelNotFound(String),
    #[error("model '{model}' has no version '{version}' (available: {available})")]
    VersionNotFound {
        model: String,
        version: String,
        available: String,
    },
    #[error("model '{model}' version '{version}' is not loaded")]
    ModelCold { model: String, version: String },
    #[error("{0}")]
    Conflict(String),
    /// A batch job id that this server does not know (docs/jobs.md).
    #[error("unknown job '{0}'")]
    JobNotFound(String),
    /// No published prediction for a key, or no published predictions for a model.
    #[error("{0}")]
    PredictionNotFound(String),
    #[error("model '{model}' is unavailable: {reason}")]
    ModelUnavailable { model: String, reason: String },
    #[error("{0}")]
    InvalidRequest(String),
    #[error("request body of {size} bytes exceeds the limit of {limit} bytes")]
    PayloadTooLarge { size: usize, limit: usize },
    #[error("request body of {size} bytes is larger than the {limit_mb} MiB all request bodies may hold together (--max-body-memory-mb), so it can never be read")]
    LargerThanBodyMemory { size: usize, limit_mb: u64 },
    #[error("request body of {size} bytes exceeds the limit of {limit} bytes for model '{model}' (its inputs at max_batch_size {rows} rows)")]
    TooLargeForModel {
        size: usize,
        limit: usize,
        model: String,
        rows: usize,
    },
    #[error("the answer of {size} bytes exceeds the message limit of {limit} bytes (ask for fewer rows or outputs)")]
    ResponseTooLarge { size: usize, limit: usize },
    #[error("the request body did not arrive in time: {received} bytes in {} ms (a body must arrive within {} s, at least {min_rate} bytes/s after its first 2 s)", elapsed.as_millis(), deadline.as_secs())]
    BodyTimeout {
        received: usize,
        elapsed: Duration,
        deadline: Duration,
        min_rate: u64,
    },
    #[error("the server holds as many request bodies as its memory bound allows ({limit_mb} MiB); retry later")]
    BodyMemoryFull { limit_mb: u64 },
    #[error("Content-Encoding '{0}' is not supported (use gzip, deflate or identity)")]
    UnsupportedEncoding(String),
    #[error(
        "model '{model}' is overloaded: {queued} requests queued (limit {limit}); retry later"
    )]
    Overloaded {
        model: String,
        queued: usize,
        limit: usize,
        retry_after: Duration,
    },
    /// The door's admission limit: the server itself (HTTP, decoding), not a model queue, is
    /// at capacity.
    #[error(
        "the server is at its admission limit ({limit} inference requests in flight); retry later"
    )]
    Busy { limit: usize, retry_after: Duration },
    /// The open streams are behind real time: a new one is refused so that they keep up.
    #[error("this server's open streams are behind real time; retry later")]
    StreamsBehind { retry_after: Duration },
    #[error("model '{model}' is not ready: {reason}")]
    NotReady {
        model: String,
        reason: String,
        retry_after: Duration,
    },
    #[error("deadline exceeded after waiting {} ms in the queue; the request was not run", waited.as_millis())]
    DeadlineExceeded { waited: Duration },
    #[error("inference failed: {0}")]
    Inference(String),
    #[error("the worker serving this request was lost: {0}")]
    WorkerLost(String),
    /// The version a request or stream step was resolved to was taken out of service (a
    /// rollout, the fleet or an admin unloaded it) before it ran; nothing of it was run.
    #[error("model '{model}' version {version} was taken out of service before this request ran")]
    VersionRetired { model: String, version: String },
    #[error("the admin API is off; start the server with --admin-token (or STREAMSERVE_ADMIN_TOKEN) to enable it")]
    AdminOff,
    #[error("missing or wrong admin token (send Authorization: Bearer <token>)")]
    Unauthorized,
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{what}; retry in {} ms", retry_after.as_millis().max(1))]
    RateLimited { what: String, retry_after: Duration },
    #[error("server is shutting down")]
    ShuttingDown,
    /// The server's own storage (the jobs directory) failed: nothing the client can fix.
    #[error("{0}")]
    Storage(String),
    /// The model registry, for an admin request that needed it.
    #[error("{0}")]
    Registry(#[from] crate::registry::RegistryError),
}

impl ServeError {
    pub fn invalid(message: impl Into<String>) -> ServeError {
        ServeError::InvalidRequest(message.into())
    }

    /// A short machine-readable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ServeError::ModelNotFound(_)
            | ServeError::VersionNotFound { .. }
            | ServeError::JobNotFound(_)
            | ServeError::PredictionNotFound(_) => "not_found",
            ServeError::ModelUnavailable { .. } => "unavailable",
            ServeError::ModelCold { .. } => "cold",
            ServeError::Conflict(_) => "conflict",
            ServeError::InvalidRequest(_) => "invalid",
            ServeError::PayloadTooLarge { .. }
            | ServeError::LargerThanBodyMemory { .. }
            | ServeError::TooLargeForModel { .. } => "too_large",
            ServeError::ResponseTooLarge { .. } => "response_too_large",
            ServeError::BodyTimeout { .. } => "body_timeout",
            ServeError::BodyMemoryFull { .. } => "body_memory_full",
            ServeError::UnsupportedEncoding(_) => "unsupported_encoding",
            ServeError::Overloaded { .. } => "overloaded",
            ServeError::Busy { .. } => "busy",
            ServeError::StreamsBehind { .. } => "streams_behind",
            ServeError::NotReady { .. } => "not_ready",
            ServeError::Inference(_) => "inference",
            ServeError::DeadlineExceeded { .. } => "deadline",
            ServeError::WorkerLost(_) => "worker_lost",
            ServeError::VersionRetired { .. } => "retired",
            ServeError::ShuttingDown => "shutting_down",
            ServeError::AdminOff => "admin_off",
            ServeError::Unauthorized => "unauthorized",
            ServeError::Unauthenticated(_) => "unauthenticated",
            ServeError::Forbidden(_) => "forbidden",
            ServeError::RateLimited { .. } => "rate_limited",
            ServeError::Storage(_) => "storage",
            ServeError::Registry(_) => "registry",
        }
    }

    /// When a client may retry, in whole seconds rounded up (so it never retries too early).
    fn retry_after_secs(&self) -> Option<u128> {
        self.retry_after()
            .map(|after| after.as_millis().div_ceil(1000).max(1))
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            ServeError::Overloaded { retry_after, .. }
            | ServeError::Busy { retry_after, .. }
            | ServeError::StreamsBehind { retry_after }
            | ServeError::NotReady { retry_after, .. }
            | ServeError::RateLimited { retry_after, .. } => Some(*retry_after),
            ServeError::WorkerLost(_)
            | ServeError::VersionRetired { .. }
            | ServeError::ShuttingDown
            | ServeError::BodyMemoryFull { .. } => Some(Duration::from_secs(1)),
            _ => None,
        }
    }
}

impl ResponseError for ServeError {
    fn status_code(&self) -> StatusCode {
        match self {
            ServeError::ModelNotFound(_)
            | ServeError::VersionNotFound { .. }
            | ServeError::JobNotFound(_)
            | ServeError::PredictionNotFound(_)
            | ServeError::AdminOff => StatusCode::NOT_FOUND,
            ServeError::Unauthorized | ServeError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ServeError::Forbidden(_) => StatusCode::FORBIDDEN,
            ServeError::Conflict(_) => StatusCode::CONFLICT,
            ServeError::ModelCold { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ServeError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            ServeError::PayloadTooLarge { .. }
            | ServeError::LargerThanBodyMemory { .. }
            | ServeError::TooLargeForModel { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ServeError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ServeError::UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ServeError::Overloaded { .. }
            | ServeError::Busy { .. }
            | ServeError::StreamsBehind { .. }
            | ServeError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ServeError::ModelUnavailable { .. }
            | ServeError::NotReady { .. }
            | ServeError::WorkerLost(_)
            | ServeError::VersionRetired { .. }
            | ServeError::ShuttingDown
            | ServeError::BodyMemoryFull { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ServeError::Inference(_)
            | ServeError::ResponseTooLarge { .. }
            | ServeError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ServeError::DeadlineExceeded { .. } => StatusCode::GATEWAY_TIMEOUT,
            ServeError::Registry(e) => {
                use crate::registry::RegistryError as R;
                match e {
                    R::NotFound(_) => StatusCode::NOT_FOUND,
                    R::Refused(_) | R::Conflict(_) => StatusCode::CONFLICT,
                    R::Unreachable(_) => StatusCode::SERVICE_UNAVAILABLE,
                    R::Corrupt(_) => StatusCode::BAD_GATEWAY,
                    R::Config(_) | R::Local(_) => StatusCode::INTERNAL_SERVER_ERROR,
                }
            }
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        if let Some(secs) = self.retry_after_secs() {
            response.insert_header((header::RETRY_AFTER, secs.to_string()));
        }
        if matches!(self, ServeError::Unauthenticated(_)) {
            response.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
        }
        if matches!(
            self,
            ServeError::BodyTimeout { .. }
                | ServeError::PayloadTooLarge { .. }
                | ServeError::LargerThanBodyMemory { .. }
                | ServeError::TooLargeForModel { .. }
        ) {
            // The rest of the body is never read: the connection cannot carry another request.
            response.force_close();
        }
        response.json(serde_json::json!({ "error": self.to_string() }))
    }
}

impl ServeError {
    /// The gRPC status code, following the HTTP status: 400 INVALID_ARGUMENT, 404 NOT_FOUND,
    /// 413 and 429 RESOURCE_EXHAUSTED (gRPC's code for a message over the limit and for a
    /// quota), 503 UNAVAILABLE, 504 DEADLINE_EXCEEDED.
    pub fn grpc_code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            ServeError::ModelNotFound(_)
            | ServeError::VersionNotFound { .. }
            | ServeError::JobNotFound(_)
            | ServeError::PredictionNotFound(_)
            | ServeError::AdminOff => Code::NotFound,
            ServeError::Unauthorized | ServeError::Unauthenticated(_) => Code::Unauthenticated,
            ServeError::Forbidden(_) => Code::PermissionDenied,
            ServeError::Conflict(_) => Code::FailedPrecondition,
            ServeError::InvalidRequest(_) => Code::InvalidArgument,
            ServeError::PayloadTooLarge { .. }
            | ServeError::LargerThanBodyMemory { .. }
            | ServeError::TooLargeForModel { .. }
            | ServeError::ResponseTooLarge { .. }
            | ServeError::Overloaded { .. }
            | ServeError::Busy { .. }
            | ServeError::StreamsBehind { .. }
            | ServeError::RateLimited { .. } => Code::ResourceExhausted,
            ServeError::BodyTimeout { .. } | ServeError::DeadlineExceeded { .. } => {
                Code::DeadlineExceeded
            }
            ServeError::UnsupportedEncoding(_) => Code::Unimplemented,
            ServeError::ModelCold { .. }
            | ServeError::ModelUnavailable { .. }
            | ServeError::NotReady { .. }
            | ServeError::WorkerLost(_)
            | ServeError::VersionRetired { .. }
            | ServeError::ShuttingDown
            | ServeError::BodyMemoryFull { .. } => Code::Unavailable,
            ServeError::Inference(_) | ServeError::Storage(_) => Code::Internal,
            ServeError::Registry(e) => {
                use crate::registry::RegistryError as R;
                match e {
                    R::NotFound(_) => Code::NotFound,
                    R::Refused(_) | R::Conflict(_) => Code::FailedPrecondition,
                    R::Unreachable(_) => Code::Unavailable,
                    R::Corrupt(_) | R::Config(_) | R::Local(_) => Code::Internal,
                }
            }
        }
    }

    /// The error as a gRPC status: [`ServeError::grpc_code`], the message REST sends (cut to
    /// [`MAX_GRPC_MESSAGE`] bytes), and `retry-after` (whole seconds) in the metadata where REST
    /// sends `Retry-After`.
    pub fn to_grpc_status(&self) -> tonic::Status {
        let message = grpc_message(&self.to_string()).into_owned();
        let mut status = tonic::Status::new(self.grpc_code(), message);
        if let Some(secs) = self.retry_after_secs() {
            if let Ok(value) = secs.to_string().parse() {
                status.metadata_mut().insert("retry-after", value);
            }
        }
        status
    }
}

/// Longest gRPC status message, in bytes. The message travels in the `grpc-message` header,
/// percent-encoded (up to 3 bytes a byte), and gRPC clients refuse a response whose metadata
/// is over 8 KiB (C-core's soft limit, some of the time; 16 KiB always) with RESOURCE_EXHAUSTED
/// in place of its own status. A message that quotes client text (a 100,000-character model
/// name, a shape of 3,000 dimensions) is cut to this, so that the real code arrives.
pub const MAX_GRPC_MESSAGE: usize = 2048;

// Every byte percent-encoded, with 1 KiB for the other headers: still under the soft limit.
const _: () = assert!(3 * MAX_GRPC_MESSAGE + 1024 <= 8192);

/// `message` as a gRPC status carries it: at most [`MAX_GRPC_MESSAGE`] bytes, cut on a
/// character boundary and marked `…[+N bytes]`.
pub fn grpc_message(message: &str) -> std::borrow::Cow<'_, str> {
    crate::untrusted::capped(message, MAX_GRPC_MESSAGE)
}

impl From<ServeError> for tonic::Status {
    fn from(error: ServeError) -> tonic::Status {
        error.to_grpc_status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_protocol() {
        assert_eq!(ServeError::ModelNotFound("x".into()).status_code(), 404);
        assert_eq!(ServeError::invalid("bad").status_code(), 400);
        // The server's own directory is no fault of the request.
        assert_eq!(ServeError::Storage("disk".into()).status_code(), 500);
        assert_eq!(
            ServeError::PayloadTooLarge { size: 2, limit: 1 }.status_code(),
            413
        );
        let overloaded = ServeError::Overloaded {
            model: "m".into(),
            queued: 3,
            limit: 3,
            retry_after: Duration::from_millis(1500),
        };
        assert_eq!(overloaded.status_code(), 429);
        let response = overloaded.error_response();
        assert_eq!(response.headers().get(header::RETRY_AFTER).unwrap(), "2");
    }

    /// Every error's gRPC code is the one its HTTP status calls for, and retry advice travels
    /// in both.
    #[test]
    fn grpc_codes_follow_the_http_statuses() {
        use tonic::Code;
        let wait = Duration::from_millis(1500);
        let cases = [
            (ServeError::ModelNotFound("x".into()), Code::NotFound),
            (ServeError::invalid("bad"), Code::InvalidArgument),
            (
                ServeError::PayloadTooLarge { size: 2, limit: 1 },
                Code::ResourceExhausted,
            ),
            (
                ServeError::Overloaded {
                    model: "m".into(),
                    queued: 1,
                    limit: 1,
                    retry_after: wait,
                },
                Code::ResourceExhausted,
            ),
            (
                ServeError::NotReady {
                    model: "m".into(),
                    reason: "loading".into(),
                    retry_after: wait,
                },
                Code::Unavailable,
            ),
            (ServeError::ShuttingDown, Code::Unavailable),
            (
                ServeError::DeadlineExceeded {
                    waited: Duration::from_millis(3),
                },
                Code::DeadlineExceeded,
            ),
            (ServeError::Inference("boom".into()), Code::Internal),
            (ServeError::Storage("disk".into()), Code::Internal),
        ];
        for (error, code) in cases {
            let status = error.to_grpc_status();
            assert_eq!(status.code(), code, "{error}");
            assert_eq!(status.message(), error.to_string());
            let http = error.error_response();
            let http_retry = http.headers().get(header::RETRY_AFTER);
            let grpc_retry = status.metadata().get("retry-after");
            assert_eq!(
                http_retry.map(|v| v.to_str().unwrap().to_string()),
                grpc_retry.map(|v| v.to_str().unwrap().to_string()),
                "{error}"
            );
        }
        let overloaded = ServeError::Overloaded {
            model: "m".into(),
            queued: 1,
            limit: 1,
            retry_after: wait,
        };
        assert_eq!(
            overloaded
                .to_grpc_status()
                .metadata()
                .get("retry-after")
                .unwrap(),
            "2"
        );
    }

    /// A message quoting client text at any length keeps its code and fits the limits gRPC
    /// clients put on metadata, cut where the quote runs long.
    #[test]
    fn grpc_messages_are_capped() {
        use tonic::Code;
        let long = ServeError::ModelNotFound("m".repeat(100_000));
        let status = long.to_grpc_status();
        assert_eq!(status.code(), Code::NotFound);
        assert!(status.message().len() <= MAX_GRPC_MESSAGE);
        assert!(status.message().starts_with("unknown model 'mmm"));
        assert!(
            status.message().ends_with(" bytes]"),
            "{}",
            status.message()
        );
        // Percent-encoded in the header, it stays under the 8 KiB soft limit even when every
        // byte is escaped.
        let escaped = ServeError::invalid("é%\n ".repeat(10_000)).to_grpc_status();
        assert_eq!(escaped.code(), Code::InvalidArgument);
        let mut headers = tonic::codegen::http::HeaderMap::new();
        escaped.add_header(&mut headers).unwrap();
        let header = headers["grpc-message"].len();
        assert!(header <= 3 * MAX_GRPC_MESSAGE, "{header}");
        // Messages under the limit are whole.
        let short = ServeError::invalid("x".repeat(MAX_GRPC_MESSAGE));
        assert_eq!(short.to_grpc_status().message(), short.to_string());
    }
}
