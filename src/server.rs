//! Starting the whole server: the listeners' ports bound first, then ORT, the supervisor and
//! its models, then the HTTP listener on its port, the gRPC one beside it (`api/grpc/`) and,
//! with `--stream-port`, an HTTP listener for speech only, which all stop together.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use actix::Actor;
use actix_web::{web, App, HttpServer};
use tokio::sync::watch;

use crate::access::Access;
use crate::actors::budget::Budgets;
use crate::actors::catalog::SharedCatalog;
use crate::actors::fleet::{Fleet, FleetOptions};
use crate::actors::stream_hub::StreamHub;
use crate::actors::supervisor::{Start, Supervisor};
use crate::api::body::BodyMemory;
use crate::api::door::{self, BodyPace, Door, Work};
use crate::api::grpc::{GrpcConfig, GrpcServer};
use crate::api::ws::StreamsConfig;
use crate::api::{self, AppState};
use crate::config::Config;
use crate::machine::{traffic, Machine};
use crate::manifest::Manifest;
use crate::telemetry;
use sockets::Sockets;

mod sockets;
pub use sockets::BindError;

/// A started server: where it listens, and how to stop it.
pub struct Running {
    pub addr: SocketAddr,
    /// Where gRPC listens; `None` when it is off.
    pub grpc_addr: Option<SocketAddr>,
    grpc: Option<GrpcServer>,
    /// Where the speech-only listener (`--stream-port`) listens; `None` when there is none.
    pub stream_addr: Option<SocketAddr>,
    stream_handle: Option<actix_web::dev::ServerHandle>,
    pub handle: actix_web::dev::ServerHandle,
    pub catalog: Arc<SharedCatalog>,
    /// The fleet agent, when following a model registry.
    pub fleet: Option<Fleet>,
    shutdown: watch::Sender<bool>,
    drain: Duration,
    work: Arc<Work>,
    jobs: crate::jobs::Jobs,
}

impl Running {
    /// Graceful stop within the drain time from now: see [`Running::shutdown_by`].
    pub async fn shutdown(&self) {
        self.shutdown_by(tokio::time::Instant::now() + self.drain)
            .await;
    }

    /// The drain time this server was started with.
    pub fn drain_time(&self) -> Duration {
        self.drain
    }

    /// Graceful stop, over by `deadline` (the signal's time plus the drain time: orchestrators
    /// kill a process that outlives its drain, fly.io at `kill_timeout`), each step bounded by
    /// it, and at most [`STOP_MARGIN`] past it. The listeners stop accepting; streams are
    /// told to reconnect elsewhere (WebSocket close code 1001; a gRPC stream ends UNAVAILABLE
    /// once its answers are sent, and gRPC connections get GOAWAY); every HTTP response from
    /// now on carries `Connection: close`, so a keep-alive client gets the answer to what it
    /// sent and then leaves, instead of sending on a connection that is about to be cut.
    /// Batch jobs stop (they resume at the next start) and the instance leaves the fleet
    /// meanwhile. Returns once nothing the server has read is still unanswered and the
    /// connections have closed (true), or at the deadline (false: connections are left, the
    /// listeners' own futures will not end soon).
    pub async fn shutdown_by(&self, deadline: tokio::time::Instant) -> bool {
        use tokio::time::timeout_at;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let drain_secs = (left + Duration::from_millis(500)).as_secs();
        tracing::info!(drain_secs, "shutting down");
        // First take no more connections: one accepted after the first `Connection: close`
        // answers would be dropped unread by the stopping worker. A pause is a message to the
        // listener's own task, bounded all the same.
        let pause = async {
            self.handle.pause().await;
            if let Some(streams) = &self.stream_handle {
                streams.pause().await;
            }
        };
        let _ = timeout_at(deadline, pause).await;
        self.work.start_draining();
        let _ = self.shutdown.send(true);
        if let Some(grpc) = &self.grpc {
            grpc.drain();
        }
        // Beside the drain, not before it: a hung registry (or job) must neither keep the
        // listener open nor push the exit past the deadline.
        let jobs = async {
            if timeout_at(deadline, self.jobs.shutdown()).await.is_err() {
                tracing::warn!("batch jobs had not stopped when the drain time was up");
            }
        };
        let fleet = async {
            if let Some(fleet) = &self.fleet {
                if timeout_at(deadline, fleet.leave()).await.is_err() {
                    tracing::warn!("could not leave the fleet within the drain time (is the registry reachable?)");
                }
            }
        };
        let work = async {
            while self.work.active() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if self.work.active() > 0 {
                tracing::warn!(
                    active = self.work.active(),
                    "drain time is up with work still in flight"
                );
            }
        };
        tokio::join!(jobs, fleet, work);
        // Closes the listeners and waits for the connections left (idle keep-alive ones until
        // the deadline); gRPC's, whose calls are answered by now, close at once. actix's own
        // `shutdown_timeout` would start only now: the deadline cuts it.
        let http = async {
            let streams = async {
                if let Some(streams) = &self.stream_handle {
                    streams.stop(true).await;
                }
            };
            tokio::join!(self.handle.stop(true), streams);
        };
        let http = async {
            let closed = timeout_at(deadline, http).await.is_ok();
            if !closed {
                tracing::warn!(
                    "drain time is up with HTTP connections still open; the exit cuts them"
                );
            }
            closed
        };
        let grpc = async {
            if let Some(grpc) = &self.grpc {
                grpc.stop(deadline).await;
            }
        };
        tokio::join!(http, grpc).0
    }
}

/// How long past its deadline a shutdown may take: gRPC's forced close waits up to a second
/// for its connections to go.
pub const STOP_MARGIN: Duration = Duration::from_secs(1);

/// Binds the listeners' ports, loads the models and serves on those ports; the returned
/// `Server` future serves until stopped. Must run inside an actix `System`. Signals are the
/// caller's to handle (see `main.rs`), so that a shutdown can tell streams before the listener
/// stops.
pub async fn start(config: &Config) -> anyhow::Result<(Running, actix_web::dev::Server)> {
    // Before anything slow (ONNX Runtime, the models, the registry's versions): a port in use
    // stops the start at once, not after minutes of loading with the models' memory spent.
    let sockets = Sockets::bind(config)?;
    // The TLS files too: one that cannot be used stops the start here, as a taken port does.
    let grpc_transport = match sockets.grpc {
        Some(_) => Some(crate::api::grpc::transport(
            config
                .grpc_tls_cert
                .as_deref()
                .zip(config.grpc_tls_key.as_deref()),
        )?),
        None => None,
    };
    if sockets.grpc.is_some() {
        telemetry::grpc_listens();
    }
    let prometheus = telemetry::metrics_handle();
    telemetry::install_panic_hook();
    crate::machine::gpu::init();
    let sessions =
        crate::runtime::ort_sessions(config.ort_dylib.as_deref()).map_err(anyhow::Error::msg)?;
    let manifest = load_manifest(config)?;
    let catalog = Arc::new(SharedCatalog::default());
    let budgets = Arc::new(Budgets::new(
        config.cpu_budget,
        config
            .memory_budget_mb
            .unwrap_or_else(crate::actors::budget::available_ram_mb),
        config.vram_budget_mb,
    ));
    let machine = web::Data::new(Machine::new(budgets.clone()));
    let supervisor = Supervisor::new(sessions, catalog.clone(), budgets)
        .with_watch(config.watch_settings())
        .start();
    supervisor
        .send(Start(manifest))
        .await
        .map_err(|e| anyhow::anyhow!("supervisor stopped while starting: {e}"))?;
    let fleet = match &config.registry {
        None => None,
        Some(registry) => {
            let options = FleetOptions {
                registry: registry.clone(),
                cache_dir: config.registry_cache.clone(),
                instance_id: config
                    .instance_id
                    .clone()
                    .unwrap_or_else(crate::actors::fleet::default_instance_id),
                url: config.advertise_url.clone(),
                poll: Duration::from_secs_f64(config.registry_poll_secs),
            };
            let fleet = Fleet::start(options, supervisor.clone(), catalog.clone())?;
            fleet
                .wait_synced(Duration::from_secs(config.registry_wait_secs))
                .await;
            Some(fleet)
        }
    };
    // Unfinished batch jobs resume once the models are in.
    let jobs = crate::jobs::Jobs::start(
        &config.jobs_dir,
        config.jobs_retention(),
        catalog.clone(),
        supervisor.clone(),
    )?;
    let (shutdown, shutdown_rx) = watch::channel(false);
    let keys = token_keys(config)?;
    let admission = Arc::new(door::limit::AdmissionLimit::new(
        config.admission,
        config.max_inflight,
        Duration::from_millis(config.admission_target_ms),
    ));
    let streams = Arc::new(StreamsConfig {
        hub: StreamHub::new(Duration::from_secs(config.stream_resume_secs)).start(),
        resume_window: Duration::from_secs(config.stream_resume_secs),
        idle_timeout: Duration::from_secs(config.stream_idle_secs),
        shutdown: shutdown_rx,
        keys: Arc::new(keys),
        checkpoint_every: Duration::from_millis(config.stream_checkpoint_ms),
        catalog: catalog.clone(),
        supervisor: supervisor.clone(),
        arbiters: crate::api::ws::SessionArbiters::new(config.http_workers.max(1)),
        pace: admission.stream_pace(),
    });

    let work = Arc::new(Work::default());
    let body_pace = BodyPace {
        deadline: Duration::from_secs(config.body_timeout_secs),
        min_bytes_per_sec: config.min_body_bytes_per_sec,
    };
    let door = Door {
        pace: body_pace,
        work: work.clone(),
    };
    // One cap for every HTTP thread, shared by the listeners in proportion to their threads.
    let stream_workers = config.stream_port.map_or(0, |_| config.stream_workers);
    let max_connections =
        connection_cap(config.max_connections, config.http_workers + stream_workers);
    let (main_connections, stream_connections) =
        share_connections(max_connections, config.http_workers, stream_workers);
    let access = Arc::new(Access::from_config(config).map_err(anyhow::Error::msg)?);
    {
        // Keys reload when their file changes; idle client addresses are forgotten.
        let access = access.clone();
        actix_web::rt::spawn(async move {
            let mut tick = actix_web::rt::time::interval(crate::access::RELOAD_EVERY);
            loop {
                tick.tick().await;
                access.reload_if_changed();
                access.forget_idle_addresses();
            }
        });
    }
    let state: web::Data<AppState> = web::Data::new(AppState {
        catalog: catalog.clone(),
        max_body_bytes: config.max_body_bytes,
        prometheus,
        streams,
        admin_token: config.admin_token.clone().filter(|t| !t.is_empty()),
        supervisor,
        admission,
        body_memory: BodyMemory::new(config.max_body_memory_mb),
        body_pace,
        work: work.clone(),
        access,
        fleet: fleet.clone(),
        jobs: jobs.clone(),
    });
    let grpc_state = state.clone().into_inner();
    let listener = Listener {
        config,
        state,
        machine,
        door,
    };
    let (server, addr) = listener.serve(
        sockets.http,
        config.http_workers,
        main_connections,
        api::routes,
    )?;
    // Speech on HTTP threads of its own: each thread's event loop reads and writes every
    // connection it holds, so on `--port` a stream's chunk waits behind whatever else that
    // thread is reading and refusing. Measured pinned on one core with REST at twice its
    // capacity: 40 streams' chunk p99 245 ms on the shared thread, 6 ms on a thread of their
    // own (load-tests/results/2026-12-05-door-fit).
    let streams_listener = match sockets.streams {
        None => None,
        Some(sockets) => Some(listener.serve(
            sockets,
            stream_workers,
            stream_connections,
            api::stream_routes,
        )?),
    };
    let grpc = match sockets.grpc.zip(grpc_transport) {
        None => None,
        Some((listener, transport)) => Some(GrpcServer::start(
            grpc_state,
            GrpcConfig {
                listener,
                transport,
                max_message: config.grpc_max_message(),
                workers: config.http_workers,
            },
        )?),
    };
    let grpc_addr = grpc.as_ref().map(|g| g.addr);
    // Started once every listener is bound: a failed bind leaves none of them serving.
    let stream_addr = streams_listener.as_ref().map(|(_, addr)| *addr);
    let stream_handle = streams_listener.map(|(server, _)| {
        let handle = server.handle();
        actix_web::rt::spawn(async move {
            if let Err(e) = server.await {
                tracing::error!(error = %e, "the stream listener stopped with an error");
            }
        });
        handle
    });
    // One line for every listener: tools wait for it and read the addresses from it.
    let grpc_field = grpc_addr.map_or_else(|| "off".to_string(), |a| a.to_string());
    let stream_field = stream_addr.map_or_else(|| "off".to_string(), |a| a.to_string());
    let grpc_tls = config.grpc_tls_cert.is_some();
    tracing::info!(%addr, grpc_addr = %grpc_field, grpc_tls, stream_addr = %stream_field, max_connections, "streamserve listening");
    let running = Running {
        addr,
        grpc_addr,
        grpc,
        stream_addr,
        stream_handle,
        handle: server.handle(),
        catalog,
        fleet,
        shutdown,
        drain: Duration::from_secs(config.drain_secs),
        work,
        jobs,
    };
    Ok((running, server))
}

/// What an HTTP listener is built from: the main one (every route) and the speech-only one
/// (`--stream-port`) share the state, the door and the connection settings.
struct Listener<'a> {
    config: &'a Config,
    state: web::Data<AppState>,
    machine: web::Data<Machine>,
    door: Door,
}

impl Listener<'_> {
    /// An HTTP server with `routes` on `sockets` (bound by [`Sockets::bind`]), `workers`
    /// threads and at most `connections` open connections; it starts when its future is
    /// first polled.
    fn serve(
        &self,
        sockets: Vec<TcpListener>,
        workers: usize,
        connections: usize,
        routes: fn(&mut web::ServiceConfig),
    ) -> anyhow::Result<(actix_web::dev::Server, SocketAddr)> {
        let (state, machine, door) = (self.state.clone(), self.machine.clone(), self.door.clone());
        let config = self.config;
        let mut server = HttpServer::new(move || {
            let door = door.clone();
            App::new()
                .app_data(state.clone())
                .app_data(machine.clone())
                .app_data(door::query_errors())
                .app_data(door::path_errors())
                .configure(routes)
                .default_service(web::to(door::no_such_endpoint))
                .wrap_fn(move |req, service| door.wrap(req, service))
        })
        // Counts the connection until it closes (its data is dropped with it)
        // and remembers its socket, whose kernel record says when a request arrived.
        .on_connect(|io, data| {
            traffic::on_http_connect(io, data);
            door::arrival::on_connect(io, data);
        })
        // Results are small writes (a stream sends one per 32 ms chunk): without TCP_NODELAY,
        // Nagle's algorithm holds one back behind the peer's delayed ACK, a 40 ms stall the
        // load tool saw on a few chunks in a thousand.
        .tcp_nodelay(true)
        .workers(workers)
        .shutdown_timeout(config.drain_secs)
        // Per worker. Past the open-file limit, accept() fails and every new client is locked
        // out; below it, a flood of connections waits in the listen backlog while those open
        // are served (and slow bodies among them are cut by the door's pace).
        .max_connections(connections.div_ceil(workers.max(1)))
        .client_request_timeout(Duration::from_secs(30))
        // A client that sends on a pooled connection just as the server closes it for
        // idleness gets "connection closed before message completed" (loadgen timeline saw 14
        // at once, 5 s after a load step left ~2,000 connections idle under actix's 5 s
        // default). Outliving the clients' and proxies' own idle timeouts leaves the closing
        // to them.
        .keep_alive(Duration::from_secs(config.keep_alive_secs));
        for socket in sockets {
            server = server.listen(socket)?;
        }
        let server = server.disable_signals();
        let addr = *server
            .addrs()
            .first()
            .ok_or_else(|| anyhow::anyhow!("listener has no address"))?;
        Ok((server.run(), addr))
    }
}

/// The connection cap shared by the main listener's `main_workers` threads and the stream
/// listener's `stream_workers` (0: none), in proportion to their threads, at least one
/// connection per thread each.
fn share_connections(cap: usize, main_workers: usize, stream_workers: usize) -> (usize, usize) {
    if stream_workers == 0 {
        return (cap, 0);
    }
    let streams = (cap * stream_workers / (main_workers + stream_workers)).max(stream_workers);
    (cap.saturating_sub(streams).max(main_workers), streams)
}

/// The keys that sign stream checkpoints: the fleet's (a file, or a value from the
/// environment), else this process's own.
fn token_keys(config: &Config) -> anyhow::Result<crate::stream::checkpoint::TokenKeys> {
    use crate::stream::checkpoint::TokenKeys;
    Ok(
        match (&config.stream_token_keys, &config.stream_token_key) {
            (Some(path), _) => TokenKeys::from_file(path).map_err(anyhow::Error::msg)?,
            (None, Some(value)) => TokenKeys::from_value(value).map_err(anyhow::Error::msg)?,
            (None, None) => {
                tracing::info!("stream checkpoints are signed with this process's own key: they resume streams here only (set --stream-token-keys to resume on any instance of a fleet)");
                TokenKeys::ephemeral()
            }
        },
    )
}

/// The model directory's manifest. Following a registry, a directory without one is no
/// error: every model may come from the registry.
fn load_manifest(config: &Config) -> anyhow::Result<Manifest> {
    let path = config.models.join(crate::manifest::MANIFEST_FILE);
    if config.registry.is_some() && !path.exists() {
        tracing::info!(models = %config.models.display(), "no model manifest; every model comes from the registry");
        return Ok(Manifest {
            dir: config.models.clone(),
            models: Vec::new(),
        });
    }
    Manifest::load(&config.models)
}

/// Open-file descriptors kept for model files, logs, the listener and ONNX Runtime.
const RESERVED_FDS: u64 = 256;

/// The connection limit: as configured, or what the open-file limit leaves (after raising the
/// soft limit to the hard one, as servers do), so that accept() never runs out of descriptors.
fn connection_cap(configured: usize, workers: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read or write the struct passed.
    let fds = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
        limit.rlim_cur
    };
    let cap = fds.saturating_sub(RESERVED_FDS).max(workers as u64 * 16);
    usize::try_from(cap).unwrap_or(usize::MAX).min(1 << 20)
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

#[cfg(test)]
mod tests {
    use super::share_connections;

    #[test]
    fn the_listeners_share_one_connection_cap_by_their_threads() {
        assert_eq!(share_connections(20_000, 2, 0), (20_000, 0));
        assert_eq!(share_connections(30_000, 2, 1), (20_000, 10_000));
        // A cap too small to share still leaves each thread a connection.
        assert_eq!(share_connections(2, 2, 1), (2, 1));
    }
}
