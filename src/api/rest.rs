//! Open Inference Protocol (KServe v2) REST endpoints: server and model metadata, the model
//! repository index, and inference.
//!
//! An inference request goes: body (size-checked) -> [`kserve::decode`] -> [`ModelInfo::validate`]
//! -> the version's `Router` (queued, batched, run by a worker) -> [`kserve::encode`].

use std::time::{Duration, Instant};

use actix_web::dev::Decompress;
use actix_web::http::header::{self, ContentEncoding, HeaderValue};
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use serde_json::json;
use tokio::sync::oneshot;

use super::kserve::{self, HEADER_CONTENT_LENGTH};
use super::AppState;
use crate::actors::registry::{ServedModel, VersionState};
use crate::actors::router::Infer;
use crate::actors::worker::Reply;
use crate::error::ServeError;
use crate::model::PLATFORM;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v2", web::get().to(server_metadata))
        .route("/v2/models", web::get().to(list_models))
        .route("/v2/repository/index", web::post().to(repository_index))
        .route("/v2/models/{name}", web::get().to(model_metadata))
        .route(
            "/v2/models/{name}/versions/{version}",
            web::get().to(model_version_metadata),
        )
        .route("/v2/models/{name}/config", web::get().to(model_config))
        .route(
            "/v2/models/{name}/versions/{version}/config",
            web::get().to(model_version_config),
        )
        .route("/v2/models/{name}/infer", web::post().to(infer))
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            web::post().to(infer_version),
        );
}

async fn server_metadata() -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "name": "streamserve",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data", "model_repository"],
    }))
}

/// Every listed model version with its state, and the reason where it is not serving.
fn index(state: &AppState) -> Vec<serde_json::Value> {
    let catalog = state.registry.snapshot();
    let mut rows = Vec::new();
    for (name, model) in &catalog.models {
        for version in model.sorted_versions() {
            let state = &model.versions[&version];
            let reason = match state {
                VersionState::Serving(served) if !served.health.ready() => "no healthy replica",
                VersionState::Unavailable { reason, .. } => reason.as_str(),
                VersionState::Cold {
                    last_error: Some(error),
                    ..
                } => error.as_str(),
                VersionState::Cold { .. } => "not loaded; the next request loads it",
                _ => "",
            };
            rows.push(json!({
                "name": name,
                "version": version,
                "state": state.label(),
                "reason": reason,
                "default": model.default_version() == Some(version.as_str()),
            }));
        }
    }
    rows
}

async fn list_models(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(json!({ "models": index(&state) }))
}

async fn repository_index(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(index(&state))
}

async fn model_metadata(
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ServeError> {
    metadata(&state, &path.into_inner(), None).await
}

async fn model_version_metadata(
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ServeError> {
    let (name, version) = path.into_inner();
    metadata(&state, &name, Some(&version)).await
}

async fn metadata(
    state: &AppState,
    name: &str,
    version: Option<&str>,
) -> Result<HttpResponse, ServeError> {
    let served = state.served(name, version).await?;
    let catalog = state.registry.snapshot();
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
            "replicas": info.replicas,
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
    path: web::Path<String>,
) -> Result<HttpResponse, ServeError> {
    config(&state, &path.into_inner(), None).await
}

async fn model_version_config(
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ServeError> {
    let (name, version) = path.into_inner();
    config(&state, &name, Some(&version)).await
}

/// The serving configuration in the shape of Triton's model configuration, which tools that
/// speak Triton's HTTP API read.
async fn config(
    state: &AppState,
    name: &str,
    version: Option<&str>,
) -> Result<HttpResponse, ServeError> {
    let served = state.served(name, version).await?;
    let info = &served.info;
    // Triton's convention: with batching on, dims exclude the batch axis (wherever the
    // manifest's batch_axes puts it; a shared input such as a scalar keeps all its dims).
    let dims = |shape: &[i64], axis: &crate::manifest::BatchAxis| -> Vec<i64> {
        let skip = match axis {
            crate::manifest::BatchAxis::Axis(k) if info.batched() => Some(*k),
            _ => None,
        };
        let kept = shape.iter().enumerate().filter(|(i, _)| Some(*i) != skip);
        kept.map(|(_, &d)| d).collect()
    };
    let tensor = |(s, axis): (&crate::runtime::TensorSpec, &crate::manifest::BatchAxis)| json!({ "name": s.name, "data_type": format!("TYPE_{}", s.datatype), "dims": dims(&s.shape, axis) });
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
        "instance_group": [{ "count": info.replicas, "kind": kind, "gpus": gpus }],
    })))
}

async fn infer(
    state: web::Data<AppState>,
    path: web::Path<String>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, ServeError> {
    run_inference(&state, &path.into_inner(), None, &req, body).await
}

async fn infer_version(
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, ServeError> {
    let (name, version) = path.into_inner();
    run_inference(&state, &name, Some(&version), &req, body).await
}

async fn run_inference(
    state: &AppState,
    name: &str,
    version: Option<&str>,
    req: &HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, ServeError> {
    let received = Instant::now();
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let resolved = state.served(name, version).await;
    // Label metrics by the served model only: an unknown name from a client must not mint
    // a new time series.
    let (model, model_version) = match &resolved {
        Ok(served) => (served.info.name.clone(), served.info.version.clone()),
        Err(_) => ("_unknown".to_string(), String::new()),
    };
    let outcome = match &resolved {
        Ok(served) => infer_on(state, served, req, body, received).await,
        Err(e) => Err(e.clone()),
    };
    let elapsed = received.elapsed();
    let status = match &outcome {
        Ok(_) => 200,
        Err(e) => actix_web::ResponseError::status_code(e).as_u16(),
    };
    if let Ok(served) = &resolved {
        served.health.record(status >= 500, elapsed);
    }
    let labels = [("model", model.clone()), ("version", model_version.clone())];
    metrics::counter!("streamserve_requests_total", "model" => model.clone(), "version" => model_version.clone(), "status" => status.to_string())
        .increment(1);
    metrics::histogram!("streamserve_request_duration_seconds", &labels)
        .record(elapsed.as_secs_f64());
    match outcome {
        Ok((mut response, stats)) => {
            metrics::histogram!("streamserve_queue_duration_seconds", &labels)
                .record(stats.queue_us as f64 / 1e6);
            tracing::info!(
                target: "streamserve::access",
                request_id = %request_id, model = %model, version = %model_version, status,
                batch_size = stats.batch_size, queue_us = stats.queue_us, compute_us = stats.compute_us,
                total_us = elapsed.as_micros() as u64, "infer"
            );
            if let Ok(v) = HeaderValue::from_str(&request_id) {
                response
                    .headers_mut()
                    .insert(header::HeaderName::from_static("x-request-id"), v);
            }
            Ok(response)
        }
        Err(e) => {
            tracing::info!(
                target: "streamserve::access",
                request_id = %request_id, model = %model, version = %model_version, status,
                error = %e, total_us = elapsed.as_micros() as u64, "infer"
            );
            Err(e)
        }
    }
}

struct Stats {
    batch_size: usize,
    queue_us: u64,
    compute_us: u64,
}

async fn infer_on(
    state: &AppState,
    served: &ServedModel,
    req: &HttpRequest,
    body: web::Payload,
    received: Instant,
) -> Result<(HttpResponse, Stats), ServeError> {
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
    let body = read_body(req, body, state.max_body_bytes).await?;
    // Admission before decoding: past max_inflight the server is saturated upstream of the
    // model queues (HTTP, JSON), where slo_ms and max_queue cannot see it. The body is read
    // first all the same, so that the connection stays reusable: a refusal that leaves the
    // body unread closes it, and reconnecting costs more than reading.
    let _permit = state.inflight.clone().try_acquire_owned().map_err(|_| {
        metrics::counter!("streamserve_shed_total", "model" => served.info.name.clone(), "version" => served.info.version.clone())
            .increment(1);
        ServeError::Overloaded {
            model: served.info.name.clone(),
            queued: state.max_inflight,
            limit: state.max_inflight,
            retry_after: Duration::from_secs(1),
        }
    })?;
    let mut decoded = kserve::decode(&body, json_length)?;
    drop(body);
    let info = served.info.clone();
    let request = info.validate(std::mem::take(&mut decoded.inputs), decoded.outputs.take())?;
    // A deadline from the `x-timeout-ms` header, or Triton's `timeout` parameter (µs).
    let timeout = match req.headers().get("x-timeout-ms") {
        Some(v) => Some(Duration::from_millis(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| {
                    ServeError::invalid("x-timeout-ms must be a whole number of milliseconds")
                })?,
        )),
        None => decoded.timeout_us.map(Duration::from_micros),
    };
    let (reply, answer) = oneshot::channel();
    served.router.do_send(Infer {
        request,
        reply: Reply::new(reply),
        received,
        deadline: timeout.map(|t| received + t),
    });
    let response = answer
        .await
        .map_err(|_| ServeError::WorkerLost("the router dropped the request".into()))??;
    let encoded = kserve::encode(&info, &decoded, &response);
    let mut http = HttpResponse::Ok();
    if let Some(n) = encoded.json_length {
        http.insert_header((HEADER_CONTENT_LENGTH, n.to_string()));
        http.content_type("application/octet-stream");
    } else {
        http.content_type("application/json");
    }
    let stats = Stats {
        batch_size: response.batch_size,
        queue_us: response.queue_time.as_micros() as u64,
        compute_us: response.compute_time.as_micros() as u64,
    };
    Ok((http.body(encoded.body), stats))
}

/// Reads the body, decompressing it per `Content-Encoding` (gzip or deflate, as Triton's
/// clients send with `request_compression_algorithm`), and refuses it with 413 as soon as it
/// is known to exceed the limit, before it is buffered. The limit applies to the decompressed
/// size too, so a small compressed body cannot expand without bound.
pub(crate) async fn read_body(
    req: &HttpRequest,
    body: web::Payload,
    limit: usize,
) -> Result<web::BytesMut, ServeError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<usize>().ok());
    if let Some(size) = declared.filter(|&n| n > limit) {
        return Err(ServeError::PayloadTooLarge { size, limit });
    }
    let capacity = declared.unwrap_or(8 * 1024).min(limit);
    let encoding = req
        .headers()
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("").trim().to_ascii_lowercase());
    match encoding.as_deref() {
        None | Some("identity") | Some("") => collect(body, limit, capacity).await,
        Some("gzip") | Some("x-gzip") => {
            collect(
                Decompress::new(body.into_inner(), ContentEncoding::Gzip),
                limit,
                capacity,
            )
            .await
        }
        Some("deflate") => {
            collect(
                Decompress::new(body.into_inner(), ContentEncoding::Deflate),
                limit,
                capacity,
            )
            .await
        }
        Some(other) => Err(ServeError::UnsupportedEncoding(other.to_string())),
    }
}

async fn collect<S>(
    mut stream: S,
    limit: usize,
    capacity: usize,
) -> Result<web::BytesMut, ServeError>
where
    S: futures_util::Stream<Item = Result<web::Bytes, actix_web::error::PayloadError>> + Unpin,
{
    let mut buf = web::BytesMut::with_capacity(capacity);
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| ServeError::invalid(format!("cannot read request body: {e}")))?;
        if buf.len() + chunk.len() > limit {
            return Err(ServeError::PayloadTooLarge {
                size: buf.len() + chunk.len(),
                limit,
            });
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}
