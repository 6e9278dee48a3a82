//! WebSocket speech streams over real sockets, with real speech (espeak-ng + sox fixtures in
//! tests/audio) and the real Silero VAD model.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn fixture(name: &str) -> (Vec<i16>, u32, Vec<(f64, f64)>) {
    let dir = repo().join("tests/audio");
    let mut reader = hound::WavReader::open(dir.join(format!("{name}.wav"))).unwrap();
    let rate = reader.spec().sample_rate;
    let samples = reader.samples::<i16>().map(Result::unwrap).collect();
    let truth: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap())
            .unwrap();
    let segments = truth["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s[0].as_f64().unwrap(), s[1].as_f64().unwrap()))
        .collect();
    (samples, rate, segments)
}

fn pcm16(samples: &[i16]) -> Vec<u8> {
    samples.iter().flat_map(|s| s.to_le_bytes()).collect()
}

async fn connect(url: &str, model: &str) -> Socket {
    let ws_url = format!("{}/v1/streams/{model}", url.replace("http://", "ws://"));
    tokio_tungstenite::connect_async(ws_url)
        .await
        .expect("websocket upgrade")
        .0
}

async fn send_json(ws: &mut Socket, value: Value) {
    ws.send(Message::text(value.to_string())).await.unwrap();
}

/// The next JSON message; `None` once the server closed (with its close frame, if any).
async fn next_json(ws: &mut Socket) -> Result<Value, Option<(CloseCode, String)>> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("server answers within 30 s")
        {
            Some(Ok(Message::Text(text))) => return Ok(serde_json::from_str(&text).unwrap()),
            Some(Ok(Message::Close(frame))) => {
                return Err(frame.map(|f| (f.code, f.reason.to_string())))
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return Err(None),
        }
    }
}

/// Everything a stream produced: its messages in order and how it was closed.
struct Transcript {
    messages: Vec<Value>,
    close: Option<(CloseCode, String)>,
}

impl Transcript {
    fn of_type(&self, kind: &str) -> Vec<&Value> {
        self.messages.iter().filter(|m| m["type"] == kind).collect()
    }
    fn summary_segments(&self) -> Vec<(f64, f64)> {
        let summary = self.of_type("summary");
        assert_eq!(summary.len(), 1, "one summary: {:?}", self.messages.last());
        summary[0]["segments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["start"].as_f64().unwrap(), s["end"].as_f64().unwrap()))
            .collect()
    }
    fn probabilities(&self) -> Vec<f64> {
        self.of_type("vad")
            .iter()
            .map(|m| m["probability"].as_f64().unwrap())
            .collect()
    }
}

async fn read_until_closed(
    ws: &mut Socket,
    messages: &mut Vec<Value>,
) -> Option<(CloseCode, String)> {
    loop {
        match next_json(ws).await {
            Ok(m) => messages.push(m),
            Err(close) => return close,
        }
    }
}

/// Streams `audio` in frames of `frame` samples (unaligned to the model's window), then `end`.
async fn stream_all(url: &str, start: Value, audio: &[u8], frame_bytes: usize) -> Transcript {
    let mut ws = connect(url, "silero_vad").await;
    send_json(&mut ws, start).await;
    let started = next_json(&mut ws).await.expect("started");
    assert_eq!(started["type"], "started", "{started}");
    let (mut sink, mut stream) = ws.split();
    let frames: Vec<Vec<u8>> = audio.chunks(frame_bytes).map(|c| c.to_vec()).collect();
    let writer = tokio::spawn(async move {
        for frame in frames {
            // A send fails only if the server closed first; the transcript's close says why.
            if sink.send(Message::binary(frame)).await.is_err() {
                return;
            }
        }
        let _ = sink
            .send(Message::text(json!({"type": "end"}).to_string()))
            .await;
    });
    let mut messages = vec![started];
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("results keep coming")
        {
            Some(Ok(Message::Text(text))) => messages.push(serde_json::from_str(&text).unwrap()),
            Some(Ok(Message::Close(frame))) => break frame.map(|f| (f.code, f.reason.to_string())),
            Some(Ok(_)) => {}
            _ => break None,
        }
    };
    writer.await.unwrap();
    Transcript { messages, close }
}

fn assert_segments_near(got: &[(f64, f64)], truth: &[(f64, f64)], tolerance: f64) {
    assert_eq!(
        got.len(),
        truth.len(),
        "segments {got:?} vs truth {truth:?}"
    );
    for (g, t) in got.iter().zip(truth) {
        assert!(
            (g.0 - t.0).abs() <= tolerance && (g.1 - t.1).abs() <= tolerance,
            "segment {g:?} vs true {t:?}"
        );
    }
}

#[tokio::test]
async fn a_stream_finds_the_speech_and_matches_the_one_shot_endpoint() {
    let url = bundled();
    let (samples, rate, truth) = fixture("two_phrases_16k");
    let transcript = stream_all(
        url,
        json!({"type": "start", "sample_rate": rate}),
        &pcm16(&samples),
        2 * 300,
    )
    .await;
    assert_eq!(
        transcript.close.as_ref().map(|c| c.0),
        Some(CloseCode::Normal),
        "{:?}",
        transcript.close
    );

    // Every message has the next seq: nothing lost, nothing twice.
    for (i, m) in transcript.messages[1..].iter().enumerate() {
        assert_eq!(m["seq"], i as u64, "{m}");
    }
    let vad = transcript.of_type("vad");
    assert_eq!(vad.len(), samples.len().div_ceil(512));
    assert_eq!(vad[1]["t"], 0.032);
    let starts: Vec<f64> = transcript
        .of_type("speech_start")
        .iter()
        .map(|m| m["t"].as_f64().unwrap())
        .collect();
    let ends: Vec<f64> = transcript
        .of_type("speech_end")
        .iter()
        .map(|m| m["t"].as_f64().unwrap())
        .collect();
    let segments = transcript.summary_segments();
    assert_segments_near(&segments, &truth, 0.25);
    assert_eq!(starts, segments.iter().map(|s| s.0).collect::<Vec<_>>());
    assert_eq!(ends, segments.iter().map(|s| s.1).collect::<Vec<_>>());

    let wav = std::fs::read(repo().join("tests/audio/two_phrases_16k.wav")).unwrap();
    let response = client()
        .post(format!("{url}/v1/models/silero_vad/segments"))
        .body(wav)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let one_shot: Value = response.json().await.unwrap();
    let one_shot_segments: Vec<(f64, f64)> = one_shot["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["start"].as_f64().unwrap(), s["end"].as_f64().unwrap()))
        .collect();
    assert_eq!(
        one_shot_segments, segments,
        "the one-shot endpoint runs the same pipeline"
    );
}

#[tokio::test]
async fn eight_khz_float_audio_and_events_only() {
    let url = bundled();
    let (samples, rate, truth) = fixture("two_phrases_8k");
    let f32_bytes: Vec<u8> = samples
        .iter()
        .flat_map(|&s| (s as f32 / 32768.0).to_le_bytes())
        .collect();
    let start = json!({"type": "start", "sample_rate": rate, "format": "f32", "results": "events"});
    let transcript = stream_all(url, start, &f32_bytes, 4 * 777).await;
    assert_eq!(transcript.messages[0]["chunk_samples"], 256);
    assert!(transcript.of_type("vad").is_empty());
    assert_eq!(transcript.of_type("speech_start").len(), 2);
    assert_segments_near(&transcript.summary_segments(), &truth, 0.25);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_streams_give_the_same_results_as_alone() {
    let url = bundled();
    let (samples, rate, _) = fixture("two_phrases_16k");
    // Each stream gets its own audio: the fixture at a different gain and offset.
    let variant = |i: usize| -> Vec<u8> {
        let gain = 0.3 + 0.1 * i as f32;
        let rotated: Vec<i16> = samples
            .iter()
            .cycle()
            .skip(i * 4000)
            .take(samples.len())
            .map(|&s| (s as f32 * gain) as i16)
            .collect();
        pcm16(&rotated)
    };
    let start = json!({"type": "start", "sample_rate": rate});
    let mut alone = Vec::new();
    for i in 0..8 {
        alone.push(
            stream_all(url, start.clone(), &variant(i), 1000)
                .await
                .probabilities(),
        );
    }
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let (url, start, audio) = (url.to_string(), start.clone(), variant(i));
            tokio::spawn(async move { stream_all(&url, start, &audio, 1000).await.probabilities() })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let together = task.await.unwrap();
        assert_eq!(together.len(), alone[i].len());
        for (j, (a, b)) in together.iter().zip(&alone[i]).enumerate() {
            assert!(
                (a - b).abs() < 1e-4,
                "stream {i} chunk {j}: {a} together vs {b} alone"
            );
        }
    }
}

#[tokio::test]
async fn a_dropped_stream_resumes_with_nothing_lost_or_repeated() {
    let url = bundled();
    let (samples, rate, _) = fixture("two_phrases_16k");
    let audio = pcm16(&samples);
    let uninterrupted = stream_all(
        url,
        json!({"type": "start", "sample_rate": rate}),
        &audio,
        2048,
    )
    .await;

    // First connection: half the audio, read a few results, then vanish without a close.
    let mut ws = connect(url, "silero_vad").await;
    send_json(&mut ws, json!({"type": "start", "sample_rate": rate})).await;
    let started = next_json(&mut ws).await.unwrap();
    let stream_id = started["stream_id"].as_str().unwrap().to_string();
    let half = audio.len() / 2;
    for frame in audio[..half].chunks(2048) {
        ws.send(Message::binary(frame.to_vec())).await.unwrap();
    }
    let mut seen = Vec::new();
    for _ in 0..20 {
        seen.push(next_json(&mut ws).await.unwrap());
    }
    drop(ws);
    let last_seq = seen.last().unwrap()["seq"].as_u64().unwrap();

    // Second connection: resume, re-send from where the server says it is, finish.
    let mut ws = connect(url, "silero_vad").await;
    send_json(
        &mut ws,
        json!({"type": "start", "stream_id": stream_id, "last_seq": last_seq}),
    )
    .await;
    let resumed = next_json(&mut ws).await.unwrap();
    assert_eq!(resumed["type"], "started", "{resumed}");
    assert_eq!(resumed["resumed"], true);
    assert_eq!(resumed["stream_id"], stream_id.as_str());
    let from = resumed["samples_received"].as_u64().unwrap() as usize * 2;
    assert_eq!(from, half, "the server kept all the audio it was sent");
    for frame in audio[from..].chunks(2048) {
        ws.send(Message::binary(frame.to_vec())).await.unwrap();
    }
    send_json(&mut ws, json!({"type": "end"})).await;
    let close = read_until_closed(&mut ws, &mut seen).await;
    assert_eq!(close.map(|c| c.0), Some(CloseCode::Normal));

    for (i, m) in seen.iter().enumerate() {
        assert_eq!(m["seq"], i as u64, "gap or repeat at {i}: {m}");
    }
    let resumed_run = Transcript {
        messages: std::iter::once(started).chain(seen).collect(),
        close: None,
    };
    assert_eq!(
        resumed_run.probabilities().len(),
        uninterrupted.probabilities().len()
    );
    for (a, b) in resumed_run
        .probabilities()
        .iter()
        .zip(uninterrupted.probabilities())
    {
        assert!(
            (a - b).abs() < 1e-4,
            "the model state survived the reconnect: {a} vs {b}"
        );
    }
    assert_eq!(
        resumed_run.summary_segments(),
        uninterrupted.summary_segments()
    );
}

/// Opens a stream, sends `start` and then `frames`, and returns the error message and close.
async fn rejected(
    url: &str,
    model: &str,
    start: Value,
    frames: Vec<Message>,
) -> (Value, (CloseCode, String)) {
    let mut ws = connect(url, model).await;
    send_json(&mut ws, start).await;
    for frame in frames {
        if ws.send(frame).await.is_err() {
            break;
        }
    }
    let mut messages = Vec::new();
    let close = read_until_closed(&mut ws, &mut messages)
        .await
        .expect("a close frame with a reason");
    let error = messages
        .into_iter()
        .find(|m| m["type"] == "error")
        .expect("an error message before the close");
    (error, close)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_streams_get_reasons_while_a_good_stream_carries_on() {
    let url = bundled();
    let (samples, rate, truth) = fixture("two_phrases_16k");
    let good = {
        let url = url.to_string();
        let audio = pcm16(&samples);
        tokio::spawn(async move {
            stream_all(
                &url,
                json!({"type": "start", "sample_rate": rate}),
                &audio,
                640,
            )
            .await
        })
    };
    let start = json!({"type": "start", "sample_rate": 16000});

    let (error, close) = rejected(
        url,
        "silero_vad",
        json!({"type": "start", "sample_rate": 44100}),
        vec![],
    )
    .await;
    assert_eq!(close.0, CloseCode::Policy);
    assert!(
        error["message"].as_str().unwrap().contains("16000 or 8000"),
        "{error}"
    );

    let (_, close) = rejected(
        url,
        "silero_vad",
        json!({"type": "start", "vad": {"threshold": 3}}),
        vec![],
    )
    .await;
    assert_eq!(close.0, CloseCode::Policy);
    assert!(close.1.contains("threshold"), "{close:?}");

    let mut ws = connect(url, "silero_vad").await;
    ws.send(Message::binary(vec![0u8; 64])).await.unwrap();
    let close = read_until_closed(&mut ws, &mut Vec::new()).await.unwrap();
    assert_eq!(
        close.0,
        CloseCode::Unsupported,
        "audio before start: {close:?}"
    );

    let mut ws = connect(url, "silero_vad").await;
    ws.send(Message::text("{\"type\":\"start\","))
        .await
        .unwrap();
    let close = read_until_closed(&mut ws, &mut Vec::new()).await.unwrap();
    assert_eq!(close.0, CloseCode::Invalid);
    assert!(close.1.contains("malformed start message"), "{close:?}");

    let (error, close) = rejected(
        url,
        "silero_vad",
        start.clone(),
        vec![Message::binary(vec![1u8, 2, 3])],
    )
    .await;
    assert_eq!(close.0, CloseCode::Invalid);
    assert!(
        error["message"].as_str().unwrap().contains("3 bytes"),
        "{error}"
    );

    let (_, close) = rejected(
        url,
        "silero_vad",
        start.clone(),
        vec![Message::text("hello")],
    )
    .await;
    assert_eq!(close.0, CloseCode::Invalid, "text where audio is expected");

    let (_, close) = rejected(
        url,
        "silero_vad",
        start.clone(),
        vec![Message::binary(vec![0u8; 100 * 1024])],
    )
    .await;
    assert_eq!(close.0, CloseCode::Size, "oversized frame: {close:?}");

    let (_, close) = rejected(
        url,
        "silero_vad",
        start.clone(),
        vec![Message::text(start.to_string())],
    )
    .await;
    assert_eq!(close.0, CloseCode::Policy, "second start");

    let (error, close) = rejected(
        url,
        "silero_vad",
        json!({"type": "start", "stream_id": "nope", "last_seq": 3}),
        vec![],
    )
    .await;
    assert_eq!(close.0, CloseCode::Policy);
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("unknown or expired stream_id"),
        "{error}"
    );

    let garbage: Vec<u8> = (0..4000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let mut ws = connect(url, "silero_vad").await;
    send_json(&mut ws, json!({"type": "start", "format": "f32"})).await;
    ws.send(Message::binary(garbage)).await.unwrap();
    let close = read_until_closed(&mut ws, &mut Vec::new()).await.unwrap();
    assert_eq!(
        close.0,
        CloseCode::Invalid,
        "garbage bytes as f32 audio: {close:?}"
    );
    assert!(close.1.contains("outside [-1, 1]"), "{close:?}");

    // Unknown and non-streaming models are refused at the HTTP upgrade.
    let ws_url = format!("{}/v1/streams/", url.replace("http://", "ws://"));
    match tokio_tungstenite::connect_async(format!("{ws_url}ghost")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 404)
        }
        other => panic!("expected 404, got {other:?}"),
    }
    match tokio_tungstenite::connect_async(format!("{ws_url}mlp")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 400)
        }
        other => panic!("expected 400, got {other:?}"),
    }

    let good = good.await.unwrap();
    assert_segments_near(&good.summary_segments(), &truth, 0.25);
}

#[tokio::test]
async fn idle_streams_time_out_and_shutdown_closes_streams_with_going_away() {
    let dir = repo().join("models");
    let config_url = {
        let mut config = streamserve::config::Config {
            host: "127.0.0.1".into(),
            port: 0,
            models: dir,
            http_workers: 1,
            stream_idle_secs: 1,
            ..Default::default()
        };
        config.drain_secs = 5;
        streamserve::server::spawn(config).unwrap()
    };
    let url = format!("http://{}", config_url.addr);
    let mut ws = connect(&url, "silero_vad").await;
    send_json(&mut ws, json!({"type": "start"})).await;
    let mut messages = Vec::new();
    let close = read_until_closed(&mut ws, &mut messages).await.unwrap();
    assert_eq!(close.0, CloseCode::Policy);
    assert!(close.1.contains("no audio for 1 s"), "{close:?}");

    // A stream that keeps sending for longer than the idle timeout is not idle; once it
    // stops, it is closed as idle.
    let mut ws = connect(&url, "silero_vad").await;
    send_json(&mut ws, json!({"type": "start"})).await;
    assert_eq!(next_json(&mut ws).await.unwrap()["type"], "started");
    let began = std::time::Instant::now();
    let mut frames_sent = 0;
    while began.elapsed() < Duration::from_millis(2500) {
        ws.send(Message::binary(pcm16(&[0; 3200]))).await.unwrap();
        frames_sent += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut results = Vec::new();
    let close = read_until_closed(&mut ws, &mut results).await.unwrap();
    assert!(close.1.contains("no audio for 1 s"), "{close:?}");
    // Every frame was taken: a reader closed as idle a second in would have answered
    // about five frames' worth.
    let chunks = results.iter().filter(|m| m["type"] == "vad").count();
    assert!(
        chunks >= (frames_sent - 1) * 3200 / 512,
        "{chunks} results for {frames_sent} frames of 3200 samples: {close:?}"
    );

    let mut ws = connect(&url, "silero_vad").await;
    send_json(&mut ws, json!({"type": "start"})).await;
    assert_eq!(next_json(&mut ws).await.unwrap()["type"], "started");
    config_url.shutdown().await;
    let close = read_until_closed(&mut ws, &mut Vec::new()).await.unwrap();
    assert_eq!(close.0, CloseCode::Away, "{close:?}");
    assert!(close.1.contains("reconnect"), "{close:?}");
}

#[tokio::test]
async fn stream_metrics() {
    let url = bundled();
    let (samples, rate, _) = fixture("two_phrases_8k");
    stream_all(
        url,
        json!({"type": "start", "sample_rate": rate}),
        &pcm16(&samples[..16000]),
        4000,
    )
    .await;
    let text = metrics_text(&client(), url).await;
    for needle in [
        "streamserve_streams_open",
        "streamserve_stream_connections",
        "streamserve_stream_chunks_total{model=\"silero_vad\"}",
        "streamserve_stream_chunk_latency_seconds_bucket{model=\"silero_vad\"",
    ] {
        assert!(text.contains(needle), "metrics lack {needle}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_ride_through_overload_on_the_fallback_model() {
    let dir = model_dir(&bundled_manifest());
    let url = start(&dir, |config| config.admin_token = Some("t".into()));
    // While 6 streams run, their steps go to vad_energy for a while.
    slow_silero_for_three_batches(&url).await;
    let (samples, rate, truth) = fixture("two_phrases_16k");
    let audio = pcm16(&samples);
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let (url, audio) = (url.clone(), audio.clone());
            tokio::spawn(async move {
                stream_all(
                    &url,
                    json!({"type": "start", "sample_rate": rate}),
                    &audio,
                    2048,
                )
                .await
            })
        })
        .collect();
    let (mut degraded, mut total) = (0, 0);
    for task in tasks {
        let transcript = task.await.unwrap();
        assert_eq!(
            transcript.close.as_ref().map(|c| c.0),
            Some(CloseCode::Normal),
            "{:?}",
            transcript.close
        );
        for (i, m) in transcript.messages[1..].iter().enumerate() {
            assert_eq!(m["seq"], i as u64);
        }
        let vad = transcript.of_type("vad");
        total += vad.len();
        degraded += vad.iter().filter(|m| m["degraded"] == true).count();
        // The speech is still found (the energy model is cruder: a wider tolerance).
        assert_segments_near(&transcript.summary_segments(), &truth, 0.5);
    }
    assert!(degraded > 0, "no chunk went to the fallback");
    assert!(degraded < total, "the streams never came back to silero");
}
