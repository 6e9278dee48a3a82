//! Open Inference Protocol (KServe v2) REST endpoints: server and model metadata, the model
//! list, and inference (the repository extension is in `repository.rs`).
//!
//! An inference request goes: body (size-checked) -> [`kserve::decode`] -> [`ModelInfo::validate`]
//! -> the version's `Router` (queued, batched, run by a worker) -> [`kserve::encode`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::http::header::{self, HeaderValue};
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use super::accounting::{self, Answered, Protocol, Stats};
use super::body;
use super::kserve::{self, HEADER_CONTENT_LENGTH};
use super::repository::index_rows;
use super::AppState;
use crate::access::Pass;
use crate::actors::catalog::ServedModel;
use crate::actors::served::{InferOptions, Sent};
use crate::error::ServeError;
use crate::model::{InferRequest, InferResponse, ModelInfo, PLATFORM};
use crate::untrusted;

pub fn routes(cfg: &mut web::ServiceConfig) {
    // Resources, not bare routes: a known path called with the wrong method gets 405 + Allow.
    cfg.service(web::resource("/v2").route(web::get().to(server_metadata)))
        .service(web::resource("/v2/models").route(web::get().to(list_models)))
        .service(web::resource("/v2/models/{name}").route(web::get().to(model_metadata)))
        .service(
            web::resource("/v2/models/{name}/versions/{version}")
                .route(web::get().to(model_version_metadata)),
        )
        .service(web::resource("/v2/models/{name}/config").route(web::get().to(model_config)))
        .service(
            web::resource("/v2/models/{name}/versions/{version}/config")
                .route(web::get().to(model_version_config)),
        );
}

/// The inference routes, mounted before every other: the router tries resources in order and
/// matches each pattern with a path variable by a regular expression, which costs a few
/// microseconds apiece (measured: an eighth of the CPU of a server answering 30k requests/s
/// when these came after the metadata and health routes).
pub fn infer_routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/v2/models/{name}/infer").route(web::post().to(infer)))
        .service(
            web::resource("/v2/models/{name}/versions/{version}/infer")
                .route(web::post().to(infer_version)),
        );
}

async fn server_metadata() -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "name": "streamserve",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": kserve::SERVER_EXTENSIONS,
    }))
}

async fn list_models(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(json!({ "models": index_rows(&state, false) }))
}

async fn model_metadata(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ServeError> {
    metadata(&state, &req, &path.into_inner(), None).await
}

async fn model_version_metadata(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ServeError> {
    let (name, version) = path.into_inner();
    metadata(&state, &req, &name, Some(&version)).await
}

async fn metadata(
    state: &AppState,
    req: &HttpRequest,
    name: &str,
    version: Option<&str>,
) -> Result<HttpResponse, ServeError> {
    let peer = req.peer_addr().map(|a| a.ip());
    let served = state.described(req.headers(), peer, name, version).await?;
    let catalog = state.catalog.snapshot();
    let info = &served.info;
    let versions = catalog
        .models
        .get(name)
        .map(|m| m.sorted_versions())
        .unwrap_or_default();
    Ok(HttpResponse::Ok().json(json!({
        "name": info.name,
        "versions": versions,
        "platform": PLATFORM,
        "inputs": info.inputs,
        "outputs": info.outputs,
        "parameters": {
            "version": info.version,
            "device": info.device.to_string(),
            // The replicas running now (autoscaling moves them), not the manifest's count.
            "replicas": served.health.replicas.load(std::sync::atomic::Ordering::Relaxed),
            "max_batch_size": info.batching.max_batch_size,
            "sha256": info.sha256,
            "description": info.description,
            "source": info.source,
            "fallback": info.fallback,
            "resources": info.resources,
            "allow_non_finite": info.allow_non_finite,
            // What the manifest declares beyond `inputs`: every accepted shape (`inputs` shows
            // the first) and allowed values, per input that has any.
            "input_rules": info.inputs.iter().zip(&info.input_rules)
                .filter(|(_, rule)| !rule.is_empty())
                .map(|(spec, rule)| (spec.name.clone(), json!(rule)))
                .collect::<serde_json::Map<_, _>>(),
        },
    })))
}

async fn model_config(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ServeError> {
    config(&state, &req, &path.into_inner(), None).await
}

async fn model_version_config(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ServeError> {
    let (name, version) = path.into_inner();
    config(&state, &req, &name, Some(&version)).await
}

/// The serving configuration in the shape of Triton's model configuration, which tools that
/// speak Triton's HTTP API read.
async fn config(
    state: &AppState,
    req: &HttpRequest,
    name: &str,
    version: Option<&str>,
) -> Result<HttpResponse, ServeError> {
    let peer = req.peer_addr().map(|a| a.ip());
    let served = state.described(req.headers(), peer, name, version).await?;
    let info = &served.info;
    // Triton's convention: with batching on, dims exclude the batch axis.
    let tensor = |(s, axis): (&crate::runtime::TensorSpec, &crate::manifest::BatchAxis)| json!({ "name": s.name, "data_type": format!("TYPE_{}", s.datatype), "dims": kserve::config_dims(info, &s.shape, axis) });
    let (kind, gpus) = match info.device {
        crate::manifest::Device::Cpu => ("KIND_CPU", vec![]),
        crate::manifest::Device::Cuda(n) => ("KIND_GPU", vec![n]),
    };
    Ok(HttpResponse::Ok().json(json!({
        "name": info.name,
        "platform": PLATFORM,
        "backend": "onnxruntime",
        "version": info.version,
        "max_batch_size": info.batching.max_batch_size,
        "input": info.inputs.iter().zip(&info.input_axes).map(tensor).collect::<Vec<_>>(),
        "output": info.outputs.iter().zip(&info.output_axes).map(tensor).collect::<Vec<_>>(),
        "dynamic_batching": if info.batched() {
            json!({ "max_queue_delay_microseconds": info.batching.max_queue_delay.as_micros() as u64,
                    "max_queue_size": info.max_queue })
        } else { json!(null) },
        // The configured count (the manifest's `replicas`, what the version starts with), as
        // Triton's config gives it; the replicas running now, which autoscaling moves, are in
        // the model metadata's `parameters.replicas` and the status page.
        "instance_group": [{ "count": info.replicas, "kind": kind, "gpus": gpus }],
    })))
}

async fn infer(
    state: web::Data<AppState>,
    path: web::Path<String>,
    req: HttpRequest,
    body: web::Payload,
) -> HttpResponse {
    let (request_id, answer) = answer(&state, &path.into_inner(), None, &req, body).await;
    with_request_id(answer, &request_id)
}

async fn infer_version(
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
    req: HttpRequest,
    body: web::Payload,
) -> HttpResponse {
    let (name, version) = path.into_inner();
    let (request_id, answer) = answer(&state, &name, Some(&version), &req, body).await;
    with_request_id(answer, &request_id)
}

/// The answer, an error's too, with the request's id in `x-request-id`: a client that got a
/// 4xx or 5xx is the one that needs the id to find the request's line in the log (a generated
/// id is known only from here).
pub(super) fn with_request_id(
    answer: Result<HttpResponse, ServeError>,
    request_id: &str,
) -> HttpResponse {
    let mut response = answer.unwrap_or_else(|e| actix_web::ResponseError::error_response(&e));
    if let Ok(v) = HeaderValue::from_str(request_id) {
        response
            .headers_mut()
            .insert(header::HeaderName::from_static("x-request-id"), v);
    }
    response
}

/// Runs an inference request and logs it; returns its id (given or generated) and the answer
/// (which [`with_request_id`] makes the response; `predictions.rs` marks a success first).
pub(super) async fn answer(
    state: &AppState,
    name: &str,
    version: Option<&str>,
    req: &HttpRequest,
    body: web::Payload,
) -> (String, Result<HttpResponse, ServeError>) {
    // From when its bytes arrived, not when this thread got to them.
    let received = super::door::arrival::arrived(req);
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .and_then(untrusted::request_id)
        .unwrap_or_else(untrusted::new_request_id);
    let peer = req.peer_addr().map(|a| a.ip());
    let admitted = state.admitted(req.headers(), peer, name, version).await;
    // The caller's key name for the access log; the pass (and its in-flight permit) lives until
    // the answer is logged. A refusal has no pass: the key it presented is named all the same
    // (`-` for none or one that is not valid).
    let refused_key = admitted
        .as_ref()
        .err()
        .map(|_| state.access.caller_name(req.headers()));
    let key = accounting::key_name(&admitted, &refused_key);
    // The version that answered, when not the one resolved here: loaded again after an idle
    // unload, or the default now, for a request to the model whose version was retired.
    let mut moved = None;
    let outcome = match &admitted {
        Ok((pass, served)) => {
            let asked = Asked { served, version };
            infer_on(state, asked, req, body, received, pass, &mut moved).await
        }
        Err(refused) => {
            if matches!(refused, ServeError::RateLimited { .. }) {
                // A client over its rate keeps its connection: read the body it sent (within
                // the limits) before answering, as for any refusal after admission.
                let limits = state.body_limits(state.max_body_bytes);
                let _ = body::read(req, body, &limits).await;
            }
            Err(refused.clone())
        }
    };
    let elapsed = received.elapsed();
    accounting::count(&Answered {
        protocol: Protocol::Rest,
        request_id: &request_id,
        key,
        asked: name,
        served: moved
            .as_ref()
            .or(admitted.as_ref().ok().map(|(_, served)| served)),
        elapsed,
        outcome: outcome.as_ref().map(|(_, stats)| *stats),
    });
    // The access line once the answer is on its way: a task spawned here runs on this thread
    // after the connection's dispatcher has written the response, so the client does not wait
    // for the log. It holds the pass, as the line is the answer's end. A refusal at the door
    // has no line, and no task: it comes in floods when the CPU is short.
    if accounting::has_line(outcome.as_ref().map(|(_, stats)| *stats)) {
        let logged: Result<Stats, ServeError> = match &outcome {
            Ok((_, stats)) => Ok(*stats),
            Err(e) => Err(e.clone()),
        };
        let logged_id = request_id.clone();
        // The name the client asked for, for a refusal's line only (`served` names the rest).
        let asked = match &admitted {
            Ok(_) => String::new(),
            Err(_) => name.to_string(),
        };
        actix_web::rt::spawn(async move {
            accounting::log(&Answered {
                protocol: Protocol::Rest,
                request_id: &logged_id,
                key: accounting::key_name(&admitted, &refused_key),
                asked: &asked,
                served: moved
                    .as_ref()
                    .or(admitted.as_ref().ok().map(|(_, served)| served)),
                elapsed,
                outcome: logged.as_ref().copied(),
            });
        });
    }
    (request_id, outcome.map(|(response, _)| response))
}

/// Bodies up to this size are decoded on the HTTP thread; larger ones on the blocking pool.
const INLINE_DECODE_BYTES: usize = 256 * 1024;

fn decode_and_validate(
    body: &[u8],
    json_length: Option<usize>,
    info: &ModelInfo,
) -> Result<(kserve::DecodedRequest, InferRequest), ServeError> {
    let mut decoded = kserve::decode(body, json_length)?;
    let request = info.validate(std::mem::take(&mut decoded.inputs), decoded.outputs.take())?;
    Ok((decoded, request))
}

async fn infer_on(
    state: &AppState,
    asked: Asked<'_>,
    req: &HttpRequest,
    body: web::Payload,
    received: Instant,
    pass: &Pass,
    moved: &mut Option<ServedModel>,
) -> Result<(HttpResponse, Stats), ServeError> {
    let served = asked.served;
    state
        .access
        .check_version(pass, &served.info.name, &served.info.version)?;
    let json_length = match req.headers().get(HEADER_CONTENT_LENGTH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    ServeError::invalid(format!("{HEADER_CONTENT_LENGTH} must be a byte count"))
                })?,
        ),
    };
    // A body larger than the model can take is refused as soon as that is known (from its
    // Content-Length, before a byte is buffered), not after it is parsed.
    let model_limit = body::model_body_limit(&served.info).filter(|&n| n < state.max_body_bytes);
    let limits = state.body_limits(model_limit.unwrap_or(state.max_body_bytes));
    let body = body::read(req, body, &limits)
        .await
        .map_err(|e| match (e, model_limit) {
            (ServeError::PayloadTooLarge { size, limit }, Some(_)) => {
                ServeError::TooLargeForModel {
                    size,
                    limit,
                    model: served.info.name.clone(),
                    rows: served.info.batching.max_batch_size,
                }
            }
            (e, _) => e,
        })?;
    let small = body.bytes.len() <= INLINE_DECODE_BYTES;
    // Admission before decoding. The body is read first all the same, so that the connection
    // stays reusable: a refusal that leaves the body unread closes it, and reconnecting costs
    // more than reading.
    let permit = state.admission_permit(served)?;
    let info = served.info.clone();
    let (decoded, request) = if small {
        let decoded = decode_and_validate(&body.bytes, json_length, &info)?;
        drop(body);
        decoded
    } else {
        // A large JSON body takes tens to hundreds of milliseconds to parse: off the HTTP
        // threads, so that requests on the other connections of this thread go on meanwhile.
        // The body (and its memory reservation) ends with the decoding.
        let info = info.clone();
        web::block(move || decode_and_validate(&body.bytes, json_length, &info))
            .await
            .map_err(|_| ServeError::ShuttingDown)??
    };
    // A deadline from the `x-timeout-ms` header, or Triton's `timeout` parameter (µs).
    let timeout = match req.headers().get("x-timeout-ms") {
        Some(v) => Some(timeout_ms(v)?),
        None => decoded.timeout_us.map(Duration::from_micros),
    };
    state.access.check_rows(pass, &info.name, request.rows)?;
    let options = InferOptions::received_at(received)
        .with_timeout(timeout)
        .with_priority(pass.priority())
        .with_fallback_first(permit.to_fallback());
    let response = send(state, asked, pass, request, options, moved).await?;
    // The version that answered names itself in the answer.
    let info = moved.as_ref().map_or(&info, |by| &by.info);
    let encoded = kserve::encode(info, &decoded, &response);
    let mut http = HttpResponse::Ok();
    if let Some(n) = encoded.json_length {
        http.insert_header((HEADER_CONTENT_LENGTH, n.to_string()));
        http.content_type("application/octet-stream");
    } else {
        http.content_type("application/json");
    }
    // Only inline-decoded bodies report to the door's limit: a large body's decoding is its
    // own size's cost, not a sign of overload.
    if small {
        permit.answered(received, &response);
    }
    let stats = Stats::from(&response);
    Ok((http.body(encoded.body), stats))
}

/// The deadline an `x-timeout-ms` header asks for. A refusal says what the header may hold,
/// and tells a number too large apart from one that is no whole number at all.
fn timeout_ms(value: &HeaderValue) -> Result<Duration, ServeError> {
    let refused = |why: String| {
        ServeError::invalid(format!(
            "x-timeout-ms must be a whole number of milliseconds from 0 to {}: {why}",
            u64::MAX
        ))
    };
    let Ok(text) = value.to_str().map(str::trim) else {
        return Err(refused("the value is not visible ASCII".into()));
    };
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(refused(format!(
            "'{}' is not one",
            untrusted::capped(text, 60)
        )));
    }
    text.parse()
        .map(Duration::from_millis)
        .map_err(|_| refused(format!("{} is too large", untrusted::capped(text, 60))))
}

/// The version a request was resolved to, and the version its path named (`None`: the model's
/// default, whichever it is).
#[derive(Clone, Copy)]
pub(super) struct Asked<'a> {
    pub served: &'a ServedModel,
    pub version: Option<&'a str>,
}

/// Runs a validated REST or gRPC request on the version it was resolved to, and sets `moved`
/// to the handle of the version that answered when that is another ([`Sent::Answered`]). A
/// request that reaches its version after a rollout, the fleet or an admin took it out of
/// service ran nowhere: one that asked for the model, not a version, goes once to the model's
/// default version now (the version it was resolved to is no longer the model), when the key
/// may call that version and the request is valid for it (validated again: the same inputs
/// and outputs by name). Otherwise, or when that version is retired too, it is answered
/// [`ServeError::VersionRetired`]: nothing ran, a retry is safe.
pub(super) async fn send(
    state: &AppState,
    asked: Asked<'_>,
    pass: &Pass,
    request: InferRequest,
    options: InferOptions,
    moved: &mut Option<ServedModel>,
) -> Result<InferResponse, ServeError> {
    let (request, stopped) = match asked.served.send(Arc::new(request), options).await {
        Sent::Answered { answer, by } => {
            *moved = by;
            return answer;
        }
        Sent::Retired { request, stopped } => (request, stopped),
    };
    let retired = stopped.retired();
    if asked.version.is_some() {
        return Err(retired);
    }
    let from = &asked.served.info;
    let Ok(default) = state.served(&from.name, None).await else {
        return Err(retired);
    };
    state
        .access
        .check_version(pass, &default.info.name, &default.info.version)
        .map_err(|_| retired.clone())?;
    // Validated again for the default, as it came: its inputs by name, the outputs it asked
    // for by name. A version that takes other inputs or gives other outputs cannot take it.
    // The request is the router's no more (it gave it back), so it is not copied.
    let Ok(request) = Arc::try_unwrap(request) else {
        return Err(retired);
    };
    let outputs = request
        .outputs
        .iter()
        .filter_map(|&i| from.outputs.get(i).map(|spec| spec.name.clone()))
        .collect();
    let request = match default.info.validate(request.inputs, Some(outputs)) {
        Ok(request) => Arc::new(request),
        Err(why) => {
            tracing::info!(model = %from.name, retired = %from.version, default = %default.info.version, why = %why, "a request to a retired version cannot go to the default");
            return Err(retired);
        }
    };
    tracing::debug!(model = %from.name, retired = %from.version, default = %default.info.version, "request to a retired version sent to the default");
    match default.send(request, options).await {
        Sent::Answered { answer, by } => {
            *moved = Some(by.unwrap_or(default));
            answer
        }
        Sent::Retired { stopped, .. } => {
            *moved = Some(default);
            Err(stopped.retired())
        }
    }
}
