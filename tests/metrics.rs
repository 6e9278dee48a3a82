//! `/metrics` as alerting reads it, scraped from a real server: counters exist at 0 from the
//! start, every metric has HELP, and shed and degraded requests are counted once, under the
//! model the client asked for.
//!
//! The metrics recorder is process-wide, so each test here uses model names of its own.

mod common;

use std::collections::BTreeSet;

use common::*;
use serde_json::json;

const TOKEN: &str = "test-token";

#[tokio::test]
async fn counters_exist_at_zero_from_the_start_and_every_metric_has_help() {
    let dir = model_dir(&format!(
        r#"
        [[models]]
        name = "zero_mlp"
        version = "1"
        file = "{{models}}/mlp/1/model.onnx"
        sha256 = "{MLP_SHA}"
        fallback = "zero_small"

        [[models]]
        name = "zero_small"
        version = "1"
        file = "{{models}}/mlp_small/1/model.onnx"
        sha256 = "{MLP_SMALL_SHA}"
        "#
    ));
    let url = start(&dir, |_| {});
    let c = client();
    // Before any request: the start-up has published every counter a request could move.
    let text = metrics_text(&c, &url).await;
    let labels = r#"{model="zero_mlp",version="1"}"#;
    for name in [
        "streamserve_worker_restarts_total",
        "streamserve_retries_total",
        "streamserve_shed_total",
        "streamserve_deadline_exceeded_total",
        "streamserve_inference_failures_total",
    ] {
        assert_eq!(
            sample(&text, &format!("{name}{labels}")),
            Some(0.0),
            "{name}{labels} is not at 0 in:\n{text}"
        );
    }
    assert_eq!(
        sample(
            &text,
            r#"streamserve_degraded_total{model="zero_mlp",version="1",served_by="zero_small"}"#
        ),
        Some(0.0),
        "{text}"
    );
    for direction in ["up", "down"] {
        let series = format!(
            r#"streamserve_scale_events_total{{model="zero_mlp",direction="{direction}"}}"#
        );
        assert_eq!(sample(&text, &series), Some(0.0), "{series}");
    }
    assert_eq!(
        sample(
            &text,
            r#"streamserve_rollout_events_total{model="zero_mlp",event="rolled_back"}"#
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(&text, r#"streamserve_stream_drops_total{reason="idle"}"#),
        Some(0.0)
    );
    // After traffic too (histograms appear with their first sample).
    let (status, _) = post(
        &c,
        &format!("{url}/v2/models/zero_mlp/infer"),
        &mlp_request(&features(1, 2)),
    )
    .await;
    assert_eq!(status, 200);
    let text = metrics_text(&c, &url).await;
    // (Recorded before the answer is sent; the router's batch histograms may come later.)
    assert!(
        text.contains("# TYPE streamserve_request_duration_seconds histogram"),
        "{text}"
    );
    assert_eq!(undescribed(&text), Vec::<String>::new(), "{text}");
}

/// Every metric name the server's code emits is described in `telemetry/describe.rs`, with a unit,
/// including those a scrape only shows after rare events (stream drops, cold starts).
#[test]
fn every_metric_in_the_source_is_described() {
    let src = repo().join("src");
    let telemetry = std::fs::read_to_string(src.join("telemetry/describe.rs")).unwrap();
    let described: BTreeSet<String> = [
        "describe_counter!(",
        "describe_gauge!(",
        "describe_histogram!(",
    ]
    .iter()
    .flat_map(|call| telemetry.split(call).skip(1))
    .map(|rest| {
        let name = rest.split('"').nth(1).unwrap();
        let args = rest.split(");").next().unwrap();
        assert!(
            args.contains("Unit::"),
            "{name} is described without a unit"
        );
        name.to_string()
    })
    .collect();
    // The model monitor writes its own families (buckets per version), each with its HELP and
    // TYPE beside its name in `Family::new`.
    let monitor = std::fs::read_to_string(src.join("monitor/render.rs")).unwrap();
    let described: BTreeSet<String> = described
        .into_iter()
        .chain(monitor.split("Family::new(").skip(1).map(|rest| {
            let name = rest.split('"').nth(1).unwrap();
            name.to_string()
        }))
        .collect();
    let mut files = vec![src.clone()];
    let mut emitted = BTreeSet::new();
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for piece in text.split("\"streamserve_").skip(1) {
            // A name ends at its closing quote, or at the `{` of a sample line in a test.
            let name = piece.split(['"', '{']).next().unwrap();
            // A bucket matcher's prefix is not a metric; a histogram's series are its name's.
            let name = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|base| described.contains(&format!("streamserve_{base}")))
                .unwrap_or(name);
            if !name.ends_with('_') {
                emitted.insert(format!("streamserve_{name}"));
            }
        }
    }
    assert!(emitted.len() >= 20, "{emitted:?}");
    let missing: Vec<&String> = emitted.difference(&described).collect();
    assert!(missing.is_empty(), "no describe_* for {missing:?}");
}

/// The primary is overloaded, so requests go to its fallback, whose queue of 2 overflows: some
/// requests are served degraded, some shed. Each is counted once, under the model the client
/// called: a shed request is not also counted as degraded, and the fallback's own counters do
/// not move.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shed_and_degraded_count_each_request_once_under_the_model_asked_for() {
    let dir = model_dir(&format!(
        r#"
        [[models]]
        name = "shed_mlp"
        version = "1"
        file = "{{models}}/mlp/1/model.onnx"
        sha256 = "{MLP_SHA}"
        max_batch_size = 8
        max_queue_delay_ms = 0
        slo_ms = 20
        fallback = "shed_small"

        [[models]]
        name = "shed_small"
        version = "1"
        file = "{{models}}/mlp_small/1/model.onnx"
        sha256 = "{MLP_SMALL_SHA}"
        max_batch_size = 1
        max_queue = 2
        "#
    ));
    let url = start(&dir, |config| config.admin_token = Some(TOKEN.into()));
    let c = client();
    inject_fault(
        &c,
        &url,
        TOKEN,
        "shed_mlp",
        json!({"fault": {"kind": "slow", "ms": 200}, "count": 4}),
    )
    .await;
    inject_fault(
        &c,
        &url,
        TOKEN,
        "shed_small",
        json!({"fault": {"kind": "slow", "ms": 200}, "count": 4}),
    )
    .await;
    let tasks: Vec<_> = (0..120)
        .map(|i| {
            let c = c.clone();
            let url = format!("{url}/v2/models/shed_mlp/infer");
            tokio::spawn(async move { post(&c, &url, &mlp_request(&features(i, 1))).await })
        })
        .collect();
    let (mut degraded, mut shed, mut primary) = (0u64, 0u64, 0u64);
    for task in tasks {
        let (status, body) = task.await.unwrap();
        match status {
            200 if body["parameters"]["degraded"] == true => {
                assert_eq!(body["parameters"]["served_by"], "shed_small:1");
                degraded += 1;
            }
            200 => primary += 1,
            429 => shed += 1,
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(
        degraded > 0 && shed > 0 && primary > 0,
        "degraded {degraded}, shed {shed}, primary {primary}"
    );
    eprintln!("served by the primary {primary}, degraded {degraded}, shed {shed}");
    let text = metrics_text(&c, &url).await;
    let value = |series: &str| sample(&text, series).unwrap_or_else(|| panic!("no {series}"));
    assert_eq!(
        value(r#"streamserve_degraded_total{model="shed_mlp",version="1",served_by="shed_small"}"#),
        degraded as f64,
        "degraded counts only the requests the fallback took in"
    );
    assert_eq!(
        value(r#"streamserve_shed_total{model="shed_mlp",version="1"}"#),
        shed as f64,
        "shed requests count under the model the client called"
    );
    assert_eq!(
        value(r#"streamserve_shed_total{model="shed_small",version="1"}"#),
        0.0,
        "nobody called the fallback itself"
    );
    assert!(!text.contains(r#"streamserve_degraded_total{model="shed_small""#));
    assert_eq!(undescribed(&text), Vec::<String>::new());
}

/// A version unloaded while a request runs on it, and loaded again before that request ends,
/// has two routers under the same labels for a while. The old one zeroed
/// `streamserve_workers` and `streamserve_replicas` when it stopped, after the new one had
/// published its counts: the serving version read 0 of 0 (no healthy replica, to an alert)
/// until its replicas next changed. The scrape reads the current router's counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_version_loaded_again_while_its_old_router_drains_shows_its_replicas() {
    let dir = model_dir(
        r#"
        [[models]]
        name = "again_ops"
        version = "1"
        file = "{models}/typed_ops/1/model.onnx"
        sha256 = "e491291eeeb4b687cde854db925c3c769498cd67b25c9f54b5eb5b14534916de"
        "#,
    );
    let url = start(&dir, |config| config.admin_token = Some(TOKEN.into()));
    let c = client();
    let request = json!({"inputs": [
        {"name": "a", "datatype": "INT64", "shape": [1, 4], "data": [1, 2, 3, 4]},
        {"name": "b", "datatype": "FP64", "shape": [1, 4], "data": [0.5, -1.0, 0.0, 2.0]},
        {"name": "mask", "datatype": "BOOL", "shape": [1, 4], "data": [true, false, true, false]}
    ]});
    let fault = json!({"fault": {"kind": "slow", "ms": 1000}});
    inject_fault(&c, &url, TOKEN, "again_ops", fault).await;
    let running = tokio::spawn({
        let (c, url) = (c.clone(), format!("{url}/v2/models/again_ops/infer"));
        async move { post(&c, &url, &request).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // The admin API's unload answers at once; the old router drains the running request.
    for action in ["unload", "load"] {
        let (status, answer) = admin_call(
            &c,
            &format!("{url}/admin/models/again_ops/{action}"),
            TOKEN,
            Some(&json!({})),
        )
        .await;
        assert_eq!(status, 200, "{action}: {answer}");
    }
    let (status, body) = running.await.unwrap();
    assert_eq!(status, 200, "{body}");
    // The old router stops within its watch interval (50 ms) of its last answer.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let text = metrics_text(&c, &url).await;
    let labels = r#"{model="again_ops",version="1"}"#;
    for gauge in ["streamserve_workers", "streamserve_replicas"] {
        assert_eq!(
            sample(&text, &format!("{gauge}{labels}")),
            Some(1.0),
            "{gauge}: the version serves on its one replica"
        );
    }
}
