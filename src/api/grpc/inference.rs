//! `inference.GRPCInferenceService`: the Open Inference Protocol over gRPC, with the Triton
//! additions its client uses (streaming inference, model configuration, repository index).
//!
//! Inference goes the way REST's does: resolve the version (loading it if cold), admission at
//! the door's admission limit, [`convert::decode`], [`ModelInfo::validate`],
//! [`ServedModel::infer`] with the deadline from `grpc-timeout` (or Triton's `timeout`
//! parameter), [`convert::encode`]. Errors are `ServeError`s, mapped to status codes in
//! `error.rs`; a streamed request's error answers that request (`error_message`) and the
//! stream goes on (`inference/stream.rs`, the `ModelStreamInfer` call).

mod stream;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use tokio::sync::watch;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

use super::convert;
use super::proto::inference::grpc_inference_service_server::GrpcInferenceService;
use super::proto::inference::model_metadata_response::TensorMetadata;
use super::proto::inference::*;
use super::{grpc_timeout, request_id, Stop};
use crate::access::Pass;
use crate::actors::catalog::ServedModel;
use crate::actors::served::InferOptions;
use crate::api::accounting::{self, Answered, Protocol, Stats};
use crate::api::rest::{send, Asked};
use crate::api::{health, kserve, repository, AppState};
use crate::error::ServeError;
use crate::model::PLATFORM;

pub struct Inference {
    pub state: Arc<AppState>,
    /// Largest message sent; a larger answer is RESOURCE_EXHAUSTED.
    pub max_message: usize,
    pub stop: watch::Receiver<Stop>,
}

type Answer<T> = Result<Response<T>, Status>;

/// Who made a call, for access control: its metadata (the API key, forwarding headers) and
/// its peer address.
#[derive(Clone, Copy)]
struct Caller<'a> {
    metadata: &'a MetadataMap,
    peer: Option<IpAddr>,
}

fn version(v: &str) -> Option<&str> {
    (!v.is_empty()).then_some(v)
}

/// A load's or unload's parameters, with the repository it names: there is one repository,
/// so a name other than "" (any) is refused rather than ignored.
fn repository_parameters(
    repository_name: &str,
    parameters: &std::collections::HashMap<String, ModelRepositoryParameter>,
) -> Result<repository::Parameters, ServeError> {
    if !repository_name.is_empty() {
        return Err(ServeError::invalid(format!(
            "repository_name '{}' is not known: streamserve has one model repository; leave it empty",
            crate::untrusted::Untrusted(repository_name)
        )));
    }
    if let Some(dependents) = parameters.get("unload_dependents") {
        if !matches!(
            dependents.parameter_choice,
            Some(model_repository_parameter::ParameterChoice::BoolParam(_))
        ) {
            return Err(ServeError::invalid(
                "parameter 'unload_dependents' must be a bool_param",
            ));
        }
    }
    let mut names: Vec<String> = parameters.keys().cloned().collect();
    names.sort();
    Ok(repository::Parameters { names })
}

fn unimplemented(what: &str, instead: &str) -> Status {
    Status::unimplemented(format!("{what} is not supported by streamserve; {instead}"))
}

impl Inference {
    /// One inference, accounted (metrics, access log, the version's health) as REST does, with
    /// `protocol="grpc"` on its series.
    async fn infer(
        &self,
        rpc: &'static str,
        mut request: ModelInferRequest,
        call_timeout: Option<Duration>,
        request_id: String,
        caller: Caller<'_>,
    ) -> Result<ModelInferResponse, ServeError> {
        let received = Instant::now();
        let admitted = self
            .state
            .admitted(
                caller.metadata,
                caller.peer,
                &request.model_name,
                version(&request.model_version),
            )
            .await;
        // The caller's key name for the access log; the pass (and its in-flight permit) lives until
        // the answer is logged. A refusal has no pass: the key it presented is named all the same
        // (`-` for none or one that is not valid).
        let refused_key = admitted
            .as_ref()
            .err()
            .map(|_| self.state.access.caller_name(caller.metadata));
        let key = accounting::key_name(&admitted, &refused_key);
        // The version that answered, when not the one resolved here (`rest::send`).
        let mut moved = None;
        let outcome = match &admitted {
            Ok((pass, served)) => {
                self.infer_on(
                    served,
                    &mut request,
                    call_timeout,
                    received,
                    pass,
                    &mut moved,
                )
                .await
            }
            Err(e) => Err(e.clone()),
        };
        accounting::record(Answered {
            protocol: Protocol::Grpc { rpc },
            request_id: &request_id,
            key,
            asked: &request.model_name,
            served: moved
                .as_ref()
                .or(admitted.as_ref().ok().map(|(_, served)| served)),
            elapsed: received.elapsed(),
            outcome: outcome.as_ref().map(|(_, response)| Stats::from(response)),
        });
        outcome.map(|(answer, _)| answer)
    }

    async fn infer_on(
        &self,
        served: &ServedModel,
        request: &mut ModelInferRequest,
        call_timeout: Option<Duration>,
        received: Instant,
        pass: &Pass,
        moved: &mut Option<ServedModel>,
    ) -> Result<(ModelInferResponse, crate::model::InferResponse), ServeError> {
        let state = &self.state;
        state
            .access
            .check_version(pass, &served.info.name, &served.info.version)?;
        // Admission before decoding, as REST's; the message and its decoded copies count
        // against the same memory bound as REST bodies (`--max-body-memory-mb`).
        let permit = state.admission_permit(served)?;
        let _memory = state.body_memory.hold(request.encoded_len())?;
        let decoded = convert::decode(request)?;
        let info = served.info.clone();
        let validated = info.validate(decoded.inputs, decoded.outputs)?;
        state.access.check_rows(pass, &info.name, validated.rows)?;
        // The sooner of the call's deadline and the request's own.
        let timeout = match (call_timeout, decoded.timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let options = InferOptions::received_at(received)
            .with_timeout(timeout)
            .with_priority(pass.priority())
            .with_fallback_first(permit.to_fallback());
        // A request that named no version follows the model's default if its version is
        // retired before it runs, as REST's does.
        let asked = Asked {
            served,
            version: version(&request.model_version),
        };
        let response = send(state, asked, pass, validated, options, moved).await?;
        let info = moved.as_ref().map_or(&info, |by| &by.info);
        let answer = convert::encode(
            info,
            std::mem::take(&mut request.id),
            decoded.raw_output,
            &response,
        );
        let size = answer.encoded_len();
        if size > self.max_message {
            return Err(ServeError::ResponseTooLarge {
                size,
                limit: self.max_message,
            });
        }
        permit.answered(received, &response);
        Ok((answer, response))
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for Arc<Inference> {
    async fn server_live(&self, _: Request<ServerLiveRequest>) -> Answer<ServerLiveResponse> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(&self, _: Request<ServerReadyRequest>) -> Answer<ServerReadyResponse> {
        let ready = health::server_ready(&self.state);
        Ok(Response::new(ServerReadyResponse { ready }))
    }

    async fn model_ready(&self, request: Request<ModelReadyRequest>) -> Answer<ModelReadyResponse> {
        let request = request.into_inner();
        let ready = health::can_serve(&self.state, &request.name, version(&request.version))?;
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Answer<ServerMetadataResponse> {
        Ok(Response::new(ServerMetadataResponse {
            name: "streamserve".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: kserve::SERVER_EXTENSIONS.map(String::from).to_vec(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Answer<ModelMetadataResponse> {
        let peer = request.remote_addr().map(|a| a.ip());
        let (metadata, _, request) = request.into_parts();
        let served = self
            .state
            .described(&metadata, peer, &request.name, version(&request.version))
            .await?;
        let info = &served.info;
        let versions = self
            .state
            .catalog
            .snapshot()
            .models
            .get(&info.name)
            .map(|m| m.sorted_versions())
            .unwrap_or_default();
        let tensor = |s: &crate::runtime::TensorSpec| TensorMetadata {
            name: s.name.clone(),
            datatype: s.datatype.as_str().into(),
            shape: s.shape.clone(),
        };
        Ok(Response::new(ModelMetadataResponse {
            name: info.name.clone(),
            versions,
            platform: PLATFORM.into(),
            inputs: info.inputs.iter().map(tensor).collect(),
            outputs: info.outputs.iter().map(tensor).collect(),
        }))
    }

    async fn model_infer(&self, request: Request<ModelInferRequest>) -> Answer<ModelInferResponse> {
        let _work = self.state.work.begin();
        let timeout = grpc_timeout(request.metadata());
        let id = request_id(request.metadata(), &request.get_ref().id);
        let peer = request.remote_addr().map(|a| a.ip());
        let (metadata, _, message) = request.into_parts();
        let caller = Caller {
            metadata: &metadata,
            peer,
        };
        let answer = self
            .infer("ModelInfer", message, timeout, id.clone(), caller)
            .await?;
        let mut response = Response::new(answer);
        if let Ok(value) = id.parse() {
            response.metadata_mut().insert("x-request-id", value);
        }
        Ok(response)
    }

    type ModelStreamInferStream = stream::Answers;

    /// Answers in the order the requests came (`inference/stream.rs`).
    async fn model_stream_infer(
        &self,
        request: Request<Streaming<ModelInferRequest>>,
    ) -> Answer<Self::ModelStreamInferStream> {
        Ok(Response::new(stream::answer_in_order(
            self.clone(),
            request,
        )))
    }

    async fn model_config(
        &self,
        request: Request<ModelConfigRequest>,
    ) -> Answer<ModelConfigResponse> {
        let peer = request.remote_addr().map(|a| a.ip());
        let (metadata, _, request) = request.into_parts();
        let served = self
            .state
            .described(&metadata, peer, &request.name, version(&request.version))
            .await?;
        Ok(Response::new(ModelConfigResponse {
            config: Some(super::model_config::model_config(&served.info)),
        }))
    }

    async fn model_statistics(
        &self,
        _: Request<ModelStatisticsRequest>,
    ) -> Answer<ModelStatisticsResponse> {
        Err(unimplemented(
            "ModelStatistics",
            "per-version counts and latencies are in GET /metrics (streamserve_requests_total, \
             streamserve_request_duration_seconds, streamserve_queue_duration_seconds, \
             streamserve_inference_duration_seconds)",
        ))
    }

    async fn repository_index(
        &self,
        request: Request<RepositoryIndexRequest>,
    ) -> Answer<RepositoryIndexResponse> {
        let request = request.into_inner();
        let models = repository::index_rows(&self.state, request.ready)
            .into_iter()
            .map(|row| repository_index_response::ModelIndex {
                name: row.name,
                version: row.version,
                state: row.state.into(),
                reason: row.reason,
            })
            .collect();
        Ok(Response::new(RepositoryIndexResponse { models }))
    }

    /// Triton's `RepositoryModelLoad`, as REST's `/v2/repository/models/{name}/load`: the
    /// admin token in `authorization` metadata; answered once the version serves.
    async fn repository_model_load(
        &self,
        request: Request<RepositoryModelLoadRequest>,
    ) -> Answer<RepositoryModelLoadResponse> {
        repository::authorize(&self.state, request.metadata())?;
        let request = request.into_inner();
        let parameters = repository_parameters(&request.repository_name, &request.parameters)?;
        repository::load_model(&self.state, &request.model_name, &parameters).await?;
        Ok(Response::new(RepositoryModelLoadResponse {}))
    }

    /// Triton's `RepositoryModelUnload`, as REST's `/v2/repository/models/{name}/unload`.
    async fn repository_model_unload(
        &self,
        request: Request<RepositoryModelUnloadRequest>,
    ) -> Answer<RepositoryModelUnloadResponse> {
        repository::authorize(&self.state, request.metadata())?;
        let request = request.into_inner();
        let parameters = repository_parameters(&request.repository_name, &request.parameters)?;
        repository::unload_model(&self.state, &request.model_name, &parameters).await?;
        Ok(Response::new(RepositoryModelUnloadResponse {}))
    }

    async fn system_shared_memory_status(
        &self,
        _: Request<SystemSharedMemoryStatusRequest>,
    ) -> Answer<SystemSharedMemoryStatusResponse> {
        Err(unimplemented(
            "System shared memory",
            "send tensors in the request",
        ))
    }

    async fn system_shared_memory_register(
        &self,
        _: Request<SystemSharedMemoryRegisterRequest>,
    ) -> Answer<SystemSharedMemoryRegisterResponse> {
        Err(unimplemented(
            "System shared memory",
            "send tensors in the request",
        ))
    }

    async fn system_shared_memory_unregister(
        &self,
        _: Request<SystemSharedMemoryUnregisterRequest>,
    ) -> Answer<SystemSharedMemoryUnregisterResponse> {
        Err(unimplemented(
            "System shared memory",
            "send tensors in the request",
        ))
    }

    async fn cuda_shared_memory_status(
        &self,
        _: Request<CudaSharedMemoryStatusRequest>,
    ) -> Answer<CudaSharedMemoryStatusResponse> {
        Err(unimplemented(
            "CUDA shared memory",
            "send tensors in the request",
        ))
    }

    async fn cuda_shared_memory_register(
        &self,
        _: Request<CudaSharedMemoryRegisterRequest>,
    ) -> Answer<CudaSharedMemoryRegisterResponse> {
        Err(unimplemented(
            "CUDA shared memory",
            "send tensors in the request",
        ))
    }

    async fn cuda_shared_memory_unregister(
        &self,
        _: Request<CudaSharedMemoryUnregisterRequest>,
    ) -> Answer<CudaSharedMemoryUnregisterResponse> {
        Err(unimplemented(
            "CUDA shared memory",
            "send tensors in the request",
        ))
    }

    async fn trace_setting(&self, _: Request<TraceSettingRequest>) -> Answer<TraceSettingResponse> {
        Err(unimplemented(
            "TraceSetting",
            "request logs are the streamserve::access log target (--log)",
        ))
    }

    async fn log_settings(&self, _: Request<LogSettingsRequest>) -> Answer<LogSettingsResponse> {
        Err(unimplemented(
            "LogSettings",
            "the log filter is set at start (--log, STREAMSERVE_LOG)",
        ))
    }
}
