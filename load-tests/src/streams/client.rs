//! One stream's life on the client side: connect, `start`, then send audio on the real-time
//! schedule while the results are read, and check at the end that every chunk got its result.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use super::close_code;
use super::results::read_results;
use super::{ChunkTimes, ResultsMode, ServerMessage, Shared, StreamOptions, StreamOutcome};
use crate::hist;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub(super) async fn one_stream(
    i: usize,
    url: &str,
    options: &StreamOptions,
    shared: &Shared,
) -> StreamOutcome {
    let mut outcome = StreamOutcome::default();
    let send_end = shared.measure_end;
    let read_deadline = send_end + options.end_timeout;

    let connected = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async_with_config(url, None, true),
    )
    .await;
    let ws: Socket = match connected {
        Ok(Ok((ws, _))) => ws,
        Ok(Err(e)) => {
            outcome.error(shared, "connect", e.to_string());
            return outcome;
        }
        Err(_) => {
            outcome.error(shared, "connect", "no WebSocket upgrade within 10 s");
            return outcome;
        }
    };
    outcome.connected = true;
    shared.open.fetch_add(1, Ordering::Relaxed);
    stream_body(i, ws, options, shared, read_deadline, &mut outcome).await;
    shared.open.fetch_sub(1, Ordering::Relaxed);
    outcome
}

async fn stream_body(
    i: usize,
    mut ws: Socket,
    options: &StreamOptions,
    shared: &Shared,
    read_deadline: Instant,
    outcome: &mut StreamOutcome,
) {
    let mut start = serde_json::json!({
        "type": "start",
        "sample_rate": options.audio.sample_rate,
        "format": "pcm16",
        "results": options.results.as_str(),
    });
    if options.no_gate {
        start["gate"] = false.into();
    }
    if let Err(e) = ws.send(Message::text(start.to_string())).await {
        outcome.error(shared, "transport", format!("sending start: {e}"));
        return;
    }
    let started = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
    let chunk = match started {
        Ok(Some(Ok(Message::Text(text)))) => match serde_json::from_str::<ServerMessage>(&text) {
            Ok(m) if m.kind == "started" => {
                if m.sample_rate != Some(options.audio.sample_rate) {
                    outcome.error(shared, "start", format!("unexpected started: {text}"));
                    return;
                }
                m.chunk_samples.unwrap_or(0)
            }
            // Turned away at the door (its limit, or its streams behind real time): an
            // error message, then close 1013. Counted as a refusal, with its close code.
            Ok(m) if m.kind == "error" && m.code.as_deref() == Some("try_again") => {
                outcome.close = closing_code(&mut ws).await;
                outcome.error(shared, "refused (try_again)", text.to_string());
                return;
            }
            _ => {
                outcome.error(shared, "start", format!("expected started, got {text}"));
                return;
            }
        },
        Ok(Some(Ok(Message::Close(frame)))) => {
            outcome.close = Some(close_code(frame.as_ref()));
            outcome.error(shared, "start", format!("closed before started: {frame:?}"));
            return;
        }
        Ok(other) => {
            outcome.error(shared, "start", format!("expected started, got {other:?}"));
            return;
        }
        Err(_) => {
            outcome.error(shared, "start", "no started message within 10 s");
            return;
        }
    };
    if chunk == 0 {
        outcome.error(shared, "start", "started without chunk_samples");
        return;
    }
    outcome.started = true;
    outcome.chunk_samples = chunk;

    // Stagger where in the file each stream starts, so that speech comes at different times.
    let offset = (i * 48_017) % options.audio.samples;
    let times: ChunkTimes = Arc::new(Mutex::new(VecDeque::new()));
    let (mut sink, mut stream) = ws.split();
    let writer = {
        let times = times.clone();
        async move {
            send_audio(
                &mut sink,
                options,
                offset,
                chunk,
                shared.measure_end,
                read_deadline,
                &times,
                &shared.max_lag_us,
            )
            .await
        }
    };
    let reader = read_results(
        &mut stream,
        options,
        chunk,
        shared,
        read_deadline,
        &times,
        outcome,
    );
    let ((sent, max_lag, write_error), ()) = tokio::join!(writer, reader);
    outcome.samples_sent = sent;
    outcome.max_lag = max_lag;
    if let Some(e) = write_error {
        // Sending fails when the server closed first; the close code already says why, so
        // only count it when the stream otherwise looked fine.
        if outcome.errors.is_empty() {
            outcome.error(shared, "transport", e);
        }
    }
    let expected_chunks = sent.div_ceil(chunk) - outcome.first_scored.unwrap_or(0);
    // A gated keyword stream has no score for the steps its gate skipped (none at all while
    // it hears no speech).
    let gated = outcome.keyword_stream && !options.no_gate;
    let missing = outcome.chunks_total > expected_chunks
        || (!gated && outcome.chunks_total != expected_chunks);
    if outcome.summary {
        if options.results == ResultsMode::All && missing {
            outcome.error(
                shared,
                "missing results",
                format!(
                    "{} results for {expected_chunks} chunks sent (after the first scored)",
                    outcome.chunks_total
                ),
            );
        }
    } else if outcome.errors.is_empty() {
        outcome.error(shared, "no summary", format!("close {:?}", outcome.close));
    }
}

/// Sends audio frames on the real-time schedule until `send_end`, then `end`. Returns the
/// samples sent, the furthest it fell behind schedule, and a send error if one ended it.
#[allow(clippy::too_many_arguments)]
async fn send_audio<S>(
    sink: &mut S,
    options: &StreamOptions,
    offset: usize,
    chunk: u64,
    send_end: Instant,
    hard_deadline: Instant,
    times: &ChunkTimes,
    max_lag_us: &AtomicU64,
) -> (u64, Duration, Option<String>)
where
    S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    let frame_samples = options.frame_samples();
    let period = options.frame_period();
    let first = Instant::now();
    let mut sent: u64 = 0;
    let mut max_lag = Duration::ZERO;
    let mut frame: u64 = 0;
    loop {
        let scheduled = first + period.mul_f64(frame as f64);
        if scheduled >= send_end {
            break;
        }
        tokio::time::sleep_until(scheduled.into()).await;
        let now = Instant::now();
        let lag = now.saturating_duration_since(scheduled);
        if lag > max_lag {
            max_lag = lag;
            max_lag_us.fetch_max(hist::micros(lag), Ordering::Relaxed);
        }
        let after = sent + frame_samples as u64;
        {
            let mut times = times.lock().expect("no panics while holding it");
            for k in sent / chunk..after / chunk {
                times.push_back((k, now, scheduled));
            }
        }
        let data = options.audio.frame(
            offset + sent as usize % options.audio.samples,
            frame_samples,
        );
        match tokio::time::timeout_at(hard_deadline.into(), sink.send(Message::binary(data))).await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return (sent, max_lag, Some(format!("sending audio: {e}"))),
            Err(_) => {
                return (
                    sent,
                    max_lag,
                    Some("sending audio blocked until the deadline".into()),
                )
            }
        }
        sent = after;
        frame += 1;
    }
    let now = Instant::now();
    if !sent.is_multiple_of(chunk) {
        // `end` completes the last, partial chunk (the server pads it with silence).
        times
            .lock()
            .expect("no panics while holding it")
            .push_back((sent / chunk, now, now));
    }
    let end = Message::text(r#"{"type":"end"}"#);
    match tokio::time::timeout_at(hard_deadline.into(), sink.send(end)).await {
        Ok(Ok(())) => (sent, max_lag, None),
        Ok(Err(e)) => (sent, max_lag, Some(format!("sending end: {e}"))),
        Err(_) => (
            sent,
            max_lag,
            Some("sending end blocked until the deadline".into()),
        ),
    }
}

/// The close code that follows a server's error message (1005 when the close says none;
/// `None` when no close comes within 2 s).
async fn closing_code(ws: &mut Socket) -> Option<u16> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => return Some(close_code(frame.as_ref())),
            Ok(Some(Ok(_))) => continue,
            _ => return None,
        }
    }
}
