//! Watching the model itself, over real HTTP with real models: the output histograms and the
//! drift score (which moves when the inputs are shifted on purpose and stays low when they are
//! not), a reference profile made by `streamserve profile` that fixes the buckets from the
//! start, and a golden-input probe that fails for a version giving wrong answers: in
//! `/metrics`, in readiness (`--probe-readiness`), in a deployment's smoke test and in a
//! running canary, which rolls back.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const TOKEN: &str = "ops";

/// The value of the first sample of `family` whose labels contain every one of `labels`.
fn sample(metrics: &str, family: &str, labels: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{family}{{")))
        .find(|l| labels.iter().all(|label| l.contains(label)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

async fn wait_for_metric(
    c: &reqwest::Client,
    url: &str,
    what: &str,
    check: impl Fn(&str) -> bool,
) -> String {
    for _ in 0..100 {
        let text = metrics_text(c, url).await;
        if check(&text) {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "timed out waiting for {what}:\n{}",
        metrics_text(c, url).await
    );
}

/// Sends `rows` rows of features in requests of 32, one after another (so that each request
/// is one model call and the drift windows end exactly on request boundaries).
async fn send_rows(c: &reqwest::Client, url: &str, seed: u64, rows: usize, shift: f32) {
    for part in 0..rows / 32 {
        let data: Vec<f32> = features(seed * 1000 + part as u64, 32)
            .into_iter()
            .map(|v| v + shift)
            .collect();
        let (status, answer) = post(
            c,
            &format!("{url}/v2/models/mlp/infer"),
            &mlp_request(&data),
        )
        .await;
        assert_eq!(status, 200, "{answer}");
    }
}

fn psi(metrics: &str, output: &str) -> f64 {
    let label = format!("output=\"{output}\"");
    sample(
        metrics,
        "streamserve_model_output_drift_psi",
        &["model=\"mlp\"", &label],
    )
    .unwrap_or_else(|| panic!("no drift score for {output}:\n{metrics}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_stays_low_for_the_same_inputs_and_moves_when_they_shift() {
    let dir = model_dir(&format!(
        "[[models]]\nname = \"mlp\"\nversion = \"1\"\nfile = \"{{models}}/mlp/1/model.onnx\"\nsha256 = \"{MLP_SHA}\"\nmax_batch_size = 64\n"
    ));
    let url = start(&dir, |c| {
        c.drift_reference_rows = 256;
        c.drift_window_rows = 256;
    });
    let c = client();
    // Present from the start, before any answer.
    let first = metrics_text(&c, &url).await;
    assert!(
        first.contains(
            "streamserve_model_reference_info{model=\"mlp\",version=\"1\",source=\"collecting\"} 1"
        ),
        "{first}"
    );
    assert_eq!(
        sample(&first, "streamserve_model_rows_total", &["model=\"mlp\""]),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &first,
            "streamserve_model_input_nonfinite_total",
            &["input=\"features\"", "kind=\"nan\""]
        ),
        Some(0.0)
    );

    send_rows(&c, &url, 1, 256, 0.0).await;
    let frozen = metrics_text(&c, &url).await;
    assert!(frozen.contains("source=\"first_answers\""), "{frozen}");
    assert!(frozen.contains("streamserve_model_output_bucket{model=\"mlp\",version=\"1\",output=\"probabilities\",le=\"+Inf\"} 0"), "buckets are fixed, counting starts after the reference: {frozen}");

    send_rows(&c, &url, 2, 256, 0.0).await;
    let same = metrics_text(&c, &url).await;
    for output in ["logits", "probabilities"] {
        assert!(
            psi(&same, output) < 0.1,
            "{output}: same inputs, low drift: {}",
            psi(&same, output)
        );
    }
    assert!(
        sample(
            &same,
            "streamserve_model_output_count",
            &["output=\"logits\""]
        )
        .unwrap()
            >= 256.0 * 16.0
    );

    send_rows(&c, &url, 3, 256, 3.0).await;
    let shifted = metrics_text(&c, &url).await;
    assert!(
        psi(&shifted, "logits") > 0.25,
        "shifted inputs, large drift: {}",
        psi(&shifted, "logits")
    );
    let max = sample(
        &shifted,
        "streamserve_model_input_max",
        &["input=\"features\""],
    )
    .unwrap();
    assert!(
        (3.9..=4.0).contains(&max),
        "the input range shows the shift: {max}"
    );
}

/// A model directory of its own (the profile and probe are written beside the model files,
/// which must not be the bundled ones): `mlp` version 2 is the real mlp, version 1 is
/// `mlp_small`, a different model with the same interface (both made by
/// scripts/make_models.py), which gives other answers: a wrong version.
fn own_models() -> PathBuf {
    let dir = model_dir("");
    for (version, source) in [("1", "mlp_small"), ("2", "mlp")] {
        let target = dir.join("mlp").join(version);
        std::fs::create_dir_all(&target).unwrap();
        std::fs::copy(
            repo().join(format!("models/{source}/1/model.onnx")),
            target.join("model.onnx"),
        )
        .unwrap();
    }
    let manifest = format!(
        "[[models]]\nname = \"mlp\"\nversion = \"1\"\nfile = \"mlp/1/model.onnx\"\nsha256 = \"{MLP_SMALL_SHA}\"\nmax_batch_size = 64\n\n\
         [[models]]\nname = \"mlp\"\nversion = \"2\"\nfile = \"mlp/2/model.onnx\"\nsha256 = \"{MLP_SHA}\"\nmax_batch_size = 64\n"
    );
    std::fs::write(dir.join("models.toml"), manifest).unwrap();
    dir
}

fn write_data(path: &Path, lines: usize, bad_line: Option<usize>) {
    let text: Vec<String> = (0..lines)
        .map(|i| match bad_line {
            Some(bad) if bad == i + 1 => "{\"inputs\": [{\"name\": \"features\"".to_string(),
            _ => mlp_request(&features(500 + i as u64, 8)).to_string(),
        })
        .collect();
    std::fs::write(path, text.join("\n")).unwrap();
}

fn profile(models: &Path, model: &str, data: &Path, probe: bool) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_streamserve"));
    command
        .current_dir(repo())
        .args(["profile", model, "--models"])
        .arg(models)
        .arg("--data")
        .arg(data);
    if probe {
        command.arg("--probe");
    }
    command.output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_fixes_the_buckets_from_the_start_and_a_wrong_version_fails_its_probe() {
    let dir = own_models();
    let data = dir.join("reference.jsonl");

    // Bad input to the command first: a malformed line names its number, nothing is written.
    write_data(&data, 3, Some(2));
    let bad = profile(&dir, "mlp:2", &data, true);
    assert!(!bad.status.success());
    let said = String::from_utf8_lossy(&bad.stderr);
    assert!(said.contains("line 2"), "{said}");
    assert!(!dir.join("mlp/2/profile.json").exists());
    let unknown = profile(&dir, "nosuch", &data, false);
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no model nosuch"));

    write_data(&data, 40, None);
    let made = profile(&dir, "mlp:2", &data, true);
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let written: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("mlp/2/profile.json")).unwrap())
            .unwrap();
    assert_eq!(written["model_sha256"], MLP_SHA);
    assert_eq!(written["rows"], 320);
    assert_eq!(written["data_sha256"].as_str().map(str::len), Some(64));
    // The same golden input and answer travel with the next version, which gets them wrong.
    std::fs::copy(dir.join("mlp/2/probe.json"), dir.join("mlp/1/probe.json")).unwrap();

    let url = start(&dir, |c| {
        c.admin_token = Some(TOKEN.into());
        c.probe_readiness = true;
    });
    let c = client();
    let text = wait_for_metric(&c, &url, "both probes to have run", |m| {
        ["version=\"1\"", "version=\"2\""]
            .iter()
            .all(|v| sample(m, "streamserve_probe_checks_total", &[v]).is_some_and(|n| n >= 1.0))
    })
    .await;
    assert!(
        text.contains(
            "streamserve_model_reference_info{model=\"mlp\",version=\"2\",source=\"profile\"} 1"
        ),
        "{text}"
    );
    assert!(text.contains("streamserve_model_output_bucket{model=\"mlp\",version=\"2\",output=\"logits\",le=\"+Inf\"}"));
    assert_eq!(
        sample(&text, "streamserve_probe_success", &["version=\"2\""]),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "streamserve_probe_success", &["version=\"1\""]),
        Some(0.0)
    );
    assert!(
        sample(
            &text,
            "streamserve_probe_failures_total",
            &["version=\"1\""]
        )
        .unwrap()
            >= 1.0
    );

    // Readiness follows the probe; the good version serves on, unaffected.
    let ready = |v: &str| format!("{url}/v2/models/mlp/versions/{v}/ready");
    assert_eq!(get(&c, &ready("1")).await.0, 400);
    assert_eq!(get(&c, &ready("2")).await.0, 200);
    let (status, _) = post(
        &c,
        &format!("{url}/v2/models/mlp/infer"),
        &mlp_request(&features(9, 1)),
    )
    .await;
    assert_eq!(status, 200);

    // A deployment's smoke test is the probe: the wrong version is refused, nothing changes.
    let deploy = |body: Value| {
        let c = c.clone();
        let url = url.clone();
        async move {
            let response = c
                .post(format!("{url}/admin/models/mlp/deploy"))
                .bearer_auth(TOKEN)
                .json(&body)
                .send()
                .await
                .unwrap();
            (
                response.status().as_u16(),
                response.json::<Value>().await.unwrap(),
            )
        }
    };
    let (status, answer) = deploy(json!({"version": "1", "strategy": "blue_green"})).await;
    assert_eq!(status, 409, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("probe fails"),
        "{answer}"
    );

    // Without the smoke test the canary starts, and its failing probe rolls it back.
    let (status, answer) = deploy(json!({
        "version": "1", "strategy": "canary", "steps": [10, 50, 100], "step_secs": 60, "smoke_test": false
    }))
    .await;
    assert_eq!(status, 200, "{answer}");
    wait_for_metric(&c, &url, "the canary to roll back", |m| {
        sample(
            m,
            "streamserve_rollout_events_total",
            &["model=\"mlp\"", "event=\"rolled_back\""],
        )
        .is_some_and(|n| n >= 1.0)
    })
    .await;
    let (_, models) = get(&c, &format!("{url}/v2/models")).await;
    let default: Vec<&Value> = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["name"] == "mlp" && m["default"] == true)
        .collect();
    assert_eq!(default.len(), 1);
    assert_eq!(default[0]["version"], "2", "{models}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_or_probe_that_does_not_fit_refuses_its_version_with_the_reason() {
    let dir = own_models();
    std::fs::write(
        dir.join("mlp/2/profile.json"),
        json!({"format": 1, "model_sha256": "00", "rows": 1, "created_unix": 0, "outputs": {}})
            .to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.join("mlp/1/probe.json"),
        "{\"inputs\": [], \"outputs\": []}",
    )
    .unwrap();
    let url = start(&dir, |c| c.admin_token = Some(TOKEN.into()));
    let c = client();
    let response = c
        .get(format!("{url}/admin/models"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let list: Value = response.json().await.unwrap();
    let reason = |v: &str| {
        list["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["version"] == v)
            .and_then(|m| m["reason"].as_str())
            .unwrap_or_default()
            .to_string()
    };
    assert!(reason("2").contains("not this one"), "{list}");
    assert!(reason("1").contains("at least one output"), "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vad_version_adds_up_its_speech_and_segment_lengths() {
    let url = start(&repo().join("models"), |_| {});
    let c = client();
    let before = metrics_text(&c, &url).await;
    let silero = ["model=\"silero_vad\"", "version=\"1\""];
    assert_eq!(
        sample(&before, "streamserve_stream_audio_seconds_total", &silero),
        Some(0.0)
    );
    assert_eq!(
        sample(&before, "streamserve_stream_segment_seconds_count", &silero),
        Some(0.0)
    );

    let wav = std::fs::read(repo().join("tests/audio/two_phrases_16k.wav")).unwrap();
    let response = c
        .post(format!("{url}/v1/models/silero_vad/segments"))
        .body(wav)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    let segments = answer["segments"].as_array().unwrap();
    let speech: f64 = segments
        .iter()
        .map(|s| s["end"].as_f64().unwrap() - s["start"].as_f64().unwrap())
        .sum();

    let after = metrics_text(&c, &url).await;
    let audio = sample(&after, "streamserve_stream_audio_seconds_total", &silero).unwrap();
    assert!(
        (audio - answer["duration"].as_f64().unwrap()).abs() < 0.05,
        "{audio}"
    );
    let counted = sample(&after, "streamserve_stream_speech_seconds_total", &silero).unwrap();
    assert!((counted - speech).abs() < 0.01, "{counted} vs {speech}");
    assert_eq!(
        sample(&after, "streamserve_stream_segment_seconds_count", &silero),
        Some(segments.len() as f64)
    );
    let ratio = sample(&after, "streamserve_stream_speech_ratio", &silero).unwrap();
    assert!((ratio - speech / audio).abs() < 0.01, "{ratio}");
}
