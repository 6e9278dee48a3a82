//! `streamserve profile` reads its data set as the server reads requests, and writes only what
//! the server will take: a request the server refuses (an empty batch) is an error naming its
//! line, rows are the batch's real rows, a probe is made from the first request whose answer
//! is all finite (never `null` in `probe.json`), and each probe input keeps its own type (an
//! INT64 of i64::MAX is written as itself). Each written probe is then loaded by a real server,
//! which must serve the version and pass the probe.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// A model directory of its own holding a copy of the bundled `source` model as `name`
/// version 1 (`profile` writes beside the model file, which must not be the bundled one).
fn own_copy(source: &str, name: &str, sha256: &str, max_batch_size: usize) -> PathBuf {
    let dir = model_dir("");
    let target = dir.join(name).join("1");
    std::fs::create_dir_all(&target).unwrap();
    std::fs::copy(
        repo().join(format!("models/{source}/1/model.onnx")),
        target.join("model.onnx"),
    )
    .unwrap();
    std::fs::write(
        dir.join("models.toml"),
        format!(
            "[[models]]\nname = \"{name}\"\nversion = \"1\"\nfile = \"{name}/1/model.onnx\"\nsha256 = \"{sha256}\"\nmax_batch_size = {max_batch_size}\n"
        ),
    )
    .unwrap();
    dir
}

fn profile(models: &Path, model: &str, lines: &[Value], probe: bool) -> Output {
    let data = models.join("reference.jsonl");
    let text: Vec<String> = lines.iter().map(Value::to_string).collect();
    std::fs::write(&data, text.join("\n")).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_streamserve"));
    command
        .current_dir(repo())
        .args(["profile", model, "--models"])
        .arg(models)
        .arg("--data")
        .arg(&data);
    if probe {
        command.arg("--probe");
    }
    command.output().unwrap()
}

fn said(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// mlp features that make it answer NaN: each is a finite FP32, their sums overflow.
fn overflowing(rows: usize) -> Value {
    mlp_request(&vec![3e38; rows * 256])
}

/// Starts a server on `models`, waits for `model`'s probe to have run, and returns the
/// version's readiness status and its probe's success gauge.
async fn served_with_probe(models: &Path, model: &str) -> (u16, f64) {
    let url = start(models, |_| {});
    let c = client();
    let label = format!("model=\"{model}\"");
    for _ in 0..100 {
        let text = metrics_text(&c, &url).await;
        let checks = text
            .lines()
            .find(|l| l.starts_with("streamserve_probe_checks_total{") && l.contains(&label));
        if checks.is_some_and(|l| !l.ends_with(" 0")) {
            let success = text
                .lines()
                .find(|l| l.starts_with("streamserve_probe_success{") && l.contains(&label))
                .and_then(|l| l.rsplit(' ').next()?.parse().ok())
                .unwrap();
            let ready = get(&c, &format!("{url}/v2/models/{model}/versions/1/ready")).await;
            return (ready.0, success);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, status) = get(&c, &format!("{url}/v2/models")).await;
    panic!("the probe of {model} never ran: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_is_made_from_the_first_answer_that_is_all_finite() {
    let dir = own_copy("mlp", "nan_mlp", MLP_SHA, 64);
    let made = profile(
        &dir,
        "nan_mlp",
        &[overflowing(1), mlp_request(&features(3, 2))],
        true,
    );
    assert!(made.status.success(), "{}", said(&made));
    assert!(said(&made).contains("probe from line 2"), "{}", said(&made));
    let probe = std::fs::read_to_string(dir.join("nan_mlp/1/probe.json")).unwrap();
    assert!(!probe.contains("null"), "{probe}");
    let written: Value = serde_json::from_str(&probe).unwrap();
    assert_eq!(written["inputs"][0]["shape"], json!([2, 256]));
    let (ready, success) = served_with_probe(&dir, "nan_mlp").await;
    assert_eq!(
        (ready, success),
        (200, 1.0),
        "the version serves and passes"
    );

    // No request with a finite answer: nothing is written, and the command says why.
    let dir = own_copy("mlp", "nan_mlp", MLP_SHA, 64);
    let refused = profile(&dir, "nan_mlp", &[overflowing(2), overflowing(1)], true);
    assert!(!refused.status.success());
    assert!(
        said(&refused).contains("no finite value"),
        "{}",
        said(&refused)
    );
    assert!(!dir.join("nan_mlp/1/probe.json").exists());
    assert!(!dir.join("nan_mlp/1/profile.json").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_inputs_keep_their_own_type() {
    let dir = own_copy(
        "typed_ops",
        "typed_probe",
        "e491291eeeb4b687cde854db925c3c769498cd67b25c9f54b5eb5b14534916de",
        32,
    );
    let request = json!({"inputs": [
        {"name": "a", "shape": [1, 4], "datatype": "INT64", "data": [i64::MAX, 1, -2, 3]},
        {"name": "b", "shape": [1, 4], "datatype": "FP64", "data": [1.5, 2, 3, 0.1]},
        {"name": "mask", "shape": [1, 4], "datatype": "BOOL", "data": [true, false, true, false]}
    ]});
    let made = profile(&dir, "typed_probe", &[request], true);
    assert!(made.status.success(), "{}", said(&made));
    let probe: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("typed_probe/1/probe.json")).unwrap(),
    )
    .unwrap();
    let input = |name: &str| {
        probe["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .unwrap()["data"]
            .clone()
    };
    assert_eq!(input("a"), json!([i64::MAX, 1, -2, 3]));
    assert_eq!(input("mask"), json!([true, false, true, false]));
    assert_eq!(input("b"), json!([1.5, 2.0, 3.0, 0.1]));
    let (ready, success) = served_with_probe(&dir, "typed_probe").await;
    assert_eq!((ready, success), (200, 1.0));
}

#[test]
fn requests_the_server_refuses_are_refused_and_rows_are_real() {
    let dir = own_copy("mlp", "rows_mlp", MLP_SHA, 64);
    let empty = json!({"inputs": [{"name": "features", "shape": [0, 256], "datatype": "FP32", "data": []}]});
    for (lines, probe) in [
        (vec![empty.clone()], false),
        (vec![empty.clone(), mlp_request(&features(1, 1))], true),
        (vec![mlp_request(&features(1, 1)), empty.clone()], false),
    ] {
        let refused = profile(&dir, "rows_mlp", &lines, probe);
        assert!(!refused.status.success(), "{}", said(&refused));
        let text = said(&refused);
        assert!(
            text.contains("line ") && text.contains("empty batch"),
            "{text}"
        );
        assert!(!dir.join("rows_mlp/1/profile.json").exists());
        assert!(!dir.join("rows_mlp/1/probe.json").exists());
    }
    // A wrong type is refused as the server refuses it.
    let ints = json!({"inputs": [{"name": "features", "shape": [1, 2], "datatype": "INT32", "data": [1, 2]}]});
    let refused = profile(&dir, "rows_mlp", &[ints], false);
    assert!(
        said(&refused).contains("line 1: the server would refuse it"),
        "{}",
        said(&refused)
    );

    let lines: Vec<Value> = (0..20).map(|i| mlp_request(&features(i, 1))).collect();
    let made = profile(&dir, "rows_mlp", &lines, false);
    assert!(made.status.success(), "{}", said(&made));
    assert!(said(&made).contains("from 20 rows"), "{}", said(&made));
}
