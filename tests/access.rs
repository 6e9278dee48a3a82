//! Access control over real sockets: API keys for REST and WebSocket streams (missing, wrong,
//! expired, outside their models: 401 / 403 without a hint of which keys exist), per-key rate
//! and stream limits (429 with Retry-After, or a stream's 1013 after `start`, other keys
//! unaffected), keys reloaded live, and
//! per-address limits that forwarding headers cannot dodge unless they come from a trusted
//! proxy. Keys never appear in metrics.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::stream_client::first_answer;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

struct Keys {
    file: PathBuf,
    full: String,
    small_only: String,
    expired: String,
    pinned: String,
    one_stream: String,
}

fn entry(name: &str, key: &str, extra: &str) -> String {
    let sha = hex::encode(streamserve::access::keys::hash(key));
    format!("[[keys]]\nname = \"{name}\"\nsha256 = \"{sha}\"\n{extra}\n\n")
}

fn write_keys() -> Keys {
    let new = || streamserve::access::keys::new_key().unwrap();
    let keys = Keys {
        file: model_dir("").join("keys.toml"),
        full: new(),
        small_only: new(),
        expired: new(),
        pinned: new(),
        one_stream: new(),
    };
    let text = [
        entry("full", &keys.full, "models = [\"*\"]"),
        entry(
            "small-only",
            &keys.small_only,
            "models = [\"mlp_small\"]\nrequests_per_sec = 1\nburst = 2",
        ),
        entry(
            "expired",
            &keys.expired,
            "models = [\"*\"]\nexpires = \"2020-01-01T00:00:00Z\"",
        ),
        entry("pinned", &keys.pinned, "models = [\"mlp:2\"]"),
        entry(
            "one-stream",
            &keys.one_stream,
            "models = [\"silero_vad\"]\nmax_streams = 1",
        ),
    ]
    .concat();
    std::fs::write(&keys.file, text).unwrap();
    keys
}

async fn call(c: &reqwest::Client, url: &str, model: &str, key: Option<&str>) -> reqwest::Response {
    let mut request = c
        .post(format!("{url}/v2/models/{model}/infer"))
        .json(&mlp_request(&features(1, 1)));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request.send().await.unwrap()
}

async fn status_and_error(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap();
    (
        status,
        body["error"].as_str().unwrap_or_default().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_decide_who_calls_which_model_and_how_often() {
    let keys = write_keys();
    let file = keys.file.clone();
    let url = start(&repo().join("models"), |c| c.api_keys = Some(file));
    let c = client();

    // No key, a wrong key, an expired one: 401, saying nothing of which keys exist.
    let response = call(&c, &url, "mlp", None).await;
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    let (status, error) = status_and_error(response).await;
    assert_eq!(status, 401);
    assert!(error.contains("Authorization: Bearer"), "{error}");
    let wrong = streamserve::access::keys::new_key().unwrap();
    let (status, error) = status_and_error(call(&c, &url, "mlp", Some(&wrong)).await).await;
    assert_eq!((status, error.as_str()), (401, "the API key is not valid"));
    let (status, error) = status_and_error(call(&c, &url, "mlp", Some(&keys.expired)).await).await;
    assert_eq!((status, error.as_str()), (401, "the API key has expired"));

    // Outside the key's models, or its version: 403.
    let (status, error) =
        status_and_error(call(&c, &url, "mlp", Some(&keys.small_only)).await).await;
    assert_eq!(status, 403, "{error}");
    assert!(error.contains("model 'mlp'"), "{error}");
    let (status, error) = status_and_error(call(&c, &url, "mlp", Some(&keys.pinned)).await).await;
    assert_eq!(status, 403, "{error}");
    assert!(error.contains("version '1'"), "{error}");

    // Within them: 200.
    let (status, _) = status_and_error(call(&c, &url, "mlp", Some(&keys.full)).await).await;
    assert_eq!(status, 200);

    // Over its rate (1/s, burst 2): 429 with Retry-After, while another key is unaffected.
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let response = call(&c, &url, "mlp_small", Some(&keys.small_only)).await;
        if response.status() == 429 {
            assert!(response.headers().contains_key("retry-after"));
        }
        statuses.push(status_and_error(response).await);
    }
    assert_eq!(statuses[0].0, 200);
    assert_eq!(statuses[1].0, 200);
    assert_eq!(statuses[2].0, 429, "{:?}", statuses[2]);
    assert!(statuses[2].1.contains("'small-only'") && statuses[2].1.contains("1 requests/s"));
    for _ in 0..5 {
        let (status, _) =
            status_and_error(call(&c, &url, "mlp_small", Some(&keys.full)).await).await;
        assert_eq!(status, 200);
    }

    // Refusals are counted by key name; no key appears in the metrics.
    let metrics = metrics_text(&c, &url).await;
    assert!(metrics
        .contains("streamserve_access_refused_total{key=\"small-only\",reason=\"rate_limited\"}"));
    assert!(
        metrics.contains("streamserve_access_refused_total{key=\"-\",reason=\"unauthenticated\"}")
    );
    for key in [&keys.full, &keys.small_only, &keys.expired, &wrong] {
        assert!(!metrics.contains(key.as_str()));
    }
}

fn ws_request(
    url: &str,
    model: &str,
    key: Option<&str>,
    protocols: Option<&str>,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let ws_url = format!("{}/v1/streams/{model}", url.replace("http://", "ws://"));
    let mut request = ws_url.into_client_request().unwrap();
    if let Some(key) = key {
        request.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {key}")).unwrap(),
        );
    }
    if let Some(protocols) = protocols {
        request.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_str(protocols).unwrap(),
        );
    }
    request
}

fn refused_with(
    result: Result<impl std::fmt::Debug, tokio_tungstenite::tungstenite::Error>,
) -> u16 {
    match result {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        other => panic!("expected an HTTP refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_need_a_key_in_a_header_or_a_subprotocol_and_keep_to_their_limit() {
    let keys = write_keys();
    let file = keys.file.clone();
    let url = start(&repo().join("models"), |c| c.api_keys = Some(file));

    let anonymous =
        tokio_tungstenite::connect_async(ws_request(&url, "silero_vad", None, None)).await;
    assert_eq!(refused_with(anonymous), 401);
    let outside = ws_request(&url, "silero_vad", Some(&keys.small_only), None);
    assert_eq!(
        refused_with(tokio_tungstenite::connect_async(outside).await),
        403
    );

    // A browser's way: the key as a subprotocol, beside `streamserve`, which comes back.
    let protocols = format!("streamserve, bearer.{}", keys.one_stream);
    let request = ws_request(&url, "silero_vad", None, Some(&protocols));
    let (mut first, response) = tokio_tungstenite::connect_async(request)
        .await
        .expect("upgrade");
    assert_eq!(response.headers()["sec-websocket-protocol"], "streamserve");
    assert_eq!(first_answer(&mut first).await, Ok("started".into()));

    // One stream at a time for this key: a second is refused once its `start` says it is new
    // (1013, naming the limit), counted as the key's refusal.
    let second = ws_request(&url, "silero_vad", Some(&keys.one_stream), None);
    let (mut second, _) = tokio_tungstenite::connect_async(second)
        .await
        .expect("upgrade");
    let (code, reason) = first_answer(&mut second).await.unwrap_err();
    assert_eq!(code, CloseCode::Again, "{reason}");
    assert!(reason.contains("1 open streams"), "{reason}");
    let metrics = metrics_text(&client(), &url).await;
    let refused = "streamserve_access_refused_total{key=\"one-stream\",reason=\"rate_limited\"}";
    assert!(sample(&metrics, refused).unwrap_or(0.0) >= 1.0, "{metrics}");
    // Another key is unaffected.
    let other = ws_request(&url, "silero_vad", Some(&keys.full), None);
    let (mut other, _) = tokio_tungstenite::connect_async(other)
        .await
        .expect("upgrade");
    assert_eq!(first_answer(&mut other).await, Ok("started".into()));
    drop(other);

    // Once the first stream ends, the key may open another at once.
    first
        .send(Message::text(json!({"type": "end"}).to_string()))
        .await
        .unwrap();
    while let Some(Ok(message)) = first.next().await {
        if let Message::Close(frame) = message {
            assert_eq!(frame.map(|f| f.code), Some(CloseCode::Normal));
            break;
        }
    }
    let again = ws_request(&url, "silero_vad", Some(&keys.one_stream), None);
    let (mut again, _) = tokio_tungstenite::connect_async(again)
        .await
        .expect("upgrade");
    assert_eq!(first_answer(&mut again).await, Ok("started".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_reload_when_their_file_changes() {
    let keys = write_keys();
    let file = keys.file.clone();
    let url = start(&repo().join("models"), |c| c.api_keys = Some(file));
    let c = client();
    let newcomer = streamserve::access::keys::new_key().unwrap();
    let (status, _) = status_and_error(call(&c, &url, "mlp", Some(&newcomer)).await).await;
    assert_eq!(status, 401);
    // Modification times can be coarse: make sure the new file's differs.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut text = std::fs::read_to_string(&keys.file).unwrap();
    text.push_str(&entry("newcomer", &newcomer, "models = [\"mlp\"]"));
    std::fs::write(&keys.file, text).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = status_and_error(call(&c, &url, "mlp", Some(&newcomer)).await).await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the new key was not picked up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A file that no longer parses leaves the keys in force.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    std::fs::write(&keys.file, "[[keys]]\nname = ").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, _) = status_and_error(call(&c, &url, "mlp", Some(&newcomer)).await).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_address_limits_ignore_forwarding_headers_from_untrusted_peers() {
    let c = client();
    let spoof = |c: &reqwest::Client, url: &str, n: usize| {
        c.post(format!("{url}/v2/models/mlp/infer"))
            .header("x-forwarded-for", format!("198.51.100.{n}"))
            .header("fly-client-ip", format!("203.0.113.{n}"))
            .json(&mlp_request(&features(1, 1)))
            .send()
    };
    // Without a trusted proxy, every request is the peer's (127.0.0.1), whatever it claims.
    let url = start(&repo().join("models"), |c| c.client_requests_per_sec = 1);
    let mut statuses = Vec::new();
    for n in 0..3 {
        statuses.push(spoof(&c, &url, n).await.unwrap().status().as_u16());
    }
    assert_eq!(statuses, vec![200, 200, 429]);
    // Behind a trusted proxy (127.0.0.1 here), its headers name the client.
    let url = start(&repo().join("models"), |c| {
        c.client_requests_per_sec = 1;
        c.trusted_proxies = Some("127.0.0.1".into());
    });
    for n in 0..6 {
        assert_eq!(spoof(&c, &url, n).await.unwrap().status(), 200);
    }
    let health = c
        .get(format!("{url}/v2/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        health.status(),
        200,
        "health checks have no key and no limit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_pressure_a_low_priority_key_is_refused_while_a_normal_one_is_served() {
    let normal = streamserve::access::keys::new_key().unwrap();
    let low = streamserve::access::keys::new_key().unwrap();
    let dir = model_dir(&format!(
        r#"
        [[models]]
        name = "m"
        version = "1"
        file = "{{models}}/mlp_small/1/model.onnx"
        sha256 = "{MLP_SMALL_SHA}"
        max_batch_size = 1
        max_queue = 4
        "#
    ));
    let file = dir.join("keys.toml");
    std::fs::write(
        &file,
        entry("normal", &normal, "models = [\"m\"]")
            + &entry("batchy", &low, "models = [\"m\"]\npriority = \"low\""),
    )
    .unwrap();
    let url = start(&dir, |c| {
        c.api_keys = Some(file);
        c.admin_token = Some("admin".into());
    });
    let c = client();
    // Every batch takes 400 ms from now on, so requests pile up in the queue.
    let fault = c
        .post(format!("{url}/admin/models/m/faults"))
        .bearer_auth("admin")
        .json(&serde_json::json!({"fault": {"kind": "slow", "ms": 400}, "count": 20}))
        .send()
        .await
        .unwrap();
    assert_eq!(fault.status(), 200);
    let send = |key: &str| {
        let (c, url, key) = (c.clone(), url.clone(), key.to_string());
        tokio::spawn(async move {
            let response = call(&c, &url, "m", Some(&key)).await;
            status_and_error(response).await
        })
    };
    let running = send(&normal);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let queued = [send(&normal), send(&normal)];
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The queue is half full: the low-priority key yields, the normal one is still queued.
    let started = Instant::now();
    let (status, error) = send(&low).await.unwrap();
    assert_eq!(status, 429, "{error}");
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "refused at once"
    );
    let (status, _) = send(&normal).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(running.await.unwrap().0, 200);
    for q in queued {
        assert_eq!(q.await.unwrap().0, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_calls_need_a_key_in_their_metadata_too() {
    use streamserve::api::grpc::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
    use streamserve::api::grpc::proto::inference::model_infer_request::InferInputTensor;
    use streamserve::api::grpc::proto::inference::ModelInferRequest;
    use tonic::Code;

    let keys = write_keys();
    let file = keys.file.clone();
    let running = start_running(&repo().join("models"), |c| c.api_keys = Some(file));
    let endpoint = format!("http://{}", running.grpc_addr.expect("gRPC is on"));
    let channel = tonic::transport::Channel::from_shared(endpoint)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = GrpcInferenceServiceClient::new(channel);
    let infer = |model: &str, key: Option<&str>| {
        let x: Vec<u8> = features(1, 1)
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let request = ModelInferRequest {
            model_name: model.into(),
            inputs: vec![InferInputTensor {
                name: "features".into(),
                datatype: "FP32".into(),
                shape: vec![1, 256],
                ..Default::default()
            }],
            raw_input_contents: vec![x],
            ..Default::default()
        };
        with_key(request, key)
    };
    let code = |r: Result<tonic::Response<_>, tonic::Status>| {
        r.map(|_| Code::Ok).unwrap_or_else(|s| s.code())
    };
    assert_eq!(
        code(grpc.model_infer(infer("mlp", None)).await),
        Code::Unauthenticated
    );
    assert_eq!(
        code(grpc.model_infer(infer("mlp", Some(&keys.small_only))).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(grpc.model_infer(infer("mlp", Some(&keys.full))).await),
        Code::Ok
    );
    // Over its rate (burst 2): RESOURCE_EXHAUSTED with retry-after.
    let mut last = None;
    for _ in 0..3 {
        last = Some(
            grpc.model_infer(infer("mlp_small", Some(&keys.small_only)))
                .await,
        );
    }
    let refused = last.unwrap().unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.metadata().get("retry-after").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_hashed_under_the_servers_secret_work_and_the_secret_is_needed() {
    let dir = model_dir("");
    let secret = dir.join("secret");
    std::fs::write(&secret, "a server secret of some length\n").unwrap();
    let key = streamserve::access::keys::new_key().unwrap();
    let keyed = hex::encode(streamserve::access::keys::keyed_hash(
        b"a server secret of some length",
        &key,
    ));
    let file = dir.join("keys.toml");
    std::fs::write(
        &file,
        format!("[[keys]]\nname = \"keyed\"\nhmac_sha256 = \"{keyed}\"\nmodels = [\"*\"]\n"),
    )
    .unwrap();
    let (keys_file, secret_file) = (file.clone(), secret.clone());
    let url = start(&repo().join("models"), |c| {
        c.api_keys = Some(keys_file);
        c.api_key_secret_file = Some(secret_file);
    });
    let c = client();
    let (status, _) = status_and_error(call(&c, &url, "mlp", Some(&key)).await).await;
    assert_eq!(status, 200);
    // The plain SHA-256 of the key is not what the file holds: a file without the secret
    // gives nothing to match against.
    let (status, _) = status_and_error(call(&c, &url, "mlp", Some(&keyed)).await).await;
    assert_eq!(status, 401);
    // Without the secret, such a file is refused at start-up, naming the flag.
    let config = streamserve::config::Config {
        host: "127.0.0.1".into(),
        port: 0,
        api_keys: Some(file),
        ..streamserve::config::Config::default()
    };
    let refused = streamserve::access::Access::from_config(&config)
        .err()
        .unwrap();
    assert!(refused.contains("--api-key-secret-file"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_speech_streams_need_a_key_and_keep_to_its_stream_limit() {
    use std::collections::HashMap;
    use streamserve::api::grpc::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
    use streamserve::api::grpc::proto::inference::infer_parameter::ParameterChoice;
    use streamserve::api::grpc::proto::inference::{InferParameter, ModelInferRequest};
    use streamserve::api::grpc::proto::speech::speech_client::SpeechClient;
    use streamserve::api::grpc::proto::speech::SegmentsRequest;
    use tonic::Code;

    let keys = write_keys();
    let file = keys.file.clone();
    let running = start_running(&repo().join("models"), |c| c.api_keys = Some(file));
    let endpoint = format!("http://{}", running.grpc_addr.expect("gRPC is on"));
    let channel = tonic::transport::Channel::from_shared(endpoint)
        .unwrap()
        .connect()
        .await
        .unwrap();
    // Speech/Segments: a key, and one allowed that model.
    let wav = std::fs::read(repo().join("tests/audio/two_phrases_16k.wav")).unwrap();
    let segments = |key: Option<&str>| {
        with_key(
            SegmentsRequest {
                model: "silero_vad".into(),
                wav: wav.clone(),
                vad: None,
            },
            key,
        )
    };
    let mut speech = SpeechClient::new(channel.clone());
    let code = |r: Result<tonic::Response<_>, tonic::Status>| {
        r.map(|_| Code::Ok).unwrap_or_else(|s| s.code())
    };
    assert_eq!(
        code(speech.segments(segments(None)).await),
        Code::Unauthenticated
    );
    assert_eq!(
        code(speech.segments(segments(Some(&keys.small_only))).await),
        Code::PermissionDenied
    );
    // Read to its end: the call holds the key's one stream place until then.
    let mut events = speech
        .segments(segments(Some(&keys.one_stream)))
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(event) = events.message().await.unwrap() {
        last = event.event;
    }
    assert!(matches!(
        last,
        Some(streamserve::api::grpc::proto::speech::speech_event::Event::Summary(_))
    ));

    // Sequences on ModelStreamInfer: the call's key; a key of one stream runs one at a time.
    let step = |id: i64| {
        let mut parameters = HashMap::new();
        let p = |c| InferParameter {
            parameter_choice: Some(c),
        };
        parameters.insert(
            "sequence_id".to_string(),
            p(ParameterChoice::Int64Param(id)),
        );
        parameters.insert(
            "sequence_start".to_string(),
            p(ParameterChoice::BoolParam(true)),
        );
        ModelInferRequest {
            model_name: "silero_vad".into(),
            parameters,
            ..Default::default()
        }
    };
    let mut grpc = GrpcInferenceServiceClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let requests = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut answers = grpc
        .model_stream_infer(with_key(requests, Some(&keys.one_stream)))
        .await
        .unwrap()
        .into_inner();
    tx.send(step(1)).await.unwrap();
    let first = answers.message().await.unwrap().unwrap();
    assert_eq!(first.error_message, "");
    tx.send(step(2)).await.unwrap();
    let second = answers.message().await.unwrap().unwrap();
    assert!(
        second.error_message.contains("stream"),
        "{}",
        second.error_message
    );
    assert_ne!(second.error_message, "");

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let requests = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut answers = grpc
        .model_stream_infer(with_key(requests, Some(&keys.small_only)))
        .await
        .unwrap()
        .into_inner();
    tx.send(step(1)).await.unwrap();
    let refused = answers.message().await.unwrap().unwrap();
    assert!(
        refused.error_message.contains("silero_vad"),
        "{}",
        refused.error_message
    );
}

/// A gRPC request carrying `key` (if any) as `authorization: Bearer <key>`.
fn with_key<T>(message: T, key: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(key) = key {
        let value = format!("Bearer {key}").parse().unwrap();
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// A WebSocket frame of more audio than the key's `audio_secs_per_min` ever lets through
/// closes the stream with 1008 (policy) saying the most there is, not 1013 (try again later):
/// no retry of it can pass. Within the limit, audio is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frame_of_more_audio_than_a_key_ever_lets_through_closes_with_policy() {
    let key = streamserve::access::keys::new_key().unwrap();
    let file = model_dir("").join("keys.toml");
    let limits = "models = [\"silero_vad\"]\naudio_secs_per_min = 1";
    std::fs::write(&file, entry("one-second", &key, limits)).unwrap();
    let url = start(&repo().join("models"), |c| c.api_keys = Some(file));
    let open = || async {
        let request = ws_request(&url, "silero_vad", Some(&key), None);
        let (mut ws, _) = tokio_tungstenite::connect_async(request)
            .await
            .expect("upgrade");
        assert_eq!(first_answer(&mut ws).await, Ok("started".into()));
        ws
    };
    let close_of = |mut ws: common::stream_client::Socket| async move {
        loop {
            let next = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
            match next.expect("closed within 10 s") {
                Some(Ok(Message::Close(Some(frame)))) => {
                    return (frame.code, frame.reason.to_string())
                }
                Some(Ok(_)) => {}
                other => panic!("no close frame: {other:?}"),
            }
        }
    };
    // 1.5 s of 16 kHz PCM16 in one frame.
    let mut ws = open().await;
    ws.send(Message::binary(vec![0u8; 48_000])).await.unwrap();
    let (code, reason) = close_of(ws).await;
    assert_eq!(code, CloseCode::Policy, "{reason}");
    assert!(reason.contains("at most 1 s"), "{reason}");
    // Half a second fits; another second within the minute does not, yet: 1013.
    let mut ws = open().await;
    ws.send(Message::binary(vec![0u8; 16_000])).await.unwrap();
    ws.send(Message::binary(vec![0u8; 32_000])).await.unwrap();
    let (code, reason) = close_of(ws).await;
    assert_eq!(code, CloseCode::Again, "{reason}");
}
