//! `grpc.health.v1.Health`, the standard health service (Kubernetes gRPC probes, load
//! balancers, fly.io checks), answered from the catalog's real state as REST's readiness is:
//!
//! - `""` (the server) and `inference.GRPCInferenceService`: SERVING while every served model
//!   has a healthy replica and the server is not draining;
//! - `<model>` and `<model>:<version>`: SERVING while that version (the default one without a
//!   version) can serve; unknown names are NOT_FOUND (`Watch`: SERVICE_UNKNOWN).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::proto::health::health_check_response::ServingStatus;
use super::proto::health::health_server::Health;
use super::proto::health::{
    HealthCheckRequest, HealthCheckResponse, HealthListRequest, HealthListResponse,
};
use super::{draining, Stop, INFERENCE_SERVICE};
use crate::api::{health, AppState};
use crate::error::ServeError;
use crate::untrusted::Untrusted;

/// How often `Watch` looks at the state again.
const WATCH_EVERY: Duration = Duration::from_millis(500);

pub struct HealthService {
    pub state: Arc<AppState>,
    pub stop: watch::Receiver<Stop>,
}

fn serving(yes: bool) -> ServingStatus {
    if yes {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

impl HealthService {
    /// The status of `service`, or `None` for a name that is neither the server nor a model.
    fn status(&self, service: &str) -> Option<ServingStatus> {
        if service.is_empty() || service == INFERENCE_SERVICE {
            let ready = self.state.catalog.snapshot().ready() && !self.state.work.draining();
            return Some(serving(ready));
        }
        let (name, version) = match service.rsplit_once(':') {
            Some((name, version)) => (name, Some(version)),
            None => (service, None),
        };
        match health::can_serve(&self.state, name, version) {
            Ok(ready) => Some(serving(ready && !self.state.work.draining())),
            Err(ServeError::ModelNotFound(_) | ServeError::VersionNotFound { .. }) => None,
            Err(_) => Some(ServingStatus::NotServing),
        }
    }

    fn answer(status: ServingStatus) -> HealthCheckResponse {
        HealthCheckResponse {
            status: status as i32,
        }
    }
}

#[tonic::async_trait]
impl Health for Arc<HealthService> {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let service = request.into_inner().service;
        match self.status(&service) {
            Some(status) => Ok(Response::new(HealthService::answer(status))),
            // The name is the client's: quoted escaped and cut (a status message travels in a
            // header, and clients refuse long ones).
            None => Err(Status::not_found(format!(
                "unknown service '{}'",
                Untrusted(&service)
            ))),
        }
    }

    /// Every service `Check` knows: the server, the inference service, each model (its
    /// default version) and each listed version.
    async fn list(
        &self,
        _: Request<HealthListRequest>,
    ) -> Result<Response<HealthListResponse>, Status> {
        let catalog = self.state.catalog.snapshot();
        let mut names = vec![String::new(), INFERENCE_SERVICE.to_string()];
        for (name, model) in &catalog.models {
            names.push(name.clone());
            names.extend(
                model
                    .sorted_versions()
                    .into_iter()
                    .map(|v| format!("{name}:{v}")),
            );
        }
        let statuses: HashMap<String, HealthCheckResponse> = names
            .into_iter()
            .filter_map(|name| {
                let status = self.status(&name)?;
                Some((name, HealthService::answer(status)))
            })
            .collect();
        Ok(Response::new(HealthListResponse { statuses }))
    }

    type WatchStream =
        Pin<Box<dyn futures_util::Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

    /// The status now, then each change; NOT_SERVING as the server starts to drain, and the
    /// stream ends with it.
    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let service = request.into_inner().service;
        let this = self.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let stop = draining(this.stop.clone());
            tokio::pin!(stop);
            let mut last = None;
            loop {
                let status = this
                    .status(&service)
                    .unwrap_or(ServingStatus::ServiceUnknown);
                if last != Some(status) {
                    last = Some(status);
                    if tx.send(Ok(HealthService::answer(status))).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(WATCH_EVERY) => {}
                    _ = tx.closed() => return,
                    _ = &mut stop => {
                        let _ = tx.send(Ok(HealthService::answer(ServingStatus::NotServing))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
