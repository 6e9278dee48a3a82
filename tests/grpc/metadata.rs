//! Server and model metadata, readiness, model config and the repository index, then
//! `grpc.health.v1` and server reflection: what a client asks before it sends inference.

use streamserve::api::grpc::proto::health::health_check_response::ServingStatus;
use streamserve::api::grpc::proto::health::health_client::HealthClient;
use streamserve::api::grpc::proto::health::{HealthCheckRequest, HealthListRequest};

use super::*;

#[tokio::test]
async fn server_liveness_readiness_and_metadata() {
    let mut c = grpc().await;
    assert!(
        c.server_live(ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    assert!(
        c.server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let meta = c
        .server_metadata(ServerMetadataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.name, "streamserve");
    assert_eq!(meta.version, env!("CARGO_PKG_VERSION"));
    assert!(meta.extensions.contains(&"model_repository".to_string()));
}

#[tokio::test]
async fn model_metadata_readiness_config_and_index() {
    let mut c = grpc().await;
    let meta = c
        .model_metadata(ModelMetadataRequest {
            name: "mlp".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.name, "mlp");
    assert_eq!(meta.versions, ["1"]);
    assert_eq!(meta.platform, "onnxruntime_onnx");
    assert_eq!(meta.inputs.len(), 1);
    assert_eq!(
        (
            meta.inputs[0].name.as_str(),
            meta.inputs[0].datatype.as_str()
        ),
        ("features", "FP32")
    );
    assert_eq!(meta.inputs[0].shape, [-1, 256]);
    let outputs: Vec<(&str, &str, &[i64])> = meta
        .outputs
        .iter()
        .map(|o| (o.name.as_str(), o.datatype.as_str(), o.shape.as_slice()))
        .collect();
    assert_eq!(
        outputs,
        [
            ("logits", "FP32", &[-1, 16][..]),
            ("probabilities", "FP32", &[-1, 16][..])
        ]
    );
    let pinned = c
        .model_metadata(ModelMetadataRequest {
            name: "mlp".into(),
            version: "1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pinned, meta);
    expect_status(
        c.model_metadata(ModelMetadataRequest {
            name: "mlp".into(),
            version: "7".into(),
        })
        .await,
        Code::NotFound,
        "no version '7'",
    );
    expect_status(
        c.model_metadata(ModelMetadataRequest {
            name: "nope".into(),
            version: String::new(),
        })
        .await,
        Code::NotFound,
        "unknown model 'nope'",
    );

    for name in BUNDLED_MODELS {
        let ready = c
            .model_ready(ModelReadyRequest {
                name: name.into(),
                version: String::new(),
            })
            .await;
        assert!(ready.unwrap().into_inner().ready, "{name}");
    }
    let pinned = c
        .model_ready(ModelReadyRequest {
            name: "mlp".into(),
            version: "1".into(),
        })
        .await;
    assert!(pinned.unwrap().into_inner().ready);
    expect_status(
        c.model_ready(ModelReadyRequest {
            name: "nope".into(),
            version: String::new(),
        })
        .await,
        Code::NotFound,
        "nope",
    );

    let config = c
        .model_config(ModelConfigRequest {
            name: "mlp".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert_eq!(config.name, "mlp");
    assert_eq!(config.platform, "onnxruntime_onnx");
    assert_eq!(config.backend, "onnxruntime");
    assert_eq!(config.max_batch_size, 64);
    assert_eq!(config.input[0].name, "features");
    assert_eq!(config.input[0].data_type, DataType::TypeFp32 as i32);
    assert_eq!(
        config.input[0].dims,
        [256],
        "Triton's dims leave out the batch axis"
    );
    assert_eq!(config.output[1].name, "probabilities");
    assert_eq!(config.output[1].dims, [16]);
    assert_eq!(config.instance_group[0].count, 2);
    assert!(matches!(
        config.scheduling_choice,
        Some(model_config::SchedulingChoice::DynamicBatching(_))
    ));
    // The scalar `sr` of silero_vad keeps its (zero) dims; typed_ops has every datatype.
    let typed = c
        .model_config(ModelConfigRequest {
            name: "typed_ops".into(),
            version: "1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    let types: Vec<i32> = typed.input.iter().map(|i| i.data_type).collect();
    assert_eq!(
        types,
        [
            DataType::TypeInt64 as i32,
            DataType::TypeFp64 as i32,
            DataType::TypeBool as i32
        ]
    );

    let index = c
        .repository_index(RepositoryIndexRequest {
            repository_name: String::new(),
            ready: false,
        })
        .await
        .unwrap()
        .into_inner();
    let rows: Vec<(&str, &str, &str)> = index
        .models
        .iter()
        .map(|m| (m.name.as_str(), m.version.as_str(), m.state.as_str()))
        .collect();
    let want: Vec<_> = BUNDLED_MODELS.map(|name| (name, "1", "READY")).into();
    assert_eq!(rows, want);
    let ready_only = c
        .repository_index(RepositoryIndexRequest {
            repository_name: String::new(),
            ready: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ready_only.models.len(), BUNDLED_MODELS.len());

    // What cannot be answered honestly says so.
    expect_status(
        c.model_statistics(ModelStatisticsRequest {
            name: "mlp".into(),
            version: String::new(),
        })
        .await,
        Code::Unimplemented,
        "/metrics",
    );
    expect_status(
        c.system_shared_memory_status(SystemSharedMemoryStatusRequest {
            name: String::new(),
        })
        .await,
        Code::Unimplemented,
        "shared memory",
    );
}

#[tokio::test]
async fn health_follows_the_catalog() {
    let mut h = HealthClient::new(connect(&server().1).await);
    let check = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    for service in [
        "",
        "inference.GRPCInferenceService",
        "mlp",
        "mlp:1",
        "silero_vad",
    ] {
        let status = h.check(check(service)).await.unwrap().into_inner().status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service}");
    }
    expect_status(h.check(check("nope")).await, Code::NotFound, "nope");
    expect_status(h.check(check("mlp:7")).await, Code::NotFound, "mlp:7");
    let list = h
        .list(HealthListRequest {})
        .await
        .unwrap()
        .into_inner()
        .statuses;
    for service in [
        "",
        "inference.GRPCInferenceService",
        "mlp",
        "mlp:1",
        "typed_ops:1",
    ] {
        assert_eq!(
            list[service].status,
            ServingStatus::Serving as i32,
            "{service}"
        );
    }
    let mut watch = h.watch(check("mlp")).await.unwrap().into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    let mut unknown = h.watch(check("nope")).await.unwrap().into_inner();
    assert_eq!(
        unknown.message().await.unwrap().unwrap().status,
        ServingStatus::ServiceUnknown as i32
    );
}

#[tokio::test]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut r = ServerReflectionClient::new(connect(&server().1).await);
    let ask = |request: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut answers = r
        .server_reflection_info(tokio_stream::iter(vec![
            ask(MessageRequest::ListServices(String::new())),
            ask(MessageRequest::FileContainingSymbol(
                "inference.GRPCInferenceService".into(),
            )),
        ]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("not a service list")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in [
        "inference.GRPCInferenceService",
        "streamserve.speech.v1.Speech",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&service.to_string()), "{names:?}");
    }
    let Some(MessageResponse::FileDescriptorResponse(files)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("no file descriptors")
    };
    assert!(!files.file_descriptor_proto.is_empty());
}
