//! What the server refuses and how it stops: a precise status for each class of bad request,
//! the message size and body memory limits, gRPC turned off, and streams ended on shutdown.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use streamserve::api::grpc::proto::health::health_check_response::ServingStatus;
use streamserve::api::grpc::proto::health::health_client::HealthClient;
use streamserve::api::grpc::proto::health::HealthCheckRequest;

use super::*;

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
    use tokio::io::AsyncWriteExt;

    let running = start_running(&repo().join("models"), |config| {
        config.max_body_memory_mb = 1;
        config.min_body_bytes_per_sec = 0;
        config.body_timeout_secs = 60;
    });
    let endpoint = format!("http://{}", running.grpc_addr.unwrap());
    let mut c = GrpcInferenceServiceClient::new(connect(&endpoint).await);
    // 2 MiB of floats: within the message size limit (64 MiB), but larger than the whole 1 MiB
    // memory bound, so it could never be read: RESOURCE_EXHAUSTED naming the bound, not
    // UNAVAILABLE, which a client would retry for ever.
    let big = features(5, 2048);
    expect_status(
        c.model_infer(mlp_raw(&big)).await,
        Code::ResourceExhausted,
        "--max-body-memory-mb",
    );
    // A REST upload that has sent 961 KiB of its 1000 KiB holds the whole bound (64 KiB
    // steps) while the rest is awaited: a message that fits the bound waits its turn.
    let mut holder = tokio::net::TcpStream::connect(running.addr).await.unwrap();
    let head = format!(
        "POST /v1/models/silero_vad/segments HTTP/1.1\r\nHost: {}\r\nContent-Type: audio/wav\r\nContent-Length: {}\r\n\r\n",
        running.addr,
        1000 * 1024
    );
    holder.write_all(head.as_bytes()).await.unwrap();
    holder.write_all(&vec![0u8; 961 * 1024]).await.unwrap();
    let small = features(6, 2);
    let mut refused = None;
    // The holder's bytes reach the server's reader in the time a busy CI machine takes (a
    // 2.5 s bound was once too short there): asked again until they have.
    for _ in 0..600 {
        match c.model_infer(mlp_raw(&small)).await {
            Err(status) => {
                refused = Some(status);
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    if refused.is_none() {
        // Never refused: say what the holder's connection got, if anything (an early answer
        // would mean it holds nothing).
        use tokio::io::AsyncReadExt;
        let mut answer = vec![0u8; 512];
        let read = tokio::time::timeout(Duration::from_millis(500), holder.read(&mut answer)).await;
        let got = match read {
            Ok(Ok(n)) => String::from_utf8_lossy(&answer[..n]).into_owned(),
            other => format!("{other:?}"),
        };
        panic!("not refused while the holder held the bound; the holder got: {got}");
    }
    expect_status::<()>(
        Err(refused.expect("refused while the bound is full")),
        Code::Unavailable,
        "memory bound",
    );
    // The bound is given back when the holder goes: the same request is answered, on the
    // same connection.
    drop(holder);
    let mut answered = false;
    for _ in 0..50 {
        if c.model_infer(mlp_raw(&small)).await.is_ok() {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(answered, "memory is free again once the holder has gone");
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

/// An error quoting what the client sent (a shape of 3,000 dimensions, a 100,000-character
/// model or service name) keeps its real code: the message is cut, so that it fits the
/// metadata limits of gRPC clients (8 KiB soft, 16 KiB hard in C-core, which would answer
/// RESOURCE_EXHAUSTED in its place).
#[tokio::test]
async fn errors_quoting_long_client_text_keep_their_code() {
    use streamserve::error::MAX_GRPC_MESSAGE;

    /// The call failed with `code`, with a message cut to the limit that still begins with
    /// `start`.
    fn bounded<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, start: &str) {
        let status = result.expect_err("the call must fail");
        assert_eq!(status.code(), code, "{:.300}", status.message());
        let message = status.message();
        assert!(message.len() <= MAX_GRPC_MESSAGE, "{} bytes", message.len());
        assert!(message.starts_with(start), "{message:.300}");
    }

    let mut c = grpc().await;
    let x = features(8, 1);
    let mut many_dims = mlp_raw(&x[..1]);
    many_dims.inputs[0].shape = vec![1; 3000];
    bounded(c.model_infer(many_dims).await, Code::InvalidArgument, "");

    let name = "m".repeat(100_000);
    let mut long_name = mlp_raw(&x);
    long_name.model_name = name.clone();
    bounded(
        c.model_infer(long_name).await,
        Code::NotFound,
        "unknown model 'mmm",
    );
    bounded(
        c.model_ready(ModelReadyRequest {
            name: name.clone(),
            version: String::new(),
        })
        .await,
        Code::NotFound,
        "unknown model 'mmm",
    );
    bounded(
        c.model_metadata(ModelMetadataRequest {
            name: name.clone(),
            version: String::new(),
        })
        .await,
        Code::NotFound,
        "unknown model 'mmm",
    );
    bounded(
        c.model_config(ModelConfigRequest {
            name: name.clone(),
            version: String::new(),
        })
        .await,
        Code::NotFound,
        "unknown model 'mmm",
    );
    // health quotes the name cut to 200 characters.
    let mut h = HealthClient::new(connect(&server().1).await);
    bounded(
        h.check(HealthCheckRequest {
            service: "s\n".repeat(5_000),
        })
        .await,
        Code::NotFound,
        "unknown service 's\\ns\\n",
    );
    let status = h
        .check(HealthCheckRequest {
            service: "x".repeat(10_000),
        })
        .await
        .unwrap_err();
    assert!(status.message().len() < 300, "{}", status.message());
    assert!(
        status.message().ends_with("…[+9800 bytes]'"),
        "{}",
        status.message()
    );

    // The connection that carried them still serves.
    assert!(c.model_infer(mlp_raw(&x)).await.is_ok());
}
