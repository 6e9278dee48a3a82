//! The admin API, under `/admin`: off unless the server has a token (`--admin-token` /
//! `STREAMSERVE_ADMIN_TOKEN`), and then only for requests that carry it as
//! `Authorization: Bearer <token>`.
//!
//! - `GET /admin/models`: every model version with its router's live state.
//! - `POST /admin/models/{name}/faults`: queue a fault (`panic`, `hang`, `slow`) for one or all
//!   replicas of a model, to prove supervision, retries and degraded mode in tests and drills.
//!
//! Every count, size and duration an admin request carries is bounded (the `MAX_*` constants)
//! and checked here, before anything is loaded or queued: an admin token is no licence to make
//! the server allocate, sleep or wait in proportion to a number it was sent.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use super::status::{authorize, version_row};
use super::AppState;
use crate::actors::catalog::VersionState;
use crate::actors::faults::Fault;
use crate::actors::supervisor::{Deploy, Rollback, Rollouts, Strategy, Supervisor, Unload};
use crate::error::ServeError;

/// Most batches one fault request hits on each replica.
pub const MAX_FAULT_COUNT: u64 = 1000;
/// Longest hang or slow-down one fault injects, in milliseconds (10 minutes).
pub const MAX_FAULT_MS: u64 = 600_000;
/// Longest version string a request may name.
pub const MAX_VERSION_LEN: usize = 64;
/// Most canary steps.
pub const MAX_STEPS: usize = 20;
/// Longest canary or rolling step, in seconds (1 hour).
pub const MAX_STEP_SECS: u64 = 3600;

fn check_version(version: Option<&str>) -> Result<(), ServeError> {
    match version {
        Some(v) if v.chars().count() > MAX_VERSION_LEN => Err(ServeError::invalid(format!(
            "version must be at most {MAX_VERSION_LEN} characters, got {}",
            v.chars().count()
        ))),
        _ => Ok(()),
    }
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    // Resources, not bare routes: a known path called with the wrong method gets 405 + Allow.
    cfg.service(web::resource("/admin/models").route(web::get().to(list)))
        .service(web::resource("/admin/models/{name}/faults").route(web::post().to(inject_fault)))
        .service(web::resource("/admin/models/{name}/load").route(web::post().to(load)))
        .service(web::resource("/admin/models/{name}/unload").route(web::post().to(unload)))
        .service(web::resource("/admin/models/{name}/deploy").route(web::post().to(deploy)))
        .service(web::resource("/admin/models/{name}/rollback").route(web::post().to(rollback)))
        .service(web::resource("/admin/rollouts").route(web::get().to(rollouts)))
        .service(web::resource("/admin/registry").route(web::get().to(registry)));
}

/// Largest admin request body: every admin request is a small JSON object.
const MAX_ADMIN_BODY: usize = 64 * 1024;

/// Checks the token, then reads the request's body, with the same size, pace and memory
/// bounds as every body: a caller without the token cannot make the server buffer anything.
async fn authorized_body(
    state: &AppState,
    req: &HttpRequest,
    body: web::Payload,
) -> Result<super::body::Body, ServeError> {
    authorize(state, req)?;
    super::body::read(req, body, &state.body_limits(MAX_ADMIN_BODY)).await
}

async fn list(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ServeError> {
    authorize(&state, &req)?;
    let catalog = state.catalog.snapshot();
    let mut rows = Vec::new();
    for (name, model) in &catalog.models {
        for version in model.sorted_versions() {
            let router = match &model.versions[&version] {
                VersionState::Serving(served) => served.status().await,
                _ => None,
            };
            rows.push(version_row(name, model, &version, router));
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
    count: u64,
}

fn one() -> u64 {
    1
}

impl FaultRequest {
    fn check(&self) -> Result<(), ServeError> {
        if !(1..=MAX_FAULT_COUNT).contains(&self.count) {
            return Err(ServeError::invalid(format!(
                "count must be in 1..={MAX_FAULT_COUNT} (batches the fault hits on each replica), got {}",
                self.count
            )));
        }
        if let Fault::Hang { ms } | Fault::Slow { ms } = self.fault {
            if !(1..=MAX_FAULT_MS).contains(&ms) {
                return Err(ServeError::invalid(format!(
                    "fault ms must be in 1..={MAX_FAULT_MS} (10 minutes), got {ms}"
                )));
            }
        }
        check_version(self.version.as_deref())
    }
}

async fn inject_fault(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Payload,
) -> Result<HttpResponse, ServeError> {
    let body = authorized_body(&state, &req, body).await?;
    let request: FaultRequest = serde_json::from_slice(&body.bytes)
        .map_err(|e| ServeError::invalid(format!("malformed fault request: {e}")))?;
    request.check()?;
    let served = state
        .served(&path.into_inner(), request.version.as_deref())
        .await?;
    let affected = served
        .inject_fault(request.replica, request.fault, request.count)
        .await?;
    Ok(HttpResponse::Ok().json(json!({
        "model": served.info.name, "version": served.info.version,
        "fault": format!("{:?}", request.fault), "count": request.count, "replicas": affected,
    })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct VersionRequest {
    #[serde(default)]
    version: Option<String>,
}

/// The body of a load or unload: an optional, checked version.
async fn version_request(
    state: &AppState,
    req: &HttpRequest,
    body: web::Payload,
) -> Result<VersionRequest, ServeError> {
    let body = authorized_body(state, req, body).await?;
    let request: VersionRequest = parse(&body.bytes)?;
    check_version(request.version.as_deref())?;
    Ok(request)
}

fn parse<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, ServeError> {
    super::body::json_or_default(body, "admin request")
}

/// Asks the supervisor; it is gone only while the server shuts down.
async fn ask<M>(state: &AppState, message: M) -> Result<M::Result, ServeError>
where
    M: actix::Message + Send + 'static,
    M::Result: Send,
    Supervisor: actix::Handler<M>,
{
    state
        .supervisor
        .send(message)
        .await
        .map_err(|_| ServeError::ShuttingDown)
}

/// `POST /admin/models/{name}/load` (`{"version": "2"}` optional): load now, answer when ready.
async fn load(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Payload,
) -> Result<HttpResponse, ServeError> {
    let request = version_request(&state, &req, body).await?;
    let started = std::time::Instant::now();
    let served = state
        .served(&path.into_inner(), request.version.as_deref())
        .await?;
    Ok(HttpResponse::Ok().json(json!({
        "model": served.info.name, "version": served.info.version, "state": "READY",
        "waited_ms": started.elapsed().as_millis() as u64,
    })))
}

/// `POST /admin/models/{name}/unload`: drain and free a version; it loads again on demand.
async fn unload(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Payload,
) -> Result<HttpResponse, ServeError> {
    let request = version_request(&state, &req, body).await?;
    let answer = ask(
        &state,
        Unload {
            name: path.into_inner(),
            version: request.version,
        },
    )
    .await??;
    Ok(HttpResponse::Ok().json(answer))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployRequest {
    version: String,
    strategy: Strategy,
    #[serde(default = "default_steps")]
    steps: Vec<u32>,
    #[serde(default = "default_step_secs")]
    step_secs: u64,
    #[serde(default = "yes")]
    smoke_test: bool,
}

impl Default for DeployRequest {
    fn default() -> Self {
        DeployRequest {
            version: String::new(),
            strategy: Strategy::BlueGreen,
            steps: default_steps(),
            step_secs: default_step_secs(),
            smoke_test: true,
        }
    }
}

fn default_steps() -> Vec<u32> {
    vec![5, 25, 50, 100]
}
fn default_step_secs() -> u64 {
    30
}
fn yes() -> bool {
    true
}

impl DeployRequest {
    fn check(&self) -> Result<(), ServeError> {
        if self.version.is_empty() {
            return Err(ServeError::invalid(
                "deploy needs {\"version\": ..., \"strategy\": \"blue_green\" | \"canary\" | \"rolling\"}",
            ));
        }
        check_version(Some(&self.version))?;
        if !(1..=MAX_STEP_SECS).contains(&self.step_secs) {
            return Err(ServeError::invalid(format!(
                "step_secs must be in 1..={MAX_STEP_SECS}, got {}: each step needs time to be judged",
                self.step_secs
            )));
        }
        // Rolling updates make their steps from the replica count; blue/green has none.
        if self.strategy == Strategy::Canary {
            check_steps(&self.steps).map_err(ServeError::invalid)?;
        }
        Ok(())
    }
}

/// Canary steps: traffic shares in percent, strictly increasing, each in 1..=100, the last 100
/// (the canary takes all traffic before it is promoted), at most `MAX_STEPS` of them.
pub fn check_steps(steps: &[u32]) -> Result<(), String> {
    const RULE: &str =
        "canary steps must be strictly increasing percentages in 1..=100 ending at 100, e.g. [5, 25, 50, 100]";
    if steps.is_empty() {
        return Err(format!("{RULE}; got none"));
    }
    if steps.len() > MAX_STEPS {
        return Err(format!(
            "{RULE}, at most {MAX_STEPS} of them; got {}",
            steps.len()
        ));
    }
    if let Some(p) = steps.iter().find(|&&p| p == 0 || p > 100) {
        return Err(format!("{RULE}; got {p} in {steps:?}"));
    }
    if let Some(w) = steps.windows(2).find(|w| w[1] <= w[0]) {
        return Err(format!("{RULE}; got {} after {} in {steps:?}", w[1], w[0]));
    }
    if steps.last() != Some(&100) {
        return Err(format!("{RULE}; got {steps:?}, which does not end at 100"));
    }
    Ok(())
}

/// `POST /admin/models/{name}/deploy`: `{"version": "2", "strategy": "blue_green"}` loads the
/// version beside the current one, smoke-tests it, switches atomically and drains the old;
/// `"strategy": "canary"` (with `steps` in percent and `step_secs`) shifts traffic stepwise and
/// rolls back by itself when the canary does worse than the stable version.
async fn deploy(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Payload,
) -> Result<HttpResponse, ServeError> {
    let body = authorized_body(&state, &req, body).await?;
    let request: DeployRequest = parse(&body.bytes)?;
    request.check()?;
    let name = path.into_inner();
    // A version only the registry has is taken from it first (into the cache, then listed).
    let listed = state
        .catalog
        .snapshot()
        .models
        .get(&name)
        .is_some_and(|m| m.versions.contains_key(&request.version));
    if let (false, Some(fleet)) = (listed, &state.fleet) {
        fleet.fetch(&name, &request.version).await?;
    }
    let answer = ask(
        &state,
        Deploy {
            name,
            version: request.version,
            strategy: request.strategy,
            steps: request.steps,
            step_secs: request.step_secs,
            smoke_test: request.smoke_test,
        },
    )
    .await??;
    Ok(HttpResponse::Ok().json(answer))
}

/// `POST /admin/models/{name}/rollback`: abort a running canary, or restore the previous default
/// (once: the rollback consumes it, so a second one is 409 rather than undoing the first).
async fn rollback(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ServeError> {
    authorize(&state, &req)?;
    let answer = ask(
        &state,
        Rollback {
            name: path.into_inner(),
        },
    )
    .await??;
    Ok(HttpResponse::Ok().json(answer))
}

/// `GET /admin/rollouts`: running canaries, the last rollback reasons, previous defaults.
async fn rollouts(
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, ServeError> {
    authorize(&state, &req)?;
    Ok(HttpResponse::Ok().json(ask(&state, Rollouts).await?))
}

/// `GET /admin/registry`: the fleet agent's account (the registry, whether it answers, each
/// model's desired state and this instance's routing of it, its last report).
async fn registry(
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, ServeError> {
    authorize(&state, &req)?;
    match &state.fleet {
        Some(fleet) => Ok(HttpResponse::Ok().json(fleet.status())),
        None => Ok(HttpResponse::NotFound().json(json!({
            "error": "this server follows no model registry (start it with --registry URI)"
        }))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(body: &str) -> Result<(), String> {
        let request: FaultRequest = serde_json::from_str(body).map_err(|e| e.to_string())?;
        request.check().map_err(|e| e.to_string())
    }

    fn deploy(body: &str) -> Result<(), String> {
        let request: DeployRequest = parse(body.as_bytes()).map_err(|e| e.to_string())?;
        request.check().map_err(|e| e.to_string())
    }

    #[test]
    fn fault_counts_and_durations_are_bounded() {
        assert!(fault(r#"{"fault": {"kind": "panic"}}"#).is_ok());
        assert!(fault(r#"{"fault": {"kind": "panic"}, "count": 1000}"#).is_ok());
        let huge = fault(r#"{"fault": {"kind": "panic"}, "count": 1000000000}"#).unwrap_err();
        assert!(huge.contains("1..=1000"), "{huge}");
        assert!(fault(r#"{"fault": {"kind": "panic"}, "count": 0}"#).is_err());
        assert!(fault(r#"{"fault": {"kind": "panic"}, "count": -1}"#).is_err());
        assert!(fault(r#"{"fault": {"kind": "hang", "ms": 600000}}"#).is_ok());
        let long = fault(r#"{"fault": {"kind": "hang", "ms": 600001}}"#).unwrap_err();
        assert!(long.contains("1..=600000"), "{long}");
        assert!(fault(r#"{"fault": {"kind": "slow", "ms": 0}}"#).is_err());
        let version = format!(
            r#"{{"fault": {{"kind": "panic"}}, "version": "{}"}}"#,
            "9".repeat(65)
        );
        assert!(fault(&version).unwrap_err().contains("at most 64"));
    }

    #[test]
    fn canary_steps_must_climb_to_100() {
        assert!(check_steps(&[5, 25, 50, 100]).is_ok());
        assert!(check_steps(&[100]).is_ok());
        for bad in [
            &[][..],
            &[0, 100],
            &[50, 101],
            &[50, 50, 100],
            &[50, 25, 100],
            &[25, 50],
        ] {
            let message = check_steps(bad).unwrap_err();
            assert!(
                message.contains("strictly increasing"),
                "{bad:?}: {message}"
            );
        }
        assert!(check_steps(&(1..=21).chain([100]).collect::<Vec<_>>())
            .unwrap_err()
            .contains("at most 20"));
    }

    #[test]
    fn deployments_are_checked_before_they_start() {
        assert!(deploy(r#"{"version": "2", "strategy": "blue_green"}"#).is_ok());
        assert!(deploy(
            r#"{"version": "2", "strategy": "canary", "steps": [30, 100], "step_secs": 1}"#
        )
        .is_ok());
        // Rolling updates take their steps from the replicas; the given ones are not used.
        assert!(deploy(r#"{"version": "2", "strategy": "rolling", "step_secs": 1}"#).is_ok());
        let zero =
            deploy(r#"{"version": "2", "strategy": "canary", "steps": [50, 100], "step_secs": 0}"#);
        assert!(zero.unwrap_err().contains("step_secs must be in 1..=3600"));
        assert!(deploy(r#"{"version": "2", "strategy": "rolling", "step_secs": 3601}"#).is_err());
        assert!(
            deploy(r#"{"version": "2", "strategy": "canary", "steps": [60, 40, 100]}"#).is_err()
        );
        assert!(deploy(r#"{"strategy": "canary"}"#).is_err());
        assert!(deploy("[1, 2]")
            .unwrap_err()
            .contains("malformed admin request"));
    }
}
