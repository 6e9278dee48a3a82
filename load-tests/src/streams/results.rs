//! The reading half of a stream: every server message checked (`seq`, `t`, the summary) and
//! each chunk's result timed against the send of the audio that completed it.

use std::sync::atomic::Ordering;
use std::time::Instant;

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use super::{
    close_code, ChunkTimes, ResultsMode, ServerMessage, Shared, StreamOptions, StreamOutcome,
    SHARDS,
};
use crate::hist;

/// Reads every server message until the close, checking and timing them.
pub(super) async fn read_results<S>(
    stream: &mut S,
    options: &StreamOptions,
    chunk: u64,
    shared: &Shared,
    deadline: Instant,
    times: &ChunkTimes,
    outcome: &mut StreamOutcome,
) where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let rate = options.audio.sample_rate as f64;
    let target_us = hist::micros(options.late_threshold);
    let mut next_seq: u64 = 0;
    let mut vad_index: u64 = 0;
    loop {
        let next = match tokio::time::timeout_at(deadline.into(), stream.next()).await {
            Err(_) => {
                outcome.error(shared, "timeout", "no close within the end timeout");
                return;
            }
            Ok(next) => next,
        };
        let text = match next {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => {
                let code = close_code(frame.as_ref());
                outcome.close = Some(code);
                if code != 1000 {
                    let reason = frame.map(|f| f.reason.to_string()).unwrap_or_default();
                    outcome.error(shared, format!("close {code}"), reason);
                } else if !outcome.summary {
                    outcome.error(shared, "no summary", "closed 1000 without a summary");
                }
                return;
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                outcome.error(shared, "transport", e.to_string());
                return;
            }
            None => {
                outcome.error(
                    shared,
                    "transport",
                    "connection ended without a close frame",
                );
                return;
            }
        };
        let received = Instant::now();
        let message: ServerMessage = match serde_json::from_str(&text) {
            Ok(m) => m,
            Err(e) => {
                outcome.error(shared, "invalid message", format!("{e}: {text}"));
                continue;
            }
        };
        if message.kind == "error" {
            outcome.error(
                shared,
                format!("error {}", message.code.as_deref().unwrap_or("?")),
                message.message.unwrap_or_default(),
            );
            continue;
        }
        match message.seq {
            Some(seq) if seq == next_seq => next_seq += 1,
            Some(seq) => {
                outcome.error(
                    shared,
                    "seq gap",
                    format!("expected seq {next_seq}, got {seq}: {text}"),
                );
                next_seq = seq + 1;
            }
            None => {
                outcome.error(shared, "invalid message", format!("no seq: {text}"));
                continue;
            }
        }
        match message.kind.as_str() {
            kind @ ("vad" | "score") => {
                // A `vad` result is for the next chunk (`t` its start); a keyword stream's
                // `score` for the chunk its `t` ends (none come for the first chunks, while the
                // spotter fills its window).
                let k = if kind == "vad" {
                    let k = vad_index;
                    vad_index += 1;
                    let t_expected = (k * chunk) as f64 / rate;
                    if message.t.is_none_or(|t| (t - t_expected).abs() > 1e-6) {
                        outcome.error(
                            shared,
                            "vad t mismatch",
                            format!("vad #{k} should have t = {t_expected}: {text}"),
                        );
                    }
                    k
                } else {
                    let k = scored_chunk(message.t.unwrap_or(0.0), rate, chunk);
                    outcome.first_scored.get_or_insert(k);
                    k
                };
                outcome.chunks_total += 1;
                shared.chunks.fetch_add(1, Ordering::Relaxed);
                if message.degraded == Some(true) {
                    outcome.degraded += 1;
                }
                let found = {
                    let mut times = times.lock().expect("no panics while holding it");
                    while times.front().is_some_and(|&(c, _, _)| c < k) {
                        times.pop_front();
                    }
                    match times.front() {
                        Some(&(c, sent, scheduled)) if c == k => {
                            times.pop_front();
                            Some((sent, scheduled))
                        }
                        _ => None,
                    }
                };
                let Some((sent, scheduled)) = found else {
                    outcome.error(
                        shared,
                        "unmatched vad",
                        format!("a result for chunk {k}, whose audio was not sent yet"),
                    );
                    continue;
                };
                if sent >= shared.measure_start && sent < shared.measure_end {
                    let us = hist::micros(received.saturating_duration_since(sent));
                    let sched_us = hist::micros(received.saturating_duration_since(scheduled));
                    {
                        let mut shard = shared.shards[k as usize % SHARDS]
                            .lock()
                            .expect("no panics while holding a shard");
                        shard.latency_us.saturating_record(us);
                        shard.latency_sched_us.saturating_record(sched_us);
                    }
                    outcome.chunks_measured += 1;
                    shared.max_latency_us.fetch_max(us, Ordering::Relaxed);
                    if us > target_us {
                        shared.over_target.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            "speech_start" | "speech_end" | "keyword" => outcome.events += 1,
            "summary" => {
                outcome.summary = true;
                let vad_stream = message.keywords.is_none();
                outcome.keyword_stream = !vad_stream;
                if vad_stream
                    && options.results == ResultsMode::All
                    && message.chunks != Some(vad_index)
                {
                    outcome.error(
                        shared,
                        "summary chunks",
                        format!(
                            "summary says {:?} chunks, {vad_index} vad results came",
                            message.chunks
                        ),
                    );
                }
            }
            other => {
                outcome.error(
                    shared,
                    "invalid message",
                    format!("unexpected type {other}: {text}"),
                );
            }
        }
    }
}

/// The chunk a keyword `score` is for: the one its `t` ends. The last step's `t` is the end of
/// the audio sent (its chunk completed with silence by `end`), which can fall anywhere in that
/// chunk, so the end rounds up; the 1e-6 absorbs a full chunk's end printed a hair above it.
pub(super) fn scored_chunk(t: f64, rate: f64, chunk: u64) -> u64 {
    let ends = (t * rate / chunk as f64 - 1e-6).ceil().max(0.0) as u64;
    ends.saturating_sub(1)
}
