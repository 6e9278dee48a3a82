//! An API key's `max_streams` counts streams, not connections, over real WebSockets and gRPC
//! sequences: a stream holds its place from `start` until it ends (its resume window
//! included), a resume of it takes none and is never refused for the limit (even while its old
//! connection is still open), a stream taken over from a checkpoint counts on its new instance
//! even past the limit, and the place is back as soon as the client hears its stream ended.

use crate::common;

use std::time::Duration;

use common::grpc_sequence::*;
use common::stream_client::*;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use streamserve::api::grpc::proto::inference::infer_parameter::ParameterChoice;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

const ONE_STREAM: &str = "models = [\"silero_vad\"]\nmax_streams = 1";

/// A stream of silero_vad on `url` with API key `key`, sent `start`: the socket and the
/// first message (`started`), or the refusal's close code and reason.
async fn open_with(
    url: &str,
    key: &str,
    start: Value,
) -> Result<(Socket, Value), (CloseCode, String)> {
    let ws_url = format!("{}/v1/streams/silero_vad", url.replace("http://", "ws://"));
    let mut request = ws_url.into_client_request().unwrap();
    let bearer = HeaderValue::from_str(&format!("Bearer {key}")).unwrap();
    request.headers_mut().insert("authorization", bearer);
    let (mut ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .unwrap_or_else(|e| panic!("refused before the upgrade: {e}"));
    ws.send(Message::text(start.to_string())).await.unwrap();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
        match next.expect("an answer within 10 s") {
            Some(Ok(Message::Text(text))) => {
                let m: Value = serde_json::from_str(&text).unwrap();
                if m["type"] == "started" {
                    return Ok((ws, m));
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

/// Sends `audio` and reads until a result with `seq` at least `seq` has come; the last seq.
async fn results_through(ws: &mut Socket, audio: &[u8], seq: u64) -> u64 {
    for frame in audio.chunks(2048) {
        ws.send(Message::binary(frame.to_vec())).await.unwrap();
    }
    loop {
        let Some(Ok(Message::Text(text))) = ws.next().await else {
            panic!("the stream ended early");
        };
        let m: Value = serde_json::from_str(&text).unwrap();
        if let Some(got) = m["seq"].as_u64().filter(|&got| got >= seq) {
            return got;
        }
    }
}

/// Sends `end` and reads to the close, which must be the normal end after the summary.
async fn end(ws: &mut Socket) {
    ws.send(Message::text(json!({"type": "end"}).to_string()))
        .await
        .unwrap();
    let mut summary = false;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => summary |= text.contains("\"summary\""),
            Some(Ok(Message::Close(frame))) => {
                assert_eq!(frame.map(|f| f.code), Some(CloseCode::Normal));
                break;
            }
            Some(Ok(_)) => {}
            other => panic!("no close: {other:?}"),
        }
    }
    assert!(summary, "the stream ended with its summary");
}

/// A new stream of the key must be refused for its limit: 1013, naming it.
async fn refused_for_the_limit(url: &str, key: &str) {
    let refused = open_with(url, key, json!({"type": "start"})).await;
    let Err((code, reason)) = refused else {
        panic!("a new stream past max_streams is refused")
    };
    assert_eq!(code, CloseCode::Again, "{reason}");
    assert!(reason.contains("1 open streams"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_holds_its_place_until_it_ends_and_its_resumes_take_none() {
    let (keys, key) = api_key(ONE_STREAM);
    let url = start(&repo().join("models"), |c| {
        c.api_keys = Some(keys);
        c.stream_resume_secs = 30;
    });
    let (audio, _) = fixture_pcm16("two_phrases_16k");
    let (mut first, started) = open_with(&url, &key, json!({"type": "start"}))
        .await
        .expect("the key's one stream");
    let id = started["stream_id"].clone();
    let last = results_through(&mut first, &audio[..32_000], 10).await;

    // A resume while the old connection is still open (the server has not noticed it is
    // gone): let in, not refused for the key's one place, which its stream holds.
    let resume = json!({"type": "start", "stream_id": id, "last_seq": last});
    let (mut second, started) = open_with(&url, &key, resume)
        .await
        .expect("a resume is never refused for max_streams");
    assert_eq!(started["resumed"], true);
    refused_for_the_limit(&url, &key).await;

    // The connection drops without `end`: the stream waits for a resume, and keeps its place.
    let from = started["samples_received"].as_u64().unwrap() as usize * 2;
    let last = results_through(&mut second, &audio[from..from + 16_000], last + 1).await;
    drop(second);
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    refused_for_the_limit(&url, &key).await;

    // Resumed after the drop, then ended: the key may open another stream at once.
    let resume = json!({"type": "start", "stream_id": id, "last_seq": last});
    let (mut third, started) = open_with(&url, &key, resume).await.expect("resumed");
    assert_eq!(started["stream_id"], id);
    end(&mut third).await;
    let (mut next, _) = open_with(&url, &key, json!({"type": "start"}))
        .await
        .expect("the ended stream's place is back before its client hears it ended");
    end(&mut next).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_taken_over_counts_past_the_limit_and_is_never_refused_for_it() {
    let tokens = keys_file();
    let (api_keys, key) = api_key(ONE_STREAM);
    let a = start_running(&repo().join("models"), |c| {
        c.stream_token_keys = Some(tokens.clone());
        c.stream_checkpoint_ms = 500;
    });
    let b = start(&repo().join("models"), |c| {
        c.stream_token_keys = Some(tokens);
        c.api_keys = Some(api_keys);
    });
    // The key's one stream on B...
    let (mut own, _) = open_with(&b, &key, json!({"type": "start"}))
        .await
        .expect("the key's one stream");
    // ...and a stream that began on A (the key was let in there) comes over from its token.
    let (pcm, _) = fixture();
    let on_a = checkpointed(&mut grpc_client(&a).await, &pcm[..24_000]).await;
    let resume = json!({"type": "start", "resume": on_a.token, "last_seq": on_a.last_seq});
    let (mut taken, started) = open_with(&b, &key, resume)
        .await
        .expect("a takeover is never refused for max_streams");
    assert_eq!(started["samples_received"], on_a.samples);
    // Two open: no new one, until both have ended.
    refused_for_the_limit(&b, &key).await;
    end(&mut own).await;
    refused_for_the_limit(&b, &key).await;
    // The audio from the checkpoint on goes again (the client's side of the contract).
    let again: Vec<u8> = pcm[on_a.samples..24_000]
        .iter()
        .flat_map(|s| s.to_le_bytes())
        .collect();
    for frame in again.chunks(2048) {
        taken.send(Message::binary(frame.to_vec())).await.unwrap();
    }
    end(&mut taken).await;
    let (mut next, _) = open_with(&b, &key, json!({"type": "start"}))
        .await
        .expect("both places are back");
    end(&mut next).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grpc_sequence_holds_its_place_across_calls_until_it_ends() {
    let (api_keys, key) = api_key(ONE_STREAM);
    let running = start_running(&repo().join("models"), |c| c.api_keys = Some(api_keys));
    let (pcm, _) = fixture();
    let mut c = grpc_client(&running).await;
    let mut first = Call::open(&mut c, Some(&key)).await;
    let r = first
        .ok(step(1, true, false, Samples::Pcm(&pcm[..8192]), &[]))
        .await;
    let (stream_id, last_seq) = (text(&r, "stream_id"), int(&r, "last_seq"));
    // The call breaks off: its sequence's stream waits for a resume, holding its place.
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut second = Call::open(&mut c, Some(&key)).await;
    let new = step(2, true, false, Samples::Pcm(&pcm[..512]), &[]);
    second.refused(new, "1 open streams").await;
    // Its resume on another call takes no second place.
    let resume = [
        ("stream_id", ParameterChoice::StringParam(stream_id)),
        ("last_seq", ParameterChoice::Int64Param(last_seq)),
    ];
    let audio = Samples::Pcm(&pcm[8192..12_288]);
    let r = second.ok(step(3, true, false, audio, &resume)).await;
    assert_eq!(int(&r, "samples_received"), 8192);
    let new = step(4, true, false, Samples::Pcm(&pcm[..512]), &[]);
    second.refused(new, "1 open streams").await;
    // Ended: the place is back for the next sequence.
    second.ok(step(3, false, true, Samples::None, &[])).await;
    second
        .ok(step(5, true, false, Samples::Pcm(&pcm[..512]), &[]))
        .await;
}
