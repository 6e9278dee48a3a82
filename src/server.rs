//! Starting the whole server: ORT, the supervisor and its models, then the HTTP listener.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};

use crate::actors::registry::Registry;
use crate::actors::supervisor::Supervisor;
use crate::api::{self, AppState};
use crate::config::Config;
use crate::manifest::Manifest;
use crate::telemetry;

/// A started server: where it listens, and how to stop it.
pub struct Running {
    pub addr: SocketAddr,
    pub handle: actix_web::dev::ServerHandle,
    pub registry: Arc<Registry>,
}

/// Loads the models and binds the listener; the returned `Server` future serves until stopped.
/// Must run inside an actix `System`.
pub async fn start(
    config: &Config,
    handle_signals: bool,
) -> anyhow::Result<(Running, actix_web::dev::Server)> {
    let prometheus = telemetry::metrics_handle();
    let env = crate::runtime::init(config.ort_dylib.as_deref()).map_err(anyhow::Error::msg)?;
    let manifest = Manifest::load(&config.models)?;
    let registry = Arc::new(Registry::default());
    Supervisor::new(env, registry.clone())
        .start_manifest(&manifest)
        .await;

    let state = web::Data::new(AppState {
        registry: registry.clone(),
        max_body_bytes: config.max_body_bytes,
        prometheus,
    });
    let mut server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .configure(api::routes)
            .default_service(web::to(|| async {
                HttpResponse::NotFound().json(serde_json::json!({ "error": "no such endpoint" }))
            }))
    })
    .workers(config.http_workers)
    .shutdown_timeout(30)
    .client_request_timeout(Duration::from_secs(30))
    .bind((config.host.as_str(), config.port))
    .map_err(|e| anyhow::anyhow!("cannot listen on {}:{}: {e}", config.host, config.port))?;
    if !handle_signals {
        server = server.disable_signals();
    }
    let addr = *server
        .addrs()
        .first()
        .ok_or_else(|| anyhow::anyhow!("listener has no address"))?;
    let server = server.run();
    tracing::info!(%addr, "streamserve listening");
    Ok((
        Running {
            addr,
            handle: server.handle(),
            registry,
        },
        server,
    ))
}

/// Runs a server on a thread of its own (its own actix `System`), for tests and benchmarks
/// that start it in-process; returns once it is listening.
pub fn spawn(config: Config) -> anyhow::Result<Running> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("streamserve-system".into())
        .spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                match start(&config, false).await {
                    Ok((running, server)) => {
                        let _ = tx.send(Ok(running));
                        let _ = server.await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })
        })?;
    rx.recv()?
}
