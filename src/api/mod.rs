//! HTTP surfaces. Each file translates one protocol into actor messages and back; errors are
//! mapped to HTTP in one place, [`crate::error::ServeError`]'s `ResponseError` impl.

mod accounting;
pub mod admin;
pub mod body;
pub mod door;
pub mod grpc;
pub mod health;
mod jobs;
pub(crate) mod json_tensor;
pub mod kserve;
pub mod metrics;
mod predictions;
mod repository;
pub mod rest;
mod status;
pub mod ws;

use std::sync::Arc;

use actix_web::web;
use metrics_exporter_prometheus::PrometheusHandle;

use std::time::Duration;

use actix::Addr;

use crate::actors::catalog::{ServedModel, SharedCatalog};
use crate::actors::supervisor::{EnsureLoaded, Supervisor};
use crate::error::ServeError;

/// What every handler can reach.
pub struct AppState {
    pub catalog: Arc<SharedCatalog>,
    pub max_body_bytes: usize,
    pub prometheus: PrometheusHandle,
    pub streams: Arc<ws::StreamsConfig>,
    /// `None`: the admin API is off.
    pub admin_token: Option<String>,
    pub supervisor: Addr<Supervisor>,
    /// Admission at the door: one permit per inference request being handled.
    pub admission: Arc<door::limit::AdmissionLimit>,
    /// Memory that request bodies may hold together.
    pub body_memory: body::BodyMemory,
    /// How fast a request body must arrive (enforced by the door, reported by `body`).
    pub body_pace: door::BodyPace,
    /// Requests being handled and streams open, for the shutdown.
    pub work: Arc<door::Work>,
    /// Who may call which model, within which limits.
    pub access: Arc<crate::access::Access>,
    /// The fleet agent, when the server follows a model registry.
    pub fleet: Option<crate::actors::fleet::Fleet>,
    /// Batch prediction jobs (docs/jobs.md).
    pub jobs: crate::jobs::Jobs,
}

/// How long a request waits for its model to load on demand before it gets 503.
const LOAD_WAIT: Duration = Duration::from_secs(60);

impl AppState {
    /// What reading a body of at most `max_bytes` needs.
    pub fn body_limits(&self, max_bytes: usize) -> body::BodyLimits<'_> {
        body::BodyLimits {
            max_bytes,
            memory: &self.body_memory,
            pace: self.body_pace,
        }
    }

    /// The version a metadata or configuration request asks about, loaded first where it is
    /// cold, as [`served`](Self::served) does; but on a server that requires API keys, a cold
    /// version is loaded only for a caller whose key may call the model. Metadata stays
    /// public, and without this a caller with no key could make the server load every lazy
    /// model (spending its memory and CPU) by asking about them.
    pub async fn described(
        &self,
        headers: &(dyn crate::access::Headers + Sync),
        peer: Option<std::net::IpAddr>,
        name: &str,
        version: Option<&str>,
    ) -> Result<ServedModel, ServeError> {
        if self.access.requires_keys() {
            if let Err(ServeError::ModelCold { .. }) =
                self.catalog.snapshot().resolve(name, version)
            {
                self.access.admit(headers, peer, name)?;
            }
        }
        self.served(name, version).await
    }

    /// Lets an inference caller in for model `name` (`access`) and finds the version it asked
    /// for, as [`served`](Self::served) does. Every inference surface starts here.
    pub async fn admitted(
        &self,
        headers: &(dyn crate::access::Headers + Sync),
        peer: Option<std::net::IpAddr>,
        name: &str,
        version: Option<&str>,
    ) -> Result<(crate::access::Pass, ServedModel), ServeError> {
        let pass = self.access.admit(headers, peer, name)?;
        let served = self.served(name, version).await?;
        Ok((pass, served))
    }

    /// A place among the inference requests decoded, queued or running at once (the door's
    /// admission limit, adaptive by default), held by the returned permit. Past the limit the
    /// server is saturated upstream of the model queues (HTTP, JSON), where `slo_ms` and
    /// `max_queue` cannot see it: a model whose fallback is ready has it answer, within the
    /// fallbacks' own limit (the permit says
    /// [`to_fallback`](door::limit::AdmissionPermit::to_fallback)); the rest get an immediate
    /// 429.
    pub fn admission_permit(
        &self,
        served: &ServedModel,
    ) -> Result<door::limit::AdmissionPermit, ServeError> {
        // Whether a fallback can take the overflow, by the router's own test, and is another
        // model. Looked up only past the limit.
        let fallback_ready = || {
            served.info.fallback.as_deref().is_some_and(|name| {
                name != served.info.name
                    && matches!(
                        self.catalog.snapshot().ready_fallback(name, &served.info),
                        Ok(Some(_))
                    )
            })
        };
        match self.admission.enter(fallback_ready) {
            door::limit::Entry::Admitted(permit) | door::limit::Entry::Fallback(permit) => {
                Ok(permit)
            }
            door::limit::Entry::Refused => {
                served
                    .series
                    .shed(&served.info.name, &served.info.version)
                    .increment(1);
                Err(ServeError::Busy {
                    limit: self.admission.limit(),
                    retry_after: Duration::from_secs(1),
                })
            }
        }
    }

    /// The model version a request goes to, loading it first if it is not loaded (lazy load,
    /// or after an idle unload): the request waits, bounded, instead of failing.
    pub async fn served(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<ServedModel, ServeError> {
        match self.catalog.snapshot().resolve(name, version) {
            Err(ServeError::ModelCold { model, version }) => {
                let load = self.supervisor.send(EnsureLoaded {
                    name: model.clone(),
                    version: Some(version.clone()),
                });
                match tokio::time::timeout(LOAD_WAIT, load).await {
                    Ok(Ok(result)) => result,
                    Ok(Err(_)) => Err(ServeError::ShuttingDown),
                    Err(_) => Err(ServeError::NotReady {
                        model,
                        reason: format!("version {version} is still loading"),
                        retry_after: Duration::from_secs(5),
                    }),
                }
            }
            other => other,
        }
    }
}

/// Mounts the speech routes and health only: the `--stream-port` listener's, whose HTTP
/// threads then carry no other traffic.
pub fn stream_routes(cfg: &mut web::ServiceConfig) {
    cfg.configure(ws::routes).configure(health::routes);
}

/// Mounts every route.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.configure(rest::infer_routes)
        .configure(health::routes)
        .configure(rest::routes)
        .configure(repository::routes)
        .configure(ws::routes)
        .configure(admin::routes)
        .configure(jobs::routes)
        .configure(predictions::routes)
        .configure(status::routes)
        .configure(metrics::routes);
}
