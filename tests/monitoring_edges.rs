//! Edges of the monitoring that the other monitor tests do not reach, over real HTTP with real
//! models: a single NaN in an output too large for the histogram to read every value of is
//! still counted (while the reference collects and after it froze), and a fresh server shows
//! the error series its alerts take `rate()` over at 0 before the first error, for a version
//! that serves and one that was refused at load.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const TYPED_OPS_SHA: &str = "e491291eeeb4b687cde854db925c3c769498cd67b25c9f54b5eb5b14534916de";

/// Rows per request: 4,096 values per output, four times what the histogram reads of one call.
const ROWS: usize = 1024;

/// typed_ops (`sum` = a + b, FP64) in batches of `ROWS`, allowed NaN in its inputs: a NaN in
/// one value of `b` is exactly one NaN in `sum`.
fn wide_ops_manifest() -> String {
    format!(
        "[[models]]\nname = \"wide_ops\"\nversion = \"1\"\nfile = \"{{models}}/typed_ops/1/model.onnx\"\nsha256 = \"{TYPED_OPS_SHA}\"\nmax_batch_size = {ROWS}\nallow_non_finite = true\n"
    )
}

/// A request of `ROWS` rows whose `b` holds one NaN, at `nan_at` (JSON has no NaN: `b` goes
/// as a binary tensor, the other inputs as JSON): the body, and the length of its JSON part.
fn one_nan_request(nan_at: usize) -> (Vec<u8>, usize) {
    let n = ROWS * 4;
    let b: Vec<f64> = (0..n)
        .map(|i| {
            if i == nan_at {
                f64::NAN
            } else {
                i as f64 * 0.25 - 300.0
            }
        })
        .collect();
    let raw: Vec<u8> = b.iter().flat_map(|v| v.to_le_bytes()).collect();
    let outputs: Vec<Value> = ["sum", "masked", "positive", "masked_i32"]
        .iter()
        .map(|name| json!({"name": name, "parameters": {"binary_data": false}}))
        .collect();
    let header = json!({
        "inputs": [
            {"name": "a", "shape": [ROWS, 4], "datatype": "INT64",
             "data": (0..n).map(|i| (i % 7) as i64).collect::<Vec<_>>()},
            {"name": "b", "shape": [ROWS, 4], "datatype": "FP64",
             "parameters": {"binary_data_size": raw.len()}},
            {"name": "mask", "shape": [ROWS, 4], "datatype": "BOOL",
             "data": (0..n).map(|i| i % 2 == 0).collect::<Vec<_>>()}],
        "outputs": outputs,
    });
    let mut body = serde_json::to_vec(&header).unwrap();
    let json_len = body.len();
    body.extend(raw);
    (body, json_len)
}

/// Posts a request made by [`one_nan_request`]; the answer's `sum` values.
async fn infer_wide(c: &reqwest::Client, url: &str, nan_at: usize) -> Vec<Value> {
    let (body, json_len) = one_nan_request(nan_at);
    let response = c
        .post(format!("{url}/v2/models/wide_ops/infer"))
        .header("Inference-Header-Content-Length", json_len.to_string())
        .body(body)
        .send()
        .await
        .expect("request sent");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    assert_eq!(status, 200, "{text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    let sum = answer["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "sum")
        .unwrap_or_else(|| panic!("no sum in {text}"));
    sum["data"].as_array().unwrap().clone()
}

const SUM_NAN: &str =
    r#"streamserve_model_output_nan_total{model="wide_ops",version="1",output="sum"}"#;

/// Waits until `model` answers ready.
async fn wait_ready(c: &reqwest::Client, url: &str, model: &str) {
    let until = Instant::now() + Duration::from_secs(60);
    while get(c, &format!("{url}/v2/models/{model}/ready")).await.0 != 200 {
        assert!(Instant::now() < until, "{model} never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_nan_in_a_large_output_is_counted() {
    let url = start(&model_dir(&wide_ops_manifest()), |c| {
        c.drift_reference_rows = ROWS as u64;
        c.drift_window_rows = ROWS as u64;
    });
    let c = client();
    wait_ready(&c, &url, "wide_ops").await;
    let text = metrics_text(&c, &url).await;
    assert_eq!(sample(&text, SUM_NAN), Some(0.0), "{text}");

    // The first call is read from its second value on at a stride of 4: the NaN at 0 is not
    // among the values read, and the reference collects from this call.
    let sum = infer_wide(&c, &url, 0).await;
    assert_eq!(sum.len(), ROWS * 4);
    assert_eq!(sum[0], "NaN", "the model answered one NaN");
    assert_eq!(sum.iter().filter(|v| *v == "NaN").count(), 1);
    let text = metrics_text(&c, &url).await;
    assert!(
        text.contains(
            r#"streamserve_model_reference_info{model="wide_ops",version="1",source="first_answers"} 1"#
        ),
        "the call made the reference:\n{text}"
    );
    assert_eq!(
        sample(&text, SUM_NAN),
        Some(1.0),
        "one NaN in 4,096 values, counted while the reference collected:\n{text}"
    );

    // Past the reference, the histogram's first call is read from its second value on too.
    let sum = infer_wide(&c, &url, 4092).await;
    assert_eq!(sum[4092], "NaN");
    let text = metrics_text(&c, &url).await;
    assert_eq!(
        sample(&text, SUM_NAN),
        Some(2.0),
        "one more NaN, counted against the frozen reference:\n{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"streamserve_model_input_nonfinite_total{model="wide_ops",version="1",input="b",kind="nan"}"#
        ),
        Some(2.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_server_shows_its_error_series_at_zero() {
    // `ops` serves; `gone_ops` is refused at load (a malformed probe.json) and answers 503.
    let dir = model_dir("");
    let gone = dir.join("gone_ops/1");
    std::fs::create_dir_all(&gone).unwrap();
    std::fs::copy(
        repo().join("models/typed_ops/1/model.onnx"),
        gone.join("model.onnx"),
    )
    .unwrap();
    std::fs::write(gone.join("probe.json"), r#"{"inputs": [], "outputs": []}"#).unwrap();
    let models = repo().join("models");
    std::fs::write(
        dir.join("models.toml"),
        format!(
            "[[models]]\nname = \"ops\"\nversion = \"1\"\nfile = \"{}/typed_ops/1/model.onnx\"\nsha256 = \"{TYPED_OPS_SHA}\"\n\n\
             [[models]]\nname = \"gone_ops\"\nversion = \"1\"\nfile = \"gone_ops/1/model.onnx\"\nsha256 = \"{TYPED_OPS_SHA}\"\n",
            models.display()
        ),
    )
    .unwrap();
    let url = start(&dir, |_| {});
    let c = client();
    wait_ready(&c, &url, "ops").await;

    let text = metrics_text(&c, &url).await;
    let requests = |model: &str, status: &str| {
        format!(r#"streamserve_requests_total{{model="{model}",version="1",status="{status}"}}"#)
    };
    for status in ["429", "500", "503", "504"] {
        assert_eq!(
            sample(&text, &requests("ops", status)),
            Some(0.0),
            "{status} of a loaded version:\n{text}"
        );
        assert_eq!(
            sample(&text, &requests("gone_ops", status)),
            Some(0.0),
            "{status} of a version refused at load:\n{text}"
        );
    }
    assert_eq!(
        sample(
            &text,
            r#"streamserve_model_version_up{model="gone_ops",version="1"}"#
        ),
        Some(0.0),
        "{text}"
    );
    // The other error-class series its alerts read, at 0 as well.
    for series in [
        r#"streamserve_inference_failures_total{model="ops",version="1"}"#,
        r#"streamserve_worker_restarts_total{model="ops",version="1"}"#,
        r#"streamserve_deadline_exceeded_total{model="ops",version="1"}"#,
        r#"streamserve_shed_total{model="ops",version="1"}"#,
        r#"streamserve_model_output_nan_total{model="ops",version="1",output="sum"}"#,
        r#"streamserve_model_input_nonfinite_total{model="ops",version="1",input="b",kind="nan"}"#,
        r#"streamserve_stream_resume_refused_total{reason="tampered"}"#,
        r#"streamserve_admission_refused_total"#,
    ] {
        assert_eq!(sample(&text, series), Some(0.0), "{series}:\n{text}");
    }
    assert!(
        !text.contains(r#"model="_unknown""#),
        "no series for names no manifest lists:\n{text}"
    );
    assert_eq!(undescribed(&text), Vec::<String>::new(), "{text}");

    // The zeroed series is the one the refusals move.
    let request = json!({"inputs": [
        {"name": "a", "shape": [1, 4], "datatype": "INT64", "data": [1, 2, 3, 4]},
        {"name": "b", "shape": [1, 4], "datatype": "FP64", "data": [0.5, -1, 0, 2]},
        {"name": "mask", "shape": [1, 4], "datatype": "BOOL", "data": [true, false, true, false]}]});
    let (status, body) = post(&c, &format!("{url}/v2/models/gone_ops/infer"), &request).await;
    assert_eq!(status, 503, "{body}");
    let text = metrics_text(&c, &url).await;
    assert_eq!(
        sample(&text, &requests("gone_ops", "503")),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        text.matches(&requests("gone_ops", "503")).count(),
        1,
        "one series, not a second one beside the zeroed one:\n{text}"
    );
}
