//! Triton's model repository extension over REST (`POST /v2/repository/index`,
//! `/v2/repository/models/{name}/load` and `/unload`), which `/v2` advertises as
//! `model_repository`: `tritonclient`'s `get_model_repository_index`, `load_model` and
//! `unload_model` work unchanged. gRPC's `RepositoryIndex`, `RepositoryModelLoad` and
//! `RepositoryModelUnload` parse their messages and call the same functions.
//!
//! Loading and unloading change what the server holds, so both take the admin token (as the
//! admin API's `/admin/models/{name}/load` and `/unload`, which they share code with); the
//! index is public, as `/v2/models` is. Triton's load can carry a model configuration or model
//! files to use instead of the repository's; here a version comes only from the manifest or
//! the model registry, so such a load is refused with 400 saying so, never half applied.

use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;

use super::AppState;
use crate::access::Headers;
use crate::actors::catalog::VersionState;
use crate::actors::served::ServedModel;
use crate::actors::supervisor::UnloadAll;
use crate::error::ServeError;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/v2/repository/index").route(web::post().to(index)))
        .service(web::resource("/v2/repository/models/{name}/load").route(web::post().to(load)))
        .service(
            web::resource("/v2/repository/models/{name}/unload").route(web::post().to(unload)),
        );
}

/// Largest body of a repository request: a few flags (Triton's clients send `{}` or one
/// parameter). A load that carries model files, which could be large, is refused anyway.
const MAX_REPOSITORY_BODY: usize = 64 * 1024;

/// `POST /v2/repository/index` body: `{"ready": true}` lists only the versions that can
/// serve now (Triton's meaning); no body, or `false`, lists them all.
#[derive(Deserialize, Default)]
struct IndexRequest {
    #[serde(default)]
    ready: bool,
}

/// One row of the repository index: a listed model version, its state, and why it is not
/// serving where it is not; `default`: the version an unversioned request gets.
#[derive(serde::Serialize)]
pub struct IndexRow {
    pub name: String,
    pub version: String,
    pub state: &'static str,
    pub reason: String,
    pub default: bool,
}

/// Every listed model version (or, `ready_only`, those that can serve now) with its state,
/// and the reason where it is not serving: `/v2/models`, this index and gRPC's.
pub fn index_rows(state: &AppState, ready_only: bool) -> Vec<IndexRow> {
    let catalog = state.catalog.snapshot();
    let mut rows = Vec::new();
    for (name, model) in &catalog.models {
        for version in model.sorted_versions() {
            let state = &model.versions[&version];
            if ready_only && state.label() != "READY" {
                continue;
            }
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
            rows.push(IndexRow {
                name: name.clone(),
                state: state.label(),
                reason: reason.to_string(),
                default: model.default_version() == Some(version.as_str()),
                version,
            });
        }
    }
    rows
}

/// The `parameters` of a load or unload (Triton's `RepositoryModelLoadRequest` and
/// `...UnloadRequest`), whichever protocol carried them.
#[derive(Debug, Default, PartialEq)]
pub struct Parameters {
    /// Names of the parameters given, in order.
    pub names: Vec<String>,
}

/// Loads `name`'s default version if it is not loaded, and waits until it serves (or fails
/// to). `parameters`: a model configuration (`config`) or files (`file:<path>`) are refused.
pub async fn load_model(
    state: &AppState,
    name: &str,
    parameters: &Parameters,
) -> Result<(), ServeError> {
    if let Some(given) = parameters.names.first() {
        return Err(ServeError::invalid(format!(
            "load parameter '{}' is not supported: streamserve loads the version the manifest or \
             the model registry names, as it is (to serve another configuration or model file, \
             publish it as a version: docs/registry.md); send no parameters",
            crate::untrusted::Untrusted(given)
        )));
    }
    state.served(name, None).await.map(|_| ())
}

/// Longest an unload waits for its version's router to drain and stop before it answers
/// anyway (the drain goes on): a queue of long requests, or a hung batch waiting for its
/// `hang_timeout_ms`, may take this long; the answer must not wait without bound.
const UNLOAD_DRAIN_WAIT: Duration = Duration::from_secs(60);

/// Unloads every loaded version of `name` (as Triton unloads a model, not one version of it)
/// and answers once they are drained: what was queued on them has been answered, their
/// routers have stopped and their replicas (threads, memory budget) are given back, as the
/// README promises a Triton client (whose next step may be to load another model in that
/// memory, or to read `streamserve_workers`). A next request loads its version again, as any
/// cold version's. `unload_dependents` is taken and has nothing to act on: a model here has no
/// dependents. Any other parameter is refused.
pub async fn unload_model(
    state: &AppState,
    name: &str,
    parameters: &Parameters,
) -> Result<(), ServeError> {
    if let Some(given) = parameters
        .names
        .iter()
        .find(|name| name.as_str() != "unload_dependents")
    {
        return Err(ServeError::invalid(format!(
            "unload parameter '{}' is not supported (only unload_dependents)",
            crate::untrusted::Untrusted(given)
        )));
    }
    // The versions as they serve now: their routers are the ones the unload stops.
    let serving: Vec<ServedModel> = {
        let catalog = state.catalog.snapshot();
        catalog
            .models
            .get(name)
            .map(|model| {
                model
                    .versions
                    .values()
                    .filter_map(|version| match version {
                        VersionState::Serving(served) => Some(served.clone()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let unloaded = state
        .supervisor
        .send(UnloadAll {
            name: name.to_string(),
        })
        .await
        .map_err(|_| ServeError::ShuttingDown)??;
    // Only the routers this unload took out of service (a deployment may have loaded another
    // between the snapshot and the unload).
    let draining = serving
        .iter()
        .filter(|served| unloaded.contains(&served.info.version));
    futures_util::future::join_all(draining.map(drained)).await;
    Ok(())
}

/// Waits until `served`'s router has stopped (its status no longer answers), at most
/// [`UNLOAD_DRAIN_WAIT`].
async fn drained(served: &ServedModel) {
    let stopped = async {
        while served.status().await.is_some() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    if tokio::time::timeout(UNLOAD_DRAIN_WAIT, stopped)
        .await
        .is_err()
    {
        tracing::warn!(
            model = %served.info.name,
            version = %served.info.version,
            wait_secs = UNLOAD_DRAIN_WAIT.as_secs(),
            "unloaded version still draining; answering the unload anyway"
        );
    }
}

/// Checks the admin token in `headers` (HTTP headers or gRPC metadata).
pub fn authorize(state: &AppState, headers: &impl Headers) -> Result<(), ServeError> {
    super::status::admin_token_matches(state, headers.first("authorization"))
}

async fn index(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, ServeError> {
    let body = super::body::read(&req, body, &state.body_limits(MAX_REPOSITORY_BODY)).await?;
    let request: IndexRequest = parse(&body.bytes)?;
    Ok(HttpResponse::Ok().json(index_rows(&state, request.ready)))
}

/// A load's or unload's JSON body: `{"parameters": {...}}`, or nothing.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ChangeRequest {
    #[serde(default)]
    parameters: serde_json::Map<String, serde_json::Value>,
}

async fn change_request(
    state: &AppState,
    req: &HttpRequest,
    body: web::Payload,
) -> Result<Parameters, ServeError> {
    authorize(state, req.headers())?;
    let body = super::body::read(req, body, &state.body_limits(MAX_REPOSITORY_BODY)).await?;
    let request: ChangeRequest = parse(&body.bytes)?;
    if let Some(dependents) = request.parameters.get("unload_dependents") {
        if !dependents.is_boolean() {
            return Err(ServeError::invalid(format!(
                "parameter 'unload_dependents' must be true or false, got {dependents}"
            )));
        }
    }
    Ok(Parameters {
        names: request
            .parameters
            .into_iter()
            .map(|(name, _)| name)
            .collect(),
    })
}

/// `POST /v2/repository/models/{name}/load`: 200 with no body once the version serves, as
/// Triton answers.
async fn load(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Payload,
) -> Result<HttpResponse, ServeError> {
    let parameters = change_request(&state, &req, body).await?;
    load_model(&state, &path.into_inner(), &parameters).await?;
    Ok(HttpResponse::Ok().finish())
}

/// `POST /v2/repository/models/{name}/unload`: 200 with no body once the version is drained.
async fn unload(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Payload,
) -> Result<HttpResponse, ServeError> {
    let parameters = change_request(&state, &req, body).await?;
    unload_model(&state, &path.into_inner(), &parameters).await?;
    Ok(HttpResponse::Ok().finish())
}

fn parse<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, ServeError> {
    super::body::json_or_default(body, "repository request")
}
