//! NaN answers and the drift monitor, over real HTTP with the real mlp: rows the model answers
//! with NaN (features of 3e38, finite FP32s whose sums overflow) do not make a first-answers
//! reference, which waits for finite answers instead of freezing empty buckets; the NaN they
//! hold is counted from the first answer; and a window of nothing but NaN clears the drift
//! score rather than keeping the last, healthy one.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

/// The value of the first sample of `family` whose labels contain every one of `labels`.
fn sample(metrics: &str, family: &str, labels: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{family}{{")))
        .find(|l| labels.iter().all(|label| l.contains(label)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

async fn infer(c: &reqwest::Client, url: &str, data: &[f32]) {
    let (status, answer) = post(
        c,
        &format!("{url}/v2/models/nan_mlp/infer"),
        &mlp_request(data),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
}

/// 32 rows of ordinary features.
fn ordinary(seed: u64) -> Vec<f32> {
    features(seed, 32)
}

/// 64 rows the model answers with NaN.
fn overflowing() -> Vec<f32> {
    vec![3e38; 64 * 256]
}

const LOGITS: [&str; 2] = ["model=\"nan_mlp\"", "output=\"logits\""];

fn server() -> String {
    let dir = model_dir(&format!(
        "[[models]]\nname = \"nan_mlp\"\nversion = \"1\"\nfile = \"{{models}}/mlp/1/model.onnx\"\nsha256 = \"{MLP_SHA}\"\nmax_batch_size = 64\n"
    ));
    start(&dir, |c| {
        c.drift_reference_rows = 64;
        c.drift_window_rows = 64;
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nan_answers_do_not_make_a_reference_and_are_counted_while_it_collects() {
    let url = server();
    let c = client();
    infer(&c, &url, &overflowing()).await;
    let text = metrics_text(&c, &url).await;
    assert!(
        text.contains("streamserve_model_reference_info{model=\"nan_mlp\",version=\"1\",source=\"collecting\"} 1"),
        "64 rows of NaN answers are no reference:\n{text}"
    );
    assert_eq!(
        sample(&text, "streamserve_model_output_nan_total", &LOGITS),
        Some(1024.0),
        "NaN is counted while the reference collects:\n{text}"
    );

    // 64 rows of finite answers make the reference; 64 more of the same kind score low.
    for seed in 1..=2 {
        infer(&c, &url, &ordinary(seed)).await;
    }
    let text = metrics_text(&c, &url).await;
    assert!(text.contains("source=\"first_answers\""), "{text}");
    for seed in 3..=4 {
        infer(&c, &url, &ordinary(seed)).await;
    }
    let text = metrics_text(&c, &url).await;
    let psi = sample(&text, "streamserve_model_output_drift_psi", &LOGITS)
        .unwrap_or_else(|| panic!("no drift score:\n{text}"));
    assert!(
        psi < 0.25,
        "ordinary traffic against a finite reference: {psi}"
    );
    assert_eq!(
        sample(&text, "streamserve_model_output_nan_total", &LOGITS),
        Some(1024.0),
        "the NaN counter goes on from what was counted while collecting"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_of_nothing_but_nan_clears_the_drift_score() {
    let url = server();
    let c = client();
    for seed in 1..=4 {
        infer(&c, &url, &ordinary(seed)).await;
    }
    let healthy = metrics_text(&c, &url).await;
    assert!(
        sample(&healthy, "streamserve_model_output_drift_psi", &LOGITS).is_some(),
        "{healthy}"
    );
    for _ in 0..2 {
        infer(&c, &url, &overflowing()).await;
    }
    let text = metrics_text(&c, &url).await;
    assert_eq!(
        sample(&text, "streamserve_model_output_drift_psi", &LOGITS),
        None,
        "an all-NaN window keeps no stale score:\n{text}"
    );
    assert_eq!(
        sample(&text, "streamserve_model_output_nan_total", &LOGITS),
        Some(2048.0)
    );
    let (status, body) = get(&c, &format!("{url}/status")).await;
    assert_eq!(status, 200, "{body}");
    let model = body["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "nan_mlp")
        .unwrap();
    let logits = model["monitor"]["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "logits")
        .unwrap();
    assert_eq!(logits["psi"], Value::Null, "{model}");
    assert_eq!(logits["nan_only_window"], true, "{model}");

    // Finite answers again: a score again.
    for seed in 5..=6 {
        infer(&c, &url, &ordinary(seed)).await;
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    let text = metrics_text(&c, &url).await;
    assert!(
        sample(&text, "streamserve_model_output_drift_psi", &LOGITS).is_some(),
        "{text}"
    );
}
