//! A gated keyword stream in degraded mode: while the gate's model (Silero VAD) is too slow
//! for its SLO, the gate's steps go to its fallback (`vad_energy`, as the bundled manifest
//! says), the scores that follow are flagged `degraded`, and the spotter still hears the
//! phrase; once Silero is quick again the streams come back to it.

mod common;

use std::time::Duration;

use common::stream_client::*;
use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keyword_streams_ride_through_a_slow_gate_on_its_fallback() {
    let dir = model_dir(&bundled_manifest());
    let url = start(&dir, |config| config.admin_token = Some("t".into()));
    // While 6 streams run, the gate's steps go to vad_energy for a while.
    slow_silero_for_three_batches(&url).await;
    let (audio, rate) = fixture_pcm16("keyword_positive");
    let options = json!({});
    let runs = futures_util::future::join_all((0..6).map(|_| {
        let (url, audio, options) = (url.clone(), audio.clone(), options.clone());
        async move {
            stream_resumable_to(
                ("hey_marvin", &options),
                &[url],
                &audio,
                rate,
                2048,
                Duration::ZERO,
                0,
            )
            .await
        }
    }))
    .await;
    let (mut degraded, mut total) = (0, 0);
    for run in &runs {
        assert!(matches!(run.ends[..], [Ended::Done]), "{:?}", run.ends);
        assert!(run.out_of_order.is_empty(), "{:?}", run.out_of_order);
        let scores: Vec<_> = run
            .results
            .iter()
            .filter(|m| m["type"] == "score")
            .collect();
        total += scores.len();
        degraded += scores.iter().filter(|m| m["degraded"] == true).count();
        // The phrase is still heard, twice.
        assert_eq!(run.summary().unwrap()["keywords"], 2, "{:?}", run.summary());
    }
    assert!(degraded > 0, "no gate step went to the fallback");
    assert!(degraded < total, "the streams never came back to silero");
    let metrics = metrics_text(&client(), &url).await;
    let fallback_steps = sample(
        &metrics,
        "streamserve_stream_stage_steps_total{model=\"hey_marvin\",stage=\"silero_vad\"}",
    );
    assert!(fallback_steps.is_some_and(|n| n > 0.0));
}
