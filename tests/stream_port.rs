//! The speech-only listener (`--stream-port`): streams on HTTP threads of their own, so that a
//! flood on the main port cannot hold up their chunks. Over real sockets with the bundled
//! models: it serves the same streams as the main port, only speech and health, turns bad
//! requests and streams away as the main port does while a good stream on it carries on, and
//! goes away with the server.

mod common;

use common::stream_client::{connect_to, fixture_pcm16, send_rest_and_results};
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

/// Every result of one stream of the fixture, sent in 20 ms frames.
async fn results(url: &str) -> Vec<Value> {
    let (audio, rate) = fixture_pcm16("two_phrases_16k");
    let mut ws = connect_to(url, "silero_vad").await.expect("upgrade");
    let start = json!({"type": "start", "sample_rate": rate, "format": "pcm16"});
    ws.send(Message::text(start.to_string())).await.unwrap();
    send_rest_and_results(&mut ws, &audio, rate as usize / 50 * 2).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_port_serves_speech_and_health_only_and_leaves_with_the_server() {
    let running = start_running(&repo().join("models"), |c| {
        c.stream_port = Some(0);
        c.http_workers = 1;
        c.drain_secs = 5;
    });
    let main = format!("http://{}", running.addr);
    let streams = format!("http://{}", running.stream_addr.expect("a stream listener"));
    assert_ne!(main, streams);
    let c = client();

    // The same stream gives the same results on either port, the stream port's while bad
    // requests arrive on that port beside it.
    let on_main = results(&main).await;
    let bad_requests = async {
        // Health, for the proxy that checks it; nothing else.
        assert_eq!(get(&c, &format!("{streams}/v2/health/ready")).await.0, 200);
        let (status, _) = post(&c, &format!("{streams}/v2/models/mlp/infer"), &json!({})).await;
        assert_eq!(status, 404);
        let metrics = c.get(format!("{streams}/metrics")).send().await.unwrap();
        assert_eq!(metrics.status(), 404);
        // A stream of a model that serves none is turned away as on the main port.
        for base in [&main, &streams] {
            let refused = connect_to(base, "mlp").await.unwrap_err();
            assert!(refused.contains("400"), "{refused}");
        }
    };
    let (on_streams, ()) = tokio::join!(results(&streams), bad_requests);
    assert!(
        on_streams.iter().any(|m| m["type"] == "summary"),
        "{on_streams:?}"
    );
    assert_eq!(on_main, on_streams);

    // Shutdown closes the stream port's open streams with "going away", then the port.
    let mut ws = connect_to(&streams, "silero_vad").await.unwrap();
    ws.send(Message::text(json!({"type": "start"}).to_string()))
        .await
        .unwrap();
    let started: Value = match ws.next().await {
        Some(Ok(Message::Text(text))) => serde_json::from_str(&text).unwrap(),
        other => panic!("{other:?}"),
    };
    assert_eq!(started["type"], "started");
    running.shutdown().await;
    let close = loop {
        match ws.next().await {
            Some(Ok(Message::Close(frame))) => break frame.map(|f| f.code),
            Some(Ok(_)) => {}
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(close, Some(CloseCode::Away));
    assert!(connect_to(&streams, "silero_vad").await.is_err());
}
