//! What docs/streaming.md promises a stream's client, checked where a new user trips on it, on
//! an in-process server over real sockets with the bundled models:
//!
//! - A resume that races its stream's end ("After `end`", in Resume): the client sent `end`,
//!   and its resume (by `stream_id` or by a checkpoint token) reaches the server while the end
//!   is being processed. It gets what it missed, the summary last, then the close 1000 (a gRPC
//!   sequence: one answer with `ended = true`), like a resume that came a moment later; it was
//!   refused "unknown or expired stream_id" (1008) or "stream has ended" (1001) when the
//!   session stopped between the hub's answer and the attach.
//! - `Speech/Summarize` and `Speech/Segments` of a long recording with thousands of speech
//!   segments: the summary (and every event), not an INTERNAL "the stream ended without a
//!   summary" (the call read none of its events until the audio was over, so past 4,096 of
//!   them the session's queue filled and cut the call loose).

use crate::common;

use std::time::Duration;

use common::grpc_sequence::{self as grpc, Call, Samples};
use common::stream_client::*;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use streamserve::api::grpc::proto::inference::infer_parameter::ParameterChoice;
use streamserve::api::grpc::proto::speech::speech_client::SpeechClient;
use streamserve::api::grpc::proto::speech::speech_event::Event;
use streamserve::api::grpc::proto::speech::{AudioPiece, SegmentsRequest, VadOptions};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

/// Races per transport: on the old code about one in fifteen lost (measured over real
/// sockets against the release binary), so sixty lose one with a chance of 98 %.
const ROUNDS: usize = 60;
/// The audio of a racing stream before its end: four chunks, a checkpoint among them.
const SAMPLES: usize = 2048;

/// A server whose streams checkpoint every 100 ms of audio (a token within four chunks).
fn server() -> streamserve::server::Running {
    start_running(&repo().join("models"), |config| {
        config.stream_checkpoint_ms = 100;
    })
}

/// The next message as JSON, or how the socket closed (`None`: without a close frame).
async fn next_json(ws: &mut Socket) -> Result<Value, Option<(CloseCode, String)>> {
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
        match next.expect("the server answers within 10 s") {
            Some(Ok(Message::Text(text))) => return Ok(serde_json::from_str(&text).unwrap()),
            Some(Ok(Message::Close(frame))) => {
                return Err(frame.map(|f| (f.code, f.reason.to_string())))
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return Err(None),
        }
    }
}

fn end() -> Message {
    Message::text(json!({"type": "end"}).to_string())
}

/// A stream with checkpoints and `samples` of silence, its results read: the socket, the
/// stream's id, the last `seq` and the newest checkpoint's token.
async fn stream_before_end(url: &str, samples: usize) -> (Socket, String, u64, String) {
    let mut ws = connect(url).await.unwrap();
    let start = json!({"type": "start", "checkpoints": true});
    ws.send(Message::text(start.to_string())).await.unwrap();
    let started = next_json(&mut ws).await.unwrap();
    let id = started["stream_id"].as_str().unwrap().to_string();
    ws.send(Message::binary(vec![0u8; 2 * samples]))
        .await
        .unwrap();
    let (mut last_seq, mut token) = (None, None);
    let whole_chunks = (samples / 512) as u64;
    while last_seq.is_none_or(|seq| seq + 1 < whole_chunks) || token.is_none() {
        let message = next_json(&mut ws).await.unwrap();
        if let Some(seq) = message["seq"].as_u64() {
            last_seq = Some(seq);
        }
        if message["type"] == "checkpoint" {
            token = Some(message["token"].as_str().unwrap().to_string());
        }
    }
    (ws, id, last_seq.unwrap(), token.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_websocket_resume_racing_its_streams_end_gets_the_summary() {
    let running = server();
    let url = format!("http://{}", running.addr);
    for round in 0..ROUNDS {
        // Half the streams end on a partial chunk: a step is still to run at `end`.
        let samples = SAMPLES + (round / 2 % 2) * 64;
        let (mut a, id, last_seq, token) = stream_before_end(&url, samples).await;
        let mut b = connect(&url).await.unwrap();
        let resume = if round % 2 == 0 {
            json!({"type": "start", "stream_id": id, "last_seq": last_seq})
        } else {
            json!({"type": "start", "resume": token, "last_seq": last_seq})
        };
        // The end, and at once the resume, as a client whose connection dropped after its
        // `end` and that reconnected straight away.
        a.send(end()).await.unwrap();
        b.send(Message::text(resume.to_string())).await.unwrap();
        let started = next_json(&mut b)
            .await
            .unwrap_or_else(|close| panic!("round {round}: the resume was refused: {close:?}"));
        assert_eq!(started["type"], "started", "round {round}: {started}");
        assert_eq!(started["resumed"], true, "round {round}: {started}");
        // If the resume took the stream before its end did, the stream is this connection's
        // (the older one's `end` no longer counts): it ends it. After the end, it is unread.
        let _ = b.send(end()).await;
        let mut seqs = Vec::new();
        let mut last = Value::Null;
        let close = loop {
            match next_json(&mut b).await {
                Ok(message) => {
                    if let Some(seq) = message["seq"].as_u64() {
                        seqs.push(seq);
                    }
                    last = message;
                }
                Err(close) => break close,
            }
        };
        assert_eq!(
            close.as_ref().map(|c| c.0),
            Some(CloseCode::Normal),
            "round {round}: {close:?} after {last}"
        );
        assert_eq!(last["type"], "summary", "round {round}: {last}");
        // Every message after the client's last, once each, in order: the summary last.
        let want: Vec<u64> = (last_seq + 1..).take(seqs.len()).collect();
        assert_eq!(seqs, want, "round {round}");
        // The older connection ends too (its summary, or superseded by the resume).
        while next_json(&mut a).await.is_ok() {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grpc_resume_racing_its_sequences_end_gets_the_summary() {
    let running = server();
    let mut c = grpc::grpc_client(&running).await;
    let silence = vec![0i16; SAMPLES + 64];
    let mut a = Call::open(&mut c, None).await;
    let mut b = Call::open(&mut c, None).await;
    for round in 0..ROUNDS {
        let id = round as i64 + 1;
        let checkpoints = [("checkpoints", ParameterChoice::BoolParam(true))];
        let first = Samples::Pcm(&silence[..SAMPLES]);
        let r = a.ok(grpc::step(id, true, false, first, &checkpoints)).await;
        let (stream_id, last_seq) = (grpc::text(&r, "stream_id"), grpc::int(&r, "last_seq"));
        // Its end (on a partial chunk, every other round), and at once a resume on another
        // call, as a client whose call broke off after its `sequence_end`.
        let tail = Samples::Pcm(&silence[SAMPLES..SAMPLES + (round % 2) * 64]);
        a.tx.send(grpc::step(id, false, true, tail, &[]))
            .await
            .unwrap();
        let resume = [
            ("stream_id", ParameterChoice::StringParam(stream_id)),
            ("last_seq", ParameterChoice::Int64Param(last_seq)),
        ];
        let answer = b
            .ask(grpc::step(id, true, false, Samples::None, &resume))
            .await;
        assert!(
            answer.error_message.is_empty(),
            "round {round}: the resume was refused: {}",
            answer.error_message
        );
        let mut r = answer.infer_response.unwrap();
        assert!(grpc::flag(&r, "resumed"), "round {round}: {r:?}");
        if !grpc::flag(&r, "ended") {
            // The resume took the stream before its end did: the stream is this call's.
            r = b.ok(grpc::step(id, false, true, Samples::None, &[])).await;
        }
        assert!(
            r.parameters.contains_key("duration"),
            "round {round}: {r:?}"
        );
        assert!(grpc::int(&r, "last_seq") > last_seq, "round {round}: {r:?}");
        // The older call's end is answered (its results, or superseded by the resume).
        let _ = grpc::answer(&mut a.answers).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn segments_and_summarize_give_the_summary_of_a_recording_with_thousands_of_segments() {
    // vad_energy without its batching delay, so that 8,400 steps take seconds: the energy
    // model marks each loud chunk as speech, and three silent ones end it.
    let manifest = r#"
[[models]]
name = "vad_energy"
version = "1"
file = "{models}/vad_energy/1/model.onnx"
sha256 = "d3e5cb4bc2d769cee73ff2eac750e7850ff0353535c6777fdf6b4832f43bf4a8"
stream = "vad"
max_batch_size = 256
max_queue_delay_ms = 0.0
batch_axes = { state = 1, stateN = 1, sr = "shared" }
"#;
    let running = start_running(&model_dir(manifest), |_| {});
    let endpoint = format!("http://{}", running.grpc_addr.unwrap());
    let mut c = SpeechClient::new(
        tonic::transport::Channel::from_shared(endpoint)
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    // 2,100 segments: more than the 2,048 whose 4,096 events filled the session's queue.
    const SEGMENTS: usize = 2100;
    let mut unit = Vec::with_capacity(4 * 512 * 2);
    for i in 0..4 * 512 {
        let sample = if i < 512 {
            ((i as f32 * 0.3).sin() * 16000.0) as i16
        } else {
            0
        };
        unit.extend_from_slice(&sample.to_le_bytes());
    }
    let pieces: Vec<AudioPiece> = (0..SEGMENTS / 50)
        .map(|i| AudioPiece {
            model: if i == 0 {
                "vad_energy".into()
            } else {
                String::new()
            },
            sample_rate: 16000,
            vad: (i == 0).then_some(VadOptions {
                min_speech_ms: Some(32),
                min_silence_ms: Some(32),
                speech_pad_ms: Some(0),
                ..Default::default()
            }),
            pcm16: unit.repeat(50),
            samples: Vec::new(),
        })
        .collect();
    let summary = c
        .summarize(tokio_stream::iter(pieces))
        .await
        .expect("the summary")
        .into_inner();
    assert_eq!(summary.segments.len(), SEGMENTS);
    assert_eq!(summary.chunks, (SEGMENTS * 4) as u64);

    // The same audio as a WAV file: every event, then the summary.
    let wav = pcm16_wav(&unit.repeat(SEGMENTS));
    let request = SegmentsRequest {
        model: "vad_energy".into(),
        wav,
        vad: Some(VadOptions {
            min_speech_ms: Some(32),
            min_silence_ms: Some(32),
            speech_pad_ms: Some(0),
            ..Default::default()
        }),
    };
    let mut events = c.segments(request).await.unwrap().into_inner();
    let mut got = Vec::new();
    while let Some(event) = events.message().await.expect("every event") {
        got.push(event.event.unwrap());
    }
    let Some(Event::Summary(summary)) = got.pop() else {
        panic!("the last message is the summary");
    };
    assert_eq!(summary.segments.len(), SEGMENTS);
    assert_eq!(got.len(), 2 * SEGMENTS);
}
