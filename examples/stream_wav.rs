//! Streams a WAV file to a streamserve VAD stream at real-time pace (or faster) and prints
//! what comes back: speech start/end events as they happen, then the summary.
//!
//!     cargo run --release --example stream_wav -- tests/audio/two_phrases_16k.wav
//!     cargo run --release --example stream_wav -- file.wav --url ws://host:8080/v1/streams/silero_vad --speed 4 --all
//!
//! The WAV must be 16 or 8 kHz; multi-channel audio is mixed down to mono.

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

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("{e}\nusage: stream_wav FILE.wav [--url ws://...] [--speed X] [--frame-ms N] [--all]");
            std::process::exit(2);
        }
    };
    let mut reader = hound::WavReader::open(&args.wav)?;
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
    let mono: Vec<i16> = samples
        .chunks(channels)
        .map(|f| {
            (f.iter().sum::<f32>() / channels as f32 * 32767.0).clamp(-32768.0, 32767.0) as i16
        })
        .collect();

    let (ws, _) = tokio_tungstenite::connect_async(args.url.as_str()).await?;
    let (mut sink, mut stream) = ws.split();
    let results = if args.all { "all" } else { "events" };
    sink.send(Message::text(
        json!({"type": "start", "sample_rate": spec.sample_rate, "results": results}).to_string(),
    ))
    .await?;

    let frame = (spec.sample_rate as u64 * args.frame_ms / 1000) as usize;
    let pace = Duration::from_secs_f64(args.frame_ms as f64 / 1000.0 / args.speed);
    let began = Instant::now();
    let sender = tokio::spawn(async move {
        for (i, chunk) in mono.chunks(frame).enumerate() {
            tokio::time::sleep_until((began + pace * i as u32).into()).await;
            let bytes: Vec<u8> = chunk.iter().flat_map(|s| s.to_le_bytes()).collect();
            if sink.send(Message::binary(bytes)).await.is_err() {
                return;
            }
        }
        let _ = sink
            .send(Message::text(json!({"type": "end"}).to_string()))
            .await;
    });

    while let Some(message) = stream.next().await {
        match message? {
            Message::Text(text) => {
                let m: Value = serde_json::from_str(&text)?;
                let wall = began.elapsed().as_secs_f64();
                match m["type"].as_str().unwrap_or("") {
                    "started" => println!(
                        "stream {} on {} v{}",
                        m["stream_id"], m["model"], m["version"]
                    ),
                    "speech_start" => println!(
                        "[{wall:7.2}s] speech starts at {:.2}s",
                        m["t"].as_f64().unwrap_or(0.0)
                    ),
                    "speech_end" => println!(
                        "[{wall:7.2}s] speech ends   at {:.2}s",
                        m["t"].as_f64().unwrap_or(0.0)
                    ),
                    "vad" => println!(
                        "[{wall:7.2}s] t={:.3}s p={:.3}",
                        m["t"].as_f64().unwrap_or(0.0),
                        m["probability"].as_f64().unwrap_or(0.0)
                    ),
                    "summary" => println!(
                        "summary: {:.2}s of audio, segments {}",
                        m["duration"].as_f64().unwrap_or(0.0),
                        m["segments"]
                    ),
                    _ => println!("{text}"),
                }
            }
            Message::Close(frame) => {
                if let Some(frame) = frame {
                    println!("closed: {} {}", u16::from(frame.code), frame.reason);
                }
                break;
            }
            _ => {}
        }
    }
    sender.abort();
    Ok(())
}
