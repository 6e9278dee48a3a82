//! HTTP surfaces. Each file translates one protocol into actor messages and back; errors are
//! mapped to HTTP in one place, [`crate::error::ServeError`]'s `ResponseError` impl.

pub mod admin;
pub mod health;
pub mod kserve;
pub mod metrics;
pub mod rest;
pub mod ws;

use std::sync::Arc;

use actix_web::web;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::actors::registry::Registry;

/// What every handler can reach.
pub struct AppState {
    pub registry: Arc<Registry>,
    pub max_body_bytes: usize,
    pub prometheus: PrometheusHandle,
    pub streams: Arc<ws::StreamsConfig>,
    /// `None`: the admin API is off.
    pub admin_token: Option<String>,
}

/// Mounts every route.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.configure(health::routes)
        .configure(rest::routes)
        .configure(ws::routes)
        .configure(admin::routes)
        .configure(metrics::routes);
}
