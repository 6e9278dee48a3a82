//! A speech-stream client that survives its server: it asks for checkpoints, keeps its audio
//! from the last one on, and when the connection ends before the summary (a 1001 handover, a
//! killed instance, a dropped socket) it reconnects, resumes from the newest checkpoint token
//! with the last `seq` it has, and sends its audio again from where the server says. It
//! records every result once, in the order received, so that tests can check for gaps,
//! repeats and equality with an uninterrupted run.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

use super::repo;

pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// 16-bit PCM samples of a fixture in tests/audio, and its sample rate.
pub fn fixture_pcm16(name: &str) -> (Vec<u8>, u32) {
    let mut reader =
        hound::WavReader::open(repo().join(format!("tests/audio/{name}.wav"))).unwrap();
    let rate = reader.spec().sample_rate;
    let bytes = reader
        .samples::<i16>()
        .map(Result::unwrap)
        .flat_map(|s| s.to_le_bytes())
        .collect();
    (bytes, rate)
}

/// A mono 16 kHz WAV file of `pcm` (16-bit little-endian samples), as a client uploads one.
pub fn pcm16_wav(pcm: &[u8]) -> Vec<u8> {
    let mut wav = std::io::Cursor::new(Vec::new());
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 16000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut writer = hound::WavWriter::new(&mut wav, spec).unwrap();
    for pair in pcm.chunks(2) {
        writer
            .write_sample(i16::from_le_bytes([pair[0], pair[1]]))
            .unwrap();
    }
    writer.finalize().unwrap();
    wav.into_inner()
}

pub async fn connect(url: &str) -> Result<Socket, String> {
    connect_to(url, "silero_vad").await
}

/// Sends `rest` (the audio the server asked for again after a resume) in `frame_bytes` frames,
/// then `end`, and returns every result (each message with a `seq`) until the close.
pub async fn send_rest_and_results(ws: &mut Socket, rest: &[u8], frame_bytes: usize) -> Vec<Value> {
    for frame in rest.chunks(frame_bytes) {
        ws.send(Message::binary(frame.to_vec())).await.unwrap();
    }
    ws.send(Message::text(json!({"type": "end"}).to_string()))
        .await
        .unwrap();
    let mut results = Vec::new();
    while let Some(Ok(message)) = ws.next().await {
        if let Message::Text(text) = message {
            let m: Value = serde_json::from_str(&text).unwrap();
            if m.get("seq").is_some() {
                results.push(m);
            }
        }
    }
    results
}

/// A WebSocket stream on `model` of the server at `url` (`http://…`).
pub async fn connect_to(url: &str, model: &str) -> Result<Socket, String> {
    let ws_url = format!("{}/v1/streams/{model}", url.replace("http://", "ws://"));
    tokio_tungstenite::connect_async(ws_url)
        .await
        .map(|(socket, _)| socket)
        .map_err(|e| e.to_string())
}

/// How one connection of a stream ended.
#[derive(Debug, Clone)]
pub enum Ended {
    /// The summary came, and a normal close.
    Done,
    /// Closed by the server with this code and reason before the summary.
    Closed(CloseCode, String),
    /// The connection broke (no close frame).
    Broken,
}

/// What a resumable stream saw over all its connections.
#[derive(Debug, Default)]
pub struct Run {
    /// Every result (messages with a `seq`), once each, in order.
    pub results: Vec<Value>,
    /// Results that arrived out of order or twice (must stay empty).
    pub out_of_order: Vec<String>,
    pub checkpoints: usize,
    /// Connections after the first.
    pub resumes: usize,
    /// Audio bytes sent more than once (after resumes).
    pub resent_bytes: usize,
    /// How each connection ended.
    pub ends: Vec<Ended>,
}

impl Run {
    pub fn probabilities(&self) -> Vec<f64> {
        self.results
            .iter()
            .filter(|m| m["type"] == "vad")
            .map(|m| m["probability"].as_f64().unwrap())
            .collect()
    }

    pub fn summary(&self) -> Option<&Value> {
        self.results.iter().find(|m| m["type"] == "summary")
    }
}

/// Streams `audio` (16-bit PCM at `rate`) in `frame_bytes` frames, `pace` apart, resuming
/// through whatever happens, until the summary or `max_resumes` reconnects. Connection `i`
/// goes to `urls[i]`, the last one for the rest (one URL: a balancer, or one server).
pub async fn stream_resumable(
    urls: &[String],
    audio: &[u8],
    rate: u32,
    frame_bytes: usize,
    pace: Duration,
    max_resumes: usize,
) -> Run {
    stream_resumable_to(
        ("silero_vad", &json!({})),
        urls,
        audio,
        rate,
        frame_bytes,
        pace,
        max_resumes,
    )
    .await
}

/// [`stream_resumable`] on a stream of `model`, whose first `start` message also carries the
/// fields of `options` (an object).
pub async fn stream_resumable_to(
    (model, options): (&str, &Value),
    urls: &[String],
    audio: &[u8],
    rate: u32,
    frame_bytes: usize,
    pace: Duration,
    max_resumes: usize,
) -> Run {
    let mut run = Run::default();
    let mut token: Option<String> = None;
    let mut sent_upto = 0usize;
    loop {
        let last_seq = run.results.last().map(|m| m["seq"].as_u64().unwrap());
        let start = match &token {
            None => {
                let mut start = json!({"type": "start", "sample_rate": rate, "checkpoints": true});
                for (key, value) in options.as_object().expect("start options are an object") {
                    start[key] = value.clone();
                }
                start
            }
            Some(token) => json!({"type": "start", "resume": token, "last_seq": last_seq}),
        };
        let url = &urls[run.resumes.min(urls.len() - 1)];
        let ended = match connect_to(url, model).await {
            Ok(ws) => {
                let (ended, new_token, sent) =
                    one_connection(ws, start, audio, frame_bytes, pace, &mut run).await;
                if let Some(new_token) = new_token {
                    token = Some(new_token);
                }
                if let Some((from, to)) = sent {
                    run.resent_bytes += sent_upto.saturating_sub(from);
                    sent_upto = sent_upto.max(to);
                }
                ended
            }
            Err(_) => Ended::Broken,
        };
        let done = matches!(ended, Ended::Done);
        run.ends.push(ended);
        if done || run.resumes >= max_resumes {
            return run;
        }
        assert!(
            token.is_some(),
            "the stream ended before its first checkpoint: {:?}",
            run.ends
        );
        run.resumes += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One connection: start, send audio from where the server says, read until it ends. Returns
/// how it ended, the newest token it got, and the audio byte range it sent.
async fn one_connection(
    ws: Socket,
    start: Value,
    audio: &[u8],
    frame_bytes: usize,
    pace: Duration,
    run: &mut Run,
) -> (Ended, Option<String>, Option<(usize, usize)>) {
    let (mut sink, mut stream) = ws.split();
    if sink.send(Message::text(start.to_string())).await.is_err() {
        return (Ended::Broken, None, None);
    }
    let started = match next_message(&mut stream).await {
        Ok(m) if m["type"] == "started" => m,
        Ok(other) => panic!("expected started, got {other}"),
        Err(ended) => return (ended, None, None),
    };
    let from = started["samples_received"].as_u64().unwrap() as usize * 2;
    let frames: Vec<Vec<u8>> = audio[from.min(audio.len())..]
        .chunks(frame_bytes)
        .map(<[u8]>::to_vec)
        .collect();
    let (sent_tx, mut sent_rx) = tokio::sync::watch::channel(from);
    let writer = tokio::spawn(async move {
        let mut at = from;
        for frame in frames {
            if sink.send(Message::binary(frame.clone())).await.is_err() {
                return;
            }
            at += frame.len();
            let _ = sent_tx.send(at);
            tokio::time::sleep(pace).await;
        }
        let _ = sink
            .send(Message::text(json!({"type": "end"}).to_string()))
            .await;
    });
    let mut token = None;
    let ended = loop {
        match next_message(&mut stream).await {
            Ok(m) if m["type"] == "checkpoint" => {
                run.checkpoints += 1;
                token = Some(m["token"].as_str().unwrap().to_string());
            }
            Ok(m) if m.get("seq").is_some() => {
                let seq = m["seq"].as_u64().unwrap();
                let expected = run.results.len() as u64;
                if seq == expected {
                    run.results.push(m);
                } else {
                    run.out_of_order
                        .push(format!("got seq {seq}, expected {expected}: {m}"));
                }
            }
            Ok(_) => {}
            Err(ended) => break ended,
        }
    };
    writer.abort();
    let sent_to = *sent_rx.borrow_and_update();
    let ended = match ended {
        Ended::Closed(CloseCode::Normal, _) if run.summary().is_some() => Ended::Done,
        other => other,
    };
    (ended, token, Some((from, sent_to)))
}

async fn next_message(
    stream: &mut futures_util::stream::SplitStream<Socket>,
) -> Result<Value, Ended> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), stream.next()).await {
            Err(_) => return Err(Ended::Broken),
            Ok(Some(Ok(Message::Text(text)))) => return Ok(serde_json::from_str(&text).unwrap()),
            Ok(Some(Ok(Message::Close(frame)))) => {
                return Err(match frame {
                    Some(f) => Ended::Closed(f.code, f.reason.to_string()),
                    None => Ended::Broken,
                })
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) => return Err(Ended::Broken),
        }
    }
}

/// Opens a stream on `silero_vad` and returns its first message's type (an error message
/// before it is skipped), or how the server closed it: a refused stream's close code and reason.
pub async fn open_stream(url: &str) -> Result<String, Option<(CloseCode, String)>> {
    let mut ws = connect_to(url, "silero_vad")
        .await
        .expect("websocket upgrade");
    let start = json!({"type": "start", "sample_rate": 16000});
    ws.send(Message::text(start.to_string())).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("the server answers within 30 s")
        {
            Some(Ok(Message::Text(text))) => {
                let message: Value = serde_json::from_str(&text).unwrap();
                if message["type"] == "error" {
                    continue;
                }
                return Ok(message["type"].as_str().unwrap_or("").to_string());
            }
            Some(Ok(Message::Close(frame))) => {
                return Err(frame.map(|f| (f.code, f.reason.to_string())))
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return Err(None),
        }
    }
}

/// Sends a new stream's `start` on `ws` and reads the answer: its first message's type, or the
/// close code and reason of a refusal (after its `error` message).
pub async fn first_answer(ws: &mut Socket) -> Result<String, (CloseCode, String)> {
    let start = json!({"type": "start"}).to_string();
    ws.send(Message::text(start)).await.unwrap();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
        match next.expect("an answer within 10 s") {
            Some(Ok(Message::Text(text))) => {
                let m: Value = serde_json::from_str(&text).unwrap();
                if m["type"] != "error" {
                    return Ok(m["type"].as_str().unwrap_or_default().to_string());
                }
            }
            Some(Ok(Message::Close(Some(frame)))) => {
                return Err((frame.code, frame.reason.to_string()))
            }
            Some(Ok(_)) => {}
            other => panic!("no answer: {other:?}"),
        }
    }
}
