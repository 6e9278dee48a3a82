//! Stream declarations the models cannot serve are refused up front, with the reason, rather
//! than accepted and then hanging or failing at a stream's first step: a first stage whose
//! hop is more audio than a stream may buffer (the stream used to wait for itself for ever), a
//! first stage with a prefill other than its context (a `vad` result's `t` wrapped around to
//! 1.15e15 s), a sample rate or window the model's input rules refuse (the version loaded,
//! and each stream then failed with 1011), and a keyword stream declared at a rate its front
//! end cannot take (refused at `start` with 1008, and the stream beside it unharmed).

use crate::common;

use std::time::Duration;

use common::stream_client::*;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

const SILERO_SHA: &str = "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3";
const ENERGY_SHA: &str = "d3e5cb4bc2d769cee73ff2eac750e7850ff0353535c6777fdf6b4832f43bf4a8";

/// A voice activity model `name` on the bundled `model` (silero_vad, with the bundled
/// manifest's input rules, or vad_energy), whose stream declaration has `rates` as its
/// `sample_rates` and `input` as its window.
fn vad_manifest(name: &str, model: &str, rates: &str, input: &str) -> String {
    let (sha, rules) = match model {
        "silero_vad" => (
            SILERO_SHA,
            "inputs.input = { shapes = [[-1, 576], [-1, 288]], paired_with = \"sr\" }\n\
             inputs.sr = { values = [16000, 8000] }",
        ),
        _ => (ENERGY_SHA, ""),
    };
    format!(
        r#"
        [[models]]
        name = "{name}"
        version = "1"
        file = "{{models}}/{model}/1/model.onnx"
        sha256 = "{sha}"
        max_batch_size = 64
        batch_axes = {{ state = 1, stateN = 1, sr = "shared" }}
        {rules}
        [models.stream]
        kind = "vad"
        sample_rates = {rates}
        input = {input}
        output = "output"
        state = {{ state = "stateN" }}
        constants = {{ sr = "sample_rate" }}
        "#
    )
}

/// Starting a server on `manifest` fails; the error's text.
fn refused_at_start(manifest: &str) -> String {
    let config = streamserve::config::Config {
        host: "127.0.0.1".into(),
        port: 0,
        models: model_dir(manifest),
        ..Default::default()
    };
    match streamserve::server::spawn(config) {
        Ok(_) => panic!("a server started on a stream declaration it cannot serve"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn a_first_stage_hop_past_the_streams_buffer_is_refused_at_load() {
    // 5 s a step at 16 kHz: 80,000 samples, more than the 65,536 a stream buffers. The
    // server stopped reading the socket at 65,536 and never stepped: the client hung, its
    // `end` unread, and not even the idle timeout closed the stream.
    let input = "{ tensor = \"input\", window_ms = 5000, hop_ms = 5000 }";
    let err = refused_at_start(&vad_manifest("energy_x", "vad_energy", "[16000]", input));
    assert!(
        err.contains("energy_x") && err.contains("80000 samples at 16000 Hz"),
        "{err}"
    );
    // 2.5 s (40,000 samples): it fits the buffer alone, but not beside a 64 KiB frame
    // waiting for room: a client sending full frames hung after six of them.
    let input = "{ tensor = \"input\", window_ms = 2500, hop_ms = 2500 }";
    let err = refused_at_start(&vad_manifest("energy_x", "vad_energy", "[16000]", input));
    assert!(err.contains("at most 32768"), "{err}");
}

#[test]
fn a_first_stage_prefill_other_than_its_context_is_refused_at_load() {
    // The first step then took 16 samples, not a hop of 512, and the `vad` result's chunk
    // start (`t`, counted back one hop) wrapped around below zero.
    let input = "{ tensor = \"input\", window_ms = 36, hop_ms = 32, prefill = 560 }";
    let err = refused_at_start(&vad_manifest("vad_x", "silero_vad", "[16000]", input));
    assert!(
        err.contains("vad_x") && err.contains("prefill is its context, window - hop (64"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rates_and_windows_the_model_refuses_are_refused_when_it_loads() {
    // Silero's manifest rules take 576 samples with sr 16000 and 288 with 8000: a stream at
    // 48 kHz (1,728 samples, sr 48000), or a 40 ms window at 16 kHz (640), is not a request
    // the model takes. Both loaded, and every such stream failed with 1011 at its first step.
    let input_36 = "{ tensor = \"input\", window_ms = 36, hop_ms = 32 }";
    let input_40 = "{ tensor = \"input\", window_ms = 40, hop_ms = 32 }";
    let manifest = [
        vad_manifest("vad_48k", "silero_vad", "[16000, 8000, 48000]", input_36),
        vad_manifest("vad_40ms", "silero_vad", "[16000]", input_40),
        vad_manifest("vad_ok", "silero_vad", "[16000, 8000]", input_36),
    ]
    .concat();
    let url = start(&model_dir(&manifest), |_| {});
    let c = client();
    let (_, list) = get(&c, &format!("{url}/v2/models")).await;
    let model = |name: &str| common::model_row(&list, name).clone();
    for (name, needle) in [("vad_48k", "at 48000 Hz"), ("vad_40ms", "[1, 640]")] {
        let m = model(name);
        assert_eq!(m["state"], "UNAVAILABLE", "{m}");
        let reason = m["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("stream") && reason.contains(needle),
            "{name}: {reason}"
        );
    }
    // A declaration the model takes is served at each of its rates.
    assert_eq!(model("vad_ok")["state"], "READY", "{list}");
    let (audio, rate) = fixture_pcm16("two_phrases_16k");
    let (summary, close) = stream_to_the_end(&url, "vad_ok", json!({}), &audio).await;
    assert_eq!(close, Some(CloseCode::Normal), "{summary:?}");
    assert_eq!(summary.unwrap()["segments"].as_array().unwrap().len(), 2);
    assert_eq!(rate, 16000);
    let silence_8k = vec![0u8; 8000 * 2];
    let (summary, close) =
        stream_to_the_end(&url, "vad_ok", json!({"sample_rate": 8000}), &silence_8k).await;
    assert_eq!(close, Some(CloseCode::Normal), "{summary:?}");
    assert_eq!(summary.unwrap()["duration"], 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyword_stream_at_a_rate_its_front_end_cannot_take_is_refused_at_start() {
    // hey_marvin declared at 16 and 8 kHz: its mel front end takes 1,760 samples a step, and
    // 110 ms at 8 kHz is 880. The stream opened and failed with 1011 ("inference failed") at
    // its first step. With the front end loaded first, hey_marvin is refused when it loads,
    // naming the stage.
    let manifest = bundled_manifest().replace(
        "kind = \"keyword\"\nphrase",
        "kind = \"keyword\"\nsample_rates = [16000, 8000]\nphrase",
    );
    assert!(manifest.contains("sample_rates = [16000, 8000]\nphrase"));
    let eager = start(&model_dir(&manifest), |_| {});
    let (_, list) = get(&client(), &format!("{eager}/v2/models")).await;
    let row = common::model_row(&list, "hey_marvin").to_string();
    assert!(
        row.contains("UNAVAILABLE") && row.contains("ww_melspec"),
        "{row}"
    );
    // With the front end lazy, the declaration is checked at `start`: 1008 and the stage
    // that cannot take the rate.
    let manifest = manifest.replace(
        "name = \"ww_melspec\"\n",
        "name = \"ww_melspec\"\nload = \"lazy\"\n",
    );
    assert!(manifest.contains("load = \"lazy\""));
    let url = start(&model_dir(&manifest), |_| {});
    let mut ws = connect_to(&url, "hey_marvin").await.unwrap();
    let start = json!({"type": "start", "sample_rate": 8000});
    ws.send(Message::text(start.to_string())).await.unwrap();
    ws.send(Message::binary(vec![0u8; 8000 * 2])).await.unwrap();
    let (messages, close) = read_to_close(&mut ws).await;
    let (code, reason) = close.expect("a close frame");
    assert_eq!(code, CloseCode::Policy, "{reason} {messages:?}");
    assert!(
        reason.contains("ww_melspec") && !messages.iter().any(|m| m["type"] == "started"),
        "{reason} {messages:?}"
    );
    // At 16 kHz the same server spots the phrase.
    let (audio, _) = fixture_pcm16("keyword_positive");
    let (summary, close) = stream_to_the_end(&url, "hey_marvin", json!({}), &audio).await;
    assert_eq!(close, Some(CloseCode::Normal), "{summary:?}");
    assert_eq!(summary.unwrap()["keywords"], 2);
}

/// Streams `audio` (PCM16) to `model` with `options` in `start`, then `end`; the summary and
/// the close code.
async fn stream_to_the_end(
    url: &str,
    model: &str,
    options: Value,
    audio: &[u8],
) -> (Option<Value>, Option<CloseCode>) {
    let mut ws = connect_to(url, model).await.unwrap();
    let mut start = json!({"type": "start"});
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
    let (messages, close) = read_to_close(&mut ws).await;
    let summary = messages.into_iter().find(|m| m["type"] == "summary");
    (summary, close.map(|(code, _)| code))
}

/// Every text message until the server closes (or 30 s pass), and the close frame.
async fn read_to_close(ws: &mut Socket) -> (Vec<Value>, Option<(CloseCode, String)>) {
    let mut messages = Vec::new();
    let read = async {
        while let Some(Ok(message)) = ws.next().await {
            match message {
                Message::Text(text) => messages.push(serde_json::from_str(&text).unwrap()),
                Message::Close(frame) => {
                    return frame.map(|f| (f.code, f.reason.to_string()));
                }
                _ => {}
            }
        }
        None
    };
    let close = tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the server closes the stream");
    (messages, close)
}
