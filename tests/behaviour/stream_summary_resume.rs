//! A stream's end survives a dropped connection, on an in-process server over real sockets with
//! the bundled silero_vad: a client whose connection dropped after it sent `end` resumes from
//! its last checkpoint and gets what it missed (the last results and the summary, exactly as an
//! uninterrupted run sends them, `seq`s gapless), then the close 1000, by its token or by its
//! `stream_id`; one that has the summary is refused `ended` (1008); a stream running beside
//! them is not affected. A gRPC sequence whose call dropped after its `sequence_end` gets the
//! same in the answer to the `sequence_start` that resumes it, and the sequence is then over.

use crate::common;

use std::time::Duration;

use common::grpc_sequence::{self as grpc, Call, Results, Samples};
use common::stream_client::*;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use streamserve::api::grpc::proto::inference::infer_parameter::ParameterChoice;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

/// Seconds of the fixture each stream sends.
const SECONDS: usize = 3;

fn server() -> streamserve::server::Running {
    start_running(&repo().join("models"), |config| {
        config.stream_checkpoint_ms = 500;
    })
}

fn url(running: &streamserve::server::Running) -> String {
    format!("http://{}", running.addr)
}

fn audio() -> (Vec<u8>, u32) {
    let (audio, rate) = fixture_pcm16("two_phrases_16k");
    (audio[..SECONDS * 2 * rate as usize].to_vec(), rate)
}

/// Opens a stream with checkpoints and sends all of the audio.
async fn stream_with_audio(url: &str) -> Socket {
    let (audio, rate) = audio();
    let mut ws = connect(url).await.unwrap();
    let start = json!({"type": "start", "sample_rate": rate, "checkpoints": true});
    ws.send(Message::text(start.to_string())).await.unwrap();
    for frame in audio.chunks(2048) {
        ws.send(Message::binary(frame.to_vec())).await.unwrap();
    }
    ws
}

/// Every message until the close, and the close's code and reason.
async fn until_close(ws: &mut Socket) -> (Vec<Value>, Option<(CloseCode, String)>) {
    let mut messages = Vec::new();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(30), ws.next()).await;
        match next.expect("the server answers within 30 s") {
            Some(Ok(Message::Text(text))) => messages.push(serde_json::from_str(&text).unwrap()),
            Some(Ok(Message::Close(frame))) => {
                return (messages, frame.map(|f| (f.code, f.reason.to_string())))
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return (messages, None),
        }
    }
}

/// The results (messages with a `seq`) of an uninterrupted run, its summary last.
async fn uninterrupted(url: &str) -> Vec<Value> {
    let mut ws = stream_with_audio(url).await;
    ws.send(Message::text(json!({"type": "end"}).to_string()))
        .await
        .unwrap();
    let (messages, close) = until_close(&mut ws).await;
    assert_eq!(close.map(|c| c.0), Some(CloseCode::Normal));
    let results: Vec<Value> = messages
        .into_iter()
        .filter(|m| m.get("seq").is_some())
        .collect();
    assert_eq!(results.last().unwrap()["type"], "summary");
    results
}

/// Reads until the client has the newest checkpoint it will get and results at least three
/// past it: that checkpoint, and the results the client has.
async fn past_the_last_checkpoint(ws: &mut Socket) -> (Value, Vec<Value>) {
    let (audio, rate) = audio();
    // The last checkpoint comes within a checkpoint interval (and a chunk) of the audio's end.
    let every = rate as u64 / 2;
    let total = audio.len() as u64 / 2;
    let (mut checkpoint, mut results) = (Value::Null, Vec::<Value>::new());
    loop {
        let next = tokio::time::timeout(Duration::from_secs(30), ws.next()).await;
        let Ok(Some(Ok(Message::Text(text)))) = next else {
            panic!("the stream ended early: {next:?}");
        };
        let m: Value = serde_json::from_str(&text).unwrap();
        if m["type"] == "checkpoint" {
            checkpoint = m;
        } else if m.get("seq").is_some() {
            results.push(m);
        }
        let at_last = checkpoint["samples"]
            .as_u64()
            .is_some_and(|s| s + every + 512 > total);
        if let (true, Some(next_seq), Some(last)) = (
            at_last,
            checkpoint["next_seq"].as_u64(),
            results.last().and_then(|m| m["seq"].as_u64()),
        ) {
            if last >= next_seq + 3 {
                return (checkpoint, results);
            }
        }
    }
}

/// Resumes with `token` and `last_seq`: every message until the close, and the close.
async fn resume(
    url: &str,
    token: &str,
    last_seq: u64,
) -> (Vec<Value>, Option<(CloseCode, String)>) {
    let mut ws = connect(url).await.unwrap();
    let start = json!({"type": "start", "resume": token, "last_seq": last_seq});
    ws.send(Message::text(start.to_string())).await.unwrap();
    until_close(&mut ws).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_dropped_after_end_gets_the_end_of_its_stream_on_resume() {
    let running = server();
    let url = url(&running);
    let reference = uninterrupted(&url).await;
    let summary_seq = reference.last().unwrap()["seq"].as_u64().unwrap();

    // A stream beside it, from start to end while the other drops and resumes.
    let beside = tokio::spawn({
        let url = url.clone();
        async move {
            let mut ws = stream_with_audio(&url).await;
            tokio::time::sleep(Duration::from_millis(800)).await;
            ws.send(Message::text(json!({"type": "end"}).to_string()))
                .await
                .unwrap();
            until_close(&mut ws).await
        }
    });

    let mut ws = stream_with_audio(&url).await;
    let (checkpoint, had) = past_the_last_checkpoint(&mut ws).await;
    let last_seq = had.last().unwrap()["seq"].as_u64().unwrap();
    assert!(last_seq < summary_seq);
    // `end` reaches the server, which steps the rest and sends the summary to a connection
    // that then drops without reading any of it.
    ws.send(Message::text(json!({"type": "end"}).to_string()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(ws);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let token = checkpoint["token"].as_str().unwrap();
    let (messages, close) = resume(&url, token, last_seq).await;
    assert_eq!(
        close,
        Some((CloseCode::Normal, "stream ended".into())),
        "{messages:?}"
    );
    let started = &messages[0];
    assert_eq!(started["type"], "started", "{messages:?}");
    assert_eq!(started["resumed"], true);
    assert_eq!(started["model"], "silero_vad");
    assert_eq!(started["next_seq"], summary_seq + 1);
    assert_eq!(started["samples_received"], (SECONDS * 16000) as u64);
    assert_eq!(started["checkpoint_samples"], 8000);
    assert_eq!(started["chunk_samples"], 512);
    let mut all = had;
    all.extend(messages[1..].iter().cloned());
    assert_eq!(
        all, reference,
        "the results and summary of an uninterrupted run"
    );
    let seqs: Vec<u64> = all.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (0..=summary_seq).collect::<Vec<_>>());

    // A client that has the summary has nothing to get: refused, as before.
    let (messages, close) = resume(&url, token, summary_seq).await;
    let (code, reason) = close.expect("a close frame");
    assert_eq!(code, CloseCode::Policy, "{messages:?}");
    assert!(reason.contains("has ended"), "{reason}");
    assert!(
        messages.iter().all(|m| m["type"] == "error"),
        "{messages:?}"
    );

    // The stream beside it ran as if alone.
    let (messages, close) = beside.await.unwrap();
    assert_eq!(close.map(|c| c.0), Some(CloseCode::Normal));
    let results: Vec<Value> = messages
        .into_iter()
        .filter(|m| m.get("seq").is_some())
        .collect();
    assert_eq!(results, reference);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn results_lost_in_flight_before_the_summary_come_again_and_only_once() {
    let running = server();
    let url = url(&running);
    // The client read to the end, but lost (say) everything after its last checkpoint's
    // results: it resumes from that checkpoint with the last seq it kept.
    let mut ws = stream_with_audio(&url).await;
    let (checkpoint, had) = past_the_last_checkpoint(&mut ws).await;
    ws.send(Message::text(json!({"type": "end"}).to_string()))
        .await
        .unwrap();
    let (rest, close) = until_close(&mut ws).await;
    assert_eq!(close.map(|c| c.0), Some(CloseCode::Normal));
    let reference: Vec<Value> = had
        .iter()
        .cloned()
        .chain(rest.into_iter().filter(|m| m.get("seq").is_some()))
        .collect();
    let summary_seq = reference.last().unwrap()["seq"].as_u64().unwrap();
    let kept = checkpoint["next_seq"].as_u64().unwrap();

    let token = checkpoint["token"].as_str().unwrap();
    let (messages, close) = resume(&url, token, kept - 1).await;
    assert_eq!(close.map(|c| c.0), Some(CloseCode::Normal), "{messages:?}");
    assert_eq!(messages[0]["type"], "started");
    assert_eq!(&messages[1..], &reference[kept as usize..]);

    // By its `stream_id` on this instance, the same.
    let id = messages[0]["stream_id"].as_str().unwrap();
    let mut ws = connect(&url).await.unwrap();
    let start = json!({"type": "start", "stream_id": id, "last_seq": kept - 1});
    ws.send(Message::text(start.to_string())).await.unwrap();
    let (again, close) = until_close(&mut ws).await;
    assert_eq!(close.map(|c| c.0), Some(CloseCode::Normal), "{again:?}");
    assert_eq!(again, messages);

    // A `last_seq` past the summary is refused `ended` too.
    let (_, close) = resume(&url, token, summary_seq + 5).await;
    assert_eq!(close.map(|c| c.0), Some(CloseCode::Policy));
}

/// Sequence 1 of `call` with checkpoints, `pcm` in steps of 4,000 samples: what its answers
/// gave, its last `seq`, and its newest checkpoint's token.
async fn sequence_with_audio(call: &mut Call, pcm: &[i16]) -> (Results, i64, String) {
    let checkpoints = [("checkpoints", ParameterChoice::BoolParam(true))];
    let (mut got, mut last_seq, mut token) = (Results::default(), -1, String::new());
    for (i, chunk) in pcm.chunks(4000).enumerate() {
        let options: &[_] = if i == 0 { &checkpoints } else { &[] };
        let r = call
            .ok(grpc::step(1, i == 0, false, Samples::Pcm(chunk), options))
            .await;
        if r.parameters.contains_key("checkpoint") {
            token = grpc::text(&r, "checkpoint");
        }
        last_seq = grpc::int(&r, "last_seq");
        got.add(&r);
    }
    (got, last_seq, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grpc_sequence_whose_call_dropped_after_its_end_gets_the_end_on_resume() {
    let running = server();
    let (pcm, _) = grpc::fixture();
    let pcm = &pcm[..SECONDS * 16000];
    let mut c = grpc::grpc_client(&running).await;
    // Uninterrupted: the results and the summary.
    let mut call = Call::open(&mut c, None).await;
    let (mut want, _, _) = sequence_with_audio(&mut call, pcm).await;
    let end = call
        .ok(grpc::step(1, false, true, Samples::None, &[]))
        .await;
    want.add(&end);
    let summary_seq = grpc::int(&end, "last_seq");
    let duration = grpc::real(&end, "duration");

    // The same audio; its `sequence_end` reaches the server, and the call drops before the
    // client reads the answer.
    let mut call = Call::open(&mut c, None).await;
    let (mut got, last_seq, token) = sequence_with_audio(&mut call, pcm).await;
    assert!(last_seq < summary_seq);
    call.tx
        .send(grpc::step(1, false, true, Samples::None, &[]))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(call);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A new call resumes it from its token: its one answer has what the client missed, the
    // summary included, and says the stream ended; the sequence is then over.
    let mut call = Call::open(&mut c, None).await;
    let resume = [
        ("resume", ParameterChoice::StringParam(token.clone())),
        ("last_seq", ParameterChoice::Int64Param(last_seq)),
    ];
    let r = call
        .ok(grpc::step(2, true, false, Samples::None, &resume))
        .await;
    assert!(
        grpc::flag(&r, "resumed") && grpc::flag(&r, "ended"),
        "{r:?}"
    );
    assert_eq!(grpc::int(&r, "next_seq"), summary_seq + 1);
    assert_eq!(grpc::int(&r, "samples_received") as usize, pcm.len());
    assert_eq!(grpc::int(&r, "last_seq"), summary_seq);
    assert_eq!(grpc::real(&r, "duration"), duration);
    assert_eq!(r.model_version, "1");
    got.add(&r);
    assert_eq!(got, want, "the results and summary of an uninterrupted run");
    let more = grpc::step(2, false, false, Samples::Pcm(&pcm[..512]), &[]);
    call.refused(more, "send sequence_start").await;

    // By its `stream_id`, the same answer; the same id may start again on the call.
    let stream_id = grpc::text(&r, "stream_id");
    let by_id = [
        ("stream_id", ParameterChoice::StringParam(stream_id)),
        ("last_seq", ParameterChoice::Int64Param(last_seq)),
    ];
    let again = call
        .ok(grpc::step(2, true, false, Samples::None, &by_id))
        .await;
    assert_eq!(again.parameters, r.parameters);
    assert_eq!(again.raw_output_contents, r.raw_output_contents);

    // A client that has the summary has nothing to get: refused, as before.
    let has_all = [
        ("resume", ParameterChoice::StringParam(token)),
        ("last_seq", ParameterChoice::Int64Param(summary_seq)),
    ];
    call.refused(
        grpc::step(3, true, false, Samples::None, &has_all),
        "has ended",
    )
    .await;
}
