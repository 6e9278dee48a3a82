//! `GET /metrics`: Prometheus text exposition of everything recorded with the `metrics` crate,
//! with the machine's figures (process, devices' memory, GPUs) read for each scrape, and the
//! model monitor's series of every serving version (`crate::monitor`), and whether each
//! version the catalog lists can serve (`streamserve_model_version_up`). Every listed
//! version's error series exist at 0 from the first scrape that lists it, and so do the access
//! refusals of every configured key. Each serving version's replica gauges are set from its
//! health at each scrape (see [`publish_replicas`]).

use actix_web::{web, HttpResponse};

use super::AppState;
use crate::actors::catalog::{Catalog, VersionState};
use crate::machine::{self, Machine};

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/metrics").route(web::get().to(render)));
}

async fn render(state: web::Data<AppState>, machine: Option<web::Data<Machine>>) -> HttpResponse {
    machine::refresh(machine.as_ref().map(|m| m.get_ref())).await;
    state.jobs.record_metrics();
    let catalog = state.catalog.snapshot();
    // A version that never loaded (refused, or cold until asked for) answers 503 under its
    // own name without a router to create its error series. Created before this render, they
    // are at 0 in the first scrape that could show them, as good as at load for `rate()`.
    for (model, version, _) in versions_up(&catalog) {
        crate::telemetry::register_request_error_series(model, version);
    }
    publish_replicas(&catalog);
    state.access.register_refusal_series();
    let mut text = state.prometheus.render();
    machine::render_extra(&mut text);
    crate::monitor::render(&catalog.watches(), &mut text);
    crate::monitor::render_version_up(versions_up(&catalog), &mut text);
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(text)
}

/// Sets `streamserve_workers` (healthy replicas) and `streamserve_replicas` of every serving
/// version from its router's own counts. The gauges are keyed by model and version only, and a
/// version unloaded and loaded again has two routers under the same labels for a while: the
/// old one, still draining, zeroes both when it stops, after the new one published its counts,
/// which left a serving version reading 0 of 0 until its next replica change (possibly never).
/// The catalog says which router is the current one; its counts win at every scrape.
fn publish_replicas(catalog: &Catalog) {
    use std::sync::atomic::Ordering::Relaxed;
    for (name, model) in &catalog.models {
        for (version, state) in &model.versions {
            let VersionState::Serving(served) = state else {
                continue;
            };
            let labels = [("model", name.clone()), ("version", version.clone())];
            let health = &served.health;
            metrics::gauge!("streamserve_workers", &labels)
                .set(health.healthy_replicas.load(Relaxed) as f64);
            metrics::gauge!("streamserve_replicas", &labels)
                .set(health.replicas.load(Relaxed) as f64);
        }
    }
}

/// Every version the catalog lists, and whether it can serve: a version refused at load, or
/// whose last load failed (one that did not fit in memory), cannot until something changes;
/// serving, loading and unloaded-but-loadable versions can. (A serving version without a
/// healthy replica is `streamserve_workers`' business.)
fn versions_up(catalog: &Catalog) -> impl Iterator<Item = (&str, &str, bool)> {
    catalog.models.iter().flat_map(|(name, model)| {
        model.versions.iter().map(move |(version, state)| {
            let up = !matches!(
                state,
                VersionState::Unavailable { .. }
                    | VersionState::Cold {
                        last_error: Some(_),
                        ..
                    }
            );
            (name.as_str(), version.as_str(), up)
        })
    })
}
