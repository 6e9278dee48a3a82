//! Streams that fall behind real time, over real sockets on the bundled models. While Silero
//! VAD is slowed (an injected fault), real-time streams wait for it one step at a time, where
//! the router's predicted wait does not see them: each stream that is behind steps on the
//! fallback (`vad_energy`, flagged degraded) until it has caught up; a new stream is told to
//! retry (close 1013, "behind real time"; gRPC speech: `RESOURCE_EXHAUSTED`); the open ones
//! finish with every result once and in order; and once nothing is behind a new stream is let
//! in. Behaviour, not timings: the load suite measures how far past capacity this holds
//! (docs/overload.md, "Streams").
//!
//! And clients that do not keep up with their own stream's side of the socket: one that never
//! reads its results, one that floods pings without reading the pongs, and one that only
//! pings. Each is let go (docs/streaming.md, "Flow control"): the first two lose their TCP
//! connection, the last is closed as idle.

mod common;

use std::time::{Duration, Instant};

use common::stream_client::*;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use streamserve::api::grpc::proto::speech::speech_client::SpeechClient;
use streamserve::api::grpc::proto::speech::AudioPiece;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tonic::transport::Channel;
use tonic::Code;

const TOKEN: &str = "test-token";
/// 20 ms of 16 kHz 16-bit audio: frames sent at real-time pace.
const FRAME_BYTES: usize = 640;
const FRAME: Duration = Duration::from_millis(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_behind_real_time_degrade_and_new_ones_are_told_to_retry() {
    let running = start_running(&repo().join("models"), |config| {
        config.admin_token = Some(TOKEN.into());
    });
    let url = format!("http://{}", running.addr);
    let c = client();
    // Each Silero replica's next 40 batches take 150 ms each, while every stream sends a 32 ms
    // chunk every 32 ms.
    let fault = json!({"fault": {"kind": "slow", "ms": 150}, "count": 40});
    inject_fault(&c, &url, TOKEN, "silero_vad", fault).await;

    let (audio, rate) = fixture_pcm16("two_phrases_16k");
    let audio = audio[..5 * 32_000].to_vec(); // five seconds
    let streams: Vec<_> = (0..4)
        .map(|_| {
            let (url, audio) = (url.clone(), audio.clone());
            tokio::spawn(async move {
                stream_resumable(&[url], &audio, rate, FRAME_BYTES, FRAME, 0).await
            })
        })
        .collect();

    let mut refused = None;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Err(close) = open_stream(&url).await {
            refused = Some(close);
            break;
        }
    }
    let (code, reason) = refused
        .expect("a new stream is refused while the open ones are behind")
        .expect("a close frame");
    assert_eq!(code, CloseCode::Again, "1013: try again later");
    assert!(reason.contains("behind real time"), "{reason}");
    // The same door for gRPC speech: a retryable status, and why. The refusal lasts a second
    // past the last late window, so a call that got in before it is tried again.
    let endpoint = format!("http://{}", running.grpc_addr.unwrap());
    let mut speech = SpeechClient::new(
        Channel::from_shared(endpoint)
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let piece = AudioPiece {
        model: "silero_vad".into(),
        sample_rate: rate,
        pcm16: audio[..6400].to_vec(),
        ..Default::default()
    };
    let mut status = None;
    for _ in 0..20 {
        if let Err(refused) = speech
            .summarize(tokio_stream::iter(vec![piece.clone()]))
            .await
        {
            status = Some(refused);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = status.expect("a new gRPC speech stream is refused too");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("behind real time"), "{status:?}");

    let mut degraded = 0;
    for stream in streams {
        let run = stream.await.unwrap();
        degraded += degraded_of_every_chunk(&run, 5);
    }
    assert!(degraded > 0, "the streams behind stepped on the fallback");

    let text = metrics_text(&c, &url).await;
    assert!(counter(&text, "streamserve_streams_refused_behind_total") >= 1.0);
    assert!(
        counter(
            &text,
            r#"streamserve_stream_behind_chunks_total{model="silero_vad"}"#
        ) > 0.0
    );

    // Nothing is behind any more: within a second or so new streams are let in again.
    let mut let_in = None;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok(first) = open_stream(&url).await {
            let_in = Some(first);
            break;
        }
    }
    assert_eq!(let_in.as_deref(), Some("started"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_whose_answers_come_late_steps_on_the_fallback_though_no_audio_waits() {
    // Silero's SLO at 15 ms, and its calls made 25 ms long once the stream has begun: a
    // chunk arrives every 32 ms, so chunks hardly wait for the one before them (which is what
    // a stream stuck behind a slow model shows), yet each answer comes about 25 ms after its
    // audio. On a full CPU that is where a chunk's lateness builds up: in its model's queue
    // and compute, after its step went.
    let manifest = bundled_manifest().replacen(
        "slo_ms = 30               # a chunk that would wait longer",
        "slo_ms = 15               # a chunk that would wait longer",
        1,
    );
    assert!(
        manifest.contains("slo_ms = 15"),
        "the bundled Silero entry changed"
    );
    let running = start_running(&model_dir(&manifest), |config| {
        config.admin_token = Some(TOKEN.into());
    });
    let url = format!("http://{}", running.addr);
    let (audio, rate) = fixture_pcm16("two_phrases_16k");
    let audio = audio[..3 * 32_000].to_vec(); // three seconds
    let stream = {
        let url = url.clone();
        tokio::spawn(
            async move { stream_resumable(&[url], &audio, rate, FRAME_BYTES, FRAME, 0).await },
        )
    };
    // After its first answers: its real-time schedule starts at the first one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fault = json!({"fault": {"kind": "slow", "ms": 25}, "count": 200});
    inject_fault(&client(), &url, TOKEN, "silero_vad", fault).await;

    let run = stream.await.unwrap();
    let chunks = (3 * 16_000usize).div_ceil(512);
    let degraded = degraded_of_every_chunk(&run, 3);
    // Every answer from the slowed Silero comes past the SLO, so the next step goes to the
    // fallback, whose answer is on time, so the one after goes back to Silero: about every
    // other chunk from the slowdown on (50-52 of 94 on the development VM). Judged only by
    // how late its waiting audio was, the stream stepped on the fallback far less often (16-22
    // of 94, where a chunk's frames happen to arrive late within its 32 ms).
    assert!(
        degraded >= chunks / 3,
        "answers 25 ms after their audio, past the 15 ms SLO, put the stream on the fallback \
         for about every other chunk: {degraded} of {chunks}"
    );
}

/// Checks that a stream of `seconds` of 16 kHz audio finished with a result for every chunk
/// (the last one partial), once and in order; returns how many of them were degraded.
fn degraded_of_every_chunk(run: &Run, seconds: usize) -> usize {
    assert!(
        matches!(run.ends[..], [Ended::Done]),
        "every open stream finishes: {:?}",
        run.ends
    );
    assert!(run.out_of_order.is_empty(), "{:?}", run.out_of_order);
    let vad: Vec<&Value> = run.results.iter().filter(|m| m["type"] == "vad").collect();
    assert_eq!(
        vad.len(),
        (seconds * 16_000).div_ceil(512),
        "a result per chunk"
    );
    vad.iter().filter(|m| m["degraded"] == true).count()
}

/// The value of the series `name` (with its labels) in a metrics page; 0 when absent.
fn counter(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// A stream whose client reads nothing, ever: the upgrade over a socket with a 4 KiB receive
/// buffer, then `start`; the socket, to write frames to raw ([`masked`]).
async fn deaf_stream(url: &str, start: Value) -> tokio::net::TcpStream {
    let addr: std::net::SocketAddr = url.trim_start_matches("http://").parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    let (mut ws, _) =
        tokio_tungstenite::client_async(format!("ws://{addr}/v1/streams/silero_vad"), tcp)
            .await
            .unwrap();
    ws.send(Message::text(start.to_string())).await.unwrap();
    ws.into_inner()
}

/// A client frame, masked with a zero key (its payload as it is).
fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&u16::try_from(n).unwrap().to_be_bytes());
        }
    }
    frame.extend_from_slice(&[0; 4]);
    frame.extend_from_slice(payload);
    frame
}

/// Writes `frames(i)` (bytes, then a pause) to a client's socket, i = 0, 1, ..., until a write
/// fails, which it does once the server has dropped the connection (a write into a server that
/// only stopped reading waits, and `limit` fails the test); how long that took.
async fn write_until_dropped(
    tcp: &mut tokio::net::TcpStream,
    mut frames: impl FnMut(usize) -> (Vec<u8>, Duration),
    limit: Duration,
) -> Duration {
    let began = Instant::now();
    let dropped = tokio::time::timeout(limit, async {
        for i in 0.. {
            let (bytes, pause) = frames(i);
            if tcp.write_all(&bytes).await.is_err() {
                return;
            }
            tokio::time::sleep(pause).await;
        }
    })
    .await;
    assert!(
        dropped.is_ok(),
        "the server still holds the connection {limit:?} on"
    );
    began.elapsed()
}

/// Both the writer's deadline (10 s) and the kernel's (15 s without the client taking data,
/// from when its data stops coming) run, on a loaded machine.
const DROPPED_WITHIN: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_never_reads_loses_its_connection() {
    // A checkpoint after every chunk: some 2 KB of results per 32 ms of audio fill the
    // socket's buffers and the 1,024 queued messages in a few thousand chunks.
    let url = start(&repo().join("models"), |config| {
        config.stream_checkpoint_ms = 32;
    });
    let c = client();
    let drops = |text: &str| {
        ["slow_consumer", "write_timeout"]
            .map(|reason| {
                counter(
                    text,
                    &format!("streamserve_stream_drops_total{{reason=\"{reason}\"}}"),
                )
            })
            .iter()
            .sum::<f64>()
    };
    let drops_before = drops(&metrics_text(&c, &url).await);
    let start = json!({"type": "start", "results": "all", "checkpoints": true});
    let mut tcp = deaf_stream(&url, start).await;
    // A second of audio a frame, as fast as the server takes it; it stops taking it once it
    // has given up on the client, and then the connection ends.
    let audio = masked(2, &[0u8; 32_000]);
    let took = write_until_dropped(
        &mut tcp,
        |_| (audio.clone(), Duration::ZERO),
        DROPPED_WITHIN,
    )
    .await;
    let text = metrics_text(&c, &url).await;
    assert!(
        drops(&text) > drops_before,
        "counted as a client not reading (after {took:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ping_flood_that_reads_no_pongs_does_not_hold_the_stream_open() {
    let url = start(&repo().join("models"), |config| config.stream_idle_secs = 2);
    let mut tcp = deaf_stream(&url, json!({"type": "start"})).await;
    // 100,000 pings (its pongs fill the socket's buffers many times over), then one every
    // half second, which a live connection takes.
    let pings = masked(9, &[b'p'; 125]).repeat(1000);
    let ping = masked(9, b"still there?");
    write_until_dropped(
        &mut tcp,
        |i| match i {
            0..100 => (pings.clone(), Duration::ZERO),
            _ => (ping.clone(), Duration::from_millis(500)),
        },
        DROPPED_WITHIN,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pings_do_not_keep_an_idle_stream_open() {
    let url = start(&repo().join("models"), |config| config.stream_idle_secs = 2);
    let (mut sink, mut stream) = connect(&url).await.unwrap().split();
    // Before `start`: the idle time counts from when the server has it.
    let began = Instant::now();
    sink.send(Message::text(json!({"type": "start"}).to_string()))
        .await
        .unwrap();
    let mut every = tokio::time::interval(Duration::from_millis(250));
    let mut pongs = 0;
    let close = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            tokio::select! {
                _ = every.tick() => {
                    let _ = sink.send(Message::Ping(b"alive".to_vec().into())).await;
                }
                message = stream.next() => match message {
                    Some(Ok(Message::Pong(_))) => pongs += 1,
                    Some(Ok(Message::Close(frame))) => return frame,
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return None,
                },
            }
        }
    })
    .await
    .expect("a stream that only pings is closed as idle");
    let closed_after = began.elapsed();
    let frame = close.expect("a close frame");
    assert_eq!(frame.code, CloseCode::Policy, "{frame:?}");
    assert!(frame.reason.contains("no audio for 2 s"), "{frame:?}");
    assert!(closed_after >= Duration::from_secs(2), "{closed_after:?}");
    assert!(pongs > 0, "its pings were answered meanwhile");
}
