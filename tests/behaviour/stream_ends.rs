//! What a speech stream says at its end, and what it claims to have heard. The last partial
//! chunk is padded with silence to a whole window, and that padding is not audio: a keyword
//! score or event, or a segment's end, never lies after the last sample the client sent (a
//! keyword stream cut at 11.925 s scored at 12.0 s; a segment with `speech_pad_ms = 2000`
//! ended at 8.48 s of 8.466 s, over WebSocket and on the one-shot endpoint). A client told
//! that speech started is told that it ended, and its summary lists that segment (speech
//! confirmed only by the padding got a `speech_start`, no `speech_end` and no segment). A
//! stream declaration that does not fit its models is refused with the stage, the manifest
//! key and the tensors the model has.

use crate::common;

use std::time::Duration;

use common::stream_client::*;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

/// The first `samples` of a 16 kHz fixture, as PCM16 bytes.
fn cut(fixture: &str, samples: usize) -> Vec<u8> {
    let (audio, rate) = fixture_pcm16(fixture);
    assert_eq!(rate, 16000);
    assert!(audio.len() >= samples * 2);
    audio[..samples * 2].to_vec()
}

/// Streams `audio` to `model` with `options` in `start`, then `end`: every message until the
/// close, and the close code.
async fn stream(url: &str, model: &str, options: Value, audio: &[u8]) -> (Vec<Value>, CloseCode) {
    let mut ws = connect_to(url, model).await.unwrap();
    let mut start = json!({"type": "start", "sample_rate": 16000});
    start
        .as_object_mut()
        .unwrap()
        .extend(options.as_object().unwrap().clone());
    ws.send(Message::text(start.to_string())).await.unwrap();
    for frame in audio.chunks(4096) {
        ws.send(Message::binary(frame.to_vec())).await.unwrap();
    }
    ws.send(Message::text(json!({"type": "end"}).to_string()))
        .await
        .unwrap();
    read_to_close(&mut ws).await
}

/// Every text message until the server closes (or 30 s pass), and the close code.
async fn read_to_close(ws: &mut Socket) -> (Vec<Value>, CloseCode) {
    let mut messages: Vec<Value> = Vec::new();
    let read = async {
        while let Some(Ok(message)) = ws.next().await {
            match message {
                Message::Text(text) => messages.push(serde_json::from_str(&text).unwrap()),
                Message::Close(frame) => return frame.map(|f| (f.code, f.reason.to_string())),
                _ => {}
            }
        }
        None
    };
    let close = tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the server closes the stream")
        .expect("a close frame");
    assert!(
        close.0 == CloseCode::Normal || !messages.iter().any(|m| m["type"] == "summary"),
        "{close:?}"
    );
    (messages, close.0)
}

fn of_type<'a>(messages: &'a [Value], kind: &str) -> Vec<&'a Value> {
    messages.iter().filter(|m| m["type"] == kind).collect()
}

fn summary(messages: &[Value]) -> &Value {
    of_type(messages, "summary")
        .pop()
        .unwrap_or_else(|| panic!("no summary: {messages:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyword_times_never_pass_the_audio_received() {
    let url = bundled();
    // The second "hey marvin" ends at 12.0 s; the audio stops at 11.925 s, 45 ms into the
    // spotter's last 80 ms step. That step, its window completed with silence, still hears
    // the phrase: its score and its event are at the audio's end (they said 12.0).
    let samples = 190_800;
    let end = samples as f64 / 16000.0;
    let (messages, close) = stream(
        url,
        "hey_marvin",
        json!({"gate": false}),
        &cut("keyword_positive", samples),
    )
    .await;
    assert_eq!(close, CloseCode::Normal);
    assert_eq!(summary(&messages)["duration"], end);
    let scores = of_type(&messages, "score");
    let last = scores.last().unwrap();
    assert_eq!(last["t"], end, "{last}");
    assert!(scores.iter().all(|s| s["t"].as_f64().unwrap() <= end));
    let keywords = of_type(&messages, "keyword");
    assert_eq!(keywords.len(), 2, "{keywords:?}");
    assert_eq!(keywords[1]["t"], end, "{keywords:?}");
    assert_eq!(summary(&messages)["keywords"], 2);

    // The whole file, gated or not: 15.936 s of audio, the last score at its end (16.0).
    let (audio, _) = fixture_pcm16("keyword_positive");
    let duration = (audio.len() / 2) as f64 / 16000.0;
    for gate in [false, true] {
        let (messages, close) = stream(url, "hey_marvin", json!({"gate": gate}), &audio).await;
        assert_eq!(close, CloseCode::Normal);
        assert_eq!(summary(&messages)["duration"], duration);
        for m in of_type(&messages, "score")
            .into_iter()
            .chain(of_type(&messages, "keyword"))
        {
            assert!(m["t"].as_f64().unwrap() <= duration, "gate {gate}: {m}");
        }
        if !gate {
            assert_eq!(of_type(&messages, "score").last().unwrap()["t"], duration);
        }
    }
}

/// The one-shot endpoint's answer for `audio` (PCM16 at 16 kHz) with `query`.
async fn one_shot(url: &str, audio: &[u8], query: &str) -> Value {
    let response = client()
        .post(format!("{url}/v1/models/silero_vad/segments?{query}"))
        .body(pcm16_wav(audio))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_never_ends_after_the_audio() {
    let url = bundled();
    // The second phrase's silence closes its segment in the last, padded chunk; 2 s of
    // padding reach past the audio (8.466 s), and the segment ended at the chunk's end
    // (8.48 s). It ends where the audio does, over WebSocket and on the one-shot endpoint.
    let samples = 135_460;
    let end = samples as f64 / 16000.0;
    let audio = cut("two_phrases_16k", samples);
    let vad = json!({"results": "events", "vad": {"speech_pad_ms": 2000}});
    let (messages, close) = stream(url, "silero_vad", vad, &audio).await;
    assert_eq!(close, CloseCode::Normal);
    let summary = summary(&messages);
    assert_eq!(summary["duration"], end);
    let segments = summary["segments"].as_array().unwrap();
    assert_eq!(segments.len(), 2, "{summary}");
    assert_eq!(segments[1]["end"], end, "{summary}");
    for m in of_type(&messages, "speech_end") {
        assert!(m["t"].as_f64().unwrap() <= end, "{m}");
    }
    let answer = one_shot(url, &audio, "speech_pad_ms=2000").await;
    assert_eq!(answer["duration"], end);
    assert_eq!(answer["segments"], summary["segments"], "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_speech_start_always_gets_its_end_and_its_segment() {
    let url = bundled();
    // The second phrase starts at 5.346 s (85,536 samples) and the audio stops 3,950 samples
    // later: the padded last chunk reached min_speech_ms (4,000), the audio does not. It was
    // confirmed on the padding (a `speech_start`), then dropped at the end as too short: no
    // `speech_end`, and no segment in the summary.
    for samples in [85_536 + 3_950, 85_536 + 4_200, 85_536 + 3_000] {
        let audio = cut("two_phrases_16k", samples);
        let (messages, close) =
            stream(url, "silero_vad", json!({"results": "events"}), &audio).await;
        assert_eq!(close, CloseCode::Normal);
        let starts = of_type(&messages, "speech_start");
        let ends = of_type(&messages, "speech_end");
        let segments = summary(&messages)["segments"].as_array().unwrap().clone();
        assert_eq!(starts.len(), ends.len(), "{samples}: {messages:?}");
        assert_eq!(segments.len(), starts.len(), "{samples}: {messages:?}");
        for (segment, (start, end)) in segments.iter().zip(starts.iter().zip(&ends)) {
            assert_eq!(
                (&segment["start"], &segment["end"]),
                (&start["t"], &end["t"])
            );
            assert!(end["t"].as_f64().unwrap() <= samples as f64 / 16000.0);
        }
        // The one-shot endpoint agrees.
        let answer = one_shot(url, &audio, "").await;
        assert_eq!(answer["segments"].as_array().unwrap(), &segments);
    }
}

/// The bundled manifest with the embedding stage's output misnamed in `hey_marvin`'s stream.
fn misdeclared_manifest() -> String {
    let manifest = bundled_manifest().replace("output = \"conv2d_19\"", "output = \"conv2d_9\"");
    assert!(manifest.contains("conv2d_9"));
    manifest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declaration_that_does_not_fit_its_models_says_where() {
    // With the stage's model lazy, nothing is there to check the declaration against when
    // hey_marvin loads: it is refused at `start` (1008), with the stage, the manifest key and
    // the outputs the model has; the voice activity streams of the same server are unharmed.
    let manifest = misdeclared_manifest().replace(
        "name = \"ww_embedding\"\n",
        "name = \"ww_embedding\"\nload = \"lazy\"\n",
    );
    assert!(manifest.contains("load = \"lazy\""));
    let url = start(&model_dir(&manifest), |_| {});
    let mut ws = connect_to(&url, "hey_marvin").await.unwrap();
    let start = json!({"type": "start", "sample_rate": 16000});
    ws.send(Message::text(start.to_string())).await.unwrap();
    let (messages, close) = read_to_close(&mut ws).await;
    assert_eq!(close, CloseCode::Policy, "{messages:?}");
    let error = of_type(&messages, "error")
        .pop()
        .unwrap_or_else(|| panic!("{messages:?}"))["message"]
        .as_str()
        .unwrap()
        .to_string();
    for needle in [
        "stream stage 1 (ww_embedding)",
        "no output 'conv2d_9' (its outputs: conv2d_19)",
        "[models.stream] stages[1]",
    ] {
        assert!(error.contains(needle), "{needle}: {error}");
    }
    let (audio, _) = fixture_pcm16("two_phrases_16k");
    let (messages, close) = stream(&url, "silero_vad", json!({}), &audio).await;
    assert_eq!(close, CloseCode::Normal);
    assert_eq!(summary(&messages)["segments"].as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declaration_that_does_not_fit_its_models_is_refused_when_it_loads() {
    // The version loaded and reported ready; the deployer learnt of the mistake from the
    // first client's 1008. It is refused at load, with the reason, and the rest serve.
    let url = start(&model_dir(&misdeclared_manifest()), |_| {});
    let (_, list) = get(&client(), &format!("{url}/v2/models")).await;
    let model = |name: &str| common::model_row(&list, name).clone();
    let marvin = model("hey_marvin");
    assert_eq!(marvin["state"], "UNAVAILABLE", "{marvin}");
    let reason = marvin["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("ww_embedding")
            && reason.contains("conv2d_9")
            && reason.contains("stages[1]"),
        "{reason}"
    );
    for name in ["silero_vad", "ww_melspec", "ww_embedding"] {
        assert_eq!(model(name)["state"], "READY", "{list}");
    }
}
