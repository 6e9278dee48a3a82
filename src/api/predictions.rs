//! Published predictions by key (docs/jobs.md, "Serving the results"): the answers a batch
//! job computed ahead of time, served without running the model. `GET
//! /v2/models/{name}/predictions` says what is published (job, time, age, keys, a newer job
//! that failed); `GET .../predictions/{key}` answers one key from the table, 404 when it has
//! none; `POST .../predictions/{key}` with a KServe v2 inference body answers from the table
//! when it can and falls through to online inference when it cannot, the `x-prediction-source`
//! header saying which (`table` or `online`). Lookups pass the same access rules as inference
//! (API keys, per-key rate limits); the tables are [`crate::jobs::Jobs`]'.

use actix_web::http::header::{self, HeaderValue};
use actix_web::{web, HttpRequest, HttpResponse};

use super::AppState;
use crate::error::ServeError;
use crate::jobs::Lookup;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/v2/models/{name}/predictions").route(web::get().to(published)))
        .service(
            web::resource("/v2/models/{name}/predictions/{key}")
                .route(web::get().to(lookup))
                .route(web::post().to(lookup_or_infer)),
        );
}

const SOURCE: &str = "x-prediction-source";

fn no_table(model: &str) -> ServeError {
    ServeError::PredictionNotFound(format!(
        "model '{model}' has no published predictions (a job submitted with \"publish\": true publishes them when it succeeds)"
    ))
}

fn count(model: &str, result: &'static str) {
    ::metrics::counter!("streamserve_predictions_lookups_total", "model" => model.to_string(), "result" => result)
        .increment(1);
}

/// The table's answer, with `Age` (seconds since it was computed, as a cache would say it).
fn found(answer: serde_json::Value, age_secs: u64) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::AGE, HeaderValue::from(age_secs)))
        .insert_header((SOURCE, "table"))
        .json(answer)
}

/// A published answer is the output of one model version: a key scoped to other versions of
/// the model (`"mlp:1"`) may not read it, as it may not call that version.
fn may_read(
    state: &AppState,
    pass: &crate::access::Pass,
    model: &str,
    answer: &serde_json::Value,
) -> Result<(), ServeError> {
    let version = answer["model_version"].as_str().unwrap_or_default();
    state.access.check_version(pass, model, version)
}

async fn published(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ServeError> {
    let model = path.into_inner();
    let _pass = state
        .access
        .admit(req.headers(), req.peer_addr().map(|a| a.ip()), &model)?;
    let info = state
        .jobs
        .predictions_info(&model)
        .ok_or_else(|| no_table(&model))?;
    Ok(HttpResponse::Ok().json(info))
}

async fn lookup(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ServeError> {
    let (model, key) = path.into_inner();
    let pass = state
        .access
        .admit(req.headers(), req.peer_addr().map(|a| a.ip()), &model)?;
    match state.jobs.prediction(&model, &key) {
        Lookup::Found { answer, age_secs } => {
            may_read(&state, &pass, &model, &answer)?;
            count(&model, "hit");
            Ok(found(answer, age_secs))
        }
        Lookup::Missing(why) => {
            count(&model, "miss");
            Err(ServeError::PredictionNotFound(why))
        }
        Lookup::NoTable => Err(no_table(&model)),
    }
}

async fn lookup_or_infer(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    body: web::Payload,
) -> Result<HttpResponse, ServeError> {
    let (model, key) = path.into_inner();
    if let Lookup::Found { answer, age_secs } = state.jobs.prediction(&model, &key) {
        let pass = state
            .access
            .admit(req.headers(), req.peer_addr().map(|a| a.ip()), &model)?;
        may_read(&state, &pass, &model, &answer)?;
        // The inputs sent for a miss are not needed, but read: a body left unread closes the
        // connection (each hit would cost a new one, and a request pipelined behind it would
        // go unanswered).
        super::body::read(&req, body, &state.body_limits(state.max_body_bytes)).await?;
        count(&model, "hit");
        return Ok(found(answer, age_secs));
    }
    // Admitted there, as any inference request, and answered as one (`x-request-id` too).
    let (request_id, mut answer) = super::rest::answer(&state, &model, None, &req, body).await;
    if let Ok(response) = &mut answer {
        count(&model, "online");
        response.headers_mut().insert(
            header::HeaderName::from_static(SOURCE),
            HeaderValue::from_static("online"),
        );
    }
    Ok(super::rest::with_request_id(answer, &request_id))
}
