//! The WebSocket stream surface's bad input, class by class (docs/streaming.md, "Closing
//! codes"): each bad stream gets an `error` message and then a close with the precise code and
//! reason, and a well-behaved stream running on the same server all the while gets exactly its
//! normal results.

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn ws_url(url: &str, model: &str) -> String {
    format!("{}/v1/streams/{model}", url.replace("http://", "ws://"))
}

async fn connect(url: &str, model: &str) -> Socket {
    tokio_tungstenite::connect_async(ws_url(url, model))
        .await
        .expect("websocket upgrade")
        .0
}

/// The next JSON message, or how the server closed (`None`: without a close frame).
async fn next_json(ws: &mut SplitStream<Socket>) -> Result<Value, Option<(CloseCode, String)>> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("the server answers within 30 s")
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

/// 16 kHz PCM16 speech from the fixture, and the true speech segments in it.
fn speech() -> (Vec<u8>, Vec<(f64, f64)>) {
    let dir = repo().join("tests/audio");
    let mut reader = hound::WavReader::open(dir.join("two_phrases_16k.wav")).unwrap();
    assert_eq!(reader.spec().sample_rate, 16000);
    let audio = reader
        .samples::<i16>()
        .flat_map(|s| s.unwrap().to_le_bytes())
        .collect();
    let truth: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("two_phrases_16k.json")).unwrap())
            .unwrap();
    let segments = truth["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s[0].as_f64().unwrap(), s[1].as_f64().unwrap()))
        .collect();
    (audio, segments)
}

/// Everything a stream was sent, and how it was closed.
type Transcript = (Vec<Value>, Option<(CloseCode, String)>);

/// The well-behaved client: one stream of real speech, fed a slice at a time between the bad
/// cases so that it is mid-stream during each of them, while a task reads all it is sent.
struct GoodStream {
    sink: SplitSink<Socket, Message>,
    frames: std::vec::IntoIter<Vec<u8>>,
    per_feed: usize,
    reader: tokio::task::JoinHandle<Transcript>,
}

impl GoodStream {
    async fn open(url: &str, feeds: usize) -> GoodStream {
        let (ws, _) = tokio_tungstenite::connect_async(ws_url(url, "silero_vad"))
            .await
            .unwrap();
        let (mut sink, mut stream) = ws.split();
        sink.send(Message::text(r#"{"type":"start","sample_rate":16000}"#))
            .await
            .unwrap();
        let reader = tokio::spawn(async move {
            let mut messages = Vec::new();
            loop {
                match next_json(&mut stream).await {
                    Ok(m) => messages.push(m),
                    Err(close) => return (messages, close),
                }
            }
        });
        let frames: Vec<Vec<u8>> = speech().0.chunks(640).map(<[u8]>::to_vec).collect();
        GoodStream {
            per_feed: frames.len().div_ceil(feeds),
            frames: frames.into_iter(),
            sink,
            reader,
        }
    }

    /// Sends the next slice of the audio.
    async fn feed(&mut self) {
        for frame in self.frames.by_ref().take(self.per_feed) {
            self.sink.send(Message::binary(frame)).await.unwrap();
        }
    }

    /// Sends the rest and `end`, and checks the stream got its normal results: every chunk's
    /// result in order, the true speech segments, a summary and a normal close.
    async fn finish(mut self) {
        for frame in self.frames.by_ref() {
            self.sink.send(Message::binary(frame)).await.unwrap();
        }
        self.sink
            .send(Message::text(r#"{"type":"end"}"#))
            .await
            .unwrap();
        let (messages, close) = self.reader.await.unwrap();
        assert_eq!(
            close,
            Some((CloseCode::Normal, "stream ended".into())),
            "the good stream ends normally; its last messages: {:?}",
            messages.iter().rev().take(3).collect::<Vec<_>>()
        );
        assert_eq!(messages[0]["type"], "started", "{}", messages[0]);
        for (i, m) in messages[1..].iter().enumerate() {
            assert_eq!(m["seq"], i as u64, "nothing lost or repeated: {m}");
            assert_ne!(m["type"], "error", "{m}");
        }
        let (audio, truth) = speech();
        let vad = messages.iter().filter(|m| m["type"] == "vad").count();
        assert_eq!(vad, (audio.len() / 2).div_ceil(512));
        let summary = messages.last().unwrap();
        assert_eq!(summary["type"], "summary", "{summary}");
        let segments = summary["segments"].as_array().unwrap();
        assert_eq!(segments.len(), truth.len(), "{summary}");
        for (got, want) in segments.iter().zip(&truth) {
            let (start, end) = (got["start"].as_f64().unwrap(), got["end"].as_f64().unwrap());
            assert!(
                (start - want.0).abs() <= 0.25 && (end - want.1).abs() <= 0.25,
                "segment {got} vs true {want:?}"
            );
        }
    }
}

/// What a refused stream got: its `error` message's code and text, and the close frame.
#[derive(Debug)]
struct Refusal {
    error_code: String,
    message: String,
    close: CloseCode,
    reason: String,
}

impl Refusal {
    /// Asserts the close code, the `error` code that goes with it, and that the message says
    /// `needle`; the close reason is the same message, cut to fit a control frame.
    #[track_caller]
    fn is(&self, close: CloseCode, error_code: &str, needle: &str) {
        assert_eq!(
            (self.close, self.error_code.as_str()),
            (close, error_code),
            "{self:?}"
        );
        assert!(self.message.contains(needle), "{self:?} lacks '{needle}'");
        assert!(
            !self.reason.is_empty() && self.message.starts_with(&self.reason),
            "the close reason is the error message: {self:?}"
        );
    }
}

/// Sends `messages` on a new stream (none is sent for the client: a `start` is one of them or
/// is missing on purpose), then reads until the server closes.
async fn refused(url: &str, messages: Vec<Message>) -> Refusal {
    let (mut sink, mut stream) = connect(url, "silero_vad").await.split();
    for message in messages {
        // A send fails only if the server closed first; the close frame says why.
        if sink.send(message).await.is_err() {
            break;
        }
    }
    refusal(&mut stream).await
}

/// Reads until the server closes: its `error` message and close frame.
async fn refusal(stream: &mut SplitStream<Socket>) -> Refusal {
    let mut received = Vec::new();
    let (close, reason) = loop {
        match next_json(stream).await {
            Ok(m) => received.push(m),
            Err(close) => break close.expect("a close frame with a reason"),
        }
    };
    // No error message shows as empty code and text, which `is` refuses with the close seen.
    let error = received.iter().find(|m| m["type"] == "error");
    let field = |name: &str| error.map_or("", |e| e[name].as_str().unwrap()).to_string();
    Refusal {
        error_code: field("code"),
        message: field("message"),
        close,
        reason,
    }
}

fn text(value: Value) -> Message {
    Message::text(value.to_string())
}

fn start_message() -> Message {
    text(json!({"type": "start", "sample_rate": 16000}))
}

/// A text frame whose bytes are not UTF-8 (tungstenite only sends such a thing as a raw frame).
fn not_utf8() -> Message {
    Message::Frame(Frame::message(
        vec![b'{', 0xff, 0xfe, b'}'],
        OpCode::Data(Data::Text),
        true,
    ))
}

/// 40 KiB of a binary message sent in fragments.
fn fragment(kind: Data, last: bool) -> Message {
    Message::Frame(Frame::message(
        vec![0u8; 40 * 1024],
        OpCode::Data(kind),
        last,
    ))
}

fn f32_frame(samples: &[f32]) -> Message {
    Message::binary(
        samples
            .iter()
            .flat_map(|s| s.to_le_bytes())
            .collect::<Vec<u8>>(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn start_messages_that_do_not_parse_or_are_refused() {
    let url = bundled();
    let mut good = GoodStream::open(url, 16).await;
    #[rustfmt::skip]
    let cases: Vec<(Vec<Message>, CloseCode, &str, &str)> = vec![
        // Not JSON, not a message, not the right message.
        (vec![Message::text("hello")], CloseCode::Invalid, "invalid_data", "malformed start message: expected value"),
        (vec![Message::text(r#"{"type":"start","#)], CloseCode::Invalid, "invalid_data", "malformed start message: EOF"),
        (vec![text(json!({"sample_rate": 16000}))], CloseCode::Invalid, "invalid_data", "missing field `type`"),
        (vec![text(json!({"type": "begin"}))], CloseCode::Invalid, "invalid_data", "unknown variant `begin`"),
        (vec![text(json!({"type": "end"}))], CloseCode::Policy, "policy", "the first message must be a start message"),
        // Unknown fields, at the top and inside `vad`.
        (vec![text(json!({"type": "start", "samplerate": 8000}))], CloseCode::Invalid, "invalid_data", "unknown field `samplerate`"),
        (vec![text(json!({"type": "start", "vad": {"treshold": 0.5}}))], CloseCode::Invalid, "invalid_data", "unknown field `treshold`"),
        // Wrong types.
        (vec![text(json!({"type": "start", "sample_rate": "16000"}))], CloseCode::Invalid, "invalid_data", "invalid type: string \"16000\", expected u32"),
        (vec![text(json!({"type": "start", "sample_rate": -1}))], CloseCode::Invalid, "invalid_data", "invalid value: integer `-1`, expected u32"),
        (vec![text(json!({"type": "start", "vad": {"threshold": "high"}}))], CloseCode::Invalid, "invalid_data", "invalid type: string \"high\", expected f32"),
        (vec![text(json!({"type": "start", "last_seq": 1.5, "stream_id": "x"}))], CloseCode::Invalid, "invalid_data", "expected u64"),
        // Unsupported format and results mode: not values the protocol has.
        (vec![text(json!({"type": "start", "format": "mulaw"}))], CloseCode::Invalid, "invalid_data", "unknown variant `mulaw`, expected `pcm16` or `f32`"),
        (vec![text(json!({"type": "start", "results": "some"}))], CloseCode::Invalid, "invalid_data", "unknown variant `some`"),
        // Values of the right type that the stream cannot take.
        (vec![text(json!({"type": "start", "sample_rate": 44100}))], CloseCode::Policy, "policy", "sample_rate must be 16000 or 8000, got 44100"),
        (vec![text(json!({"type": "start", "sample_rate": 0}))], CloseCode::Policy, "policy", "sample_rate must be 16000 or 8000, got 0"),
        (vec![text(json!({"type": "start", "vad": {"threshold": 3}}))], CloseCode::Policy, "policy", "threshold must be in (0, 1], got 3"),
        (vec![text(json!({"type": "start", "vad": {"threshold": 0.5, "neg_threshold": 0.7}}))], CloseCode::Policy, "policy", "neg_threshold must be in [0, threshold], got 0.7"),
        (vec![text(json!({"type": "start", "vad": {"min_silence_ms": 60001}}))], CloseCode::Policy, "policy", "min_silence_ms must be at most 60000, got 60001"),
        // Audio before the start message.
        (vec![Message::binary(vec![0u8; 64])], CloseCode::Unsupported, "unsupported_data", "send a start message before any audio"),
    ];
    for (messages, close, error_code, needle) in cases {
        refused(url, messages).await.is(close, error_code, needle);
        good.feed().await;
    }
    good.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn audio_frames_that_are_not_audio() {
    let url = bundled();
    let mut good = GoodStream::open(url, 12).await;
    let f32_start = text(json!({"type": "start", "format": "f32"}));
    #[rustfmt::skip]
    let cases: Vec<(Vec<Message>, CloseCode, &str, &str)> = vec![
        // Frames that are not whole samples.
        (vec![start_message(), Message::binary(vec![1u8, 2, 3])], CloseCode::Invalid, "invalid_data", "audio frame of 3 bytes is not a whole number of pcm16 samples (2 bytes each)"),
        (vec![f32_start.clone(), Message::binary(vec![0u8; 6])], CloseCode::Invalid, "invalid_data", "audio frame of 6 bytes is not a whole number of f32 samples (4 bytes each)"),
        // The bad frame after good ones: the stream's earlier audio does not save it.
        (vec![start_message(), Message::binary(vec![0u8; 1024]), Message::binary(vec![0u8; 1023])], CloseCode::Invalid, "invalid_data", "audio frame of 1023 bytes"),
        // Float samples that are not audio.
        (vec![f32_start.clone(), f32_frame(&[0.1, f32::NAN])], CloseCode::Invalid, "invalid_data", "f32 sample 1 of the frame is NaN, outside [-1, 1]"),
        (vec![f32_start.clone(), f32_frame(&[f32::INFINITY])], CloseCode::Invalid, "invalid_data", "f32 sample 0 of the frame is inf, outside [-1, 1]"),
        (vec![f32_start.clone(), f32_frame(&[0.0, 0.0, f32::NEG_INFINITY])], CloseCode::Invalid, "invalid_data", "f32 sample 2 of the frame is -inf"),
        (vec![f32_start.clone(), f32_frame(&[1.5])], CloseCode::Invalid, "invalid_data", "f32 sample 0 of the frame is 1.5, outside [-1, 1]"),
        // Oversized: one frame over 64 KiB, and a message over 64 KiB in fragments that are each
        // under it.
        (vec![start_message(), Message::binary(vec![0u8; 64 * 1024 + 2])], CloseCode::Size, "too_large", "frame larger than 65536 bytes"),
        (vec![start_message(), fragment(Data::Binary, false), fragment(Data::Continue, true)], CloseCode::Size, "too_large", "message larger than 65536 bytes"),
    ];
    for (messages, close, error_code, needle) in cases {
        refused(url, messages).await.is(close, error_code, needle);
        good.feed().await;
    }
    good.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn text_mid_stream_that_is_not_a_control_message() {
    let url = bundled();
    let mut good = GoodStream::open(url, 8).await;
    let audio = || Message::binary(vec![0u8; 2048]);
    #[rustfmt::skip]
    let cases: Vec<(Vec<Message>, CloseCode, &str, &str)> = vec![
        (vec![start_message(), audio(), Message::text("hello")], CloseCode::Invalid, "invalid_data", "text messages must be {\"type\":\"end\"}; audio goes in binary frames (expected value"),
        (vec![start_message(), audio(), text(json!({"type": "stop"}))], CloseCode::Invalid, "invalid_data", "(unknown variant `stop`"),
        (vec![start_message(), audio(), text(json!([1, 2]))], CloseCode::Invalid, "invalid_data", "text messages must be {\"type\":\"end\"}"),
        // Text that is not UTF-8, mid-stream and as the start message.
        (vec![start_message(), not_utf8()], CloseCode::Invalid, "invalid_data", "text message is not UTF-8"),
        (vec![not_utf8()], CloseCode::Invalid, "invalid_data", "text message is not UTF-8"),
        // Audio sent as text (what a client that base64s its audio does).
        (vec![start_message(), Message::text("AAAAAAAA")], CloseCode::Invalid, "invalid_data", "audio goes in binary frames"),
        (vec![start_message(), audio(), start_message()], CloseCode::Policy, "policy", "stream already started; send audio or end"),
    ];
    for (messages, close, error_code, needle) in cases {
        refused(url, messages).await.is(close, error_code, needle);
        good.feed().await;
    }
    good.finish().await;
}

/// The `stream_id` of a stream that was started (and got `chunks` results) and then dropped
/// without a close, as a client that lost its network would.
async fn dropped_stream(url: &str, chunks: usize) -> String {
    let (mut sink, mut stream) = connect(url, "silero_vad").await.split();
    sink.send(start_message()).await.unwrap();
    let started = next_json(&mut stream).await.unwrap();
    let id = started["stream_id"].as_str().unwrap().to_string();
    sink.send(Message::binary(vec![0u8; chunks * 1024]))
        .await
        .unwrap();
    for _ in 0..chunks {
        assert_eq!(next_json(&mut stream).await.unwrap()["type"], "vad");
    }
    drop((sink, stream));
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resume_tokens_that_are_wrong_or_expired() {
    // A server of its own, whose dropped streams wait 1 s for a resume.
    let url = &start(&repo().join("models"), |c| c.stream_resume_secs = 1);
    let mut good = GoodStream::open(url, 8).await;
    let resume = |id: &str, last_seq: Option<i64>| {
        let mut m = json!({"type": "start", "stream_id": id});
        if let Some(seq) = last_seq {
            m["last_seq"] = json!(seq);
        }
        vec![text(m)]
    };

    refused(url, resume("nope", Some(3))).await.is(
        CloseCode::Policy,
        "policy",
        "unknown or expired stream_id 'nope'",
    );
    good.feed().await;
    refused(url, resume("", None)).await.is(
        CloseCode::Policy,
        "policy",
        "unknown or expired stream_id ''",
    );
    good.feed().await;
    refused(url, vec![text(json!({"type": "start", "last_seq": 4}))])
        .await
        .is(
            CloseCode::Policy,
            "policy",
            "last_seq is only meaningful with stream_id",
        );
    good.feed().await;

    // A real stream, resumed claiming results it was never sent.
    let id = dropped_stream(url, 3).await;
    refused(url, resume(&id, Some(99))).await.is(
        CloseCode::Policy,
        "policy",
        "last_seq 99 is beyond the last result sent (2)",
    );
    good.feed().await;

    // The same kind of stream, resumed after its window passed.
    let id = dropped_stream(url, 2).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    refused(url, resume(&id, Some(1))).await.is(
        CloseCode::Policy,
        "policy",
        &format!("unknown or expired stream_id '{id}'"),
    );
    good.feed().await;
    good.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn models_that_do_not_exist_or_do_not_stream_are_refused_at_the_upgrade() {
    let url = bundled();
    let mut good = GoodStream::open(url, 4).await;
    for (model, status, needle) in [
        ("ghost", 404, "unknown model 'ghost'"),
        ("mlp", 400, "model 'mlp' does not serve streams"),
        ("typed_ops", 400, "model 'typed_ops' does not serve streams"),
    ] {
        match tokio_tungstenite::connect_async(ws_url(url, model)).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), status, "{model}");
                let body: Value = serde_json::from_slice(response.body().as_deref().unwrap())
                    .expect("a JSON error body");
                let error = body["error"].as_str().unwrap();
                assert!(error.contains(needle), "{model}: {error}");
            }
            other => panic!("{model}: expected HTTP {status}, got {other:?}"),
        }
        good.feed().await;
    }
    good.finish().await;
}

/// A binary frame whose header declares `declared` bytes, followed by only 100 of them, after
/// a `start` or without one: what the server made of it, and how long it took to say.
async fn declared_frame(url: &str, declared: u64, started: bool) -> (Refusal, Duration) {
    let mut ws = connect(url, "silero_vad").await;
    if started {
        ws.send(start_message()).await.unwrap();
    }
    // FIN + binary, masked, a 64-bit length, the mask key, then a little of the payload.
    let mut frame = vec![0x82, 0x80 | 127];
    frame.extend_from_slice(&declared.to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3, 4]);
    frame.extend_from_slice(&[0u8; 100]);
    let began = Instant::now();
    match ws.get_mut() {
        tokio_tungstenite::MaybeTlsStream::Plain(tcp) => tcp.write_all(&frame).await.unwrap(),
        _ => unreachable!("a plain TCP connection"),
    }
    let (_sink, mut stream) = ws.split();
    let refusal = refusal(&mut stream).await;
    (refusal, began.elapsed())
}

/// A text frame with a reserved bit set, which only a negotiated extension may do (none is).
fn reserved_bits() -> Message {
    let mut frame = Frame::message(
        br#"{"type":"end"}"#.to_vec(),
        OpCode::Data(Data::Text),
        true,
    );
    frame.header_mut().rsv1 = true;
    Message::Frame(frame)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn frames_refused_by_their_header() {
    let url = bundled();
    let mut good = GoodStream::open(url, 8).await;
    // A frame over the limit is refused by its header (1009) at once: the server waits for
    // none of the bytes it declares, and buffers none (the reviewer's 1 GiB of payload after
    // a 2^40 header grew the server by as much).
    for (declared, started) in [(70_000, true), (1 << 40, true), (1 << 40, false)] {
        let (refusal, took) = declared_frame(url, declared, started).await;
        refusal.is(
            CloseCode::Size,
            "too_large",
            &format!("frame larger than 65536 bytes (its header declares {declared} bytes)"),
        );
        assert!(
            took < Duration::from_secs(15),
            "{declared} bytes declared: closed after {took:?}"
        );
        good.feed().await;
    }
    // Reserved bits are a protocol error (1002), not bad text, before `start` and after it.
    for messages in [
        vec![reserved_bits()],
        vec![
            start_message(),
            Message::binary(vec![0u8; 640]),
            reserved_bits(),
        ],
    ] {
        refused(url, messages).await.is(
            CloseCode::Protocol,
            "protocol_error",
            "Received a frame with non-zero reserved bits",
        );
        good.feed().await;
    }
    good.finish().await;
}
