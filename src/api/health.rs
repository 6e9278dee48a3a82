//! Liveness and readiness, computed from the workers' real state (a model with no healthy
//! replica is not ready, and neither is the server while any model is in that state).
//!
//! The protocol signals the answer by status: 200 for true, 400 for false (as Triton does);
//! the JSON body says the same for people with curl.

use actix_web::{web, HttpResponse};
use serde_json::json;

use super::AppState;
use crate::error::ServeError;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/v2/health/live").route(web::get().to(live)))
        .service(web::resource("/v2/health/ready").route(web::get().to(ready)))
        .service(web::resource("/v2/models/{name}/ready").route(web::get().to(model_ready)))
        .service(
            web::resource("/v2/models/{name}/versions/{version}/ready")
                .route(web::get().to(model_version_ready)),
        );
}

async fn live() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "live": true }))
}

async fn ready(state: web::Data<AppState>) -> HttpResponse {
    answer(server_ready(&state), "ready")
}

/// The server's readiness, for REST and gRPC alike: the catalog's (healthy replicas, some model
/// that can serve), and not while draining, so that a client on a connection opened before the
/// listener paused is not told to send more.
pub fn server_ready(state: &AppState) -> bool {
    state.catalog.snapshot().ready() && !state.work.draining()
}

async fn model_ready(
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ServeError> {
    check_model(&state, &path.into_inner(), None)
}

async fn model_version_ready(
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ServeError> {
    let (name, version) = path.into_inner();
    check_model(&state, &name, Some(&version))
}

fn check_model(
    state: &AppState,
    name: &str,
    version: Option<&str>,
) -> Result<HttpResponse, ServeError> {
    can_serve(state, name, version).map(|ready| answer(ready, "ready"))
}

/// Whether a model version (its default without `version`) can serve: it has a healthy
/// replica (and, with `--probe-readiness`, its last probe passed), or it is not loaded and
/// the next request loads it. Unknown names are errors. REST's and gRPC's readiness (and gRPC
/// health) all answer from here.
pub fn can_serve(state: &AppState, name: &str, version: Option<&str>) -> Result<bool, ServeError> {
    match state.catalog.snapshot().resolve(name, version) {
        Ok(served) => Ok(served.health.ready() && !served.watch.blocks_readiness()),
        Err(ServeError::ModelUnavailable { .. }) => Ok(false),
        // Not loaded, but the next request loads it: it can serve.
        Err(ServeError::ModelCold { .. }) => Ok(true),
        Err(e) => Err(e),
    }
}

fn answer(value: bool, key: &str) -> HttpResponse {
    let body = json!({ key: value });
    if value {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::BadRequest().json(body)
    }
}
