//! Resume at its edges, on in-process servers over real sockets with the bundled models: a
//! stream taken over from a checkpoint by a client that has results past it and then ends
//! without sending its audio again still gets its summary (over WebSocket and over a gRPC
//! sequence), numbered after the results it has and with none of them repeated; and a gRPC
//! step whose audio the stream took before a resume superseded its call is answered with its
//! results, not told it was superseded.

use crate::common;

use std::time::Duration;

use common::grpc_sequence::*;
use common::stream_client::*;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use streamserve::api::grpc::proto::inference::infer_parameter::ParameterChoice;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

/// Two instances of a fleet: they share the token keys, and checkpoint every 500 ms of audio.
fn fleet() -> (streamserve::server::Running, streamserve::server::Running) {
    let keys = keys_file();
    let instance = || {
        start_running(&repo().join("models"), |config| {
            config.stream_token_keys = Some(keys.clone());
            config.stream_checkpoint_ms = 500;
        })
    };
    (instance(), instance())
}

fn url(running: &streamserve::server::Running) -> String {
    format!("http://{}", running.addr)
}

/// Streams 2 s of the fixture with checkpoints and reads until the client has results at
/// least three past the newest checkpoint it got; then drops the socket. Returns that
/// checkpoint and the last `seq` the client has.
async fn past_a_checkpoint(url: &str) -> (Value, u64) {
    let (audio, rate) = fixture_pcm16("two_phrases_16k");
    let mut ws = connect(url).await.unwrap();
    let start = json!({"type": "start", "sample_rate": rate, "checkpoints": true});
    ws.send(Message::text(start.to_string())).await.unwrap();
    for frame in audio[..4 * rate as usize].chunks(2048) {
        ws.send(Message::binary(frame.to_vec())).await.unwrap();
    }
    let (mut checkpoint, mut last_seq) = (Value::Null, None::<u64>);
    loop {
        let next = tokio::time::timeout(Duration::from_secs(30), ws.next()).await;
        let Ok(Some(Ok(Message::Text(text)))) = next else {
            panic!("the stream ended early: {next:?}");
        };
        let m: Value = serde_json::from_str(&text).unwrap();
        if m["type"] == "checkpoint" {
            checkpoint = m;
        } else if let Some(seq) = m["seq"].as_u64() {
            last_seq = Some(seq);
        }
        if let (Some(next_seq), Some(last)) = (checkpoint["next_seq"].as_u64(), last_seq) {
            if last >= next_seq + 3 {
                return (checkpoint, last);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_websocket_takeover_ended_without_its_audio_gets_its_summary() {
    let (a, b) = fleet();
    let (checkpoint, last_seq) = past_a_checkpoint(&url(&a)).await;
    let token = checkpoint["token"].as_str().unwrap();

    // On B, which never saw the stream: the client has results past the checkpoint, and ends
    // the stream without sending its audio from the checkpoint again.
    let mut ws = connect(&url(&b)).await.unwrap();
    let resume = json!({"type": "start", "resume": token, "last_seq": last_seq});
    ws.send(Message::text(resume.to_string())).await.unwrap();
    let end = json!({"type": "end"});
    ws.send(Message::text(end.to_string())).await.unwrap();
    let mut messages = Vec::new();
    let close = loop {
        let next = tokio::time::timeout(Duration::from_secs(30), ws.next()).await;
        match next.expect("the server answers within 30 s") {
            Some(Ok(Message::Text(text))) => {
                messages.push(serde_json::from_str::<Value>(&text).unwrap())
            }
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => {}
            other => panic!("the connection broke: {other:?}"),
        }
    };
    assert_eq!(messages[0]["type"], "started", "{messages:?}");
    assert_eq!(messages[0]["samples_received"], checkpoint["samples"]);
    let results: Vec<&Value> = messages.iter().filter(|m| m.get("seq").is_some()).collect();
    let summary = results
        .iter()
        .find(|m| m["type"] == "summary")
        .unwrap_or_else(|| panic!("no summary: {messages:?}"));
    assert_eq!(
        summary["seq"],
        last_seq + 1,
        "numbered after the client's results"
    );
    let samples = checkpoint["samples"].as_f64().unwrap();
    assert_eq!(summary["duration"].as_f64().unwrap(), samples / 16000.0);
    for m in &results {
        assert!(m["seq"].as_u64().unwrap() > last_seq, "repeated: {m}");
    }
    let close = close.expect("a close frame");
    assert_eq!(close.code, CloseCode::Normal, "{close:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grpc_takeover_ended_without_its_audio_gets_its_summary() {
    let (a, b) = fleet();
    let (pcm, _) = fixture();
    // 42 whole chunks; checkpoints at 16 and 32: ten chunks' results past the newest.
    let mut ca = grpc_client(&a).await;
    let old = checkpointed(&mut ca, &pcm[..22_000]).await;
    assert!(old.samples < 21_504, "a checkpoint before the last results");

    let mut cb = grpc_client(&b).await;
    let mut call = Call::open(&mut cb, None).await;
    let resume = [
        ("resume", ParameterChoice::StringParam(old.token.clone())),
        ("last_seq", ParameterChoice::Int64Param(old.last_seq)),
    ];
    let r = call.ok(step(1, true, false, Samples::None, &resume)).await;
    assert_eq!(int(&r, "samples_received") as usize, old.samples);
    assert!(u64s(&r, "seq").is_empty(), "nothing the client has is sent");
    let r = call.ok(step(1, false, true, Samples::None, &[])).await;
    assert!(
        r.parameters.contains_key("duration"),
        "the end's answer carries the summary: {r:?}"
    );
    assert_eq!(real(&r, "duration"), old.samples as f64 / 16000.0);
    assert!(
        r.outputs.iter().any(|o| o.name == "segments"),
        "segments: {r:?}"
    );
    assert_eq!(int(&r, "last_seq"), old.last_seq + 1);
    assert!(u64s(&r, "seq").is_empty(), "nothing the client has is sent");
}

/// A step's audio is taken by the stream, and while its first chunk is in the model (made
/// slow, 1.5 s, by an injected fault), a newer call resumes the stream: the step's audio
/// counted (the resume's `samples_received` holds it), so the step is answered with its
/// results, the same as the newer call gets; the old call's next step is superseded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_step_whose_audio_counted_is_not_told_it_was_superseded() {
    let running = start_running(&repo().join("models"), |config| {
        config.admin_token = Some("t".into());
    });
    let (pcm, _) = fixture();
    let steps: Vec<&[i16]> = pcm[16_000..24_192].chunks(2048).collect();
    let mut c = grpc_client(&running).await;
    let mut old = Call::open(&mut c, None).await;
    let (mut stream_id, mut last_seq) = (String::new(), 0);
    for (i, audio) in steps[..2].iter().enumerate() {
        let r = old
            .ok(step(1, i == 0, false, Samples::Pcm(audio), &[]))
            .await;
        if i == 0 {
            stream_id = text(&r, "stream_id");
        }
        last_seq = int(&r, "last_seq");
    }
    let slow = json!({"fault": {"kind": "slow", "ms": 1500}, "count": 1});
    inject_fault(&client(), &url(&running), "t", "silero_vad", slow).await;
    old.tx
        .send(step(1, false, false, Samples::Pcm(steps[2]), &[]))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut new = Call::open(&mut c, None).await;
    let resume = [
        ("stream_id", ParameterChoice::StringParam(stream_id)),
        ("last_seq", ParameterChoice::Int64Param(last_seq)),
    ];
    let resumed = new.ok(step(2, true, false, Samples::None, &resume)).await;
    assert_eq!(
        int(&resumed, "samples_received"),
        3 * 2048,
        "the stream took the third step's audio before the resume"
    );
    let answered = answer(&mut old.answers).await;
    assert_eq!(answered.error_message, "", "{answered:?}");
    let answered = answered.infer_response.unwrap();
    let (mut mine, mut theirs) = (Results::default(), Results::default());
    mine.add(&answered);
    assert_eq!(mine.vad.len(), 4, "its four chunks: {answered:?}");
    assert!(mine.vad[0].0 > last_seq as u64, "none the client had");

    let late = step(1, false, false, Samples::Pcm(steps[3]), &[]);
    old.refused(late, "superseded by a newer connection").await;
    theirs.add(&resumed);
    let r = new
        .ok(step(2, false, true, Samples::Pcm(steps[3]), &[]))
        .await;
    theirs.add(&r);
    assert_eq!(int(&r, "chunks"), 16, "each sample counted once");
    assert_eq!(real(&r, "duration"), 8192.0 / 16000.0);
    assert_eq!(
        theirs.vad[..4],
        mine.vad[..],
        "the newer call got the same results"
    );
    assert_eq!(theirs.vad.len(), 8, "each chunk once");
    assert!(
        theirs.vad.windows(2).all(|w| w[0].0 < w[1].0),
        "in order, none repeated"
    );
}
