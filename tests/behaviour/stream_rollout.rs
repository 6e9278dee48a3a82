//! Streams resumed across a fleet in the middle of a roll-out, on in-process servers: a token
//! key rotation in its three documented phases (new key second everywhere, then first, then
//! the old one removed), where every stream resumes on an instance of the phase before or
//! after, while putting the new key first in one step drops them; and a takeover onto an
//! instance that does not serve the stream's model version, which goes on from a fresh state
//! and says so, every result from the checkpoint on sent again, numbered after the client's.

use crate::common;

use std::path::PathBuf;
use std::time::Duration;

use common::stream_client::*;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

const OLD: &str = "0123456789abcdef0123456789abcdef-rotation-old-key";
const NEW: &str = "fedcba9876543210fedcba9876543210-rotation-new-key";

fn keys_file(lines: &[&str]) -> PathBuf {
    let path = common::fleet::temp_dir("rotation-keys").join("keys");
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

fn server_on(models: &std::path::Path, keys: &[&str]) -> String {
    let keys = keys_file(keys);
    start(models, |config| {
        config.stream_token_keys = Some(keys);
        config.stream_checkpoint_ms = 500;
    })
}

/// A stream on `url` with checkpoints, `start` options added, `secs` of the fixture sent: every
/// message it got (checkpoints included), until none came for a second; then it drops.
async fn stream_then_drop(url: &str, options: Value, secs: f64) -> Vec<Value> {
    let (audio, rate) = fixture_pcm16("two_phrases_16k");
    let mut start = json!({"type": "start", "checkpoints": true});
    start
        .as_object_mut()
        .unwrap()
        .extend(options.as_object().unwrap().clone());
    let mut ws = connect(url).await.unwrap();
    ws.send(Message::text(start.to_string())).await.unwrap();
    let bytes = (secs * f64::from(rate)) as usize * 2;
    for frame in audio[..bytes].chunks(2048) {
        ws.send(Message::binary(frame.to_vec())).await.unwrap();
    }
    let mut got = Vec::new();
    while let Ok(Some(Ok(message))) = tokio::time::timeout(Duration::from_secs(1), ws.next()).await
    {
        if let Message::Text(text) = message {
            got.push(serde_json::from_str(&text).unwrap());
        }
    }
    got
}

/// The newest checkpoint's token and the last result's seq.
fn newest(messages: &[Value]) -> (String, u64) {
    let checkpoint = messages
        .iter()
        .rfind(|m| m["type"] == "checkpoint")
        .expect("a checkpoint");
    let last = messages.iter().filter_map(|m| m["seq"].as_u64()).max();
    let token = checkpoint["token"].as_str().unwrap().to_string();
    (token, last.unwrap())
}

/// Resumes from `token` on `url`: `started`, or the close's code and reason.
async fn resume_on(url: &str, token: &str, last_seq: u64) -> Result<Value, (CloseCode, String)> {
    let mut ws = connect(url).await.unwrap();
    let start = json!({"type": "start", "resume": token, "last_seq": last_seq});
    ws.send(Message::text(start.to_string())).await.unwrap();
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                let m: Value = serde_json::from_str(&text).unwrap();
                if m["type"] == "started" {
                    return Ok(m);
                }
            }
            Some(Ok(Message::Close(frame))) => {
                let frame = frame.expect("a close frame");
                return Err((frame.code, frame.reason.to_string()));
            }
            Some(Ok(_)) => {}
            other => panic!("no answer: {other:?}"),
        }
    }
}

/// A stream checkpointed on `from` resumes on `to`.
async fn moves(from: &str, to: &str) -> Result<Value, (CloseCode, String)> {
    let (token, last) = newest(&stream_then_drop(from, json!({}), 1.5).await);
    resume_on(to, &token, last).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_rotated_in_three_phases_drops_no_stream_and_one_phase_would() {
    let models = repo().join("models");
    // Each phase is a rolling deploy: instances of the phase before and after serve together.
    let fleet = [
        server_on(&models, &[OLD]),
        server_on(&models, &[OLD, NEW]),
        server_on(&models, &[NEW, OLD]),
        server_on(&models, &[NEW]),
    ];
    for (phase, pair) in fleet.windows(2).enumerate() {
        for (from, to) in [(&pair[0], &pair[1]), (&pair[1], &pair[0])] {
            let started = moves(from, to).await;
            let started = started.unwrap_or_else(|e| panic!("phase {}: {e:?}", phase + 1));
            assert_eq!(started["resumed"], true);
        }
    }
    // The new key first while an instance does not have it yet: its tokens are refused there.
    let (code, reason) = moves(&fleet[2], &fleet[0]).await.unwrap_err();
    assert_eq!(code, CloseCode::Policy);
    assert!(reason.contains("does not accept"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_takeover_onto_another_version_says_its_state_is_fresh_and_sends_every_result_again() {
    let on_v2 = model_dir(&bundled_manifest().replace(
        "name = \"silero_vad\"\nversion = \"1\"",
        "name = \"silero_vad\"\nversion = \"2\"",
    ));
    let (v1, v2) = (
        server_on(&repo().join("models"), &[OLD]),
        server_on(&on_v2, &[OLD]),
    );
    // Speech events after the checkpoint the client resumes from, which another version (or
    // a fresh state) may place elsewhere: a seq would then name another result.
    let vad = json!({"vad": {"min_speech_ms": 0, "min_silence_ms": 0, "speech_pad_ms": 0}});
    let before = stream_then_drop(&v1, vad, 4.2).await;
    let checkpoints: Vec<&Value> = before
        .iter()
        .filter(|m| m["type"] == "checkpoint")
        .collect();
    let checkpoint = checkpoints[checkpoints.len() - 3];
    let last = before
        .iter()
        .filter_map(|m| m["seq"].as_u64())
        .max()
        .unwrap();
    let token = checkpoint["token"].as_str().unwrap();
    assert!(
        checkpoint["next_seq"].as_u64().unwrap() < last,
        "results after it"
    );

    let mut ws = connect(&v2).await.unwrap();
    let start = json!({"type": "start", "resume": token, "last_seq": last});
    ws.send(Message::text(start.to_string())).await.unwrap();
    let Some(Ok(Message::Text(text))) = ws.next().await else {
        panic!("no answer")
    };
    let started: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(started["version"], "2", "{started}");
    assert_eq!(started["fresh_state"], true, "{started}");
    assert_eq!(started["next_seq"], last + 1, "numbered after the client's");
    let from = started["samples_received"].as_u64().unwrap();
    assert_eq!(from, checkpoint["samples"].as_u64().unwrap());

    let (audio, rate) = fixture_pcm16("two_phrases_16k");
    let after = send_rest_and_results(&mut ws, &audio[from as usize * 2..], 2048).await;
    // Every seq once, on from the client's last...
    for (i, m) in after.iter().enumerate() {
        assert_eq!(m["seq"], last + 1 + i as u64, "gap or repeat at {i}: {m}");
    }
    // ...and every chunk from the checkpoint on, recomputed: none skipped.
    let chunk = started["chunk_samples"].as_u64().unwrap();
    let times: Vec<f64> = after
        .iter()
        .filter(|m| m["type"] == "vad")
        .map(|m| m["t"].as_f64().unwrap())
        .collect();
    let chunks = (audio.len() as u64 / 2 - from).div_ceil(chunk);
    assert_eq!(times.len() as u64, chunks);
    for (k, t) in times.iter().enumerate() {
        let want = (from + k as u64 * chunk) as f64 / f64::from(rate);
        assert!((t - want).abs() < 1e-3, "chunk {k}: t {t}, want {want}");
    }
}
