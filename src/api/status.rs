//! The live status page. `GET /` serves one self-contained HTML page (`status.html`, inline
//! CSS and script, no external assets, no build step: it works offline and behind an
//! air gap); it polls `GET /status` every second, the JSON built here from the same sources
//! as the admin API (the catalog snapshot, each router's status, the supervisor's rollouts,
//! the fleet agent) plus each version's health window ([`crate::actors::health`]), its
//! monitor summary ([`crate::monitor`]) and the machine ([`crate::machine`]).
//!
//! Access: a server with an admin token answers `/status` only to requests that carry it (the
//! admin API's own check); a server with API keys but no admin token refuses it (401: the page
//! would show what keyed callers may not see); a server with neither (development) shows it to
//! anyone. The JSON never holds a token, key or credential; URIs in it lose their user info.
//! The page itself is no secret: it holds no data until `/status` answers.
//!
//! The two pieces the admin API shares with the page live here, since both read the same data
//! behind the same check: [`authorize`] (the admin token) and [`version_row`] (a version as
//! `GET /admin/models` lists it).
//!
//! The page's Content-Security-Policy allows fetches to this origin only, and its one inline
//! script and one inline style by their sha256 hashes (computed here from the embedded page),
//! so no injected markup could run or load anything.

use std::sync::OnceLock;
use std::time::Duration;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use base64::Engine as _;
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::AppState;
use crate::actors::catalog::{ModelVersions, VersionState};
use crate::actors::health::{ModelHealth, WINDOW_MS};
use crate::actors::supervisor::Rollouts;
use crate::error::ServeError;

/// The page, embedded in the binary.
const PAGE: &str = include_str!("status.html");

/// How long `/status` waits for one router's status before showing the version without it.
const ROUTER_WAIT: Duration = Duration::from_secs(2);

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/").route(web::get().to(page)))
        .service(web::resource("/status").route(web::get().to(status)));
}

/// `GET /`: the page, never cached, never framed.
async fn page() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CONTENT_SECURITY_POLICY, csp()))
        .insert_header((header::X_FRAME_OPTIONS, "DENY"))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .body(PAGE)
}

/// The page's Content-Security-Policy: same-origin fetches, the page's own inline script and
/// style (by hash), nothing else.
pub fn csp() -> &'static str {
    static CSP: OnceLock<String> = OnceLock::new();
    CSP.get_or_init(|| {
        format!(
            "default-src 'none'; connect-src 'self'; script-src '{}'; style-src '{}'; \
             img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            inline_hash(PAGE, "script"),
            inline_hash(PAGE, "style"),
        )
    })
}

/// `sha256-<base64>` of the text inside the first `<tag>...</tag>` of `page`, as CSP hashes it.
fn inline_hash(page: &str, tag: &str) -> String {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let body = page
        .split_once(&open)
        .and_then(|(_, rest)| rest.split_once(&close))
        .map_or("", |(body, _)| body);
    let digest = Sha256::digest(body.as_bytes());
    format!(
        "sha256-{}",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

/// Who may read `/status` (see the module).
fn allowed(state: &AppState, req: &HttpRequest) -> Result<(), ServeError> {
    if state.admin_token.is_some() {
        return authorize(state, req);
    }
    if state.access.requires_keys() {
        return Err(ServeError::Unauthenticated(
            "the status page needs --admin-token (or STREAMSERVE_ADMIN_TOKEN) on a server with \
             API keys; then send Authorization: Bearer <admin token>"
                .into(),
        ));
    }
    Ok(())
}

/// The admin API's check (`/admin/*`, and `/status` on a server with a token): the request
/// carries the server's admin token as `Authorization: Bearer <token>`; no token, no admin API.
pub(super) fn authorize(state: &AppState, req: &HttpRequest) -> Result<(), ServeError> {
    admin_token_matches(
        state,
        req.headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok()),
    )
}

/// Whether `authorization` (an HTTP header's or gRPC metadata's value) is `Bearer <the admin
/// token>`. Both sides are hashed first and the digests compared in constant time, so the
/// time taken tells nothing of the token: neither where a guess first differs nor its length.
pub(super) fn admin_token_matches(
    state: &AppState,
    authorization: Option<&str>,
) -> Result<(), ServeError> {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    let Some(token) = state.admin_token.as_deref() else {
        return Err(ServeError::AdminOff);
    };
    // The scheme in any case, as for API keys (RFC 7235).
    let given = authorization.and_then(crate::access::bearer).unwrap_or("");
    let (given, token) = (
        Sha256::digest(given.as_bytes()),
        Sha256::digest(token.as_bytes()),
    );
    let same: bool = given.as_slice().ct_eq(token.as_slice()).into();
    if same {
        Ok(())
    } else {
        Err(ServeError::Unauthorized)
    }
}

/// `GET /status`: everything the page shows, as JSON (shape in docs/status-page.md).
async fn status(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ServeError> {
    allowed(&state, &req)?;
    let now_ms = crate::telemetry::uptime_ms();
    let catalog = state.catalog.snapshot();
    let mut rows = Vec::new();
    for (name, model) in &catalog.models {
        for version in model.sorted_versions() {
            let served = match &model.versions[&version] {
                VersionState::Serving(served) => Some(served.clone()),
                _ => None,
            };
            rows.push(async move {
                let Some(served) = served else {
                    return version_row(name, model, &version, Option::<()>::None);
                };
                let router = tokio::time::timeout(ROUTER_WAIT, served.status())
                    .await
                    .ok()
                    .flatten();
                let mut row = version_row(name, model, &version, router);
                row["traffic"] = traffic(&served.health, now_ms);
                row["monitor"] = json!(served.watch.summary());
                row
            });
        }
    }
    let models = futures_util::future::join_all(rows).await;
    let rollouts = state
        .supervisor
        .send(Rollouts)
        .await
        .map_err(|_| ServeError::ShuttingDown)?;
    let machine = web::block(crate::machine::snapshot)
        .await
        .map_err(|_| ServeError::ShuttingDown)?;
    let limit = state.admission.limit();
    let mut answer = json!({
        "server": {
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": now_ms as f64 / 1000.0,
            "window_s": WINDOW_MS as f64 / 1000.0,
            "admission_limit": (limit != usize::MAX).then_some(limit),
            "admission_refusing": state.admission.refusing(),
            "streams_behind": state.streams.pace.turning_away(),
            "work_in_progress": state.work.active(),
            "draining": state.work.draining(),
        },
        "machine": machine,
        "models": models,
        "rollouts": rollouts,
        "fleet": state.fleet.as_ref().map(|fleet| fleet_summary(&fleet.status())),
        "jobs": state.jobs.summary(),
    });
    redact_credentials(&mut answer);
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(answer))
}

/// One model version as the admin API lists it (`GET /admin/models`) and the status page
/// starts from it: name, version, state, default and canary share, and for a serving version
/// its device, replicas (running now, and the manifest's), fallback and its router's status
/// (`router`, null once it stopped).
pub(super) fn version_row(
    name: &str,
    model: &ModelVersions,
    version: &str,
    router: Option<impl Serialize>,
) -> Value {
    match &model.versions[version] {
        VersionState::Serving(served) => json!({
            "name": name, "version": version, "state": "SERVING",
            "default": model.default_version() == Some(version),
            "canary_percent": model.canary.as_ref().filter(|c| c.version == version).map(|c| c.percent),
            // The replicas running now (autoscaling moves them, as the router's own count), and
            // the manifest's `replicas`, what the version starts with (Triton's config count).
            "device": served.info.device.to_string(),
            "replicas": served.health.replicas.load(std::sync::atomic::Ordering::Relaxed),
            "configured_replicas": served.info.replicas,
            "fallback": served.info.fallback, "router": router,
        }),
        VersionState::Unavailable { reason, .. } => {
            json!({ "name": name, "version": version, "state": "UNAVAILABLE", "reason": reason })
        }
        // Unloaded because its last load failed (it did not fit its device's memory): the
        // reason, as `/v2/models` gives it, or the page would show a bare UNLOADED that the
        // next request may refuse again with no hint why.
        other @ VersionState::Cold {
            last_error: Some(reason),
            ..
        } => json!({ "name": name, "version": version, "state": other.label(), "reason": reason }),
        other => json!({ "name": name, "version": version, "state": other.label() }),
    }
}

/// A version's traffic: totals since it was loaded, and the recent window.
fn traffic(health: &ModelHealth, now_ms: u64) -> Value {
    use std::sync::atomic::Ordering::Relaxed;
    json!({
        "requests": health.requests.load(Relaxed),
        "errors": health.errors.load(Relaxed),
        "degraded": health.degraded.load(Relaxed),
        "recent": health.recent.read(now_ms),
    })
}

/// The fleet agent's account, without the registry's URI or its error text (either may name
/// a bucket or endpoint with credentials): instance, reachability, polls, and each model's
/// desired state and routing here.
fn fleet_summary(status: &Value) -> Value {
    let models = status["models"].as_object().map(|models| {
        models
            .iter()
            .map(|(name, m)| {
                let m = json!({ "desired": m["desired"], "routing": m["routing"], "fetching": m["fetching"] });
                (name.clone(), m)
            })
            .collect::<serde_json::Map<_, _>>()
    });
    json!({
        "instance": status["instance"],
        "reachable": status["reachable"],
        "last_poll_ms": status["last_poll_ms"],
        "polls": status["polls"],
        "live_instances": status["live_instances"],
        "models": models,
    })
}

/// Removes the user info (`user:password@`) of every URI in every string of `value`.
pub fn redact_credentials(value: &mut Value) {
    match value {
        Value::String(s) => {
            if let Some(clean) = without_userinfo(s) {
                *s = clean;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact_credentials),
        Value::Object(map) => map.values_mut().for_each(redact_credentials),
        _ => {}
    }
}

/// `text` with each `scheme://user:pass@host` made `scheme://***@host`; `None` if it had none.
fn without_userinfo(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut changed = false;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let authority_end = tail
            .find(|c: char| c == '/' || c == '?' || c == '#' || c.is_whitespace())
            .unwrap_or(tail.len());
        match tail[..authority_end].rfind('@') {
            Some(userinfo_end) => {
                out.push_str("***");
                out.push_str(&tail[userinfo_end..authority_end]);
                changed = true;
            }
            None => out.push_str(&tail[..authority_end]),
        }
        rest = &tail[authority_end..];
    }
    out.push_str(rest);
    changed.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_uris_are_removed_everywhere() {
        let mut value = json!({
            "a": "s3://AKIA:secret@bucket/models and https://u:p@host:9000/x?y=1",
            "b": ["file:///models/mlp", "no uri here", "user@example.com"],
            "c": { "d": "http://host/path@not-userinfo" },
        });
        redact_credentials(&mut value);
        assert_eq!(
            value["a"],
            "s3://***@bucket/models and https://***@host:9000/x?y=1"
        );
        assert_eq!(
            value["b"],
            json!(["file:///models/mlp", "no uri here", "user@example.com"])
        );
        assert_eq!(value["c"]["d"], "http://host/path@not-userinfo");
        assert!(!value.to_string().contains("secret"));
    }

    #[test]
    fn the_policy_hashes_the_pages_own_script_and_style() {
        let policy = csp();
        assert!(policy.contains("connect-src 'self'"), "{policy}");
        assert!(!policy.contains("unsafe"), "{policy}");
        assert!(PAGE.contains("<script>") && PAGE.contains("<style>"));
        // One inline script and one inline style: the hashes cover the whole page's code.
        assert_eq!(PAGE.matches("<script").count(), 1);
        assert_eq!(PAGE.matches("<style").count(), 1);
        assert!(
            !PAGE.contains(" style=\""),
            "inline style attributes need unsafe-hashes"
        );
        assert!(!PAGE.contains("http://") && !PAGE.contains("https://"));
        let hash = inline_hash("<p><script>alert(1)</script>", "script");
        // echo -n 'alert(1)' | openssl dgst -sha256 -binary | base64
        assert_eq!(hash, "sha256-bhHHL3z2vDgxUt0W3dWQOrprscmda2Y5pLsLg4GF+pI=");
    }

    #[test]
    fn the_fleet_summary_leaves_the_registry_out() {
        let status = json!({
            "registry": "s3://key:secret@bucket", "registry_error": "s3://key:secret@bucket: 403",
            "instance": "a", "reachable": false, "polls": 3, "live_instances": 2,
            "models": { "mlp": { "desired": { "default": "1" }, "routing": null, "fetching": [] } },
        });
        let summary = fleet_summary(&status);
        assert!(!summary.to_string().contains("secret"), "{summary}");
        assert_eq!(summary["models"]["mlp"]["desired"]["default"], "1");
        assert_eq!(summary["live_instances"], 2);
    }
}
