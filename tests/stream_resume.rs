//! Streams that survive their instance, on in-process servers that share the fleet's token
//! keys: a stream resumes on another instance from its last checkpoint, and a server that
//! shuts down hands its streams over; both give exactly the results of an uninterrupted run,
//! each once. Tokens that are altered, of another stream, replayed, expired, signed with a key
//! no longer accepted, or of a stream that ended, are refused with 1008 and the reason, while
//! a well-behaved stream beside them carries on.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::stream_client::*;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use streamserve::config::Config;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

const KEY_A: &str = "0123456789abcdef0123456789abcdef-fleet-key-a";
const KEY_B: &str = "fedcba9876543210fedcba9876543210-fleet-key-b";

fn keys_file(lines: &[&str]) -> PathBuf {
    let path = common::fleet::temp_dir("stream-keys").join("keys");
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

fn server(keys: Option<PathBuf>, tweak: impl FnOnce(&mut Config)) -> streamserve::server::Running {
    start_running(&repo().join("models"), |config| {
        config.stream_token_keys = keys;
        config.stream_checkpoint_ms = 500;
        tweak(config);
    })
}

fn url(running: &streamserve::server::Running) -> String {
    format!("http://{}", running.addr)
}

/// The results of one uninterrupted stream of the fixture.
async fn uninterrupted(url: &str) -> Run {
    let (audio, rate) = fixture_pcm16("two_phrases_16k");
    let run = stream_resumable(&[url.to_string()], &audio, rate, 2048, Duration::ZERO, 0).await;
    assert!(matches!(run.ends[..], [Ended::Done]), "{:?}", run.ends);
    run
}

fn assert_same_results(got: &Run, want: &Run) {
    assert!(got.out_of_order.is_empty(), "{:?}", got.out_of_order);
    assert_eq!(got.results.len(), want.results.len(), "as many results");
    for (a, b) in got.results.iter().zip(&want.results) {
        assert_eq!(a, b, "the same result, to the last digit");
    }
}

/// Connects to `url` and resumes from `token` with `last_seq`; the socket and its `started`.
async fn resume_from(url: &str, token: &str, last_seq: u64) -> (Socket, Value) {
    let mut ws = connect(url).await.unwrap();
    ws.send(Message::text(
        json!({"type": "start", "resume": token, "last_seq": last_seq}).to_string(),
    ))
    .await
    .unwrap();
    let Some(Ok(Message::Text(text))) = ws.next().await else {
        panic!("no answer")
    };
    let started: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(started["type"], "started", "{started}");
    (ws, started)
}

/// Opens a stream and sends `start`; returns what the server answered first, and its close
/// (none when it answered `started`: the connection is then dropped).
async fn start_with(url: &str, start: Value) -> (Value, Option<(CloseCode, String)>) {
    start_on(url, "silero_vad", start).await
}

/// [`start_with`] on a stream of `model`.
async fn start_on(url: &str, model: &str, start: Value) -> (Value, Option<(CloseCode, String)>) {
    let mut ws = connect_to(url, model).await.unwrap();
    ws.send(Message::text(start.to_string())).await.unwrap();
    let mut first = Value::Null;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Text(text))) => {
                if first.is_null() {
                    first = serde_json::from_str(&text).unwrap();
                    if first["type"] == "started" {
                        return (first, None);
                    }
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

/// Streams half the fixture with checkpoints on, then drops the socket (no close frame);
/// returns the stream id, the results and the newest checkpoint seen.
async fn half_a_stream(url: &str) -> (String, Vec<Value>, Value) {
    let (audio, rate) = fixture_pcm16("two_phrases_16k");
    let mut ws = connect(url).await.unwrap();
    ws.send(Message::text(
        json!({"type": "start", "sample_rate": rate, "checkpoints": true}).to_string(),
    ))
    .await
    .unwrap();
    for frame in audio[..audio.len() / 2].chunks(2048) {
        ws.send(Message::binary(frame.to_vec())).await.unwrap();
    }
    let mut results = Vec::new();
    let mut checkpoint = Value::Null;
    let mut stream_id = String::new();
    // Read until two checkpoints have come (1 s of audio at 500 ms each).
    let mut seen = 0;
    while seen < 2 {
        let Some(Ok(Message::Text(text))) = ws.next().await else {
            panic!("the stream ended early");
        };
        let m: Value = serde_json::from_str(&text).unwrap();
        match m["type"].as_str() {
            Some("checkpoint") => {
                seen += 1;
                checkpoint = m;
            }
            Some("started") => stream_id = m["stream_id"].as_str().unwrap().to_string(),
            _ => results.push(m),
        }
    }
    drop(ws);
    (stream_id, results, checkpoint)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_resumes_on_another_instance_from_its_checkpoint() {
    let keys = keys_file(&[KEY_A]);
    let (a, b) = (
        server(Some(keys.clone()), |_| {}),
        server(Some(keys), |_| {}),
    );
    let want = uninterrupted(&url(&a)).await;
    let (stream_id, mut results, checkpoint) = half_a_stream(&url(&a)).await;
    let last_seq = results.last().unwrap()["seq"].as_u64().unwrap();
    let token = checkpoint["token"].as_str().unwrap();
    assert!(checkpoint["samples"].as_u64().unwrap() > 0, "{checkpoint}");

    // On B, which never saw the stream: it takes it over from the token.
    let (audio, _) = fixture_pcm16("two_phrases_16k");
    let (mut ws, started) = resume_from(&url(&b), token, last_seq).await;
    assert_eq!(started["resumed"], true);
    assert_eq!(started["stream_id"], stream_id.as_str());
    let from = started["samples_received"].as_u64().unwrap() as usize * 2;
    assert_eq!(
        from as u64,
        checkpoint["samples"].as_u64().unwrap() * 2,
        "re-send from the checkpoint"
    );
    results.extend(send_rest_and_results(&mut ws, &audio[from..], 2048).await);
    let got = Run {
        results,
        ..Run::default()
    };
    for (i, m) in got.results.iter().enumerate() {
        assert_eq!(m["seq"], i as u64, "gap or repeat at {i}: {m}");
    }
    assert_same_results(&got, &want);
    let metrics = metrics_text(&client(), &url(&b)).await;
    // (Servers in this test binary share one metrics recorder: at least this takeover.)
    assert!(
        counter(&metrics, "streamserve_stream_takeovers_total", "silero_vad") >= 1.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shutdown_hands_its_streams_over_to_another_instance() {
    let keys = keys_file(&[KEY_A]);
    let a = server(Some(keys.clone()), |config| config.drain_secs = 5);
    let b = server(Some(keys), |_| {});
    let want = uninterrupted(&url(&b)).await;
    // A balancer in miniature: the first connection goes to A, every later one to B.
    let (audio, rate) = fixture_pcm16("two_phrases_16k");
    let urls = vec![url(&a), url(&b)];
    let stream = tokio::spawn(async move {
        stream_resumable(&urls, &audio, rate, 1024, Duration::from_millis(8), 3).await
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    a.shutdown().await;
    let got = stream.await.unwrap();
    assert_eq!(got.resumes, 1, "{:?}", got.ends);
    match &got.ends[0] {
        Ended::Closed(CloseCode::Away, reason) => {
            assert!(
                reason.contains("resume from the last checkpoint"),
                "{reason}"
            )
        }
        other => panic!("A should close with 1001 after its checkpoint: {other:?}"),
    }
    assert_same_results(&got, &want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_tokens_are_refused_with_reasons_while_a_good_stream_carries_on() {
    let keys = keys_file(&[KEY_A]);
    let a = server(Some(keys.clone()), |config| config.stream_resume_secs = 3);
    let a_url = url(&a);
    let good = {
        let a_url = a_url.clone();
        tokio::spawn(async move {
            let (audio, rate) = fixture_pcm16("two_phrases_16k");
            stream_resumable(&[a_url], &audio, rate, 2048, Duration::from_millis(4), 0).await
        })
    };
    let (stream_id, results, checkpoint) = half_a_stream(&a_url).await;
    let token = checkpoint["token"].as_str().unwrap().to_string();
    let last_seq = results.last().unwrap()["seq"].as_u64().unwrap();
    let (other_id, _, other) = half_a_stream(&a_url).await;
    let other_token = other["token"].as_str().unwrap().to_string();
    assert_ne!(stream_id, other_id);

    // Altered: one character of the signed part changed.
    let mut chars: Vec<char> = token.chars().collect();
    let at = chars.len() / 3;
    chars[at] = if chars[at] == 'x' { 'y' } else { 'x' };
    let altered: String = chars.into_iter().collect();
    // Signed by a key this instance does not have (another fleet, or rotated out).
    let stranger = server(Some(keys_file(&[KEY_B])), |_| {});
    let stranger_url = url(&stranger);
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            &a_url,
            json!({"type": "start", "resume": altered}),
            "altered",
        ),
        (
            &a_url,
            json!({"type": "start", "resume": "%%%"}),
            "malformed",
        ),
        (
            &a_url,
            json!({"type": "start", "resume": other_token, "stream_id": stream_id}),
            "belongs to another stream",
        ),
        (
            &stranger_url,
            json!({"type": "start", "resume": token}),
            "does not accept",
        ),
    ];
    let refused_elsewhere = [
        // A token of a silero_vad stream on another model's URL.
        (
            "vad_energy",
            json!({"type": "start", "resume": token, "last_seq": last_seq}),
            "not 'vad_energy'",
        ),
        // Without the results before the checkpoint: the token does not hold them.
        (
            "silero_vad",
            json!({"type": "start", "resume": token}),
            "resume with last_seq",
        ),
        (
            "silero_vad",
            json!({"type": "start", "resume": token, "last_seq": 0}),
            "resume with last_seq",
        ),
    ];
    for (model, start, want) in refused_elsewhere {
        let (first, close) = start_on(&a_url, model, start.clone()).await;
        let (code, reason) = close.unwrap_or_else(|| panic!("{start}: no close frame"));
        assert_eq!(code, CloseCode::Policy, "{start}: {reason}");
        assert!(
            reason.contains(want) || first["message"].as_str().unwrap_or("").contains(want),
            "{start}: {reason} / {first}"
        );
    }
    for (url, start, want) in cases {
        let (first, close) = start_with(url, start.clone()).await;
        let (code, reason) = close.unwrap_or_else(|| panic!("{start}: no close frame"));
        assert_eq!(code, CloseCode::Policy, "{start}: {reason}");
        assert!(
            reason.contains(want) || first["message"].as_str().unwrap_or("").contains(want),
            "{start}: {reason} / {first}"
        );
    }

    // Replay: the stream is resumed from a newer checkpoint; the older token is then refused.
    let mut newer = connect(&a_url).await.unwrap();
    newer
        .send(Message::text(
            json!({"type": "start", "stream_id": stream_id, "last_seq": last_seq}).to_string(),
        ))
        .await
        .unwrap();
    let (audio, _) = fixture_pcm16("two_phrases_16k");
    let mut newest = Value::Null;
    let mut frames = audio[audio.len() / 2..].chunks(2048);
    while newest.is_null() {
        if let Some(frame) = frames.next() {
            newer.send(Message::binary(frame.to_vec())).await.unwrap();
        }
        if let Ok(Some(Ok(Message::Text(text)))) =
            tokio::time::timeout(Duration::from_millis(50), newer.next()).await
        {
            let m: Value = serde_json::from_str(&text).unwrap();
            if m["type"] == "checkpoint" {
                newest = m;
            }
        }
    }
    drop(newer);
    let newest_last = newest["next_seq"].as_u64().unwrap() - 1;
    let (first, close) = start_with(
        &a_url,
        json!({"type": "start", "resume": newest["token"], "last_seq": newest_last}),
    )
    .await;
    // The newest token is taken.
    assert_eq!((first["type"].as_str(), close), (Some("started"), None));
    let old = json!({"type": "start", "resume": token, "last_seq": newest_last});
    let (_, close) = start_with(&a_url, old).await;
    let (code, reason) = close.unwrap();
    assert_eq!(code, CloseCode::Policy);
    assert!(reason.contains("superseded"), "{reason}");

    // Expired: older than the resume window (3 s here).
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let (first, close) = start_with(&a_url, json!({"type": "start", "resume": other_token})).await;
    let (code, reason) = close.unwrap();
    assert_eq!(code, CloseCode::Policy);
    assert!(
        first["message"].as_str().unwrap().contains("expired"),
        "{reason} / {first}"
    );

    // The good stream never noticed.
    let good = good.await.unwrap();
    assert!(matches!(good.ends[..], [Ended::Done]), "{:?}", good.ends);
    assert!(good.out_of_order.is_empty());
    assert!(good.checkpoints >= 4, "{}", good.checkpoints);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_of_a_stream_that_ended_is_refused_and_keys_rotate() {
    // Old key first; a rotated instance signs with the new key and still takes old tokens.
    let old = server(Some(keys_file(&[KEY_A])), |_| {});
    let rotated = server(Some(keys_file(&[KEY_B, KEY_A])), |_| {});
    let new_only = server(Some(keys_file(&[KEY_B])), |_| {});
    let (audio, _) = fixture_pcm16("two_phrases_16k");
    let (_, results, checkpoint) = half_a_stream(&url(&old)).await;
    let last_seq = results.last().unwrap()["seq"].as_u64().unwrap();
    // The rotated instance takes the old token, and its own checkpoints use the new key.
    let urls = [url(&rotated)];
    let mut ws = connect(&urls[0]).await.unwrap();
    ws.send(Message::text(
        json!({"type": "start", "resume": checkpoint["token"], "last_seq": last_seq}).to_string(),
    ))
    .await
    .unwrap();
    let from = match ws.next().await {
        Some(Ok(Message::Text(text))) => {
            let started: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(started["type"], "started", "{started}");
            started["samples_received"].as_u64().unwrap() as usize * 2
        }
        other => panic!("{other:?}"),
    };
    let mut new_token = Value::Null;
    let mut new_last = 0;
    let mut summary_seq = None;
    for frame in audio[from..].chunks(2048) {
        ws.send(Message::binary(frame.to_vec())).await.unwrap();
    }
    ws.send(Message::text(json!({"type": "end"}).to_string()))
        .await
        .unwrap();
    while let Some(Ok(message)) = ws.next().await {
        if let Message::Text(text) = message {
            let m: Value = serde_json::from_str(&text).unwrap();
            if m["type"] == "checkpoint" {
                new_token = m["token"].clone();
                new_last = m["next_seq"].as_u64().unwrap() - 1;
            } else if m["type"] == "summary" {
                summary_seq = m["seq"].as_u64();
            }
        }
    }
    assert!(new_token.is_string(), "checkpoints after the takeover");
    let summary_seq = summary_seq.expect("the summary");
    let resume = json!({"type": "start", "resume": new_token, "last_seq": new_last});
    // Signed with the new key: the instance that only has the new key takes it...
    let (first, close) = start_with(&url(&new_only), resume).await;
    assert_eq!((first["type"].as_str(), close), (Some("started"), None));
    // ...but the stream ended on the rotated instance, and the client has its summary: there,
    // its tokens are refused (one that missed the end gets it: stream_summary_resume.rs).
    let ended = json!({"type": "start", "resume": new_token, "last_seq": summary_seq});
    let (_, close) = start_with(&urls[0], ended).await;
    let (code, reason) = close.unwrap();
    assert_eq!(code, CloseCode::Policy);
    assert!(reason.contains("has ended"), "{reason}");
}

/// Sends `audio` after a resume until a checkpoint past sample `past` comes; returns the
/// results seen and that checkpoint, then drops the connection.
async fn resume_until_checkpoint(
    url: &str,
    token: &str,
    last_seq: u64,
    audio: &[u8],
    past: u64,
) -> (Vec<Value>, Value) {
    let (mut ws, started) = resume_from(url, token, last_seq).await;
    let from = started["samples_received"].as_u64().unwrap() as usize * 2;
    let mut frames = audio[from..].chunks(2048);
    let mut results = Vec::new();
    loop {
        if let Some(frame) = frames.next() {
            ws.send(Message::binary(frame.to_vec())).await.unwrap();
        }
        if let Ok(Some(Ok(Message::Text(text)))) =
            tokio::time::timeout(Duration::from_millis(30), ws.next()).await
        {
            let m: Value = serde_json::from_str(&text).unwrap();
            if m["type"] == "checkpoint" {
                if m["samples"].as_u64().unwrap() > past {
                    return (results, m);
                }
                continue;
            }
            results.push(m);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_copy_of_a_stream_gives_way_to_a_newer_checkpoint() {
    let keys = keys_file(&[KEY_A]);
    let (a, b) = (
        server(Some(keys.clone()), |_| {}),
        server(Some(keys), |_| {}),
    );
    let want = uninterrupted(&url(&a)).await;
    let (audio, _) = fixture_pcm16("two_phrases_16k");
    // On A, then on B (A keeps its copy of the stream, alive, for the resume window, with all
    // the audio A got: half of it), until B is past that half...
    let (_, mut results, first) = half_a_stream(&url(&a)).await;
    let last_seq = results.last().unwrap()["seq"].as_u64().unwrap();
    let half = audio.len() as u64 / 4;
    let token = first["token"].as_str().unwrap();
    let (more, newer) = resume_until_checkpoint(&url(&b), token, last_seq, &audio, half).await;
    results.extend(more.into_iter().filter(|m| m.get("seq").is_some()));
    let last_seq = results.last().unwrap()["seq"].as_u64().unwrap();
    // ...then back on A with B's newer checkpoint: A's own copy is behind, and gives way.
    let mut ws = connect(&url(&a)).await.unwrap();
    ws.send(Message::text(
        json!({"type": "start", "resume": newer["token"], "last_seq": last_seq}).to_string(),
    ))
    .await
    .unwrap();
    let Some(Ok(Message::Text(text))) = ws.next().await else {
        panic!("no answer")
    };
    let started: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        started["samples_received"], newer["samples"],
        "from B's checkpoint, not A's copy"
    );
    let from = started["samples_received"].as_u64().unwrap() as usize * 2;
    results.extend(send_rest_and_results(&mut ws, &audio[from..], 2048).await);
    let got = Run {
        results,
        ..Run::default()
    };
    for (i, m) in got.results.iter().enumerate() {
        assert_eq!(m["seq"], i as u64, "gap or repeat at {i}: {m}");
    }
    assert_same_results(&got, &want);
}

/// Audio that a connection sends after a newer one resumed its stream (by stream id) is not
/// the stream's: the newer connection gets the results of its own audio only, each sample
/// counted once, exactly what one connection gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_superseded_connection_adds_no_audio_to_the_stream() {
    let running = server(None, |_| {});
    let url = url(&running);
    let (audio, rate) = fixture_pcm16("two_phrases_16k");
    // 8192 samples from 1 s on, sent in two halves.
    let (first, second) = audio[32_000..48_384].split_at(8192);
    let start = json!({"type": "start", "sample_rate": rate}).to_string();
    let mut one = connect(&url).await.unwrap();
    one.send(Message::text(start.clone())).await.unwrap();
    let want = send_rest_and_results(&mut one, &[first, second].concat(), 4096).await;

    let mut old = connect(&url).await.unwrap();
    old.send(Message::text(start)).await.unwrap();
    old.send(Message::binary(first.to_vec())).await.unwrap();
    let (mut stream_id, mut got) = (Value::Null, Vec::<Value>::new());
    while got.iter().filter(|m| m["type"] == "vad").count() < 8 {
        let Some(Ok(Message::Text(text))) = old.next().await else {
            panic!("the stream ended early");
        };
        let m: Value = serde_json::from_str(&text).unwrap();
        match m["type"].as_str() {
            Some("started") => stream_id = m["stream_id"].clone(),
            _ => got.push(m),
        }
    }
    let last_seq = got.last().unwrap()["seq"].clone();
    let mut new = connect(&url).await.unwrap();
    let resume = json!({"type": "start", "stream_id": stream_id, "last_seq": last_seq});
    new.send(Message::text(resume.to_string())).await.unwrap();
    let Some(Ok(Message::Text(text))) = new.next().await else {
        panic!("no answer")
    };
    let started: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(started["samples_received"], 4096, "{started}");
    // The old connection sends the second half before it reads that it was superseded.
    old.send(Message::binary(second.to_vec())).await.unwrap();
    let close = loop {
        match old.next().await {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => {}
            other => panic!("no close frame: {other:?}"),
        }
    };
    let (code, reason) = close.map(|f| (f.code, f.reason.to_string())).unwrap();
    assert_eq!(code, CloseCode::Policy);
    assert!(reason.contains("superseded"), "{reason}");
    got.extend(send_rest_and_results(&mut new, second, 4096).await);
    assert_eq!(got, want, "the stream holds each sample once");
}

/// A token older than the one a copy of the stream was resumed with is refused there
/// ("superseded"), even by a copy restored from a checkpoint that is still computing again what
/// its client has: it must not roll the stream back, nor close the client that resumed with the
/// newer token.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_older_token_cannot_roll_back_a_stream_resumed_from_a_newer_one() {
    let keys = keys_file(&[KEY_A]);
    let (a, b) = (
        server(Some(keys.clone()), |_| {}),
        server(Some(keys), |_| {}),
    );
    let (audio, rate) = fixture_pcm16("two_phrases_16k");
    // On A: two checkpoints, then the connection drops.
    let mut ws = connect(&url(&a)).await.unwrap();
    ws.send(Message::text(
        json!({"type": "start", "sample_rate": rate, "checkpoints": true}).to_string(),
    ))
    .await
    .unwrap();
    for frame in audio[..audio.len() / 2].chunks(2048) {
        ws.send(Message::binary(frame.to_vec())).await.unwrap();
    }
    // Two checkpoints, and results past the second: the client has what a copy restored from
    // it computes again without sending.
    let (mut checkpoints, mut last_seq): (Vec<Value>, u64) = (Vec::new(), 0);
    while checkpoints.len() < 2 || last_seq < checkpoints[1]["next_seq"].as_u64().unwrap() + 2 {
        let Some(Ok(Message::Text(text))) = ws.next().await else {
            panic!("the stream ended early");
        };
        let m: Value = serde_json::from_str(&text).unwrap();
        match m["type"].as_str() {
            Some("checkpoint") if checkpoints.len() < 2 => checkpoints.push(m),
            _ => last_seq = m["seq"].as_u64().unwrap_or(last_seq),
        }
    }
    drop(ws);
    let (older, newer) = (&checkpoints[0], &checkpoints[1]);
    assert!(older["samples"].as_u64() < newer["samples"].as_u64());
    // On B from the newer token; that connection stays.
    let (mut resumed, started) =
        resume_from(&url(&b), newer["token"].as_str().unwrap(), last_seq).await;
    assert_eq!(started["samples_received"], newer["samples"]);
    // The older token on B: refused, and the stream stays where the newer one put it.
    let (answer, close) = start_with(
        &url(&b),
        json!({"type": "start", "resume": older["token"], "last_seq": last_seq}),
    )
    .await;
    let (code, reason) = close.unwrap_or_else(|| panic!("the older token was taken: {answer}"));
    assert_eq!(code, CloseCode::Policy, "{reason}");
    assert!(reason.contains("superseded"), "{reason}");
    // The client that resumed with the newer token goes on: its next audio gets results.
    let from = started["samples_received"].as_u64().unwrap() as usize * 2;
    let results = send_rest_and_results(&mut resumed, &audio[from..], 2048).await;
    assert!(
        results.iter().any(|m| m.get("seq").is_some()),
        "the newer connection was closed: {results:?}"
    );
}
