//! What an operator sees of resumes, on the real binary: each refused resume token (altered,
//! malformed, signed with a key the instance does not accept, of another model, expired) is
//! logged at warn with its reason and model, never the token, and counted in
//! `streamserve_stream_resume_refused_total{reason}`; each resume is logged with its stream
//! id and whether it was local or a takeover, and takeovers are counted by model.

mod common;

use std::time::Duration;

use common::fleet::*;
use common::stream_client::*;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

const FLEET_KEY: &str = "a-fleet-wide-stream-token-key-for-the-refusal-test";
const OTHER_KEY: &str = "another-fleets-stream-token-key-for-the-refusal-test";

/// Sends `start` to a stream of `model`: the first message, and the close if it was refused.
async fn start_on(url: &str, model: &str, start: Value) -> (Value, Option<(CloseCode, String)>) {
    let mut ws = connect_to(url, model).await.unwrap();
    ws.send(Message::text(start.to_string())).await.unwrap();
    let mut first = Value::Null;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Text(text))) if first.is_null() => {
                first = serde_json::from_str(&text).unwrap();
                if first["type"] == "started" {
                    return (first, None);
                }
            }
            Some(Ok(Message::Close(frame))) => {
                return (first, frame.map(|f| (f.code, f.reason.to_string())))
            }
            Some(Ok(_)) => {}
            _ => return (first, None),
        }
    }
}

/// A stream with checkpoints on `url`: its id, the newest token and the last seq, once 1.5 s
/// of audio went in; its connection is dropped.
async fn checkpointed(url: &str) -> (String, String, u64) {
    let (audio, _) = fixture_pcm16("two_phrases_16k");
    let mut ws = connect(url).await.unwrap();
    let start = json!({"type": "start", "checkpoints": true});
    ws.send(Message::text(start.to_string())).await.unwrap();
    for frame in audio[..48_000].chunks(2048) {
        ws.send(Message::binary(frame.to_vec())).await.unwrap();
    }
    let (mut id, mut token, mut last) = (String::new(), String::new(), 0);
    while let Ok(Some(Ok(Message::Text(text)))) =
        tokio::time::timeout(Duration::from_secs(1), ws.next()).await
    {
        let m: Value = serde_json::from_str(&text).unwrap();
        match m["type"].as_str() {
            Some("started") => id = m["stream_id"].as_str().unwrap().into(),
            Some("checkpoint") => token = m["token"].as_str().unwrap().into(),
            _ => last = m["seq"].as_u64().unwrap_or(last),
        }
    }
    assert!(!token.is_empty(), "a checkpoint");
    (id, token, last)
}

/// The JSON log lines whose message is `message`.
fn logged(instance: &Instance, message: &str) -> Vec<Value> {
    instance
        .logs()
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line["message"] == message)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_resumes_are_logged_and_counted_by_reason_and_resumes_say_how() {
    let dir = temp_dir("refusal-keys");
    let (keys, other_keys) = (dir.join("keys"), dir.join("other"));
    std::fs::write(&keys, FLEET_KEY).unwrap();
    std::fs::write(&other_keys, OTHER_KEY).unwrap();
    let models = repo().join("models");
    let instance = Instance::start(InstanceSetup {
        id: "r0",
        registry: temp_dir("unused-registry").to_str().unwrap(),
        models: &models,
        cache: &temp_dir("cache"),
        env: &[],
        extra: &[
            "--stream-token-keys",
            keys.to_str().unwrap(),
            "--stream-checkpoint-ms",
            "500",
            "--stream-resume-secs",
            "3",
        ],
    });
    let url = instance.url.clone();
    // Another instance of the fleet, and one of another fleet.
    let (fleet, stranger) = (
        start(&models, |c| {
            c.stream_token_keys = Some(keys);
            c.stream_checkpoint_ms = 500;
        }),
        start(&models, |c| {
            c.stream_token_keys = Some(other_keys);
            c.stream_checkpoint_ms = 500;
        }),
    );
    let (_, foreign, _) = checkpointed(&stranger).await;
    let (id, token, last) = checkpointed(&fleet).await;
    let mut altered: Vec<char> = token.chars().collect();
    let at = altered.len() / 3;
    altered[at] = if altered[at] == 'x' { 'y' } else { 'x' };
    let altered: String = altered.into_iter().collect();
    for (model, start, reason) in [
        ("silero_vad", json!({"resume": altered}), "tampered"),
        ("silero_vad", json!({"resume": "%%%"}), "malformed"),
        ("silero_vad", json!({"resume": foreign}), "unknown_key"),
        (
            "vad_energy",
            json!({"resume": token, "last_seq": last}),
            "wrong_model",
        ),
    ] {
        let mut start = start;
        start["type"] = "start".into();
        let (_, close) = start_on(&url, model, start.clone()).await;
        let (code, _) = close.unwrap_or_else(|| panic!("{start}: not refused"));
        assert_eq!(code, CloseCode::Policy, "{start}");
        let metrics = metrics_text(&client(), &url).await;
        let series = format!("streamserve_stream_resume_refused_total{{reason=\"{reason}\"}}");
        assert_eq!(sample(&metrics, &series), Some(1.0), "{series}\n{metrics}");
        let lines = logged(&instance, "stream resume refused");
        let line = lines
            .last()
            .unwrap_or_else(|| panic!("{reason}: not logged"));
        assert_eq!(line["level"], "WARN", "{line}");
        assert_eq!(line["reason"], reason, "{line}");
        assert_eq!(line["model"], model, "{line}");
    }

    // A takeover of the fleet's stream, then a local resume of it by its id.
    let (started, close) = start_on(
        &url,
        "silero_vad",
        json!({"type": "start", "resume": token, "last_seq": last}),
    )
    .await;
    assert_eq!(close, None, "{started}");
    let next = started["next_seq"].as_u64().unwrap();
    let resume = json!({"type": "start", "stream_id": id, "last_seq": next - 1});
    let (started, close) = start_on(&url, "silero_vad", resume).await;
    assert_eq!(close, None, "{started}");
    let resumed = logged(&instance, "stream resumed");
    let how: Vec<(&str, &str)> = resumed
        .iter()
        .map(|l| (l["how"].as_str().unwrap(), l["stream"].as_str().unwrap()))
        .collect();
    assert_eq!(how, [("takeover", id.as_str()), ("local", id.as_str())]);
    let metrics = metrics_text(&client(), &url).await;
    let takeovers = "streamserve_stream_takeovers_total{model=\"silero_vad\"}";
    assert_eq!(sample(&metrics, takeovers), Some(1.0), "{metrics}");

    // Expired: older than the resume window (3 s).
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let expired = json!({"type": "start", "resume": token, "last_seq": last});
    let (_, close) = start_on(&url, "silero_vad", expired).await;
    assert_eq!(close.map(|c| c.0), Some(CloseCode::Policy));
    let line = logged(&instance, "stream resume refused").pop().unwrap();
    assert_eq!(line["reason"], "expired", "{line}");
    assert_eq!(line["stream"], "", "{line}");

    // No token, whole or in part, is ever logged.
    let logs = instance.logs();
    for secret in [&token, &altered, &foreign] {
        assert!(!logs.contains(&secret[..40]), "a token was logged");
    }
}
