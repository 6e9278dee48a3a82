//! The admin API, under `/admin`: off unless the server has a token (`--admin-token` /
//! `STREAMSERVE_ADMIN_TOKEN`), and then only for requests that carry it as
//! `Authorization: Bearer <token>`.
//!
//! - `GET /admin/models`: every model version with its router's live state.
//! - `POST /admin/models/{name}/faults`: queue a fault (`panic`, `hang`, `slow`) for one or all
//!   replicas of a model, to prove supervision, retries and degraded mode in tests and drills.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use crate::actors::registry::VersionState;
use crate::actors::router::{InjectFault, Status};
use crate::actors::worker::Fault;
use crate::error::ServeError;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/admin/models", web::get().to(list))
        .route("/admin/models/{name}/faults", web::post().to(inject_fault));
}

fn authorize(state: &AppState, req: &HttpRequest) -> Result<(), ServeError> {
    let Some(token) = state.admin_token.as_deref() else {
        return Err(ServeError::AdminOff);
    };
    let given = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compare in time independent of where the first difference is.
    let same = given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(ServeError::Unauthorized)
    }
}

async fn list(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ServeError> {
    authorize(&state, &req)?;
    let catalog = state.registry.snapshot();
    let mut rows = Vec::new();
    for (name, model) in &catalog.models {
        for version in model.sorted_versions() {
            match &model.versions[&version] {
                VersionState::Serving(served) => {
                    let status = served.router.send(Status).await.ok();
                    rows.push(json!({
                        "name": name, "version": version, "state": "SERVING",
                        "device": served.info.device.to_string(), "replicas": served.info.replicas,
                        "fallback": served.info.fallback, "router": status,
                    }));
                }
                VersionState::Unavailable { reason, .. } => {
                    rows.push(json!({ "name": name, "version": version, "state": "UNAVAILABLE", "reason": reason }))
                }
            }
        }
    }
    Ok(HttpResponse::Ok().json(json!({ "models": rows })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultRequest {
    fault: Fault,
    #[serde(default)]
    replica: Option<usize>,
    #[serde(default)]
    version: Option<String>,
    #[serde(default = "one")]
    count: usize,
}

fn one() -> usize {
    1
}

async fn inject_fault(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ServeError> {
    authorize(&state, &req)?;
    let request: FaultRequest = serde_json::from_slice(&body)
        .map_err(|e| ServeError::invalid(format!("malformed fault request: {e}")))?;
    let served = state
        .registry
        .snapshot()
        .resolve(&path.into_inner(), request.version.as_deref())?;
    let affected = served
        .router
        .send(InjectFault {
            replica: request.replica,
            fault: request.fault,
            count: request.count,
        })
        .await
        .map_err(|_| ServeError::WorkerLost("router is gone".into()))?
        .map_err(ServeError::invalid)?;
    Ok(HttpResponse::Ok().json(json!({
        "model": served.info.name, "version": served.info.version,
        "fault": format!("{:?}", request.fault), "count": request.count, "replicas": affected,
    })))
}
