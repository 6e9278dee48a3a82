//! Access control's edges over real sockets: refusal series at 0 for every key before any
//! refusal, limits of 0 and keys files with no keys refused (at start, and on a reload, which
//! keeps the keys in force), a rewrite read by its contents whatever its modification time, a
//! key edited while it holds its streams still holding them, the Bearer scheme in any case,
//! client text escaped in refusals, per-address limits that an IPv6 client or a port in a
//! forwarding header cannot dodge, metadata that loads a cold model only for a caller
//! whose key may call it, and a request more than a key's rows/s or audio per minute ever
//! lets through refused as such (400), every refusal of those limits counted.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::stream_client::first_answer;
use common::*;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

fn new_key() -> String {
    streamserve::access::keys::new_key().unwrap()
}

fn entry(name: &str, key: &str, extra: &str) -> String {
    let sha = hex::encode(streamserve::access::keys::hash(key));
    format!("[[keys]]\nname = \"{name}\"\nsha256 = \"{sha}\"\n{extra}\n\n")
}

/// A keys file holding `text`, in a directory of its own.
fn keys_file(text: &str) -> PathBuf {
    let file = model_dir("").join("keys.toml");
    std::fs::write(&file, text).unwrap();
    file
}

/// What `Access::from_config` says of a keys file holding `text`.
fn refusal_at_start(text: &str) -> String {
    let config = streamserve::config::Config {
        host: "127.0.0.1".into(),
        port: 0,
        api_keys: Some(keys_file(text)),
        ..streamserve::config::Config::default()
    };
    match streamserve::access::Access::from_config(&config) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(refused) => refused,
    }
}

/// A REST inference on `model` with `authorization` as given: its status and error.
async fn call_with(
    c: &reqwest::Client,
    url: &str,
    model: &str,
    authorization: Option<&str>,
) -> (u16, String) {
    let mut request = c
        .post(format!("{url}/v2/models/{model}/infer"))
        .json(&mlp_request(&features(1, 1)));
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    (
        status,
        body["error"].as_str().unwrap_or_default().to_string(),
    )
}

async fn call(c: &reqwest::Client, url: &str, model: &str, key: &str) -> u16 {
    call_with(c, url, model, Some(&format!("Bearer {key}")))
        .await
        .0
}

/// Waits (at most 10 s) until `key` is let in on mlp: the server has read the file's new
/// contents.
async fn wait_for_key(c: &reqwest::Client, url: &str, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while call(c, url, "mlp", key).await != 200 {
        assert!(
            Instant::now() < deadline,
            "the file's new contents were not read"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Writes `text` to `file` and sets its modification time back to what it was.
fn rewrite_keeping_mtime(file: &Path, text: &str) {
    let before = std::fs::metadata(file).unwrap().modified().unwrap();
    std::fs::write(file, text).unwrap();
    std::fs::File::options()
        .write(true)
        .open(file)
        .unwrap()
        .set_modified(before)
        .unwrap();
    assert_eq!(std::fs::metadata(file).unwrap().modified().unwrap(), before);
}

/// `secs` seconds of silence as a 16 kHz mono 16-bit WAV file.
fn silent_wav(secs: f64) -> Vec<u8> {
    let data = (16_000.0 * secs) as u32 * 2;
    let mut wav = Vec::new();
    wav.extend_from_slice(b"RIFF");
    wav.extend_from_slice(&(36 + data).to_le_bytes());
    wav.extend_from_slice(b"WAVEfmt ");
    for field in [16u32.to_le_bytes(), [1, 0, 1, 0]] {
        wav.extend_from_slice(&field);
    }
    wav.extend_from_slice(&16_000u32.to_le_bytes());
    wav.extend_from_slice(&32_000u32.to_le_bytes());
    wav.extend_from_slice(&[2, 0, 16, 0]);
    wav.extend_from_slice(b"data");
    wav.extend_from_slice(&data.to_le_bytes());
    wav.resize(wav.len() + data as usize, 0);
    wav
}

/// A request of more rows than a key's rows/s ever lets through, or more audio at once than
/// its audio per minute, is 400 saying the most there is: no wait lets it through, and the
/// 429 it had (Retry-After: 60) had a client retry it for ever. One within the limit that
/// comes too soon is still 429 with Retry-After. Each refusal of those limits is counted
/// (`rate_limited`), the audio ones too, which were not.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn more_than_a_key_ever_lets_through_is_400_and_each_limit_refusal_counts() {
    let key = new_key();
    let limits = "models = [\"*\"]\nrows_per_sec = 4\naudio_secs_per_min = 1";
    let file = keys_file(&entry("edge-small", &key, limits));
    let url = start(&repo().join("models"), |c| c.api_keys = Some(file));
    let c = client();
    let infer = |rows: usize| {
        c.post(format!("{url}/v2/models/mlp/infer"))
            .bearer_auth(&key)
            .json(&mlp_request(&features(1, rows)))
            .send()
    };
    let segments = |secs: f64| {
        c.post(format!("{url}/v1/models/silero_vad/segments"))
            .bearer_auth(&key)
            .body(silent_wav(secs))
            .send()
    };
    let refused = |response: reqwest::Response| async move {
        let (status, retry) = (
            response.status().as_u16(),
            response.headers().contains_key("retry-after"),
        );
        let body: serde_json::Value = response.json().await.unwrap();
        (status, retry, body["error"].as_str().unwrap().to_string())
    };

    let (status, retry, error) = refused(infer(8).await.unwrap()).await;
    assert_eq!((status, retry), (400, false), "{error}");
    assert!(error.contains("'edge-small'"), "{error}");
    assert!(error.contains("at most 4 rows per request"), "{error}");
    // It took nothing: the key's 4 rows are there, and then spent.
    assert_eq!(infer(4).await.unwrap().status(), 200);
    let (status, retry, error) = refused(infer(1).await.unwrap()).await;
    assert_eq!((status, retry), (429, true), "{error}");

    let (status, retry, error) = refused(segments(2.0).await.unwrap()).await;
    assert_eq!((status, retry), (400, false), "{error}");
    assert!(error.contains("at most 1 s"), "{error}");
    assert_eq!(segments(0.8).await.unwrap().status(), 200);
    let (status, retry, error) = refused(segments(0.8).await.unwrap()).await;
    assert_eq!((status, retry), (429, true), "{error}");

    let metrics = metrics_text(&c, &url).await;
    let series = "streamserve_access_refused_total{key=\"edge-small\",reason=\"rate_limited\"}";
    assert_eq!(sample(&metrics, series), Some(4.0), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refusal_series_are_at_0_for_every_key_before_any_refusal() {
    let text = entry("edge-zero-a", &new_key(), "models = [\"mlp\"]")
        + &entry(
            "edge-zero-b",
            &new_key(),
            "models = [\"*\"]\nmax_concurrent = 2",
        );
    let file = keys_file(&text);
    let url = start(&repo().join("models"), |c| c.api_keys = Some(file));
    let metrics = metrics_text(&client(), &url).await;
    for key in ["edge-zero-a", "edge-zero-b"] {
        for reason in ["unauthenticated", "forbidden", "rate_limited"] {
            let series =
                format!("streamserve_access_refused_total{{key=\"{key}\",reason=\"{reason}\"}}");
            assert_eq!(sample(&metrics, &series), Some(0.0), "{series}\n{metrics}");
        }
    }
    let anonymous = "streamserve_access_refused_total{key=\"-\",reason=\"unauthenticated\"}";
    assert!(sample(&metrics, anonymous).is_some(), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_limit_of_0_a_lone_burst_and_a_file_without_keys_are_refused_at_start() {
    for field in [
        "requests_per_sec",
        "burst",
        "rows_per_sec",
        "max_concurrent",
        "max_streams",
        "audio_secs_per_min",
    ] {
        let rate = match field {
            "requests_per_sec" => "",
            _ => "requests_per_sec = 5\n",
        };
        let extra = format!("models = [\"*\"]\n{rate}{field} = 0");
        let refused = refusal_at_start(&entry("zeroed", &new_key(), &extra));
        assert!(
            refused.contains("'zeroed'") && refused.contains(&format!("{field} = 0")),
            "{refused}"
        );
    }
    let refused = refusal_at_start(&entry("bursty", &new_key(), "models = [\"*\"]\nburst = 5"));
    assert!(
        refused.contains("'bursty'") && refused.contains("requests_per_sec"),
        "{refused}"
    );
    for empty in ["", "# no keys yet\n", "keys = []\n"] {
        let refused = refusal_at_start(empty);
        assert!(refused.contains("no keys"), "{refused}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rewrite_is_read_by_its_contents_and_a_file_without_keys_keeps_the_keys() {
    let (first, second) = (new_key(), new_key());
    let file = keys_file(&entry("edge-first", &first, "models = [\"mlp\"]"));
    let watched = file.clone();
    let url = start(&repo().join("models"), |c| c.api_keys = Some(watched));
    let c = client();
    assert_eq!(call(&c, &url, "mlp", &first).await, 200);

    // A file emptied (as a rewrite in place does for a moment): every key stays in force.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    std::fs::write(&file, "").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(call(&c, &url, "mlp", &first).await, 200);

    // Filled again with the same modification time (a clock's coarse tick, `cp -p`): read.
    let both = entry("edge-first", &first, "models = [\"mlp\"]")
        + &entry("edge-second", &second, "models = [\"mlp\"]");
    rewrite_keeping_mtime(&file, &both);
    wait_for_key(&c, &url, &second).await;
    assert_eq!(call(&c, &url, "mlp", &first).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_edited_while_it_holds_its_one_stream_may_not_open_another() {
    let (streamer, marker) = (new_key(), new_key());
    let file = keys_file(&entry(
        "edge-streamer",
        &streamer,
        "models = [\"silero_vad\"]\nmax_streams = 1",
    ));
    let watched = file.clone();
    let url = start(&repo().join("models"), |c| c.api_keys = Some(watched));
    let open = || async {
        let ws_url = format!("{}/v1/streams/silero_vad", url.replace("http://", "ws://"));
        let mut request = ws_url.into_client_request().unwrap();
        let bearer = HeaderValue::from_str(&format!("Bearer {streamer}")).unwrap();
        request.headers_mut().insert("authorization", bearer);
        let (mut ws, _) = tokio_tungstenite::connect_async(request)
            .await
            .expect("upgrade");
        let answer = first_answer(&mut ws).await;
        (ws, answer)
    };
    let (_first, answer) = open().await;
    assert_eq!(answer, Ok("started".into()));

    // The key's entry changes (one more model), and a marker key shows the file was read.
    let edited = entry(
        "edge-streamer",
        &streamer,
        "models = [\"silero_vad\", \"mlp\"]\nmax_streams = 1",
    ) + &entry("edge-marker", &marker, "models = [\"mlp\"]");
    std::fs::write(&file, edited).unwrap();
    wait_for_key(&client(), &url, &marker).await;

    // Its one stream is still open: a second is refused, as before the edit.
    let (_second, answer) = open().await;
    let (code, reason) = answer.expect_err("a second stream was let in");
    assert_eq!(code, CloseCode::Again, "{reason}");
    assert!(reason.contains("1 open streams"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_bearer_scheme_is_read_in_any_case_over_rest_and_grpc() {
    use streamserve::api::grpc::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
    use streamserve::api::grpc::proto::inference::model_infer_request::InferInputTensor;
    use streamserve::api::grpc::proto::inference::ModelInferRequest;

    let key = new_key();
    let file = keys_file(&entry("edge-cased", &key, "models = [\"mlp\"]"));
    let running = start_running(&repo().join("models"), |c| c.api_keys = Some(file));
    let url = format!("http://{}", running.addr);
    let c = client();
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let value = format!("{scheme} {key}");
        let (status, error) = call_with(&c, &url, "mlp", Some(&value)).await;
        assert_eq!(status, 200, "{scheme}: {error}");
    }
    let (status, _) = call_with(&c, &url, "mlp", Some(&format!("Basic {key}"))).await;
    assert_eq!(status, 401);

    let endpoint = format!("http://{}", running.grpc_addr.expect("gRPC is on"));
    let mut grpc = GrpcInferenceServiceClient::connect(endpoint).await.unwrap();
    let x: Vec<u8> = features(1, 1)
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let mut request = tonic::Request::new(ModelInferRequest {
        model_name: "mlp".into(),
        inputs: vec![InferInputTensor {
            name: "features".into(),
            datatype: "FP32".into(),
            shape: vec![1, 256],
            ..Default::default()
        }],
        raw_input_contents: vec![x],
        ..Default::default()
    });
    let value = format!("bearer {key}").parse().unwrap();
    request.metadata_mut().insert("authorization", value);
    grpc.model_infer(request)
        .await
        .expect("a lower-case scheme");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_name_with_a_line_break_is_escaped_in_a_refusal() {
    let key = new_key();
    let file = keys_file(&entry("edge-narrow", &key, "models = [\"mlp_small\"]"));
    let url = start(&repo().join("models"), |c| c.api_keys = Some(file));
    let value = format!("Bearer {key}");
    let (status, error) = call_with(&client(), &url, "x%0Aforged%20line", Some(&value)).await;
    assert_eq!(status, 403, "{error}");
    // The same text is the audit event's `detail`: a raw line break would forge a log line.
    assert!(!error.contains('\n'), "{error:?}");
    assert!(error.contains("x\\nforged line"), "{error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_address_limits_count_an_ipv6_client_by_its_64_and_see_through_ported_entries() {
    let url = start(&repo().join("models"), |c| {
        c.client_requests_per_sec = 1;
        c.trusted_proxies = Some("127.0.0.1".into());
    });
    let c = client();
    let statuses = |forwarded: Vec<String>| {
        let (c, url) = (c.clone(), url.clone());
        async move {
            let mut statuses = Vec::new();
            for value in forwarded {
                let response = c
                    .post(format!("{url}/v2/models/mlp/infer"))
                    .header("x-forwarded-for", value)
                    .json(&mlp_request(&features(1, 1)))
                    .send()
                    .await
                    .unwrap();
                statuses.push(response.status().as_u16());
            }
            statuses
        }
    };
    // One host's /64, a fresh address for each request: one client (1/s, bursts of 2).
    let v6 = (1..=3).map(|n| format!("2001:db8:0:7::{n}")).collect();
    assert_eq!(statuses(v6).await, vec![200, 200, 429]);
    // The nearest proxy wrote the client with its port; before it, the client's own claims.
    let ported = (1..=3)
        .map(|n| format!("192.0.2.{n}, 198.51.100.9:4711"))
        .collect();
    assert_eq!(statuses(ported).await, vec![200, 200, 429]);
}

/// On a server that requires keys, asking about a cold (lazy) model without a key that may
/// call it does not load it: before, `GET /v2/models/mlp` with no key loaded the model.
/// Metadata stays public for what is loaded, and a key that may call the model loads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metadata_without_a_key_does_not_load_a_cold_model() {
    use streamserve::api::grpc::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
    use streamserve::api::grpc::proto::inference::{ModelConfigRequest, ModelMetadataRequest};

    let key = new_key();
    let other = new_key();
    let text = entry("mlp-caller", &key, "models = [\"mlp\"]")
        + &entry("other-caller", &other, "models = [\"mlp_small\"]");
    let file = keys_file(&text);
    let manifest = format!(
        "[[models]]\nname = \"mlp\"\nversion = \"1\"\nfile = \"{{models}}/mlp/1/model.onnx\"\n\
         sha256 = \"{MLP_SHA}\"\nload = \"lazy\"\n\n\
         [[models]]\nname = \"mlp_small\"\nversion = \"1\"\n\
         file = \"{{models}}/mlp_small/1/model.onnx\"\nsha256 = \"{MLP_SMALL_SHA}\"\n"
    );
    let running = start_running(&model_dir(&manifest), |c| c.api_keys = Some(file));
    let url = format!("http://{}", running.addr);
    let c = client();
    let state = |c: reqwest::Client, url: String| async move {
        let (_, list) = get(&c, &format!("{url}/v2/models")).await;
        common::model_row(&list, "mlp")["state"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(state(c.clone(), url.clone()).await, "UNLOADED");

    let ask = |path: &'static str, authorization: Option<String>| {
        let (c, url) = (c.clone(), url.clone());
        async move {
            let mut request = c.get(format!("{url}{path}"));
            if let Some(value) = authorization {
                request = request.header("authorization", value);
            }
            request.send().await.unwrap().status().as_u16()
        }
    };
    for path in [
        "/v2/models/mlp",
        "/v2/models/mlp/config",
        "/v2/models/mlp/versions/1",
    ] {
        assert_eq!(ask(path, None).await, 401, "{path} without a key");
        assert_eq!(
            ask(path, Some(format!("Bearer {other}"))).await,
            403,
            "{path} with a key for another model"
        );
    }
    let endpoint = format!("http://{}", running.grpc_addr.expect("gRPC is on"));
    let mut grpc = GrpcInferenceServiceClient::connect(endpoint).await.unwrap();
    let refused = grpc
        .model_metadata(ModelMetadataRequest {
            name: "mlp".into(),
            version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    let refused = grpc
        .model_config(ModelConfigRequest {
            name: "mlp".into(),
            version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert_eq!(
        state(c.clone(), url.clone()).await,
        "UNLOADED",
        "nobody allowed asked: still not loaded"
    );
    // What is loaded stays public.
    assert_eq!(ask("/v2/models/mlp_small", None).await, 200);
    // A caller that may call mlp loads it by asking, as inference would.
    assert_eq!(
        ask("/v2/models/mlp", Some(format!("Bearer {key}"))).await,
        200
    );
    assert_eq!(state(c.clone(), url.clone()).await, "READY");
    assert_eq!(
        ask("/v2/models/mlp", None).await,
        200,
        "loaded: public again"
    );
}
