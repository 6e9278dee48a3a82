//! What every inference answer leaves behind, for REST and gRPC alike: the served version's
//! health record (totals, degraded answers, the recent window the status page reads), the
//! request counters and histograms, and the access log line.
//!
//! Series are labelled by the served model, or by the manifest's model and version when the
//! catalog named the version but it could not serve (refused at load, not loaded): those names
//! come from the manifest, a bounded set, and a version that answers 503 must show under its
//! own name for its alerts to see it. An unknown name from a client must not mint a new time
//! series, so requests for no model the catalog knows count under `_unknown`; their access line
//! names the model the client asked for, escaped and capped. gRPC's series add
//! `protocol="grpc"`, with the HTTP status its code stands for. Refusals at the door's
//! admission limit get no access line: the door logs them as a count per second
//! (`door::limit`), since a line each would spend the CPU that is short.
//!
//! [`count`] and [`log`] are apart so that REST can write the line after its answer is on the
//! socket: a client need not wait for the server's log (about 6 µs of a 1-row request).

use std::time::Duration;

use crate::access::Pass;
use crate::actors::catalog::ServedModel;
use crate::error::ServeError;
use crate::telemetry::{RequestSeries, SeriesOf};
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
    /// The caller's key name (for a refusal too: `Access::caller_name`), `-` without a
    /// valid key.
    pub key: &'a str,
    /// The model name the client asked for, as it wrote it: what the access line of a refusal
    /// without a version names (escaped and capped), never a series label. May be empty where
    /// the request was answered (its `served` names it).
    pub asked: &'a str,
    /// The version that answered (the one resolved for the request, or the one it moved to:
    /// `api/rest.rs` `send`), when one was found.
    pub served: Option<&'a ServedModel>,
    pub elapsed: Duration,
    pub outcome: Result<Stats, &'a ServeError>,
}

/// Records an answer everywhere it is counted, and writes its access line.
pub fn record(answer: Answered<'_>) {
    count(&answer);
    log(&answer);
}

fn status(answer: &Answered<'_>) -> u16 {
    match answer.outcome {
        Ok(_) => 200,
        Err(e) => actix_web::ResponseError::status_code(e).as_u16(),
    }
}

/// The series labels of an answer: its known version's ([`known_version`]), else `_unknown`.
fn model_version<'a>(answer: &Answered<'a>) -> (&'a str, &'a str) {
    known_version(answer).unwrap_or(("_unknown", ""))
}

/// The version that answered, or the listed one a refusal names; `None` when neither.
fn known_version<'a>(answer: &Answered<'a>) -> Option<(&'a str, &'a str)> {
    match answer.served {
        Some(served) => Some((served.info.name.as_str(), served.info.version.as_str())),
        None => answer.outcome.err().and_then(listed_version),
    }
}

/// The model and version of a refusal that names a version the catalog lists (so the
/// manifest's, never a client's spelling): one refused at load, or not loaded. Other
/// refusals without a served version (unknown model or version, a missing key) stay
/// `_unknown`, as their names come from the client.
fn listed_version(error: &ServeError) -> Option<(&str, &str)> {
    match error {
        // Written `name:version` by the catalog and the supervisor; a model name has no `:`.
        ServeError::ModelUnavailable { model, .. } => model.split_once(':'),
        ServeError::ModelCold { model, version } => Some((model.as_str(), version.as_str())),
        _ => None,
    }
}

/// The model an access line names: the served or listed version's, else the name the client
/// asked for, escaped and capped ([`Untrusted`]): a log line may say what an unknown name was,
/// where a series label may not (`_unknown` when it asked for none).
struct Logged<'a> {
    model: &'a str,
    asked: Option<&'a str>,
}

impl std::fmt::Display for Logged<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.asked {
            Some(asked) if !asked.is_empty() => Untrusted(asked).fmt(f),
            _ => f.write_str(self.model),
        }
    }
}

fn logged_model<'a>(answer: &Answered<'a>) -> (Logged<'a>, &'a str) {
    let Some((model, version)) = known_version(answer) else {
        let asked = Some(answer.asked);
        let model = "_unknown";
        return (Logged { model, asked }, "");
    };
    (Logged { model, asked: None }, version)
}

/// The series of requests for no known model.
static UNKNOWN: std::sync::LazyLock<RequestSeries> = std::sync::LazyLock::new(Default::default);

/// Counts an answer: the served version's health record and the request series (the
/// version's own handles, [`RequestSeries`]; a status other than 200 by its labels).
pub fn count(answer: &Answered<'_>) {
    let status = status(answer);
    if let Some(served) = answer.served {
        served.health.record(status >= 500, answer.elapsed);
        if matches!(answer.outcome, Ok(Stats { degraded: true, .. })) {
            served.health.record_degraded();
        }
    }
    let (model, version) = model_version(answer);
    let which = SeriesOf {
        model,
        version,
        grpc: matches!(answer.protocol, Protocol::Grpc { .. }),
    };
    let series = match (answer.served, answer.outcome.err().and_then(listed_version)) {
        (Some(served), _) => &*served.series,
        // A listed version that cannot serve has no handles of its own: its refusals are
        // counted by their labels (they are not the hot path).
        (None, Some(_)) => {
            count_by_labels(&which, status, answer.elapsed);
            return;
        }
        (None, None) => &*UNKNOWN,
    };
    if status == 200 {
        series.ok(&which).increment(1);
    } else if status == 429 {
        series.busy(&which).increment(1);
    } else {
        metrics::counter!(
            "streamserve_requests_total",
            &which.labels(Some(&status.to_string()))
        )
        .increment(1);
    }
    series.duration(&which).record(answer.elapsed.as_secs_f64());
    if let Ok(stats) = answer.outcome {
        series.queue(&which).record(stats.queue_time.as_secs_f64());
    }
}

/// Counts a refusal of a listed version that is not serving, looking each series up by label.
fn count_by_labels(which: &SeriesOf<'_>, status: u16, elapsed: Duration) {
    metrics::counter!(
        "streamserve_requests_total",
        &which.labels(Some(&status.to_string()))
    )
    .increment(1);
    metrics::histogram!("streamserve_request_duration_seconds", &which.labels(None))
        .record(elapsed.as_secs_f64());
}

/// Whether an answer gets an access line: not a refusal at the door's limit (the door logs
/// those as a count per second).
pub fn has_line(outcome: Result<Stats, &ServeError>) -> bool {
    !matches!(outcome, Err(ServeError::Busy { .. }))
}

/// Writes an answer's access line (none for a refusal at the door's limit).
pub fn log(answer: &Answered<'_>) {
    if !has_line(answer.outcome) {
        return;
    }
    let status = status(answer);
    let (model, version) = logged_model(answer);
    let total_us = answer.elapsed.as_micros() as u64;
    let (request_id, key) = (answer.request_id, answer.key);
    // One line per answer; the field sets differ by protocol, so each has its own pair.
    match (answer.protocol, answer.outcome) {
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

/// The key an access line names: the pass's, or for a refusal (which has no pass) the name of
/// the stored key it presented (`refused`, from `Access::caller_name`), `-` for none.
pub fn key_name<'a>(
    admitted: &'a Result<(Pass, ServedModel), ServeError>,
    refused: &'a Option<String>,
) -> &'a str {
    match admitted {
        Ok((pass, _)) => pass.name(),
        Err(_) => refused.as_deref().unwrap_or("-"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused<'a>(asked: &'a str, error: &'a ServeError) -> Answered<'a> {
        Answered {
            protocol: Protocol::Rest,
            request_id: "r",
            key: "-",
            asked,
            served: None,
            elapsed: Duration::ZERO,
            outcome: Err(error),
        }
    }

    #[test]
    fn a_refusal_without_a_version_logs_the_name_asked_for_escaped_but_counts_unknown() {
        let error = ServeError::ModelNotFound("x".into());
        let forged = "evil\nINFO forged line";
        let answer = refused(forged, &error);
        assert_eq!(model_version(&answer), ("_unknown", ""), "the series label");
        let (logged, version) = logged_model(&answer);
        let logged = logged.to_string();
        assert_eq!(logged, "evil\\nINFO forged line");
        assert_eq!(version, "");
        let long = "m".repeat(10_000);
        let logged = logged_model(&refused(&long, &error)).0.to_string();
        assert!(logged.len() < 300, "capped: {} bytes", logged.len());
        // Nothing asked (a gRPC request without a name): `_unknown`.
        assert_eq!(logged_model(&refused("", &error)).0.to_string(), "_unknown");
        // A listed version's refusal names the manifest's version, not the client's spelling.
        let cold = ServeError::ModelCold {
            model: "mlp".into(),
            version: "2".into(),
        };
        let (logged, version) = logged_model(&refused("mlp\u{1b}", &cold));
        assert_eq!((logged.to_string().as_str(), version), ("mlp", "2"));
    }
}
