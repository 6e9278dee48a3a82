//! `GET /metrics`: Prometheus text exposition of everything recorded with the `metrics` crate.

use actix_web::{web, HttpResponse};

use super::AppState;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/metrics").route(web::get().to(render)));
}

async fn render(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.prometheus.render())
}
