//! `GET /metrics`: Prometheus text exposition of everything recorded with the `metrics` crate,
//! with the machine's figures (process, devices' memory, GPUs) read for each scrape, and the
//! model monitor's series of every serving version (`crate::monitor`).

use actix_web::{web, HttpResponse};

use super::AppState;
use crate::machine::{self, Machine};

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/metrics").route(web::get().to(render)));
}

async fn render(state: web::Data<AppState>, machine: Option<web::Data<Machine>>) -> HttpResponse {
    machine::refresh(machine.as_ref().map(|m| m.get_ref())).await;
    state.jobs.record_metrics();
    let mut text = state.prometheus.render();
    machine::render_extra(&mut text);
    crate::monitor::render(&state.catalog.snapshot().watches(), &mut text);
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(text)
}
