//! What every inference answer leaves behind, for REST and gRPC alike: the served version's
//! health record (totals, degraded answers, the recent window the status page reads), the
//! request counters and histograms, and the access log line.
//!
//! Series are labelled by the served model only: an unknown name from a client must not mint a
//! new time series, so requests for no model count under `_unknown`. gRPC's series add
//! `protocol="grpc"`, with the HTTP status its code stands for. Refusals at the door's
//! admission limit get no access line: the door logs them as a count per second
//! (`door::limit`), since a line each would spend the CPU that is short.

use std::time::Duration;

use crate::actors::catalog::ServedModel;
use crate::error::ServeError;
use crate::untrusted::Untrusted;

/// Which surface answered.
#[derive(Clone, Copy)]
pub enum Protocol {
    Rest,
    Grpc { rpc: &'static str },
}

/// What the model call reported, for an answered request.
#[derive(Clone, Copy)]
pub struct Stats {
    pub batch_size: usize,
    pub queue_time: Duration,
    pub compute_time: Duration,
    /// The fallback model computed the answer (degraded mode).
    pub degraded: bool,
}

impl From<&crate::model::InferResponse> for Stats {
    fn from(response: &crate::model::InferResponse) -> Stats {
        Stats {
            batch_size: response.batch_size,
            queue_time: response.queue_time,
            compute_time: response.compute_time,
            degraded: response.degraded,
        }
    }
}

/// One inference request, answered or refused.
pub struct Answered<'a> {
    pub protocol: Protocol,
    pub request_id: &'a str,
    /// The caller's key name, `-` without keys.
    pub key: &'a str,
    /// The version that was asked for, when it was found.
    pub served: Option<&'a ServedModel>,
    pub elapsed: Duration,
    pub outcome: Result<Stats, &'a ServeError>,
}

/// Records an answer everywhere it is counted.
pub fn record(answer: Answered<'_>) {
    let status = match answer.outcome {
        Ok(_) => 200,
        Err(e) => actix_web::ResponseError::status_code(e).as_u16(),
    };
    let (model, version) = match answer.served {
        Some(served) => {
            served.health.record(status >= 500, answer.elapsed);
            if matches!(answer.outcome, Ok(Stats { degraded: true, .. })) {
                served.health.record_degraded();
            }
            (served.info.name.as_str(), served.info.version.as_str())
        }
        None => ("_unknown", ""),
    };
    // gRPC's series add `protocol` after the labels REST's have, in this order.
    let protocol = matches!(answer.protocol, Protocol::Grpc { .. }).then_some(("protocol", "grpc"));
    let labels: Vec<(&'static str, String)> = [("model", model), ("version", version)]
        .into_iter()
        .chain(protocol)
        .map(|(k, v)| (k, v.to_string()))
        .collect();
    let mut counted = labels.clone();
    counted.insert(2, ("status", status.to_string()));
    metrics::counter!("streamserve_requests_total", &counted).increment(1);
    metrics::histogram!("streamserve_request_duration_seconds", &labels)
        .record(answer.elapsed.as_secs_f64());
    if let Ok(stats) = answer.outcome {
        metrics::histogram!("streamserve_queue_duration_seconds", &labels)
            .record(stats.queue_time.as_secs_f64());
    }
    let total_us = answer.elapsed.as_micros() as u64;
    let (request_id, key) = (answer.request_id, answer.key);
    // One line per answer; the field sets differ by protocol, so each has its own pair.
    match (answer.protocol, answer.outcome) {
        (_, Err(ServeError::Busy { .. })) => {}
        (Protocol::Rest, Ok(stats)) => tracing::info!(
            target: "streamserve::access",
            request_id = %request_id, key = %key, model = %model, version = %version, status,
            batch_size = stats.batch_size, queue_us = stats.queue_time.as_micros() as u64,
            compute_us = stats.compute_time.as_micros() as u64, total_us, "infer"
        ),
        (Protocol::Rest, Err(e)) => tracing::info!(
            target: "streamserve::access",
            request_id = %request_id, key = %key, model = %model, version = %version, status,
            error = %Untrusted(&e.to_string()), total_us, "infer"
        ),
        (Protocol::Grpc { rpc }, Ok(stats)) => tracing::info!(
            target: "streamserve::access",
            protocol = "grpc", rpc, request_id = %request_id, key = %key, model = %model,
            version = %version, status, code = "OK",
            batch_size = stats.batch_size, queue_us = stats.queue_time.as_micros() as u64,
            compute_us = stats.compute_time.as_micros() as u64, total_us, "infer"
        ),
        (Protocol::Grpc { rpc }, Err(e)) => tracing::info!(
            target: "streamserve::access",
            protocol = "grpc", rpc, request_id = %request_id, key = %key, model = %model,
            version = %version, status, code = ?e.grpc_code(),
            error = %Untrusted(&e.to_string()), total_us, "infer"
        ),
    }
}
