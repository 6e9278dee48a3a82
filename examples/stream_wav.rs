//! Streams a WAV file to a streamserve stream at real-time pace (or faster) and prints what
//! comes back: speech start/end events (a VAD stream) or keywords heard (a keyword stream) as
//! they happen, then the summary.
//!
//!     cargo run --release --example stream_wav -- tests/audio/two_phrases_16k.wav
//!     cargo run --release --example stream_wav -- file.wav --url ws://host:8080/v1/streams/silero_vad --speed 4 --all
//!     cargo run --release --example stream_wav -- tests/audio/keyword_positive.wav --url ws://127.0.0.1:8080/v1/streams/hey_marvin
//!
//! The WAV must be 16 or 8 kHz; multi-channel audio is mixed down to mono.
//!
//! It survives its server: it asks for checkpoints, keeps its audio from the last one on, and
//! when the connection ends before the summary (the server was drained and said 1001, or
//! died, or the network dropped) it reconnects to the same URL (a balancer in front of a
//! fleet), resumes from the last checkpoint with the last `seq` it has, and sends its audio
//! again from where the server says. Every event is printed once.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

struct Args {
    wav: String,
    url: String,
    speed: f64,
    frame_ms: u64,
    all: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        wav: String::new(),
        url: "ws://127.0.0.1:8080/v1/streams/silero_vad".into(),
        speed: 1.0,
        frame_ms: 20,
        all: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--url" => args.url = value()?,
            "--speed" => args.speed = value()?.parse().map_err(|e| format!("--speed: {e}"))?,
            "--frame-ms" => {
                args.frame_ms = value()?.parse().map_err(|e| format!("--frame-ms: {e}"))?
            }
            "--all" => args.all = true,
            "-h" | "--help" => return Err(String::new()),
            _ if args.wav.is_empty() => args.wav = arg,
            _ => return Err(format!("unexpected argument {arg}")),
        }
    }
    if args.wav.is_empty() || args.speed <= 0.0 || args.frame_ms == 0 {
        return Err(String::new());
    }
    Ok(args)
}

/// The WAV as mono 16-bit samples, and its sample rate.
fn read_wav(path: &str) -> Result<(Vec<i16>, u32), Box<dyn std::error::Error>> {
    let mut reader = hound::WavReader::open(path)?;
    let spec = reader.spec();
    let samples: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float => reader.samples::<f32>().collect::<Result<_, _>>()?,
        hound::SampleFormat::Int => {
            let scale = (1i64 << (spec.bits_per_sample - 1)) as f32;
            reader
                .samples::<i32>()
                .map(|s| s.map(|v| v as f32 / scale))
                .collect::<Result<_, _>>()?
        }
    };
    let channels = spec.channels as usize;
    let mono = samples
        .chunks(channels)
        .map(|f| {
            // x 32768 and rounded: a 16-bit file goes out exactly as it is.
            (f.iter().sum::<f32>() / channels as f32 * 32768.0)
                .round()
                .clamp(-32768.0, 32767.0) as i16
        })
        .collect();
    Ok((mono, spec.sample_rate))
}

/// What the client carries from one connection to the next.
struct Progress {
    /// The newest checkpoint's token, and the sample it was taken at: audio before it is
    /// never needed again (a real capture would drop it from its buffer here).
    checkpoint: Option<(String, u64)>,
    last_seq: Option<u64>,
    done: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("{e}\nusage: stream_wav FILE.wav [--url ws://...] [--speed X] [--frame-ms N] [--all]");
            std::process::exit(2);
        }
    };
    let (mono, rate) = read_wav(&args.wav)?;
    let began = Instant::now();
    let mut progress = Progress {
        checkpoint: None,
        last_seq: None,
        done: false,
    };
    for attempt in 0..20u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200 * attempt.min(5) as u64)).await;
        }
        let start = match &progress.checkpoint {
            None => json!({"type": "start", "sample_rate": rate, "checkpoints": true,
                           "results": if args.all { "all" } else { "events" }}),
            Some((token, samples)) => {
                println!(
                    "[{:7.2}s] reconnecting: resuming from the checkpoint at {:.2}s",
                    began.elapsed().as_secs_f64(),
                    *samples as f64 / rate as f64
                );
                json!({"type": "start", "resume": token, "last_seq": progress.last_seq})
            }
        };
        match connection(&args, start, &mono, rate, began, &mut progress).await {
            Ok(()) if progress.done => return Ok(()),
            Ok(()) => {}
            Err(e) => println!(
                "[{:7.2}s] connection lost: {e}",
                began.elapsed().as_secs_f64()
            ),
        }
        if progress.checkpoint.is_none() {
            return Err("the stream ended before its first checkpoint; start again".into());
        }
    }
    Err("gave up after 20 connections".into())
}

/// One connection: start (or resume), send audio from where the server says, print results.
async fn connection(
    args: &Args,
    start: Value,
    mono: &[i16],
    rate: u32,
    began: Instant,
    progress: &mut Progress,
) -> Result<(), Box<dyn std::error::Error>> {
    let (ws, _) = tokio_tungstenite::connect_async(args.url.as_str()).await?;
    let (mut sink, mut stream) = ws.split();
    sink.send(Message::text(start.to_string())).await?;
    // The first answer is `started`, or an error and a close (a refused start or resume).
    let started: Value = match stream.next().await {
        Some(Ok(Message::Text(text))) => serde_json::from_str(&text)?,
        other => return Err(format!("no answer to start: {other:?}").into()),
    };
    if started["type"] != "started" {
        return Err(format!("refused: {started}").into());
    }
    println!(
        "stream {} on {} v{}",
        started["stream_id"], started["model"], started["version"]
    );
    // Send the audio from where the server has it, at the chosen pace.
    let from = started["samples_received"].as_u64().unwrap_or(0) as usize;
    let frame = (rate as u64 * args.frame_ms / 1000) as usize;
    let pace = Duration::from_secs_f64(args.frame_ms as f64 / 1000.0 / args.speed);
    let frames: Vec<Vec<u8>> = mono[from.min(mono.len())..]
        .chunks(frame)
        .map(|c| c.iter().flat_map(|s| s.to_le_bytes()).collect())
        .collect();
    let sender = tokio::spawn(async move {
        let first = Instant::now();
        for (i, bytes) in frames.into_iter().enumerate() {
            tokio::time::sleep_until((first + pace * i as u32).into()).await;
            if sink.send(Message::binary(bytes)).await.is_err() {
                return;
            }
        }
        let _ = sink
            .send(Message::text(json!({"type": "end"}).to_string()))
            .await;
    });
    let read = read_rest(stream, began, progress).await;
    sender.abort();
    read
}

/// Reads a started connection's messages until it closes.
async fn read_rest(
    mut stream: futures_util::stream::SplitStream<
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
    >,
    began: Instant,
    progress: &mut Progress,
) -> Result<(), Box<dyn std::error::Error>> {
    while let Some(message) = stream.next().await {
        let text = match message? {
            Message::Text(text) => text,
            Message::Close(frame) => {
                if let Some(frame) = frame {
                    println!("closed: {} {}", u16::from(frame.code), frame.reason);
                }
                return Ok(());
            }
            _ => continue,
        };
        let m: Value = serde_json::from_str(&text)?;
        if let Some(seq) = m["seq"].as_u64() {
            progress.last_seq = Some(seq);
        }
        let wall = began.elapsed().as_secs_f64();
        let t = m["t"].as_f64().unwrap_or(0.0);
        match m["type"].as_str().unwrap_or("") {
            "checkpoint" => {
                let samples = m["samples"].as_u64().unwrap_or(0);
                progress.checkpoint = Some((m["token"].as_str().unwrap_or("").into(), samples));
                if m["handover"] == true {
                    println!("[{wall:7.2}s] the server is going away; it handed the stream over");
                }
            }
            "speech_start" => println!("[{wall:7.2}s] speech starts at {t:.2}s"),
            "speech_end" => println!("[{wall:7.2}s] speech ends   at {t:.2}s"),
            "keyword" => println!(
                "[{wall:7.2}s] heard \"{}\" ending at {t:.2}s (score {:.3})",
                m["phrase"].as_str().unwrap_or(""),
                m["score"].as_f64().unwrap_or(0.0)
            ),
            "score" => println!(
                "[{wall:7.2}s] t={t:.3}s score={:.3}",
                m["score"].as_f64().unwrap_or(0.0)
            ),
            "vad" => println!(
                "[{wall:7.2}s] t={t:.3}s p={:.3}",
                m["probability"].as_f64().unwrap_or(0.0)
            ),
            "summary" => {
                progress.done = true;
                let keywords = m.get("keywords").map(|k| format!(", keywords {k}"));
                println!(
                    "summary: {:.2}s of audio, segments {}{}",
                    m["duration"].as_f64().unwrap_or(0.0),
                    m["segments"],
                    keywords.unwrap_or_default()
                );
            }
            "error" => println!("[{wall:7.2}s] error: {}", m["message"]),
            _ => println!("[{wall:7.2}s] {text}"),
        }
    }
    Ok(())
}
