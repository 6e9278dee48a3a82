//! The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`), `grpc.health.v1`
//! and server reflection, with a tonic client over a real socket against the real server on
//! the bundled models. Answers are checked against REST's for the same input: the two
//! protocols share every step after decoding.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use common::*;
use streamserve::api::grpc::proto::health::health_check_response::ServingStatus;
use streamserve::api::grpc::proto::health::health_client::HealthClient;
use streamserve::api::grpc::proto::health::{HealthCheckRequest, HealthListRequest};
use streamserve::api::grpc::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use streamserve::api::grpc::proto::inference::infer_parameter::ParameterChoice;
use streamserve::api::grpc::proto::inference::model_infer_request::{
    InferInputTensor, InferRequestedOutputTensor,
};
use streamserve::api::grpc::proto::inference::*;
use tonic::transport::Channel;
use tonic::Code;

type Client = GrpcInferenceServiceClient<Channel>;

/// The bundled server's HTTP base URL and gRPC endpoint.
fn server() -> &'static (String, String) {
    static SERVER: OnceLock<(String, String)> = OnceLock::new();
    SERVER.get_or_init(|| {
        let running = start_running(&repo().join("models"), |_| {});
        let grpc = running.grpc_addr.expect("gRPC is on by default");
        (format!("http://{}", running.addr), format!("http://{grpc}"))
    })
}

async fn connect(endpoint: &str) -> Channel {
    Channel::from_shared(endpoint.to_string())
        .unwrap()
        .connect()
        .await
        .expect("gRPC connects")
}

async fn grpc() -> Client {
    GrpcInferenceServiceClient::new(connect(&server().1).await)
}

fn raw_f32(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn tensor(
    name: &str,
    datatype: &str,
    shape: &[i64],
    contents: Option<InferTensorContents>,
) -> InferInputTensor {
    InferInputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape: shape.to_vec(),
        parameters: HashMap::new(),
        contents,
    }
}

/// An mlp request for `x` (rows of 256) in raw contents.
fn mlp_raw(x: &[f32]) -> ModelInferRequest {
    ModelInferRequest {
        model_name: "mlp".into(),
        inputs: vec![tensor(
            "features",
            "FP32",
            &[x.len() as i64 / 256, 256],
            None,
        )],
        raw_input_contents: vec![raw_f32(x)],
        ..Default::default()
    }
}

/// The same in typed contents.
fn mlp_typed(x: &[f32]) -> ModelInferRequest {
    let contents = InferTensorContents {
        fp32_contents: x.to_vec(),
        ..Default::default()
    };
    ModelInferRequest {
        model_name: "mlp".into(),
        inputs: vec![tensor(
            "features",
            "FP32",
            &[x.len() as i64 / 256, 256],
            Some(contents),
        )],
        ..Default::default()
    }
}

/// REST's answer for the same features: output name -> values.
async fn rest_mlp(x: &[f32]) -> HashMap<String, Vec<f32>> {
    let (status, body) = post(
        &client(),
        &format!("{}/v2/models/mlp/infer", server().0),
        &mlp_request(x),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    ["logits", "probabilities"]
        .into_iter()
        .map(|name| (name.to_string(), output_f32(&body, name)))
        .collect()
}

fn param(response: &ModelInferResponse, key: &str) -> ParameterChoice {
    response.parameters[key].parameter_choice.clone().unwrap()
}

/// The status of a call that must fail, with its message containing `needle`.
fn expect_status<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, needle: &str) {
    let status = result.expect_err("the call must fail");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "'{}' lacks '{needle}'",
        status.message()
    );
}

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
async fn raw_and_typed_inference_answer_what_rest_answers() {
    let mut c = grpc().await;
    let x = features(11, 3);
    let want = rest_mlp(&x).await;

    let mut request = mlp_raw(&x);
    request.id = "grpc-7".into();
    let answer = c.model_infer(request).await.unwrap();
    assert_eq!(answer.metadata().get("x-request-id").unwrap(), "grpc-7");
    let answer = answer.into_inner();
    assert_eq!(
        (answer.model_name.as_str(), answer.model_version.as_str()),
        ("mlp", "1")
    );
    assert_eq!(answer.id, "grpc-7");
    assert_eq!(
        param(&answer, "served_by"),
        ParameterChoice::StringParam("mlp:1".into())
    );
    assert_eq!(
        param(&answer, "degraded"),
        ParameterChoice::BoolParam(false)
    );
    let ParameterChoice::Int64Param(batch) = param(&answer, "batch_size") else {
        panic!("batch_size")
    };
    assert!(batch >= 3, "{batch}");
    assert!(matches!(
        param(&answer, "queue_time_us"),
        ParameterChoice::Int64Param(_)
    ));
    assert!(matches!(
        param(&answer, "compute_time_us"),
        ParameterChoice::Int64Param(_)
    ));
    // Raw in, raw out, in the model's output order.
    assert_eq!(answer.raw_output_contents.len(), 2);
    for (i, name) in ["logits", "probabilities"].into_iter().enumerate() {
        let output = &answer.outputs[i];
        assert_eq!(
            (output.name.as_str(), output.datatype.as_str()),
            (name, "FP32")
        );
        assert_eq!(output.shape, [3, 16]);
        assert!(output.contents.is_none());
        assert_close(&f32s(&answer.raw_output_contents[i]), &want[name], name);
    }

    // Typed in, typed out; the same numbers.
    let answer = c.model_infer(mlp_typed(&x)).await.unwrap().into_inner();
    assert!(answer.raw_output_contents.is_empty());
    assert_eq!(answer.id, "");
    for (i, name) in ["logits", "probabilities"].into_iter().enumerate() {
        let contents = answer.outputs[i].contents.as_ref().unwrap();
        assert_close(&contents.fp32_contents, &want[name], name);
    }
    // binary_data_output chooses the form explicitly.
    let mut request = mlp_typed(&x);
    request.parameters.insert(
        "binary_data_output".into(),
        InferParameter {
            parameter_choice: Some(ParameterChoice::BoolParam(true)),
        },
    );
    let answer = c.model_infer(request).await.unwrap().into_inner();
    assert_close(
        &f32s(&answer.raw_output_contents[0]),
        &want["logits"],
        "logits",
    );
}

#[tokio::test]
async fn every_datatype_of_typed_ops_travels_typed_and_raw() {
    let mut c = grpc().await;
    let a = vec![1i64, 2, 3, 4, -5, 6, 9007199254740993, 8];
    let b = vec![0.5f64, -1.0, 0.0, 2.0, 1.0, 1.0, 0.0, -0.25];
    let mask = vec![true, false, true, false, true, true, true, false];
    let typed = ModelInferRequest {
        model_name: "typed_ops".into(),
        inputs: vec![
            tensor(
                "a",
                "INT64",
                &[2, 4],
                Some(InferTensorContents {
                    int64_contents: a.clone(),
                    ..Default::default()
                }),
            ),
            tensor(
                "b",
                "FP64",
                &[2, 4],
                Some(InferTensorContents {
                    fp64_contents: b.clone(),
                    ..Default::default()
                }),
            ),
            tensor(
                "mask",
                "BOOL",
                &[2, 4],
                Some(InferTensorContents {
                    bool_contents: mask.clone(),
                    ..Default::default()
                }),
            ),
        ],
        ..Default::default()
    };
    let answer = c.model_infer(typed).await.unwrap().into_inner();
    let out = |name: &str| {
        let o = answer.outputs.iter().find(|o| o.name == name).unwrap();
        (o.datatype.clone(), o.contents.clone().unwrap())
    };
    let (dt, sum) = out("sum");
    assert_eq!(dt, "FP64");
    assert_eq!(
        sum.fp64_contents,
        [1.5, 1.0, 3.0, 6.0, -4.0, 7.0, 9007199254740992.0, 7.75]
    );
    let (dt, masked) = out("masked");
    assert_eq!(dt, "INT64");
    assert_eq!(
        masked.int64_contents,
        [1, 0, 3, 0, -5, 6, 9007199254740993, 0],
        "INT64 exactly"
    );
    let (dt, positive) = out("positive");
    assert_eq!(dt, "BOOL");
    assert_eq!(
        positive.bool_contents,
        [true, false, false, true, true, true, false, false]
    );
    let (dt, masked_i32) = out("masked_i32");
    assert_eq!(dt, "INT32");
    assert_eq!(masked_i32.int_contents, [1, 0, 3, 0, -5, 6, 1, 0]);

    // The same raw: little-endian, BOOL one byte each, and only the outputs asked for.
    let raw = ModelInferRequest {
        model_name: "typed_ops".into(),
        model_version: "1".into(),
        inputs: vec![
            tensor("a", "INT64", &[2, 4], None),
            tensor("b", "FP64", &[2, 4], None),
            tensor("mask", "BOOL", &[2, 4], None),
        ],
        raw_input_contents: vec![
            a.iter().flat_map(|v| v.to_le_bytes()).collect(),
            b.iter().flat_map(|v| v.to_le_bytes()).collect(),
            mask.iter().map(|&m| m as u8).collect(),
        ],
        outputs: vec![
            InferRequestedOutputTensor {
                name: "masked_i32".into(),
                parameters: HashMap::new(),
            },
            InferRequestedOutputTensor {
                name: "positive".into(),
                parameters: HashMap::new(),
            },
        ],
        ..Default::default()
    };
    let answer = c.model_infer(raw).await.unwrap().into_inner();
    let names: Vec<&str> = answer.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(
        names,
        ["masked_i32", "positive"],
        "the outputs asked for, in that order"
    );
    let ints: Vec<i32> = answer.raw_output_contents[0]
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(ints, [1, 0, 3, 0, -5, 6, 1, 0]);
    assert_eq!(answer.raw_output_contents[1], [1, 0, 0, 1, 1, 1, 0, 0]);
}

#[tokio::test]
async fn output_selection_and_version_pinning() {
    let mut c = grpc().await;
    let x = features(12, 1);
    let want = rest_mlp(&x).await;
    let mut request = mlp_raw(&x);
    request.model_version = "1".into();
    request.outputs = vec![InferRequestedOutputTensor {
        name: "probabilities".into(),
        parameters: HashMap::new(),
    }];
    let answer = c.model_infer(request).await.unwrap().into_inner();
    assert_eq!(answer.outputs.len(), 1);
    assert_eq!(answer.outputs[0].name, "probabilities");
    assert_eq!(answer.model_version, "1");
    assert_close(
        &f32s(&answer.raw_output_contents[0]),
        &want["probabilities"],
        "probabilities",
    );

    let mut request = mlp_raw(&x);
    request.model_version = "7".into();
    expect_status(
        c.model_infer(request).await,
        Code::NotFound,
        "no version '7'",
    );
    let mut request = mlp_raw(&x);
    request.outputs = vec![InferRequestedOutputTensor {
        name: "nope".into(),
        parameters: HashMap::new(),
    }];
    expect_status(
        c.model_infer(request).await,
        Code::InvalidArgument,
        "has no output 'nope'",
    );
}

#[tokio::test]
async fn a_stream_answers_in_order_and_a_bad_request_does_not_end_it() {
    let mut c = grpc().await;
    let (x1, x3) = (features(21, 2), features(23, 1));
    let (want1, want3) = (rest_mlp(&x1).await, rest_mlp(&x3).await);
    let mut first = mlp_raw(&x1);
    first.id = "one".into();
    let mut bad = mlp_raw(&x3[..255]);
    bad.id = "two".into();
    bad.inputs[0].shape = vec![1, 255];
    let mut third = mlp_raw(&x3);
    third.id = "three".into();
    let requests = tokio_stream::iter(vec![first, bad, third]);
    let mut answers = c.model_stream_infer(requests).await.unwrap().into_inner();

    let one = answers.message().await.unwrap().unwrap();
    assert_eq!(one.error_message, "");
    let one = one.infer_response.unwrap();
    assert_eq!(one.id, "one");
    assert_close(
        &f32s(&one.raw_output_contents[0]),
        &want1["logits"],
        "first",
    );

    let two = answers.message().await.unwrap().unwrap();
    assert!(
        two.error_message.contains("dimension 1 must be 256"),
        "{}",
        two.error_message
    );
    assert_eq!(
        two.infer_response.unwrap().id,
        "two",
        "the error names its request"
    );

    let three = answers.message().await.unwrap().unwrap();
    assert_eq!(three.error_message, "");
    let three = three.infer_response.unwrap();
    assert_eq!(three.id, "three");
    assert_close(
        &f32s(&three.raw_output_contents[1]),
        &want3["probabilities"],
        "third",
    );
    // The client closed its side: the stream ends cleanly.
    assert!(answers.message().await.unwrap().is_none());
}

#[tokio::test]
async fn a_stream_of_many_requests_batches_them() {
    let mut c = grpc().await;
    // A stream keeps many requests in flight, so they share model calls; a round of 40 that
    // happened to run one by one is tried again, up to five rounds.
    let mut shared = 0;
    for round in 0..5u64 {
        let inputs: Vec<Vec<f32>> = (0..40).map(|i| features(100 + 40 * round + i, 1)).collect();
        let requests: Vec<ModelInferRequest> = inputs
            .iter()
            .enumerate()
            .map(|(i, x)| {
                let mut r = mlp_raw(x);
                r.id = i.to_string();
                r
            })
            .collect();
        let mut answers = c
            .model_stream_infer(tokio_stream::iter(requests))
            .await
            .unwrap()
            .into_inner();
        for (i, x) in inputs.iter().enumerate() {
            let answer = answers.message().await.unwrap().unwrap();
            assert_eq!(answer.error_message, "");
            let answer = answer.infer_response.unwrap();
            assert_eq!(answer.id, i.to_string(), "in request order");
            if let ParameterChoice::Int64Param(rows) = param(&answer, "batch_size") {
                shared += usize::from(rows > 1);
            }
            if i % 10 == 0 {
                let want = rest_mlp(x).await;
                assert_close(
                    &f32s(&answer.raw_output_contents[0]),
                    &want["logits"],
                    "logits",
                );
            }
        }
        assert!(answers.message().await.unwrap().is_none());
        if shared > 0 {
            break;
        }
    }
    assert!(shared > 0, "no streamed request shared a model call");
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

/// Every class of bad request gets its precise status, while a well-behaved client on its own
/// connection is answered throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_precise_codes_and_others_are_served_meanwhile() {
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let good = {
        let (stop, served) = (stop.clone(), served.clone());
        tokio::spawn(async move {
            let mut c = grpc().await;
            let x = features(5, 1);
            while !stop.load(Ordering::Relaxed) {
                let answer = c
                    .model_infer(mlp_raw(&x))
                    .await
                    .expect("a good request is served");
                assert_eq!(answer.into_inner().outputs.len(), 2);
                served.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let mut c = grpc().await;
    let x = features(6, 1);

    let mut wrong_shape = mlp_raw(&features(6, 1)[..255]);
    wrong_shape.inputs[0].shape = vec![1, 255];
    expect_status(
        c.model_infer(wrong_shape).await,
        Code::InvalidArgument,
        "dimension 1 must be 256",
    );

    let mut wrong_type = mlp_raw(&x);
    wrong_type.inputs[0].datatype = "FP64".into();
    wrong_type.raw_input_contents = vec![vec![0; 256 * 8]];
    expect_status(
        c.model_infer(wrong_type).await,
        Code::InvalidArgument,
        "must be FP32, got FP64",
    );

    let mut wrong_field = mlp_typed(&x);
    let contents = wrong_field.inputs[0].contents.as_mut().unwrap();
    contents.int_contents = vec![1; 256];
    contents.fp32_contents.clear();
    expect_status(
        c.model_infer(wrong_field).await,
        Code::InvalidArgument,
        "go in fp32_contents, not int_contents",
    );

    let mut short = mlp_raw(&x);
    short.raw_input_contents[0].truncate(1000);
    expect_status(
        c.model_infer(short).await,
        Code::InvalidArgument,
        "raw_input_contents has 1000 bytes, but shape [1, 256] of FP32 needs 1024",
    );

    let mut unknown = mlp_raw(&x);
    unknown.model_name = "nope".into();
    expect_status(
        c.model_infer(unknown).await,
        Code::NotFound,
        "unknown model 'nope'",
    );
    let mut unknown_version = mlp_raw(&x);
    unknown_version.model_version = "2".into();
    expect_status(
        c.model_infer(unknown_version).await,
        Code::NotFound,
        "no version '2'",
    );

    let missing = ModelInferRequest {
        model_name: "typed_ops".into(),
        inputs: vec![
            tensor(
                "a",
                "INT64",
                &[1, 4],
                Some(InferTensorContents {
                    int64_contents: vec![1; 4],
                    ..Default::default()
                }),
            ),
            tensor(
                "b",
                "FP64",
                &[1, 4],
                Some(InferTensorContents {
                    fp64_contents: vec![1.0; 4],
                    ..Default::default()
                }),
            ),
        ],
        ..Default::default()
    };
    expect_status(
        c.model_infer(missing).await,
        Code::InvalidArgument,
        "needs input 'mask'",
    );

    let mut extra = mlp_raw(&x);
    extra.inputs.push(tensor("other", "FP32", &[1], None));
    extra.raw_input_contents.push(raw_f32(&[1.0]));
    expect_status(
        c.model_infer(extra).await,
        Code::InvalidArgument,
        "has no input 'other'",
    );

    let too_many_rows = mlp_raw(&features(7, 65));
    expect_status(
        c.model_infer(too_many_rows).await,
        Code::InvalidArgument,
        "exceeds model 'mlp' max_batch_size of 64",
    );

    let mut nan = x.clone();
    nan[3] = f32::NAN;
    expect_status(
        c.model_infer(mlp_raw(&nan)).await,
        Code::InvalidArgument,
        "element 3 is NaN",
    );

    let mut sequence = mlp_raw(&x);
    sequence.parameters.insert(
        "sequence_id".into(),
        InferParameter {
            parameter_choice: Some(ParameterChoice::Uint64Param(9)),
        },
    );
    expect_status(
        c.model_infer(sequence).await,
        Code::InvalidArgument,
        "served on ModelStreamInfer",
    );

    // The connection that carried them still serves.
    assert_eq!(
        c.model_infer(mlp_raw(&x))
            .await
            .unwrap()
            .into_inner()
            .outputs
            .len(),
        2
    );

    stop.store(true, Ordering::Relaxed);
    good.await.unwrap();
    assert!(
        served.load(Ordering::Relaxed) > 0,
        "the well-behaved client was answered"
    );
}

#[tokio::test]
async fn messages_over_the_limit_are_resource_exhausted() {
    let running = start_running(&repo().join("models"), |config| {
        config.grpc_max_message_bytes = Some(64 * 1024);
    });
    let endpoint = format!("http://{}", running.grpc_addr.unwrap());
    let mut c = GrpcInferenceServiceClient::new(connect(&endpoint).await);
    let small = features(1, 2);
    assert!(c.model_infer(mlp_raw(&small)).await.is_ok());
    let big = features(2, 64); // 64 KiB of floats and the envelope
    expect_status(
        c.model_infer(mlp_raw(&big)).await,
        Code::ResourceExhausted,
        "too large",
    );
    // The connection survives it.
    assert!(c.model_infer(mlp_raw(&small)).await.is_ok());
    // In a stream, the answers before it come, then the stream ends with the same code.
    let mut answers = c
        .model_stream_infer(tokio_stream::iter(vec![
            mlp_raw(&small),
            mlp_raw(&big),
            mlp_raw(&small),
        ]))
        .await
        .unwrap()
        .into_inner();
    let first = answers.message().await.unwrap().unwrap();
    assert_eq!(first.error_message, "");
    expect_status(
        answers.message().await,
        Code::ResourceExhausted,
        "too large",
    );
}

#[tokio::test]
async fn messages_count_against_the_body_memory_bound_as_rest_bodies_do() {
    let running = start_running(&repo().join("models"), |config| {
        config.max_body_memory_mb = 1;
    });
    let endpoint = format!("http://{}", running.grpc_addr.unwrap());
    let mut c = GrpcInferenceServiceClient::new(connect(&endpoint).await);
    // 2 MiB of floats: within the message size limit (64 MiB), beyond the 1 MiB memory bound,
    // refused before it is decoded (it would also be too many rows for mlp).
    let big = features(5, 2048);
    expect_status(
        c.model_infer(mlp_raw(&big)).await,
        Code::Unavailable,
        "memory bound",
    );
    // The bound is given back: a request that fits is answered, on the same connection.
    let small = features(6, 2);
    assert!(c.model_infer(mlp_raw(&small)).await.is_ok());
}

#[tokio::test]
async fn grpc_calls_are_counted_with_their_protocol() {
    let mut c = grpc().await;
    let mut request = mlp_raw(&features(31, 1));
    request.model_name = "mlp_small".into();
    request.inputs[0].shape = vec![1, 256];
    let _ = c.model_infer(request).await;
    let text = metrics_text(&client(), &server().0).await;
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("streamserve_requests_total{")
                && l.contains("model=\"mlp_small\"")
                && l.contains("protocol=\"grpc\"")
        })
        .unwrap_or_else(|| panic!("no gRPC series for mlp_small in:\n{text}"));
    assert!(line.contains("status=\"200\""), "{line}");
    assert!(text.contains("streamserve_request_duration_seconds_count{model=\"mlp_small\",version=\"1\",protocol=\"grpc\"}"), "{text}");
}

#[tokio::test]
async fn grpc_can_be_turned_off() {
    let running = start_running(&repo().join("models"), |config| {
        config.grpc_port = Some(streamserve::config::GrpcPort::Off);
    });
    assert_eq!(running.grpc_addr, None);
    let (status, _) = get(
        &client(),
        &format!("http://{}/v2/health/ready", running.addr),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_streams_after_their_answers_and_stops_listening() {
    let running = start_running(&repo().join("models"), |config| config.drain_secs = 5);
    let endpoint = format!("http://{}", running.grpc_addr.unwrap());
    let mut c = GrpcInferenceServiceClient::new(connect(&endpoint).await);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut answers = c
        .model_stream_infer(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(mlp_raw(&features(41, 1))).await.unwrap();
    assert_eq!(answers.message().await.unwrap().unwrap().error_message, "");
    let mut h = HealthClient::new(connect(&endpoint).await);
    let mut watch = h
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );

    let stopping = tokio::spawn(async move { running.shutdown().await });
    // The open stream is told to go elsewhere; health says so first.
    expect_status(answers.message().await, Code::Unavailable, "shutting down");
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("shutdown ends")
        .unwrap();
    drop(tx);
    assert!(
        Channel::from_shared(endpoint)
            .unwrap()
            .connect()
            .await
            .is_err(),
        "the gRPC port is closed"
    );
}
