//! Batch prediction jobs over HTTP (docs/jobs.md): `POST /v2/jobs` submits one (202 with its
//! id), `GET /v2/jobs` lists them, `GET /v2/jobs/{id}` follows one, `DELETE /v2/jobs/{id}`
//! cancels it. A job reads and writes files on the server, so every route takes the admin
//! token, as the admin API does; the jobs themselves are [`crate::jobs::Jobs`]'.

use actix_web::{web, HttpRequest, HttpResponse};

use super::status::authorize;
use super::AppState;
use crate::error::ServeError;
use crate::jobs::Submission;

pub fn routes(cfg: &mut web::ServiceConfig) {
    // Resources, not bare routes: a known path called with the wrong method gets 405 + Allow.
    cfg.service(
        web::resource("/v2/jobs")
            .route(web::post().to(submit))
            .route(web::get().to(list)),
    )
    .service(
        web::resource("/v2/jobs/{id}")
            .route(web::get().to(get))
            .route(web::delete().to(cancel)),
    );
}

/// Largest submission body: a small JSON object.
const MAX_SUBMISSION_BODY: usize = 64 * 1024;

async fn submit(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, ServeError> {
    authorize(&state, &req)?;
    let body = super::body::read(&req, body, &state.body_limits(MAX_SUBMISSION_BODY)).await?;
    let submission: Submission = serde_json::from_slice(&body.bytes)
        .map_err(|e| ServeError::invalid(format!("job submission: {e}")))?;
    let jobs = state.jobs.clone();
    // Checking the files and counting the input's rows reads the whole input: off the HTTP
    // threads.
    let job = web::block(move || jobs.submit(submission))
        .await
        .map_err(|_| ServeError::ShuttingDown)??;
    Ok(HttpResponse::Accepted().json(job))
}

async fn list(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ServeError> {
    authorize(&state, &req)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "jobs": state.jobs.list() })))
}

async fn get(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ServeError> {
    authorize(&state, &req)?;
    Ok(HttpResponse::Ok().json(state.jobs.get(&path)?))
}

async fn cancel(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ServeError> {
    authorize(&state, &req)?;
    Ok(HttpResponse::Ok().json(state.jobs.cancel(&path)?))
}
