//! What the bundled spotter's voice activity gate saves, counted in the server's metrics: a
//! stream of silence and background noise runs Silero VAD on all of it and the embedding
//! model on none of it, and a stream with speech runs the embedding only around the speech.
//! One test in a binary of its own, so that the metrics it reads count its streams alone.

mod common;

use std::time::Duration;

use common::stream_client::*;
use common::*;
use serde_json::{json, Value};

const SPOTTER: &str = "hey_marvin";

async fn stream(url: &str, audio: &[u8], options: Value) -> Run {
    let run = stream_resumable_to(
        (SPOTTER, &options),
        &[url.to_string()],
        audio,
        16000,
        3200,
        Duration::ZERO,
        0,
    )
    .await;
    assert!(matches!(run.ends[..], [Ended::Done]), "{:?}", run.ends);
    run
}

/// `streamserve_stream_stage_steps_total` (or `_skips_`) of the spotter's `stage`.
async fn count(url: &str, what: &str, stage: &str) -> f64 {
    let metrics = metrics_text(&client(), url).await;
    let series =
        format!("streamserve_stream_stage_{what}_total{{model=\"{SPOTTER}\",stage=\"{stage}\"}}");
    sample(&metrics, &series).unwrap_or_else(|| panic!("no {series}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_gate_spends_no_embedding_calls_on_silence() {
    let url = start(&repo().join("models"), |_| {});
    // 8 s: digital silence, then white noise at about -50 dBFS.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let samples = (0..128_000).map(|i| {
        if i < 64_000 {
            return 0i16;
        }
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state % 201) as i16 - 100) / 10
    });
    let quiet: Vec<u8> = samples.flat_map(i16::to_le_bytes).collect();
    let run = stream(&url, &quiet, json!({})).await;
    assert!(run.results.iter().all(|m| m["type"] != "score"));
    assert_eq!(run.summary().unwrap()["keywords"], 0);
    assert_eq!(count(&url, "steps", "ww_embedding").await, 0.0);
    assert_eq!(count(&url, "steps", SPOTTER).await, 0.0);
    // Every 80 ms of audio had an embedding step to skip; the gate heard every 32 ms.
    assert_eq!(count(&url, "skips", "ww_embedding").await, 100.0);
    assert_eq!(count(&url, "steps", "silero_vad").await, 250.0);
    assert_eq!(count(&url, "steps", "ww_melspec").await, 100.0);

    // With speech: the embedding runs around it, fewer times than without the gate.
    let (speech, _) = fixture_pcm16("keyword_positive");
    let run = stream(&url, &speech, json!({})).await;
    assert_eq!(run.summary().unwrap()["keywords"], 2);
    let gated = count(&url, "steps", "ww_embedding").await;
    let skipped = count(&url, "skips", "ww_embedding").await - 100.0;
    let run = stream(&url, &speech, json!({"gate": false})).await;
    assert_eq!(run.summary().unwrap()["keywords"], 2);
    let all = count(&url, "steps", "ww_embedding").await - gated;
    assert!(skipped > 0.0 && gated < all, "{gated} of {all}");
    assert_eq!(gated + skipped, all, "every step either ran or was skipped");
}
