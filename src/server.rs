//! Starting the whole server: ORT, the supervisor and its models, then the HTTP listener.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::Actor;
use actix_web::{web, App, HttpResponse, HttpServer};
use tokio::sync::watch;

use crate::actors::registry::Registry;
use crate::actors::stream_hub::StreamHub;
use crate::actors::supervisor::{Start, Supervisor};
use crate::api::ws::StreamsConfig;
use crate::api::{self, AppState};
use crate::config::Config;
use crate::manifest::Manifest;
use crate::telemetry;

/// A started server: where it listens, and how to stop it.
pub struct Running {
    pub addr: SocketAddr,
    pub handle: actix_web::dev::ServerHandle,
    pub registry: Arc<Registry>,
    shutdown: watch::Sender<bool>,
    drain: Duration,
}

impl Running {
    /// Graceful stop: streams are told to reconnect elsewhere (close code 1001), the listener
    /// stops accepting, and in-flight requests finish (within the drain time) before the server
    /// future completes.
    pub async fn shutdown(&self) {
        tracing::info!(drain_secs = self.drain.as_secs(), "shutting down");
        let _ = self.shutdown.send(true);
        self.handle.stop(true).await;
    }
}

/// Loads the models and binds the listener; the returned `Server` future serves until stopped.
/// Must run inside an actix `System`. Signals are the caller's to handle (see `main.rs`), so
/// that a shutdown can tell streams before the listener stops.
pub async fn start(config: &Config) -> anyhow::Result<(Running, actix_web::dev::Server)> {
    let prometheus = telemetry::metrics_handle();
    telemetry::install_panic_hook();
    let env = crate::runtime::init(config.ort_dylib.as_deref()).map_err(anyhow::Error::msg)?;
    let manifest = Manifest::load(&config.models)?;
    let registry = Arc::new(Registry::new(
        config.cpu_budget,
        config
            .memory_budget_mb
            .unwrap_or_else(crate::actors::registry::available_ram_mb),
        config.vram_budget_mb,
    ));
    let supervisor = Supervisor::new(env, registry.clone()).start();
    supervisor
        .send(Start(manifest))
        .await
        .map_err(|e| anyhow::anyhow!("supervisor stopped while starting: {e}"))?;
    let (shutdown, shutdown_rx) = watch::channel(false);
    let streams = Arc::new(StreamsConfig {
        hub: StreamHub::default().start(),
        resume_window: Duration::from_secs(config.stream_resume_secs),
        idle_timeout: Duration::from_secs(config.stream_idle_secs),
        shutdown: shutdown_rx,
    });

    let state = web::Data::new(AppState {
        registry: registry.clone(),
        max_body_bytes: config.max_body_bytes,
        prometheus,
        streams,
        admin_token: config.admin_token.clone().filter(|t| !t.is_empty()),
        supervisor,
        inflight: Arc::new(tokio::sync::Semaphore::new(if config.max_inflight == 0 {
            tokio::sync::Semaphore::MAX_PERMITS
        } else {
            config.max_inflight
        })),
        max_inflight: config.max_inflight,
    });
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .configure(api::routes)
            .default_service(web::to(|| async {
                HttpResponse::NotFound().json(serde_json::json!({ "error": "no such endpoint" }))
            }))
    })
    // Results are small writes (a stream sends one per 32 ms chunk): without TCP_NODELAY, Nagle's
    // algorithm holds one back behind the peer's delayed ACK, a 40 ms stall the load tool saw
    // on a few chunks in a thousand.
    .tcp_nodelay(true)
    .workers(config.http_workers)
    .shutdown_timeout(config.drain_secs)
    .client_request_timeout(Duration::from_secs(30))
    // A client that sends on a pooled connection just as the server closes it for idleness
    // gets "connection closed before message completed" (loadgen timeline saw 14 at once, 5 s
    // after a load step left ~2,000 connections idle under actix's 5 s default). Outliving
    // the clients' and proxies' own idle timeouts leaves the closing to them.
    .keep_alive(Duration::from_secs(config.keep_alive_secs))
    .bind((config.host.as_str(), config.port))
    .map_err(|e| anyhow::anyhow!("cannot listen on {}:{}: {e}", config.host, config.port))?
    .disable_signals();
    let addr = *server
        .addrs()
        .first()
        .ok_or_else(|| anyhow::anyhow!("listener has no address"))?;
    let server = server.run();
    tracing::info!(%addr, "streamserve listening");
    let running = Running {
        addr,
        handle: server.handle(),
        registry,
        shutdown,
        drain: Duration::from_secs(config.drain_secs),
    };
    Ok((running, server))
}

/// Runs a server on a thread of its own (its own actix `System`), for tests and benchmarks
/// that start it in-process; returns once it is listening.
pub fn spawn(config: Config) -> anyhow::Result<Running> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("streamserve-system".into())
        .spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                match start(&config).await {
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
