//! The edges of scaling, over real HTTP: an overloaded model whose fallback is not loaded, or
//! cannot take its requests, queues its overflow instead of shedding or failing it, and a new
//! replica that cannot load is given up with its budget instead of being counted (and
//! retried) forever.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const TOKEN: &str = "t";

/// `count` concurrent 1-row requests to `model`; each answer's status and whether it was
/// degraded.
async fn burst(url: &str, model: &str, count: usize) -> Vec<(u16, bool, Value)> {
    let c = client();
    let sends = (0..count).map(|k| {
        let (c, url) = (c.clone(), format!("{url}/v2/models/{model}/infer"));
        async move {
            let body = json!({ "inputs": [{ "name": "features", "shape": [1, 256],
                "datatype": "FP32", "data": features(k as u64, 1) }] });
            let (status, answer) = post(&c, &url, &body).await;
            let degraded = answer["parameters"]["degraded"] == true;
            (status, degraded, answer)
        }
    });
    futures_util::future::join_all(sends).await
}

/// The router's status of the first listed model, from the admin API.
async fn router(c: &reqwest::Client, url: &str) -> Value {
    let (_, list) = admin_call(c, &format!("{url}/admin/models"), TOKEN, None).await;
    list["models"][0]["router"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_overloaded_model_whose_fallback_is_cold_queues_its_overflow() {
    // `f` is lazy: named as `p`'s fallback, but not loaded. Past `slo_ms` of predicted wait
    // nothing can take `p`'s overflow, so its queue does (it has room for 100), as it would
    // without a fallback; a 429 here would shed what the queue is there to absorb.
    let manifest = format!(
        r#"
        [[models]]
        name = "p"
        version = "1"
        file = "{{models}}/mlp_small/1/model.onnx"
        sha256 = "{MLP_SMALL_SHA}"
        max_batch_size = 1
        max_queue = 100
        slo_ms = 50
        fallback = "f"

        [[models]]
        name = "f"
        version = "1"
        file = "{{models}}/mlp_small/1/model.onnx"
        sha256 = "{MLP_SMALL_SHA}"
        load = "lazy"
        "#
    );
    let url = start(&model_dir(&manifest), |config| {
        config.admin_token = Some(TOKEN.into())
    });
    // 60 ms batches: 24 requests at once queue well past 50 ms of predicted wait.
    let fault = json!({"fault": {"kind": "slow", "ms": 60}, "count": 24});
    inject_fault(&client(), &url, TOKEN, "p", fault).await;
    let answers = burst(&url, "p", 24).await;
    for (status, degraded, answer) in &answers {
        assert_eq!(*status, 200, "queued, not shed: {answer}");
        assert!(!degraded, "answered by p itself: {answer}");
    }
    let metrics = metrics_text(&client(), &url).await;
    assert_eq!(counter(&metrics, "streamserve_shed_total", "p"), 0.0);
    let (_, list) = get(&client(), &format!("{url}/v2/models")).await;
    let f = list["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "f")
        .unwrap();
    assert_eq!(f["state"], "UNLOADED", "the fallback was not loaded: {f}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fallback_that_cannot_take_the_requests_is_not_used() {
    // `g` is loaded and healthy, but its model takes other inputs (`typed_ops`): degrading
    // to it failed every request it took, just when the load was high. It is never used;
    // the overflow queues as on a model without a fallback.
    let manifest = format!(
        r#"
        [[models]]
        name = "q"
        version = "1"
        file = "{{models}}/mlp_small/1/model.onnx"
        sha256 = "{MLP_SMALL_SHA}"
        max_batch_size = 1
        max_queue = 100
        slo_ms = 50
        fallback = "g"

        [[models]]
        name = "g"
        version = "1"
        file = "{{models}}/typed_ops/1/model.onnx"
        sha256 = "e491291eeeb4b687cde854db925c3c769498cd67b25c9f54b5eb5b14534916de"
        "#
    );
    let url = start(&model_dir(&manifest), |config| {
        config.admin_token = Some(TOKEN.into())
    });
    let fault = json!({"fault": {"kind": "slow", "ms": 60}, "count": 24});
    inject_fault(&client(), &url, TOKEN, "q", fault).await;
    let answers = burst(&url, "q", 24).await;
    for (status, degraded, answer) in &answers {
        assert_eq!(*status, 200, "queued, not failed by the fallback: {answer}");
        assert!(!degraded, "answered by q itself: {answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_replica_that_cannot_load_is_given_up() {
    // The model's file is a copy that goes away once the version serves (a cleaned-up
    // download, a lost volume): a replica added now cannot load its session.
    let dir = model_dir(
        r#"
        [[models]]
        name = "m"
        version = "1"
        file = "model.onnx"
        sha256 = "1ee4e3ca0ab831f8b5d0012533fdfe38626360da2dfded1adc62f14bb97bb481"
        replicas = 1
        max_replicas = 2
        max_batch_size = 1
        "#,
    );
    let file = dir.join("model.onnx");
    std::fs::copy(repo().join("models/mlp_small/1/model.onnx"), &file).unwrap();
    let url = start(&dir, |config| {
        config.admin_token = Some(TOKEN.into());
        config.cpu_budget = 4;
    });
    let c = client();
    std::fs::remove_file(&file).unwrap();
    // 100 ms batches, 24 requests at once: the queue holds more than the one replica can take
    // for over a second, so the router adds one, whose load fails.
    let fault = json!({"fault": {"kind": "slow", "ms": 100}, "count": 24});
    inject_fault(&c, &url, TOKEN, "m", fault).await;
    let answers = burst(&url, "m", 24).await;
    for (status, _, answer) in &answers {
        assert_eq!(*status, 200, "{answer}");
    }
    let metrics = metrics_text(&c, &url).await;
    let up = r#"streamserve_scale_events_total{model="m",direction="up"}"#;
    assert_eq!(sample(&metrics, up), Some(1.0), "it tried to scale up");
    // The replica that could not load is not counted, and it does not hold the router: the
    // status shows the one replica that serves.
    let mut status = router(&c, &url).await;
    for _ in 0..50 {
        if status["replicas"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        status = router(&c, &url).await;
    }
    assert_eq!(
        (&status["replicas"], &status["healthy_replicas"]),
        (&json!(1), &json!(1)),
        "{status}"
    );
    let metrics = metrics_text(&c, &url).await;
    assert_eq!(
        sample(&metrics, r#"streamserve_replicas{model="m",version="1"}"#),
        Some(1.0)
    );
    // And the version still serves.
    assert_eq!(burst(&url, "m", 1).await[0].0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_serving_replica_is_not_scaled_down_while_another_is_being_replaced() {
    // Its own model name: metrics are one registry for every server in this process.
    // Two replicas, down to one when idle. Replica 0 dies, and its replacement cannot load
    // (the file is gone): removing replica 1, the newest, would leave no worker at all.
    let dir = model_dir(
        r#"
        [[models]]
        name = "n"
        version = "1"
        file = "model.onnx"
        sha256 = "1ee4e3ca0ab831f8b5d0012533fdfe38626360da2dfded1adc62f14bb97bb481"
        replicas = 2
        min_replicas = 1
        max_batch_size = 1
        "#,
    );
    let file = dir.join("model.onnx");
    std::fs::copy(repo().join("models/mlp_small/1/model.onnx"), &file).unwrap();
    let url = start(&dir, |config| config.admin_token = Some(TOKEN.into()));
    let c = client();
    std::fs::remove_file(&file).unwrap();
    let panic = json!({"replica": 0, "fault": {"kind": "panic"}, "count": 1});
    inject_fault(&c, &url, TOKEN, "n", panic).await;
    // Two at once, until replica 0 has taken one (and died; its request is retried on 1).
    for _ in 0..50 {
        for (status, _, answer) in burst(&url, "n", 2).await {
            assert_eq!(status, 200, "{answer}");
        }
        if router(&c, &url).await["restarts"] == 1 {
            break;
        }
    }
    assert_eq!(router(&c, &url).await["healthy_replicas"], 1);
    // Idle past the scale-down delay (5 s).
    tokio::time::sleep(Duration::from_millis(6500)).await;
    let status = router(&c, &url).await;
    assert_eq!(
        (&status["replicas"], &status["healthy_replicas"]),
        (&json!(2), &json!(1)),
        "{status}"
    );
    let (status, _, answer) = burst(&url, "n", 1).await.remove(0);
    assert_eq!(status, 200, "{answer}");
}
