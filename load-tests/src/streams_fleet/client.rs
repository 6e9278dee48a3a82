//! One real-time speech stream that survives its instance (docs/streaming.md, "Resume on any
//! instance"): it asks for checkpoints, keeps its audio from the newest one on, and when a
//! connection ends before the summary (a handover at shutdown, a dropped socket) it connects
//! again through the balancer, resumes from the newest token with the last `seq` it has, and
//! sends its audio again from where the server says — the backlog at once, then on the
//! real-time schedule again, as a client recording from a microphone would.
//!
//! It keeps every result as received (for the comparison with a solo run), each connection
//! (which instance, how it ended, the audio it sent again), and each chunk's latency: from the
//! frame that completed the chunk being sent (the last time, if it was sent again) to its
//! `vad` result, and from the moment that frame was due on the real-time schedule.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::streams::close_code;

/// What every stream of a run shares.
pub struct StreamSpec {
    /// The base URL (`http://127.0.0.1:PORT`): haproxy, or an instance for the solo run.
    pub url: String,
    /// The whole stream's audio, PCM16 little-endian.
    pub audio: Vec<u8>,
    pub rate: u32,
    /// Audio seconds per wall-clock second (1: real time).
    pub speed: f64,
    pub frame_samples: usize,
    /// Connections at most, the first included.
    pub max_connections: usize,
    /// Nothing goes on after this.
    pub deadline: Instant,
}

impl StreamSpec {
    fn samples(&self) -> u64 {
        self.audio.len() as u64 / 2
    }

    /// When the audio up to sample `upto` is recorded (due to be sent), for a stream whose
    /// first sample was due at `origin`.
    fn due(&self, origin: Instant, upto: u64) -> Instant {
        origin + Duration::from_secs_f64(upto as f64 / (self.rate as f64 * self.speed))
    }
}

/// The end of the frame that completes chunk `k` (of `chunk` samples) when frames of `frame`
/// samples are sent from sample 0 on, capped at `total`: the audio position whose due time is
/// the chunk's.
pub fn completing_frame_end(k: u64, chunk: u64, frame: u64, total: u64) -> u64 {
    ((k + 1) * chunk)
        .div_ceil(frame)
        .saturating_mul(frame)
        .min(total)
}

/// One connection of a stream; times in seconds since the run's start.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Connection {
    /// The instance that served it (haproxy's `X-Served-By`), if it got that far.
    pub instance: Option<String>,
    pub opened_s: f64,
    /// When `started` came; `None`: refused or broken before.
    pub started_s: Option<f64>,
    pub closed_s: f64,
    /// `done`, `handover` (a checkpoint with `handover`, then 1001), `close CODE`, `broken`,
    /// `connect failed`, `error CODE`...
    pub end: String,
    /// A resumed connection: the sample the server resumed from...
    pub resumed_from: Option<u64>,
    /// ...the audio sent again from there (already sent on an earlier connection)...
    pub resent_samples: u64,
    /// ...and all the audio the client held when it resumed (from the checkpoint to what was
    /// recorded by then).
    pub held_samples: u64,
    pub results: u64,
}

/// A `vad` result's timing.
#[derive(Clone, Copy, Debug)]
pub struct ChunkTiming {
    pub received_s: f64,
    /// From the (last) send of the frame that completed the chunk.
    pub from_send_ms: f64,
    /// From the moment that frame was due on the real-time schedule.
    pub from_due_ms: f64,
    /// Its frame was sent while a resumed connection caught up with the schedule, or within
    /// [`AFTER_RESUME`] of its `started`.
    pub after_resume: bool,
}

/// Everything one stream saw over its connections.
#[derive(Debug, Default)]
pub struct StreamRun {
    /// Every result (message with a `seq`) in the order received: (seq, text).
    pub results: Vec<(u64, String)>,
    pub connections: Vec<Connection>,
    pub chunks: Vec<ChunkTiming>,
    pub checkpoints: u64,
    pub checkpoint_bytes: u64,
    pub result_bytes: u64,
    /// The most audio held between the newest checkpoint and the audio sent, samples.
    pub held_max_samples: u64,
    /// Per resume that brought a result: from the last result before the drop to the first
    /// after, seconds.
    pub gaps_s: Vec<f64>,
    pub started_s: f64,
    pub finished_s: Option<f64>,
    pub samples: u64,
    pub error: Option<String>,
    /// The newest resume token it got.
    pub last_token: Option<String>,
}

/// What the connections of a stream share (the writer and the reader of one connection).
struct Progress {
    /// Per chunk: when its completing frame was last sent, and whether just after a resume.
    sent: Mutex<Vec<Option<(Instant, bool)>>>,
    /// The furthest audio sent on any connection, samples.
    sent_max: AtomicU64,
}

/// The stream's state between connections.
struct Resume {
    token: Option<String>,
    /// Samples of the newest checkpoint.
    checkpoint: u64,
    last_result: Option<Instant>,
    /// A connection ended before the summary: the next result closes a gap from here.
    dropped_after: Option<Instant>,
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Chunks sent this long after a resume count as "after a resume" (and the backlog).
pub const AFTER_RESUME: Duration = Duration::from_secs(1);
/// Real-time results come 31 times a second: this much silence is a dead connection.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs one stream from `start_at` until its summary, `max_connections` or the deadline.
pub async fn run_stream(spec: &StreamSpec, t0: Instant, start_at: Instant) -> StreamRun {
    tokio::time::sleep_until(start_at.into()).await;
    let origin = Instant::now();
    let since = |t: Instant| t.saturating_duration_since(t0).as_secs_f64();
    let mut run = StreamRun {
        started_s: since(origin),
        samples: spec.samples(),
        ..StreamRun::default()
    };
    let progress = Progress {
        sent: Mutex::new(Vec::new()),
        sent_max: AtomicU64::new(0),
    };
    let mut resume = Resume {
        token: None,
        checkpoint: 0,
        last_result: None,
        dropped_after: None,
    };
    let mut failures_in_a_row = 0u32;
    loop {
        if run.connections.len() >= spec.max_connections || Instant::now() >= spec.deadline {
            run.error = Some(format!(
                "gave up after {} connections: {:?}",
                run.connections.len(),
                run.connections.last().map(|c| c.end.clone())
            ));
            break;
        }
        let conn = connection(spec, t0, origin, &progress, &mut resume, &mut run).await;
        let done = conn.end == "done";
        failures_in_a_row = if conn.started_s.is_some() {
            0
        } else {
            failures_in_a_row + 1
        };
        run.connections.push(conn);
        if done {
            run.finished_s = Some(since(Instant::now()));
            break;
        }
        if resume.token.is_none() {
            run.error = Some("the connection ended before the first checkpoint".into());
            break;
        }
        if resume.dropped_after.is_none() {
            resume.dropped_after = resume.last_result.or(Some(Instant::now()));
        }
        // At once after a connection that had started (a handover: resume now); then slower.
        let backoff = 50 * u64::from(failures_in_a_row.min(10));
        tokio::time::sleep(Duration::from_millis(backoff)).await;
    }
    run.last_token = resume.token;
    run
}

/// One connection: connect, start or resume, send audio from where the server says, read
/// until it ends.
async fn connection(
    spec: &StreamSpec,
    t0: Instant,
    origin: Instant,
    progress: &Progress,
    resume: &mut Resume,
    run: &mut StreamRun,
) -> Connection {
    let since = |t: Instant| t.saturating_duration_since(t0).as_secs_f64();
    let mut conn = Connection {
        opened_s: since(Instant::now()),
        ..Connection::default()
    };
    let finish = |mut conn: Connection, end: String| {
        conn.end = end;
        conn.closed_s = since(Instant::now());
        conn
    };
    let url = format!(
        "{}/v1/streams/silero_vad",
        spec.url.replacen("http://", "ws://", 1)
    );
    let ws =
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(url)).await {
            Ok(Ok((ws, response))) => {
                conn.instance = response
                    .headers()
                    .get("x-served-by")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                ws
            }
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response))) => {
                return finish(
                    conn,
                    format!("refused (HTTP {})", response.status().as_u16()),
                )
            }
            Ok(Err(e)) => return finish(conn, format!("connect failed: {e}")),
            Err(_) => return finish(conn, "connect timed out".into()),
        };
    let (mut sink, mut stream) = ws.split();
    let start = match &resume.token {
        None => json!({"type": "start", "sample_rate": spec.rate, "checkpoints": true}),
        Some(token) => json!({
            "type": "start", "resume": token,
            "last_seq": run.results.last().map(|(seq, _)| *seq),
        }),
    };
    if sink.send(Message::text(start.to_string())).await.is_err() {
        return finish(conn, "broken".into());
    }
    let started = match tokio::time::timeout(CONNECT_TIMEOUT, next_text(&mut stream)).await {
        Ok(Ok(m)) if m["type"] == "started" => m,
        Ok(Ok(m)) if m["type"] == "error" => {
            return finish(conn, format!("error {}: {}", m["code"], m["message"]))
        }
        Ok(Ok(m)) => return finish(conn, format!("expected started, got {m}")),
        Ok(Err(end)) => return finish(conn, end),
        Err(_) => return finish(conn, "no started within 5 s".into()),
    };
    let now = Instant::now();
    conn.started_s = Some(since(now));
    let chunk = started["chunk_samples"].as_u64().unwrap_or(512).max(1);
    let from = started["samples_received"]
        .as_u64()
        .unwrap_or(0)
        .min(spec.samples());
    let resumed = resume.token.is_some().then_some(now + AFTER_RESUME);
    if resumed.is_some() {
        conn.resumed_from = Some(from);
        conn.resent_samples = progress
            .sent_max
            .load(Ordering::Relaxed)
            .saturating_sub(from);
        let recorded = (now.saturating_duration_since(origin).as_secs_f64()
            * spec.rate as f64
            * spec.speed) as u64;
        conn.held_samples = recorded.min(spec.samples()).saturating_sub(from);
    }
    {
        let mut sent = progress.sent.lock().expect("no panics while holding it");
        sent.resize(spec.samples().div_ceil(chunk) as usize, None);
    }
    let end = {
        let writer = send_audio(&mut sink, spec, origin, progress, from, chunk, resumed);
        let reader = read_results(
            &mut stream,
            spec,
            (origin, t0),
            progress,
            chunk,
            resume,
            run,
            &mut conn,
        );
        tokio::pin!(writer, reader);
        let mut writing = true;
        loop {
            tokio::select! {
                end = &mut reader => break end,
                () = &mut writer, if writing => writing = false,
            }
        }
    };
    finish(conn, end)
}

/// Sends audio from sample `from` on the real-time schedule (what is already due at once),
/// then `end`. Returns when done or when a send fails.
async fn send_audio<S>(
    sink: &mut S,
    spec: &StreamSpec,
    origin: Instant,
    progress: &Progress,
    from: u64,
    chunk: u64,
    resumed_until: Option<Instant>,
) where
    S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    let total = spec.samples();
    let frame = spec.frame_samples as u64;
    let mut pos = from;
    let mut catching_up = resumed_until.is_some();
    while pos < total {
        let next = (pos + frame).min(total);
        tokio::time::sleep_until(spec.due(origin, next).into()).await;
        let now = Instant::now();
        if catching_up && spec.due(origin, next + frame) > now {
            catching_up = false;
        }
        let after_resume = catching_up || resumed_until.is_some_and(|until| now < until);
        {
            let mut sent = progress.sent.lock().expect("no panics while holding it");
            let last = if next == total {
                next.div_ceil(chunk)
            } else {
                next / chunk
            };
            for k in pos / chunk..last {
                if let Some(slot) = sent.get_mut(k as usize) {
                    *slot = Some((now, after_resume));
                }
            }
        }
        let data = spec.audio[pos as usize * 2..next as usize * 2].to_vec();
        if sink.send(Message::binary(data)).await.is_err() {
            return;
        }
        pos = next;
        progress.sent_max.fetch_max(pos, Ordering::Relaxed);
    }
    let _ = sink.send(Message::text(r#"{"type":"end"}"#)).await;
    // Stay pending: the reader ends the connection.
    std::future::pending::<()>().await;
}

/// Reads messages until the connection ends; returns how it ended.
#[allow(clippy::too_many_arguments)]
async fn read_results<S>(
    stream: &mut S,
    spec: &StreamSpec,
    (origin, t0): (Instant, Instant),
    progress: &Progress,
    chunk: u64,
    resume: &mut Resume,
    run: &mut StreamRun,
    conn: &mut Connection,
) -> String
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut summary = false;
    let mut handover = false;
    loop {
        let text = match tokio::time::timeout(READ_TIMEOUT, stream.next()).await {
            Err(_) => return "broken (no message for 10 s)".into(),
            Ok(Some(Ok(Message::Text(text)))) => text,
            Ok(Some(Ok(Message::Close(frame)))) => {
                let code = close_code(frame.as_ref());
                return match code {
                    1000 if summary => "done".into(),
                    1001 if handover => "handover".into(),
                    _ => format!("close {code}"),
                };
            }
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_)) | None) => return "broken".into(),
        };
        let received = Instant::now();
        let Ok(m) = serde_json::from_str::<Value>(&text) else {
            return format!("invalid message: {text}");
        };
        if m["type"] == "checkpoint" {
            run.checkpoints += 1;
            run.checkpoint_bytes += text.len() as u64;
            let sent_max = progress.sent_max.load(Ordering::Relaxed);
            run.held_max_samples = run
                .held_max_samples
                .max(sent_max.saturating_sub(resume.checkpoint));
            resume.checkpoint = m["samples"].as_u64().unwrap_or(resume.checkpoint);
            resume.token = m["token"]
                .as_str()
                .map(str::to_string)
                .or(resume.token.take());
            handover |= m["handover"] == true;
            continue;
        }
        if m["type"] == "error" {
            return format!("error {}: {}", m["code"], m["message"]);
        }
        let Some(seq) = m["seq"].as_u64() else {
            continue;
        };
        run.result_bytes += text.len() as u64;
        conn.results += 1;
        if let Some(dropped) = resume.dropped_after.take() {
            run.gaps_s
                .push(received.saturating_duration_since(dropped).as_secs_f64());
        }
        resume.last_result = Some(received);
        summary |= m["type"] == "summary";
        if m["type"] == "vad" {
            let k = (m["t"].as_f64().unwrap_or(-1.0) * spec.rate as f64 / chunk as f64).round();
            let sent = progress
                .sent
                .lock()
                .expect("no panics while holding it")
                .get(k as usize)
                .copied()
                .flatten();
            if let (true, Some((sent, after_resume))) = (k >= 0.0, sent) {
                let frame = spec.frame_samples as u64;
                let end = completing_frame_end(k as u64, chunk, frame, spec.samples());
                let due = spec.due(origin, end);
                run.chunks.push(ChunkTiming {
                    received_s: received.saturating_duration_since(t0).as_secs_f64(),
                    from_send_ms: ms(received.saturating_duration_since(sent)),
                    from_due_ms: ms(received.saturating_duration_since(due)),
                    after_resume,
                });
            }
        }
        run.results.push((seq, text.to_string()));
    }
}

/// The next text message as JSON, or how the connection ended.
async fn next_text(
    stream: &mut futures_util::stream::SplitStream<Socket>,
) -> Result<Value, String> {
    loop {
        match stream.next().await {
            Some(Ok(Message::Text(text))) => {
                return serde_json::from_str(&text).map_err(|_| format!("invalid message: {text}"))
            }
            Some(Ok(Message::Close(frame))) => {
                return Err(format!("close {}", close_code(frame.as_ref())))
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return Err("broken".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_is_due_with_the_frame_that_completes_it() {
        // 512-sample chunks, 320-sample frames: chunk 0 ends at 512, in the frame [320, 640).
        assert_eq!(completing_frame_end(0, 512, 320, 10_000), 640);
        // Chunk 4 ends at 2560 = 8 frames exactly.
        assert_eq!(completing_frame_end(4, 512, 320, 10_000), 2560);
        // The last, partial chunk is due with the end of the audio.
        assert_eq!(completing_frame_end(19, 512, 320, 10_000), 10_000);
        let spec = StreamSpec {
            url: String::new(),
            audio: vec![0; 32_000],
            rate: 16_000,
            speed: 2.0,
            frame_samples: 320,
            max_connections: 1,
            deadline: Instant::now(),
        };
        let origin = Instant::now();
        assert_eq!(spec.samples(), 16_000);
        assert_eq!(
            spec.due(origin, 16_000) - origin,
            Duration::from_millis(500)
        );
    }
}
