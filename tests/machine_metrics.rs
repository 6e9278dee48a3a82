//! The machine's series in `/metrics`, scraped from a real server on the bundled models: the
//! standard `process_*` ones with plausible values, each device's memory against its budget,
//! bytes per protocol (at 0 from the start, then growing with what each protocol carries),
//! open connections (up while clients are connected, down when they leave), and no GPU series
//! on a machine without NVML.
//!
//! The metrics recorder is process-wide and the byte counters count every server of the
//! process: this binary starts one server and checks everything in one test, in order.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use streamserve::api::grpc::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use streamserve::api::grpc::proto::inference::model_infer_request::InferInputTensor;
use streamserve::api::grpc::proto::inference::{ModelInferRequest, ServerLiveRequest};
use tokio_tungstenite::tungstenite::Message;

/// A series' value; panics when the series is missing.
fn value(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

fn received(text: &str, protocol: &str) -> f64 {
    value(
        text,
        &format!("streamserve_received_bytes_total{{protocol=\"{protocol}\"}}"),
    )
}

fn sent(text: &str, protocol: &str) -> f64 {
    value(
        text,
        &format!("streamserve_sent_bytes_total{{protocol=\"{protocol}\"}}"),
    )
}

fn open(text: &str, protocol: &str) -> f64 {
    value(
        text,
        &format!("streamserve_open_connections{{protocol=\"{protocol}\"}}"),
    )
}

/// Scrapes until `ok` holds (at most 5 s), returning the last scrape.
async fn scrape_until(
    c: &reqwest::Client,
    url: &str,
    what: &str,
    ok: impl Fn(&str) -> bool,
) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = metrics_text(c, url).await;
        if ok(&text) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}, never seen in:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn machine_series_are_there_from_the_start_and_follow_the_traffic() {
    let running = start_running(&repo().join("models"), |_| {});
    let url = format!("http://{}", running.addr);
    let grpc_endpoint = format!("http://{}", running.grpc_addr.expect("gRPC is on"));
    let c = client();

    // The first scrape: the process's figures, the devices, every protocol at 0 but HTTP's.
    let text = metrics_text(&c, &url).await;
    assert!(value(&text, "process_cpu_seconds_total") > 0.0, "{text}");
    assert!(text.contains("# TYPE process_cpu_seconds_total counter"));
    assert!(value(&text, "process_resident_memory_bytes") > 1e6);
    assert!(value(&text, "process_virtual_memory_bytes") > 1e6);
    assert!(value(&text, "process_threads") >= 1.0);
    assert!(value(&text, "process_open_fds") >= 1.0);
    assert!(value(&text, "process_max_fds") >= value(&text, "process_open_fds"));
    let start = value(&text, "process_start_time_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        start > now - 3600.0 && start <= now + 1.0,
        "{start} vs {now}"
    );
    for protocol in ["websocket", "grpc"] {
        assert_eq!(received(&text, protocol), 0.0, "{protocol}");
        assert_eq!(sent(&text, protocol), 0.0, "{protocol}");
    }
    assert!(received(&text, "http") >= 0.0);
    assert!(sent(&text, "http") >= 0.0);
    assert!(
        open(&text, "http") >= 1.0,
        "the scrape's own connection is open"
    );
    assert_eq!(open(&text, "grpc"), 0.0);
    assert!(
        !text.contains("streamserve_open_connections{protocol=\"websocket\"}"),
        "WebSocket connections are HTTP's"
    );
    // The bundled models' replicas are loaded on the CPU, within its budget.
    let in_use = value(&text, r#"streamserve_device_memory_bytes{device="cpu"}"#);
    let budget = value(
        &text,
        r#"streamserve_device_memory_budget_bytes{device="cpu"}"#,
    );
    assert!(in_use > 0.0 && in_use <= budget, "{in_use} of {budget}");
    assert_eq!(in_use % (1u64 << 20) as f64, 0.0, "whole MiB");
    assert!(
        !text.contains("device=\"cuda:"),
        "no GPU in use or seen: {text}"
    );
    // No NVML here: no GPU series at all.
    assert!(!text.contains("streamserve_gpu_"), "{text}");
    // The streams' gauges exist at 0 too.
    assert_eq!(value(&text, "streamserve_streams_open"), 0.0);
    assert_eq!(value(&text, "streamserve_stream_connections"), 0.0);
    assert_eq!(undescribed(&text), Vec::<String>::new(), "{text}");

    // HTTP: an inference request's body in, its answer out.
    let body = mlp_request(&features(7, 4)).to_string();
    let before = metrics_text(&c, &url).await;
    let response = c
        .post(format!("{url}/v2/models/mlp/infer"))
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let answer = response.text().await.unwrap();
    let after = metrics_text(&c, &url).await;
    assert!(
        received(&after, "http") - received(&before, "http") >= body.len() as f64,
        "{} bytes sent",
        body.len()
    );
    // The answer, and the scrape before this one (counted as it was sent).
    assert!(
        sent(&after, "http") - sent(&before, "http") >= (answer.len() + before.len()) as f64,
        "{} + {} bytes answered",
        answer.len(),
        before.len()
    );

    // Open HTTP connections: counted from their accept to their close.
    let base = open(&after, "http");
    let idle: Vec<tokio::net::TcpStream> = futures_util::future::join_all(
        (0..3).map(|_| tokio::net::TcpStream::connect(running.addr)),
    )
    .await
    .into_iter()
    .map(Result::unwrap)
    .collect();
    scrape_until(&c, &url, "3 more open HTTP connections", |t| {
        open(t, "http") >= base + 3.0
    })
    .await;
    drop(idle);
    scrape_until(&c, &url, "the 3 closed connections uncounted", |t| {
        open(t, "http") <= base
    })
    .await;

    // gRPC: the connection's bytes both ways, and the connection while it is open.
    let channel = tonic::transport::Channel::from_shared(grpc_endpoint)
        .unwrap()
        .connect()
        .await
        .expect("gRPC connects");
    let mut grpc = GrpcInferenceServiceClient::new(channel);
    assert!(
        grpc.server_live(ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    let x = features(3, 1);
    let raw: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    let raw_len = raw.len();
    grpc.model_infer(ModelInferRequest {
        model_name: "mlp".into(),
        inputs: vec![InferInputTensor {
            name: "features".into(),
            datatype: "FP32".into(),
            shape: vec![1, 256],
            ..Default::default()
        }],
        raw_input_contents: vec![raw],
        ..Default::default()
    })
    .await
    .expect("gRPC inference");
    let text = metrics_text(&c, &url).await;
    assert!(received(&text, "grpc") >= raw_len as f64, "{text}");
    assert!(sent(&text, "grpc") > 0.0);
    assert_eq!(open(&text, "grpc"), 1.0);
    drop(grpc);
    scrape_until(&c, &url, "the gRPC connection uncounted", |t| {
        open(t, "grpc") == 0.0
    })
    .await;

    // WebSocket: the frames' payloads both ways.
    let ws_url = format!("{}/v1/streams/silero_vad", url.replace("http://", "ws://"));
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
    let start = json!({"type": "start", "sample_rate": 16000}).to_string();
    let end = json!({"type": "end"}).to_string();
    ws.send(Message::text(start.clone())).await.unwrap();
    let audio = vec![0u8; 16_000 * 2];
    for frame in audio.chunks(3200) {
        ws.send(Message::binary(frame.to_vec())).await.unwrap();
    }
    ws.send(Message::text(end.clone())).await.unwrap();
    let mut text_bytes = 0;
    while let Some(message) = tokio::time::timeout(Duration::from_secs(30), ws.next())
        .await
        .expect("the stream answers")
    {
        match message {
            Ok(Message::Text(text)) => text_bytes += text.len(),
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
    assert!(text_bytes > 0);
    let text = scrape_until(&c, &url, "the stream's connection closed", |t| {
        value(t, "streamserve_stream_connections") == 0.0
    })
    .await;
    assert_eq!(
        received(&text, "websocket"),
        (start.len() + audio.len() + end.len()) as f64
    );
    assert!(sent(&text, "websocket") >= text_bytes as f64);
    // The stream's bytes are not HTTP's.
    assert!(received(&text, "http") - received(&after, "http") < audio.len() as f64);
}
